"""Fixed covariates (design.md 2-3): likelihood and HE against dense oracles; validation."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import reference
from helpers import CLOSED_FORM, METHODS, MODELS, SHAPES, random_phi, small_data
from numpy.testing import assert_allclose

import ctmm_jax as cj
from ctmm_jax import blocks, likelihood


def _covariates(N, seed=0):
    rng = np.random.default_rng(seed)
    return {"pca": rng.normal(size=(N, 2)), "age": rng.normal(size=N)}


def _dense_design(data, F):
    """Stacked X: CTP rows (donor i, cell type c) = [e_c, f_i]; OP rows = [P_i, f_i]."""
    N, C = data.P.shape
    if hasattr(data, "Y"):
        return np.hstack([np.kron(np.ones((N, 1)), np.eye(C)), np.kron(F, np.ones((C, 1)))])
    return np.hstack([data.P, F])


def _F(covars):  # sorted names, as the package
    return np.hstack([np.atleast_2d(covars[k].T).T for k in sorted(covars)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_loglik_with_covariates_equals_dense(shape, model, method):
    data = small_data(shape, G=1, N=15, C=3, seed=31)
    covars = _covariates(15)
    F = _F(covars)
    b = blocks.to_blocks(data, model, F)
    d = b.gene(0)
    phi = random_phi(model, 3, seed=32)
    hom2, V = reference.natural(model, phi, 3)
    y, _, Sigma = reference.dense(data, 0, hom2, V)
    X = _dense_design(data, F)
    ref = (reference.ml_loglik if method == "ml" else reference.reml_loglik)(y, X, Sigma)
    assert_allclose(-likelihood.nll(jnp.asarray(phi), d, method == "reml"), ref, **CLOSED_FORM)
    # score and expected information: 1/2 [tr(Pj K_k) - y^T Pi K_k Pi y], 1/2 tr(Pj K_k Pj K_l)
    m = likelihood.moments(jnp.asarray(phi), d, method == "reml")
    Pj = reference.projection(X, Sigma) if method == "reml" else np.linalg.inv(Sigma)
    u = reference.projection(X, Sigma) @ y
    Ks = reference.kernels(data, model)
    score = [0.5 * (np.trace(Pj @ K) - u @ K @ u) for K in Ks]
    info = [[0.5 * np.trace(Pj @ A @ Pj @ B) for B in Ks] for A in Ks]
    assert_allclose(m.score, score, **CLOSED_FORM)
    assert_allclose(m.info, info, **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_he_with_covariates_equals_dense(shape, model):
    data = small_data(shape, G=2, N=16, C=3, seed=33)
    covars = _covariates(16, seed=1)
    res = cj.fit(data, model, "he", fixed_covars=covars)
    X = _dense_design(data, _F(covars))
    for g in range(2):
        y, _, _ = reference.dense(data, g, 0.0, np.zeros((3, 3)))
        D = np.diag(data.ctnu[g].ravel() if shape == "ctp" else data.nu[g])
        ref = reference.he(y, X, D, reference.kernels(data, model))
        assert_allclose(res.phi[g], ref, **CLOSED_FORM)
        assert_allclose(res.beta[g], np.linalg.lstsq(X, y, rcond=None)[0], **CLOSED_FORM)


def test_fit_with_covariates_table():
    data = small_data("ctp", G=2, N=40, C=3, seed=34, V=np.diag([0.3, 0.2, 0.1]))
    covars = _covariates(40, seed=2)
    res = cj.fit(data, "free", "reml", fixed_covars=covars)
    t = res.table
    assert (res.df == 40 - (4 + 3 + 3)).all()  # n_par counts the covariate columns
    for col in ["beta_age_1", "beta_pca_1", "beta_pca_2", "se_beta_pca_2", "fixedvar_pca"]:
        assert col in t
    b = res.beta[:, 4:6]  # sorted names: age (1 column), then pca (2 columns)
    expected = np.einsum("gi,ij,gj->g", b, np.cov(covars["pca"].T), b)
    assert_allclose(t.fixedvar_pca, expected, rtol=1e-12)
    hom2, V = reference.natural("free", res.phi[0], 3)
    y, _, Sigma = reference.dense(data, 0, hom2, V)
    X = _dense_design(data, _F(covars))
    assert_allclose(res.loglik[0], reference.reml_loglik(y, X, Sigma), rtol=1e-10)


def test_covariate_frame_rows_follow_donors():
    data = small_data("op", G=1, N=20, C=3, seed=35)
    pcs = np.random.default_rng(3).normal(size=(20, 2))
    frame = pd.DataFrame(pcs, index=list(data.donors), columns=["PC1", "PC2"]).iloc[::-1]
    a = cj.fit(data, "hom", "reml", fixed_covars={"pca": frame}).table
    b = cj.fit(data, "hom", "reml", fixed_covars={"pca": pcs}).table
    assert_allclose(a.beta_pca_PC1, b.beta_pca_1, rtol=1e-10)


@pytest.mark.parametrize(
    "covars, message",
    [
        ({"icpt": np.ones(20)}, r"covariates icpt\) has rank 3 < 4 columns"),
        ({"pca": np.ones((19, 2))}, "fixed covariate 'pca': has 19 rows"),
        ({"pca": np.full((20, 2), np.nan)}, "fixed covariate 'pca': has NaN"),
    ],
)
def test_bad_covariates(covars, message):
    with pytest.raises(ValueError, match=message):
        cj.fit(small_data("ctp", G=1, N=20, C=3), "hom", "reml", fixed_covars=covars)
