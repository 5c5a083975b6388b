"""Missing (donor, cell type) values: exact likelihood of the observed values, HE on the observed
pairs, OP from the observed pairs with renormalised proportions, fully missing donors dropped."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import reference
from helpers import CLOSED_FORM, OPTIMIZER, random_phi, small_data
from numpy.testing import assert_allclose

import ctmm_jax as cj
from ctmm_jax import blocks, likelihood
from ctmm_jax.data import Covariates

N, C = 24, 3


def _masked(G=3, seed=0, frac=0.2):
    """CTP with ~frac of the pairs missing per gene; donor 2 fully missing for gene 0."""
    data = small_data("ctp", G=G, N=N, C=C, seed=seed, alpha=2.0)
    mask = np.random.default_rng(seed).random((G, N, C)) > frac
    mask[0, 2] = False
    mask[:, :, 0] |= ~mask.any(axis=1)[:, None, 0]  # every cell type observed somewhere
    return cj.CTPData.from_arrays(data.Y, data.ctnu, data.P, mask=mask), mask


def _covars(seed=0):
    rng = np.random.default_rng(seed)
    return {"pc": rng.normal(size=(N, 1))}, {"batch": np.eye(4)[np.arange(N) % 4]}


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_masked_likelihood_with_covariates_equals_dense_observed(method):
    """NLL = dense likelihood of the observed subvector, with fixed and random covariates."""
    data, mask = _masked()
    fixed, rand = _covars()
    Fc, Rc = Covariates.build(fixed, data.donors), Covariates.build(rand, data.donors, "random")
    b = blocks.to_blocks(data, "free", Fc.matrix, Rc.matrix, Rc.groups)
    phi = np.concatenate([random_phi("free", C, seed=2), [0.15]])
    for g in range(3):
        d = b.gene(g)
        y, X, Sigma = reference.dense(data, g, *reference.natural("free", phi[:-1], C))
        X = np.hstack([X, np.kron(fixed["pc"], np.ones((C, 1)))])
        Sigma = Sigma + phi[-1] * np.kron(rand["batch"] @ rand["batch"].T, np.ones((C, C)))
        o = mask[g].ravel()
        ll = reference.ml_loglik if method == "ml" else reference.reml_loglik
        ref = ll(y[o], X[o], Sigma[np.ix_(o, o)])
        assert_allclose(-likelihood.nll(jnp.asarray(phi), d, method == "reml"), ref, **CLOSED_FORM)


@pytest.mark.parametrize("model", ["hom", "free"])
def test_he_masked_equals_dense_observed(model):
    data, mask = _masked(seed=1)
    _, rand = _covars()
    res = cj.fit(data, model, "he", random_covars=rand)
    K_r = np.kron(rand["batch"] @ rand["batch"].T, np.ones((C, C)))
    full = cj.CTPData.from_arrays(data.Y, data.ctnu, data.P)
    for g in range(3):
        o = mask[g].ravel()
        y, X, _ = reference.dense(full, g, 0.0, np.zeros((C, C)))
        y, X = y[o], X[o]
        D = np.diag(data.ctnu[g].ravel()[o])
        Ks = [K[np.ix_(o, o)] for K in reference.kernels(full, model) + [K_r]]
        assert_allclose(res.phi[g], reference.he(y, X, D, Ks), **CLOSED_FORM)


def _delete_donor(data, i, covars):
    keep = np.arange(N) != i
    donors = np.array(data.donors)[keep]
    sub = cj.CTPData.from_arrays(
        data.Y[:, keep], data.ctnu[:, keep], data.P[keep], mask=data.mask[:, keep], donors=donors
    )
    return sub, {k: {n: v[keep] for n, v in c.items()} for k, c in covars.items()}


@pytest.mark.parametrize("shape", ["ctp", "op"])
@pytest.mark.parametrize("method", ["ml", "reml", "he"])
def test_fully_masked_donor_equals_deleted_donor(shape, method):
    """Gene 0 has donor 2 fully masked: its fit (estimates, loglik, p values, df, and the
    jackknife over the remaining donors) equals the fit with donor 2 deleted."""
    data, _ = _masked(G=1, seed=3)
    fixed, rand = _covars(1)
    covars = dict(fixed_covars=fixed, random_covars=rand)
    sub, sub_covars = _delete_donor(data, 2, covars)
    if shape == "op":
        data, sub = cj.OPData.from_ctp(data), cj.OPData.from_ctp(sub)
    a = cj.fit(data, "iid", method, jackknife=True, **covars)
    b = cj.fit(sub, "iid", method, jackknife=True, **sub_covars)
    tol = CLOSED_FORM if method == "he" else OPTIMIZER
    assert a.table.n_donors.iloc[0] == N - 1 and a.df[0] == b.df[0]
    cols = [c for c in b.table if c.startswith(("hom2", "V_", "r2", "beta", "p_", "se_"))]
    assert_allclose(a.table[cols].to_numpy(float), b.table[cols].to_numpy(float), **tol)
    if method != "he":
        assert_allclose(a.loglik, b.loglik, **tol)
    assert np.isnan(a.jackknife.phi[0, 2]).all()


def test_op_from_masked_ctp_renormalises_proportions():
    data, mask = _masked(seed=4)
    op = cj.OPData.from_ctp(data)
    P = data.P * mask[1]
    P = P / P.sum(axis=1, keepdims=True)
    assert_allclose(op.P_gene[1], P, rtol=1e-14)
    assert_allclose(op.y[1], (P * data.Y[1]).sum(1), rtol=1e-14)
    assert_allclose(op.nu[1], (P**2 * data.ctnu[1]).sum(1), rtol=1e-14)
    assert not op.mask[0, 2] and op.mask[0].sum() == N - 1
    # the OP likelihood uses each gene's own proportions: dense check
    b = blocks.to_blocks(op, "free")
    phi = random_phi("free", C, seed=5)
    d = b.gene(1)
    hom2, V = reference.natural("free", phi, C)
    y, X, Sigma = reference.op_dense(hom2, V, op.y[1], op.nu[1], op.P_gene[1])
    assert_allclose(-likelihood.nll(jnp.asarray(phi), d, True), reference.reml_loglik(y, X, Sigma),
                    **CLOSED_FORM)  # fmt: skip


def test_from_frames_absent_pairs_are_missing():
    data = small_data("ctp", G=2, N=6, C=2, seed=6)
    idx = pd.MultiIndex.from_product([data.donors, data.celltypes])
    ctp = pd.DataFrame(data.Y.reshape(2, -1).T, index=idx, columns=data.genes)
    ctnu = pd.DataFrame(data.ctnu.reshape(2, -1).T, index=idx, columns=data.genes)
    ctp.iloc[3, 1] = np.nan  # gene1 at (donor1, ct1)
    P = pd.DataFrame(data.P, index=list(data.donors), columns=list(data.celltypes))
    got = cj.CTPData.from_frames(ctp.drop(index=ctp.index[0]), ctnu, P)
    assert got.mask.sum() == 2 * 6 * 2 - 3
    assert not got.mask[:, 0, 0].any() and not got.mask[1, 1, 1] and got.mask[0, 1, 1]


def test_bad_mask():
    data = small_data("ctp", G=1, N=6, C=2)
    with pytest.raises(ValueError, match="mask: expected 0/1"):
        cj.CTPData.from_arrays(data.Y, data.ctnu, data.P, mask=np.ones((5, 2)))
    Y = data.Y.copy()
    Y[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="Y: has NaN.*mark the values missing"):
        cj.CTPData.from_arrays(Y, data.ctnu, data.P)


@pytest.mark.parametrize("shape", ["ctp", "op"])
@pytest.mark.parametrize("method", ["ml", "reml", "he"])
def test_too_few_observed_donors_is_not_fitted(shape, method):
    """Issue 18 #13: a mask leaving 5 donors for n_par = 7 was fitted and reported 'stopped at
    the positive-definite boundary' with df = -2, and a gene with one observed donor was called
    'constant'. Every method now checks the observed donors against n_par before fitting (df =
    N_g - n_par >= 1): too_few_donors, no estimates, no p values."""
    data, _ = _masked(G=1, seed=3)  # the shapes of test_fully_masked_donor_equals_deleted_donor
    fixed, rand = _covars(1)  # iid: 2 variances + 1 r2 + 3 means + 1 covariate: n_par = 7
    for n_obs, too_few in ((1, True), (5, True), (7, True), (8, False)):
        mask = np.zeros((1, N, C), bool)
        mask[0, :n_obs] = True
        d = cj.CTPData.from_arrays(data.Y, data.ctnu, data.P, mask=mask)
        d = cj.OPData.from_ctp(d) if shape == "op" else d
        res = cj.fit(d, "iid", method, fixed_covars=fixed, random_covars=rand)
        t = res.table.iloc[0]
        assert t.n_donors == n_obs and res.df[0] == n_obs - 7
        assert (t.status == "too_few_donors") == too_few, (n_obs, t.status)
        if too_few:
            assert "must exceed the number of parameters" in t.message and not t.converged
            assert np.isnan(res.phi).all() and np.isnan(res.beta).all()
            assert t.filter(like="p_").isna().all()
