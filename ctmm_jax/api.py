"""`fit`: validate -> block form -> chunk and pad genes -> jit(vmap(per-gene fit)) -> table."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import likelihood, models
from .data import CTPData, OPData
from .likelihood import GeneData
from .optimize import MAX_HALVINGS, OptState, Status, fisher_scoring, init_state
from .results import FitResult

METHODS = ("ml", "reml")
INFORMATION = ("expected", "observed")
BOUNDARY_COND = 1e6  # a fit that stops with cond above this is reported as on the boundary


class GeneFit(NamedTuple):
    """Per-gene estimates at the optimum; `vmap` adds a leading gene axis to every field."""

    phi: jax.Array  # (n_var,) natural variance parameters
    var_cov: jax.Array  # (n_var, n_var) inverse information of phi
    beta: jax.Array  # (p,)
    beta_cov: jax.Array  # (p, p) (X^T Sigma^-1 X)^-1
    cond: jax.Array  # () conditioning of Sigma (likelihood.factor)


class Blocks(NamedTuple):
    """Host arrays of the block form (see likelihood.GeneData); y and noise carry a gene axis."""

    y: np.ndarray  # (G, N, b)
    noise: np.ndarray  # (G, N, b)
    X: np.ndarray  # (N, b, p)
    E: np.ndarray  # (n_var, N or 1, b, b)


def to_blocks(data: CTPData | OPData, model: str) -> Blocks:
    """CTP: N blocks of C values, X_i = I_C, kernels E_k. OP: N scalars, X_i = P_i^T,
    kernels P_i^T E_k P_i."""
    G, N, C = data.shape
    E = models.kernels(model, C)
    if isinstance(data, CTPData):
        return Blocks(data.Y, data.ctnu, np.broadcast_to(np.eye(C), (N, C, C)), E[:, None])
    E_op = np.einsum("kcd,nc,nd->kn", E, data.P, data.P)[:, :, None, None]
    return Blocks(data.y[..., None], data.nu[..., None], data.P[:, None, :], E_op)


def residual_variance(d: GeneData) -> jax.Array:
    """s = mean squared OLS residual of y on X (the original CTMM's start-value scale)."""
    XtX = jnp.einsum("nbp,nbq->pq", d.X, d.X)
    beta = jnp.linalg.solve(XtX, jnp.einsum("nbp,nb->p", d.X, d.y))
    return jnp.mean((d.y - jnp.einsum("nbp,p->nb", d.X, beta)) ** 2)


def start_values(d: GeneData, model: str, C: int) -> jax.Array:
    """Natural start values as the original CTMM: hom2 and every V parameter s / 2 (hom:
    hom2 = s; full: V = s I), s = residual_variance. Positive definite whenever s > 0."""
    s = residual_variance(d)
    if model == "hom":
        return s[None]
    if model == "full":
        return s * jnp.eye(C)[np.triu_indices(C)]
    return jnp.full(models.n_var(model, C), s / 2)


class Objective(NamedTuple):
    """One gene's objective in the optimizer's coordinates theta."""

    to_natural: Callable[[jax.Array], jax.Array]
    value: Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # theta -> (nll, cond)
    score_info: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def objective(d: GeneData, *, model: str, C: int, reml: bool, nonneg: bool) -> Objective:
    to_nat = partial(models.to_natural, model=model, C=C, nonneg=nonneg)

    def value(theta):
        f = likelihood.factor(to_nat(theta), d, reml)
        return f.nll, f.cond

    def score_info(theta):
        m = likelihood.moments(to_nat(theta), d, reml)
        if not nonneg:  # static: theta = phi
            return m.score, m.info, m.hess
        J, curv = jax.jacfwd(to_nat)(theta), jax.hessian(to_nat)(theta)
        hess = J.T @ m.hess @ J + jnp.einsum("k,kij->ij", m.score, curv)
        return J.T @ m.score, J.T @ m.info @ J, hess

    return Objective(to_nat, value, score_info)


def _init_gene(y, noise, X, E, *, model, C, reml, nonneg) -> OptState:
    d = GeneData(y, noise, X, E)
    obj = objective(d, model=model, C=C, reml=reml, nonneg=nonneg)
    s = init_state(obj.value, models.from_natural(start_values(d, model, C), model, C, nonneg))
    constant = residual_variance(d) <= 1e-24 * jnp.mean(d.y**2)
    return s._replace(status=jnp.where(constant, Status.NO_VARIATION, s.status))


def _advance_gene(
    state, until, y, noise, X, E, *, model, C, reml, nonneg, tol, max_halvings
) -> OptState:
    obj = objective(GeneData(y, noise, X, E), model=model, C=C, reml=reml, nonneg=nonneg)
    state = state._replace(status=jnp.where(state.status == Status.STALLED, Status.RUNNING, state.status))
    return fisher_scoring(
        obj.value, obj.score_info, state, until,
        tol=tol, boundary_cond=BOUNDARY_COND, max_halvings=max_halvings,
    )  # fmt: skip


def _finish_gene(theta, y, noise, X, E, *, model, C, reml, nonneg, observed) -> GeneFit:
    d = GeneData(y, noise, X, E)
    phi = models.to_natural(theta, model, C, nonneg)
    m = likelihood.moments(phi, d, reml)
    info = jax.hessian(likelihood.nll)(phi, d, reml) if observed else m.info
    return GeneFit(phi, jnp.linalg.inv(info), m.beta, m.beta_cov, m.cond)


_KEYS = ("model", "C", "reml", "nonneg")


@partial(jax.jit, static_argnames=_KEYS)
def init_chunk(y, noise, X, E, **keys) -> OptState:
    """Start states of a batch: y, noise (G, N, b); X, E shared."""
    return jax.vmap(partial(_init_gene, X=X, E=E, **keys))(y, noise)


@partial(jax.jit, static_argnames=_KEYS + ("tol", "max_halvings"))
def advance_chunk(state, until, y, noise, X, E, **keys) -> OptState:
    """Continue a batch of states until each is done or has n_iter == until (G,)."""
    return jax.vmap(partial(_advance_gene, X=X, E=E, **keys))(state, until, y, noise)


@partial(jax.jit, static_argnames=_KEYS + ("observed",))
def finish_chunk(theta, y, noise, X, E, **keys) -> GeneFit:
    """Estimates, information and GLS at the final theta of a batch."""
    return jax.vmap(partial(_finish_gene, X=X, E=E, **keys))(theta, y, noise)


ROUND_ITERS = 8  # iterations per round before the genes still running are regrouped
BIG_BATCH_HALVINGS = 3  # step halvings per iteration allowed in full-size batches


def _batches(idx: np.ndarray, size: int):
    """Split gene indices into batches of exactly `size`, padding the last with its first."""
    for start in range(0, len(idx), size):
        part = idx[start : start + size]
        yield part, np.concatenate([part, np.full(size - len(part), part[0])])


def run_fits(blocks: Blocks, *, model, C, reml, nonneg, observed, max_iter, tol, chunk_size):
    """Fit every gene of `blocks`: rounds of ROUND_ITERS iterations, each round on the genes
    still running, regrouped into batches of `chunk_size` (or chunk_size // 16 once few are
    left: two compiled batch shapes). Full-size batches allow BIG_BATCH_HALVINGS step
    halvings; genes that need more (STALLED) continue in small batches with the full budget.
    Returns (GeneFit, OptState) with a leading gene axis."""
    G = blocks.y.shape[0]
    keys = dict(model=model, C=C, reml=reml, nonneg=nonneg)
    X, E = jnp.asarray(blocks.X), jnp.asarray(blocks.E)
    size = min(chunk_size, G)
    small = max(size // 16, 1)

    def data(i):
        return jnp.asarray(blocks.y[i]), jnp.asarray(blocks.noise[i])

    parts = [(part, init_chunk(*data(pad), X, E, **keys)) for part, pad in _batches(np.arange(G), size)]
    state = _gather(parts, G)
    while True:
        active = np.isin(state.status, (Status.RUNNING, Status.STALLED)) & (state.n_iter < max_iter)
        stalled = np.flatnonzero(active & (state.status == Status.STALLED))
        running = np.flatnonzero(active & (state.status == Status.RUNNING))
        if len(running) + len(stalled) == 0:
            break
        big = len(running) > small
        groups = [(running, size, BIG_BATCH_HALVINGS), (stalled, small, MAX_HALVINGS)] if big else [
            (np.concatenate([running, stalled]), small, MAX_HALVINGS)]  # fmt: skip
        parts = []
        for idx, bsize, halvings in groups:
            for part, pad in _batches(idx, bsize):
                s = jax.tree.map(lambda a, pad=pad: jnp.asarray(a[pad]), state)
                until = jnp.minimum(s.n_iter + ROUND_ITERS, max_iter)
                parts.append((part, advance_chunk(
                    s, until, *data(pad), X, E, **keys, tol=tol, max_halvings=halvings)))  # fmt: skip
        state = _scatter(state, parts)
    state = state._replace(
        status=np.where(
            np.isin(state.status, (Status.RUNNING, Status.STALLED)), Status.MAX_ITER, state.status
        )
    )
    parts = [
        (part, finish_chunk(jnp.asarray(state.theta[pad]), *data(pad), X, E, **keys, observed=observed))
        for part, pad in _batches(np.arange(G), size)
    ]
    return _gather(parts, G), state


def _gather(parts, G):
    """[(indices, batched pytree)] -> one host pytree over all G genes."""
    first = jax.tree.map(np.asarray, parts[0][1])
    out = jax.tree.map(lambda a: np.empty((G,) + a.shape[1:], a.dtype), first)
    return _scatter(out, parts)


def _scatter(out, parts):
    for part, res in parts:
        for dst, src in zip(out, res, strict=True):
            dst[part] = np.asarray(src)[: len(part)]
    return out


def _check_design(X: np.ndarray, n_var: int, name: str) -> None:
    N, b, p = X.shape
    n_par = n_var + p
    if N <= n_par:
        raise ValueError(
            f"{name}: {N} donors but the model has n_par = {n_par} parameters "
            f"({n_var} variance + {p} fixed); need more donors than parameters (df = N - n_par)."
        )
    rank = np.linalg.matrix_rank(X.reshape(N * b, p))
    if rank < p:
        raise ValueError(
            f"{name}: the fixed-effect design has rank {rank} < {p} columns; for OP this means "
            "P has linearly dependent columns (e.g. a cell type with zero proportion in every "
            "donor): drop such cell types."
        )


def fit(
    data: CTPData | OPData,
    model: str = "free",
    method: str = "reml",
    *,
    information: str = "expected",
    nonneg: bool = False,
    chunk_size: int = 256,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> FitResult:
    """Fit CTMM to every gene of `data` (batched with `jax.vmap`, in chunks of genes).

    Args:
        data: CTPData (CTP fit) or OPData (OP fit).
        model: "hom", "iid", "free" or "full" (models.py).
        method: "ml" or "reml"; fixed effects are profiled out by GLS.
        information: "expected" (Fisher; as the original CTMM) or "observed" (autodiff Hessian
            of the NLL) for the standard errors and Wald tests.
        nonneg: constrain variances to be >= 0 (softplus; full V = L L^T). By default any
            value is allowed while every donor's covariance is positive definite.
        chunk_size: genes per compiled batch; the last chunk is padded so each shape compiles
            once.
        max_iter, tol: Fisher scoring stops when the score test statistic g^T I^-1 g < tol.

    Returns:
        FitResult; `.table` has one row per gene.
    """
    if not isinstance(data, CTPData | OPData):
        raise ValueError(f"data: expected CTPData or OPData, got {type(data).__name__}.")
    models.check_model(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if information not in INFORMATION:
        raise ValueError(f"information={information!r}: use 'expected' or 'observed'.")
    if int(chunk_size) < 1 or int(max_iter) < 1 or not tol > 0:
        raise ValueError("chunk_size and max_iter must be >= 1 and tol > 0.")
    if not jax.config.jax_enable_x64:
        raise ValueError("jax_enable_x64 is off; ctmm_jax needs float64 (importing it turns it on).")
    G, N, C = data.shape
    blocks = to_blocks(data, model)
    n_var = models.n_var(model, C)
    _check_design(blocks.X, n_var, "CTP design" if isinstance(data, CTPData) else "OP design (P)")

    fits, state = run_fits(
        blocks, model=model, C=C, reml=method == "reml", nonneg=bool(nonneg),
        observed=information == "observed", max_iter=int(max_iter), tol=float(tol),
        chunk_size=int(chunk_size),
    )  # fmt: skip
    # a fit that did not converge and ended close to singular is reported as on the boundary
    status = np.where(
        (state.status != Status.OK) & (fits.cond > BOUNDARY_COND), Status.BOUNDARY, state.status
    )
    n_par = n_var + blocks.X.shape[-1]
    return FitResult.build(
        data, model, method, information, fits, -state.nll, state.n_iter, status, n_par
    )
