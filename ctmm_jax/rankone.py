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

    sum_i (p_i q_i^T) o W_i = diag(sum_i p_i q_i W_i,cc) - off((kappa p delta)^T (q delta)),

with (kappa p delta) the (N, C) array of rows kappa_i p_i o delta_i and off(.) a matrix's
off-diagonal part. The kernels enter through
the dictionary V = [I_C, 1_C]: E_k = V diag(S_k) V^T, so tr(W_i E_k W_i E_l) = S_k^T (G_i o G_i)
S_l with G_i = V^T W_i V = [[W_i, w_i], [w_i^T, rho_i s_i]] (a bordered matrix), and likewise
for the other traces (`traces`).

Rounding. With unconstrained V an e_ic can be near 0 while Sigma_i is well conditioned: then
delta_ic is huge, kappa_i delta_ic is near 1, and W_cc written as delta_ic - kappa_i delta_ic^2
cancels (W_cc^2 so written loses about 13 digits when e_ic ~ 1e-7, and the information with
it). So no diagonal is formed as such a difference: W_cc = delta_ic lam_ic with
lam_ic = 1 - kappa_i delta_ic = (1 + h s_i,-c) rho_i, s_i,-c the sum of delta_i over the
other entries, a product with J - I (`_others`); W_i v = delta_i o (lam_i o v - kappa_i t_i),
t_ic the sum of delta_i o v_i over the other entries; each Hadamard product with W_i
(`Bordered`) takes its diagonal from closed forms in W_cc and its off-diagonal entries,
products that do not cancel, from the pairs above; and the one quadratic form these diagonals
need, delta_i,-c^T A delta_i,-c (delta_i with entry c set to 0), sums the squares over the
other entries (`_quadratic_without`). What still cancels does so to first order: a relative
error of at most about eps / |e_ic| (2e-9 at e_ic = 1e-7) in the off-diagonal entries of the
row and column c, as any formula in delta_i must have.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RankOne(NamedTuple):
    """Every W_i = Sigma_i^-1 of one gene in closed form (module doc)."""

    delta: jax.Array  # (N, C) m_i / e_i (0 where missing)
    kappa: jax.Array  # (N,)
    rho: jax.Array  # (N,)
    lam: jax.Array  # (N, C) 1 - kappa_i delta_ic = (1 + h s_i,-c) rho_i
    logdet: jax.Array  # () sum_i log|Sigma_i|; NaN where a Sigma_i is not positive definite
    cond: jax.Array  # () max_i |Sigma_i|_F * max_i |W_i|_F (likelihood.factor)

    @property
    def diag(self) -> jax.Array:
        """(N, C) the diagonal of W_i, delta_ic lam_ic (module doc)."""
        return self.delta * self.lam

    @property
    def w(self) -> jax.Array:
        """(N, C) w_i = W_i 1."""
        return self.rho[:, None] * self.delta

    @property
    def omega(self) -> jax.Array:
        """(N,) 1^T W_i 1."""
        return self.rho * self.delta.sum(1)


def inverse(weights, diag_j, noise, mask, loadings=None) -> RankOne:
    """The blocks' inverses at kernel weights (n_k [+ C],): e_ic = sum_k w_k a_kc + noise_ic
    [+ w_(n_k + c) loadings_ic] (1 where missing), h = sum_k w_k c_k. With unconstrained V an
    e_ic may be negative while Sigma_i is positive definite: by the interlacing of the
    eigenvalues of a rank-one update, Sigma_i is PD exactly when every e_ic > 0 and
    1 + h s_i > 0, or when one (observed) e_ic < 0, h > 0 and 1 + h s_i < 0, where
    |Sigma_i| = prod_c e_ic (1 + h s_i)."""
    K, C = diag_j.shape[0], noise.shape[1]
    coef = weights[:K] @ diag_j
    e = coef[:C] + noise
    if loadings is not None:
        e = e + weights[K : K + C] * loadings
    m = jnp.ones_like(noise) if mask is None else mask
    e = jnp.where(m > 0, e, 1.0)
    h = coef[C]
    delta = m / e
    den = 1.0 + h * delta.sum(1)
    n_neg = (e < 0).sum(1)
    pd = jnp.where(n_neg == 0, den > 0, (n_neg == 1) & (h > 0) & (den < 0))
    logdet = jnp.log(jnp.abs(e)).sum(1) + jnp.log(jnp.abs(den))
    logdet = jnp.where(pd & jnp.all(e != 0, 1), logdet, jnp.nan).sum()
    kappa, rho = h / den, 1.0 / den
    lam = (1.0 + h * _others(delta)) * rho[:, None]
    # |Sigma_i|_F^2 = sum_c (m e)_c^2 + 2 h sum_c (m e)_c + h^2 (sum_c m_c)^2 (m is 0/1);
    # |W_i|_F^2 = sum_c W_cc^2 + kappa^2 sum_(c != a) delta_c^2 delta_a^2
    me = m * e
    sig2 = (me**2).sum(1) + 2.0 * h * me.sum(1) + h**2 * m.sum(1) ** 2
    d2 = delta**2
    w2 = ((delta * lam) ** 2).sum(1) + kappa**2 * (d2 * _others(d2)).sum(1)
    cond = jnp.sqrt(jnp.max(sig2) * jnp.max(w2))
    return RankOne(delta, kappa, rho, lam, logdet, cond)


def _others(x: jax.Array) -> jax.Array:
    """(N, C) each entry's row sum over the other entries, x (J - I): no difference of sums,
    which would cancel where one entry dominates its row (a where-based form is 2-3 times
    slower on XLA's CPU backend)."""
    C = x.shape[1]
    return x @ (jnp.ones((C, C), x.dtype) - jnp.eye(C, dtype=x.dtype))


def _with_diagonal(diagonal: jax.Array, off: jax.Array) -> jax.Array:
    """The (C, C) matrix with this diagonal and off's off-diagonal entries."""
    C = diagonal.shape[0]
    return jnp.where(jnp.eye(C, dtype=bool), jnp.diag(diagonal), off)


def apply(r: RankOne, v: jax.Array) -> jax.Array:
    """W_i v_i = delta_i o (lam_i o v_i - kappa_i t_i) for every donor, t_ic the sum of
    delta_i o v_i over the other entries: v (N, C) -> (N, C)."""
    return r.delta * (r.lam * v - r.kappa[:, None] * _others(r.delta * v))


def gram(r: RankOne) -> jax.Array:
    """sum_i W_i (C, C) = X^T W X for X_i = I_C."""
    return _with_diagonal(r.diag.sum(0), -(r.kappa[:, None] * r.delta).T @ r.delta)


class Bordered(NamedTuple):
    """Per-donor (C + 1) square matrices [[B_i, col_i], [col_i^T, corner_i]] with B_i's
    diagonal x_i and its off-diagonal entries those of sum_j p_ij q_ij^T, of
    sum_j (p_ij q_ij^T + q_ij p_ij^T) for the mirrored pairs, and of sum_j M_j o (y_ij z_ij^T)
    (M_j shared by the donors; the diagonal of these terms is not used): the form of
    V^T A_i V o V^T B_i V for the matrices of the likelihood (module doc)."""

    x: jax.Array  # (N, C)
    pairs: list  # [(p, q)] of (N, C) arrays
    mirrored: list  # [(p, q)] of (N, C) arrays
    dense: list  # [(M, y, z)]: M (C, C), y and z (N, C)
    col: jax.Array  # (N, C)
    corner: jax.Array  # (N,)

    def weighted_sum(self, left: jax.Array, right: jax.Array) -> jax.Array:
        """sum_i diag(left_i) X_i diag(right_i) (C + 1, C + 1) for donor weights (N, C + 1) of
        the dictionary entries: a few (C x N) (N x C) products. With left the same array as
        right, a mirrored pair's two products are one and its transpose."""
        C = self.x.shape[1]
        lb, lc, rb, rc = left[:, :C], left[:, C], right[:, :C], right[:, C]

        def products(pairs):
            P = jnp.concatenate([lb * p for p, _ in pairs])
            return P.T @ jnp.concatenate([rb * q for _, q in pairs])

        off = jnp.zeros((C, C), self.x.dtype)
        if self.pairs:
            off = off + products(self.pairs)
        if self.mirrored and left is right:  # static
            M = products(self.mirrored)
            off = off + M + M.T
        elif self.mirrored:
            off = off + products(self.mirrored + [(q, p) for p, q in self.mirrored])
        for M, y, z in self.dense:
            off = off + M * ((lb * y).T @ (rb * z))
        block = _with_diagonal((lb * self.x * rb).sum(0), off)
        top = (lb * self.col * rc[:, None]).sum(0)
        bottom = (lc[:, None] * self.col * rb).sum(0)
        out = jnp.zeros((C + 1, C + 1), block.dtype).at[:C, :C].set(block)
        out = out.at[:C, C].set(top).at[C, :C].set(bottom)
        return out.at[C, C].set((lc * self.corner * rc).sum())


def _hadamard_w(r: RankOne, pairs) -> list:
    """The off-diagonal entries of (sum_j p_j q_j^T) o W_i, those of
    -sum_j (kappa p_j delta)(q_j delta)^T: as pairs (mirrored pairs map to mirrored pairs)."""
    kd = r.kappa[:, None] * r.delta
    return [(-kd * p, r.delta * q) for p, q in pairs]


def _quadratic_without(delta: jax.Array, dA: jax.Array, Ad_off: jax.Array) -> jax.Array:
    """(N, C) delta_i,-c^T A delta_i,-c (delta_i with entry c set to 0; A symmetric, dA its
    diagonal, Ad_off = delta A_off with A_off its off-diagonal part) as
    sum_a delta_a (A_off delta)_a - 2 delta_c (A_off delta)_c + sum_(a != c) A_aa delta_a^2:
    the terms removed are at most linear in delta_ic, and the squares are summed over the
    other entries (`_others`), so a huge delta_ic cancels to first order only."""
    return (delta * Ad_off).sum(1)[:, None] - 2.0 * delta * Ad_off + _others(dA * delta**2)


def _contract(S, weights, mats):
    """Kernel-level matrices from dictionary-level weighted sums (`Bordered.weighted_sum`):
    the model's kernels (rows S_k of S, donor weight 1) and, when `weights` holds loadings
    A (N, C), the C kernels A_ic e_c e_c^T after them."""
    N, R = mats[0].x.shape[0], S.shape[1]
    one = jnp.ones((N, R))
    out = []
    for X in mats:
        model = S @ X.weighted_sum(one, one) @ S.T
        if weights is None:
            out.append(model)
            continue
        A = jnp.pad(weights, ((0, 0), (0, 1)))
        cross = (S @ X.weighted_sum(one, A))[:, : R - 1]
        own = X.weighted_sum(A, A)[: R - 1, : R - 1]
        out.append(jnp.block([[model, cross], [cross.T, own]]))
    return out


def only_j(S, loadings) -> bool:
    """Whether every kernel is c_k J_C (hom) and there are no loadings, known while tracing:
    S a NumPy array (the model's constants, models.diag_j_coefficients) with a_k = 0. Then
    only the dictionary's entry 1_C is used, and `traces` and `design_terms` skip the others."""
    return loadings is None and isinstance(S, np.ndarray) and not S[:, :-1].any()


def traces(S, loadings, r: RankOne, u: jax.Array, Nbb, v: jax.Array, hd: jax.Array):
    """(trWK, quad, T1, uKWKu, T2) of likelihood._Traces for the kernels E_k = V diag(S_k) V^T
    and, with loadings A (N, C), A_ic e_c e_c^T. H_i = (W Z Nj Z^T W)_ii
    = W_i A W_i + x_i w_i^T + w_i x_i^T + hd_i w_i w_i^T with A = Nbb (C x C) the block of Nj
    on X's columns, x_i = W_i v_i, v_i = (Nj_bd d_i) and hd_i = d_i^T Nj_dd d_i (d_i donor i's
    fixed and random covariates; likelihood._projected_blocks)."""
    delta, kappa, w, omega = r.delta, r.kappa, r.w, r.omega
    su = u.sum(1)
    dA = jnp.diagonal(Nbb)
    Ad_off = delta @ (Nbb - jnp.diag(dA))
    Ad = Ad_off + dA * delta  # rows delta_i^T A
    xv = apply(r, v)
    # H_i 1 = W_i A w_i + omega_i x_i + (1^T x_i) w_i + hd_i omega_i w_i, A w_i = rho_i A delta_i
    H1 = apply(r, r.rho[:, None] * Ad) + omega[:, None] * xv + xv.sum(1)[:, None] * w
    H1 = H1 + (hd * omega)[:, None] * w
    if only_j(S, loadings):  # static: E_k = c_k J, so every trace is c_k c_l sum_i 1^T . 1
        c = jnp.asarray(S[:, -1])
        cc = jnp.outer(c, c)
        T1, uKWKu, T2 = (cc * x.sum() for x in (omega**2, su**2 * omega, H1.sum(1) * omega))
        return c * omega.sum(), c * (su**2).sum(), T1, uKWKu, T2
    d2 = delta**2
    kd2 = kappa[:, None] * d2
    g = r.diag
    trWK = S @ jnp.append(g.sum(0), omega.sum())
    quad = S @ jnp.append((u**2).sum(0), (su**2).sum())
    if loadings is not None:
        trWK = jnp.concatenate([trWK, (loadings * g).sum(0)])
        quad = jnp.concatenate([quad, (loadings * u**2).sum(0)])
    GoG = Bordered(g**2, [(kd2, kd2)], [], [], w**2, omega**2)
    ggG = Bordered(u**2 * g, _hadamard_w(r, [(u, u)]), [], [], su[:, None] * u * w, su**2 * omega)
    # H_i = W A W + x w^T + w x^T + hd w w^T. Off the diagonal, W A W = D A D - kappa z' delta^T
    # - kappa delta z'^T + kappa^2 q delta delta^T (z' = delta o (A delta), q = delta^T A delta)
    # and (D A D) o W = -A o (kappa delta^2 delta^2^T). On it, with W's row c
    # W_cc e_c - kappa delta_c delta_-c: (W A W)_cc = W_cc^2 A_cc
    # - 2 W_cc kappa delta_c (A_off delta)_c + kappa^2 delta_c^2 delta_-c^T A delta_-c.
    zp = delta * Ad
    q = zp.sum(1)
    WAW = g**2 * dA - 2.0 * g * kappa[:, None] * delta * Ad_off
    WAW = WAW + kd2 * kappa[:, None] * _quadratic_without(delta, dA, Ad_off)
    diag_H = WAW + 2.0 * xv * w + hd[:, None] * w**2
    H_pairs = [((kappa**2 * q)[:, None] * delta, delta), (hd[:, None] * w, w)]
    H_mirrored = [(-kappa[:, None] * zp, delta), (xv, w)]
    HoG = Bordered(diag_H * g, _hadamard_w(r, H_pairs), _hadamard_w(r, H_mirrored),
                   [(-Nbb, kd2, d2)], H1 * w, H1.sum(1) * omega)  # fmt: skip
    T1, uKWKu, T2 = _contract(S, loadings, [GoG, ggG, HoG])
    return trWK, quad, T1, uKWKu, T2


def design_terms(S, loadings, r: RankOne, u: jax.Array, FU: jax.Array):
    """(F_bb, F_bd, s, ZtWKu_b, t) of likelihood._design_terms for X_i = I_C, per dictionary
    entry v_r (e_1..e_C, 1) with donor weights nu_ir, then contracted with the kernels:
    F_bb[r] = sum_i nu_ir W_i v_r v_r^T W_i, F_bd[r] = sum_i nu_ir W_i v_r (v_r^T w_i) d_i^T,
    s_ri = nu_ir (v_r^T w_i)^2, ZtWKu_b[r] = sum_i nu_ir W_i v_r (v_r^T u_i) and
    t_ri = nu_ir (v_r^T w_i)(v_r^T u_i), where W_i e_c = W_cc e_c - kappa_i delta_ic delta_i,-c
    (delta_i,-c: delta_i with entry c set to 0; module doc)."""
    C = r.delta.shape[1]
    if only_j(S, loadings):  # static: the entry 1_C alone, with nu_i = 1
        w, omega, su = r.w, r.omega, u.sum(1)
        J = (w.T @ w, (omega[:, None] * w).T @ FU, omega**2, su @ w, omega * su)
        return tuple(jnp.tensordot(jnp.asarray(S[:, -1:]), a[None], 1) for a in J)

    eye = jnp.eye(C)
    off = 1.0 - eye

    def entries(nu):  # nu: (N, C + 1)
        delta, kappa, w, omega, g = r.delta, r.kappa, r.w, r.omega, r.diag
        nb, nj = nu[:, :C], nu[:, C]
        # W_i e_c = W_cc e_c - kappa delta_c delta_-c, so (W e_c)(W e_c)^T is W_cc^2 at (c, c),
        # -W_cc kappa delta_c delta_a at (c, a) and kappa^2 delta_c^2 delta_a delta_b elsewhere
        R = (nb * g * kappa[:, None] * delta).T @ delta  # row c: the (c, a) entries
        outer = (delta[:, :, None] * delta[:, None, :]).reshape(-1, C * C)
        K = (((kappa**2)[:, None] * nb * delta**2).T @ outer).reshape(C, C, C)
        F_bb = (
            off[:, :, None] * off[:, None, :] * K
            - eye[:, :, None] * (off * R)[:, None, :]
            - eye[:, None, :] * (off * R)[:, :, None]
            + eye[:, :, None] * eye[:, None, :] * (nb * g**2).sum(0)[:, None, None]
        )
        F_bb = jnp.concatenate([F_bb, ((nj[:, None] * w).T @ w)[None]])
        beta = nb * delta * w  # W_i e_c (e_c^T w_i) nu_ic, off its entry c: -kappa beta_ic delta_i
        F_bd = eye[:, :, None] * ((nb * g * w).T @ FU)[:, None, :]
        F_bd = F_bd - off[:, :, None] * jnp.einsum(
            "nc,na,nj->caj", kappa[:, None] * beta, delta, FU
        )
        F_bd = jnp.concatenate([F_bd, (((nj * omega)[:, None] * w).T @ FU)[None]])
        s = jnp.concatenate([(nb * w**2).T, (nj * omega**2)[None]])
        gam = nb * delta * u
        Zb = _with_diagonal((nb * g * u).sum(0), -((kappa[:, None] * gam).T @ delta))
        Zb = jnp.concatenate([Zb, ((nj * u.sum(1)) @ w)[None]])
        t = jnp.concatenate([(nb * w * u).T, (nj * omega * u.sum(1))[None]])
        return F_bb, F_bd, s, Zb, t

    N = r.delta.shape[0]
    model = [jnp.tensordot(S, a, 1) for a in entries(jnp.ones((N, C + 1)))]
    if loadings is None:
        return tuple(model)
    extra = entries(jnp.pad(loadings, ((0, 0), (0, 1))))
    return tuple(jnp.concatenate([m, e[:C]]) for m, e in zip(model, extra, strict=True))
