"""Wald tests and the LRT, with the conventions of the original CTMM (design.md section 5).

All functions are vectorised over genes (leading axis) and run on the host with SciPy's
distributions. df = N - n_par, n_par = number of variance parameters + number of fixed effects.

- hom2 = 0: one-sided t,  p = t.sf(hom2 / se, df)
- V = 0: iid, one-sided t on v; free, F = v^T Var(v)^-1 v / C, p = f.sf(F, C, df)
- equal cell-type means: T = [I_{C-1}, -1], F = (T b)^T (T Var(b) T^T)^-1 (T b) / (C-1)
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _quad_form(v: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """v^T cov^-1 v per gene; v: (G, k), cov: (G, k, k). NaN where cov is not positive definite."""
    ok = np.all(np.isfinite(cov), axis=(1, 2)) & np.all(np.isfinite(v), axis=1)
    w, U = np.linalg.eigh(np.where(ok[:, None, None], cov, np.eye(cov.shape[-1])))
    ok &= w[:, 0] > 0
    proj = np.einsum("gkj,gk->gj", U, np.where(ok[:, None], v, 0.0))
    return np.where(ok, np.sum(proj**2 / np.where(ok[:, None], w, 1.0), axis=-1), np.nan)


def wald_t(est: np.ndarray, var: np.ndarray, df) -> np.ndarray:
    """One-sided t test of est > 0: t.sf(est / sqrt(var), df); NaN where var <= 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(var > 0, est / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)
    return stats.t.sf(z, df)


def wald_f(v: np.ndarray, cov: np.ndarray, df) -> np.ndarray:
    """Wald F test of v = 0: F = v^T cov^-1 v / k, p = f.sf(F, k, df). v: (G, k), cov: (G, k, k)."""
    k = v.shape[-1]
    return stats.f.sf(_quad_form(v, cov) / k, k, df)


def ct_beta_contrast(C: int) -> np.ndarray:
    """T = [I_{C-1}, -1] (C-1, C): contrasts beta_c - beta_C."""
    return np.hstack([np.eye(C - 1), -np.ones((C - 1, 1))])


def wald_ct_beta(beta: np.ndarray, cov: np.ndarray, df) -> np.ndarray:
    """F test of equal cell-type means. beta: (G, C); cov: (G, C, C)."""
    T = ct_beta_contrast(beta.shape[-1])
    return wald_f(beta @ T.T, T @ cov @ T.T, df)


def jackknife_cov(reps: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """(n-1)/n sum_i (x_(-i) - mean)(x_(-i) - mean)^T over the replicate axis, counting only
    the replicates where `present` (G, N) is True (default all; n = their number).
    reps: (G, N, k) -> (G, k, k)."""
    if present is None:
        present = np.ones(reps.shape[:2], bool)
    w = present[..., None].astype(np.float64)
    n = w.sum(axis=1, keepdims=True)
    x = np.where(w > 0, reps, 0.0)
    dev = (x - (x * w).sum(axis=1, keepdims=True) / n) * w
    return ((n[:, 0] - 1) / n[:, 0])[:, :, None] * np.einsum("gni,gnj->gij", dev, dev)


def lrt(l1, l0, k):
    """Likelihood-ratio test: chi2.sf(2 (l1 - l0), k), l1 and l0 the log-likelihoods of the
    larger and the nested model, k the difference in number of parameters."""
    return stats.chi2.sf(2.0 * (np.asarray(l1) - np.asarray(l0)), k)
