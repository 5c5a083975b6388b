import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM, MODELS, random_phi
from numpy.testing import assert_allclose

from ctmm_jax import models


@pytest.mark.parametrize("model", MODELS)
def test_kernels_rebuild_hom2_J_plus_V(model):
    C = 4
    phi = random_phi(model, C, seed=5)
    A = np.einsum("k,kij->ij", phi, models.kernels(model, C))
    hom2, V = reference.natural(model, phi, C)
    assert_allclose(A, hom2 * np.ones((C, C)) + V, **CLOSED_FORM)
    vc = models.unpack(jnp.asarray(phi), model, C)
    assert_allclose(vc.hom2, hom2, **CLOSED_FORM)
    assert_allclose(vc.V, V, **CLOSED_FORM)
    assert len(models.param_names(model, list("abcd"))) == models.n_var(model, C) == len(phi)


@pytest.mark.parametrize("model", MODELS)
def test_nonneg_round_trip(model):
    C = 3
    phi = np.abs(random_phi(model, C, seed=6)) + 0.01
    if model == "full":
        phi = np.eye(C)[np.triu_indices(C)] * 0.5 + 0.1
    theta = models.from_natural(jnp.asarray(phi), model, C, nonneg=True)
    assert_allclose(models.to_natural(theta, model, C, nonneg=True), phi, **CLOSED_FORM)
    out = models.to_natural(jnp.full(models.n_var(model, C), -3.0), model, C, nonneg=True)
    if model == "full":  # any theta maps into the constrained set
        assert np.linalg.eigvalsh(np.asarray(models.unpack(out, model, C).V)).min() >= 0
        assert models.bounded(model, C, 0, nonneg=True) is None
    else:  # theta = phi, bounded by the optimizer; from_natural projects onto the bounds
        lower = models.bounded(model, C, 2, nonneg=True)
        assert lower.all() and len(lower) == models.n_var(model, C) + 2
        below = jnp.full(models.n_var(model, C), -3.0)
        assert (np.asarray(models.from_natural(below, model, C, nonneg=True)) == 0).all()
    assert models.bounded(model, C, 2, nonneg=False) is None


def test_unknown_model():
    with pytest.raises(ValueError, match="model='diag' is unknown"):
        models.check_model("diag")
