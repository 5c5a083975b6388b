import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLOSED_FORM, small_data
from numpy.testing import assert_allclose

import ctmm_jax as cj
from ctmm_jax import devices, linalg, nulltest
from ctmm_jax.estimators import he


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
    solved = np.linalg.solve(A, B)
    assert_allclose(linalg.spd_solve_columns(jnp.asarray(A), jnp.asarray(B)), solved, **CLOSED_FORM)
    assert_allclose(linalg.spd_solve(jnp.asarray(A), jnp.asarray(B[..., 0])), solved[..., 0],
                    **CLOSED_FORM)  # fmt: skip


def test_not_positive_definite_gives_nan():
    L = linalg.cholesky(jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    assert np.isnan(np.asarray(L)).any()


@pytest.mark.parametrize(
    "method, jackknife",
    [("reml", False), ("he", 5), ("he", True)],
    ids=["reml", "he-block", "he-loo"],
)
def test_fit_programs_call_no_lapack(monkeypatch, method, jackknife):
    """jaxlib 0.10's batched CPU LAPACK kernels split big batches over XLA's intra-op pool and
    block a pool thread meanwhile; two such calls at once hang a 2-core machine for good (a
    free REML fit of 256 genes with C = 14 did, and HE's leave-one-out jackknife of 2,000 genes
    at N = 100, C = 16). Every program of a fit with matrices larger than UNROLL_MAX (C = 9:
    10 x 10 informations and HE normal equations, 9 x 9 GLS) must use this module's loops."""
    recorded = []
    call = devices.call

    def record(fn, m, args, axes, **statics):
        recorded.append((fn, args, statics))
        return call(fn, m, args, axes, **statics)

    def recorder(fn):
        def direct(*args):
            recorded.append((fn, args, {}))
            return fn(*args)

        return direct

    monkeypatch.setattr(devices, "call", record)
    monkeypatch.setattr(nulltest, "moments_chunk", recorder(nulltest.moments_chunk))
    for name in ("jackknife_gram", "jackknife_normals"):
        monkeypatch.setattr(he, name, recorder(getattr(he, name)))
    C = 9
    N = 20 if method == "reml" else 30  # HE's block jackknife keeps 24 donors for 19 parameters
    cj.fit(small_data("ctp", G=2, N=N, C=C), "free", method, noise="plugin", jackknife=jackknife)
    names = {getattr(fn, "__name__", str(fn)) for fn, _, _ in recorded}
    expected = {
        "reml": {"init_chunk", "advance_chunk", "moments_chunk"},
        "he": {"he_chunk", "he_jackknife_partition"}
        | ({"jackknife_gram"} if jackknife == 5 else set()),
    }[method]
    assert expected <= names, names
    for fn, args, statics in recorded:
        text = fn.lower(*args, **statics).as_text()
        assert "lapack" not in text, f"{fn.__name__} calls LAPACK"
