"""Tests of V at the null model: fit the nested model without cell type-specific variance
(models.ModelSpec.null, e.g. hom for free and iid) and evaluate the larger model's score and
expected information there (the score test, inference.score_test); the two log-likelihoods
give the LRT. A model with `diag_test` (lowrank) is its own null: diag(V) added to its
covariance is scored at its own fit. With pooled noise the score's variance also carries the
sampling error of the pooled within-pair variances (`score_variance`).

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

from . import batching, models
from .blocks import Blocks, to_blocks
from .data import CTPData
from .estimators import Problems, final_status, problem_data
from .estimators.mlreml import MaximumLikelihood, gene_data, over_genes
from .likelihood import moments


class NullFit(NamedTuple):
    """The null model's fit of every gene, and the larger model's score of V there.
    model: the null model; status: (G,) status.Status codes of the null fit; loglik: (G,) its
    log-likelihood; score: (G, k) d nll / d V of the larger model at the null fit (k tested
    parameters); score_var: (G, k, k) the score's variance (`score_variance`); boundary:
    whether V = 0 is on the boundary of the fitted parameter space (nonneg: the LRT's null
    distribution is then a chi-square mixture, inference.lrt)."""

    model: str
    status: np.ndarray
    loglik: np.ndarray
    score: np.ndarray
    score_var: np.ndarray
    boundary: bool = False


def _gene_moments(w, y, noise, mask, a, design, *, reml):
    """Score and expected information of one gene at kernel weights w (n_k [+ C] + n_rand,;
    noise="cells": the fitted s2_c after the kernels), with, for pooled noise, C more kernels
    d Sigma / d s2_c at weight 0 (Sigma unchanged; likelihood.GeneData.loadings): CTP
    a_ic e_c e_c^T with a_ic = 1 / n_ic; OP scalars a_ic = P_ic^2 / n_ic. a: (N, C), or None
    for no such kernels."""
    d = gene_data(y, noise, mask, design)
    if a is not None:
        n_k = design.E.shape[0]
        w = jnp.concatenate([w[:n_k], jnp.zeros(a.shape[1]), w[n_k:]])
        d = d._replace(loadings=a)
    m = moments(w, d, reml)
    return m.score, m.info


@partial(jax.jit, static_argnames=("reml",))
def moments_chunk(w, y, noise, mask, a, design, reml):
    return over_genes(partial(_gene_moments, reml=reml), 5, design)(w, y, noise, mask, a, design)


def noise_loadings(data) -> np.ndarray:
    """(G, N, C) d noise / d s2_c of each value: CTP 1 / n_ic, OP P_ic^2 / n_ic (0 where no
    cells). Needs the cell counts."""
    G, N, C = data.shape
    n = np.broadcast_to(data.n_cells, (G, N, C))
    inv = np.divide(1.0, n, out=np.zeros((G, N, C)), where=n > 0)
    if isinstance(data, CTPData):
        return inv
    P = data.P if data.P_gene is None else data.P_gene
    return inv * np.broadcast_to(P, (G, N, C)) ** 2


def score_variance(score, info, T, D, S, s2_var):
    """The score of V and its variance at the null fit, in the space of the kernel weights,
    the C within-pair variances and the r2 (K = n_k + C + n_rand coordinates).

    With nuisance directions D (the null model's parameters: dw/dphi0, and the r2) refitted
    under the null, the score of V (directions T) profiled over them is T^T s (the nuisance
    score D^T s is 0 at the null fit) with variance I_TT.D = T^T I T - T^T I D (D^T I D)^+ D^T I T;
    a pooled s2-hat (estimated from the cells, independent of the pseudobulk means for Gaussian
    cells) adds A Var(s2-hat) A^T with A = T^T I S - T^T I D (D^T I D)^+ D^T I S, the score's
    sensitivity to s2 (directions S). The pseudo-inverse covers nuisance directions that vanish
    at the null fit (lowrank loadings at 0). score: (G, K); info: (G, K, K); T: (K, k);
    D: (G, K, h); S: (K, C); s2_var: (G, C) Var(s2-hat) (zeros: noise known).
    Returns (score (G, k), variance (G, k, k))."""
    ok = np.isfinite(info).all((1, 2)) & np.isfinite(D).all((1, 2))
    info = np.where(ok[:, None, None], info, np.eye(info.shape[1]))
    D = np.where(ok[:, None, None], D, 0.0)
    ID = info @ D
    I_DD_inv = np.linalg.pinv(np.swapaxes(D, 1, 2) @ ID, hermitian=True)
    proj = (T.T @ ID) @ I_DD_inv  # (G, k, h)
    var = T.T @ info @ T - proj @ np.swapaxes(T.T @ ID, 1, 2)
    A = T.T @ info @ S - proj @ (np.swapaxes(ID, 1, 2) @ S)
    var = var + np.einsum("gvs,gs,gws->gvw", A, s2_var, A)
    return score @ T, np.where(ok[:, None, None], var, np.nan)


def _units(K: int, idx) -> np.ndarray:
    """(K, len(idx)) columns of the identity."""
    return np.eye(K)[:, np.asarray(idx, dtype=int)]


def fit_null(
    data, model: str, blocks: Blocks, covariates, random, unidentified: np.ndarray,
    s2_var: np.ndarray | None, fit, codes: np.ndarray, *, reml: bool, max_iter: int,
    tol: float, chunk_size: int, nonneg: bool = False, mesh=None,
) -> NullFit:  # fmt: skip
    """The null fit behind `model`'s test of V, and the score of V with its variance there
    (`score_variance`), evaluated on `model`'s `blocks` (its kernels).

    A model with a nested null (spec.null: free and iid, null hom) fits the null model to every
    gene (same covariates, ML or REML, and the same constraints: under nonneg the null's
    variances are >= 0 too, so that the LRT compares nested fits; where hom2 ends at 0 the
    score test is approximate, its nuisance score not being 0); V is its `tests`["V"]
    parameters. A model with `diag_test` (lowrank) is its own
    null: V = diag(v_1..v_C) added to its covariance, tested at `fit` (the model's fit, status
    `codes`). s2_var: (G, C) the variance of the pooled within-pair variances (noise.apply), or
    None when the noise is taken as known; mesh: the devices of the null fit (devices.py).
    Under noise="cells" (blocks.cells) the fitted s2_c are nuisance parameters like the r2."""
    G, N, C = data.shape
    spec = models.get(model)
    n_k = blocks.E.shape[-4]  # kernels of the model's blocks
    n_rand = len(random.values)
    cells = blocks.cells is not None
    n_s2 = C if s2_var is not None or cells else 0
    K = n_k + n_s2 + n_rand  # extended coordinates: kernels, s2, r2
    s2_units = _units(K, n_k + np.arange(n_s2))
    # refitted under the null: the r2, and the s2 where they are fitted (cells)
    nuisance = np.hstack([s2_units, _units(K, n_k + n_s2 + np.arange(n_rand))]) if cells else (
        _units(K, n_k + n_s2 + np.arange(n_rand)))  # fmt: skip
    if spec.null is not None:
        null = spec.null
        blocks0 = to_blocks(data, null, covariates.matrix, random.matrix, random.groups,
                            blocks.cells)  # fmt: skip
        estimator = MaximumLikelihood(null, C, reml=reml, nonneg=nonneg, max_iter=max_iter,
                                      tol=tol, chunk_size=chunk_size, mesh=mesh)  # fmt: skip
        fit = estimator.fit(blocks0, Problems(np.arange(G)))
        codes = final_status(fit, unidentified)
        w = np.asarray(models.embed_null(np.asarray(fit.phi), model, C))
        tested = spec.tests(C)["V"]
        D = np.hstack([_units(K, np.setdiff1d(np.arange(n_k), tested)), nuisance])
        D = np.broadcast_to(D, (G,) + D.shape)
    else:  # diag_test: the model's own fit, V = diag added to its kernels
        null, phi = model, np.asarray(fit.phi)
        weights = jax.vmap(partial(models.kernel_weights, model=model, C=C))
        jac = jax.vmap(jax.jacfwd(partial(models.kernel_weights, model=model, C=C)))
        n_var = models.n_var(model, C)
        w = np.hstack([np.asarray(weights(jnp.asarray(phi[:, :n_var]))), phi[:, n_var:]])
        J = np.zeros((G, K, n_var))
        J[:, :n_k] = np.asarray(jac(jnp.asarray(phi[:, :n_var])))
        D = np.concatenate([J, np.broadcast_to(nuisance, (G,) + nuisance.shape)], axis=2)
        tested = models.diag_kernels(model, C)
    a = None if s2_var is None else noise_loadings(data)
    problems = Problems(np.arange(G))

    def batch(i):
        y, noise, mask = problem_data(blocks, problems, i)
        design = blocks.design(problems.gene[i])
        a_i = None if a is None else jax.device_put(a[i])
        return moments_chunk(jax.device_put(w[i]), y, noise, mask, a_i, design, reml)

    score, info = batching.map_batches(batch, np.arange(G), batching.bucket(G, chunk_size))
    S = s2_units if s2_var is not None else np.zeros((K, 0))  # pooled: s2 estimated outside
    s2_var = np.zeros((G, 0)) if s2_var is None else s2_var
    s, var = score_variance(np.asarray(score), np.asarray(info), _units(K, tested), D, S, s2_var)
    loglik = fit.loglik if fit.loglik is not None else np.full(G, np.nan)
    return NullFit(null, codes, np.asarray(loglik), s, var, boundary=nonneg)
