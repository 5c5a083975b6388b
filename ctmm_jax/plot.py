"""Figures, and only figures: QQ plots with the genomic inflation factor, variance partitions
and estimates with confidence intervals.

The statistics they draw live in `ctmm_jax.inference` (`genomic_inflation`, `qq_points`,
`variance_partition`, `confidence_intervals`; re-exported here). Plotting needs matplotlib, an
optional dependency (`pip install "ctmm_jax[plot]"`) imported only when a plot function is
called. Plot functions draw on `ax` (a new figure when None), return the Axes and never call
`plt.show()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .inference import QQPoints as QQPoints
from .inference import confidence_intervals as confidence_intervals
from .inference import genomic_inflation as genomic_inflation
from .inference import qq_points as qq_points
from .inference import variance_partition as variance_partition

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .data import CTPData, OPData
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
    noise; negative estimates clipped at 0), drawn by `partition_plot`.

    Args:
        result, data: as variance_partition.
        ax: Axes to draw on; a new figure when None.
        sort: order genes by decreasing specific fraction (else the data's order).
    Returns:
        The Axes.
    """
    vp = variance_partition(result, data)
    return partition_plot(vp, f"{result.model} {result.method.upper()}", ax=ax, sort=sort)


def partition_plot(vp, title: str = "", ax: Axes | None = None, sort: bool = True) -> Axes:
    """Stacked fractions of variance per gene of a `variance_partition` table.

    Up to 50 genes: one stacked bar per gene, labelled. More genes: stacked areas over the gene
    rank without gene labels (readable for thousands of genes). Genes without estimates are
    left out (counted in the title).

    Args:
        vp: a table of `variance_partition` (or `partition_variance`): frac_* columns by gene.
        title: the start of the title (e.g. "free REML"), followed by the number of genes.
        ax: Axes to draw on; a new figure when None.
        sort: order genes by decreasing specific fraction (else the table's order).
    Returns:
        The Axes.
    """
    parts = [c[5:] for c in vp.columns if c.startswith("frac_")]
    frac = vp[[f"frac_{c}" for c in parts]].dropna()
    dropped = len(vp) - len(frac)
    if frac.empty:
        raise ValueError("vp: no gene has variance estimates to plot (all NaN).")
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
    title = f"{title}: {G} genes" if title else f"{G} genes"
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
