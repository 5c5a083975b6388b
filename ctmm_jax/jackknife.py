"""Jackknife over any estimator (estimators.Estimator): leave one donor out, or the delete-m
block jackknife (the donors in k groups, one group left out at a time).

Replicate (g, j) is gene g with group j left out, for every group with a donor observed for
gene g: one more batched axis of problems (gene x group). ML/REML start each replicate from
the full-data estimates; HE takes its own closed-form path. The covariance is
Var_jk = (n - 1)/n sum_j (x_(-j) - mean)(x_(-j) - mean)^T over the n present groups
(inference.jackknife_cov, design.md 4). k groups cost k fits per gene instead of N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import inference, status
from .blocks import Blocks
from .estimators import Estimates, Estimator, Problems
from .status import Status


@dataclass(frozen=True)
class Jackknife:
    """Jackknife replicates of every gene (one per group of donors left out).

    phi: (G, R, n_var) and ct_beta: (G, R, C) replicate estimates; present: (G, R) the groups
    with a donor observed for each gene (only their replicates count; the others are NaN); var_cov
    (G, n_var, n_var) and ct_beta_cov (G, C, C): the jackknife covariances; n_failed: (G,)
    replicates that did not end ok (their estimates are still used, as the original, except
    those of replicates that were not fitted: status.NOT_FITTED, NaN).
    """

    phi: np.ndarray
    ct_beta: np.ndarray
    n_failed: np.ndarray
    present: np.ndarray

    @property
    def var_cov(self) -> np.ndarray:
        return inference.jackknife_cov(self.phi, self.present)

    @property
    def ct_beta_cov(self) -> np.ndarray:
        return inference.jackknife_cov(self.ct_beta, self.present)


def donor_groups(N: int, jackknife: bool | int) -> np.ndarray | None:
    """(N,) the jackknife group of each donor: True -> each donor its own (leave one out);
    k -> k groups dealt round-robin (donor i in group i mod k), so that donors sorted by
    anything (batch, age, id) spread over all groups; False -> None (no jackknife)."""
    if isinstance(jackknife, bool | np.bool_):
        return np.arange(N) if jackknife else None
    k = int(jackknife) if float(jackknife) == int(jackknife) else 0
    if not 2 <= k <= N:
        raise ValueError(
            f"jackknife={jackknife!r}: give True (leave one donor out) or a number of donor "
            f"groups between 2 and N = {N}."
        )
    return np.arange(N) % k


def jackknife(
    estimator: Estimator, blocks: Blocks, present: np.ndarray, full: Estimates, C: int,
    groups: np.ndarray | None = None,
) -> Jackknife:  # fmt: skip
    """Refit every gene with each group of donors (groups: (N,), default each donor its own)
    that has a present donor (present: (G, N)) left out, starting from the full-data estimates
    `full`; C: number of cell-type means (the first columns of beta)."""
    G, N = present.shape
    groups = np.arange(N) if groups is None else np.asarray(groups)
    n_groups = int(groups.max()) + 1
    present_groups = present.astype(np.int64) @ (groups[:, None] == np.arange(n_groups)) > 0
    gene, drop = np.nonzero(present_groups)
    reps = estimator.fit(blocks, Problems(gene, drop, full.phi[gene], groups))

    def per_group(x):  # (P, ...) over present pairs -> (G, n_groups, ...), NaN for absent ones
        if len(gene) == G * n_groups:  # every pair present, in order
            return x.reshape((G, n_groups) + x.shape[1:])
        out = np.full((G, n_groups) + x.shape[1:], np.nan)
        out[gene, drop] = x
        return out

    failed = reps.outcome != Status.OK
    n_failed = np.bincount(gene, weights=failed, minlength=G).astype(int)
    # a replicate that failed the checks made before fitting (checks.py: too few donors, no
    # variation) has no estimates: NaN, so its gene has no jackknife covariance
    unfit = np.isin(reps.outcome, status.NOT_FITTED)[:, None]
    phi, ct_beta = np.where(unfit, np.nan, reps.phi), np.where(unfit, np.nan, reps.beta[:, :C])
    return Jackknife(per_group(phi), per_group(ct_beta), n_failed, present_groups)
