"""Native REML for GxEMM, batched over traits that share X and the kernels.

Sigma(s) = sum_g s_g K_g + diag(sum_e s_e d_e) with genetic kernels K_g and diagonal noise
kernels d_e (model.py). With the REML projection P = Sigma^-1 - Sigma^-1 X A X^T Sigma^-1,
A = (X^T Sigma^-1 X)^-1:

    2 nll   = log|Sigma| + log|X^T Sigma^-1 X| + y^T P y + (N - p) log(2 pi)
    score_k = 1/2 [tr(P K_k) - y^T P K_k P y]
    AI_kl   = 1/2 y^T P K_k P K_l P y      (average information: the mean of the observed and
                                            expected information, near the optimum)
    info_kl = 1/2 tr(P K_k P K_l)          (expected information, sig2Var = info^-1)

Three structures share the core optimizer (optimize.fisher_scoring); `design_of` picks one:
- "dense", K (N x N): an iteration costs one Cholesky and one inverse of Sigma (O(N^3)) plus
  O(k N^2); the expected information (O(k N^3)) is computed once, at the optimum.
- "lowrank", genotypes S (N x M): K_g = U_g U_g^T is low rank and the noise is diagonal, which
  is the core CTMM likelihood with N blocks of one value, the noise kernels as block kernels
  and U as random covariates (likelihood.py, Woodbury): O(N m^2 + m^3) per iteration, m =
  total rank.
- "eigen", gtype = etype = 'hom' with dense K: Sigma = s_g K + s_e I shares K's eigenvectors,
  K = Q diag(lam) Q^T, so with y~ = Q^T y and X~ = Q^T X (rotated once for all traits) Sigma is
  diag(w), w = s_g lam + s_e, and every quantity above has a closed form over the eigenvalues
  (as GCTA and FaST-LMM): O(N p^2) per iteration (`_eigen_value`). Exact, not an
  approximation: REML is invariant to the orthogonal rotation Q^T.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular

from .. import likelihood
from ..likelihood import COND_MAX, LOG_2PI, GeneData
from ..optimize import Point, fisher_scoring, init_state, project
from ..status import BOUNDARY_COND


class Fit(NamedTuple):
    """REML fit of a batch of traits (leading axis)."""

    sig2s: jax.Array  # (T, k)
    sig2Var: jax.Array  # (T, k, k) inverse expected information
    betas: jax.Array  # (T, p) GLS fixed effects
    beta_cov: jax.Array  # (T, p, p)
    nll: jax.Array  # (T,)
    score: jax.Array  # (T, k) at the estimate
    n_iter: jax.Array  # (T,)
    status: jax.Array  # (T,) the optimizer's outcome (status.decide makes it final)


# --- dense K ---------------------------------------------------------------------------------


def _dense_sigma(s, K, noise):
    return jnp.einsum("k,kij->ij", s[: K.shape[0]], K) + jnp.diag(s[K.shape[0] :] @ noise)


def _dense_value(s, y, X, K, noise):
    """(nll, cond) by one Cholesky; cond = (max L_ii / min L_ii)^2 <= cond(Sigma)."""
    N, p = X.shape
    L = jnp.linalg.cholesky(_dense_sigma(s, K, noise))
    d = jnp.diagonal(L)
    Ly, LX = solve_triangular(L, y, lower=True), solve_triangular(L, X, lower=True)
    La = jnp.linalg.cholesky(LX.T @ LX)
    z = solve_triangular(La, LX.T @ Ly, lower=True)
    nll2 = 2 * jnp.log(d).sum() + 2 * jnp.log(jnp.diagonal(La)).sum() + Ly @ Ly - z @ z
    nll2 = nll2 + (N - p) * LOG_2PI
    cond = (d.max() / d.min()) ** 2
    feasible = jnp.isfinite(nll2) & (cond <= COND_MAX)
    return jnp.where(feasible, 0.5 * nll2, jnp.inf), cond


def _dense_projection(s, X, K, noise):
    """P, and GLS pieces Sigma^-1 X and A = (X^T Sigma^-1 X)^-1."""
    L = jnp.linalg.cholesky(_dense_sigma(s, K, noise))
    Si = cho_solve((L, True), jnp.eye(X.shape[0]))
    SiX = Si @ X
    A = jnp.linalg.inv(X.T @ SiX)
    return Si - SiX @ A @ SiX.T, SiX, A


def _dense_score_ai(s, y, X, K, noise):
    P = _dense_projection(s, X, K, noise)[0]
    Py = P @ y
    KPy = jnp.concatenate([K @ Py, noise * Py], axis=0)  # (k, N): K_k P y
    tr = jnp.concatenate([jnp.einsum("ij,kij->k", P, K), noise @ jnp.diagonal(P)])
    score = 0.5 * (tr - KPy @ Py)
    AI = 0.5 * KPy @ P @ KPy.T
    return score, AI, AI


def _dense_final(s, y, X, K, noise):
    """Score, expected information, GLS beta and its covariance at s."""
    P, SiX, A = _dense_projection(s, X, K, noise)
    PK = jnp.concatenate([P @ K, P[None] * noise[:, None, :]], axis=0)  # P K_k
    info = 0.5 * jnp.einsum("kij,lji->kl", PK, PK)
    Py = P @ y
    KPy = jnp.concatenate([K @ Py, noise * Py], axis=0)
    score = 0.5 * (jnp.trace(PK, axis1=1, axis2=2) - KPy @ Py)
    return score, info, A @ (SiX.T @ y), A


# --- genotypes (low rank): the core likelihood ------------------------------------------------


def _gene(y, X, U, groups, noise) -> GeneData:
    """One trait as N blocks of one value: noise kernels as 1 x 1 block kernels, U as random
    covariates with one variance per genetic kernel."""
    N = y.shape[0]
    E = noise[:, :, None, None]
    return GeneData(y[:, None], jnp.zeros((N, 1)), X[:, None, :], E, None, None, U, groups)


def _order(kg: int, ke: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices between sig2s = [genetic, noise] and the core's phi = [noise, genetic]."""
    to_phi = np.concatenate([np.arange(kg, kg + ke), np.arange(kg)])
    return to_phi, np.argsort(to_phi)


def _lowrank_value(s, y, X, U, groups, noise):
    to_phi, _ = _order(groups.shape[0], noise.shape[0])
    f = likelihood.factor(s[to_phi], _gene(y, X, U, groups, noise), True)
    return f.nll, f.cond


def _lowrank_moments(s, y, X, U, groups, noise):
    to_phi, back = _order(groups.shape[0], noise.shape[0])
    m = likelihood.moments(s[to_phi], _gene(y, X, U, groups, noise), True)
    return m.score[back], m.info[back][:, back], m.hess[back][:, back], m.beta, m.beta_cov


def _lowrank_score_info(s, **kw):
    return _lowrank_moments(s, **kw)[:3]


def _lowrank_final(s, **kw):
    score, info, _, beta, beta_cov = _lowrank_moments(s, **kw)
    return score, info, beta, beta_cov


# --- one dense K, hom noise: K's eigenbasis ---------------------------------------------------


def eigen_exact(inputs) -> bool:
    """Whether Sigma = sum_k s_k K_k is diagonal in one basis for every s: one dense genetic
    kernel (gtype 'hom': K itself) and the noise kernel I alone (etype 'hom')."""
    return (
        inputs.K is not None
        and inputs.K.shape[0] == 1
        and inputs.noise.shape[0] == 1
        and bool(np.all(inputs.noise == 1.0))
    )


def eigen_design(inputs) -> dict:
    """K = Q diag(lam) Q^T (NumPy eigh, once): X~ = Q^T X (N, p), the kernels' diagonals in
    that basis, genetic lam (1, N) and noise 1 (1, N), and Q (N, N) to rotate the traits
    (`fit_chunk`, `nll`)."""
    if not eigen_exact(inputs):
        raise ValueError(
            "the eigen path needs gtype='hom', etype='hom' and a dense K (Sigma = s_g K + "
            "s_e I); other models are fitted on the dense or genotype path."
        )
    lam, Q = np.linalg.eigh(inputs.K[0])
    return dict(
        X=jnp.asarray(Q.T @ inputs.X), genetic=jnp.asarray(lam[None]),
        noise=jnp.ones((1, len(lam))), Q=jnp.asarray(Q),
    )  # fmt: skip


def _eigen_w(s, genetic, noise):
    """Sigma's eigenvalues w = sum_k s_k d_k (N,) and the kernels' diagonals D (k, N)."""
    D = jnp.concatenate([genetic, noise])
    return s @ D, D


def _eigen_value(s, y, X, genetic, noise):
    """(nll, cond) with Sigma = diag(w) (rotated y and X): 2 nll = sum log w_i
    + log|X^T W X| + y^T W y - b^T (X^T W X)^-1 b + (N - p) log 2 pi, W = diag(1 / w),
    b = X^T W y; cond = max w / min w, Sigma's condition number."""
    N, p = X.shape
    w, _ = _eigen_w(s, genetic, noise)
    W = 1.0 / w
    La = jnp.linalg.cholesky((X * W[:, None]).T @ X)
    z = solve_triangular(La, X.T @ (W * y), lower=True)
    nll2 = jnp.log(w).sum() + 2 * jnp.log(jnp.diagonal(La)).sum() + (W * y) @ y - z @ z
    nll2 = nll2 + (N - p) * LOG_2PI
    cond = w.max() / w.min()
    feasible = (w.min() > 0) & jnp.isfinite(nll2) & (cond <= COND_MAX)
    return jnp.where(feasible, 0.5 * nll2, jnp.inf), cond


def _eigen_projection(s, X, genetic, noise):
    """The pieces of P = W - B, B = G A G^T with G = W X (N, p) and A = (X^T W X)^-1:
    D (k, N), W (N,), G, A and h = diag(B) (N,) (so diag(P) = W - h)."""
    w, D = _eigen_w(s, genetic, noise)
    W = 1.0 / w
    G = X * W[:, None]
    A = jnp.linalg.inv(X.T @ G)
    h = jnp.einsum("ip,pq,iq->i", G, A, G)
    return D, W, G, A, h


def _eigen_py(y, W, G, A):
    """P y = W y - G A G^T y = W (y - X beta), and beta = A G^T y."""
    beta = A @ (G.T @ y)
    return W * y - G @ beta, beta


def _eigen_score_ai(s, y, X, genetic, noise):
    """score_k = 1/2 (d_k . diag(P) - u_k . P y) and AI_kl = 1/2 u_k^T P u_l with
    u_k = d_k o P y; P u = W u - G A G^T u: O(N p k) (the dense path's quantities)."""
    D, W, G, A, h = _eigen_projection(s, X, genetic, noise)
    Py, _ = _eigen_py(y, W, G, A)
    u = D * Py  # (k, N): K_k P y
    score = 0.5 * (D @ (W - h) - u @ Py)
    uG = u @ G  # (k, p)
    AI = 0.5 * ((u * W) @ u.T - uG @ A @ uG.T)
    return score, AI, AI


def _eigen_final(s, y, X, genetic, noise):
    """Score, expected information, GLS beta and A at s. With P = W - B:
    tr(P D_k P D_l) = sum_i W_i^2 d_ki d_li - 2 sum_i W_i h_i d_ki d_li + tr(A M_k A M_l),
    M_k = G^T D_k G (p, p) (tr(W D_k B D_l) = sum_i W_i B_ii d_ki d_li: diagonal factors)."""
    D, W, G, A, h = _eigen_projection(s, X, genetic, noise)
    Py, beta = _eigen_py(y, W, G, A)
    AM = A @ jnp.einsum("ip,ki,iq->kpq", G, D, G)  # (k, p, p): A M_k
    info = 0.5 * ((D * (W * W - 2 * W * h)) @ D.T + jnp.einsum("kpq,lqp->kl", AM, AM))
    score = 0.5 * (D @ (W - h) - (D * Py) @ Py)
    return score, info, beta, A


# --- one trait, then a batch ----------------------------------------------------------------


def constrained_coordinates(design: dict, nonneg: bool, discrete: bool):
    """The optimizer's coordinates theta under nonneg, sig2s = B theta, and which of them are
    kept >= 0: (B (k, k) or None for theta = sig2s, lower (k,) bool or None).

    Genetic components are bounded at 0. Free noise over discrete (one-hot) environments is
    optimised as each environment's own noise variance n_k (n_k = e_k + e_I for k < K0, n_K0
    = e_I, so e_k = n_k - n_K0), each >= 0: with e_k free, an environment's noise could turn
    negative while its genetic kernel K o z_k z_k^T, close to diag(z_k) for unrelated
    individuals, took its place, ending on the positive-definite wall. Otherwise (hom noise,
    continuous environments) the noise of I is bounded and the e_k take any sign."""
    if not nonneg:
        return None, None
    kg = _n_genetic(design)
    ke = design["noise"].shape[0]
    if not discrete or ke == 1:
        lower = np.concatenate([np.ones(kg, bool), np.zeros(ke - 1, bool), np.ones(1, bool)])
        return None, lower
    B = np.eye(kg + ke)
    B[kg : kg + ke - 1, -1] = -1.0
    return B, np.ones(kg + ke, bool)


def _in_coordinates(value, score_info, B):
    """value and score_info of theta with sig2s = B theta (B constant): score B^T g,
    information B^T I B, Hessian B^T H B."""

    def value_theta(t):
        return value(B @ t)

    def score_info_theta(t):
        g, info, hess = score_info(B @ t)
        return B.T @ g, B.T @ info @ B, B.T @ hess @ B

    return value_theta, score_info_theta


def _n_genetic(design: dict) -> int:
    """The number of genetic kernels of a design (any structure)."""
    for key, axis in (("K", 0), ("groups", 0), ("genetic", 0)):
        if key in design:
            return design[key].shape[axis]
    raise KeyError("design: no genetic kernels")


# (value, score_info, final) of one trait for each structure of `design_of`
STRUCTURES = {
    "dense": (_dense_value, _dense_score_ai, _dense_final),
    "lowrank": (_lowrank_value, _lowrank_score_info, _lowrank_final),
    "eigen": (_eigen_value, _eigen_score_ai, _eigen_final),
}


def _fit_one(y, s_starts, design, *, structure: str, max_iter: int, tol: float,
             nonneg: bool = False, discrete: bool = False) -> Fit:  # fmt: skip
    """Fisher scoring (dense and eigen: with the average information) from the most likely of
    the start values s_starts (n_starts, k); under nonneg projected Newton
    (optimize.fisher_scoring with bounds) in the coordinates of `constrained_coordinates`, the
    starts projected onto them. y and design as the structure's functions take them (eigen:
    rotated, `rotate`)."""
    value, score_info, final = STRUCTURES[structure]
    value_, score_info_ = partial(value, y=y, **design), partial(score_info, y=y, **design)
    B, lower = constrained_coordinates(design, nonneg, discrete)
    if B is not None:
        value_, score_info_ = _in_coordinates(value_, score_info_, B)
        s_starts = s_starts @ np.linalg.inv(B).T
    s_starts = project(s_starts, lower)
    # one start at a time (lax.map): XLA's CPU runtime can deadlock when two large LAPACK
    # factorisations are scheduled concurrently
    states = jax.lax.map(partial(init_state, value_), s_starts)
    best = jnp.argmin(jnp.where(jnp.isnan(states.nll), jnp.inf, states.nll))
    state = jax.tree.map(lambda a: a[best], states)
    state = fisher_scoring(
        value_, lambda t: Point(*score_info_(t)), state, jnp.asarray(max_iter),
        tol=tol, boundary_cond=BOUNDARY_COND, lower=lower,
    )  # fmt: skip
    sig2s = state.theta if B is None else B @ state.theta
    score, info, beta, beta_cov = final(sig2s, y=y, **design)
    return Fit(sig2s, jnp.linalg.inv(info), beta, beta_cov, state.nll, score,
               state.n_iter, state.status)  # fmt: skip


def rotate(y, design: dict, structure: str):
    """(y, design) as the structure's per-trait functions take them: for "eigen" the traits
    rotated to K's eigenbasis, y (T, N) -> y Q (each row Q^T y), and Q dropped from the
    design; unchanged otherwise."""
    if structure != "eigen":
        return y, design
    design = dict(design)
    return y @ design.pop("Q"), design


@partial(jax.jit, static_argnames=("structure", "max_iter", "tol", "batch", "nonneg",
                                   "discrete"))  # fmt: skip
def fit_chunk(y, starts, design, *, structure, max_iter, tol, batch=None, nonneg=False,
              discrete=False) -> Fit:  # fmt: skip
    """REML for traits y (T, N) from start values starts (n_starts, T, k): `batch` traits at a
    time are vmapped (None: one at a time; a dense trait is O(N^3) work, which a CPU runs best
    as plain matrix products, while a GPU gains from batching; an eigen trait is O(N p^2) per
    iteration, too little work to run alone)."""
    y, design = rotate(y, design, structure)
    batch = None if batch is None else min(batch, y.shape[0])
    one = partial(_fit_one, design=design, structure=structure, max_iter=max_iter, tol=tol,
                  nonneg=nonneg, discrete=discrete)  # fmt: skip
    return jax.lax.map(lambda a: one(*a), (y, jnp.swapaxes(starts, 0, 1)), batch_size=batch)


def nll(s, y, design: dict, structure: str) -> jax.Array:
    """REML negative log-likelihood of one trait y (N,) at sig2s s (for tests and profiles)."""
    y, design = rotate(y, design, structure)
    return STRUCTURES[structure][0](s, y=y, **design)[0]


def moments(s, y, design: dict, structure: str):
    """(score, average information, expected information) of one trait y (N,) at sig2s s
    (for tests): every structure's, in sig2s order."""
    y, design = rotate(y, design, structure)
    _, score_info, final = STRUCTURES[structure]
    return score_info(s, y=y, **design)[:2] + final(s, y=y, **design)[1:2]


def design_of(inputs, eigen: bool = False) -> tuple[dict, str]:
    """Device arrays shared by the traits and their structure: "lowrank" with genotypes,
    "eigen" when asked for and exact (`eigen_exact`: gtype = etype = 'hom' with dense K),
    "dense" otherwise."""
    X, noise = jnp.asarray(inputs.X), jnp.asarray(inputs.noise)
    if inputs.K is None:
        U, groups = jnp.asarray(inputs.U), jnp.asarray(inputs.groups)
        return dict(X=X, U=U, groups=groups, noise=noise), "lowrank"
    if eigen and eigen_exact(inputs):
        return eigen_design(inputs), "eigen"
    return dict(X=X, K=jnp.asarray(inputs.K), noise=noise), "dense"
