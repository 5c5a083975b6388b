"""GxEMM hom/hom REML in K's eigenbasis (issue 16, item 3) against the dense path and dense
NumPy; the identifiability warning (issue 16, item 5)."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM
from numpy.testing import assert_allclose

from ctmm_jax import gxemm
from ctmm_jax.gxemm import model, reml

SAME_FIT = dict(rtol=1e-6, atol=1e-9)  # the same iterations, up to rounding


def _data(N=60, M=20, seed=0, n_traits=None, **kw):
    kw = dict(maf=0.3, sig2g=(0.3, 0.6)) | kw
    return gxemm.simulate(N, M, n_traits=n_traits, seed=seed, **kw)


def _X(sim):
    return np.hstack([np.ones((len(sim.Z), 1)), sim.X])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_eigen_loglik_score_and_information_equal_dense(seed):
    """At random (s_g, s_e), some s_g < 0, with a full-rank K (M > N) and a rank-deficient one
    (M < N: eigenvalues 0): REML log-likelihood, score, average and expected information of
    the eigen path equal the dense path's and the log-likelihood dense NumPy's."""
    rng = np.random.default_rng(seed)
    for M in (20, 90):
        sim = _data(N=60, M=M, seed=seed)
        inputs = model.check_inputs(sim.y, sim.X, sim.K, sim.Z, None, "hom", "hom")
        assert reml.eigen_exact(inputs)
        y = jnp.asarray(model.standardize(sim.y[None])[0])
        dense, _ = reml.design_of(inputs)
        eigen, structure = reml.design_of(inputs, eigen=True)
        assert structure == "eigen" and reml.design_of(inputs)[1] == "dense"
        s = np.array([rng.uniform(-0.1, 0.8), rng.uniform(0.3, 1.2)])
        ll = -reml.nll(jnp.asarray(s), y, eigen, "eigen")
        assert_allclose(ll, -reml.nll(jnp.asarray(s), y, dense, "dense"), **CLOSED_FORM)
        Sigma = s[0] * sim.K + s[1] * np.eye(60)
        ref = reference.reml_loglik(np.asarray(y), inputs.X, Sigma)
        assert_allclose(ll, ref, **CLOSED_FORM)
        got = reml.moments(jnp.asarray(s), y, eigen, "eigen")
        want = reml.moments(jnp.asarray(s), y, dense, "dense")
        for a, b in zip(got, want, strict=True):  # score, average and expected information
            assert_allclose(a, b, **CLOSED_FORM)
        # the expected information from dense NumPy, too
        P = reference.projection(inputs.X, Sigma)
        Ks = [sim.K, np.eye(60)]
        info = 0.5 * np.array([[np.trace(P @ A @ P @ B) for B in Ks] for A in Ks])
        assert_allclose(got[2], info, **CLOSED_FORM)


@pytest.mark.parametrize("nonneg", [False, True])
def test_eigen_fit_equals_dense_fit(nonneg):
    """gxemm.fit hom/hom picks the eigen path by itself; its estimates, standard errors, h2 with
    its delta-method variance, ll, betas, the heritability Wald p value and the LRT p value of
    free against it equal the dense path's (eigen=False)."""
    sim = _data(N=80, seed=5, n_traits=6, sig2g=(0.2, 0.5), sig2g_hom=0.3)
    kw = dict(gtype="hom", nonneg=nonneg, tol=1e-10)
    eig = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, **kw)
    den = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, eigen=False, **kw)
    assert eig.structure == "eigen" and den.structure == "dense"
    assert eig.converged.all() and den.converged.all(), (eig.status, den.status)
    assert_allclose(eig.n_iter, den.n_iter)
    for key in ("sig2s", "sig2Var", "h2", "h2Covmat", "ll", "betas"):
        assert_allclose(getattr(eig, key), getattr(den, key), **SAME_FIT, err_msg=key)
    te, td = eig.named_table(), den.named_table()
    for col in ("se_sig2g_hom", "se_sig2e_hom", "se_h2"):
        assert_allclose(te[col], td[col], **SAME_FIT, err_msg=col)
    p_eig = gxemm.wald_test(eig.h2[:, 0], eig.h2Covmat[:, 0, 0])
    assert_allclose(p_eig, gxemm.wald_test(den.h2[:, 0], den.h2Covmat[:, 0, 0]), **SAME_FIT)
    free = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="free", nonneg=nonneg, tol=1e-10)
    lrt_eig = gxemm.gxe_tests(free, eig)["p_gxe_lrt"]
    lrt_den = gxemm.gxe_tests(free, den)["p_gxe_lrt"]
    assert np.isfinite(lrt_eig).sum() >= 4
    assert_allclose(lrt_eig, lrt_den, **SAME_FIT)
    one = gxemm.fit(sim.y[2], sim.X, sim.K, sim.Z, **kw)  # one trait: the batch's row
    assert_allclose(one.sig2s, eig.sig2s[2], **SAME_FIT)
    row = eig.trait(2)  # per-trait fields indexed, the shared kernel_vif whole
    assert_allclose(row["sig2s"], eig.sig2s[2])
    assert_allclose(row["kernel_vif"], one.kernel_vif)


def test_eigen_path_only_where_exact():
    """Other models and genotypes S keep their paths; eigen=True there is refused."""
    sim = _data(N=40, seed=4)
    assert gxemm.fit(sim.y, sim.X, None, sim.Z, S=sim.S).structure == "lowrank"
    assert gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="free").structure == "dense"
    assert gxemm.fit(sim.y, None, sim.K, None, eigen=True).structure == "eigen"
    for kw in (dict(K=sim.K, gtype="free"), dict(K=sim.K, etype="free"),
               dict(K=None, S=sim.S)):  # fmt: skip
        K = kw.pop("K")
        with pytest.raises(ValueError, match="eigen=True: the eigen path is exact only"):
            gxemm.fit(sim.y, sim.X, K, sim.Z, eigen=True, **kw)
    with pytest.raises(ValueError, match="eigen='yes'"):
        gxemm.fit(sim.y, sim.X, sim.K, sim.Z, eigen="yes")


def test_identifiability_warning_fires_on_k_near_identity_only():
    """K close to I (unrelated individuals) with discrete Z: one IdentifiabilityWarning per
    fit call, whatever the number of traits, naming the GxE components and their VIFs (as
    kernel_vif), for REML and HE; none for gtype 'hom' or a well-identified simulation."""
    sim = _data(N=60, seed=6, n_traits=3)
    K = 0.95 * np.eye(60) + 0.05 * sim.K
    vif = gxemm.kernel_vif(K, sim.Z, "free", "free")  # levels env1, env2 as fit's
    assert min(vif["sig2g_env1"], vif["sig2g_env2"]) > model.VIF_WARN
    for method in ("reml", "he"):
        with pytest.warns(gxemm.IdentifiabilityWarning) as record:
            out = gxemm.fit(sim.y, sim.X, K, sim.Z, gtype="free", etype="free", method=method)
        assert len(record) == 1
        text = str(record[0].message)
        for name in ("sig2g_env1", "sig2g_env2"):
            assert f"{name} {vif[name]:.3g}" in text
        assert "sig2g_hom" not in text and "\n" not in text
        assert "weakly identified" in text and "LRT" in text
        assert_allclose(out.kernel_vif, list(vif.values()), rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gxemm.fit(sim.y, sim.X, K, sim.Z, gtype="hom", etype="free")  # no GxE component
        good = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="free", etype="free")
        iid = gxemm.fit(sim.y, sim.X, sim.K, sim.Z, gtype="iid")
    assert good.kernel_vif.max() < model.VIF_WARN and iid.kernel_vif.max() < model.VIF_WARN
    with pytest.warns(gxemm.IdentifiabilityWarning, match=r"sig2g_iid \d"):
        gxemm.fit(sim.y, sim.X, K, sim.Z, gtype="iid")


def test_vif_of_genotypes_equals_dense_kernels():
    """model.vif_of from the low-rank factors (M < N and M > N) equals kernel_vif of K."""
    for M in (20, 90):
        sim = _data(N=60, M=M, seed=7)
        inputs = model.check_inputs(sim.y, sim.X, None, sim.Z, sim.S, "free", "free")
        vif = gxemm.kernel_vif(sim.K, sim.Z, "free", "free")
        assert_allclose(model.vif_of(inputs), list(vif.values()), rtol=1e-8)
    exact = gxemm.kernel_vif(np.eye(60), sim.Z, "free", "free")  # K o z z^T = diag(z) exactly
    assert np.isinf(exact["sig2g_env1"]) and np.isinf(exact["sig2e_env1"])
