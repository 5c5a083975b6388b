"""ctmm_jax.plot: inflation factor, QQ coordinates, variance partition and intervals against
direct NumPy/SciPy computations; plots checked by their artists (Agg backend, no display)."""

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from numpy.testing import assert_allclose  # noqa: E402
from scipy import stats  # noqa: E402

import ctmm_jax as cj  # noqa: E402
from ctmm_jax import inference  # noqa: E402
from ctmm_jax import plot as cp  # noqa: E402

G, N, C = 6, 30, 3
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def ctp():
    V = np.diag([0.3, 0.1, 0.0])
    return cj.simulate(G, N, C, hom2=0.2, V=V, beta=[1.0, 0.0, -0.5], ctnu=0.2, seed=3)


@pytest.fixture(scope="module")
def reml(ctp):
    """The one compiled ML/REML fit of the module (free REML)."""
    return cj.fit(ctp, "free", "reml")


def _oracle_V(result) -> tuple[np.ndarray, np.ndarray]:
    """(hom2 (G,), V (G, C, C)) rebuilt from the table's named columns, not models.unpack."""
    t, cts = result.table, result.celltypes
    k = len(cts)
    if result.model == "full":
        name = lambda a, b: f"V_{cts[min(a, b)]}_{cts[max(a, b)]}"
        V = np.array([[t[name(a, b)] for b in range(k)] for a in range(k)])
        return np.zeros(len(t)), np.moveaxis(V, -1, 0)
    V = np.zeros((len(t), k, k))
    if result.model != "hom":  # iid repeats v as V_<ct> for every ct
        V[:, np.arange(k), np.arange(k)] = t[[f"V_{c}" for c in cts]].to_numpy()
    return t["hom2"].to_numpy(), V


def _oracle_partition(result, data) -> np.ndarray:
    """(G, 3) shared, specific, noise by loops over genes and observed entries."""
    hom2, V = _oracle_V(result)
    out = np.zeros((len(hom2), 3))
    for g in range(len(hom2)):
        if isinstance(data, cj.CTPData):
            m = np.ones((N, C), bool) if data.mask is None else data.mask[g]
            obs = np.argwhere(m)
            specific = np.mean([V[g, c, c] for _, c in obs])
            noise = np.mean([data.ctnu[g, i, c] for i, c in obs])
        else:
            P = data.P if data.P_gene is None else data.P_gene[g]
            donors = range(N) if data.mask is None else np.flatnonzero(data.mask[g])
            specific = np.mean([P[i] @ V[g] @ P[i] for i in donors])
            noise = np.mean([data.nu[g, i] for i in donors])
        out[g] = hom2[g], specific, noise
    return out


def _check_partition(result, data):
    vp = cp.variance_partition(result, data)
    expected = _oracle_partition(result, data)
    assert_allclose(vp[["shared", "specific", "noise"]].to_numpy(), expected, **TOL)
    clipped = np.clip(expected, 0.0, None)
    frac = vp[["frac_shared", "frac_specific", "frac_noise"]].to_numpy()
    assert_allclose(frac, clipped / clipped.sum(1, keepdims=True), **TOL)
    assert_allclose(frac.sum(1), 1.0, **TOL)
    assert list(vp.index) == list(data.genes)


def test_genomic_inflation_uniform_direct_and_scaled():
    rng = np.random.default_rng(0)
    assert abs(cp.genomic_inflation(rng.uniform(size=100_000)) - 1.0) < 0.02
    p = np.array([0.01, 0.2, np.nan, 0.5, 0.9, 1.0, 3e-8])
    finite = p[~np.isnan(p)]
    direct = np.median(stats.chi2.isf(finite, 1)) / stats.chi2.ppf(0.5, 1)
    assert_allclose(cp.genomic_inflation(p), direct, **TOL)
    chi2 = 1.2 * rng.chisquare(1, size=100_000)
    assert abs(cp.genomic_inflation(stats.chi2.sf(chi2, 1)) - 1.2) < 0.03
    with pytest.raises(ValueError, match="no p values"):
        cp.genomic_inflation([np.nan])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cp.genomic_inflation([0.5, 1.5])


def test_qq_points_formula_and_order():
    p = np.array([0.3, 0.001, np.nan, 0.7, 0.05])
    q = cp.qq_points(p, level=0.9)
    n, i = 4, np.arange(1, 5)
    assert_allclose(q.expected, -np.log10(i / (n + 1)), **TOL)
    assert_allclose(q.observed, -np.log10([0.001, 0.05, 0.3, 0.7]), **TOL)
    assert_allclose(q.lower, -np.log10(stats.beta.ppf(0.95, i, n - i + 1)), **TOL)
    assert_allclose(q.upper, -np.log10(stats.beta.ppf(0.05, i, n - i + 1)), **TOL)
    assert np.all(q.lower < q.upper)
    assert cp.qq_points(p, band=False).lower is None


def test_variance_partition_free_reml_ctp(reml, ctp):
    _check_partition(reml, ctp)


HE_CASES = [("ctp", m) for m in ("hom", "iid", "free", "full")]
HE_CASES += [(s, m) for s in ("op", "masked") for m in ("iid", "full")]


@pytest.mark.parametrize(("shape", "model"), HE_CASES)
def test_variance_partition_he(ctp, shape, model):
    """HE (fast) for every model on CTP; OP and CTP with missing values (mask) for two."""
    if shape == "ctp":
        data = ctp
    else:
        mask = np.random.default_rng(1).random((G, N, C)) > 0.2
        masked = cj.CTPData.from_arrays(ctp.Y, ctp.ctnu, ctp.P, mask=mask)
        data = masked if shape == "masked" else cj.OPData.from_ctp(masked)
    result = cj.fit(data, model, "he")
    _check_partition(result, data)
    if model == "full":
        assert (cp.variance_partition(result, data)["shared"] == 0).all()


def test_variance_partition_random_covariate(ctp):
    batch = np.eye(3)[np.arange(N) % 3]
    result = cj.fit(ctp, "free", "he", random_covars={"batch": batch})
    vp = cp.variance_partition(result, ctp)
    assert_allclose(vp["random"], result.table["randomvar_batch"], **TOL)
    parts = vp[["shared", "specific", "random", "noise"]].clip(lower=0).to_numpy()
    assert_allclose(vp["frac_random"], parts[:, 2] / parts.sum(1), **TOL)


@pytest.mark.parametrize("model", ["hom", "iid", "free", "full"])
def test_partition_variance_from_table(ctp, model):
    """The partition from a table's columns and the data (the workflow's report, which has
    files, not a FitResult) is the fit's; random covariates as their randomvar_* sum."""
    batch = np.eye(3)[np.arange(N) % 3]
    result = cj.fit(ctp, model, "he", random_covars={"batch": batch})
    phi = inference.parameters_from_table(result.table, model, ctp.celltypes)
    hom2, V = inference.natural_vc(phi, model, C)
    random = result.table["randomvar_batch"].to_numpy()
    vp = inference.partition_variance(hom2, V, ctp, random=random)
    pd.testing.assert_frame_equal(vp, cp.variance_partition(result, ctp))


def test_partition_variance_mistakes(reml, ctp):
    table = reml.table.drop(columns="V_ct0")
    with pytest.raises(ValueError, match="no column 'V_ct0' of the free model"):
        inference.parameters_from_table(table, "free", ctp.celltypes)
    hom2, V = inference.natural_vc(reml.phi, "free", C)
    with pytest.raises(ValueError, match=r"pass \(6,\) and \(6, 3, 3\)"):
        inference.partition_variance(hom2[:2], V[:2], ctp)


def test_variance_partition_rejects_other_data(reml, ctp):
    with pytest.raises(ValueError, match="fitted on"):
        cp.variance_partition(reml, ctp.select_genes(slice(0, 2)))


def test_confidence_intervals(reml):
    ci = cp.confidence_intervals(reml, level=0.9)
    params = ["hom2"] + [f"V_ct{c}" for c in range(C)]
    assert list(ci["param"][: len(params)]) == params and len(ci) == G * len(params)
    z = stats.norm.ppf(0.95)
    t = reml.table
    est = t[params].to_numpy().ravel()
    se = t[[f"se_{p}" for p in params]].to_numpy().ravel()
    assert_allclose(ci["estimate"], est, **TOL)
    assert_allclose(ci["se"], se, **TOL)
    assert_allclose(ci["lower"], est - z * se, **TOL)
    assert_allclose(ci["upper"], est + z * se, **TOL)
    with pytest.raises(ValueError, match="jackknife=True"):
        cp.confidence_intervals(reml, jackknife=True)


def test_confidence_intervals_jackknife_iid(ctp):
    result = cj.fit(ctp, "iid", "he", jackknife=True)
    ci = cp.confidence_intervals(result, params=["V", "beta_ct0"], jackknife=True)
    t = result.table
    v = ci[ci["param"] == "V"]
    assert_allclose(v["se"], t["se_V_ct0_jk"], **TOL)
    b = ci[ci["param"] == "beta_ct0"]
    z = stats.norm.ppf(0.975)
    assert_allclose(b["upper"], t["beta_ct0"] + z * t["se_beta_ct0_jk"], **TOL)


def test_qq_plot_artists():
    rng = np.random.default_rng(2)
    ax = cp.qq(rng.uniform(size=200), label="uniform")
    assert len(ax.collections) == 2  # band + points
    assert len(ax.lines) == 1  # y = x
    assert "uniform" in ax.get_legend().get_texts()[-1].get_text()
    p = rng.uniform(size=50)
    p[0] = 0.0  # underflow: drawn at the top, not lost
    ax = cp.qq({"a": p, "b": rng.uniform(size=30) ** 2}, band=False)
    assert len(ax.collections) == 2 and len(ax.lines) == 1
    assert np.isfinite(ax.collections[0].get_offsets()).all()
    _, ax0 = plt.subplots()
    assert cp.qq(p, ax=ax0) is ax0


def test_variance_partition_plot_artists(reml, ctp):
    ax = cp.variance_partition_plot(reml, ctp)
    assert len(ax.containers) == 3 and len(ax.patches) == 3 * G
    assert len(ax.get_xticklabels()) == G


def test_partition_plot_title_and_all_nan(reml, ctp):
    vp = cp.variance_partition(reml, ctp)
    assert cp.partition_plot(vp, "free REML").get_title() == f"free REML: {G} genes"
    vp.iloc[0] = np.nan  # a gene without estimates: left out, and said
    assert cp.partition_plot(vp).get_title() == f"{G - 1} genes (1 without estimates left out)"
    with pytest.raises(ValueError, match="no gene has variance estimates"):
        cp.partition_plot(vp * np.nan)


def test_variance_partition_plot_many_genes(monkeypatch, reml, ctp):
    """Beyond MAX_LABELLED_GENES: stacked areas, no gene labels (lowered to avoid a big fit)."""
    monkeypatch.setattr(cp, "MAX_LABELLED_GENES", G - 1)
    ax = cp.variance_partition_plot(reml, ctp, sort=False)
    assert len(ax.collections) == 3 and len(ax.patches) == 0
    assert ax.get_xlabel() == "gene rank"


def test_estimates_plot_artists(reml):
    ax = cp.estimates_plot(reml, params=["hom2", "V_ct0"], genes=["gene1", "gene0"])
    assert len(ax.containers) == 2
    x, y = ax.containers[1].lines[0].get_data()
    assert_allclose(y, reml.table.loc[["gene1", "gene0"], "V_ct0"], **TOL)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gene1", "gene0"]
    with pytest.raises(ValueError, match="not in the result"):
        cp.estimates_plot(reml, genes=["nope"])


def test_missing_matplotlib_message(monkeypatch, reml):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "ctmm_jax\[plot\]"'):
        cp.qq([0.5, 0.1])
    with pytest.raises(ImportError, match="ctmm_jax.plot needs matplotlib"):
        cp.estimates_plot(reml)
    assert cp.genomic_inflation([0.5, 0.1]) > 0  # the computations still work
