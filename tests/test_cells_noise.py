"""noise="cells" (issue 14): the exact likelihood of Gaussian cells, against the dense
likelihood of every cell (scipy), its score, Hessian and expected information against the
dense formulas over all cells, and the fit through `fit`."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM, METHODS, OPTIMIZER
from numpy.testing import assert_allclose
from scipy import stats

import ctmm_jax as cj
from ctmm_jax import likelihood, noise
from ctmm_jax.blocks import to_blocks

N, C = 14, 3


def cell_data(G=2, seed=0, missing=True):
    """Gaussian cells y_ick = beta_c + alpha_i + gamma_ic + e_ick and their pseudobulk.
    Returns (CTPData, cells[g][i][c] arrays of the cells of each observed pair)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(2, 7, size=(N, C))
    mask = np.ones((N, C), bool)
    if missing:
        mask[2, 1] = mask[5, 0] = False
    cells = []
    Y, ctnu = np.zeros((G, N, C)), np.ones((G, N, C))
    for g in range(G):
        alpha = rng.normal(0, 0.6, N)
        per_gene = []
        for i in range(N):
            row = []
            for c in range(C):
                x = c * 0.5 + alpha[i] + rng.normal(0, 0.4) + rng.normal(0, 1 + 0.3 * c, n[i, c])
                row.append(x if mask[i, c] else np.zeros(0))
                if mask[i, c]:
                    Y[g, i, c], ctnu[g, i, c] = x.mean(), x.var(ddof=1) / n[i, c]
            per_gene.append(row)
        cells.append(per_gene)
    P = n / n.sum(1, keepdims=True)
    data = cj.CTPData.from_arrays(Y, ctnu, P, mask=None if mask.all() else mask, n_cells=n)
    return data, cells


def dense_cells(cells, g, A, s2):
    """All cells of gene g stacked donor by donor: y, X (cell-type indicators) and
    Sigma = blockdiag_i(Z_i A Z_i^T + diag(s2_c(k))), Z_i the cells' cell-type indicators, and
    the derivatives of Sigma in the kernel weights of `kernels` then s2_1..s2_C."""
    ys, Zs = [], []
    for row in cells[g]:
        y = np.concatenate(row)
        Z = np.concatenate([np.tile(np.eye(C)[c], (len(x), 1)) for c, x in enumerate(row)])
        ys.append(y)
        Zs.append(Z)
    n = sum(len(y) for y in ys)
    Sigma, X = np.zeros((n, n)), np.concatenate(Zs)
    at = 0
    for Z in Zs:
        k = len(Z)
        Sigma[at : at + k, at : at + k] = Z @ A @ Z.T + np.diag(Z @ s2)
        at += k
    return np.concatenate(ys), X, Sigma, Zs


def dense_kernels(Zs, Bs):
    """d Sigma / d w for between-donor kernels Bs (C x C), then for each s2_c."""
    n = sum(len(Z) for Z in Zs)

    def blockdiag(f):
        out, at = np.zeros((n, n)), 0
        for Z in Zs:
            out[at : at + len(Z), at : at + len(Z)] = f(Z)
            at += len(Z)
        return out

    Ks = [blockdiag(lambda Z, B=B: Z @ B @ Z.T) for B in Bs]
    return Ks + [blockdiag(lambda Z, c=c: np.diag(Z[:, c])) for c in range(C)]


FREE_KERNELS = [np.ones((C, C))] + [np.diag(np.eye(C)[c]) for c in range(C)]


def _gene(data, model, g):
    used = noise.apply(data, "cells")
    return to_blocks(used.data, model, cells=used.cells).gene(g)


@pytest.mark.parametrize("model", ["free", "full"])  # closed forms (rankone.py) and Cholesky
@pytest.mark.parametrize("method", METHODS)
def test_cells_loglik_equals_dense_likelihood_of_every_cell(model, method):
    data, cells = cell_data(seed=1)
    hom2, v, s2 = 0.4, np.array([0.2, -0.05, 0.3]), np.array([0.9, 1.4, 2.1])
    if model == "free":
        w, A = np.concatenate([[hom2, *v], s2]), hom2 * np.ones((C, C)) + np.diag(v)
    else:
        B = np.array([[0.5, 0.1, 0.0], [0.1, 0.3, -0.1], [0.0, -0.1, 0.6]])
        w, A = np.concatenate([B[np.triu_indices(C)], s2]), B
    for g in range(2):
        ours = -float(likelihood.nll(jnp.asarray(w), _gene(data, model, g), method == "reml"))
        y, X, Sigma, _ = dense_cells(cells, g, A, s2)
        dense = (reference.ml_loglik if method == "ml" else reference.reml_loglik)(y, X, Sigma)
        assert_allclose(ours, dense, **CLOSED_FORM)


@pytest.mark.parametrize("method", METHODS)
def test_cells_score_hessian_information_equal_dense(method):
    """Score 1/2 [tr(Pj K_k) - r^T Pj K_k Pj r], expected information 1/2 tr(Pj K_k Pj K_l) and
    Hessian y^T Pi K_k Pi K_l Pi y - info over all cells (Pj = Pi for REML, Sigma^-1 for ML;
    r the GLS residual), with K the derivatives of the cells' Sigma."""
    data, cells = cell_data(seed=2)
    w = np.array([0.3, 0.1, 0.0, 0.25, 1.1, 0.8, 2.0])
    A = w[0] * np.ones((C, C)) + np.diag(w[1:4])
    reml = method == "reml"
    m = likelihood.moments(jnp.asarray(w), _gene(data, "free", 0), reml)
    y, X, Sigma, Zs = dense_cells(cells, 0, A, w[4:])
    Si = np.linalg.inv(Sigma)
    Pi = reference.projection(X, Sigma)
    Pj = Pi if reml else Si
    u = Pi @ y
    Ks = dense_kernels(Zs, FREE_KERNELS)
    score = [0.5 * (np.trace(Pj @ K) - u @ K @ u) for K in Ks]
    info = np.array([[0.5 * np.trace(Pj @ K @ Pj @ L) for L in Ks] for K in Ks])
    Q = np.array([[u @ K @ Pi @ L @ u for L in Ks] for K in Ks])
    assert_allclose(m.score, score, **CLOSED_FORM)
    assert_allclose(m.info, info, **CLOSED_FORM)
    assert_allclose(m.hess, Q - info, **CLOSED_FORM)


def test_cells_op_equals_dense_op_likelihood_plus_within_pairs():
    """OP: the likelihood of y_i = sum_c P_ic ybar_ic (dense N x N, nu_i = sum_c P_ic^2 s2_c /
    n_ic) and of the cells' deviations from their pair means, sum over pairs of
    log N(cells; m, s2_c) - log N(ybar; m, s2_c / n) (any m)."""
    data, cells = cell_data(seed=3, missing=False)
    op = cj.OPData.from_ctp(data)
    hom2, v, s2 = 0.4, np.array([0.2, 0.1, 0.3]), np.array([0.9, 1.4, 2.1])
    used = noise.apply(op, "cells")
    d = to_blocks(used.data, "free", cells=used.cells).gene(1)
    ours = -float(likelihood.nll(jnp.asarray(np.concatenate([[hom2, *v], s2])), d, True))
    n = data.n_cells
    nu = (op.P**2 * s2 / n).sum(1)
    y, X, Sigma = reference.op_dense(hom2, np.diag(v), op.y[1], nu, op.P)
    within = sum(
        stats.norm(0, np.sqrt(s2[c])).logpdf(x).sum()
        - stats.norm(0, np.sqrt(s2[c] / len(x))).logpdf(x.mean())
        for row in cells[1] for c, x in enumerate(row)
    )  # fmt: skip
    assert_allclose(ours, reference.reml_loglik(y, X, Sigma) + within, **CLOSED_FORM)


def test_fit_with_cells_noise_maximises_the_dense_likelihood():
    """fit(noise="cells") reports s2_<ct>, and its estimates maximise the dense likelihood of
    the cells: no coordinate step improves it (gradient ~ 0 by central differences)."""
    data, cells = cell_data(G=3, seed=4)
    res = cj.fit(data, "free", "ml", noise="cells")
    assert res.noise == "cells" and res.converged.all()
    assert [c for c in res.table.columns if c.startswith("s2_")] == ["s2_ct0", "s2_ct1", "s2_ct2"]
    for g in range(3):
        w = res.phi[g]
        assert_allclose(res.table[["s2_ct0", "s2_ct1", "s2_ct2"]].to_numpy()[g], w[4:])

        def loglik(w, g=g):
            y, X, Sigma, _ = dense_cells(cells, g, w[0] + np.diag(w[1:4]), w[4:])
            return reference.ml_loglik(y, X, Sigma)

        eps = 1e-5
        grad = [(loglik(w + eps * e) - loglik(w - eps * e)) / (2 * eps) for e in np.eye(7)]
        assert_allclose(grad, 0.0, **OPTIMIZER)
        assert_allclose(res.loglik[g], loglik(w), **CLOSED_FORM)


def test_cells_noise_needs_cell_counts_and_a_likelihood():
    data, _ = cell_data()
    with pytest.raises(ValueError, match="noise='cells' is a likelihood"):
        cj.fit(data, "free", "he", noise="cells")
    plain = cj.CTPData.from_arrays(data.Y, data.ctnu, data.P, mask=data.mask)
    with pytest.raises(ValueError, match="noise='cells' needs the cells"):
        cj.fit(plain, "free", "reml", noise="cells")


@pytest.mark.parametrize("method", METHODS)
def test_cells_score_test_and_lrt_against_dense(method):
    """p_V under noise="cells": the score of V at the hom fit (hom2 and s2 refitted), with
    variance I_VV - I_Vh I_hh^-1 I_hV over all cells (h = hom2, s2_1..s2_C), chi2(C); and the
    LRT, 2 (l_free - l_hom) ~ chi2(C) with both log-likelihoods dense."""
    data, cells = cell_data(G=2, seed=6)
    reml = method == "reml"
    res = cj.fit(data, "free", method, noise="cells")
    hom = cj.fit(data, "hom", method, noise="cells")
    loglik = reference.reml_loglik if reml else reference.ml_loglik
    for g in range(2):
        hom2, s2 = hom.phi[g, 0], hom.phi[g, 1:]
        y, X, Sigma, Zs = dense_cells(cells, g, hom2 * np.ones((C, C)), s2)
        Pm = reference.projection(X, Sigma) if reml else np.linalg.inv(Sigma)
        u = reference.projection(X, Sigma) @ y
        Ks = dense_kernels(Zs, FREE_KERNELS)
        s = np.array([0.5 * (np.trace(Pm @ K) - u @ K @ u) for K in Ks])
        info = np.array([[0.5 * np.trace(Pm @ K @ Pm @ L) for L in Ks] for K in Ks])
        v, h = [1, 2, 3], [0, 4, 5, 6]
        assert_allclose(s[h], 0.0, **OPTIMIZER)  # the null fit's own score
        var = info[np.ix_(v, v)] - info[np.ix_(v, h)] @ np.linalg.solve(
            info[np.ix_(h, h)], info[np.ix_(h, v)])  # fmt: skip
        p_score = stats.chi2.sf(s[v] @ np.linalg.solve(var, s[v]), C)
        assert_allclose(res.table["p_V"].iloc[g], p_score, rtol=1e-6)
        w = res.phi[g]
        l1 = loglik(*dense_cells(cells, g, w[0] + np.diag(w[1:4]), w[4:])[:3])
        assert_allclose(res.table["loglik_null"].iloc[g], loglik(y, X, Sigma), **CLOSED_FORM)
        lrt = 2 * (l1 - loglik(y, X, Sigma))
        assert_allclose(res.table["p_V_lrt"].iloc[g], stats.chi2.sf(lrt, C), **CLOSED_FORM)
