import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLOSED_FORM
from numpy.testing import assert_allclose

from ctmm_jax import linalg


@pytest.mark.parametrize("n", [1, 3, linalg.UNROLL_MAX, linalg.UNROLL_MAX + 2])
def test_small_dense_algebra(n):
    rng = np.random.default_rng(n)
    A = rng.normal(size=(4, n, n))
    A = A @ np.swapaxes(A, 1, 2) + n * np.eye(n)
    B = rng.normal(size=(4, n, 2))
    L = linalg.cholesky(jnp.asarray(A))
    assert_allclose(L, np.linalg.cholesky(A), **CLOSED_FORM)
    assert_allclose(linalg.solve_lower(L, jnp.asarray(B)), np.linalg.solve(L, B), **CLOSED_FORM)
    Lt = np.swapaxes(np.asarray(L), 1, 2)
    assert_allclose(
        linalg.solve_lower(L, jnp.asarray(B), transpose=True), np.linalg.solve(Lt, B), **CLOSED_FORM
    )
    assert_allclose(linalg.inv_from_cholesky(L), np.linalg.inv(A), **CLOSED_FORM)
    assert_allclose(linalg.logdet_from_cholesky(L), np.linalg.slogdet(A)[1], **CLOSED_FORM)
    assert_allclose(linalg.small_matmul(jnp.asarray(A), jnp.asarray(B)), A @ B, **CLOSED_FORM)


def test_not_positive_definite_gives_nan():
    L = linalg.cholesky(jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    assert np.isnan(np.asarray(L)).any()
