"""Per-gene ML/REML negative log-likelihood, score and expected information.

Written for N donors, each a block of b values (b = C for CTP, b = 1 for OP),

    Sigma = blockdiag(D_i) + U G U^T,   D_i = sum_k phi_k E_ki + diag(noise_i),   y = X beta + e,

with kernels E_ki (b x b) linear in the natural parameters phi (models.py; CTP uses the model
kernels for every donor, OP the scalars P_i^T E_k P_i, design.md 2-3) and optional random
covariates U (N blocks of b x m; G = diag of each column's r2, one r2 per covariate).

With W_i = D_i^-1 and Z = [X, U], the Woodbury identity (see `_low_rank`) gives
Sigma^-1 = W - W U M U^T W and the REML projection Pi = W - W Z N Z^T W (N the inverse of
Henderson's mixed-model equations, written without G^-1). With u = Pi y:

    ML   : 2 nll = log|Sigma| + y^T u + n log(2 pi)
    REML : 2 nll = log|Sigma| + log|X^T Sigma^-1 X| + y^T u + (n - p) log(2 pi)
    score: d nll / d phi_k = 1/2 [tr(Pj K_k) - u^T K_k u]
    info : 1/2 tr(Pj K_k Pj K_l) = 1/2 [T1_kl - 2 sum_i tr(H_i E_ki W_i E_li) + tr(N F_k N F_l)]
    hess : d2 nll / d phi_k d phi_l = u^T K_k Pi K_l u - info   (beta profiled out)

where Pj is Pi (REML) or Sigma^-1 (ML: Z = U, N = M), T1_kl = sum_i tr(W_i E_ki W_i E_li),
F_k = sum_i Z_i^T W_i E_ki W_i Z_i and H_i = (W Z N Z^T W)_ii; the random-covariate rows are
in `_add_random`. Nothing larger than b x b or (p + m) x (p + m) is ever formed. A covariance
that is not positive definite gives nll = +inf; the optimizer rejects such steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import linalg

LOG_2PI = jnp.log(2.0 * jnp.pi)
COND_MAX = 1e8  # feasible region: max_i |Sigma_i|_F * max_i |Sigma_i^-1|_F <= COND_MAX


class GeneData(NamedTuple):
    """One gene in block form.

    y: (N, b) values; noise: (N, b) known noise variances; X: (N, b, p) fixed-effect design;
    E: (n_var, N, b, b) kernels of each block (a leading 1 instead of N broadcasts);
    mask: (N, b) 1 for observed values, 0 for missing ones (a dropped donor is a row of 0s),
    or None when everything is observed;
    U: (N, b, m) stacked random-covariate designs (CTP: R_i repeated over the C values of
    donor i) or None; groups: (n_rand, m) 0/1, which columns of U belong to each random
    covariate (its variance r2 multiplies sum_{j in group} U_j U_j^T).
    """

    y: jax.Array
    noise: jax.Array
    X: jax.Array
    E: jax.Array
    mask: jax.Array | None = None
    U: jax.Array | None = None
    groups: jax.Array | None = None


def observed(d: GeneData) -> GeneData:
    """Exact likelihood of the observed values (design.md 4): for masked entries the rows and
    columns of Sigma become the identity (kernels 0, noise 1) and y, X and U become 0, so they
    add log|1| = 0 and nothing else."""
    if d.mask is None:
        return d
    m = d.mask
    return d._replace(
        y=d.y * m,
        noise=jnp.where(m > 0, d.noise, 1.0),
        X=d.X * m[..., None],
        E=d.E * (m[:, :, None] * m[:, None, :]),
        U=None if d.U is None else d.U * m[..., None],
    )


def n_observed(d: GeneData) -> jax.Array:
    return d.y.size if d.mask is None else d.mask.sum()


class Moments(NamedTuple):
    """Everything a Fisher-scoring step and the Wald tests need at one phi."""

    nll: jax.Array  # ()
    cond: jax.Array  # () conditioning bound, see factor
    score: jax.Array  # (n_par,)  d nll / d phi
    info: jax.Array  # (n_par, n_par) expected information
    hess: jax.Array  # (n_par, n_par) observed information (Hessian of nll in phi)
    beta: jax.Array  # (p,) GLS estimate
    beta_cov: jax.Array  # (p, p) (X^T Sigma^-1 X)^-1


class Factor(NamedTuple):
    """Sigma^-1 = W - W U M U^T W and the REML projection Pi = W - W Z N Z^T W, Z = [X, U]."""

    W: jax.Array  # (N, b, b) block inverses
    WZ: jax.Array  # (N, b, q) W_i Z_i, q = p + m
    S: jax.Array  # (q, q) Z^T W Z
    N: jax.Array  # (q, q) see module doc; its (p, p) block is A = (X^T Sigma^-1 X)^-1
    M: jax.Array | None  # (m, m) (G^-1 + U^T W U)^-1 (None without random covariates)
    u: jax.Array  # (N, b) Pi y = Sigma^-1 (y - X beta)
    beta: jax.Array  # (p,)
    nll: jax.Array  # ()
    cond: jax.Array  # ()


def _frobenius_cond(A: jax.Array, Ainv: jax.Array) -> jax.Array:
    """max |A_i|_F * max |A_i^-1|_F over the leading axis (or of one matrix)."""
    return jnp.sqrt(
        jnp.max(jnp.sum(A**2, axis=(-2, -1))) * jnp.max(jnp.sum(Ainv**2, axis=(-2, -1)))
    )


def _low_rank(phi_r, S_uu, groups):
    """Woodbury pieces of Sigma = D + U G U^T, G = diag(groups^T r2): with S_uu = U^T W U =
    L L^T (a 1e-12 ridge keeps L finite when U^T W U is singular, e.g. an empty batch level;
    the ridge acts only on directions that U maps to 0), C = I + L^T G L and

        M = (G^-1 + S_uu)^-1 = G - G L C^-1 L^T G,    log|Sigma| = log|D| + log|C|.

    Sigma is positive definite exactly when D and C are, so negative r2 are allowed as long as
    C is PD. Returns (M, logdet C, cond of C)."""
    m = S_uu.shape[0]
    g = groups.T @ phi_r
    ridge = 1e-12 * jnp.max(jnp.diagonal(S_uu)) + jnp.finfo(S_uu.dtype).tiny
    L = linalg.cholesky(S_uu + ridge * jnp.eye(m))
    Cm = jnp.eye(m) + L.T @ (g[:, None] * L)
    Lc = linalg.cholesky(Cm)
    Cinv = linalg.inv_from_cholesky(Lc)
    GL = g[:, None] * L
    M = jnp.diag(g) - GL @ Cinv @ GL.T
    return 0.5 * (M + M.T), linalg.logdet_from_cholesky(Lc), _frobenius_cond(Cm, Cinv)


def factor(phi: jax.Array, d: GeneData, reml: bool) -> Factor:
    """Cholesky of every block D_i, the Woodbury correction for random covariates, GLS and the
    NLL. Missing values (mask 0) get an identity row and column in D_i (so they add log 1 = 0),
    and W_i is then zeroed on them: W is the inverse of the observed part embedded in zeros, and
    every sum over W below (GLS, quadratic form, score, information) runs over the observed
    values only, with y, X, U and the kernels left as they are."""
    N, b = d.y.shape
    p = d.X.shape[-1]
    n_var = d.E.shape[0]
    Sigma = jnp.einsum("k,knij->nij", phi[:n_var], d.E) + d.noise[..., None] * jnp.eye(b)
    if d.mask is not None:
        mm = d.mask[:, :, None] * d.mask[:, None, :]
        Sigma = Sigma * mm + (1.0 - d.mask)[..., None] * jnp.eye(b)
    L = linalg.cholesky(Sigma)
    W = linalg.inv_from_cholesky(L)
    if d.mask is not None:
        W, Sigma = W * mm, Sigma * mm
    Z = d.X if d.U is None else jnp.concatenate([d.X, d.U], axis=2)
    WZ = linalg.small_matmul(W, Z)  # (N, b, q)
    S = jnp.einsum("nbp,nbq->pq", Z, WZ)
    logdet = linalg.logdet_from_cholesky(L).sum()
    # max_i |Sigma_i|_F * max_i |W_i|_F (observed entries) is between the eigenvalue ratio of
    # the D_i and b times it (exact for OP). Past COND_MAX the fit counts as outside the
    # positive-definite region: the likelihood grows without bound as one donor's covariance
    # becomes singular (GLS then fits that donor exactly, design.md 9), so the region must stop
    # short of the boundary. With random covariates the conditioning of C counts too.
    cond = _frobenius_cond(Sigma, W)
    if d.U is None:
        M, XtVX = None, S
    else:
        M, logdet_C, cond_C = _low_rank(phi[n_var:], S[p:, p:], d.groups)
        logdet, cond = logdet + logdet_C, jnp.maximum(cond, cond_C)
        XtVX = S[:p, :p] - S[:p, p:] @ M @ S[p:, :p]
    Lx = linalg.cholesky(XtVX)
    A = linalg.inv_from_cholesky(Lx)
    if d.U is None:
        Nmat = A
    else:  # inverse of Henderson's [[X'WX, X'WU], [U'WX, U'WU + G^-1]], written without G^-1
        AXU_M = A @ S[:p, p:] @ M
        Nmat = jnp.block([[A, -AXU_M], [-AXU_M.T, M + AXU_M.T @ S[:p, p:] @ M]])
    gamma = Nmat @ jnp.einsum("nbq,nb->q", WZ, d.y)
    u = (W * (d.y - jnp.einsum("nbq,q->nb", Z, gamma))[:, None, :]).sum(-1)
    nll2 = logdet + jnp.sum(d.y * u) + n_observed(d) * LOG_2PI
    if reml:  # static: two compiled variants, no runtime branch
        nll2 = nll2 + linalg.logdet_from_cholesky(Lx) - p * LOG_2PI
    feasible = jnp.isfinite(nll2) & (cond <= COND_MAX)
    return Factor(W, WZ, S, Nmat, M, u, gamma[:p], jnp.where(feasible, 0.5 * nll2, jnp.inf), cond)


def nll(phi: jax.Array, d: GeneData, reml: bool) -> jax.Array:
    """Negative log-likelihood of one gene at natural parameters phi; +inf if not PD."""
    return factor(phi, d, reml).nll


class _Traces(NamedTuple):
    """Sums over donors that the score, information and Hessian are made of (module doc)."""

    trWK: jax.Array  # (k,) sum_i tr(W_i E_ki)
    quad: jax.Array  # (k,) sum_i u_i^T E_ki u_i
    T1: jax.Array  # (k, k) sum_i tr(W_i E_ki W_i E_li)
    uKWKu: jax.Array  # (k, k) sum_i u_i^T E_ki W_i E_li u_i
    ZtWKu: jax.Array  # (k, q) sum_i Z_i^T W_i E_ki u_i
    F: jax.Array  # (k, q, q) sum_i Z_i^T W_i E_ki W_i Z_i
    T2: jax.Array  # (k, k) sum_i tr(H_i E_ki W_i E_li),  H_i = (W Z N Z^T W)_ii


def _traces_per_donor(E, W, u, WZ, H) -> _Traces:
    """Kernels that differ by donor (OP: 1 x 1 blocks): products block by block."""
    M = W[None] @ E  # W_i E_ki
    Ku = (E @ u[None, ..., None])[..., 0]  # E_ki u_i
    return _Traces(
        trWK=jnp.trace(M, axis1=2, axis2=3).sum(1),
        quad=jnp.einsum("ni,kni->k", u, Ku),
        T1=jnp.einsum("knij,lnji->kl", M, M),
        uKWKu=jnp.einsum("kni,lni->kl", Ku, (W[None] @ Ku[..., None])[..., 0]),
        ZtWKu=jnp.einsum("nip,kni->kp", WZ, Ku),
        F=jnp.einsum("nip,kniq->kpq", WZ, E @ WZ[None]),
        T2=jnp.einsum("knil,mnli->km", H[None] @ E, M),
    )


def _traces_shared(E0, W, u, WZ, H) -> _Traces:
    """Kernels shared by every donor (CTP): sum over donors first (contractions over N, which
    vectorise far better than N small matrix products), then contract with the kernels."""
    S_WW = jnp.einsum("nbc,nda->bcda", W, W)
    S_uWu = jnp.einsum("na,nbc,nd->abcd", u, W, u)
    S_HW = jnp.einsum("nda,nbc->dabc", H, W)
    return _Traces(
        trWK=jnp.einsum("kab,ab->k", E0, W.sum(0)),
        quad=jnp.einsum("kab,na,nb->k", E0, u, u),
        T1=jnp.einsum("kab,lcd,bcda->kl", E0, E0, S_WW),
        uKWKu=jnp.einsum("kab,lcd,abcd->kl", E0, E0, S_uWu),
        ZtWKu=jnp.einsum("kab,nap,nb->kp", E0, WZ, u),
        F=jnp.einsum("kab,nap,nbq->kpq", E0, WZ, WZ),
        T2=jnp.einsum("kab,lcd,dabc->kl", E0, E0, S_HW),
    )


def moments(phi: jax.Array, d: GeneData, reml: bool) -> Moments:
    """NLL, analytic score, expected information and Hessian of one gene at phi (module doc).

    The score and information use Pi (REML: Z = [X, U] with N) or Sigma^-1 (ML: Z = U with M);
    the Hessian's y^T Pi K Pi K Pi y always uses Pi (beta profiled out)."""
    f = factor(phi, d, reml)
    p, q = d.X.shape[-1], f.S.shape[0]
    sel = slice(0, q) if reml else slice(p, q)
    Np = f.N if reml else (jnp.zeros((0, 0)) if f.M is None else f.M)
    WZp = f.WZ[..., sel]
    H = linalg.small_matmul(linalg.small_matmul(WZp, Np), jnp.swapaxes(WZp, 1, 2))
    if d.E.shape[1] == 1:  # static
        t = _traces_shared(d.E[:, 0], f.W, f.u, f.WZ, H)
    else:
        t = _traces_per_donor(d.E, f.W, f.u, f.WZ, H)
    Fp = t.F[:, sel, sel]
    NF = Np @ Fp
    score = 0.5 * (t.trWK - jnp.trace(NF, axis1=1, axis2=2) - t.quad)
    info = 0.5 * (t.T1 - t.T2 - t.T2.T + jnp.einsum("kpq,lqp->kl", NF, NF))
    Q = t.uKWKu - t.ZtWKu @ f.N @ t.ZtWKu.T  # y'Pi K_k Pi K_l Pi y
    if d.U is not None:
        score, info, Q = _add_random(d, f, t, Fp, Np, sel, reml, score, info, Q)
    return Moments(f.nll, f.cond, score, info, Q - info, f.beta, f.N[:p, :p])


def _add_random(d, f, t, Fp, Np, sel, reml, score, info, Q):
    """Append the rows of the random-covariate kernels K_r = sum_{j in r} U_j U_j^T. With the
    projection written Pj = W - W Z N Z^T W (as in `moments`), Pj U = W Z c with
    c = I_u - N Z^T W U, so

        tr(Pj K_k Pj K_r) = sum_{j in r} c_j^T F_k c_j,   tr(Pj K_r Pj K_s) = |(U^T Pj U)_rs|_F^2,
        tr(Pj K_r) = sum_{j in r} (U^T Pj U)_jj,          u^T K_r u = |U_r^T u|^2,

    and for the Hessian (always Pi) u^T K_k Pi K_r u = (Z^T W K_k u)^T c_r U_r^T u and
    u^T K_r Pi K_s u = (U_r^T u)^T (U^T Pi U)_rs (U_s^T u)."""
    p, q = d.X.shape[-1], f.S.shape[0]
    G = d.groups
    Uu = jnp.einsum("nbj,nb->j", d.U, f.u)

    def projected(S, N, rows):  # c (rows x m) and U^T Pj U (m x m)
        return jnp.eye(q)[rows, p:] - N @ S[:, p - q :], S[p - q :, p - q :] - S[p - q :] @ N @ S[
            :, p - q :
        ]

    c, PjU = projected(f.S[sel, sel], Np, sel)
    cP, PiU = (c, PjU) if reml else projected(f.S, f.N, slice(0, q))
    score_r = 0.5 * G @ (jnp.diagonal(PjU) - Uu**2)
    info_kr = 0.5 * jnp.einsum("kab,aj,bj->kj", Fp, c, c) @ G.T
    info_rr = 0.5 * G @ PjU**2 @ G.T
    Q_kr = (t.ZtWKu @ cP * Uu) @ G.T
    Q_rr = G @ (PiU * jnp.outer(Uu, Uu)) @ G.T
    return (
        jnp.concatenate([score, score_r]),
        jnp.block([[info, info_kr], [info_kr.T, info_rr]]),
        jnp.block([[Q, Q_kr], [Q_kr.T, Q_rr]]),
    )
