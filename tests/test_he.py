"""HE against a dense NumPy least-squares solve, and the jackknife against explicit refits."""

import dataclasses

import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM, MODELS, OPTIMIZER, SHAPES, small_data
from numpy.testing import assert_allclose

import ctmm_jax as cj


def _dense_he(data, g, model):
    """Build vec(M K_k M) and vec(M y y^T M - M D M) explicitly; OLS of one on the others."""
    C = data.shape[2]
    y, X, _ = reference.dense(data, g, 0.0, np.zeros((C, C)))
    D = np.diag(data.ctnu[g].ravel() if hasattr(data, "Y") else data.nu[g])
    Ks = reference.kernels(data, model)
    return reference.he(y, X, D, Ks), np.linalg.lstsq(X, y, rcond=None)[0]


def _drop_donor(data, i):
    keep = np.arange(data.shape[1]) != i
    donors = tuple(np.array(data.donors)[keep])
    if isinstance(data, cj.CTPData):
        return dataclasses.replace(
            data, Y=data.Y[:, keep], ctnu=data.ctnu[:, keep], P=data.P[keep], donors=donors
        )
    return dataclasses.replace(
        data, y=data.y[:, keep], nu=data.nu[:, keep], P=data.P[keep], donors=donors
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_he_equals_dense_least_squares(shape, model):
    data = small_data(shape, G=3, N=14, C=3, seed=21)
    res = cj.fit(data, model, "he")
    assert res.table.converged.all()
    assert res.table.loglik.isna().all()
    for g in range(3):
        phi, beta = _dense_he(data, g, model)
        assert_allclose(res.phi[g], phi, **CLOSED_FORM)
        assert_allclose(res.beta[g], beta, **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
def test_he_gls_beta(shape):
    N = 30 if shape == "ctp" else 200
    data = small_data(shape, G=2, N=N, C=3, seed=22, V=np.diag([0.5, 0.3, 0.2]), alpha=1.0)
    res = cj.fit(data, "free", "he", he_beta="gls")
    assert res.table.converged.all()
    for g in range(2):
        hom2, V = reference.natural("free", res.phi[g], 3)
        y, X, Sigma = reference.dense(data, g, hom2, V)
        Si = np.linalg.inv(Sigma)
        assert_allclose(res.beta[g], np.linalg.solve(X.T @ Si @ X, X.T @ Si @ y), **CLOSED_FORM)


def test_he_gls_not_positive_definite_is_flagged():
    """Residual variance far below the mean noise: HE hom2 < -min(nu), the covariance at the
    HE estimate is not positive definite, GLS is undefined: NaN beta and a status."""
    rng = np.random.default_rng(0)
    N = 40
    P = rng.dirichlet(np.ones(3), size=N)
    nu = np.linspace(0.01, 1.0, N)
    y = P @ np.array([1.0, 2.0, 3.0]) + rng.normal(scale=0.1, size=N)
    res = cj.fit(cj.OPData.from_arrays(y, nu, P), "hom", "he", he_beta="gls")
    assert res.phi[0, 0] < -0.01
    assert not res.table.converged.iloc[0]
    assert "not positive definite" in res.table.message.iloc[0]
    assert np.isnan(res.beta[0]).all()
    ols = cj.fit(cj.OPData.from_arrays(y, nu, P), "hom", "he")
    assert ols.table.converged.iloc[0] and np.isfinite(ols.beta[0]).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_he_jackknife_equals_loop(shape, model):
    data = small_data(shape, G=2, N=16, C=3, seed=23)
    res = cj.fit(data, model, "he", jackknife=True)
    N = data.shape[1]
    loop = np.stack([cj.fit(_drop_donor(data, i), model, "he").phi for i in range(N)], axis=1)
    assert_allclose(res.jackknife.phi, loop, **CLOSED_FORM)
    dev = loop - loop.mean(axis=1, keepdims=True)
    cov = (N - 1) / N * np.einsum("gni,gnj->gij", dev, dev)
    assert_allclose(res.jackknife.var_cov, cov, **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
def test_he_degenerate_genes_are_not_fitted(shape):
    """Issue 18 #2: HE called a constant gene and a gene equal to its cell-type means `ok`,
    with jackknife p values down to 3.7e-13. HE now makes the checks of ML/REML
    (checks.outcome): 'constant', no estimates, no p values (the jackknife's included)."""
    data = small_data("ctp", G=2, N=16, C=3, seed=23)  # the shapes of the test above
    Y = data.Y.copy()
    Y[0] = 2.0
    Y[1] = np.arange(3.0)  # every value its cell type's mean: nothing left after beta
    data = dataclasses.replace(data, Y=Y)
    data = cj.OPData.from_ctp(data) if shape == "op" else data
    res = cj.fit(data, "free", "he", jackknife=True)
    t = res.table
    assert (t.status == "constant").all() and not t.converged.any()
    assert np.isnan(res.phi).all() and np.isnan(res.beta).all()
    p_cols = [c for c in t if c.startswith("p_")]
    assert any(c.endswith("_jk") for c in p_cols) and t[p_cols].isna().all().all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["ml", "reml"])
def test_likelihood_jackknife_equals_loop(shape, method):
    N = 24 if shape == "ctp" else 60
    data = small_data(shape, G=2, N=N, C=3, seed=24, V=np.diag([0.5, 0.3, 0.2]), alpha=1.0)
    res = cj.fit(data, "free", method, jackknife=True)
    for i in (0, 5, N - 1):
        single = cj.fit(_drop_donor(data, i), "free", method)
        ok = single.converged & (res.jackknife.n_failed == 0)
        assert ok.all()
        assert_allclose(res.jackknife.phi[:, i], single.phi, **OPTIMIZER)
        assert_allclose(res.jackknife.ct_beta[:, i], single.beta, **OPTIMIZER)


def test_jackknife_pvalue_columns():
    data = small_data("ctp", G=3, N=30, C=3, seed=25)
    res = cj.fit(data, "free", "reml", jackknife=True)
    t = res.table
    cols = ["p_hom2", "p_V", "p_V_wald", "p_V_lrt", "p_ct_beta", "p_hom2_jk", "p_V_jk"]
    ok = t["status"] == "ok"
    for col in cols + ["p_ct_beta_jk", "se_hom2_jk"]:  # p values only where the fit is ok
        assert col in t and t.loc[ok, col].notna().all()
    from scipy import stats

    var = res.jackknife.var_cov
    v = res.phi[:, 1:]
    F = np.einsum("gi,gi->g", v, np.linalg.solve(var[:, 1:, 1:], v[..., None])[..., 0]) / 3
    assert_allclose(t.p_V_jk[ok], stats.f.sf(F, 3, res.df)[ok])
    p_hom2 = stats.t.sf(res.phi[:, 0] / np.sqrt(var[:, 0, 0]), res.df)
    assert_allclose(t.p_hom2_jk[ok], p_hom2[ok])


def test_jackknife_needs_enough_donors():
    data = small_data("ctp", N=9, C=3)  # free: n_par = 7, N - 1 = 8 > 7 fine; hom fine
    cj.fit(data, "free", "he", jackknife=True)
    data = small_data("ctp", N=8, C=3)  # N - 1 = 7 <= 7
    with pytest.raises(ValueError, match="leaving a group of donors out leaves 7 donors for"):
        cj.fit(data, "free", "he", jackknife=True)
    with pytest.raises(ValueError, match="leaves 4 donors for n_par = 7"):  # groups of 5
        cj.fit(small_data("ctp", N=9, C=3), "free", "he", jackknife=2)


def test_he_bad_option():
    with pytest.raises(ValueError, match="he_beta='wls'"):
        cj.fit(small_data("ctp"), "free", "he", he_beta="wls")


@pytest.mark.slow
def test_jackknife_null_calibration():
    """V = 0, 2,000 genes, N = 100, C = 4 (figures in the notes): HE-jk p_V is mildly
    anti-conservative (about 0.08 at 0.05) and p_ct_beta_jk calibrated."""
    data = cj.simulate(2000, 100, 4, hom2=0.2, V=0.0, ctnu=0.2, seed=5)
    t = cj.fit(data, "free", "he", jackknife=True).table
    assert 0.04 < np.mean(t.p_V_jk < 0.05) < 0.12
    assert 0.003 < np.mean(t.p_V_jk < 0.01) < 0.04
    assert 0.035 < np.mean(t.p_ct_beta_jk < 0.05) < 0.065


def test_float32_he_agrees_with_float64_and_reml_is_refused():
    """precision='float32' runs HE's device arithmetic in float32 (jax.enable_x64(False));
    estimates and p values stay within 1e-4 of float64 (bench_fit.py --float32 measures
    <= 5e-5 at N = 100). ML/REML in float32 are refused (they cannot reach the tolerance)."""
    data = small_data("ctp", G=8, N=30, seed=4)
    t64 = cj.fit(data, "free", "he", jackknife=True).table
    t32 = cj.fit(data, "free", "he", jackknife=True, precision="float32").table
    assert (t64.status == t32.status).all()
    for prefix in ("hom2", "V_", "p_"):
        cols = [c for c in t64.columns if c.startswith(prefix)]
        np.testing.assert_allclose(t32[cols].to_numpy(float), t64[cols].to_numpy(float),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert not np.array_equal(t32["hom2"], t64["hom2"])  # it did run in float32
    with pytest.raises(ValueError, match="float32"):
        cj.fit(data, "free", "reml", precision="float32")


@pytest.mark.parametrize("n_groups", [None, 4])
def test_partition_jackknife_closed_form_equals_replicate_by_replicate(n_groups):
    """The closed form for replicates that partition the donors (leave-one-out: None; 4
    delete-m blocks) equals `he_jackknife_chunk`, which refits each replicate from its masked
    residuals (CLOSED_FORM tolerance), with a fixed covariate in the design."""
    import jax.numpy as jnp

    from ctmm_jax.blocks import to_blocks
    from ctmm_jax.estimators import he

    data = small_data("ctp", G=6, N=15, seed=2)
    pcs = np.random.default_rng(3).normal(size=(15, 2))
    b = to_blocks(data, "free", pcs)
    groups = np.arange(15) if n_groups is None else np.arange(15) % n_groups
    keep = (groups[None] != np.unique(groups)[:, None]).astype(float)
    design = b.design()
    nm = he.jackknife_normals(design, jnp.asarray(keep))
    y, noise = jnp.asarray(b.y), jnp.asarray(b.noise)
    drop = None if n_groups is None else jnp.asarray(1.0 - keep)
    closed = he.he_jackknife_partition(y, noise, design, drop, nm.QtQ)
    direct = he.he_jackknife_chunk(y, noise, design, jnp.asarray(keep), nm)
    for name in ("phi", "beta", "outcome"):
        assert_allclose(getattr(closed, name), getattr(direct, name), **CLOSED_FORM)
