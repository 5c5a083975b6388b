"""Estimators: ML and REML (`mlreml`, maximum likelihood by Fisher scoring) and HE (`he`,
Haseman-Elston method of moments), behind one interface.

An estimator fits a set of `Problems` (a gene, optionally with one donor left out, optionally
with start values) on a `blocks.Blocks` and returns `Estimates`: parameters, their covariance
or None, fixed effects, the optimizer's outcome. `api.fit` and the jackknife (jackknife.py)
see nothing else.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import numpy as np

from .. import status
from ..blocks import Blocks


class Problems(NamedTuple):
    """Fits to run: gene `gene[j]` of the blocks with the donors of group `drop[j]` left out
    (None: no donor left out; groups: (N,) each donor's group, None: each donor its own,
    drop[j] then being a donor), starting from phi0[j] where that beats the moment start
    values (None: moment start)."""

    gene: np.ndarray  # (P,) int
    drop: np.ndarray | None = None  # (P,) int
    phi0: np.ndarray | None = None  # (P, n_var + n_rand)
    groups: np.ndarray | None = None  # (N,) int

    def take(self, i: np.ndarray) -> Problems:
        """The problems i (indices into these)."""
        pick = lambda a: None if a is None else a[i]  # noqa: E731
        return Problems(self.gene[i], pick(self.drop), pick(self.phi0), self.groups)

    def kept(self, i: np.ndarray, N: int) -> np.ndarray:
        """(len(i), N) 1.0 for the donors problems i keep, 0.0 for those they leave out."""
        groups = np.arange(N) if self.groups is None else self.groups
        return (groups[None, :] != self.drop[i][:, None]).astype(np.float64)


class Estimates(NamedTuple):
    """Per-problem results (leading axis P). phi: (P, n_var + n_rand) parameters (models.py
    order, then the random-covariate r2); var_cov (P, k, k) their inverse information, None
    for HE; beta (P, p) and beta_cov (P, p, p) (None: no covariance); loglik (P,) or None;
    n_iter (P,); outcome (P,) status.Status codes before status.decide; cond (P,) the
    covariance's conditioning (likelihood.factor) or None."""

    phi: np.ndarray
    var_cov: np.ndarray | None
    beta: np.ndarray
    beta_cov: np.ndarray | None
    loglik: np.ndarray | None
    n_iter: np.ndarray
    outcome: np.ndarray
    cond: np.ndarray | None


class Estimator(Protocol):
    def fit(self, blocks: Blocks, problems: Problems) -> Estimates: ...


def problem_data(blocks: Blocks, problems: Problems, i: np.ndarray):
    """Device (y, noise, mask) of problems i: the genes' masks times the left-out donors' (mask
    None when nothing is missing or left out); noise as blocks.Blocks.noise_of."""
    g = problems.gene[i]
    mask = None if blocks.mask is None else blocks.mask[g]
    if problems.drop is not None:
        N, b = blocks.y.shape[1:]
        keep = np.repeat(problems.kept(i, N)[..., None], b, axis=2)
        mask = keep if mask is None else mask * keep
    y, noise = jax.device_put(blocks.y[g]), blocks.noise_of(g)
    return y, noise, None if mask is None else jax.device_put(mask)


def final_status(est: Estimates, unidentified: np.ndarray) -> np.ndarray:
    """(P,) status.Status of every problem (status.decide): the optimizer's outcome, then the
    identification, conditioning and standard errors (undefined where the information is
    singular) of its estimates."""
    se_defined = True
    if est.var_cov is not None:
        se_defined = np.all(np.diagonal(est.var_cov, axis1=1, axis2=2) > 0, axis=1)
    return status.decide(est.outcome, unidentified=unidentified, cond=est.cond,
                         se_defined=se_defined)  # fmt: skip
