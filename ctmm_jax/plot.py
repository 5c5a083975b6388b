"""Diagnostics and figures: QQ plots with the genomic inflation factor, variance partitions and
estimates with confidence intervals.

The computations (`genomic_inflation`, `qq_points`, `variance_partition`,
`confidence_intervals`) are plain NumPy/pandas. The plots need matplotlib, an optional
dependency (`pip install "ctmm_jax[plot]"`) imported only when a plot function is called. Plot
functions draw on `ax` (a new figure when None), return the Axes and never call `plt.show()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from . import models
from .data import CTPData, OPData

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .results import FitResult

MAX_LABELLED_GENES = 50  # beyond this, per-gene plots drop gene tick labels (and bars)
COLORS = {"shared": "C0", "specific": "C1", "random": "C2", "noise": "0.7"}


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            'ctmm_jax.plot needs matplotlib for plotting: pip install "ctmm_jax[plot]"'
        ) from e
    return plt


def _new_axes(ax, figsize):
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _pvalues(p, name: str = "p") -> np.ndarray:
    """p as a flat float array without NaNs; ValueError when empty or outside [0, 1]."""
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p[~np.isnan(p)]
    if p.size == 0:
        raise ValueError(f"{name}: no p values (empty, or all NaN).")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"{name}: p values must lie in [0, 1] (min {p.min():g}, max {p.max():g}).")
    return p


def genomic_inflation(p) -> float:
    """Genomic inflation factor lambda_GC = median_g chi2_1.isf(p_g) / chi2_1.ppf(0.5).

    Under the null (p ~ U(0, 1)) lambda_GC ~ 1; > 1 means inflated test statistics. NaNs are
    ignored; p = 0 (an underflowed p value) counts as an infinite statistic.

    Args:
        p: (G,) p values in [0, 1].
    Returns:
        lambda_GC. Raises ValueError when no p value is left or one lies outside [0, 1].
    """
    p = _pvalues(p)
    return float(np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1))


class QQPoints(NamedTuple):
    """QQ plot coordinates (-log10 scale), ordered from the smallest p value.

    expected: (n,) -log10(i / (n + 1)); observed: (n,) -log10 p_(i); lower, upper: (n,)
    pointwise band, or None when not requested.
    """

    expected: np.ndarray
    observed: np.ndarray
    lower: np.ndarray | None
    upper: np.ndarray | None


def qq_points(p, band: bool = True, level: float = 0.95) -> QQPoints:
    """Expected and observed -log10 p for a QQ plot against U(0, 1).

    The i-th smallest of n uniform p values is U_(i) ~ Beta(i, n - i + 1), with mean
    i / (n + 1): the expected value is -log10(i / (n + 1)) and the pointwise band at `level`
    is -log10 of the Beta(i, n - i + 1) quantiles (1 + level) / 2 (lower) and (1 - level) / 2
    (upper). NaNs are dropped; p = 0 gives an infinite observed value.

    Args:
        p: (G,) p values in [0, 1].
        band: also compute the band.
        level: coverage of the band, in (0, 1).
    Returns:
        QQPoints with arrays of the n non-NaN p values, sorted from the smallest p.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level}: must lie in (0, 1).")
    p = np.sort(_pvalues(p))
    n = p.size
    i = np.arange(1, n + 1)
    with np.errstate(divide="ignore"):  # p = 0 -> inf, kept on purpose
        observed = -np.log10(p)
    expected = -np.log10(i / (n + 1))
    lower = upper = None
    if band:
        alpha = 1.0 - level
        lower = -np.log10(stats.beta.ppf(1.0 - alpha / 2, i, n - i + 1))
        upper = -np.log10(stats.beta.ppf(alpha / 2, i, n - i + 1))
    return QQPoints(expected, observed, lower, upper)


def _natural_vc(result: FitResult) -> tuple[np.ndarray, np.ndarray]:
    """(hom2 (G,), V (G, C, C)) from result.phi through models.unpack (full: hom2 = 0)."""
    C = len(result.celltypes)
    k = models.n_var(result.model, C)
    vc = jax.vmap(lambda phi: models.unpack(phi, result.model, C))(jnp.asarray(result.phi[:, :k]))
    return np.asarray(vc.hom2), np.asarray(vc.V)


def _check_pair(result: FitResult, data) -> None:
    if not isinstance(data, CTPData | OPData):
        raise ValueError(f"data: expected CTPData or OPData, got {type(data).__name__}.")
    if tuple(data.genes) != tuple(result.genes) or tuple(data.celltypes) != tuple(result.celltypes):
        raise ValueError(
            "data: its genes or cell types differ from the result's; pass the data the result "
            "was fitted on."
        )


def _observed_mean(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean over all axes but the first, of the entries where mask is True (all when None)."""
    axes = tuple(range(1, x.ndim))
    if mask is None:
        return x.mean(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):  # nothing observed -> NaN
        return np.where(mask, x, 0.0).sum(axis=axes) / mask.sum(axis=axes)


def variance_partition(result: FitResult, data: CTPData | OPData) -> pd.DataFrame:
    """Average variance of one observed pseudobulk value, split into its parts.

    CTP, per observed (donor i, cell type c): var y_ic = hom2 + V_cc + ctnu_ic, so

        shared = hom2,  specific = mean_(i,c) V_cc,  noise = mean_(i,c) ctnu_ic;

    OP, per observed donor i: var y_i = hom2 + P_i^T V P_i + nu_i (P_i sums to 1), so

        shared = hom2,  specific = mean_i P_i^T V P_i,  noise = mean_i nu_i,

    with P_i the gene's renormalised proportions (`data.P_gene`) when there are missing values.
    Means run over the observed entries (`data.mask`); without a mask the CTP specific part is
    mean_c V_cc. V comes from the fitted parameters (models.unpack): 0 (hom), v I (iid),
    diag(V) (free), or the full V with hom2 = 0 (full absorbs hom2 into V, so its `specific`
    holds the whole between-donor variance). A fit with random covariates adds `random`, the
    sum of the table's `randomvar_*` (r2 tr(R^T R) / N each).

    Negative estimates (allowed unless fitted with nonneg=True) are kept as they are in the
    variance columns; the fractions use the estimates clipped at 0,
    frac_x = max(x, 0) / sum_y max(y, 0), so they lie in [0, 1] and sum to 1. Genes without
    estimates (NaN) get NaN fractions.

    Args:
        result: a fit of `data`.
        data: the CTPData or OPData it was fitted on.
    Returns:
        DataFrame indexed by gene: shared, specific[, random], noise, total (their sum) and
        frac_shared, frac_specific[, frac_random], frac_noise.
    """
    _check_pair(result, data)
    hom2, V = _natural_vc(result)
    if isinstance(data, CTPData):
        diag = np.diagonal(V, axis1=1, axis2=2)  # (G, C)
        specific = _observed_mean(np.broadcast_to(diag[:, None, :], data.shape), data.mask)
        noise = _observed_mean(data.ctnu, data.mask)
    else:
        P = data.P_gene if data.P_gene is not None else np.broadcast_to(data.P, data.shape)
        specific = _observed_mean(np.einsum("gnc,gcd,gnd->gn", P, V, P), data.mask)
        noise = _observed_mean(data.nu, data.mask)
    parts = {"shared": hom2, "specific": specific}
    random = [c for c in result.table.columns if c.startswith("randomvar_")]
    if random:
        parts["random"] = result.table[random].to_numpy(np.float64).sum(axis=1)
    parts["noise"] = noise
    out = pd.DataFrame(parts, index=pd.Index(result.genes, name="gene"))
    out["total"] = out.sum(axis=1, skipna=False)
    clipped = out[list(parts)].clip(lower=0.0)
    frac = clipped.div(clipped.sum(axis=1, skipna=False), axis=0)
    return out.join(frac.add_prefix("frac_"))


def _default_params(result: FitResult) -> list[str]:
    names = models.param_names(result.model, list(result.celltypes))
    rand = [c for c in result.table.columns if c.startswith("r2_")]
    return names + rand


def _column(result: FitResult, param: str) -> str:
    """Table column of `param`; iid's single "V" is the table's (repeated) V_<first ct>."""
    if param == "V" and result.model == "iid":
        return f"V_{result.celltypes[0]}"
    return param


def confidence_intervals(
    result: FitResult, params: list[str] | None = None, level: float = 0.95,
    jackknife: bool = False,
) -> pd.DataFrame:  # fmt: skip
    """Wald confidence intervals estimate +- z se, z = Phi^-1((1 + level) / 2).

    The normal quantile is used (large-sample; the table's p values use t with N - n_par
    degrees of freedom). se is the table's `se_<param>` (inverse information; NaN for HE) or,
    with jackknife=True, `se_<param>_jk` (fit with jackknife=True).

    Args:
        result: a fit.
        params: table parameter names, e.g. ["hom2", "V_ct0", "beta_ct0"]; "V" is iid's v.
            Default: the model's variance parameters (models.param_names; iid: hom2, V) and
            any random-covariate variances r2_*.
        level: coverage in (0, 1).
        jackknife: use the jackknife standard errors.
    Returns:
        Long DataFrame, one row per (gene, param), gene-major: gene, param, estimate, se,
        lower, upper.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level}: must lie in (0, 1).")
    params = _default_params(result) if params is None else list(params)
    if not params:
        raise ValueError("params: give at least one parameter.")
    table, suffix = result.table, "_jk" if jackknife else ""
    est, se = [], []
    for param in params:
        col = _column(result, param)
        if col not in table.columns:
            raise ValueError(
                f"params: {param!r} is not a column of the {result.model} fit's table; "
                f"use e.g. {', '.join(_default_params(result))}."
            )
        if f"se_{col}{suffix}" not in table.columns:
            fix = "fit with jackknife=True" if jackknife else "it has no standard error"
            raise ValueError(f"params: no se_{col}{suffix} column for {param!r} ({fix}).")
        est.append(table[col].to_numpy(np.float64))
        se.append(table[f"se_{col}{suffix}"].to_numpy(np.float64))
    est, se = np.stack(est, axis=1), np.stack(se, axis=1)  # (G, n_params)
    z = stats.norm.ppf((1.0 + level) / 2.0)
    G, k = est.shape
    return pd.DataFrame(
        {
            "gene": np.repeat(np.asarray(result.genes, dtype=object), k),
            "param": np.tile(np.asarray(params, dtype=object), G),
            "estimate": est.ravel(),
            "se": se.ravel(),
            "lower": (est - z * se).ravel(),
            "upper": (est + z * se).ravel(),
        }
    )


def qq(p, ax: Axes | None = None, label: str | None = None, band: bool = True) -> Axes:
    """QQ plot of -log10 p against U(0, 1) (qq_points), with the y = x line, the pointwise 95%
    band of the largest series and lambda_GC (genomic_inflation) of each series in the legend.

    Args:
        p: (G,) p values, or a dict name -> p values for several series.
        ax: Axes to draw on; a new figure when None.
        label: name of a single series (ignored for a dict).
        band: draw the band.
    Returns:
        The Axes. p = 0 (infinite -log10 p) is drawn at the top of its series' finite values.
    """
    series = dict(p) if isinstance(p, dict) else {label: p}
    if not series:
        raise ValueError("p: no series given.")
    points = {name: qq_points(v, band=band) for name, v in series.items()}
    ax = _new_axes(ax, (5, 5))
    biggest = max(points.values(), key=lambda q: q.expected.size)
    if band:
        ax.fill_between(
            biggest.expected, biggest.lower, biggest.upper, color="0.85", lw=0, label="95% band"
        )
    for name, (expected, observed, _, _) in points.items():
        finite = observed[np.isfinite(observed)]
        cap = finite.max() if finite.size else expected.max()
        observed = np.minimum(observed, cap)
        lam = genomic_inflation(series[name])
        text = rf"$\lambda_{{GC}}$ = {lam:.3f}"
        ax.scatter(
            expected, observed, s=8, label=text if name is None else f"{name} ({text})",
            rasterized=expected.size > 5000,
        )  # fmt: skip
    ax.axline((0.0, 0.0), slope=1.0, color="k", lw=1, ls="--")  # infinite: no effect on limits
    ax.set_xlabel(r"expected $-\log_{10} p$")
    ax.set_ylabel(r"observed $-\log_{10} p$")
    ax.legend(loc="upper left", frameon=False)
    return ax


def variance_partition_plot(
    result: FitResult, data: CTPData | OPData, ax: Axes | None = None, sort: bool = True
) -> Axes:
    """Stacked fractions of variance per gene (variance_partition: shared, specific[, random],
    noise; negative estimates clipped at 0).

    Up to 50 genes: one stacked bar per gene, labelled. More genes: stacked areas over the gene
    rank without gene labels (readable for thousands of genes). Genes without estimates are
    left out (counted in the title).

    Args:
        result, data: as variance_partition.
        ax: Axes to draw on; a new figure when None.
        sort: order genes by decreasing specific fraction (else the data's order).
    Returns:
        The Axes.
    """
    vp = variance_partition(result, data)
    parts = [c[5:] for c in vp.columns if c.startswith("frac_")]
    frac = vp[[f"frac_{c}" for c in parts]].dropna()
    dropped = len(vp) - len(frac)
    if frac.empty:
        raise ValueError("result: no gene has variance estimates to plot.")
    if sort:
        frac = frac.sort_values("frac_specific", ascending=False, kind="stable")
    G = len(frac)
    labelled = G <= MAX_LABELLED_GENES
    ax = _new_axes(ax, (max(6.0, 0.22 * G) if labelled else 8.0, 4.0))
    values = [frac[f"frac_{c}"].to_numpy() for c in parts]
    colors = [COLORS[c] for c in parts]
    if labelled:
        x, bottom = np.arange(G), np.zeros(G)
        for name, v, color in zip(parts, values, colors, strict=True):
            ax.bar(x, v, bottom=bottom, width=0.85, color=color, label=name)
            bottom = bottom + v
        ax.set_xticks(x, frac.index, rotation=90, fontsize=8)
        ax.set_xlim(-0.6, G - 0.4)
        ax.set_xlabel("gene")
    else:
        ax.stackplot(np.arange(1, G + 1), *values, colors=colors, labels=parts, lw=0)
        ax.set_xlim(1, G)
        ax.set_xlabel("gene rank" + (" (by specific fraction)" if sort else ""))
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of variance")
    title = f"{result.model} {result.method.upper()}: {G} genes"
    ax.set_title(title + (f" ({dropped} without estimates left out)" if dropped else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return ax


def estimates_plot(
    result: FitResult, params: list[str] | None = None, genes: list[str] | None = None,
    level: float = 0.95, jackknife: bool = False, ax: Axes | None = None,
) -> Axes:  # fmt: skip
    """Point estimates with confidence intervals (confidence_intervals: estimate +- z se) per
    gene, one color per parameter, dodged side by side; a dotted line marks 0.

    Args:
        result: a fit.
        params: as confidence_intervals (default: the variance parameters).
        genes: genes to show, in this order (default: all; gene labels only up to 50 genes).
        level, jackknife: as confidence_intervals.
        ax: Axes to draw on; a new figure when None.
    Returns:
        The Axes. Genes with a NaN standard error are drawn without error bars.
    """
    ci = confidence_intervals(result, params, level, jackknife)
    params = list(dict.fromkeys(ci["param"]))
    genes = list(result.genes) if genes is None else [str(g) for g in genes]
    unknown = sorted(set(genes) - set(result.genes))
    if unknown:
        raise ValueError(f"genes: {len(unknown)} not in the result, e.g. {unknown[0]!r}.")
    G, k = len(genes), len(params)
    labelled = G <= MAX_LABELLED_GENES
    ax = _new_axes(ax, (max(6.0, 0.3 * G) if labelled else 10.0, 4.0))
    width = 0.8 / k
    ci = ci.set_index(["param", "gene"])
    for j, param in enumerate(params):
        sub = ci.loc[param].loc[genes]
        est = sub["estimate"].to_numpy()
        err = np.abs(np.stack([est - sub["lower"].to_numpy(), sub["upper"].to_numpy() - est]))
        x = np.arange(G) + (j - (k - 1) / 2) * width
        ax.errorbar(
            x, est, yerr=np.nan_to_num(err), fmt="o", ms=3, lw=1, capsize=0,
            color=f"C{j % 10}", label=param,
        )  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    if labelled:
        ax.set_xticks(np.arange(G), genes, rotation=90, fontsize=8)
        ax.set_xlabel("gene")
    else:
        ax.set_xlabel("gene (position)")
    se = "jackknife" if jackknife else "Wald"
    ax.set_ylabel(f"estimate ({level:.0%} CI, {se} se)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return ax
