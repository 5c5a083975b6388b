"""Tests of V at the null model: fit the nested model without cell type-specific variance
(models.ModelSpec.null, e.g. hom for free and iid) and evaluate the larger model's score and
expected information there (the score test, inference.score_test); the two log-likelihoods
give the LRT.

Why at the null: the Wald test of V with the information at the free estimate rejects 18% of
null genes at 0.05 (N = 100, known noise, design.md 10): near V = 0 the information at V-hat
is a poor estimate of that at the truth. The score test needs only the null fit, which is
better behaved than the larger one (no V on the positive-definite boundary), and is
calibrated (benchmarks/bench_calibration.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import models, status
from .blocks import Blocks, to_blocks
from .estimators import Problems
from .estimators.mlreml import MaximumLikelihood


class NullFit(NamedTuple):
    """The null model's fit of every gene, and the larger model at it. model: the null model;
    status: (G,) status.Status codes of the null fit; loglik: (G,) its log-likelihood;
    score: (G, k) d nll / d phi of the larger model at the null fit; var_cov: (G, k, k) the
    inverse of its expected information there."""

    model: str
    status: np.ndarray
    loglik: np.ndarray
    score: np.ndarray
    var_cov: np.ndarray


def fit_null(
    data, model: str, blocks: Blocks, covariates, random, unidentified: np.ndarray, *,
    reml: bool, max_iter: int, tol: float, chunk_size: int,
) -> NullFit:  # fmt: skip
    """Fit `model`'s null model to every gene of `data` (same covariates, ML or REML, variances
    unconstrained so that its score is 0 at the optimum) and evaluate `model` there on its
    `blocks` (the larger model's block form)."""
    G, N, C = data.shape
    null = models.get(model).null
    blocks0 = to_blocks(data, null, covariates.matrix, random.matrix, random.groups)
    problems = Problems(np.arange(G))
    settings = dict(reml=reml, max_iter=max_iter, tol=tol, chunk_size=chunk_size)
    est = MaximumLikelihood(null, C, **settings).fit(blocks0, problems)
    se_defined = np.all(np.diagonal(est.var_cov, axis1=1, axis2=2) > 0, axis=1)
    codes = status.decide(est.outcome, unidentified=unidentified, cond=est.cond,
                          se_defined=se_defined)  # fmt: skip
    phi = models.embed_null(np.asarray(est.phi), model, C)
    at = MaximumLikelihood(model, C, **settings).evaluate(blocks, problems, phi)
    return NullFit(null, codes, np.asarray(est.loglik), np.asarray(at.score),
                   np.asarray(at.var_cov))  # fmt: skip
