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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import linalg
from .status import Status


class OptState(NamedTuple):
    theta: jax.Array  # (n,)
    nll: jax.Array  # ()
    dec: jax.Array  # () last score test statistic g^T I^-1 g
    n_iter: jax.Array  # () int
    status: jax.Array  # () int, Status


MAX_HALVINGS = 40
NEWTON_DEC = 1.0


def _direction(g: jax.Array, info: jax.Array) -> jax.Array:
    """I^-1 g via Cholesky; NaN when I is not positive definite."""
    L = linalg.cholesky(info)
    z = linalg.solve_lower(L, g[:, None])
    return linalg.solve_lower(L, z, transpose=True)[:, 0]


def init_state(value: Callable, theta0: jax.Array) -> OptState:
    """Optimizer state at the start values; INFEASIBLE_START if they are outside the region."""
    f0, _ = value(theta0)
    status = jnp.where(jnp.isfinite(f0), Status.RUNNING, Status.INFEASIBLE_START)
    return OptState(theta0, f0, jnp.asarray(jnp.inf), jnp.asarray(0), status)


def fisher_scoring(
    value: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    score_info: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
    state: OptState,
    until: jax.Array,
    *,
    tol: float,
    boundary_cond: float,
    max_halvings: jax.Array | int = MAX_HALVINGS,
) -> OptState:
    """Iterate from `state` while it is RUNNING and n_iter < until.

    value(theta) -> (nll, cond): nll is +inf outside the feasible region and cond measures how
    close the covariance is to singular; score_info(theta) -> (gradient, expected information,
    Hessian) in theta coordinates. The step is Newton's where the Hessian is positive definite
    and the score test statistic is below NEWTON_DEC (quadratic convergence near the optimum),
    Fisher scoring's otherwise (always a descent direction). A gene whose accepted step had to
    be halved at least 8 times while cond > boundary_cond is heading into the boundary: it
    stops with Status.BOUNDARY instead of crawling there. A gene still RUNNING on return has
    used its iterations; the caller continues it or marks it MAX_ITER. Under vmap every
    halving costs the whole batch an NLL evaluation, so large batches use a small
    `max_halvings`: a gene that finds no decrease within it returns STALLED (theta unchanged)
    for the caller to continue in a small batch with the full MAX_HALVINGS.
    """

    def step(s: OptState) -> OptState:
        g, info, hess = score_info(s.theta)
        d_fisher = _direction(g, info)
        dec = g @ d_fisher
        d_newton = _direction(g, hess)
        use_newton = (dec < NEWTON_DEC) & jnp.all(jnp.isfinite(d_newton))
        d = jnp.where(use_newton, d_newton, d_fisher)
        converged = dec < tol
        singular = ~jnp.isfinite(dec)

        def halve(c):
            a = c[0] / 2
            return (a, *value(s.theta - a * d))

        def worse(c):
            a, f, _ = c
            return ~(f <= s.nll) & (a > 2.0 ** -jnp.asarray(max_halvings, a.dtype))

        a, f, cond = lax.while_loop(worse, halve, (jnp.ones(()), *value(s.theta - d)))
        accept = (f <= s.nll) & ~converged & ~singular
        walled = accept & (a <= 2.0**-8) & (cond > boundary_cond)
        no_descent = jnp.where(max_halvings >= MAX_HALVINGS, Status.NO_DESCENT, Status.STALLED)
        status = jnp.select(
            [converged, singular, ~accept, walled],
            [Status.OK, Status.SINGULAR_INFO, no_descent, Status.BOUNDARY],
            Status.RUNNING,
        )
        return OptState(
            theta=jnp.where(accept, s.theta - a * d, s.theta),
            nll=jnp.where(accept, f, s.nll),
            dec=dec,
            n_iter=s.n_iter + jnp.where(accept, 1, 0),
            status=status,
        )

    return lax.while_loop(lambda s: (s.status == Status.RUNNING) & (s.n_iter < until), step, state)
