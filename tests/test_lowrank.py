"""The `lowrank` model (hom2 J + l l^T), added through the model registry alone: its likelihood,
score and information against dense NumPy/SciPy, and fits against a dense SciPy optimum."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM, METHODS, SHAPES, small_data
from numpy.testing import assert_allclose
from scipy import optimize

import ctmm_jax as cj
from ctmm_jax import blocks, models
from ctmm_jax.estimators.mlreml import objective

C = 3
PHI = np.array([0.3, 0.5, -0.2, 0.4])  # hom2, l


def _dense(data, g, phi, method):
    """Dense log-likelihood, and the dense kernels dSigma/dphi: J lifted for hom2,
    e_c l^T + l e_c^T lifted for l_c."""
    hom2, load = phi[0], phi[1:]
    ll = reference.loglik(data, g, hom2, np.outer(load, load), method)
    e = np.eye(C)
    Bs = [np.ones((C, C))] + [np.outer(e[c], load) + np.outer(load, e[c]) for c in range(C)]
    if hasattr(data, "Y"):
        Ks = [np.kron(np.eye(data.shape[1]), B) for B in Bs]
    else:
        Ks = [np.diag(np.einsum("nc,cd,nd->n", data.P, B, data.P)) for B in Bs]
    return ll, Ks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_likelihood_score_and_information_match_dense(shape, method):
    data = small_data(shape, N=15 if shape == "ctp" else 40)
    d = blocks.to_blocks(data, "lowrank").gene(0)
    obj = objective(d, model="lowrank", C=C, reml=method == "reml", nonneg=False)
    nll, _ = obj.value(jnp.asarray(PHI))
    score, info, _, _ = obj.evaluate(jnp.asarray(PHI))
    ll, Ks = _dense(data, 0, PHI, method)
    assert_allclose(-nll, ll, **CLOSED_FORM)
    y, X, Sigma = reference.dense(data, 0, PHI[0], np.outer(PHI[1:], PHI[1:]))
    Pm = reference.projection(X, Sigma) if method == "reml" else np.linalg.inv(Sigma)
    dense_info = [[0.5 * np.trace(Pm @ Ki @ Pm @ Kj) for Kj in Ks] for Ki in Ks]
    assert_allclose(info, dense_info, **CLOSED_FORM)
    h = 1e-6  # central differences of the dense log-likelihood
    fd = [(_dense(data, 0, PHI - h * e, method)[0] - _dense(data, 0, PHI + h * e, method)[0])
          / (2 * h) for e in np.eye(len(PHI))]  # fmt: skip
    assert_allclose(score, fd, rtol=1e-6, atol=1e-6)


def test_registry_entry():
    assert models.n_var("lowrank", C) == 1 + C
    assert models.param_names("lowrank", ["a", "b", "c"]) == ["hom2", "L_a", "L_b", "L_c"]
    vc = models.unpack(jnp.asarray(PHI), "lowrank", C)
    assert_allclose(vc.V, np.outer(PHI[1:], PHI[1:]), **CLOSED_FORM)
    theta = models.from_natural(jnp.asarray(PHI), "lowrank", C, nonneg=True)
    assert_allclose(models.to_natural(theta, "lowrank", C, nonneg=True), PHI, **CLOSED_FORM)


def test_fit_reaches_the_dense_optimum():
    """Data drawn with V = l l^T: REML converges, its log-likelihood is the dense one at the
    estimates and no lower than a dense SciPy optimum; HE is refused (not linear)."""
    load = np.array([0.6, 0.3, -0.4])
    data = small_data("ctp", G=2, N=60, V=np.outer(load, load), seed=21)
    res = cj.fit(data, "lowrank", "reml")
    t = res.table
    assert t.converged.all(), t.message.tolist()
    assert {"hom2", "L_ct0", "L_ct1", "L_ct2", "se_L_ct0", "p_hom2", "p_ct_beta"} <= set(t)
    for g in range(2):
        phi = res.phi[g]
        assert_allclose(res.loglik[g], _dense(data, g, phi, "reml")[0], rtol=1e-10)
        r = optimize.minimize(
            lambda p, g=g: -_dense(data, g, p, "reml")[0], phi + 0.05, method="BFGS"
        )
        assert res.loglik[g] >= -r.fun - 1e-8
    with pytest.raises(ValueError, match="linear"):
        cj.fit(data, "lowrank", "he")
