"""Closed forms for CTP blocks Sigma_i = diag(e_i) + h m_i m_i^T (the hom, iid and free models).

When every kernel is diag(a_k) + c_k J_C and shared by the donors (likelihood.GeneData.diag_j,
rows S_k = [a_k, c_k]), the fixed design within a block is X_i = I_C and m_i is the 0/1 mask of
donor i, Sherman-Morrison gives every block inverse in closed form,

    W_i = D_i - kappa_i delta_i delta_i^T,   D_i = diag(delta_i), delta_i = m_i / e_i,
    kappa_i = h / (1 + h s_i), s_i = sum_c delta_ic,   w_i = W_i 1 = rho_i delta_i,
    rho_i = 1 / (1 + h s_i),   1^T W_i 1 = rho_i s_i,

and every sum over donors that the likelihood, score and information need (likelihood.py's
module doc) becomes elementwise work on (N, C) arrays and (C x N) (N x C) products, O(N C^2)
per gene with no C x C matrix per donor. The one exception is sum_i W_i E_k W_i, K matrices of
C x C (the REML correction), which is a single (K x N) (N x C^2) product.

Sums of Hadamard products over donors use, for per-donor vectors p_i, q_i,

    sum_i (p_i q_i^T) o W_i = diag(sum_i p_i q_i delta_i) - (kappa p delta)^T (q delta),

with (kappa p delta) the (N, C) array of rows kappa_i p_i o delta_i. The kernels enter through
the dictionary V = [I_C, 1_C]: E_k = V diag(S_k) V^T, so tr(W_i E_k W_i E_l) = S_k^T (G_i o G_i)
S_l with G_i = V^T W_i V = [[W_i, w_i], [w_i^T, rho_i s_i]] (a bordered matrix), and likewise
for the other traces (`traces`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RankOne(NamedTuple):
    """Every W_i = Sigma_i^-1 of one gene in closed form (module doc)."""

    delta: jax.Array  # (N, C) m_i / e_i (0 where missing)
    kappa: jax.Array  # (N,)
    rho: jax.Array  # (N,)
    logdet: jax.Array  # () sum_i log|Sigma_i|; NaN where a Sigma_i is not positive definite
    cond: jax.Array  # () max_i |Sigma_i|_F * max_i |W_i|_F (likelihood.factor)

    @property
    def w(self) -> jax.Array:
        """(N, C) w_i = W_i 1."""
        return self.rho[:, None] * self.delta

    @property
    def omega(self) -> jax.Array:
        """(N,) 1^T W_i 1."""
        return self.rho * self.delta.sum(1)


def inverse(weights: jax.Array, diag_j: jax.Array, noise: jax.Array, mask) -> RankOne:
    """The blocks' inverses at kernel weights (n_k,): e_ic = sum_k w_k a_kc + noise_ic (1 where
    missing), h = sum_k w_k c_k. With unconstrained V an e_ic may be negative while Sigma_i is
    positive definite: by the interlacing of the eigenvalues of a rank-one update, Sigma_i is
    PD exactly when every e_ic > 0 and 1 + h s_i > 0, or when one (observed) e_ic < 0, h > 0
    and 1 + h s_i < 0, where |Sigma_i| = prod_c e_ic (1 + h s_i)."""
    C = noise.shape[1]
    coef = weights @ diag_j
    m = jnp.ones_like(noise) if mask is None else mask
    e = jnp.where(m > 0, coef[:C] + noise, 1.0)
    h = coef[C]
    delta = m / e
    den = 1.0 + h * delta.sum(1)
    n_neg = (e < 0).sum(1)
    pd = jnp.where(n_neg == 0, den > 0, (n_neg == 1) & (h > 0) & (den < 0))
    logdet = jnp.log(jnp.abs(e)).sum(1) + jnp.log(jnp.abs(den))
    logdet = jnp.where(pd & jnp.all(e != 0, 1), logdet, jnp.nan).sum()
    kappa, rho = h / den, 1.0 / den
    # |Sigma_i|_F^2 = sum_c (m e)_c^2 + 2 h sum_c (m e)_c + h^2 (sum_c m_c)^2 (m is 0/1)
    me = m * e
    sig2 = (me**2).sum(1) + 2.0 * h * me.sum(1) + h**2 * m.sum(1) ** 2
    d2 = (delta**2).sum(1)
    w2 = d2 - 2.0 * kappa * (delta**3).sum(1) + kappa**2 * d2**2
    cond = jnp.sqrt(jnp.max(sig2) * jnp.max(w2))
    return RankOne(delta, kappa, rho, logdet, cond)


def apply(r: RankOne, v: jax.Array) -> jax.Array:
    """W_i v_i for every donor: v (N, C) -> (N, C)."""
    return r.delta * v - (r.kappa * (r.delta * v).sum(1))[:, None] * r.delta


def gram(r: RankOne) -> jax.Array:
    """sum_i W_i (C, C) = X^T W X for X_i = I_C."""
    return jnp.diag(r.delta.sum(0)) - (r.kappa[:, None] * r.delta).T @ r.delta


def _hadamard_sum(r: RankOne, pairs) -> jax.Array:
    """sum_i (sum_j p_ij q_ij^T) o W_i for pairs [(p_j, q_j)] of (N, C) arrays (module doc)."""
    kd = r.kappa[:, None] * r.delta
    diag = sum(p * q * r.delta for p, q in pairs).sum(0)
    low = jnp.concatenate([kd * p for p, _ in pairs], 0).T @ jnp.concatenate(
        [r.delta * q for _, q in pairs], 0
    )
    return jnp.diag(diag) - low


def _bordered(S: jax.Array, block: jax.Array, border: jax.Array, corner: jax.Array):
    """S [[block, border], [border^T, corner]] S^T: a sum over donors of Hadamard products of
    bordered matrices V^T M_i V, contracted with the kernels' dictionary weights S (K, C + 1)."""
    C = block.shape[0]
    full = jnp.zeros((C + 1, C + 1), block.dtype)
    full = full.at[:C, :C].set(block).at[:C, C].set(border).at[C, :C].set(border)
    return S @ full.at[C, C].set(corner) @ S.T


def traces(S, r: RankOne, u: jax.Array, Nbb, v: jax.Array, hd: jax.Array):
    """(trWK, quad, T1, uKWKu, T2) of likelihood._Traces. H_i = (W Z Nj Z^T W)_ii
    = W_i A W_i + x_i w_i^T + w_i x_i^T + hd_i w_i w_i^T with A = Nbb (C x C) the block of Nj
    on X's columns, x_i = W_i v_i, v_i = (Nj_bd d_i) and hd_i = d_i^T Nj_dd d_i (d_i donor i's
    fixed and random covariates; likelihood._projected_blocks)."""
    delta, kappa, w, omega = r.delta, r.kappa, r.w, r.omega
    su = u.sum(1)
    trWK = S @ jnp.append((delta - kappa[:, None] * delta**2).sum(0), omega.sum())
    quad = S @ jnp.append((u**2).sum(0), (su**2).sum())
    d2 = delta**2
    kd2 = kappa[:, None] * d2
    GoG = jnp.diag((d2 - 2.0 * kappa[:, None] * delta**3).sum(0)) + kd2.T @ kd2
    T1 = _bordered(S, GoG, (w**2).sum(0), (omega**2).sum())
    ggG = _hadamard_sum(r, [(u, u)])
    uKWKu = _bordered(S, ggG, (su[:, None] * u * w).sum(0), (su**2 * omega).sum())
    # H_i: W A W = D A D - kappa z' delta^T - kappa delta z'^T + kappa^2 q delta delta^T,
    # z' = delta o (A delta), q = delta^T A delta; (D A D) o W = diag(diag(A) delta^3)
    # - kappa A o (delta^2 delta^2^T)
    zp = delta * (delta @ Nbb)
    q = (zp).sum(1)
    x = apply(r, v)
    km = -kappa[:, None]
    pairs = [(km * zp, delta), (km * delta, zp), ((kappa**2 * q)[:, None] * delta, delta),
             (x, w), (w, x), (hd[:, None] * w, w)]  # fmt: skip
    HoW = jnp.diag(jnp.diagonal(Nbb) * (delta**3).sum(0)) - Nbb * (kd2.T @ d2)
    HoW = HoW + _hadamard_sum(r, pairs)
    H1 = apply(r, w @ Nbb) + omega[:, None] * x + x.sum(1)[:, None] * w
    H1 = H1 + (hd * omega)[:, None] * w
    T2 = _bordered(S, HoW, (H1 * w).sum(0), (H1.sum(1) * omega).sum())
    return trWK, quad, T1, uKWKu, T2


def design_terms(S, r: RankOne, u: jax.Array, FU: jax.Array):
    """(F_bb, F_bd, s, ZtWKu_b, t) of likelihood._design_terms for X_i = I_C:
    F_bb[k] = sum_i W_i E_k W_i, F_bd[k] = sum_i W_i E_k w_i d_i^T, s_ki = w_i^T E_k w_i,
    ZtWKu_b[k] = sum_i W_i E_k u_i and t_ki = w_i^T E_k u_i, with E_k = diag(a_k) + c_k J and

        W_i diag(a) W_i = diag(delta^2 a) - kappa (delta^2 a) delta^T - kappa delta (delta^2 a)^T
                          + kappa^2 (a . delta^2) delta delta^T,   W_i J W_i = w_i w_i^T."""
    a, c = S[:, :-1], S[:, -1]
    delta, kappa, w, omega = r.delta, r.kappa, r.w, r.omega
    N, C = delta.shape
    d2 = delta**2
    M2 = (kappa[:, None] * d2).T @ delta  # sum_i kappa_i delta_i^2 delta_i^T
    coef = (kappa**2)[:, None] * (d2 @ a.T)  # (N, K): kappa_i^2 (a_k . delta_i^2)
    outer = (delta[:, :, None] * delta[:, None, :]).reshape(N, C * C)
    F_bb = (
        (a * d2.sum(0))[:, :, None] * jnp.eye(C)
        - a[:, :, None] * M2[None]
        - a[:, None, :] * M2.T[None]
        + (coef.T @ outer).reshape(-1, C, C)
        + c[:, None, None] * (w.T @ w)[None]
    )
    dw = delta * w  # W_i (a o w_i) = a o delta o w_i - kappa delta (delta o w_i) . a
    WEw = (
        dw[:, None, :] * a[None]
        - (kappa[:, None, None] * delta[:, None, :]) * (dw @ a.T)[..., None]
    )
    WEw = WEw + (c[None, :, None] * omega[:, None, None]) * w[:, None, :]
    F_bd = jnp.einsum("nkc,nj->kcj", WEw, FU)
    s = a @ (w**2).T + c[:, None] * (omega**2)[None]
    du = delta * u
    su = u.sum(1)
    ZtWKu_b = a * du.sum(0) - a @ ((kappa[:, None] * delta).T @ du).T + c[:, None] * (su @ w)
    t = a @ (w * u).T + c[:, None] * (omega * su)[None]
    return F_bb, F_bd, s, ZtWKu_b, t
