"""Fits: optimality, agreement with a dense SciPy fit, batching, failures, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import METHODS, MODELS, OPTIMIZER, SHAPES, small_data
from numpy.testing import assert_allclose
from scipy import optimize, stats

import ctmm_jax as cj
from ctmm_jax import batching, blocks, likelihood, models


def _dense_scipy_fit(data, g, model, method, phi0):
    C = data.shape[2]

    def nll(phi):
        hom2, V = reference.natural(model, phi, C)
        y, X, Sigma = reference.dense(data, g, hom2, V)
        if np.linalg.eigvalsh(Sigma).min() <= 0:
            return 1e10  # outside the PD region (oracle only)
        return -(reference.ml_loglik if method == "ml" else reference.reml_loglik)(y, X, Sigma)

    r = optimize.minimize(nll, phi0, method="BFGS", options=dict(gtol=1e-8))
    return r.x, -r.fun


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_optimum_beats_dense_scipy(shape, model, method):
    N = 40 if shape == "ctp" else 200  # OP needs many donors for an interior optimum
    data = small_data(shape, G=2, N=N, C=3, seed=7, V=np.diag([0.4, 0.2, 0.1]), alpha=1.0)
    res = cj.fit(data, model, method)
    for g in range(2):
        assert res.table.converged.iloc[g], res.table.status.iloc[g]
        d = blocks.to_blocks(data, model)
        gd = d.gene(g)
        m = likelihood.moments(jnp.asarray(res.phi[g]), gd, method == "reml")
        assert float(m.score @ np.linalg.solve(m.info, m.score)) < 1e-8  # gradient ~ 0
        # the covariances and GLS are those at the reported estimate (a converged fit keeps
        # them from its last evaluation: optimize.OptState.extra)
        assert_allclose(res.var_cov[g], np.linalg.inv(m.info), rtol=1e-8)
        assert_allclose(res.beta[g], m.beta, rtol=1e-8, atol=1e-10)
        assert_allclose(res.beta_cov[g], m.beta_cov, rtol=1e-8, atol=1e-12)
        phi0 = np.asarray(blocks.start_values(gd, model, 3))
        phi_sp, ll_sp = _dense_scipy_fit(data, g, model, method, phi0)
        assert res.loglik[g] >= ll_sp - 1e-8
        hom2, V = reference.natural(model, res.phi[g], 3)
        assert_allclose(res.loglik[g], reference.loglik(data, g, hom2, V, method), rtol=1e-10)
        assert_allclose(res.phi[g], phi_sp, rtol=1e-3, atol=1e-4)


def test_batched_equals_single_and_poisoned_gene_is_isolated():
    data = small_data("ctp", G=5, N=30, seed=8)
    Y = data.Y.copy()
    Y[2] = 1.0  # a constant gene
    poisoned = cj.CTPData.from_arrays(Y, data.ctnu, data.P)
    per_gene = blocks.to_blocks(poisoned, "free").working_bytes()
    res = cj.fit(poisoned, "free", "reml", memory=3 * per_gene)  # batches of 2 genes
    assert res.batching.items() >= {"memory_budget": 3 * per_gene, "chunk_size": 2,
                                    "working_bytes_per_gene": per_gene}.items()  # fmt: skip
    assert not res.table.converged.iloc[2]
    assert res.table.status.iloc[2] != "ok"
    for g in (0, 1, 3, 4):
        single = cj.fit(poisoned.select_genes([g]), "free", "reml")
        assert_allclose(res.phi[g], single.phi[0], rtol=1e-12, atol=1e-14)
        assert_allclose(res.loglik[g], single.loglik[0], rtol=1e-12)
        assert res.table.status.iloc[g] == single.table.status.iloc[0]


def test_deterministic():
    """The same input gives the same output, and a gene's results do not depend on its place
    in a batch (the canonical width relies on it; OP's sums over donors are matrix products
    across the batch's genes)."""
    data = small_data("op", G=4, N=50, seed=9)
    a = cj.fit(data, "free", "reml").table
    b = cj.fit(data, "free", "reml").table
    assert a.equals(b)
    c = cj.fit(data.select_genes([3, 2, 1, 0]), "free", "reml").table
    assert c.iloc[::-1].reset_index(drop=True).equals(a.reset_index(drop=True))


def test_boundary_stops_do_not_depend_on_chunk_size():
    """Fits that stop on the positive-definite wall (issue 18 #11): XLA's last bits differ
    between batch widths and the wall amplifies them (~1e-6), so unsettled fits are rerun at
    one canonical width: every chunk size reports the same numbers."""
    data = small_data("op", G=4, N=50, seed=9)
    fits = [cj.fit(data, "free", "reml", chunk_size=c) for c in (1, 2, 4)]
    assert (fits[0].table.status == "boundary").sum() >= 1
    for other in fits[1:]:
        assert (other.table.status == fits[0].table.status).all()
        assert_allclose(other.phi, fits[0].phi, rtol=0, atol=1e-10)
        assert_allclose(other.loglik, fits[0].loglik, rtol=0, atol=1e-10)


def test_pilot_choice_changes_no_unsettled_fit(monkeypatch):
    """MaximumLikelihood.fit runs its first batch wide and reruns its unsettled fits at the
    canonical width; when more than PILOT_UNSETTLED of them were rerun, the other fits run at
    the canonical width from the start, otherwise wide with the same rerun. Both ways every
    unsettled fit is computed at the canonical width: the same statuses and the same
    unsettled estimates, bit for bit (converged ones agree within the optimizer's tolerance)."""
    from ctmm_jax.estimators import mlreml

    data = small_data("op", G=40, N=50, seed=9)
    widths, optimize = [], mlreml.MaximumLikelihood.optimize

    def spy(self, blocks, problems, width, of=None):
        if self.model == "free":
            widths.append(width)
        return optimize(self, blocks, problems, width, of)

    monkeypatch.setattr(mlreml.MaximumLikelihood, "optimize", spy)
    fits = []
    for share in (0.0, 1.0):  # any unsettled fit in the first batch sends the rest to 16; none
        monkeypatch.setattr(mlreml, "PILOT_UNSETTLED", share)
        fits.append(cj.fit(data, "free", "reml", chunk_size=8))
    # first batch, its rerun, the rest | first batch, its rerun, the rest, their rerun
    assert widths == [8, 16, 16, 8, 16, 8, 16]
    a, b = fits
    assert (a.table.status == b.table.status).all()
    unsettled = (a.table.status != "ok").to_numpy()
    assert 5 <= unsettled.sum() <= 35
    np.testing.assert_array_equal(a.phi[unsettled], b.phi[unsettled])
    np.testing.assert_array_equal(a.loglik[unsettled], b.loglik[unsettled])
    assert_allclose(a.loglik, b.loglik, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_table_columns_and_wald_pvalues(method):
    data = small_data("ctp", G=3, N=40, C=3, seed=10, V=np.diag([0.4, 0.0, 0.1]))
    res = cj.fit(data, "free", method)
    t = res.table
    cts = data.celltypes
    expected = (
        ["hom2", *(f"V_{c}" for c in cts), *(f"beta_{c}" for c in cts)]
        + ["loglik", "n_donors", "converged", "n_iter", "status", "message"]
        + ["loglik_null", "status_null", "se_hom2", *(f"se_V_{c}" for c in cts)]
        + [f"se_beta_{c}" for c in cts]
        + [f"{pq}_{t}" for t in ("hom2", "V", "V_lrt", "V_wald", "ct_beta") for pq in "pq"]
    )
    assert list(t.columns) == expected
    df = 40 - (1 + 3 + 3)
    assert (res.df == df).all()
    for g in range(3):
        cov = res.var_cov[g]
        assert_allclose(t.p_hom2.iloc[g], stats.t.sf(t.hom2.iloc[g] / np.sqrt(cov[0, 0]), df))
        v = res.phi[g, 1:]
        F = v @ np.linalg.solve(cov[1:, 1:], v) / 3
        assert_allclose(t.p_V_wald.iloc[g], stats.f.sf(F, 3, df))
        T = np.array([[1, 0, -1], [0, 1, -1]])
        b, bc = T @ res.beta[g], T @ res.beta_cov[g] @ T.T
        assert_allclose(t.p_ct_beta.iloc[g], stats.f.sf(b @ np.linalg.solve(bc, b) / 2, 2, df))
        # information matrix used is the expected one at the optimum
        hom2, V = reference.natural("free", res.phi[g], 3)
        info = reference.expected_information(data, g, hom2, V, "free", method)
        assert_allclose(cov, np.linalg.inv(info), rtol=1e-7)


def test_iid_and_full_columns():
    data = small_data("ctp", G=2, N=40, C=3, seed=11)
    t = cj.fit(data, "iid", "reml").table
    assert (t["V_ct0"] == t["V_ct2"]).all() and "p_V" in t
    t = cj.fit(data, "full", "reml").table
    assert "hom2" not in t and "p_V" not in t and "p_ct_beta" in t
    assert {"V_ct0_ct0", "V_ct0_ct1", "V_ct2_ct2"} <= set(t.columns)


def test_observed_information():
    data = small_data("ctp", G=2, N=40, seed=12)
    res = cj.fit(data, "free", "reml", information="observed")
    for g in range(2):
        phi = res.phi[g]
        d = blocks.to_blocks(data, "free")
        gd = d.gene(g)
        H = jax.hessian(likelihood.nll)(jnp.asarray(phi), gd, True)
        assert_allclose(res.var_cov[g], np.linalg.inv(H), rtol=1e-8)


@pytest.mark.parametrize("model", MODELS)
def test_nonneg(model):
    data = small_data("ctp", G=3, N=40, C=3, seed=13, V=np.zeros((3, 3)))
    res = cj.fit(data, model, "reml", nonneg=True)
    for g in range(3):
        vc = models.unpack(jnp.asarray(res.phi[g]), model, 3)
        assert float(vc.hom2) >= 0 and np.linalg.eigvalsh(np.asarray(vc.V)).min() >= -1e-12
        if res.table.converged.iloc[g]:  # covariances at the estimate, as without nonneg
            w = models.kernel_weights(jnp.asarray(res.phi[g]), model, 3)
            m = likelihood.moments(w, blocks.to_blocks(data, model).gene(g), True)
            J = jax.jacfwd(models.kernel_weights)(jnp.asarray(res.phi[g]), model, 3)
            assert_allclose(res.var_cov[g], np.linalg.inv(J.T @ m.info @ J), rtol=1e-8)
    # with an interior unconstrained optimum both agree
    data = small_data("ctp", G=1, N=80, C=3, seed=14, V=np.diag([0.5, 0.4, 0.3]))
    a, b = cj.fit(data, "free", "reml"), cj.fit(data, "free", "reml", nonneg=True)
    assert a.table.converged.all() and b.table.converged.all()
    assert_allclose(a.phi, b.phi, **OPTIMIZER)


@pytest.mark.parametrize("shape, G, N", [("ctp", 3, 40), ("op", 4, 50)])
def test_nonneg_reaches_the_bounded_dense_optimum(shape, G, N):
    """True V = 0, nonneg=True (issue 18 #0): every gene converges; the estimates satisfy the
    KKT conditions of the dense REML likelihood (a variance at its bound is exactly 0 with a
    derivative of the NLL >= 0, the others have derivative 0), and the log-likelihood is the
    dense one at the estimates, no lower than SciPy's L-BFGS-B optimum under the same bounds."""
    data = small_data(shape, G=G, N=N, C=3, seed=13, V=np.zeros((3, 3)))
    res = cj.fit(data, "free", "reml", nonneg=True)
    assert (res.table.status == "ok").all(), res.table.message
    assert (res.phi >= 0).all()
    at_bound = res.phi == 0
    assert at_bound[:, 1:].any()

    for g in range(G):

        def nll(phi, g=g):
            return -reference.loglik(data, g, phi[0], np.diag(phi[1:]), "reml")

        phi = res.phi[g]
        assert_allclose(-nll(phi), res.loglik[g], rtol=1e-10)
        h = 1e-6  # one-sided differences at the bound, central inside
        up = np.array([nll(phi + h * e) for e in np.eye(4)])
        inside = phi > h
        down = np.array([nll(phi - h * e * i) for i, e in zip(inside, np.eye(4), strict=True)])
        step = np.where(inside, 2 * h, h)
        grad = (up - down) / step
        assert np.all(grad[at_bound[g]] > -1e-5), grad
        assert np.all(np.abs(grad[~at_bound[g]]) < 1e-4), grad
        opt = optimize.minimize(nll, np.full(4, 0.1), method="L-BFGS-B", bounds=[(0, None)] * 4,
                                options=dict(ftol=1e-15, gtol=1e-10))  # fmt: skip
        assert nll(phi) <= opt.fun + 1e-8


def test_lrt_on_the_boundary():
    """nonneg LRT: the chi-bar-square mixture sum_j binom(k, j) 2^-k chi2_j (Self & Liang)."""
    assert_allclose(cj.lrt(-10.0, -12.0, 1, boundary=True), 0.5 * stats.chi2.sf(4.0, 1))
    T = 5.0
    expected = (3 * stats.chi2.sf(T, 1) + 3 * stats.chi2.sf(T, 2) + stats.chi2.sf(T, 3)) / 8
    assert_allclose(cj.lrt(0.0, -T / 2, 3, boundary=True), expected, rtol=1e-12)
    assert cj.lrt(-1.0, -1.0, 3, boundary=True) == 1.0  # T = 0: the point mass


def test_lrt():
    assert_allclose(cj.lrt(-10.0, -12.0, 2), stats.chi2.sf(4.0, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="diag"), "model='diag' is unknown"),
        (dict(method="he2"), "method='he2' is unknown"),
        (dict(information="hessian"), "information='hessian'"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cj.fit(small_data("ctp"), **kwargs)


def test_memory_budget():
    assert [batching.parse_memory(v) for v in ("4GB", "512 mb", "1.5k", 1000)] == [
        4 * 2**30, 512 * 2**20, 1536, 1000,
    ]  # fmt: skip
    for bad in ("4XB", "-1GB", "0", "lots"):
        with pytest.raises(ValueError, match="memory="):
            batching.parse_memory(bad)
    assert batching.memory_chunk(256, 10**9, 10**6) == 256  # 1000 would fit: the cap
    assert batching.memory_chunk(256, 10**8, 10**6) == 64
    assert batching.memory_chunk(300, 10, 10**6) == 1


def test_too_few_donors():
    data = small_data("ctp", N=7, C=3)  # free: 4 variance + 3 fixed = 7 parameters
    with pytest.raises(ValueError, match="7 donors but the model has n_par = 7"):
        cj.fit(data, "free")
    cj.fit(data, "hom")  # 4 parameters: fine


def test_rank_deficient_op_design():
    d = small_data("op", N=20, C=3)
    P = d.P.copy()
    P[:, 2] = 0.0
    P /= P.sum(1, keepdims=True)
    with pytest.raises(ValueError, match="rank"):
        cj.fit(cj.OPData.from_arrays(d.y, d.nu, P), "hom")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["ml", "reml", "he"])
def test_scale_equivariance(shape, method):
    """Genes on very different scales fit the same: y -> a y, noise -> a^2 noise gives
    variances a^2 phi, means a beta, the same status and p values (no absolute tolerances)."""
    N = 60 if shape == "ctp" else 200  # fits in the interior (OP needs many donors)
    data = small_data(shape, G=2, N=N, C=3, seed=15, V=np.diag([0.4, 0.2, 0.1]), alpha=1.0)
    a = 1e3
    if shape == "ctp":
        scaled = cj.CTPData.from_arrays(a * data.Y, a**2 * data.ctnu, data.P)
    else:
        scaled = cj.OPData.from_arrays(a * data.y, a**2 * data.nu, data.P)
    r0, r1 = cj.fit(data, "free", method), cj.fit(scaled, "free", method)
    assert r0.converged.all() and r1.converged.all()
    assert_allclose(r1.phi, a**2 * r0.phi, rtol=1e-6)
    assert_allclose(r1.beta, a * r0.beta, rtol=1e-6)
    assert_allclose(r1.table.p_ct_beta, r0.table.p_ct_beta, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_size="x"), r"chunk_size='x': give a whole number >= 1"),
        (dict(max_iter=0), r"max_iter=0: give a whole number >= 1"),
        (dict(tol="small"), r"tol='small': give a number > 0"),
        (dict(fixed_covars=[1, 2]), r"fixed_covars: expected a dict of name -> covariate"),
        (dict(random_covars="batch.tsv"), r"random_covars: expected a dict"),
    ],
)
def test_options_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cj.fit(small_data("ctp"), "hom", **kwargs)
