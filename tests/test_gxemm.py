"""GxEMM against dense NumPy/SciPy: REML likelihood and information, HE on the explicit lower
triangles, the genotype (Woodbury) path, the delta method, the tests, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM, OPTIMIZER
from numpy.testing import assert_allclose
from scipy import optimize, stats

from ctmm_jax import gxemm
from ctmm_jax.gxemm import model, reml
from ctmm_jax.gxemm.api import _heritability

MODELS = [("hom", "hom"), ("iid", "hom"), ("free", "hom"), ("hom", "free"), ("free", "free")]


def _data(N=60, M=20, seed=0, n_traits=None):
    return gxemm.simulate(N, M, maf=0.3, sig2g=(0.3, 0.6), n_traits=n_traits, seed=seed)


def _dense_kernels(K, Z, gtype, etype):
    """Every kernel written out as an N x N matrix, in sig2s order."""
    N, K0 = Z.shape
    gen = [K] + {"hom": [], "iid": [K * (Z @ Z.T)], "free": [K * np.outer(z, z) for z in Z.T]}[
        gtype
    ]
    noise = [np.diag(Z[:, k] ** 2) for k in range(K0 - 1)] if etype == "free" else []
    return gen + noise + [np.eye(N)]


def _sigma(s, Ks):
    return np.einsum("k,kij->ij", s, np.stack(Ks))


def _X(sim):
    return np.hstack([np.ones((len(sim.Z), 1)), sim.X])


def _sig2s(n, seed):
    s = np.random.default_rng(seed).uniform(0.05, 0.4, n)
    s[-1] = 1.0
    return s


@pytest.mark.parametrize("gtype,etype", MODELS)
def test_reml_loglik_dense_and_genotype_paths_equal_numpy(gtype, etype):
    sim = _data()
    y = model.standardize(sim.y[None])[0]
    Ks = _dense_kernels(sim.K, sim.Z, gtype, etype)
    s = _sig2s(len(Ks), seed=1)
    ref = reference.reml_loglik(y, _X(sim), _sigma(s, Ks))
    for K, S in ((sim.K, None), (None, sim.S)):
        inputs = model.check_inputs(sim.y, sim.X, K, sim.Z, S, gtype, etype)
        design, structure = reml.design_of(inputs)
        ll = -reml.nll(jnp.asarray(s), jnp.asarray(y), design, structure)
        # the fit's design is [1, X] centred and scaled, X_s = X A: ll = ll_s + log|det A|
        assert_allclose(inputs.X, _X(sim) @ inputs.X_map, **CLOSED_FORM)
        assert_allclose(ll + np.linalg.slogdet(inputs.X_map)[1], ref, **CLOSED_FORM)


@pytest.mark.parametrize("gtype,etype", [("iid", "hom"), ("free", "free")])
def test_reml_fit_is_an_optimum_and_information_is_dense(gtype, etype):
    sim = _data(N=80, seed=2)
    out = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype=gtype, etype=etype, tol=1e-12)
    assert out.converged, out.status
    y, X = model.standardize(sim.y[None])[0], _X(sim)
    Ks = _dense_kernels(sim.K, sim.Z, gtype, etype)

    def ll(s):
        Sigma = _sigma(s, Ks)
        if np.linalg.eigvalsh(Sigma)[0] <= 0:
            return -np.inf
        return reference.reml_loglik(y, X, Sigma)

    assert_allclose(out.ll, ll(out.sig2s), **CLOSED_FORM)
    # gradient ~ 0 (finite differences of the dense formula) and the dense expected information
    h = 1e-6
    grad = [(ll(out.sig2s + h * e) - ll(out.sig2s - h * e)) / (2 * h) for e in np.eye(len(Ks))]
    assert np.abs(grad).max() < 1e-4
    P = reference.projection(X, _sigma(out.sig2s, Ks))
    info = 0.5 * np.array([[np.trace(P @ A @ P @ B) for B in Ks] for A in Ks])
    assert_allclose(np.linalg.inv(out.sig2Var), info, **CLOSED_FORM)
    # at least as likely as scipy on the dense formula from the same start
    sp = optimize.minimize(lambda s: -ll(s), _sig2s(len(Ks), 3), method="Nelder-Mead",
                           options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000))  # fmt: skip
    assert out.ll >= -sp.fun - 1e-8
    # GLS betas of the standardised trait
    Si = np.linalg.inv(_sigma(out.sig2s, Ks))
    assert_allclose(out.betas, np.linalg.solve(X.T @ Si @ X, X.T @ Si @ y), **OPTIMIZER)


def test_nonneg_reml_is_the_bounded_dense_optimum():
    """nonneg=True (issue 16): no GxE in the data; genetic components and each environment's
    noise (n_1 = e_1 + e_I, n_2 = e_I) end >= 0, some exactly 0, at a KKT point of the dense
    REML likelihood, no less likely than SciPy's L-BFGS-B under the same bounds."""
    sim = gxemm.simulate(60, 20, maf=0.3, sig2g=(0.0, 0.0), n_traits=3, seed=5)
    out = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="free", etype="free", nonneg=True,
                    tol=1e-12)  # fmt: skip
    assert out.converged.all(), out.status
    Ks = _dense_kernels(sim.K, sim.Z, "free", "free")
    B = np.eye(5)
    B[3, 4] = -1.0  # sig2s = B theta, theta = (g, g_1, g_2, n_1, n_2)
    theta = out.sig2s @ np.linalg.inv(B).T
    assert (theta >= 0).all() and (theta == 0).any()
    X = _X(sim)
    for t in range(3):
        y = model.standardize(sim.y[t][None])[0]

        def nll(th, y=y):
            Sigma = _sigma(B @ th, Ks)
            if np.linalg.eigvalsh(Sigma)[0] <= 0:
                return np.inf
            return -reference.reml_loglik(y, X, Sigma)

        assert_allclose(-nll(theta[t]), out.ll[t], **CLOSED_FORM)
        h, at0 = 1e-6, theta[t] == 0
        up = np.array([nll(theta[t] + h * e) for e in np.eye(5)])
        down = np.array(
            [nll(theta[t] - h * e * (not z)) for z, e in zip(at0, np.eye(5), strict=True)]
        )
        grad = (up - down) / np.where(at0, h, 2 * h)
        assert np.all(grad[at0] > -1e-5) and np.all(np.abs(grad[~at0]) < 1e-4), grad
        sp = optimize.minimize(nll, np.full(5, 0.3), method="L-BFGS-B", bounds=[(0, None)] * 5,
                               options=dict(ftol=1e-15, gtol=1e-10))  # fmt: skip
        assert out.ll[t] >= -sp.fun - 1e-8


def test_kernel_vif_is_one_over_one_minus_r2():
    """kernel_vif against least squares of each vectorised kernel on the others (uncentred R^2),
    and K = I makes K o z z^T the noise kernel diag(z): infinite (or huge) VIF."""
    sim = _data()
    Ks = _dense_kernels(sim.K, sim.Z, "free", "free")
    vif = gxemm.kernel_vif(sim.K, sim.Z, "free", "free", levels=["a", "b"])
    assert list(vif) == ["sig2g_hom", "sig2g_a", "sig2g_b", "sig2e_a", "sig2e_hom"]
    V = np.stack([k.ravel() for k in Ks], 1)
    for j, v in enumerate(vif.values()):
        others = np.delete(V, j, axis=1)
        fit = others @ np.linalg.lstsq(others, V[:, j], rcond=None)[0]
        r2 = 1 - np.sum((V[:, j] - fit) ** 2) / np.sum(V[:, j] ** 2)
        assert_allclose(v, 1 / (1 - r2), rtol=1e-8)
    near_identity = np.eye(len(sim.Z)) + 1e-4 * sim.K
    assert min(gxemm.kernel_vif(near_identity, sim.Z, "free", "free").values()) > 1e4


def test_lrt_with_nonneg_uses_the_boundary_mixture():
    assert_allclose(gxemm.lrt(-10.0, -12.0, 2, boundary=True),
                    (2 * stats.chi2.sf(4.0, 1) + stats.chi2.sf(4.0, 2)) / 4)  # fmt: skip


@pytest.mark.parametrize("gtype,etype", MODELS)
def test_he_equals_lower_triangle_least_squares(gtype, etype):
    sim = _data(n_traits=3, seed=4)
    X = _X(sim)
    PX = np.eye(len(X)) - X @ np.linalg.solve(X.T @ X, X.T)
    low = np.tril_indices(len(X), -1)

    def lowtri(V):  # the original's lowtri: strict lower triangle, then diag / 2
        return np.concatenate([V[low], np.diag(V) / 2])

    A = np.stack([lowtri(PX @ K @ PX) for K in _dense_kernels(sim.K, sim.Z, gtype, etype)], 1)
    for K, S in ((sim.K, None), (None, sim.S)):
        out = gxemm.fit(sim.y, sim.X, K, sim.Z, gtype=gtype, etype=etype, method="he", S=S)
        for t in range(3):
            r = PX @ sim.y[t]
            r = (r - r.mean()) / r.std(ddof=1)
            ref = np.linalg.lstsq(A, lowtri(np.outer(r, r)), rcond=None)[0]
            assert_allclose(out.sig2s[t], ref, **CLOSED_FORM)
            assert_allclose(
                out.betas[t], np.linalg.lstsq(X, sim.y[t], rcond=None)[0], **CLOSED_FORM
            )


def test_genotype_path_and_trait_batch_equal_dense_single_fits():
    sim = _data(N=80, n_traits=3, seed=5)
    dense = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="free", tol=1e-12)
    geno = gxemm.fit(sim.y, sim.X, None, sim.Z, gtype="free", S=sim.S, tol=1e-12)
    assert dense.converged.all() and geno.converged.all()
    assert_allclose(geno.sig2s, dense.sig2s, **OPTIMIZER)
    assert_allclose(geno.ll, dense.ll, **OPTIMIZER)
    assert_allclose(geno.sig2Var, dense.sig2Var, rtol=1e-4, atol=1e-6)
    single = gxemm.fit(sim.y[1], sim.X, sim.K, sim.Z, gtype="free", tol=1e-12)
    assert_allclose(single.sig2s, dense.sig2s[1], **OPTIMIZER)
    assert single.h2.shape == (2,) and dense.h2.shape == (3, 2)


@pytest.mark.parametrize("gtype,etype", MODELS)
def test_h2_and_delta_method_equal_finite_differences(gtype, etype):
    rng = np.random.default_rng(6)
    K0 = 3
    n = len(_dense_kernels(np.eye(4), np.eye(4)[:, :K0], gtype, etype))
    s = rng.uniform(0.1, 1.0, n)
    B = rng.normal(size=(n, n))
    V = B @ B.T / n

    def h2(s):
        return np.asarray(model.variance_map(s, gtype, etype, K0)[2])

    eps = 1e-6
    J = np.stack([(h2(s + eps * e) - h2(s - eps * e)) / (2 * eps) for e in np.eye(n)], 1)
    res = _heritability(s[None], V[None], _fake_inputs(gtype, etype, K0))
    assert_allclose(res["h2"][0], h2(s), rtol=1e-12)
    assert_allclose(res["h2Covmat"][0], J @ V @ J.T, rtol=1e-7, atol=1e-10)
    # the original's formulas, written out
    if (gtype, etype) == ("free", "free"):
        e = np.array([s[4] + s[6], s[5] + s[6], s[6]])
        assert_allclose(h2(s), (s[0] + s[1:4]) / (s[0] + s[1:4] + e), rtol=1e-12)
    if gtype == "iid":
        assert_allclose(h2(s), s[:2] / s.sum(), rtol=1e-12)


def _fake_inputs(gtype, etype, K0):
    return model.Inputs(None, None, None, None, None, None, gtype, etype, K0)


def test_tests_equal_their_formulas():
    assert_allclose(gxemm.wald_test(1.0, 0.25), stats.norm.sf(2.0), rtol=1e-12)
    z, V = np.array([0.3, -0.2]), np.array([[0.04, 0.01], [0.01, 0.09]])
    assert_allclose(gxemm.mvwald_test(z, V), stats.chi2.sf(z @ np.linalg.solve(V, z), 2))
    assert np.isnan(gxemm.mvwald_test(z, np.diag([1.0, 1e-9])))  # eigenvalue ratio > 1e8
    assert np.isnan(gxemm.mvwald_test(z, np.diag([1.0, -0.1])))  # negative eigenvalue
    assert_allclose(gxemm.lrt(-10.0, -12.0, 2), stats.chi2.sf(4.0, 2), rtol=1e-12)
    h2, C = np.array([0.2, 0.5, 0.3]), np.diag([0.01, 0.02, 0.03])
    Tm = np.array([[1.0, -1, 0], [1, 0, -1]])
    d = Tm @ h2
    ref = stats.chi2.sf(d @ np.linalg.solve(Tm @ C @ Tm.T, d), 2)
    assert_allclose(gxemm.h2_equal_test(h2, C), ref, rtol=1e-12)


def test_unscaled_covariates_are_accepted():
    """Units do not matter (issue 16): X scaled by 1e3 and 1e-3 (age in years, PCs of 1e-3)
    and shifted gives the same variance components, betas on its own scale and the REML
    log-likelihood of its own design (ll + log|det D| for X D)."""
    sim = _data(N=80, seed=2)
    D = np.array([1e3, 1e-3])[: sim.X.shape[1]]
    a = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="hom", tol=1e-12)
    b = gxemm.fit(sim.y, sim.X * D + 50.0, sim.K, sim.Z, gtype="hom", tol=1e-12)
    assert a.converged and b.converged
    assert_allclose(b.sig2s, a.sig2s, rtol=1e-6)
    assert_allclose(b.betas[1:], a.betas[1:] / D, rtol=1e-6)
    assert_allclose(b.ll, a.ll - np.log(D).sum(), rtol=1e-8)


def test_bad_input_is_refused_before_fitting():
    sim = _data(N=30)
    y, X, K, Z = sim.y, sim.X, sim.K, sim.Z
    cases = [
        (dict(K=K[:, :-1]), "K: must be square"),
        (dict(K=K + np.triu(np.ones_like(K), 1) * 0.1), "K: must be symmetric"),
        (dict(K=K[:-1, :-1]), "K: 29 rows for N = 30"),
        (dict(Z=np.vstack([np.zeros((1, 2)), Z[1:]])), "Z: row 0 is all zeros"),
        (dict(X=np.ones((30, 1))), "X: column 1 is constant"),
        (dict(X=np.hstack([X, X[:, :1] * 2 + 1])), "nearly collinear"),
        (dict(y=np.where(np.arange(30) == 3, np.nan, y)), "y: contains NaN"),
        (dict(y=np.zeros((0, 30))), r"y: no traits \(shape \(0, N\)\)"),
        (dict(gtype="iid", etype="free"), "iid \\+ het noise is not very meaningful"),
        (dict(K=None), "exactly one of K"),
        # issue 18 #7: K with eigenvalue -0.5 was fitted `ok`
        (dict(K=K - 0.5 * np.eye(30)), "K: not positive semi-definite: its smallest eigenvalue "
         r"is -0.5 .*down to -1e-08 x the largest are taken as rounding.*clip"),
        # issue 18 #13: N <= n_par (free: 3 genetic + 1 noise + 2 fixed = 6) was fitted
        (dict(y=y[:6], X=X[:6], K=K[:6, :6], Z=Z[:6]),
         "y: N = 6 individuals but gtype='free', etype='hom' has n_par = 6 parameters"),
    ]  # fmt: skip
    for change, message in cases:
        kw = dict(y=y, X=X, K=K, Z=Z, gtype="free") | change
        with pytest.raises(ValueError, match=message):
            gxemm.fit(kw.pop("y"), kw.pop("X"), kw.pop("K"), kw.pop("Z"), **kw)
    # eigenvalues within the rounding tolerance, and N = n_par + 1, are accepted
    lam = np.linalg.eigvalsh(K)[-1]
    model.check_inputs(y, X, K - 1e-10 * lam * np.eye(30), Z, None, "free", "hom")
    model.check_inputs(y[:7], X[:7], K[:7, :7], Z[:7], None, "free", "hom")


def test_traits_with_no_variation_are_not_fitted():
    """Issue 18 #3: a constant trait (OLS residuals ~1e-15 of its scale, then standardised to
    unit variance) was fitted `ok` with h2 = -0.48. REML and HE now check for variation after
    [1, X] before standardising: 'constant', NaN estimates; the other traits as fitted alone."""
    sim = _data(N=80, n_traits=3, seed=5)  # the shapes of the test above
    flat = np.full(80, 2.5)
    fit = gxemm.fit(np.vstack([sim.y, flat]), sim.X, sim.K, sim.Z, gtype="free", tol=1e-12)
    alone = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="free", tol=1e-12)
    assert list(fit.table.status) == ["ok", "ok", "ok", "constant"]
    assert not fit.converged[3] and np.isnan(fit.sig2s[3]).all() and np.isnan(fit.h2[3]).all()
    assert np.isnan(fit.ll[3]) and fit.n_iter[3] == 0
    assert_allclose(fit.sig2s[:3], alone.sig2s, **CLOSED_FORM)
    linear = 1.0 + 2.0 * sim.X[:, 0]  # equal to its fixed effects
    he = gxemm.fit(np.vstack([sim.y[:2], linear, flat]), sim.X, sim.K, sim.Z, gtype="free",
                   method="he")  # fmt: skip
    assert list(he.table.status) == ["ok", "ok", "constant", "constant"]
    assert np.isnan(he.sig2s[2:]).all() and np.isnan(he.h2[2:]).all()
    assert np.isfinite(he.h2[:2]).all()


def test_simulation_free_variances_unbiased_and_mvwald_calibrated():
    """200 traits of the README design (N = 300 here to keep CI short; the note reports
    N = 1000): REML free estimates of the genetic variances are unbiased within Monte Carlo
    error, and with no heterogeneity (hom genetics) the MVWald p values are uniform."""
    het = gxemm.simulate(300, 100, sig2g=(0.1, 0.4), n_traits=200, seed=7)
    out = gxemm.fit(het.y, het.X, het.K, het.Z, gtype="free")
    assert out.converged.mean() > 0.95
    # REML is scale-equivariant: sig2s of the standardised trait times var(y) = raw scale
    s = out.sig2s[out.converged] * het.y.var(axis=1, ddof=1)[out.converged, None]
    mean, se = s[:, :3].mean(0), s[:, :3].std(0) / np.sqrt(len(s))
    assert np.all(np.abs(mean - [0.0, 0.1, 0.4]) < 4 * se), (mean, se)
    null = gxemm.simulate(300, 100, sig2g=(0.0, 0.0), sig2g_hom=0.3, n_traits=200, seed=8)
    out0 = gxemm.fit(null.y, null.X, null.K, null.Z, gtype="free")
    p = np.array(
        [
            gxemm.mvwald_test(s[1:3], V[1:3, 1:3])
            for s, V in zip(out0.sig2s, out0.sig2Var, strict=True)
        ]
    )
    p = p[np.isfinite(p)]
    assert len(p) > 150
    assert stats.kstest(p, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("gtype,etype", MODELS)
def test_component_and_h2_names_follow_the_kernels(gtype, etype):
    """One name per kernel, in sig2s order (issue 16): sig2g_hom for K, sig2g_iid for
    K o ZZ^T, sig2g_<level> for K o z_k z_k^T, sig2e_<level> for diag(z_k^2), sig2e_hom for I."""
    Z = np.eye(3)[[0, 1, 2, 0]]
    levels = ["a", "b", "c"]
    names = model.component_names(gtype, etype, levels)
    assert len(names) == len(_dense_kernels(np.eye(4), Z, gtype, etype))
    genetic = {"hom": [], "iid": ["sig2g_iid"], "free": ["sig2g_a", "sig2g_b", "sig2g_c"]}
    noise = ["sig2e_a", "sig2e_b"] if etype == "free" else []
    assert names == ["sig2g_hom", *genetic[gtype], *noise, "sig2e_hom"]
    h2 = np.asarray(model.variance_map(np.ones(len(names)), gtype, etype, 3)[2])
    expected = {("hom", "hom"): ["h2"], ("iid", "hom"): ["h2_hom", "h2_het"]}
    assert model.h2_names(gtype, etype, levels) == expected.get(
        (gtype, etype), ["h2_a", "h2_b", "h2_c"]
    )
    assert len(model.h2_names(gtype, etype, levels)) == len(h2)


def _result(gtype, sig2s, sig2Var, ll, status, nonneg=False, h2=None, h2Covmat=None):
    """A GxEMMResult with given fields (two environments), no fit."""
    T, k = sig2s.shape
    h2 = np.full((T, 2), 0.3) if h2 is None else h2
    h2Covmat = np.tile(np.eye(2) * 0.01, (T, 1, 1)) if h2Covmat is None else h2Covmat
    return gxemm.GxEMMResult(
        sig2s=sig2s, sig2Var=sig2Var, sig2g=sig2s, sig2e=sig2s, h2=h2, h2Covmat=h2Covmat,
        ll=ll, df=k - 1, betas=np.zeros((T, 1)), converged=status == 0, n_iter=np.ones(T, int),
        status=status, gtype=gtype, etype="hom", method="reml", n_env=2, nonneg=nonneg,
    )  # fmt: skip


@pytest.mark.parametrize("nonneg", [False, True])
def test_named_table_and_gxe_tests_equal_their_formulas(nonneg):
    rng = np.random.default_rng(9)
    T = 5
    s = rng.uniform(0.05, 0.5, (T, 4))
    B = rng.normal(size=(T, 4, 4))
    V = B @ np.swapaxes(B, 1, 2) / 40
    status = np.array([0, 0, 1, 0, 0])
    free = _result("free", s, V, rng.normal(-50, 1, T), status, nonneg)
    hom = _result("hom", s[:, [0, 3]], V[:, [0, 3]][:, :, [0, 3]], free.ll - rng.uniform(0, 3, T),
                  np.array([0, 0, 0, 0, 3]), nonneg)  # fmt: skip
    table = free.named_table(["f", "m"], hom=hom)
    assert list(table.columns) == [
        "sig2g_hom", "se_sig2g_hom", "sig2g_f", "se_sig2g_f", "sig2g_m", "se_sig2g_m",
        "sig2e_hom", "se_sig2e_hom", "h2_f", "se_h2_f", "h2_m", "se_h2_m", "ll", "converged",
        "n_iter", "status", "message", "ll_hom", "status_hom", "p_gxe_wald", "q_gxe_wald",
        "p_gxe_lrt", "q_gxe_lrt",
    ]  # fmt: skip
    assert_allclose(table["se_sig2g_m"], np.sqrt(V[:, 2, 2]), rtol=1e-12)
    wald = [gxemm.mvwald_test(s[t, 1:3], V[t, 1:3, 1:3]) for t in range(T)]
    lrt = gxemm.lrt(free.ll, hom.ll, 2, boundary=nonneg)
    assert_allclose(table["p_gxe_wald"], np.where(status == 0, wald, np.nan), rtol=1e-12)
    assert_allclose(table["p_gxe_lrt"], [*lrt[:2], np.nan, lrt[3], np.nan], rtol=1e-12)
    for name in ("gxe_wald", "gxe_lrt"):  # BH over the traits with a p value
        p = table[f"p_{name}"].to_numpy()
        ok = ~np.isnan(p)
        ref = stats.false_discovery_control(p[ok], method="bh")
        assert_allclose(table[f"q_{name}"].to_numpy()[ok], ref, rtol=1e-12)
    assert list(table.columns[:4]) == ["sig2g_hom", "se_sig2g_hom", "sig2g_f", "se_sig2g_f"]
    iid = _result("iid", s[:, :3], V[:, :3, :3], free.ll, status)
    p_iid = gxemm.gxe_tests(iid)["p_gxe_wald"]
    assert_allclose(p_iid, np.where(status == 0, stats.norm.sf(0.3 / 0.1), np.nan), rtol=1e-12)
    assert list(free.table.columns[:2]) == ["sig2s_1", "se_sig2s_1"]  # the numbered table stays
    with pytest.raises(ValueError, match="a name that makes two columns alike"):
        free.named_table(["hom", "m"])
    with pytest.raises(ValueError, match="3 names for 2 environments"):
        free.named_table(["a", "b", "c"])
    with pytest.raises(ValueError, match="gtype 'hom' fit of the same etype"):
        free.named_table(["f", "m"], hom=free)


def test_env_main_effects_add_what_x_does_not_span():
    """Every environment but the last for one-hot Z; none already in X; a continuous one."""
    rng = np.random.default_rng(1)
    Z = np.eye(3)[rng.integers(0, 3, 40)]
    age = rng.uniform(20, 80, (40, 1))
    assert model.env_main_effects(None, Z) == [0, 1]
    assert model.env_main_effects(age, Z) == [0, 1]
    assert model.env_main_effects(np.hstack([age * 1e3, Z[:, 1:]]), Z) == []
    assert model.env_main_effects(Z[:, [2]] * 1e-3, Z) == [0]
    assert model.env_main_effects(age, rng.normal(size=(40, 1))) == [0]
