"""ML and REML: jit(vmap(per-gene Fisher scoring)) over batches of problems.

Batches come from batching.py (bucketed sizes, padded). Under vmap a batch iterates until its
slowest problem is done, so the fits run in rounds of ROUND_ITERS iterations, and the problems
still running are regrouped into smaller batches after each round: the cost follows the total
number of iterations, not the slowest gene. The optimizer works in unconstrained coordinates
theta; models.py maps theta -> parameters phi -> kernel weights w, and the chain rule turns
the likelihood's score and information in w into those in theta (`objective`). Each
evaluation also gives the estimates at its theta (`gene_fit`: inverse information, GLS), so
converged fits, whose last evaluation was at their estimate, keep them from the optimizer;
only the others are finished by a pass of their own (`finish_chunk`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .. import batching, checks, devices, likelihood, linalg, models, progress
from ..blocks import Blocks, Design, ols_residuals, start_values, with_cells
from ..likelihood import GeneData
from ..optimize import MAX_HALVINGS, OptState, Point, fisher_scoring, init_state
from ..status import BOUNDARY_COND, NOT_FITTED, Status
from . import Estimates, Problems, problem_data


class Objective(NamedTuple):
    """One gene's objective in the optimizer's coordinates theta."""

    value: Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # theta -> (nll, cond)
    evaluate: Callable[[jax.Array], Point]  # theta -> Point, its extra the GeneFit at theta
    # (theta, d) -> a step past which theta - a d is certainly infeasible
    # (optimize.fisher_scoring); None where that is not known in closed form
    infeasible: Callable[[jax.Array, jax.Array], jax.Array] | None = None


class GeneFit(NamedTuple):
    """Per-gene estimates at the optimum; `vmap` adds a leading gene axis to every field."""

    phi: jax.Array  # (n_var,) parameters
    var_cov: jax.Array  # (n_var, n_var) inverse information of phi
    beta: jax.Array  # (p,)
    beta_cov: jax.Array  # (p, p) (X^T Sigma^-1 X)^-1
    cond: jax.Array  # () conditioning of Sigma (likelihood.factor)


def gene_fit(phi, m: likelihood.Moments, *, model: str, C: int, info=None) -> GeneFit:
    """The estimates at parameters phi from the likelihood's moments there: the inverse of
    `info`, by default the expected information in phi (J^T I_w J with J = dw/dphi; I_w for
    linear models), and GLS."""
    if info is None and models.get(model).linear:  # static
        info = m.info
    elif info is None:
        J = jax.jacfwd(partial(models.kernel_weights, model=model, C=C))(phi)
        info = J.T @ m.info @ J
    return GeneFit(phi, linalg.spd_inverse(info), m.beta, m.beta_cov, m.cond)


def objective(d: GeneData, *, model: str, C: int, reml: bool, nonneg: bool) -> Objective:
    """NLL and Point (score, expected information, Hessian) in theta. With w(theta) the
    kernel weights (models.to_natural, then models.kernel_weights) and J = dw/dtheta:
    score = J^T s_w, info = J^T I_w J, hess = J^T H_w J + sum_k (s_w)_k d2 w_k / dtheta^2."""

    def weights(theta):
        return models.kernel_weights(models.to_natural(theta, model, C, nonneg), model, C)

    def value(theta):
        f = likelihood.factor(weights(theta), d, reml)
        return f.nll, f.cond

    def evaluate(theta):
        phi = models.to_natural(theta, model, C, nonneg)
        m = likelihood.moments(models.kernel_weights(phi, model, C), d, reml)
        fit = gene_fit(phi, m, model=model, C=C)
        if models.identity_map(model, nonneg):  # static: w = theta
            return Point(m.score, m.info, m.hess, fit)
        J, curv = jax.jacfwd(weights)(theta), jax.hessian(weights)(theta)
        hess = J.T @ m.hess @ J + jnp.einsum("k,kij->ij", m.score, curv)
        return Point(J.T @ m.score, J.T @ m.info @ J, hess, fit)

    if d.y.shape[1] == 1 and models.identity_map(model, nonneg) and not nonneg:  # static
        # OP with w = theta and unprojected steps: its scalar blocks are affine in the step
        return Objective(value, evaluate, partial(likelihood.infeasible_from, d))
    return Objective(value, evaluate)


def fit_like(theta: jax.Array, d: GeneData) -> GeneFit:
    """A GeneFit of zeros with the shapes of one at theta (optimize.init_state)."""
    n, p = theta.shape[0], d.n_fixed
    zeros = partial(jnp.zeros, dtype=theta.dtype)
    return GeneFit(zeros(n), zeros((n, n)), zeros(p), zeros((p, p)), zeros(()))


def gene_data(y, noise, mask, design: Design, model: str | None = None) -> GeneData:
    """One problem's GeneData; noise: known variances, or a likelihood.CellNoise. With `model`,
    diag_j is the model's constants (NumPy, known while tracing: rankone.only_j)."""
    diag_j = design.diag_j
    if model is not None and diag_j is not None:
        diag_j = models.diag_j_coefficients(model, y.shape[-1])
    d = GeneData(y, None, design.X, design.E, mask, design.F, design.U, design.groups, diag_j)
    return with_cells(d, noise)


def _init_gene(y, noise, mask, phi0, design, *, model, C, reml, nonneg) -> OptState:
    """Start state: the moment start values (blocks.start_values), or phi0 when given and its
    NLL is lower (an infeasible or NaN phi0 never wins). A gene that fails the checks made
    before fitting (checks.outcome: too few donors, no variation) is not iterated."""
    d = gene_data(y, noise, mask, design, model)
    obj = objective(d, model=model, C=C, reml=reml, nonneg=nonneg)
    to_theta = partial(models.from_natural, model=model, C=C, nonneg=nonneg)
    start = to_theta(start_values(d, model, C))
    init = partial(init_state, obj.value, extra=fit_like(start, d))
    if phi0 is None:
        s = init(start)
    else:  # one after the other (lax.map): XLA's CPU runtime can deadlock when two large
        # LAPACK factorisations (many random-covariate columns) are scheduled concurrently
        both = jax.lax.map(init, jnp.stack([start, to_theta(phi0)]))
        s = jax.tree.map(lambda a: jnp.where(both.nll[1] < both.nll[0], a[1], a[0]), both)
    n_s2 = 0 if d.within is None else d.within.dof.shape[1]  # identified by the cells
    n_par = start.shape[0] - n_s2 + d.n_fixed
    check = checks.outcome(likelihood.observed(d).y, ols_residuals(d), d.mask, n_par)
    return s._replace(status=jnp.where(check == Status.OK, s.status, check))


def _advance_gene(
    state, until, y, noise, mask, design, *, model, C, reml, nonneg, tol, max_halvings
) -> OptState:
    d = gene_data(y, noise, mask, design, model)
    obj = objective(d, model=model, C=C, reml=reml, nonneg=nonneg)
    lower = models.bounded(model, C, state.theta.shape[0] - models.n_var(model, C), nonneg)
    return fisher_scoring(
        obj.value, obj.evaluate, state, until,
        tol=tol, boundary_cond=BOUNDARY_COND, max_halvings=max_halvings, lower=lower,
        infeasible=obj.infeasible,
    )  # fmt: skip


def _finish_gene(theta, y, noise, mask, design, *, model, C, reml, nonneg, observed) -> GeneFit:
    """`gene_fit` at theta, with the observed information (the Hessian of the NLL in phi)
    where `observed`. Converged fits have it from their last iteration (`fit`)."""
    d = gene_data(y, noise, mask, design, model)
    phi = models.to_natural(theta, model, C, nonneg)
    weights = partial(models.kernel_weights, model=model, C=C)
    m = likelihood.moments(weights(phi), d, reml)
    info = jax.hessian(lambda p: likelihood.nll(weights(p), d, reml))(phi) if observed else None
    return gene_fit(phi, m, model=model, C=C, info=info)


def _meat_gene(phi, y, noise, mask, design, *, model, C, reml):
    """sum_i s_i s_i^T of the donors' score contributions in phi (s_i = J^T s_w,i, J = dw/dphi;
    likelihood.donor_scores) and sum_i g_i g_i^T of their GLS contributions."""
    d = gene_data(y, noise, mask, design)
    weights = partial(models.kernel_weights, model=model, C=C)
    s_w, g = likelihood.donor_scores(weights(phi), d, reml)
    s = s_w @ jax.jacfwd(weights)(phi)
    return s.T @ s, g.T @ g


def _gls_gene(w, y, noise, mask, design):
    """GLS beta, its covariance and cond at kernel weights w (ML factor: no REML term)."""
    f = likelihood.factor(w, gene_data(y, noise, mask, design), False)
    p = f.beta.shape[0]
    return f.beta, f.mme_inv[:p, :p], f.cond


_KEYS = ("model", "C", "nonneg")  # static; `reml` is traced (ML and REML share programs)


def design_axes(design: Design):
    """vmap axes of a design: X and E carry a gene axis when they differ by gene
    (blocks.Blocks.per_gene); the rest of the design is shared."""
    return Design(0, 0, None, None, None, None) if design.X.ndim == 4 else None


def over_genes(fn, n_args: int, design: Design):
    """vmap fn over its first n_args arguments and over the design's gene axes."""
    return jax.vmap(fn, in_axes=(0,) * n_args + (design_axes(design),))


@partial(jax.jit, static_argnames=_KEYS)
def init_chunk(y, noise, mask, phi0, design, **keys) -> OptState:
    """Start states of a batch: y, noise, mask (G, N, b) (mask may be None); phi0 (G, n) or
    None; design shared (or per gene)."""
    return over_genes(partial(_init_gene, **keys), 4, design)(y, noise, mask, phi0, design)


@partial(jax.jit, static_argnames=_KEYS + ("tol",))
def advance_chunk(state, until, y, noise, mask, design, max_halvings, **keys) -> OptState:
    """Continue a batch of states until each is done or has n_iter == until (G,); the step
    halving budget max_halvings is traced (one program for every budget)."""
    fn = over_genes(partial(_advance_gene, max_halvings=max_halvings, **keys), 5, design)
    return fn(state, until, y, noise, mask, design)


@partial(jax.jit, static_argnames=_KEYS + ("observed",))
def finish_chunk(theta, y, noise, mask, design, **keys) -> GeneFit:
    """Estimates, information and GLS at the final theta of a batch."""
    return over_genes(partial(_finish_gene, **keys), 4, design)(theta, y, noise, mask, design)


@partial(jax.jit, static_argnames=("model", "C", "reml"))
def meat_chunk(phi, y, noise, mask, design, **keys):
    """The sandwich's meats of a batch (`_meat_gene`) at parameters phi (G, n_var)."""
    return over_genes(partial(_meat_gene, **keys), 4, design)(phi, y, noise, mask, design)


@jax.jit
def gls_chunk(w, y, noise, mask, design):
    """GLS of a batch at kernel weights w (G, n_kernels + n_rand)."""
    return over_genes(_gls_gene, 4, design)(w, y, noise, mask, design)


# iterations per round before the problems still running are regrouped. A batch runs as long
# as its slowest problem, so a round near the typical iteration count (CTP free REML: 4-5)
# wastes less on finished ones: 6 instead of 8 cuts CTP free's wide batches by about a
# fifth; OP (rounds at width 16) and hom (3 iterations) are unchanged (benchmarks/README)
ROUND_ITERS = 6
BIG_BATCH_HALVINGS = 1  # step halvings per iteration allowed in full-size batches
SMALL_BATCH = 16  # batches up to this size are not split further; the canonical width
SETTLED = (Status.OK, Status.INFEASIBLE_START, *NOT_FITTED)  # not run again (status.NOT_FITTED)
PILOT_UNSETTLED = 0.25  # share of the first batch rerun above which all run at SMALL_BATCH


def _unsettled(status: np.ndarray) -> np.ndarray:
    return ~np.isin(status, SETTLED)


def _data(blocks: Blocks, problems: Problems, i: np.ndarray):
    """(y, noise, mask, design) of problems i."""
    return *problem_data(blocks, problems, i), blocks.design(problems.gene[i])


def gls(blocks: Blocks, problems: Problems, phi: np.ndarray, *, model: str, C: int, chunk_size):
    """(beta, beta_cov, cond) by GLS at parameters phi (P, n_var + n_rand) of every problem."""
    w = np.asarray(jax.vmap(partial(models.kernel_weights, model=model, C=C))(jnp.asarray(phi)))

    def batch(i):
        return gls_chunk(jax.device_put(w[i]), *_data(blocks, problems, i))

    idx = np.arange(len(problems.gene))
    return batching.map_batches(batch, idx, batching.bucket(len(idx), chunk_size))


def meats(blocks: Blocks, problems: Problems, phi: np.ndarray, *, model, C, reml, chunk_size):
    """(M_phi (P, n_var, n_var), M_beta (P, p, p)) of every problem at phi (`meat_chunk`)."""

    def batch(i):
        return meat_chunk(jax.device_put(phi[i]), *_data(blocks, problems, i), model=model, C=C,
                          reml=reml)  # fmt: skip

    idx = np.arange(len(problems.gene))
    return batching.map_batches(batch, idx, batching.bucket(len(idx), chunk_size))


@dataclass(frozen=True)
class MaximumLikelihood:
    """ML (reml=False) or REML by Fisher scoring (optimize.py), batched over problems."""

    model: str
    C: int
    reml: bool
    nonneg: bool = False
    observed: bool = False  # covariance from the observed (Hessian) instead of the expected
    max_iter: int = 200
    tol: float = 1e-10
    chunk_size: int = 256
    mesh: Mesh | None = None  # devices sharing each batch (devices.py); None: one device

    @property
    def _keys(self) -> dict:
        """Keyword arguments of the compiled chunk functions."""
        return dict(model=self.model, C=self.C, reml=self.reml, nonneg=self.nonneg)

    def _call(self, fn, n_per_problem: int, args: tuple, **statics):
        """fn(*args) on this estimator's devices: the first n_per_problem args and the design
        (args[n_per_problem]) carry the problem axis, any later args are shared."""
        design = args[n_per_problem]
        axes = (0,) * n_per_problem + (design_axes(design),)
        axes += (None,) * (len(args) - len(axes))
        return devices.call(fn, self.mesh, args, axes, **self._keys, **statics)

    def fit(self, blocks: Blocks, problems: Problems) -> Estimates:
        """Every fit of `problems`. Fits that end unsettled (not ok, not constant, not
        infeasible at the start: stopped at the boundary, out of iterations or step halvings)
        are run again, from their start, in batches of exactly SMALL_BATCH per device: XLA's
        arithmetic differs in the last bits between batch widths, and near the
        positive-definite wall the ill-conditioned steps amplify that to ~1e-6, so only a
        canonical width makes their reported values independent of chunk_size (converged
        fits agree to ~1e-12 whatever the width). Fits that stall in the first, wider pass
        (they need more step halvings, usually on their way to the wall) are not continued
        there but join that rerun: continued, most would only end unsettled and be run a
        third time (OP free REML, 10,000 genes: 11.2 s -> 8.4 s).

        Where many fits end unsettled (OP free: 4 in 10), that rerun costs more than the wider
        batches save. So the first batch is a pilot: if more than PILOT_UNSETTLED of its fits
        had to be rerun, all the other fits run at the canonical width from the start (OP free
        REML, 10,000 genes: 6.2-8.4 -> 3.1-4.1 s; CTP, 2% unsettled, keeps its wide batches).
        Either way no other batch shape is compiled."""
        n_prob = len(problems.gene)
        k = devices.count(self.mesh)
        wide = width = batching.bucket(-(-n_prob // k), self.chunk_size)  # per device
        runs = []  # (problems' indices, their final states)

        def run(idx, w):
            runs.append((idx, self.optimize(blocks, problems.take(idx), w, of=n_prob)))
            return runs[-1][1]

        def wide_then_canonical(idx) -> float:
            """Fits idx at `width`, the unsettled ones again at SMALL_BATCH: their share."""
            state = run(idx, width)
            redo = idx[_unsettled(state.status)] if width != SMALL_BATCH else idx[:0]
            if len(redo):  # replaces the wide run's states of these fits
                keep = ~np.isin(idx, redo)
                runs[-1] = (idx[keep], jax.tree.map(lambda a: a[keep], state))
                run(redo, SMALL_BATCH)
            return len(redo) / max(len(idx), 1)

        pilot, rest = np.split(np.arange(n_prob), [width * k])
        if wide_then_canonical(pilot) > PILOT_UNSETTLED:
            width = SMALL_BATCH  # the others at the canonical width: nothing to rerun
        if len(rest):
            wide_then_canonical(rest)
        state = batching.gather([(at, s) for at, s in runs if len(at)], n_prob)

        def finish(i):
            theta = jax.device_put(state.theta[i])
            return self._call(finish_chunk, 4, (theta, *_data(blocks, problems, i)),
                              observed=self.observed)  # fmt: skip

        # converged fits hold their estimates (optimize.OptState.extra); the others are finished,
        # the unsettled ones at the canonical width
        unsettled = _unsettled(state.status)
        carried = (state.status == Status.OK) & (not self.observed)
        groups = ((np.flatnonzero(~unsettled & ~carried), wide),
                  (np.flatnonzero(unsettled), SMALL_BATCH))  # fmt: skip
        parts = [(at, batching.map_batches(finish, at, w * k)) for at, w in groups if len(at)]
        parts.append((np.flatnonzero(carried), jax.tree.map(lambda a: a[carried], state.extra)))
        fits = batching.gather([(at, f) for at, f in parts if len(at)], n_prob)
        return Estimates(
            fits.phi, fits.var_cov, fits.beta, fits.beta_cov, -state.nll, state.n_iter,
            state.status, fits.cond,
        )  # fmt: skip

    def optimize(self, blocks: Blocks, problems: Problems, width: int, of: int | None = None
                 ) -> OptState:  # fmt: skip
        """Every fit of `problems`: rounds of ROUND_ITERS iterations, each round on the fits
        still running, regrouped into batches of `width` per device (or a sixteenth of it once
        few are left: two compiled batch shapes). Where `width` is above SMALL_BATCH, the
        full-size batches allow BIG_BATCH_HALVINGS step halvings and the fits that need more
        end STALLED, for `fit` to rerun; every other batch has the full budget, so no fit
        stalls there.
        Progress is reported as a share of `of` problems (default: these), counting a fit
        once: where `fit` reruns the unsettled ones (width not SMALL_BATCH), only settled fits
        count here. Returns the final optimizer states (host arrays)."""
        n_prob = len(problems.gene)
        k = devices.count(self.mesh)
        size = width * k
        small = k * (width if width <= SMALL_BATCH else width // 16)  # few left: one shape

        def init(i):
            phi0 = None if problems.phi0 is None else jax.device_put(problems.phi0[i])
            y, noise, mask, design = _data(blocks, problems, i)
            return self._call(init_chunk, 4, (y, noise, mask, phi0, design))

        state = batching.map_batches(init, np.arange(n_prob), size)
        reported = 0
        while True:
            active = (state.status == Status.RUNNING) & (state.n_iter < self.max_iter)
            done = ~_unsettled(state.status) if width != SMALL_BATCH else ~active
            progress.report(int(done.sum()) - reported, of or n_prob)
            reported = int(done.sum())
            running = np.flatnonzero(active)
            if not len(running):
                return state
            if len(running) > small:  # full-size batches, wider ones with a small budget
                bsize, halvings = size, BIG_BATCH_HALVINGS if size > small else MAX_HALVINGS
            else:
                bsize, halvings = small, MAX_HALVINGS
            parts = []
            for part, pad in batching.batches(running, bsize):
                s = jax.tree.map(lambda a, pad=pad: jax.device_put(a[pad]), state)
                until = jax.device_put(np.minimum(state.n_iter[pad] + ROUND_ITERS, self.max_iter))
                args = (s, until, *_data(blocks, problems, pad), jnp.asarray(halvings))
                parts.append((part, self._call(advance_chunk, 5, args, tol=self.tol)))
            state = batching.scatter(state, parts)
