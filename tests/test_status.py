"""status.decide: one function, explicit precedence (issue: statuses were set in six places and
a boundary relabel overwrote 'constant' and 'infeasible start')."""

import numpy as np
import pytest
from helpers import small_data

import ctmm_jax as cj
from ctmm_jax import status
from ctmm_jax.status import BOUNDARY_COND, Status

NEAR_WALL = 10 * BOUNDARY_COND


@pytest.mark.parametrize(
    "outcome, kwargs, expected",
    [
        # constant gene that is also near the boundary: still constant
        (Status.NO_VARIATION, dict(cond=NEAR_WALL), Status.NO_VARIATION),
        # infeasible start near the boundary: still infeasible start
        (Status.INFEASIBLE_START, dict(cond=NEAR_WALL), Status.INFEASIBLE_START),
        # unidentified fixed effects win over everything but too few donors
        (Status.NO_VARIATION, dict(unidentified=True, cond=NEAR_WALL), Status.NOT_IDENTIFIED),
        (Status.OK, dict(unidentified=True), Status.NOT_IDENTIFIED),
        # too few donors (issue 18 #13): first (the cause of what else fails), never relabelled
        (Status.TOO_FEW_DONORS, dict(unidentified=True), Status.TOO_FEW_DONORS),
        (Status.TOO_FEW_DONORS, dict(cond=NEAR_WALL, finite=False), Status.TOO_FEW_DONORS),
        (Status.TOO_FEW_DONORS, dict(se_defined=False), Status.TOO_FEW_DONORS),
        # not finite (HE) wins over the boundary
        (Status.OK, dict(finite=False, cond=NEAR_WALL), Status.NOT_FINITE),
        # unconverged near the wall -> boundary; a converged fit is never relabelled
        (Status.RUNNING, dict(cond=NEAR_WALL), Status.BOUNDARY),
        (Status.NO_DESCENT, dict(cond=NEAR_WALL), Status.BOUNDARY),
        (Status.OK, dict(cond=NEAR_WALL), Status.OK),
        # unfinished -> max_iter; other outcomes stay
        (Status.RUNNING, dict(cond=1.0), Status.MAX_ITER),
        (Status.STALLED, {}, Status.MAX_ITER),
        (Status.NO_DESCENT, dict(se_defined=False), Status.NO_DESCENT),
        (Status.SINGULAR_INFO, {}, Status.SINGULAR_INFO),
        # an ok fit without standard errors -> singular information
        (Status.OK, dict(se_defined=False), Status.SINGULAR_INFO),
        (Status.OK, {}, Status.OK),
    ],
)
def test_precedence(outcome, kwargs, expected):
    assert status.decide(np.array([outcome]), **kwargs)[0] == expected


def test_decide_is_per_gene():
    outcome = np.array([Status.OK, Status.NO_VARIATION, Status.RUNNING, Status.OK])
    cond = np.array([NEAR_WALL, NEAR_WALL, NEAR_WALL, 1.0])
    unidentified = np.array([False, False, False, True])
    out = status.decide(outcome, cond=cond, unidentified=unidentified)
    assert list(out) == [Status.OK, Status.NO_VARIATION, Status.BOUNDARY, Status.NOT_IDENTIFIED]


def test_every_final_code_has_a_short_name_and_a_message():
    final = [s for s in Status if s >= 0]
    assert set(status.SHORT) == set(status.MESSAGES) == set(final)
    names = status.short_names(final)
    assert len(set(names)) == len(final) and all(" " not in n for n in names)


def test_constant_gene_near_the_boundary_is_reported_constant():
    """End to end: a constant gene whose noise variances differ by 1e8 (Sigma nearly singular at
    the start values) is 'constant', with NaN estimates, not 'boundary'."""
    data = small_data("ctp")
    Y, ctnu = data.Y.copy(), data.ctnu.copy()
    Y[1] = 2.0
    ctnu[1, :, 0] = 1e-8
    res = cj.fit(cj.CTPData.from_arrays(Y, ctnu, data.P), "free", "reml")
    assert res.table.status.iloc[1] == "constant"
    assert res.table.message.iloc[1] == status.MESSAGES[Status.NO_VARIATION]
    assert np.isnan(res.phi[1]).all() and not res.table.converged.iloc[1]
