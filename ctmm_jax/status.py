"""Per-gene status: the codes, their short names and messages, and the one function that
decides a gene's final status.

Codes are ints so they cross jit and vmap (the optimizer writes its outcome into them); the
table shows the short name (`status`) and the message (`message`). `decide` combines the
optimizer's outcome with the checks made around it, in an explicit order of precedence.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

BOUNDARY_COND = 1e6  # a fit that ends unconverged with cond above this is on the boundary


class Status(IntEnum):
    STALLED = -2  # optimizer: no decrease within this round's halving budget; run again
    RUNNING = -1  # optimizer: not done
    OK = 0
    MAX_ITER = 1
    NO_DESCENT = 2
    BOUNDARY = 3
    INFEASIBLE_START = 4
    SINGULAR_INFO = 5
    NO_VARIATION = 6
    NOT_FINITE = 7
    NOT_IDENTIFIED = 8
    TOO_FEW_DONORS = 9


SHORT = {
    Status.OK: "ok",
    Status.MAX_ITER: "max_iter",
    Status.NO_DESCENT: "no_descent",
    Status.BOUNDARY: "boundary",
    Status.INFEASIBLE_START: "infeasible_start",
    Status.SINGULAR_INFO: "singular_info",
    Status.NO_VARIATION: "constant",
    Status.NOT_FINITE: "not_finite",
    Status.NOT_IDENTIFIED: "not_identified",
    Status.TOO_FEW_DONORS: "too_few_donors",
}

MESSAGES = {
    Status.OK: "ok",
    Status.MAX_ITER: "reached max_iter before the score test statistic fell below tol",
    Status.NO_DESCENT: "step halving found no decrease of the negative log-likelihood",
    Status.BOUNDARY: "stopped at the positive-definite boundary (covariance nearly singular)",
    Status.INFEASIBLE_START: "start values give a covariance that is not positive definite",
    Status.SINGULAR_INFO: "information matrix is singular (parameters not identified)",
    Status.NO_VARIATION: "no variation left after the fixed effects (constant gene); not fitted",
    Status.NOT_FINITE: "estimates not finite (HE normal equations singular, or GLS at HE "
    "variances that are not positive definite)",
    Status.NOT_IDENTIFIED: "fixed effects not identified from the observed values (e.g. a cell "
    "type with no observed value); not fitted",
    Status.TOO_FEW_DONORS: "too few donors: the number of donors with an observed value must "
    "exceed the number of parameters (variances + fixed effects), df = N - n_par >= 1; not fitted",
}

# no estimates and no p values are reported (checks.py: decided before any fit)
NOT_FITTED = (Status.NO_VARIATION, Status.NOT_IDENTIFIED, Status.TOO_FEW_DONORS)


def decide(
    outcome: np.ndarray,
    *,
    unidentified: np.ndarray | bool = False,
    cond: np.ndarray | None = None,
    se_defined: np.ndarray | bool = True,
    finite: np.ndarray | bool = True,
) -> np.ndarray:
    """Final status of each gene, the first that applies:

    1. TOO_FEW_DONORS   the checks' outcome (checks.py): observed donors <= n_par (not fitted)
    2. NOT_IDENTIFIED   `unidentified`: the fixed effects are not identified (not fitted)
    3. NO_VARIATION     the checks' outcome: nothing left after the fixed effects (not fitted)
    4. INFEASIBLE_START the optimizer's outcome
    5. NOT_FINITE       not `finite`: estimates not finite (HE)
    6. BOUNDARY         the optimizer did not end OK and cond > BOUNDARY_COND
    7. MAX_ITER         the optimizer was still running (or stalled) when it ran out
    8. the optimizer's other outcomes (NO_DESCENT, SINGULAR_INFO, BOUNDARY)
    9. SINGULAR_INFO    an OK fit whose inverse information has a diagonal that is not > 0
    10. OK

    The three checks made before fitting come first, in the order a fit needs them: df >= 1
    (with too few donors the fixed effects are often not identified either, e.g. one donor
    and a donor-level covariate: the count is the cause), then identified fixed effects, then
    something left to fit. A gene that fails one has no estimates, so nothing after applies.

    Args: outcome (G,) Status codes from the checks and the optimizer (OK for closed forms
    that pass the checks); the rest (G,) or scalars; cond None when not measured.
    Returns: (G,) int codes."""
    outcome = np.asarray(outcome)
    shape = outcome.shape
    flag = lambda x: np.broadcast_to(np.asarray(x, bool), shape)  # noqa: E731
    not_ok = outcome != Status.OK
    near_wall = flag(False) if cond is None else not_ok & (np.asarray(cond) > BOUNDARY_COND)
    rules = [
        (outcome == Status.TOO_FEW_DONORS, Status.TOO_FEW_DONORS),
        (flag(unidentified), Status.NOT_IDENTIFIED),
        (outcome == Status.NO_VARIATION, Status.NO_VARIATION),
        (outcome == Status.INFEASIBLE_START, Status.INFEASIBLE_START),
        (~flag(finite), Status.NOT_FINITE),
        (near_wall, Status.BOUNDARY),
        (np.isin(outcome, (Status.RUNNING, Status.STALLED)), Status.MAX_ITER),
        (not_ok, outcome),
        (~flag(se_defined), Status.SINGULAR_INFO),
    ]
    conditions, choices = zip(*rules, strict=True)
    return np.select(conditions, [np.broadcast_to(c, shape) for c in choices], Status.OK).astype(
        int
    )


def short_names(codes) -> np.ndarray:
    """(G,) codes -> short machine-readable names (object array)."""
    return np.array([SHORT[Status(int(c))] for c in np.ravel(codes)], dtype=object)


def messages(codes) -> np.ndarray:
    """(G,) codes -> messages (object array)."""
    return np.array([MESSAGES[Status(int(c))] for c in np.ravel(codes)], dtype=object)
