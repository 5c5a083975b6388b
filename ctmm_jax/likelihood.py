"""Per-gene ML/REML negative log-likelihood, score and expected information.

Written once for a block-diagonal covariance: N donors, each a block of b values
(b = C for CTP, b = 1 for OP),

    Sigma_i = sum_k phi_k E_ki + diag(noise_i),      y_i = X_i beta + e_i,

with kernels E_ki (b x b) that are linear in the natural parameters phi (models.py). CTP uses
the model kernels E_k for every donor; OP uses the scalars P_i^T E_k P_i (design.md 2-3).

With W_i = Sigma_i^-1, A = (X^T W X)^-1, beta = A X^T W y, r = y - X beta:

    ML   : 2 nll = log|Sigma| + r^T W r + n log(2 pi)
    REML : 2 nll = log|Sigma| + log|X^T W X| + r^T W r + (n - p) log(2 pi)
    score: d nll / d phi_k = 1/2 [tr(Pi K_k) - (W r)^T K_k (W r)]
    info : ML 1/2 tr(W K_k W K_l);  REML 1/2 tr(Pi K_k Pi K_l)
           = 1/2 [T1_kl - 2 sum_i tr(H_i E_ki M_li) + tr(A B_k A B_l)]
    hess : d2 nll / d phi_k d phi_l = (Pi y)^T K_k Pi K_l (Pi y) - info   (beta profiled out)

where Pi = W - W X A X^T W (for ML, Pi is replaced by W in the score), M_ki = W_i E_ki,
T1_kl = sum_i tr(M_ki M_li), B_k = sum_i X_i^T W_i E_ki W_i X_i, H_i = W_i X_i A X_i^T W_i.
Nothing larger than b x b or p x p is ever formed. A covariance that is not positive definite
gives nll = +inf; the optimizer rejects such steps.
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
    or None when everything is observed.
    """

    y: jax.Array
    noise: jax.Array
    X: jax.Array
    E: jax.Array
    mask: jax.Array | None = None


def observed(d: GeneData) -> GeneData:
    """Exact likelihood of the observed values (design.md 4): for masked entries the rows and
    columns of Sigma become the identity (kernels 0, noise 1) and y and X become 0, so they add
    log|1| = 0 and nothing else."""
    if d.mask is None:
        return d
    m = d.mask
    return GeneData(
        y=d.y * m,
        noise=jnp.where(m > 0, d.noise, 1.0),
        X=d.X * m[..., None],
        E=d.E * (m[:, :, None] * m[:, None, :]),
        mask=m,
    )


def n_observed(d: GeneData) -> jax.Array:
    return d.y.size if d.mask is None else d.mask.sum()


class Moments(NamedTuple):
    """Everything a Fisher-scoring step and the Wald tests need at one phi."""

    nll: jax.Array  # ()
    cond: jax.Array  # () conditioning bound, see _factor
    score: jax.Array  # (n_var,)  d nll / d phi
    info: jax.Array  # (n_var, n_var) expected information
    hess: jax.Array  # (n_var, n_var) observed information (Hessian of nll in phi)
    beta: jax.Array  # (p,) GLS estimate
    beta_cov: jax.Array  # (p, p) (X^T W X)^-1


class Factor(NamedTuple):
    W: jax.Array  # (N, b, b) block inverses
    A: jax.Array  # (p, p) (X^T W X)^-1
    beta: jax.Array  # (p,)
    Wr: jax.Array  # (N, b) W (y - X beta)
    nll: jax.Array  # ()
    cond: jax.Array  # ()


def factor(phi: jax.Array, d: GeneData, reml: bool) -> Factor:
    """Cholesky of every block, GLS and the NLL. Missing values (mask 0) get an identity row
    and column in Sigma_i (so they add log 1 = 0), and W_i is then zeroed on them: W is the
    inverse of the observed part embedded in zeros, and every sum over W below (GLS, residual
    quadratic form, score, information) runs over the observed values only, with y, X and the
    kernels left as they are."""
    N, b = d.y.shape
    p = d.X.shape[-1]
    Sigma = jnp.einsum("k,knij->nij", phi, d.E) + d.noise[..., None] * jnp.eye(b)
    if d.mask is not None:
        mm = d.mask[:, :, None] * d.mask[:, None, :]
        Sigma = Sigma * mm + (1.0 - d.mask)[..., None] * jnp.eye(b)
    L = linalg.cholesky(Sigma)
    W = linalg.inv_from_cholesky(L)
    if d.mask is not None:
        W, Sigma = W * mm, Sigma * mm
    WX = linalg.small_matmul(W, d.X)  # (N, b, p)
    XtWX = jnp.einsum("nbp,nbq->pq", d.X, WX)
    Lx = linalg.cholesky(XtWX)
    A = linalg.inv_from_cholesky(Lx)
    beta = A @ jnp.einsum("nbp,nb->p", WX, d.y)
    r = d.y - jnp.einsum("nbp,p->nb", d.X, beta)
    Wr = (W * r[:, None, :]).sum(-1)
    nll2 = linalg.logdet_from_cholesky(L).sum() + jnp.sum(r * Wr) + n_observed(d) * LOG_2PI
    if reml:  # static: two compiled variants, no runtime branch
        nll2 = nll2 + linalg.logdet_from_cholesky(Lx) - p * LOG_2PI
    nll = 0.5 * nll2
    # max_i |Sigma_i|_F * max_i |W_i|_F (observed entries) is between the eigenvalue ratio of
    # Sigma and b times it (exact for OP). Past COND_MAX the fit counts as outside the
    # positive-definite region: the likelihood grows without bound as one donor's covariance
    # becomes singular (GLS then fits that donor exactly, design.md 9), so the region must stop
    # short of the boundary.
    cond = jnp.sqrt(jnp.max(jnp.sum(Sigma**2, axis=(1, 2))) * jnp.max(jnp.sum(W**2, axis=(1, 2))))
    feasible = jnp.isfinite(nll) & (cond <= COND_MAX)
    return Factor(W, A, beta, Wr, jnp.where(feasible, nll, jnp.inf), cond)


def nll(phi: jax.Array, d: GeneData, reml: bool) -> jax.Array:
    """Negative log-likelihood of one gene at natural parameters phi; +inf if not PD."""
    return factor(phi, d, reml).nll


class _Traces(NamedTuple):
    """Sums over donors that the score, information and Hessian are made of (module doc)."""

    trWK: jax.Array  # (k,) sum_i tr(W_i E_ki)
    quad: jax.Array  # (k,) sum_i u_i^T E_ki u_i,  u = W r
    T1: jax.Array  # (k, k) sum_i tr(W_i E_ki W_i E_li)
    uKWKu: jax.Array  # (k, k) sum_i u_i^T E_ki W_i E_li u_i
    XtWKu: jax.Array  # (k, p) sum_i X_i^T W_i E_ki u_i
    B: jax.Array  # (k, p, p) sum_i X_i^T W_i E_ki W_i X_i
    T2: jax.Array  # (k, k) sum_i tr(H_i E_ki W_i E_li),  H_i = W_i X_i A X_i^T W_i


def _traces_per_donor(E, W, u, WX, A) -> _Traces:
    """Kernels that differ by donor (OP: 1 x 1 blocks): products block by block."""
    M = W[None] @ E  # W_i E_ki
    Ku = (E @ u[None, ..., None])[..., 0]  # E_ki u_i
    H = WX @ A @ jnp.swapaxes(WX, 1, 2)
    return _Traces(
        trWK=jnp.trace(M, axis1=2, axis2=3).sum(1),
        quad=jnp.einsum("ni,kni->k", u, Ku),
        T1=jnp.einsum("knij,lnji->kl", M, M),
        uKWKu=jnp.einsum("kni,lni->kl", Ku, (W[None] @ Ku[..., None])[..., 0]),
        XtWKu=jnp.einsum("nip,kni->kp", WX, Ku),
        B=jnp.einsum("nip,kniq->kpq", WX, E @ WX[None]),
        T2=jnp.einsum("knil,mnli->km", H[None] @ E, M),
    )


def _traces_shared(E0, W, u, WX, A) -> _Traces:
    """Kernels shared by every donor (CTP): sum over donors first (contractions over N, which
    vectorise far better than N small matrix products), then contract with the kernels."""
    H = linalg.small_matmul(linalg.small_matmul(WX, A), jnp.swapaxes(WX, 1, 2))
    S_WW = jnp.einsum("nbc,nda->bcda", W, W)
    S_uWu = jnp.einsum("na,nbc,nd->abcd", u, W, u)
    S_HW = jnp.einsum("nda,nbc->dabc", H, W)
    return _Traces(
        trWK=jnp.einsum("kab,ab->k", E0, W.sum(0)),
        quad=jnp.einsum("kab,na,nb->k", E0, u, u),
        T1=jnp.einsum("kab,lcd,bcda->kl", E0, E0, S_WW),
        uKWKu=jnp.einsum("kab,lcd,abcd->kl", E0, E0, S_uWu),
        XtWKu=jnp.einsum("kab,nap,nb->kp", E0, WX, u),
        B=jnp.einsum("kab,nap,nbq->kpq", E0, WX, WX),
        T2=jnp.einsum("kab,lcd,dabc->kl", E0, E0, S_HW),
    )


def moments(phi: jax.Array, d: GeneData, reml: bool) -> Moments:
    """NLL, analytic score, expected information and Hessian of one gene at phi (module doc)."""
    f = factor(phi, d, reml)
    WX = linalg.small_matmul(f.W, d.X)
    if d.E.shape[1] == 1:  # static
        t = _traces_shared(d.E[:, 0], f.W, f.Wr, WX, f.A)
    else:
        t = _traces_per_donor(d.E, f.W, f.Wr, WX, f.A)
    Q = t.uKWKu - t.XtWKu @ f.A @ t.XtWKu.T  # y'Pi K_k Pi K_l Pi y
    if reml:
        AB = f.A @ t.B
        T3 = jnp.einsum("kpq,lqp->kl", AB, AB)
        score = 0.5 * (t.trWK - jnp.trace(AB, axis1=1, axis2=2) - t.quad)
        info = 0.5 * (t.T1 - t.T2 - t.T2.T + T3)
    else:
        score = 0.5 * (t.trWK - t.quad)
        info = 0.5 * t.T1
    return Moments(f.nll, f.cond, score, info, Q - info, f.beta, f.A)
