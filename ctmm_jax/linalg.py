"""Small dense linear algebra, batched over leading axes, in plain XLA operations.

CTMM's covariances are N blocks of C x C (C = number of cell types, usually 2-10), and GLS and
the optimizer's step need one p x p or n x n solve per gene. The per-donor blocks
(`unroll=True`, up to UNROLL_MAX) are factorised entry by entry (a static Python loop over the
matrix size, never over genes or donors): a handful of elementwise array operations over the
batch axes, which vectorises on CPU and GPU alike, where a LAPACK call per 4 x 4 matrix does
not. Its compile time grows like n^3, so every other matrix takes one column (row) per
iteration of a `lax.fori_loop`: compile time flat in n, each iteration an elementwise update
of the whole batch.

Nothing here calls LAPACK. jaxlib 0.10's CPU LAPACK kernels split a batch whose work exceeds
about 2e5 flops over XLA's intra-op thread pool and block a pool thread until the pieces are
done; when as many such calls run at once as the pool has threads (two independent
factorisations of one iteration on a 2-core machine: 256 genes with 15 x 15 informations,
C = 14), every thread waits and the process hangs for good (found with C = 14 and 16 at
N = 1000, and in HE's leave-one-out jackknife at N = 100, C = 16, whose inverses and solves
of independent replicates ran at once; `tests/test_linalg.py::test_fit_programs_call_no_lapack`).

A matrix that is not positive definite gives NaN (square root of a negative pivot, then the
whole factor); callers map that to an infinite negative log-likelihood.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

UNROLL_MAX = 8  # largest matrix size factorised entry by entry


def cholesky(A: jax.Array, unroll: bool = False) -> jax.Array:
    """Lower Cholesky factor L of A (..., n, n), A = L L^T; NaN where A is not PD."""
    n = A.shape[-1]
    L = _cholesky_unrolled(A) if unroll and n <= UNROLL_MAX else _cholesky_columns(A)
    pd = jnp.all(jnp.diagonal(L, axis1=-2, axis2=-1) > 0, axis=-1)  # NaN pivots fail too
    return jnp.where(pd[..., None, None], L, jnp.nan)


def _cholesky_unrolled(A: jax.Array) -> jax.Array:
    n = A.shape[-1]
    L: list[list[jax.Array | None]] = [[None] * n for _ in range(n)]
    for j in range(n):
        pivot = A[..., j, j] - sum((L[j][k] ** 2 for k in range(j)), jnp.zeros(A.shape[:-2]))
        L[j][j] = jnp.sqrt(pivot)
        for i in range(j + 1, n):
            off = A[..., i, j] - sum((L[i][k] * L[j][k] for k in range(j)), jnp.zeros(A.shape[:-2]))
            L[i][j] = off / L[j][j]
    zero = jnp.zeros(A.shape[:-2], A.dtype)
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(n)], -1) for i in range(n)]
    return jnp.stack(rows, -2)


def _cholesky_columns(A: jax.Array) -> jax.Array:
    """Right-looking Cholesky, one column per iteration: with l = A_{>=j, j} / sqrt(A_jj),
    column j of L is l and the trailing block loses l_{>j} l_{>j}^T."""
    n, last = A.shape[-1], A.ndim - 1
    index = jnp.arange(n)

    def column(j, A):
        a = lax.dynamic_index_in_dim(A, j, axis=last, keepdims=False)  # (..., n)
        d = jnp.sqrt(lax.dynamic_index_in_dim(a, j, axis=last - 1, keepdims=False))
        below = jnp.where(index > j, a / d[..., None], 0.0)
        A = A - below[..., :, None] * below[..., None, :]
        col = jnp.where(index == j, d[..., None], below)
        return lax.dynamic_update_index_in_dim(A, col[..., None], j, axis=last)

    return jnp.tril(lax.fori_loop(0, n, column, A))


def solve_lower(
    L: jax.Array, B: jax.Array, transpose: bool = False, unroll: bool = False
) -> jax.Array:
    """L^-1 B (or L^-T B) for lower-triangular L (..., n, n) and B (..., n, k), by forward
    (back) substitution."""
    n = L.shape[-1]
    if not unroll or n > UNROLL_MAX:
        return _substitute_rows(jnp.swapaxes(L, -1, -2) if transpose else L, B, transpose)
    order = range(n - 1, -1, -1) if transpose else range(n)
    rows: dict[int, jax.Array] = {}
    for i in order:
        r = B[..., i, :]
        for k in rows:
            coef = L[..., k, i] if transpose else L[..., i, k]
            r = r - coef[..., None] * rows[k]
        rows[i] = r / L[..., i, i, None]
    return jnp.stack([rows[i] for i in range(n)], -2)


def _substitute_rows(T: jax.Array, B: jax.Array, upper: bool) -> jax.Array:
    """T^-1 B for triangular T (..., n, n), one row of the solution per iteration (from the
    last row where T is upper triangular): x_i = (b_i - T_i. x) / T_ii, where the rows of x
    not yet solved are still 0."""
    n, rows = T.shape[-1], T.ndim - 2

    def row(t, X):
        i = n - 1 - t if upper else t
        Ti = lax.dynamic_index_in_dim(T, i, axis=rows, keepdims=False)  # (..., n)
        bi = lax.dynamic_index_in_dim(B, i, axis=rows, keepdims=False)  # (..., k)
        Tii = lax.dynamic_index_in_dim(Ti, i, axis=rows, keepdims=False)
        xi = (bi - jnp.einsum("...j,...jk->...k", Ti, X)) / Tii[..., None]
        return lax.dynamic_update_index_in_dim(X, xi, i, axis=rows)

    batch = jnp.broadcast_shapes(T.shape[:-2], B.shape[:-2])
    T, B = jnp.broadcast_to(T, batch + T.shape[-2:]), jnp.broadcast_to(B, batch + B.shape[-2:])
    # zeros that depend on T and B, so the carry varies over devices under shard_map when
    # either does (a NaN or inf in T makes the solution NaN, as it would be anyway)
    return lax.fori_loop(0, n, row, 0.0 * B + 0.0 * T[..., :, :1])


def small_matmul(A: jax.Array, B: jax.Array) -> jax.Array:
    """A @ B for small matrices (..., n, m) @ (..., m, k) as a broadcast product and sum: for
    many tiny matrices this vectorises where a batched matmul does not (about 2x on CPU)."""
    return (A[..., :, :, None] * B[..., None, :, :]).sum(-2)


def inv_from_cholesky(L: jax.Array, unroll: bool = False) -> jax.Array:
    """A^-1 = L^-T L^-1 from the Cholesky factor L (..., n, n) of A."""
    eye = jnp.broadcast_to(jnp.eye(L.shape[-1], dtype=L.dtype), L.shape)
    Linv = solve_lower(L, eye, unroll=unroll)
    if unroll and L.shape[-1] <= UNROLL_MAX:
        return small_matmul(jnp.swapaxes(Linv, -1, -2), Linv)
    return jnp.swapaxes(Linv, -1, -2) @ Linv


def spd_inverse(A: jax.Array) -> jax.Array:
    """A^-1 for symmetric positive definite A (..., n, n) by Cholesky; NaN where A is not PD."""
    return inv_from_cholesky(cholesky(A))


def spd_solve(A: jax.Array, b: jax.Array) -> jax.Array:
    """A^-1 b for symmetric positive definite A (..., n, n) and b (..., n) by Cholesky."""
    return spd_solve_columns(A, b[..., None])[..., 0]


def spd_solve_columns(A: jax.Array, B: jax.Array) -> jax.Array:
    """A^-1 B for symmetric positive definite A (..., n, n) and B (..., n, k) by Cholesky;
    NaN where A is not PD."""
    L = cholesky(A)
    return solve_lower(L, solve_lower(L, B), transpose=True)


def logdet_from_cholesky(L: jax.Array) -> jax.Array:
    """log|A| = 2 sum_j log L_jj, summed over the last two axes only."""
    return 2.0 * jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
