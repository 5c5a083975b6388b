"""Leave-one-donor-out jackknife over any estimator (estimators.Estimator).

Replicate (g, i) is gene g with donor i left out, for every donor i observed for gene g: one
more batched axis of problems (gene x donor). ML/REML start each replicate from the full-data
estimates; HE takes its own closed-form leave-one-out path. The covariance is
Var_jk = (n - 1)/n sum_i (x_(-i) - mean)(x_(-i) - mean)^T over the n present donors
(inference.jackknife_cov, design.md 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import inference
from .blocks import Blocks
from .estimators import Estimates, Estimator, Problems
from .status import Status


@dataclass(frozen=True)
class Jackknife:
    """Leave-one-donor-out replicates of every gene.

    phi: (G, N, n_var) and ct_beta: (G, N, C) replicate estimates; present: (G, N) the donors
    observed for each gene (only their replicates count; the others are NaN); var_cov
    (G, n_var, n_var) and ct_beta_cov (G, C, C): the jackknife covariances; n_failed: (G,)
    replicates that did not end ok (their estimates are still used, as the original).
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


def jackknife(
    estimator: Estimator, blocks: Blocks, present: np.ndarray, full: Estimates, C: int
) -> Jackknife:
    """Refit every gene with each of its present donors (present: (G, N)) left out, starting
    from the full-data estimates `full`; C: number of cell-type means (the first columns of
    beta)."""
    G, N = present.shape
    gene, drop = np.nonzero(present)
    reps = estimator.fit(blocks, Problems(gene, drop, full.phi[gene]))

    def per_donor(x):  # (P, ...) over present pairs -> (G, N, ...), NaN for absent donors
        out = np.full((G, N) + x.shape[1:], np.nan)
        out[gene, drop] = x
        return out

    failed = reps.outcome != Status.OK
    n_failed = np.bincount(gene, weights=failed, minlength=G).astype(int)
    return Jackknife(per_donor(reps.phi), per_donor(reps.beta[:, :C]), n_failed, present)
