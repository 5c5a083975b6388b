"""Native REML for GxEMM, batched over traits that share X and the kernels.

Sigma(s) = sum_g s_g K_g + diag(sum_e s_e d_e) with genetic kernels K_g and diagonal noise
kernels d_e (model.py). With the REML projection P = Sigma^-1 - Sigma^-1 X A X^T Sigma^-1,
A = (X^T Sigma^-1 X)^-1:

    2 nll   = log|Sigma| + log|X^T Sigma^-1 X| + y^T P y + (N - p) log(2 pi)
    score_k = 1/2 [tr(P K_k) - y^T P K_k P y]
    AI_kl   = 1/2 y^T P K_k P K_l P y      (average information: the mean of the observed and
                                            expected information, near the optimum)
    info_kl = 1/2 tr(P K_k P K_l)          (expected information, sig2Var = info^-1)

Two structures share the core optimizer (optimize.fisher_scoring):
- dense K (N x N): an iteration costs one Cholesky and one inverse of Sigma (O(N^3)) plus
  O(k N^2); the expected information (O(k N^3)) is computed once, at the optimum.
- genotypes S (N x M): K_g = U_g U_g^T is low rank and the noise is diagonal, which is the core
  CTMM likelihood with N blocks of one value, the noise kernels as block kernels and U as
  random covariates (likelihood.py, Woodbury): O(N m^2 + m^3) per iteration, m = total rank.
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
from ..optimize import fisher_scoring, init_state, project
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
    kg = design["K"].shape[0] if "K" in design else design["groups"].shape[0]
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


def _fit_one(y, s_starts, design, *, lowrank: bool, max_iter: int, tol: float,
             nonneg: bool = False, discrete: bool = False) -> Fit:  # fmt: skip
    """Fisher scoring (dense: with the average information) from the most likely of the start
    values s_starts (n_starts, k); under nonneg projected Newton (optimize.fisher_scoring with
    bounds) in the coordinates of `constrained_coordinates`, the starts projected onto them."""
    value, score_info, final = (
        (_lowrank_value, _lowrank_score_info, _lowrank_final)
        if lowrank
        else (_dense_value, _dense_score_ai, _dense_final)
    )
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
        value_, score_info_, state, jnp.asarray(max_iter), tol=tol,
        boundary_cond=BOUNDARY_COND, lower=lower,
    )  # fmt: skip
    sig2s = state.theta if B is None else B @ state.theta
    score, info, beta, beta_cov = final(sig2s, y=y, **design)
    return Fit(sig2s, jnp.linalg.inv(info), beta, beta_cov, state.nll, score,
               state.n_iter, state.status)  # fmt: skip


@partial(jax.jit, static_argnames=("lowrank", "max_iter", "tol", "batch", "nonneg", "discrete"))
def fit_chunk(y, starts, design, *, lowrank, max_iter, tol, batch=None, nonneg=False,
              discrete=False) -> Fit:  # fmt: skip
    """REML for traits y (T, N) from start values starts (n_starts, T, k): `batch` traits at a
    time are vmapped (None: one at a time; a trait is O(N^3) dense work, which a CPU runs best
    as plain matrix products, while a GPU gains from batching)."""
    one = partial(_fit_one, design=design, lowrank=lowrank, max_iter=max_iter, tol=tol,
                  nonneg=nonneg, discrete=discrete)  # fmt: skip
    return jax.lax.map(lambda a: one(*a), (y, jnp.swapaxes(starts, 0, 1)), batch_size=batch)


def nll(s, y, design: dict, lowrank: bool) -> jax.Array:
    """REML negative log-likelihood of one trait at sig2s s (for tests and profiles)."""
    return (_lowrank_value if lowrank else _dense_value)(s, y=y, **design)[0]


def design_of(inputs) -> tuple[dict, bool]:
    """Device arrays shared by the traits, and whether the genetic kernels are low rank."""
    X, noise = jnp.asarray(inputs.X), jnp.asarray(inputs.noise)
    if inputs.K is not None:
        return dict(X=X, K=jnp.asarray(inputs.K), noise=noise), False
    return dict(X=X, U=jnp.asarray(inputs.U), groups=jnp.asarray(inputs.groups), noise=noise), True
