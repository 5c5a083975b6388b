"""Per-gene Fisher scoring with step halving; vmapped over genes by the caller.

One iteration at theta: score g and expected information I (chain rule from the natural
parameters, likelihood.moments), direction d = I^-1 g, decrement dec = g^T d (the score test
statistic: scale free, and about twice the log-likelihood still to gain). The step theta - a d
starts at a = 1 and is halved until the NLL decreases; +inf (covariance not positive definite
or past the conditioning bound) counts as no decrease. A gene is converged when dec < tol.
Under `vmap` the while loops run until every gene of the batch is done (finished genes are
frozen by the batched predicate, so each gene converges on its own), so the caller runs a few
iterations at a time and regroups the genes still running into smaller batches
(estimators/mlreml.py): the cost follows the total number of gene-iterations, not the slowest
gene. The outcome is a status.Status code; status.decide makes it the gene's final status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import linalg
from .status import Status


class Point(NamedTuple):
    """The objective's derivatives at one theta, and `extra`: any pytree the caller wants at
    the final estimate, computed with them (estimators/mlreml.py: the estimates and their
    covariance, so that converged fits need no pass after the optimizer)."""

    score: jax.Array  # (n,) gradient of the NLL
    info: jax.Array  # (n, n) expected information
    hess: jax.Array  # (n, n) Hessian of the NLL
    extra: Any = ()


class OptState(NamedTuple):
    theta: jax.Array  # (n,)
    nll: jax.Array  # ()
    dec: jax.Array  # () last score test statistic g^T I^-1 g
    n_iter: jax.Array  # () int
    status: jax.Array  # () int, Status
    extra: Any = ()  # Point.extra of the last evaluation: at theta where status is OK


MAX_HALVINGS = 40
NEWTON_DEC = 1.0


def _direction(g: jax.Array, info: jax.Array, free: jax.Array | None = None) -> jax.Array:
    """I^-1 g via Cholesky, for one I (n, n) or a stack (..., n, n); NaN where I is not
    positive definite. With `free` (n,) bool, the reduced system I_FF d_F = g_F on the free
    coordinates, d = 0 on the others."""
    if free is not None:
        both = free[:, None] & free[None, :]
        info, g = jnp.where(both, info, jnp.eye(g.shape[0])), jnp.where(free, g, 0.0)
    L = linalg.cholesky(info)
    z = linalg.solve_lower(L, g[:, None])
    return linalg.solve_lower(L, z, transpose=True)[..., 0]


def free_set(theta, g, info, lower) -> jax.Array:
    """The coordinates a bound-constrained step moves (KKT active set, Bertsekas' projected
    Newton): all but those at their bound 0 whose descent direction points out of the box,
    first by the gradient (g_k > 0), then by the reduced direction (d_k > 0)."""
    at_bound = lower & (theta <= 0)
    free = ~(at_bound & (g > 0))
    return free & ~(at_bound & (_direction(g, info, free) > 0))


def project(theta: jax.Array, lower: jax.Array | None) -> jax.Array:
    """theta with the `lower`-bounded coordinates clipped at 0."""
    return theta if lower is None else jnp.where(lower, jnp.maximum(theta, 0.0), theta)


def init_state(value: Callable, theta0: jax.Array, extra: Any = ()) -> OptState:
    """Optimizer state at the start values; INFEASIBLE_START if they are outside the region.
    `extra`: a pytree of the shapes of the evaluations' Point.extra (its values unused)."""
    f0, _ = value(theta0)
    status = jnp.where(jnp.isfinite(f0), Status.RUNNING, Status.INFEASIBLE_START)
    return OptState(theta0, f0, jnp.asarray(jnp.inf), jnp.asarray(0), status, extra)


def fisher_scoring(
    value: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    evaluate: Callable[[jax.Array], Point],
    state: OptState,
    until: jax.Array,
    *,
    tol: float,
    boundary_cond: float,
    max_halvings: jax.Array | int = MAX_HALVINGS,
    lower: np.ndarray | None = None,
    infeasible: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> OptState:
    """Iterate from `state` while it is RUNNING and n_iter < until.

    value(theta) -> (nll, cond): nll is +inf outside the feasible region and cond measures how
    close the covariance is to singular; evaluate(theta) -> Point, the gradient, expected
    information and Hessian in theta coordinates. The step is Newton's where the Hessian is
    positive definite and the score test statistic is below NEWTON_DEC (quadratic convergence
    near the optimum), Fisher scoring's otherwise (always a descent direction). A gene whose
    accepted step had to be halved at least 8 times while cond > boundary_cond is heading into
    the boundary: it stops with Status.BOUNDARY instead of crawling there. A gene still
    RUNNING on return has used its iterations; the caller continues it or marks it MAX_ITER.
    Under vmap every halving costs the whole batch an NLL evaluation, so large batches use a
    small `max_halvings`: a gene that finds no decrease within it returns STALLED (theta
    unchanged) for the caller to run again in a small batch with the full MAX_HALVINGS.

    A converged gene (status OK) is one whose last evaluation, at its final theta, had
    dec < tol: its state keeps that evaluation's `extra` (Point.extra), so the caller needs no
    pass after the fit to have what it wants at the estimate.

    `lower` (n,) bool marks coordinates bounded below by 0 (nonneg variances). Then the step
    is projected Newton: the directions solve the reduced systems on the free set
    (`free_set`), the trial points are projected onto the box (theta - a d clipped at 0), and
    dec is the score test statistic over the free coordinates, so a variance at 0 whose score
    points outward is a KKT optimum: converged, with an estimate exactly 0.

    `infeasible(theta, d)` (without `lower`), when given, is a step beyond which the trials
    theta - a d are certainly outside the region (value +inf), found without evaluating them:
    the halving starts at the first step a = 2^-j below it. The trials skipped are ones it
    would have rejected, so the path is the same, with fewer NLL evaluations (a fit crawling
    towards the wall needs up to a dozen halvings per iteration; under vmap each costs its
    whole batch).
    """
    bounded = lower is not None
    if bounded and infeasible is not None:
        raise ValueError("fisher_scoring: `infeasible` holds for unprojected steps only")

    def step(s: OptState) -> OptState:
        p = evaluate(s.theta)
        g, info, hess = p.score, p.info, p.hess
        free = free_set(s.theta, g, info, jnp.asarray(lower)) if bounded else None
        d_fisher, d_newton = _direction(g, jnp.stack([info, hess]), free)  # one factorisation
        dec = g @ d_fisher
        use_newton = (dec < NEWTON_DEC) & jnp.all(jnp.isfinite(d_newton))
        d = jnp.where(use_newton, d_newton, d_fisher)
        converged = dec < tol
        singular = ~jnp.isfinite(dec)
        # under vmap the halving loop runs for the whole batch: a gene that is done, or has
        # no step to take, must not keep it going (a converged gene finds no decrease within
        # rounding and would halve max_halvings times)
        go = (s.status == Status.RUNNING) & (s.n_iter < until) & ~converged & ~singular

        def halve(c):
            a = c[0] / 2
            return (a, *value(project(s.theta - a * d, lower)))

        budget = jnp.asarray(max_halvings, d.dtype)

        def worse(c):
            a, f, _ = c
            return go & ~(f <= s.nll) & (a > 2.0**-budget)

        if infeasible is None:  # static
            a0 = jnp.ones(())
        else:  # the largest 2^-j not known to be infeasible, within the halving budget
            wall = infeasible(s.theta, d)
            skip = jnp.where(wall > 0, jnp.ceil(-jnp.log2(wall * (1.0 - 1e-12))), 0.0)
            a0 = 2.0 ** -jnp.clip(skip, 0, budget)
        first = (a0, *value(project(s.theta - a0 * d, lower)))
        a, f, cond = lax.while_loop(worse, halve, first)
        accept = (f <= s.nll) & ~converged & ~singular
        walled = accept & (a <= 2.0**-8) & (cond > boundary_cond)
        no_descent = jnp.where(max_halvings >= MAX_HALVINGS, Status.NO_DESCENT, Status.STALLED)
        status = jnp.select(
            [converged, singular, ~accept, walled],
            [Status.OK, Status.SINGULAR_INFO, no_descent, Status.BOUNDARY],
            Status.RUNNING,
        )
        return OptState(
            theta=jnp.where(accept, project(s.theta - a * d, lower), s.theta),
            nll=jnp.where(accept, f, s.nll),
            dec=dec,
            n_iter=s.n_iter + jnp.where(accept, 1, 0),
            status=status,
            extra=p.extra,
        )

    return lax.while_loop(lambda s: (s.status == Status.RUNNING) & (s.n_iter < until), step, state)
