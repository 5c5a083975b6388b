"""Noise models: which measurement-noise variance of each pseudobulk value a fit uses.

ctnu_ic = s2_ic / n_ic is estimated from the pair's own n_ic cells (s2_ic their variance,
ddof=1). Treated as known ("plugin", the original CTMM), its sampling error biases V-hat up by
about 2.7 s2_c / n^2 at every N while the standard error of V-hat shrinks as 1/sqrt(N): the
test of V = 0 at size alpha rejects with noncentrality about 3 C N / n^2 (design.md 10).

"pooled" (the default wherever cell counts are known) pools the within-pair sums of squares
SS_gic = ctnu_gic n_ic (n_ic - 1) over the donors observed for each gene and cell type:

    s2_gc = sum_i SS_gic / sum_i (n_ic - 1),    ctnu_gic = s2_gc / n_ic,

and OP uses nu_gi = sum_c P_ic^2 s2_gc / n_ic.

"cells" is the exact likelihood of the cells (Gaussian within a pair, variance s2_gc): the
pseudobulk likelihood with noise s2_gc / n_ic (OP: sum_c P_ic^2 s2_gc / n_ic) plus the
within-pair term of the cells' deviations from their pair means (likelihood.within_nll2),
with s2_g1..s2_gC C more parameters fitted jointly with the model's (ML and REML; the tests of
V then treat them as nuisance parameters, refitted under the null). It uses the same values
as "pooled" and needs the same cell counts. Under every model a value whose noise variance
is 0 (every cell equal, usually all zero) is missing for the fit: it would claim the value is
known exactly and make the donor's covariance singular as V_c -> 0.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from scipy import stats

from .data import CTPData, OPData

NOISE = ("pooled", "cells", "plugin")


class PluginNoiseWarning(UserWarning):
    """The fit treats noise variances estimated from few cells as known (noise='plugin')."""


def plugin_false_positive_rate(N: int, C: int, n: float, alpha: float = 0.05) -> float:
    """Expected rejection rate at level alpha of a calibrated chi2(C) test of V = 0 on null genes
    when ctnu from n cells per pair is plugged in as known: noncentrality 3 C N / n^2
    (design.md 10; matches the measured LRT rates to about 0.03 for N = 60-300, n = 10-100)."""
    return float(stats.ncx2.sf(stats.chi2.isf(alpha, C), C, 3.0 * C * N / n**2))


def pooled_s2(ctnu: np.ndarray, n_cells: np.ndarray, pooled: np.ndarray):
    """(s2, s2_var), each (G, C): the within-pair variance pooled over the `pooled` pairs,
    s2_gc = sum_i d_i s2_gic / sum_i d_i (d_i = n_ic - 1, s2_gic = ctnu_gic n_ic; NaN where no
    pair has 2 or more cells), and its sampling variance estimated from the spread of the
    pairs' own variances, sum_i d_i^2 (s2_gic - s2_gc)^2 / (sum_i d_i)^2 (0 where undefined).
    For Gaussian cells the variance's expectation is 2 s2^2 / sum_i d_i; the estimate also holds
    for skewed cells (log counts). ctnu, pooled: (G, N, C); n_cells: (N, C) or (G, N, C)."""
    n = np.broadcast_to(n_cells, ctnu.shape)
    d = np.where(pooled, n - 1.0, 0.0)
    s2_pair = np.where(pooled, np.nan_to_num(ctnu) * n, 0.0)
    total = d.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    s2 = (d * s2_pair).sum(axis=1) / safe
    var = (d**2 * (s2_pair - s2[:, None]) ** 2).sum(axis=1) / safe**2
    return np.where(total > 0, s2, np.nan), np.where(total > 0, var, 0.0)


def _ctnu_from_s2(s2: np.ndarray, n_cells: np.ndarray, ctnu: np.ndarray) -> np.ndarray:
    """ctnu_gic = s2_gc / n_ic, and ctnu as given where s2_gc is undefined or n_ic = 0."""
    n = np.broadcast_to(n_cells, ctnu.shape)
    s2 = np.broadcast_to(s2[:, None, :], ctnu.shape)
    return np.divide(s2, n, out=np.array(ctnu, dtype=np.float64), where=np.isfinite(s2) & (n > 0))


def pooled_ctnu(ctnu: np.ndarray, n_cells: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """ctnu_gic = s2_gc / n_ic with s2_gc the within-pair variance pooled over the observed
    donors (`pooled_s2`). ctnu, observed: (G, N, C); n_cells: (N, C) or (G, N, C). Where a gene
    and cell type has no observed pair with 2 or more cells, ctnu stays as given."""
    return _ctnu_from_s2(pooled_s2(ctnu, n_cells, observed)[0], n_cells, ctnu)


class Cells(NamedTuple):
    """The cells behind each value for noise="cells" (likelihood.CellNoise), (G, N, C) each, 0
    where a pair is not in the fit: loadings d noise / d s2_c (CTP 1 / n_ic, OP P_ic^2 / n_ic),
    dof = n_ic - 1 and ss = ctnu_ic n_ic (n_ic - 1) of the pairs with a within-pair variance."""

    loadings: np.ndarray
    dof: np.ndarray
    ss: np.ndarray


class Noise(NamedTuple):
    """`apply`'s result: data with the chosen noise variances (for "cells", the pooled ones:
    start values, and the values in the fit); name: the noise model; s2_var: (G, C) the
    sampling variance of the pooled s2_gc for "pooled", else None; cells: for "cells"."""

    data: CTPData | OPData
    name: str
    s2_var: np.ndarray | None
    cells: Cells | None = None


def resolve(data: CTPData | OPData, noise: str | None) -> str:
    """The noise model `noise` names for `data`: None is "pooled" when the data carry cell
    counts, else "plugin". ValueError for an unknown name, or "pooled" without cell counts."""
    if noise is not None and noise not in NOISE:
        raise ValueError(f"noise={noise!r} is unknown; use one of {', '.join(NOISE)}.")
    if data.n_cells is None and noise in ("pooled", "cells"):
        raise ValueError(
            f"noise={noise!r} needs the cells per (donor, cell type): pass n_cells to "
            "CTPData.from_arrays / OPData.from_arrays, or build the data with "
            "`ctmm-jax pseudobulk` (Pseudobulk.to_ctp / to_op), or use noise='plugin'."
        )
    return noise or ("pooled" if data.n_cells is not None else "plugin")


def apply(data: CTPData | OPData, noise: str | None) -> Noise:
    """The data with the noise variances of model `noise` ("pooled", "cells", "plugin", or
    None: pooled when the data know their cell counts, else plugin with a PluginNoiseWarning;
    `resolve`), and values whose noise variance is 0 marked missing; with the pooled model,
    the sampling variance of the pooled within-pair variances (for the score test,
    nulltest.py); with "cells", the cells behind the values (`Cells`)."""
    if noise is None and data.n_cells is None:
        warnings.warn(plugin_warning(data), PluginNoiseWarning, stacklevel=3)
    noise = resolve(data, noise)
    if noise == "plugin":
        return Noise(_apply_ctp(data, data.ctnu) if isinstance(data, CTPData) else
                     _apply_op(data, data.nu), "plugin", None)  # fmt: skip
    G, N, C = data.shape
    n = np.broadcast_to(data.n_cells, (G, N, C))
    if isinstance(data, CTPData):
        pooled = np.ones(data.shape, bool) if data.mask is None else data.mask
        s2, s2_var = pooled_s2(data.ctnu, data.n_cells, pooled)
        new = _apply_ctp(data, _ctnu_from_s2(s2, data.n_cells, data.ctnu))
        in_fit = np.ones(data.shape, bool) if new.mask is None else new.mask
        loadings = np.divide(1.0, n, out=np.zeros(n.shape), where=in_fit & (n > 0))
    else:
        P = np.broadcast_to(data.P if data.P_gene is None else data.P_gene, (G, N, C))
        # pairs with a within-pair variance, of the donors observed for the gene
        pooled = (P > 0) & np.isfinite(data.ctnu) & data.observed_donors[..., None]
        s2, s2_var = pooled_s2(data.ctnu, data.n_cells, pooled)
        ctnu = _ctnu_from_s2(s2, data.n_cells, data.ctnu)
        new = _apply_op(data, np.einsum("gnc,gnc->gn", np.where(P > 0, ctnu, 0.0), P**2))
        in_fit = pooled & new.observed_donors[..., None]
        loadings = np.divide(P**2, n, out=np.zeros(n.shape), where=(P > 0) & (n > 0))
        loadings = loadings * new.observed_donors[..., None]
    if noise == "pooled":
        return Noise(new, "pooled", s2_var)
    dof = np.where(in_fit, n - 1.0, 0.0)
    cells = Cells(loadings, dof, np.where(in_fit, np.nan_to_num(data.ctnu) * n * dof, 0.0))
    return Noise(new, "cells", None, cells)


def _apply_ctp(data: CTPData, ctnu: np.ndarray) -> CTPData:
    """data with noise variances ctnu; values with ctnu = 0 (or undefined) missing."""
    keep = (np.ones(data.shape, bool) if data.mask is None else data.mask) & (ctnu > 0)
    mask = None if keep.all() else keep
    Y, ctnu = np.where(keep, data.Y, 0.0), np.where(keep, ctnu, 1.0)
    return replace(data, Y=Y, ctnu=ctnu, mask=mask)


def _apply_op(data: OPData, nu: np.ndarray) -> OPData:
    """data with noise variances nu; donors with nu = 0 (or NaN: no s2_gc) missing."""
    keep = data.observed_donors & (nu > 0)
    mask = None if keep.all() else keep
    return replace(data, y=np.where(keep, data.y, 0.0), nu=np.where(keep, nu, 1.0), mask=mask)


def plugin_warning(data: CTPData | OPData) -> str:
    G, N, C = data.shape
    text = (
        "the data carry no cell counts, so the fit uses the plug-in noise variances "
        "(noise='plugin'): ctnu estimated from each pair's own cells, treated as known. "
    )
    if isinstance(data, CTPData):
        rates = ", ".join(
            f"{plugin_false_positive_rate(N, C, n):.0%} at {n}" for n in (10, 25, 50, 100)
        )
        text += (
            f"With N = {N} donors and C = {C} cell types the test of V = 0 then rejects about "
            f"{rates} cells per pair of null genes at p < 0.05. "
        )
    return text + (
        "Pass n_cells (cells per donor and cell type) to from_arrays, or build the data with "
        "`ctmm-jax pseudobulk`, to use noise='pooled'; pass noise='plugin' to silence this."
    )
