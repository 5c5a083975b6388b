"""Per-gene checks made before any fit, shared by every estimator (ML, REML, HE) and GxEMM.

A gene (or a jackknife replicate, or a GxEMM trait) that fails one is not fitted: it gets a
status (status.py) and no estimates or p values. The checks are written once, in jax.numpy
(they run inside the estimators' compiled programs, per problem; GxEMM calls them on host
arrays), so that no estimator can call a gene ok that another refuses:

- too few donors: the donors with an observed value must exceed the number of parameters
  n_par (variances + fixed effects), else df = N_g - n_par < 1 (`Status.TOO_FEW_DONORS`);
- no variation after the fixed effects: the OLS residuals of the observed values on the
  fixed effects hold at most VARIATION_RTOL of their sum of squares, i.e. only rounding
  noise (a constant gene, or one equal to its cell-type means) (`Status.NO_VARIATION`).

That the fixed effects are identified from the observed values is checked on the host
(api._unidentified, `Status.NOT_IDENTIFIED`); status.decide orders the three.
"""

from __future__ import annotations

import jax.numpy as jnp

from .status import Status

# residual sum of squares <= VARIATION_RTOL * sum of squares of y: nothing but rounding left
# (float64 rounding of a constant leaves residuals ~1e-16 of its size, sums of squares ~1e-32)
VARIATION_RTOL = 1e-24


def no_variation(y, r, axis=None):
    """True where nothing is left after the fixed effects: the OLS residuals r hold at most
    VARIATION_RTOL of the sum of squares of y (over `axis`; y and r 0 where missing)."""
    return jnp.sum(r**2, axis=axis) <= VARIATION_RTOL * jnp.sum(y**2, axis=axis)


def outcome(y, r, mask, n_par: int):
    """Status of the checks of one gene or a batch: TOO_FEW_DONORS where the donors with an
    observed value do not exceed n_par (the first that applies), NO_VARIATION where
    `no_variation`, OK otherwise.

    Args: y, r: (..., N, b) observed values and their OLS residuals on the fixed effects, 0
    where missing; mask: (..., N, b) 1 where observed (a dropped donor is a row of 0s), or None
    when everything is; n_par: number of parameters (variances + fixed effects).
    Returns: (...) int status codes."""
    N = y.shape[-2]
    n_donors = N if mask is None else jnp.sum(jnp.any(mask > 0, axis=-1), axis=-1)
    flat = no_variation(y, r, axis=(-2, -1))
    code = jnp.where(flat, int(Status.NO_VARIATION), int(Status.OK))
    return jnp.where(n_donors <= n_par, int(Status.TOO_FEW_DONORS), code)
