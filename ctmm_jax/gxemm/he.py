"""Haseman-Elston regression for GxEMM, batched over traits (the original's GxEMM_HE).

Each trait is residualised on X by OLS (betas) and standardised, r = scale(P_X y); then the
lower triangle of r r^T, with the diagonal halved, is regressed on the same entries of
A_k = P_X K_k P_X for every kernel (genetic, then noise with I last). With that weighting the
normal equations are

    Q_kl = 1/2 tr(A_k A_l) - 1/4 sum_i (A_k)_ii (A_l)_ii,
    t_k  = 1/2 r^T K_k r    - 1/4 sum_i (A_k)_ii r_i^2         (P_X r = r),

so sig2s = Q^-1 t. Q and diag(A_k) depend only on the design: they are computed once and every
trait costs its quadratic forms. Dense K: A_k explicitly (O(N^2 p) from K). Low-rank K_g = U_g
U_g^T: with V = P_X U, tr(A_g A_h) = |V_g^T V_h|_F^2 and (A_g)_ii = |V_g,i|^2 (O(N m^2)).
Diagonal noise kernels d, e, with H = X (X^T X)^-1 X^T:
tr(A_d A_e) = sum_i d_i e_i (1 - 2 H_ii) + tr(A0 X^T D X A0 X^T E X), (A_d)_ii = d_i (1 - 2 H_ii)
+ x_i^T A0 X^T D X A0 x_i and tr(A_g A_d) = sum_i (A_g)_ii d_i.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HEFit(NamedTuple):
    sig2s: jax.Array  # (T, k)
    betas: jax.Array  # (T, p) OLS


def _noise_terms(X, A0, noise):
    """tr(A_d A_e) (ke, ke) and diag(A_d) (ke, N) for diagonal kernels d (rows of noise)."""
    h = jnp.einsum("ip,pq,iq->i", X, A0, X)  # H_ii
    XDX = jnp.einsum("ip,ei,iq->epq", X, noise, X)
    B = A0 @ XDX @ A0  # (ke, p, p) A0 X^T D X A0
    Q = jnp.einsum("ei,fi,i->ef", noise, noise, 1 - 2 * h) + jnp.einsum("epq,fqp->ef", B, XDX)
    return Q, noise * (1 - 2 * h) + jnp.einsum("ip,epq,iq->ei", X, B, X)


def _genetic_dense(X, A0, K):
    """tr(A_g A_h) and diag(A_g) for dense kernels, A = K - H K - K H + H K H."""
    XA = X @ A0
    HK = jnp.einsum("ip,jp,kjl->kil", XA, X, K)
    A = K - HK - jnp.swapaxes(HK, 1, 2) + jnp.einsum("kil,lp,jp->kij", HK, XA, X)
    return jnp.einsum("kij,lij->kl", A, A), jnp.diagonal(A, axis1=1, axis2=2)


def _genetic_lowrank(X, A0, U, groups):
    """tr(A_g A_h) and diag(A_g) for K_g = U_g U_g^T (groups: which columns of U)."""
    V = U - X @ (A0 @ (X.T @ U))
    return groups @ (V.T @ V) ** 2 @ groups.T, groups @ (V**2).T


@jax.jit
def he_chunk(y, design: dict) -> HEFit:
    """HE for a batch of traits y (T, N) (raw, not standardised) sharing the design."""
    X, noise = design["X"], design["noise"]
    A0 = jnp.linalg.inv(X.T @ X)
    betas = y @ X @ A0
    r = y - betas @ X.T
    r = r / jnp.std(r, axis=1, ddof=1, keepdims=True)
    Qe, De = _noise_terms(X, A0, noise)
    if "K" in design:
        K = design["K"]
        Qg, Dg = _genetic_dense(X, A0, K)
        quad = jnp.einsum("tj,kij,ti->tk", r, K, r)
    else:
        U, groups = design["U"], design["groups"]
        Qg, Dg = _genetic_lowrank(X, A0, U, groups)
        quad = (r @ U) ** 2 @ groups.T
    Qge = Dg @ noise.T  # tr(A_g A_d) = sum_i (A_g)_ii d_i
    trAA = jnp.block([[Qg, Qge], [Qge.T, Qe]])
    diag = jnp.concatenate([Dg, De])
    Q = 0.5 * trAA - 0.25 * diag @ diag.T
    t = 0.5 * jnp.concatenate([quad, r**2 @ noise.T], axis=1) - 0.25 * r**2 @ diag.T
    return HEFit(jnp.linalg.solve(Q, t.T).T, betas)
