"""ctmm_jax.compat: the original CTMM's function API (Minhui-Chen/CTMM, ctmm/op.py, ctmm/ctp.py,
ctmm/util.py) on ctmm_jax. Numbers must equal `ctmm_jax.fit`; keys, shapes and signatures those
of the original (its default, scipy path).

A few real fits (each compiles once) check the numbers; the key sets of all 24 functions are
checked cheaply against a FitResult built without fitting (`_fake_fit`).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import linalg, stats

import ctmm_jax as cj
from ctmm_jax import api, models
from ctmm_jax.compat import ctp, op, util
from ctmm_jax.data import Covariates
from ctmm_jax.estimators import Estimates
from ctmm_jax.jackknife import Jackknife
from ctmm_jax.results import FitResult

EXACT = dict(rtol=1e-10, atol=1e-12)
N, C = 50, 4
MODELS = ("hom", "iid", "free", "full")
METHODS = {"ml": "ML", "reml": "REML", "he": "HE"}

# estimates keys of the original (default path), from ctmm/ctp.py and ctmm/op.py; OP adds `nu`
_V = {"V", "ct_random_var", "ct_specific_random_var"}
_COMMON = {"beta", "fixedeffect_vars", "randomeffect_vars", "r2"}
_LIK = {"l", "D", "opt"}
EXPECTED = {
    ("hom", "ml"): {"hom2"} | _COMMON | _LIK,
    ("hom", "reml"): {"hom2"} | _COMMON | _LIK,
    ("hom", "he"): {"hom2"} | _COMMON,
    ("iid", "ml"): {"hom2"} | _V | _COMMON | _LIK,
    ("iid", "reml"): {"hom2"} | _V | _COMMON | _LIK,
    ("iid", "he"): {"hom2"} | _V | _COMMON,
    ("free", "ml"): {"hom2"} | _V | _COMMON | _LIK,
    ("free", "reml"): {"hom2"} | _V | _COMMON | _LIK,
    ("free", "he"): {"hom2"} | _V | _COMMON,
    ("full", "ml"): _V | _COMMON | {"l", "opt"},
    ("full", "reml"): _V | _COMMON | {"l", "opt"},
    ("full", "he"): _V | _COMMON,
}
P_KEYS = {"hom": {"hom2", "ct_beta"}, "iid": {"hom2", "V", "ct_beta"}}
P_KEYS["free"] = P_KEYS["iid"]

# signatures of the original: (names in order, jack_knife default or None when absent)
_CTP_ML = ["y_f", "P_f", "ctnu_f", "nu_f", "fixed_covars_d", "random_covars_d", "par", "method"]
_CTP_ML += ["nrep", "optim_by_R"]
_OP_ML = [a for a in _CTP_ML if a not in ("ctnu_f", "nu_f")]
_OP_ML.insert(2, "nu_f")


def _with_jk(names):
    return names[:-1] + ["jack_knife", "optim_by_R"]


def _signature(shape: str, model: str, method: str):
    base = _CTP_ML if shape == "ctp" else _OP_ML
    he = base[:6] if shape == "ctp" else base[:5]
    if method == "he":
        if model == "full":
            return he, None
        return he + ["jack_knife"], shape == "ctp"  # CTP HE jackknifes by default, OP not
    jk = method == "reml" and (model == "free" or (shape == "ctp" and model != "full"))
    return (_with_jk(base) if jk else base), (False if jk else None)


ALL = [(s, m, e) for s in ("ctp", "op") for m in MODELS for e in METHODS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One simulated gene in the original's text format (gzipped, no header)."""
    rng = np.random.default_rng(7)
    batch = np.repeat(np.eye(5), N // 5, axis=0)
    d = cj.simulate(
        1, N, C, hom2=0.3, V=[0.4, 0.1, 0.3, 0.0], beta=[1.0, 0.5, 0.0, -0.5], ctnu=0.2,
        random_covars={"batch": batch}, r2={"batch": 0.2}, seed=3,
    )  # fmt: skip
    o = cj.OPData.from_ctp(d)
    arrays = dict(
        CTP=d.Y[0], ctnu=d.ctnu[0], P=d.P, OP=o.y[0], nu=o.nu[0],
        pca=rng.normal(size=(N, 2)), batch=batch,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("ctmm_example")
    out = {}
    for name, a in arrays.items():
        out[name] = str(root / f"{name}.gz")
        np.savetxt(out[name], a)
    return out


def _args(shape, f):
    """The three data files of a CTP or OP call."""
    return (f["CTP"], f["P"], f["ctnu"]) if shape == "ctp" else (f["OP"], f["P"], f["nu"])


def _ctp_data(f):
    return cj.CTPData.from_files(f["CTP"], f["P"], f["ctnu"])


def test_ctp_free_reml_jackknife_matches_fit(files):
    """The original README's call, with the jackknife."""
    f = files
    free, p = ctp.free_REML(
        y_f=f["CTP"], P_f=f["P"], ctnu_f=f["ctnu"], method="BFGS", optim_by_R=True,
        jack_knife=True,
    )  # fmt: skip
    ref = cj.fit(_ctp_data(f), "free", "reml", jackknife=True, chunk_size=1)
    assert set(free) == EXPECTED["free", "reml"] and set(p) == P_KEYS["free"]
    assert isinstance(free["hom2"], float) and free["V"].shape == (C, C)
    np.testing.assert_allclose(free["hom2"], ref.phi[0, 0], **EXACT)
    np.testing.assert_allclose(free["V"], np.diag(ref.phi[0, 1:]), **EXACT)
    np.testing.assert_allclose(free["beta"]["ct_beta"], ref.beta[0], **EXACT)
    np.testing.assert_allclose(free["l"], ref.loglik[0], **EXACT)
    np.testing.assert_allclose(free["D"], ref.var_cov[0], **EXACT)
    for k in P_KEYS["free"]:
        np.testing.assert_allclose(p[k], ref.pvalues_jk[k][0], **EXACT)
    P = np.loadtxt(f["P"])
    v = ref.phi[0, 1:]
    np.testing.assert_allclose(free["ct_random_var"], np.sum(v * (P**2).sum(0)) / N, **EXACT)
    np.testing.assert_allclose(free["ct_specific_random_var"], v * (P**2).mean(0), **EXACT)
    assert free["opt"]["success"] and free["r2"] == {} and "nu" not in free


def test_ctp_hom_ml_arrays_match_fit(files):
    """Arrays instead of paths; D = blockdiag(Var(beta), Var(hom2)) as the original's ML."""
    a = {k: np.loadtxt(v) for k, v in files.items()}
    hom, p = ctp.hom_ML(a["CTP"], a["P"], a["ctnu"], a["nu"])
    ref = cj.fit(cj.CTPData.from_arrays(a["CTP"], a["ctnu"], a["P"]), "hom", "ml", chunk_size=1)
    assert set(hom) == EXPECTED["hom", "ml"] | {"nu"} and set(p) == P_KEYS["hom"]
    np.testing.assert_allclose(hom["hom2"], ref.phi[0, 0], **EXACT)
    np.testing.assert_allclose(hom["l"], ref.loglik[0], **EXACT)
    D = linalg.block_diag(ref.beta_cov[0], ref.var_cov[0])
    np.testing.assert_allclose(hom["D"], D, **EXACT)
    for k in P_KEYS["hom"]:
        np.testing.assert_allclose(p[k], ref.pvalues[k][0], **EXACT)
    np.testing.assert_allclose(hom["nu"], a["nu"].mean(), **EXACT)


def test_op_iid_he_jackknife_matches_fit(files):
    """HE: GLS beta at the HE variances (he_beta="gls"), as the original; p only with the
    jackknife."""
    f = files
    est, p = op.iid_HE(f["OP"], f["P"], f["nu"], jack_knife=True)
    data = cj.OPData.from_files(f["OP"], f["P"], f["nu"])
    ref = cj.fit(data, "iid", "he", jackknife=True, he_beta="gls", chunk_size=1)
    assert set(est) == EXPECTED["iid", "he"] | {"nu"} and set(p) == P_KEYS["iid"]
    np.testing.assert_allclose(est["hom2"], ref.phi[0, 0], **EXACT)
    np.testing.assert_allclose(est["V"], ref.phi[0, 1] * np.eye(C), **EXACT)
    np.testing.assert_allclose(est["beta"]["ct_beta"], ref.beta[0], **EXACT)
    for k in P_KEYS["iid"]:
        np.testing.assert_allclose(p[k], ref.pvalues_jk[k][0], **EXACT)
    assert op.iid_HE(f["OP"], f["P"], f["nu"])[1] == {}


def test_covariate_files_match_fit(files):
    """The README's fixed (pca) and random (batch) covariate files."""
    f = files
    fixed, random = {"pca": f["pca"]}, {"batch": f["batch"]}
    est, p = ctp.free_REML(
        y_f=f["CTP"], P_f=f["P"], ctnu_f=f["ctnu"], fixed_covars_d=fixed, random_covars_d=random
    )
    ref = cj.fit(_ctp_data(f), "free", "reml", fixed_covars=fixed, random_covars=random,
                 chunk_size=1)  # fmt: skip
    row = ref.table.iloc[0]
    assert set(est["beta"]) == {"ct_beta", "pca"} and est["beta"]["pca"].shape == (2,)
    np.testing.assert_allclose(est["beta"]["ct_beta"], ref.beta[0, :C], **EXACT)
    np.testing.assert_allclose(est["beta"]["pca"], ref.beta[0, C:], **EXACT)
    np.testing.assert_allclose(est["r2"]["batch"], row["r2_batch"], **EXACT)
    np.testing.assert_allclose(est["randomeffect_vars"]["batch"], row["randomvar_batch"], **EXACT)
    np.testing.assert_allclose(est["fixedeffect_vars"]["pca"], row["fixedvar_pca"], **EXACT)
    np.testing.assert_allclose(est["fixedeffect_vars"]["ct_beta"], row["fixedvar_ct_beta"], **EXACT)
    assert est["D"].shape == (C + 2, C + 2)
    np.testing.assert_allclose(est["l"], ref.loglik[0], **EXACT)
    for k in P_KEYS["free"]:  # the original's Wald tests (our p_V is the score test)
        np.testing.assert_allclose(p[k], ref.pvalues[{"V": "V_wald"}.get(k, k)][0], **EXACT)


def _fake_fit(data, model="free", method="reml", *, jackknife=False, fixed_covars=None,
              random_covars=None, **_):  # fmt: skip
    """A FitResult of made-up estimates, built without fitting (no compile)."""
    G, n, c = data.shape
    covars = Covariates.build(fixed_covars, data.donors)
    random = Covariates.build(random_covars, data.donors, kind="random")
    k, p = models.n_var(model, c) + len(random.values), c + covars.matrix.shape[1]
    rng = np.random.default_rng(0)
    cov = lambda m: np.tile(0.01 * np.eye(m), (G, 1, 1))
    loglik = np.full(G, np.nan if method == "he" else -1.0)
    est = Estimates(rng.uniform(0.1, 0.2, (G, k)), cov(k), rng.normal(size=(G, p)), cov(p),
                    loglik, np.ones(G, int), np.zeros(G, int), np.ones(G))  # fmt: skip
    jk = None
    if jackknife:
        phi, beta = rng.uniform(0.1, 0.2, (G, n, k)), rng.normal(size=(G, n, c))
        jk = Jackknife(phi, beta, np.zeros(G, int), np.ones((G, n), bool))
    return FitResult.build(
        data, model, method, "expected", est, np.zeros(G, bool), k + p, jackknife=jk,
        covariates=covars, random=random,
    )  # fmt: skip


@pytest.mark.parametrize("shape,model,method", ALL)
def test_keys_shapes_and_signature(files, monkeypatch, shape, model, method):
    """Every function: the original's argument names, order and jack_knife default; its
    estimate keys (CTP free_ML's `ct_specific_var` included), value shapes and p keys; full
    returns the estimates dict alone."""
    monkeypatch.setattr(api, "fit", _fake_fit)
    fn = getattr(ctp if shape == "ctp" else op, f"{model}_{METHODS[method]}")
    names, jk_default = _signature(shape, model, method)
    params = inspect.signature(fn).parameters
    assert list(params) == names
    if jk_default is not None:
        assert params["jack_knife"].default is jk_default
    f = files
    covs = dict(fixed_covars_d={"pca": f["pca"]}, random_covars_d={"batch": f["batch"]})
    nu = (f["nu"],) if shape == "ctp" else ()  # CTP's optional nu_f, reported as `nu`
    out = fn(*_args(shape, f), *nu, **covs)
    if jk_default is not None:
        jk_out = fn(*_args(shape, f), jack_knife=True)
    if model == "full":
        assert isinstance(out, dict)
        est = out
    else:
        est, p = out
        assert set(p) == (set() if method == "he" and not jk_default else P_KEYS[model])
        if jk_default is not None:
            assert set(jk_out[1]) == P_KEYS[model]
    expected = EXPECTED[model, method] | {"nu"}
    if shape == "ctp" and model == "free" and method == "ml":  # the original's own name here
        expected = expected - {"ct_specific_random_var"} | {"ct_specific_var"}
    assert set(est) == expected
    assert set(est["beta"]) == {"ct_beta", "pca"} and est["beta"]["ct_beta"].shape == (C,)
    assert set(est["r2"]) == set(est["randomeffect_vars"]) == {"batch"}
    assert set(est["fixedeffect_vars"]) == {"ct_beta", "pca"}
    if model != "full":
        assert isinstance(est["hom2"], float)
    if model != "hom":
        assert est["V"].shape == (C, C) and np.allclose(est["V"], est["V"].T)
        specific = est.get("ct_specific_random_var", est.get("ct_specific_var"))
        assert specific.shape == (C,)
    if "D" in est:
        n_var = models.n_var(model, C) + 1
        n = n_var if method == "reml" else n_var + C + 2
        assert est["D"].shape == (n, n)


def test_block_jackknife_is_refused(files):
    with pytest.raises(ValueError, match="block jackknife"):
        ctp.free_REML(*_args("ctp", files), jack_knife=5)


def test_lrt_is_chi2():
    assert util.lrt(-10.0, -13.5, 4) == pytest.approx(stats.chi2.sf(7.0, 4), rel=1e-14)
    l1, l0 = np.array([-1.0, -2.0]), np.array([-3.0, -2.5])
    np.testing.assert_allclose(util.lrt(l1, l0, 2), stats.chi2.sf(2 * (l1 - l0), 2), rtol=1e-14)


def test_import_paths():
    from ctmm_jax import compat

    assert compat.ctp.free_REML is ctp.free_REML and compat.op is op and compat.util is util
