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

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import batching, models, status
from .blocks import Blocks, to_blocks
from .data import CTPData
from .estimators import Problems, problem_data
from .estimators.mlreml import MaximumLikelihood, over_genes
from .likelihood import GeneData, moments


class NullFit(NamedTuple):
    """The null model's fit of every gene, and the larger model's score of V there.
    model: the null model; status: (G,) status.Status codes of the null fit; loglik: (G,) its
    log-likelihood; score: (G, k) d nll / d V of the larger model at the null fit (k tested
    parameters); score_var: (G, k, k) the score's variance (`score_variance`)."""

    model: str
    status: np.ndarray
    loglik: np.ndarray
    score: np.ndarray
    score_var: np.ndarray


def _gene_moments(w, y, noise, mask, a, design, *, reml):
    """Score and expected information of one gene at kernel weights w (n_k + n_rand,), with C
    more kernels d Sigma / d s2_c at weight 0 (Sigma unchanged): CTP blocks a_ic e_c e_c^T with
    a_ic = 1 / n_ic; OP scalars a_ic = P_ic^2 / n_ic. a: (N, C)."""
    n_k, C = design.E.shape[0], a.shape[1]
    N, b = y.shape
    if b == 1:
        Ks = a.T[:, :, None, None]
    else:
        Ks = jnp.einsum("nc,ca,cb->cnab", a, jnp.eye(C), jnp.eye(C))
    E = jnp.concatenate([jnp.broadcast_to(design.E, (n_k, N, b, b)), Ks])
    w = jnp.concatenate([w[:n_k], jnp.zeros(C), w[n_k:]])
    d = GeneData(y, noise, design.X, E, mask, design.F, design.U, design.groups)
    m = moments(w, d, reml)
    return m.score, m.info


@partial(jax.jit, static_argnames=("reml",))
def moments_chunk(w, y, noise, mask, a, design, reml):
    return over_genes(partial(_gene_moments, reml=reml), 5, design)(w, y, noise, mask, a, design)


def noise_loadings(data) -> np.ndarray:
    """(G, N, C) d noise / d s2_c of each value: CTP 1 / n_ic, OP P_ic^2 / n_ic (0 where no
    cells); ones when the data have no cell counts (then s2 is not estimated: unused)."""
    G, N, C = data.shape
    if data.n_cells is None:
        return np.ones((G, N, C))
    n = np.broadcast_to(data.n_cells, (G, N, C))
    inv = np.divide(1.0, n, out=np.zeros((G, N, C)), where=n > 0)
    if isinstance(data, CTPData):
        return inv
    P = data.P if data.P_gene is None else data.P_gene
    return inv * np.broadcast_to(P, (G, N, C)) ** 2


def score_variance(score, info, tested, nuisance, s2_var):
    """The tested parameters' score and its variance at the null fit.

    With h the nuisance parameters (hom2, r2) refitted under the null and s the C within-pair
    variances, the score of V profiled over h is s_V - I_Vh I_hh^-1 s_h (s_h = 0 at the null
    fit) with variance I_VV.h = I_VV - I_Vh I_hh^-1 I_hV; a pooled s2-hat (estimated from the
    cells, independent of the pseudobulk means for Gaussian cells) adds A Var(s2-hat) A^T with
    A = I_Vs - I_Vh I_hh^-1 I_hs, the score's sensitivity to s2. score: (G, K); info: (G, K, K);
    tested, nuisance: index arrays; s2_var: (G, C) Var(s2-hat) (zeros: noise known).
    Returns (score (G, k), variance (G, k, k))."""
    s_idx = np.setdiff1d(np.arange(info.shape[1]), np.concatenate([tested, nuisance]))
    block = lambda r, c: info[:, r[:, None], c]  # noqa: E731
    ok = np.isfinite(info).all((1, 2))
    I_hh = np.where(ok[:, None, None], block(nuisance, nuisance), np.eye(len(nuisance)))
    I_hh_inv = np.linalg.inv(I_hh)
    I_Vh = block(tested, nuisance)
    I_Vh_hh = I_Vh @ I_hh_inv
    var = block(tested, tested) - I_Vh_hh @ np.swapaxes(I_Vh, 1, 2)
    A = block(tested, s_idx) - I_Vh_hh @ block(nuisance, s_idx)
    var = var + np.einsum("gvs,gs,gws->gvw", A, s2_var, A)
    var = np.where(ok[:, None, None], var, np.nan)
    return score[:, tested], var


def fit_null(
    data, model: str, blocks: Blocks, covariates, random, unidentified: np.ndarray,
    s2_var: np.ndarray | None, *, reml: bool, max_iter: int, tol: float, chunk_size: int,
) -> NullFit:  # fmt: skip
    """Fit `model`'s null model to every gene of `data` (same covariates, ML or REML, variances
    unconstrained so that its score is 0 at the optimum) and take `model`'s score of V and its
    variance there (`score_variance`) on its `blocks`. s2_var: (G, C) the variance of the
    pooled within-pair variances (noise.apply), or None when the noise is taken as known."""
    G, N, C = data.shape
    null = models.get(model).null
    blocks0 = to_blocks(data, null, covariates.matrix, random.matrix, random.groups)
    problems = Problems(np.arange(G))
    est = MaximumLikelihood(null, C, reml=reml, max_iter=max_iter, tol=tol,
                            chunk_size=chunk_size).fit(blocks0, problems)  # fmt: skip
    se_defined = np.all(np.diagonal(est.var_cov, axis1=1, axis2=2) > 0, axis=1)
    codes = status.decide(est.outcome, unidentified=unidentified, cond=est.cond,
                          se_defined=se_defined)  # fmt: skip
    w = np.asarray(models.embed_null(np.asarray(est.phi), model, C))
    a = noise_loadings(data)

    def batch(i):
        y, noise, mask = problem_data(blocks, problems, i)
        design = blocks.design(problems.gene[i])
        return moments_chunk(jnp.asarray(w[i]), y, noise, mask, jnp.asarray(a[i]), design, reml)

    size = batching.bucket(G, chunk_size)
    score, info = batching.map_batches(batch, np.arange(G), size)
    n_k = models.n_var(model, C)
    tested = models.get(model).tests(C)["V"]
    kept = np.setdiff1d(np.arange(n_k), tested)  # hom2
    nuisance = np.concatenate([kept, n_k + C + np.arange(w.shape[1] - n_k)])  # and the r2
    s2_var = np.zeros((G, C)) if s2_var is None else s2_var
    s, var = score_variance(np.asarray(score), np.asarray(info), tested, nuisance, s2_var)
    return NullFit(null, codes, np.asarray(est.loglik), s, var)
