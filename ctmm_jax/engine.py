"""Batched fitting across genes: jit(vmap(per-gene optimizer)) over batches of genes.

Genes run in batches of `chunk_size` (the last padded with copies, so each shape compiles
once). Under vmap a batch iterates until its slowest gene is done, so the engine runs rounds
of ROUND_ITERS iterations and regroups the genes still running into smaller batches: the cost
follows the total number of gene-iterations, not the slowest gene.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import likelihood, models
from .likelihood import GeneData
from .optimize import MAX_HALVINGS, OptState, Status, fisher_scoring, init_state
from .structure import Blocks, Design, residual_variance, start_values

BOUNDARY_COND = 1e6  # a fit that stops with cond above this is reported as on the boundary


class GeneFit(NamedTuple):
    """Per-gene estimates at the optimum; `vmap` adds a leading gene axis to every field."""

    phi: jax.Array  # (n_var,) natural variance parameters
    var_cov: jax.Array  # (n_var, n_var) inverse information of phi
    beta: jax.Array  # (p,)
    beta_cov: jax.Array  # (p, p) (X^T Sigma^-1 X)^-1
    cond: jax.Array  # () conditioning of Sigma (likelihood.factor)


class Objective(NamedTuple):
    """One gene's objective in the optimizer's coordinates theta."""

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

    return Objective(value, score_info)


def _gene(y, noise, mask, design: Design) -> GeneData:
    return GeneData(y, noise, design.X, design.E, mask, design.F, design.U, design.groups)


def _init_gene(y, noise, mask, theta0, design, *, model, C, reml, nonneg) -> OptState:
    """Start state: the moment start values (structure.start_values), or theta0 when given
    and its NLL is lower (an infeasible or NaN theta0 never wins)."""
    d = _gene(y, noise, mask, design)
    obj = objective(d, model=model, C=C, reml=reml, nonneg=nonneg)
    start = models.from_natural(start_values(d, model, C), model, C, nonneg)
    if theta0 is None:
        s = init_state(obj.value, start)
    else:  # one after the other (lax.map): XLA's CPU runtime can deadlock when two large
        # LAPACK factorisations (many random-covariate columns) are scheduled concurrently
        both = jax.lax.map(partial(init_state, obj.value), jnp.stack([start, theta0]))
        s = jax.tree.map(lambda a: jnp.where(both.nll[1] < both.nll[0], a[1], a[0]), both)
    y_obs = likelihood.observed(d).y
    constant = residual_variance(d) <= 1e-24 * jnp.sum(y_obs**2) / likelihood.n_observed(d)
    return s._replace(status=jnp.where(constant, Status.NO_VARIATION, s.status))


def _advance_gene(
    state, until, y, noise, mask, design, *, model, C, reml, nonneg, tol, max_halvings
) -> OptState:
    obj = objective(_gene(y, noise, mask, design), model=model, C=C, reml=reml, nonneg=nonneg)
    state = state._replace(
        status=jnp.where(state.status == Status.STALLED, Status.RUNNING, state.status)
    )
    return fisher_scoring(
        obj.value, obj.score_info, state, until,
        tol=tol, boundary_cond=BOUNDARY_COND, max_halvings=max_halvings,
    )  # fmt: skip


def _finish_gene(theta, y, noise, mask, design, *, model, C, reml, nonneg, observed) -> GeneFit:
    d = _gene(y, noise, mask, design)
    phi = models.to_natural(theta, model, C, nonneg)
    m = likelihood.moments(phi, d, reml)
    info = jax.hessian(likelihood.nll)(phi, d, reml) if observed else m.info
    return GeneFit(phi, jnp.linalg.inv(info), m.beta, m.beta_cov, m.cond)


_KEYS = ("model", "C", "reml", "nonneg")


def over_genes(fn, n_args: int, design: Design):
    """vmap fn over its first n_args arguments and, when X and E carry a gene axis
    (structure.Blocks.per_gene), over those too; the rest of the design is shared."""
    per_gene = design.X.ndim == 4  # static
    axes = Design(0, 0, None, None, None) if per_gene else None
    return jax.vmap(fn, in_axes=(0,) * n_args + (axes,))


@partial(jax.jit, static_argnames=_KEYS)
def init_chunk(y, noise, mask, theta0, design, **keys) -> OptState:
    """Start states of a batch: y, noise, mask (G, N, b) (mask may be None); theta0 (G, n) or
    None; design shared (or per gene)."""
    return over_genes(partial(_init_gene, **keys), 4, design)(y, noise, mask, theta0, design)


@partial(jax.jit, static_argnames=_KEYS + ("tol", "max_halvings"))
def advance_chunk(state, until, y, noise, mask, design, **keys) -> OptState:
    """Continue a batch of states until each is done or has n_iter == until (G,)."""
    fn = over_genes(partial(_advance_gene, **keys), 5, design)
    return fn(state, until, y, noise, mask, design)


@partial(jax.jit, static_argnames=_KEYS + ("observed",))
def finish_chunk(theta, y, noise, mask, design, **keys) -> GeneFit:
    """Estimates, information and GLS at the final theta of a batch."""
    return over_genes(partial(_finish_gene, **keys), 4, design)(theta, y, noise, mask, design)


ROUND_ITERS = 8  # iterations per round before the problems still running are regrouped
BIG_BATCH_HALVINGS = 1  # step halvings per iteration allowed in full-size batches


def batches(idx: np.ndarray, size: int):
    """Split indices into batches of exactly `size`, padding the last with its first."""
    for start in range(0, len(idx), size):
        part = idx[start : start + size]
        yield part, np.concatenate([part, np.full(size - len(part), part[0])])


class Problems(NamedTuple):
    """Fits to run: gene `gene[j]` of the blocks with donor `drop[j]` removed (-1: none),
    starting from theta0[j] where it beats the moment start values (None: moment start)."""

    gene: np.ndarray  # (P,) int
    drop: np.ndarray | None = None  # (P,) int
    theta0: np.ndarray | None = None  # (P, n_var)


def run_fits(
    blocks: Blocks,
    problems: Problems | None = None,
    *,
    model,
    C,
    reml,
    nonneg,
    observed,
    max_iter,
    tol,
    chunk_size,
):
    """Run every fit of `problems` (default: each gene once): rounds of ROUND_ITERS iterations,
    each round on the fits still running, regrouped into batches of `chunk_size` (or
    chunk_size // 16 once few are left: two compiled batch shapes). Full-size batches allow
    BIG_BATCH_HALVINGS step halvings; fits that need more (STALLED) continue in small batches
    with the full budget. Returns (GeneFit, OptState) with a leading problem axis."""
    if problems is None:
        problems = Problems(np.arange(blocks.y.shape[0]))
    n_prob = len(problems.gene)
    keys = dict(model=model, C=C, reml=reml, nonneg=nonneg)
    size = min(chunk_size, n_prob)
    small = max(size // 16, 1)

    def data(i):  # y, noise, mask of problems i, then their design
        return *problem_data(blocks, problems, i), blocks.design(problems.gene[i])

    def start(i):
        return None if problems.theta0 is None else jnp.asarray(problems.theta0[i])

    parts = []
    for part, pad in batches(np.arange(n_prob), size):
        y, noise, mask, design = data(pad)
        parts.append((part, init_chunk(y, noise, mask, start(pad), design, **keys)))
    state = gather(parts, n_prob)
    while True:
        active = np.isin(state.status, (Status.RUNNING, Status.STALLED)) & (state.n_iter < max_iter)
        stalled = np.flatnonzero(active & (state.status == Status.STALLED))
        running = np.flatnonzero(active & (state.status == Status.RUNNING))
        if len(running) + len(stalled) == 0:
            break
        if len(running) > small:
            groups = [(running, size, BIG_BATCH_HALVINGS), (stalled, small, MAX_HALVINGS)]
        else:
            groups = [(np.concatenate([running, stalled]), small, MAX_HALVINGS)]
        parts = []
        for idx, bsize, halvings in groups:
            for part, pad in batches(idx, bsize):
                s = jax.tree.map(lambda a, pad=pad: jnp.asarray(a[pad]), state)
                until = jnp.minimum(s.n_iter + ROUND_ITERS, max_iter)
                out = advance_chunk(s, until, *data(pad), **keys, tol=tol, max_halvings=halvings)
                parts.append((part, out))
        state = scatter(state, parts)
    unfinished = np.isin(state.status, (Status.RUNNING, Status.STALLED))
    state = state._replace(status=np.where(unfinished, Status.MAX_ITER, state.status))
    return finish(blocks, problems, state.theta, **keys, observed=observed, chunk_size=size), state


def finish(blocks: Blocks, problems: Problems, theta: np.ndarray, *, chunk_size, **keys) -> GeneFit:
    """Estimates, information and GLS at theta (P, n_var) for every problem."""
    parts = []
    for part, pad in batches(np.arange(len(problems.gene)), chunk_size):
        design = blocks.design(problems.gene[pad])
        args = (jnp.asarray(theta[pad]), *problem_data(blocks, problems, pad), design)
        parts.append((part, finish_chunk(*args, **keys)))
    return gather(parts, len(problems.gene))


def problem_data(blocks: Blocks, problems: Problems, i: np.ndarray):
    """(y, noise, mask) of problems i: the genes' masks times the dropped donors' (None when
    nothing is missing or dropped)."""
    g = problems.gene[i]
    mask = None if blocks.mask is None else blocks.mask[g]
    if problems.drop is not None:
        N, b = blocks.y.shape[1:]
        keep = (np.arange(N)[None, :] != problems.drop[i][:, None]).astype(np.float64)
        keep = np.repeat(keep[..., None], b, axis=2)
        mask = keep if mask is None else mask * keep
    return (
        jnp.asarray(blocks.y[g]),
        jnp.asarray(blocks.noise[g]),
        None if mask is None else jnp.asarray(mask),
    )


def gather(parts, n):
    """[(indices, batched pytree)] -> one host pytree over all n problems."""
    first = jax.tree.map(np.asarray, parts[0][1])
    out = jax.tree.map(lambda a: np.empty((n,) + a.shape[1:], a.dtype), first)
    return scatter(out, parts)


def scatter(out, parts):
    for part, res in parts:
        for dst, src in zip(out, res, strict=True):
            dst[part] = np.asarray(src)[: len(part)]
    return out
