"""Donor-clustered sandwich (robust) covariance of ML/REML estimates: one fit per gene.

Donors are independent, and the score and GLS's estimating equation are sums of per-donor
contributions s_i and g_i (likelihood.donor_scores), so at the estimates

    Var_sw(phi-hat) = I^-1 (n / (n - 1)) sum_i s_i s_i^T I^-1,
    Var_sw(beta-hat) = (X^T Sigma^-1 X)^-1 (n / (n - 1)) sum_i g_i g_i^T (X^T Sigma^-1 X)^-1

(I the expected information, n the donors with an observed value). It stays valid when the
model's covariance is wrong (e.g. noise variances misestimated), as the jackknife does, at the
cost of one evaluation per gene instead of N (or k) refits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import Blocks
from .estimators import Estimates, Problems
from .estimators.mlreml import meats


@dataclass(frozen=True)
class Sandwich:
    """var_cov (G, n_var, n_var) and ct_beta_cov (G, C, C): the sandwich covariances."""

    var_cov: np.ndarray
    ct_beta_cov: np.ndarray


def sandwich(blocks: Blocks, est: Estimates, n_donors: np.ndarray, *, model: str, C: int,
             reml: bool, chunk_size: int) -> Sandwich:  # fmt: skip
    """The sandwich covariances of every gene's estimates `est` (n_donors: (G,) donors with
    an observed value)."""
    G = len(n_donors)
    M_phi, M_beta = meats(blocks, Problems(np.arange(G)), np.asarray(est.phi), model=model,
                          C=C, reml=reml, chunk_size=chunk_size)  # fmt: skip
    scale = (n_donors / np.maximum(n_donors - 1, 1))[:, None, None]
    V, B = est.var_cov, est.beta_cov
    return Sandwich(V @ (scale * M_phi) @ V, (B @ (scale * M_beta) @ B)[:, :C, :C])
