"""Issue 14: noise models (pooled vs plug-in noise variances), the default test of V (score
test at the null fit) and the LRT next to it against dense NumPy/SciPy, q values, and no p
value from a fit that did not end ok."""

import numpy as np
import pandas as pd
import pytest
import reference
from helpers import CLOSED_FORM, METHODS, SHAPES, small_data
from numpy.testing import assert_allclose
from scipy import stats

import ctmm_jax as cj
from ctmm_jax import inference, noise, preprocess


def _cells(G=4, N=12, C=3, seed=0):
    """Pseudobulk arrays from Gaussian cells: Y, ctnu (var ddof=1 / n), n_cells (N, C), SS."""
    rng = np.random.default_rng(seed)
    n = rng.integers(2, 9, size=(N, C))
    Y, ctnu = np.empty((G, N, C)), np.empty((G, N, C))
    for i in range(N):
        for c in range(C):
            x = rng.normal(size=(G, n[i, c])) * (1.0 + c)
            Y[:, i, c], ctnu[:, i, c] = x.mean(1), x.var(1, ddof=1) / n[i, c]
    return Y, ctnu, n


def test_pooled_ctnu_equals_pooled_within_pair_variance():
    """s2_gc = sum_i SS_gic / sum_i (n_ic - 1) over the observed pairs, written as loops."""
    Y, ctnu, n = _cells()
    G, N, C = Y.shape
    mask = np.random.default_rng(1).random((G, N, C)) > 0.2
    got = noise.pooled_ctnu(ctnu, n, mask)
    for g in range(G):
        for c in range(C):
            ss = sum(ctnu[g, i, c] * n[i, c] * (n[i, c] - 1) for i in range(N) if mask[g, i, c])
            dof = sum(n[i, c] - 1 for i in range(N) if mask[g, i, c])
            assert_allclose(got[g, :, c], ss / dof / n[:, c], rtol=1e-12)


def test_apply_pooled_and_plugin_ctp():
    """Pooled: zero-variance pairs keep their value with a positive noise; plug-in: missing."""
    Y, ctnu, n = _cells()
    ctnu[0, 3, 1] = 0.0  # every cell of the pair equal
    data = cj.CTPData.from_arrays(Y, ctnu, n / n.sum(1, keepdims=True), n_cells=n)
    pooled, used = noise.apply(data, None)[:2]
    assert used == "pooled" and pooled.mask is None
    assert_allclose(pooled.ctnu, noise.pooled_ctnu(ctnu, n, np.ones(Y.shape, bool)), rtol=1e-14)
    plug, used = noise.apply(data, "plugin")[:2]
    assert used == "plugin" and plug.mask.sum() == Y.size - 1 and not plug.mask[0, 3, 1]
    assert plug.ctnu[0, 3, 1] == 1.0 and plug.Y[0, 3, 1] == 0.0


def test_apply_pooled_op_from_ctp_with_missing():
    """OP: nu_i = sum_c Pg_ic^2 s2_gc / n_ic over each donor's observed cell types."""
    Y, ctnu, n = _cells()
    G, N, C = Y.shape
    mask = np.ones((G, N, C), bool)
    mask[1, 2, 0] = mask[2, 5, :] = False
    ctp = cj.CTPData.from_arrays(Y, ctnu, n / n.sum(1, keepdims=True), mask=mask, n_cells=n)
    op, used = noise.apply(cj.OPData.from_ctp(ctp), None)[:2]
    s2n = noise.pooled_ctnu(ctp.ctnu, n, mask)
    Pg = cj.OPData.from_ctp(ctp).P_gene
    expected = np.einsum("gnc,gnc->gn", np.where(mask, s2n, 0.0), Pg**2)
    keep = mask.any(2)
    assert used == "pooled"
    assert_allclose(op.nu[keep], expected[keep], rtol=1e-13)
    assert_allclose(op.mask, keep)


def test_plugin_warning_and_errors():
    d = small_data("ctp")
    with pytest.warns(noise.PluginNoiseWarning, match=r"rejects about \d+% at 10"):
        noise.apply(d, None)
    with pytest.raises(ValueError, match="noise='pooled' needs the cells"):
        noise.apply(d, "pooled")
    with pytest.raises(ValueError, match="noise='cells?' is unknown"):
        noise.apply(d, "cell")
    with pytest.raises(ValueError, match="n_cells: an observed value needs at least 1 cell"):
        cj.CTPData.from_arrays(d.Y, d.ctnu, d.P, n_cells=np.zeros(d.P.shape))
    with pytest.raises(ValueError, match="ctnu: noise variances must be > 0"):
        cj.CTPData.from_arrays(d.Y, np.zeros(d.Y.shape), d.P)  # 0 needs cell counts


def test_plugin_false_positive_rule_matches_measurements():
    """Issue 14's measured plug-in LRT rates at N = 100, C = 4 (0.83, 0.20, 0.09 at 10, 25, 50
    cells) and N = 300, 25 cells (0.49), within 0.1."""
    for N, n, measured in ((100, 10, 0.828), (100, 25, 0.203), (100, 50, 0.087), (300, 25, 0.487)):
        assert abs(noise.plugin_false_positive_rate(N, 4, n) - measured) < 0.1


@pytest.mark.filterwarnings("ignore::ctmm_jax.preprocess.ExpressionWarning")  # small counts
def test_pseudobulk_carries_cell_counts_and_keeps_zero_variance_pairs():
    X = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0], [4.0, 1.0], [0.0, 2.0], [1.0, 2.0]])
    cells = pd.DataFrame({"donor": list("aaabbb"), "cell_type": ["x", "x", "y", "y", "x", "x"]})
    pb = preprocess.pseudobulk(X, cells)
    ctp = pb.to_ctp()
    assert_allclose(ctp.n_cells, pb.counts)
    # gene 1, donor a, type x: both cells 0 -> ctnu 0, kept (the fit's noise model decides)
    assert ctp.ctnu[1, 0, 0] == 0.0 and ctp.mask[1, 0, 0]
    op = pb.to_op()
    assert_allclose(op.n_cells, pb.counts)


def _dense_score_test(data, g, hom2, model, method):
    """Score test of V = 0 at (hom2, V = 0), dense: s_k = 1/2 [tr(Pm K_k) - r^T Pm K_k Pm r]
    (REML: Pm = Pi, r = y; ML: Pm = Sigma^-1, r = y - X beta_GLS), I = 1/2 tr(Pm K_k Pm K_l),
    T = s_V^T (I^-1)_VV s_V."""
    C = data.P.shape[1]
    y, X, Sigma = reference.dense(data, g, hom2, np.zeros((C, C)))
    Si = np.linalg.inv(Sigma)
    if method == "reml":
        Pm, r = reference.projection(X, Sigma), y
    else:
        Pm, r = Si, y - X @ np.linalg.solve(X.T @ Si @ X, X.T @ Si @ y)
    Ks = reference.kernels(data, model)
    s = np.array([0.5 * (np.trace(Pm @ K) - r @ Pm @ K @ Pm @ r) for K in Ks])
    info = reference.expected_information(data, g, hom2, np.zeros((C, C)), model, method)
    cov = np.linalg.inv(info)[1:, 1:]
    optimality = s[0] ** 2 / info[0, 0]  # hom2's score at the hom fit, scaled: ~ 0
    if model == "iid":
        return stats.norm.sf(-s[1] * np.sqrt(cov[0, 0])), optimality
    return stats.chi2.sf(s[1:] @ cov @ s[1:], C), optimality


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["iid", "free"])
def test_score_and_lrt_of_V_against_dense(shape, method, model):
    """p_V = the dense score test at the hom fit (1e-8); the hom score is 0 there; p_V_lrt =
    chi2.sf(2 (l - l_hom), k); loglik_null = the hom fit's."""
    data = small_data(shape, V=np.diag([0.3, 0.1, 0.0]))
    res = cj.fit(data, model, method, noise="plugin")
    hom = cj.fit(data, "hom", method, noise="plugin")
    tab = res.table
    assert_allclose(tab["loglik_null"], hom.table["loglik"], **CLOSED_FORM)
    k = 1 if model == "iid" else 3
    lrt = stats.chi2.sf(2 * (tab["loglik"] - tab["loglik_null"]), k)
    ok = (tab["status"] == "ok").to_numpy()  # small data: some fits end on the boundary
    assert ok.any() and tab["p_V_lrt"][~ok].isna().all()
    assert_allclose(tab["p_V_lrt"][ok], lrt[ok], **CLOSED_FORM)
    for g in range(data.shape[0]):
        p, optimality = _dense_score_test(data, g, hom.phi[g, 0], model, method)
        assert optimality < 1e-9
        assert_allclose(tab["p_V"].iloc[g], p, **CLOSED_FORM)


def test_bh_qvalues_equal_scipy_with_nans():
    p = np.random.default_rng(0).random(50) ** 3
    p[[3, 17]] = np.nan
    q = inference.bh_qvalues(p)
    ok = ~np.isnan(p)
    assert np.isnan(q[~ok]).all()
    assert_allclose(q[ok], stats.false_discovery_control(p[ok]), rtol=1e-12)


def test_no_p_value_from_a_fit_that_is_not_ok():
    """The shipped example: genes that end on the positive-definite boundary get no Wald p
    (issue 14 saw 1e-30 there); p_V comes from the null fit and q counts only reported p."""
    res = cj.fit(cj.load_example(), "free", "reml", noise="plugin")
    tab = res.table
    bad = tab["status"] != "ok"
    assert bad.any()
    for col in ("p_V_wald", "p_hom2", "p_ct_beta", "p_V_lrt"):
        assert tab.loc[bad, col].isna().all() and tab.loc[~bad, col].notna().all()
    assert (tab["status_null"] == "ok").all() and tab["p_V"].notna().all()
    assert_allclose(tab["q_V_wald"][~bad], inference.bh_qvalues(tab["p_V_wald"][~bad]))


def test_jackknife_p_values_need_ok_replicates():
    """p_*_jk is NaN where more than 5% of the replicates failed or the fit is not ok."""
    data = small_data("ctp", G=3, N=15)
    res = cj.fit(data, "free", "reml", noise="plugin", jackknife=True)
    tab = res.table
    trusted = (tab["status"] == "ok") & (tab["n_jk_failed"] <= 0.05 * 15)
    assert tab.loc[~trusted, "p_V_jk"].isna().all()
    assert tab.loc[trusted, "p_V_jk"].notna().all()


def test_pooled_noise_is_calibrated_where_plugin_is_not():
    """Gaussian cells with 6-10 cells per pair, V = 0, N = 60: the plug-in noise makes the test
    of V reject most null genes, the pooled noise about 5% (150 genes; bounds with room for
    their sampling error)."""
    rng = np.random.default_rng(7)
    G, N, C = 150, 60, 3
    n = rng.integers(6, 11, size=(N, C))
    s2 = np.array([1.0, 0.5, 2.0])
    mu = rng.normal(0, np.sqrt(0.1), (G, N, 1)) + np.arange(C)
    Y = mu + rng.normal(size=(G, N, C)) * np.sqrt(s2 / n)
    ctnu = s2 * rng.chisquare(n - 1, (G, N, C)) / (n * (n - 1))
    data = cj.CTPData.from_arrays(Y, ctnu, n / n.sum(1, keepdims=True), n_cells=n)
    pooled = cj.fit(data, "free", "reml").table["p_V"]
    plugin = cj.fit(data, "free", "reml", noise="plugin").table["p_V"]
    assert (pooled < 0.05).mean() < 0.11
    assert (plugin < 0.05).mean() > 0.3


@pytest.mark.parametrize("shape", SHAPES)
def test_score_test_with_pooled_noise_against_dense(shape):
    """With pooled noise the score of V has the extra variance A Var(s2-hat) A^T of the pooled
    within-pair variances (nulltest.score_variance), A = I_Vs - I_Vh I_hh^-1 I_hs with the
    dense kernels d Sigma / d s2_c (CTP: diag(e_c / n_ic) per donor; OP: P_ic^2 / n_ic)."""
    Y, ctnu, n = _cells(G=3, N=20, C=3, seed=4)
    Y = Y + np.random.default_rng(5).normal(0, 0.3, (3, 20, 1))  # a shared donor effect
    data = cj.CTPData.from_arrays(Y, ctnu, n / n.sum(1, keepdims=True), n_cells=n)
    data = data if shape == "ctp" else cj.OPData.from_ctp(data)
    pooled, _, s2_var = noise.apply(data, "pooled")[:3]
    res = cj.fit(data, "free", "reml")
    hom = cj.fit(pooled, "hom", "reml", noise="plugin")
    C = 3
    e = np.eye(C)
    for g in range(3):
        y, X, Sigma = reference.dense(pooled, g, hom.phi[g, 0], np.zeros((C, C)))
        Pm = reference.projection(X, Sigma)
        if shape == "ctp":
            Ks_s = [np.diag(np.outer(1.0 / n[:, c], e[c]).ravel()) for c in range(C)]
        else:
            Ks_s = [np.diag(data.P[:, c] ** 2 / n[:, c]) for c in range(C)]
        Ks = reference.kernels(pooled, "free") + Ks_s
        s = np.array([0.5 * (np.trace(Pm @ K) - y @ Pm @ K @ Pm @ y) for K in Ks])
        info = np.array([[0.5 * np.trace(Pm @ Ki @ Pm @ Kj) for Kj in Ks] for Ki in Ks])
        v, w = [1, 2, 3], [4, 5, 6]  # V and s2 (hom2 at 0)
        Ihh_inv = 1.0 / info[0, 0]
        var = info[np.ix_(v, v)] - Ihh_inv * np.outer(info[v, 0], info[0, v])
        A = info[np.ix_(v, w)] - Ihh_inv * np.outer(info[v, 0], info[0, w])
        var = var + A @ np.diag(s2_var[g]) @ A.T
        p = stats.chi2.sf(s[v] @ np.linalg.solve(var, s[v]), C)
        assert res.table["status_null"].iloc[g] == "ok"
        assert_allclose(res.table["p_V"].iloc[g], p, **CLOSED_FORM)


def test_pooled_s2_variance_against_loops():
    Y, ctnu, n = _cells(G=2, N=10, C=2, seed=3)
    got = noise.pooled_s2(ctnu, n, np.ones(Y.shape, bool))[1]
    for g in range(2):
        for c in range(2):
            d, s2 = n[:, c] - 1.0, ctnu[g, :, c] * n[:, c]
            mean = (d * s2).sum() / d.sum()
            assert_allclose(got[g, c], (d**2 * (s2 - mean) ** 2).sum() / d.sum() ** 2, rtol=1e-12)


def test_lowrank_diag_score_test_against_dense():
    """lowrank's p_V: score test of diag(v) added to hom2 J + l l^T at the lowrank fit, with
    the nuisance directions J and e_c l^T + l e_c^T projected out, chi2(C); dense (1e-8)."""
    C = 4
    data = small_data("ctp", G=3, N=30, C=C, V=np.diag([0.3, 0.1, 0.0, 0.0]))
    res = cj.fit(data, "lowrank", "reml", noise="plugin")
    e = np.eye(C)
    lift = lambda B: np.kron(np.eye(30), B)  # noqa: E731
    for g in np.flatnonzero(res.table["status"] == "ok"):
        hom2, load = res.phi[g, 0], res.phi[g, 1:]
        y, X, Sigma = reference.dense(data, g, hom2, np.outer(load, load))
        Pm = reference.projection(X, Sigma)
        nuisance = [np.ones((C, C))] + [
            np.outer(e[c], load) + np.outer(load, e[c]) for c in range(C)
        ]
        Ks = [lift(B) for B in nuisance + [np.outer(e[c], e[c]) for c in range(C)]]
        s = np.array([0.5 * (np.trace(Pm @ K) - y @ Pm @ K @ Pm @ y) for K in Ks])
        info = np.array([[0.5 * np.trace(Pm @ Ki @ Pm @ Kj) for Kj in Ks] for Ki in Ks])
        h, v = np.arange(1 + C), 1 + C + np.arange(C)
        assert np.abs(s[h]) @ np.abs(s[h]) < 1e-6  # the lowrank fit's score
        var = (
            info[np.ix_(v, v)]
            - info[np.ix_(v, h)] @ np.linalg.pinv(info[np.ix_(h, h)]) @ info[np.ix_(h, v)]
        )
        p = stats.chi2.sf(s[v] @ np.linalg.solve(var, s[v]), C)
        assert_allclose(res.table["p_V"].iloc[g], p, **CLOSED_FORM)
