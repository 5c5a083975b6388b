"""optimize.fisher_scoring: skipping the steps known to be infeasible leaves the path as it is."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from helpers import gene_data, small_data

from ctmm_jax import blocks, models
from ctmm_jax.estimators import mlreml
from ctmm_jax.optimize import fisher_scoring, init_state
from ctmm_jax.status import BOUNDARY_COND, Status


@partial(jax.jit, static_argnames="skip")
def _fit(d, *, skip):
    obj = mlreml.objective(d, model="free", C=3, reml=True, nonneg=False)
    theta0 = models.from_natural(blocks.start_values(d, "free", 3), "free", 3, False)
    state = init_state(obj.value, theta0, mlreml.fit_like(theta0, d))
    return fisher_scoring(obj.value, obj.evaluate, state, jnp.asarray(200), tol=1e-10,
                          boundary_cond=BOUNDARY_COND,
                          infeasible=obj.infeasible if skip else None)  # fmt: skip


def test_skipping_known_infeasible_steps_keeps_the_path():
    """OP free REML fits, two of which crawl to the positive-definite wall (a dozen halvings
    per step near it): with the closed-form bound (Objective.infeasible) the optimizer takes
    exactly the same steps, bit for bit, as when it tries and rejects every halving."""
    data = small_data("op", G=4, N=50, seed=9)
    outcomes = []
    for g in range(4):
        d = gene_data(data, "free", g)
        assert mlreml.objective(d, model="free", C=3, reml=True, nonneg=False).infeasible
        a, b = _fit(d, skip=True), _fit(d, skip=False)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        outcomes.append(int(a.status))
    assert Status.BOUNDARY in outcomes and Status.OK in outcomes
