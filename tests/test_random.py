"""Random covariates (r2 R R^T, CTP: r2 R R^T (x) J_C): Woodbury likelihood, score, information
and HE against the dense stacked covariance; jackknife = delete-a-donor; validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import reference
from helpers import CLOSED_FORM, METHODS, MODELS, OPTIMIZER, SHAPES, random_phi, small_data
from numpy.testing import assert_allclose
from scipy import optimize

import ctmm_jax as cj
from ctmm_jax import blocks, likelihood
from ctmm_jax.data import Covariates


def _random(N, seed=0):
    """A one-hot batch (4 levels) and a continuous 2-column design, in sorted name order."""
    rng = np.random.default_rng(seed)
    batch = np.eye(4)[np.concatenate([np.arange(4), rng.integers(0, 4, N - 4)])]
    return {"batch": batch, "z": rng.normal(size=(N, 2))}


def _dense_kernels(data, covars):
    Ks = []
    for name in sorted(covars):
        K = covars[name] @ covars[name].T
        Ks.append(np.kron(K, np.ones((3, 3))) if hasattr(data, "Y") else K)
    return Ks


def _gene(data, model, covars, g=0):
    rc = Covariates.build(covars, data.donors, kind="random")
    b = blocks.to_blocks(data, model, None, rc.matrix, rc.groups)
    return b.gene(g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_likelihood_with_random_equals_dense(shape, model, method):
    """NLL = dense scipy/REML on the full stacked covariance; info = dense 1/2 tr(Pi K Pi K);
    score and Hessian = autodiff; GLS = dense GLS. r2 of the second covariate is negative."""
    data = small_data(shape, G=1, N=15, C=3, seed=3)
    covars = _random(15)
    d, reml = _gene(data, model, covars), method == "reml"
    phi = np.concatenate([random_phi(model, 3, seed=1), [0.3, -0.01]])
    y, X, Sigma = reference.dense(data, 0, *reference.natural(model, phi[:-2], 3))
    Kr = _dense_kernels(data, covars)
    Sigma = Sigma + phi[-2] * Kr[0] + phi[-1] * Kr[1]
    ref = (reference.ml_loglik if method == "ml" else reference.reml_loglik)(y, X, Sigma)
    p = jnp.asarray(phi)
    assert_allclose(-likelihood.nll(p, d, reml), ref, **CLOSED_FORM)
    m = likelihood.moments(p, d, reml)
    Pm = reference.projection(X, Sigma) if reml else np.linalg.inv(Sigma)
    Ks = reference.kernels(data, model) + Kr
    info = np.array([[0.5 * np.trace(Pm @ A @ Pm @ B) for B in Ks] for A in Ks])
    assert_allclose(m.info, info, **CLOSED_FORM)
    assert_allclose(m.score, jax.grad(likelihood.nll)(p, d, reml), **CLOSED_FORM)
    assert_allclose(m.hess, jax.hessian(likelihood.nll)(p, d, reml), **CLOSED_FORM)
    Si = np.linalg.inv(Sigma)
    assert_allclose(m.beta_cov, np.linalg.inv(X.T @ Si @ X), **CLOSED_FORM)
    assert_allclose(m.beta, m.beta_cov @ X.T @ Si @ y, **CLOSED_FORM)


def test_not_positive_definite_is_infinite():
    """A negative r2 large enough to make Sigma indefinite gives nll = +inf."""
    data = small_data("ctp", G=1, N=15, C=3, seed=3)
    d = _gene(data, "hom", _random(15))
    assert np.isfinite(likelihood.nll(jnp.array([0.4, 0.1, 0.0]), d, True))
    assert likelihood.nll(jnp.array([0.4, -5.0, 0.0]), d, True) == np.inf


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_he_with_random_equals_dense(shape, model):
    data = small_data(shape, G=2, N=16, C=3, seed=33)
    covars = _random(16, seed=1)
    res = cj.fit(data, model, "he", random_covars=covars)
    for g in range(2):
        y, X, _ = reference.dense(data, g, 0.0, np.zeros((3, 3)))
        D = np.diag(data.ctnu[g].ravel() if shape == "ctp" else data.nu[g])
        Ks = reference.kernels(data, model) + _dense_kernels(data, covars)
        assert_allclose(res.phi[g], reference.he(y, X, D, Ks), **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
def test_reml_fit_with_random_matches_dense_optimizer(shape):
    """The fit's loglik is >= a dense scipy fit from the same start, parameters agree."""
    data = small_data(shape, G=1, N=40, C=3, seed=5, alpha=1.0)
    covars = {"batch": np.eye(5)[np.arange(40) % 5]}
    res = cj.fit(data, "iid", "reml", random_covars=covars)
    assert res.table.converged.all()
    K = _dense_kernels(data, covars)[0]

    def negll(phi):
        y, X, Sigma = reference.dense(data, 0, *reference.natural("iid", phi[:2], 3))
        Sigma = Sigma + phi[2] * K
        if np.linalg.eigvalsh(Sigma).min() <= 0:
            return np.inf
        return -reference.reml_loglik(y, X, Sigma)

    ref = optimize.minimize(negll, res.phi[0] * 0.8 + 0.01, method="Nelder-Mead",
                            options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000))  # fmt: skip
    assert res.loglik[0] >= -ref.fun - 1e-8
    assert_allclose(res.phi[0], ref.x, rtol=1e-3, atol=1e-4)
    assert_allclose(res.loglik[0], -negll(res.phi[0]), **CLOSED_FORM)


@pytest.mark.parametrize("method", ["he", "reml"])
def test_jackknife_with_random_deletes_the_donor_everywhere(method):
    """Replicate i equals the fit with donor i removed from the data and every covariate."""
    N = 24
    data = small_data("ctp", G=2, N=N, C=3, seed=7)
    covars = {"batch": np.eye(4)[np.arange(N) % 4]}
    fixed = {"pc": np.random.default_rng(1).normal(size=(N, 1))}
    res = cj.fit(data, "hom", method, random_covars=covars, fixed_covars=fixed, jackknife=True)
    tol = CLOSED_FORM if method == "he" else OPTIMIZER
    for i in (0, 5):
        keep = np.arange(N) != i
        sub = cj.CTPData.from_arrays(data.Y[:, keep], data.ctnu[:, keep], data.P[keep])
        one = cj.fit(sub, "hom", method, random_covars={"batch": covars["batch"][keep]},
                     fixed_covars={"pc": fixed["pc"][keep]})  # fmt: skip
        assert_allclose(res.jackknife.phi[:, i], one.phi, **tol)


def test_table_and_df():
    N = 40
    data = small_data("ctp", G=2, N=N, C=3, seed=8)
    batch = np.eye(5)[np.arange(N) % 5]
    res = cj.fit(data, "free", "reml", random_covars={"batch": batch})
    assert (res.df == N - (4 + 1 + 3)).all()
    t = res.table
    for col in ("r2_batch", "se_r2_batch", "randomvar_batch"):
        assert col in t
    assert_allclose(t.randomvar_batch, t.r2_batch)  # one-hot: tr(R^T R) / N = 1
    # a pandas Series of labels is one-hot encoded
    labels = pd_series([f"b{i % 5}" for i in range(N)], data.donors)
    other = cj.fit(data, "free", "reml", random_covars={"batch": labels})
    assert_allclose(other.phi, res.phi, rtol=1e-10)


def pd_series(values, index):
    import pandas as pd

    return pd.Series(values, index=list(index))


@pytest.mark.parametrize(
    "covars, message",
    [
        ({"batch": np.eye(4)[np.arange(19) % 4]}, "random covariate 'batch': has 19 rows"),
        ({"batch": np.full((20, 2), np.nan)}, "random covariate 'batch': has NaN"),
        (
            {"batch": np.eye(5)[np.arange(20) % 4]},
            "random covariate 'batch': column '5' is all zero",
        ),
    ],
)
def test_bad_random_covariates(covars, message):
    with pytest.raises(ValueError, match=message):
        cj.fit(small_data("ctp", G=1, N=20, C=3), "hom", "reml", random_covars=covars)


def test_missing_random_labels_are_refused():
    """A donor without a label is not a level of its own (None, NaN or the CLI's NA)."""
    data = small_data("ctp", N=20)
    labels = pd.Series(["a", "b"] * 10, index=list(data.donors), dtype=object)
    labels.iloc[3] = None
    with pytest.raises(ValueError, match=r"random covariate 'batch': no label for donor\(s\) \["):
        cj.fit(data, "hom", random_covars={"batch": labels})
