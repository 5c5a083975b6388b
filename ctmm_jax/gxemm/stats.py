"""The original GxEMM's tests (its test_gxemm.R), as functions of the fitted quantities."""

from __future__ import annotations

import numpy as np
from scipy import stats

from .. import inference

EIG_TOL = 1e8  # MVWaldtest: NaN when the eigenvalue ratio of V exceeds this


def wald_test(z, var) -> np.ndarray:
    """One-sided Wald test of z > 0: P(N(0, 1) > z / sqrt(var)) (the original's Waldtest)."""
    return stats.norm.sf(np.asarray(z) / np.sqrt(np.asarray(var)))


def mvwald_test(z, V, eigtol: float = EIG_TOL) -> float:
    """Multivariate Wald test of z = 0: P(chi2_len(z) > z^T V^-1 z). NaN when V (made
    symmetric) has a negative eigenvalue or an eigenvalue ratio above eigtol, as the original's
    MVWaldtest."""
    z = np.atleast_1d(np.asarray(z, dtype=np.float64))
    V = np.atleast_2d(np.asarray(V, dtype=np.float64))
    V = 0.5 * (V + V.T)
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(V))):
        return np.nan
    ev = np.linalg.eigvalsh(V)
    if ev.max() / (ev.min() + 1e-99) > eigtol or ev.min() < 0:
        return np.nan
    return float(stats.chi2.sf(z @ np.linalg.solve(V, z), df=len(z)))


def lrt(ll1, ll0, df, boundary: bool = False) -> np.ndarray:
    """Likelihood-ratio test: P(chi2_df > 2 (ll1 - ll0)) (the original's LRtest), by
    `ctmm_jax.inference.lrt` (a Series named "p_lrt" when ll1 or ll0 is a Series); with
    `boundary` (fits with nonneg=True, the df tested components at 0) the chi-bar-square
    mixture."""
    return inference.lrt(ll1, ll0, df, boundary=boundary)


def h2_equal_test(h2, cov) -> float:
    """Wald test that the K0 environment-specific heritabilities are equal: with
    T = [1, -I_{K0-1}], P(chi2_{K0-1} > (T h2)^T (T cov T^T)^-1 (T h2))."""
    h2 = np.asarray(h2, dtype=np.float64)
    K0 = len(h2)
    Tm = np.hstack([np.ones((K0 - 1, 1)), -np.eye(K0 - 1)])
    d = Tm @ h2
    return float(stats.chi2.sf(d @ np.linalg.solve(Tm @ np.asarray(cov) @ Tm.T, d), df=K0 - 1))
