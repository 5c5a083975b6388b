"""Statistical inference from fitted quantities: Wald tests and the LRT (with the conventions of
the original CTMM, design.md section 5), jackknife covariances, and the summaries drawn by
`ctmm_jax.plot` (genomic inflation, QQ coordinates, variance partition, confidence intervals).

All functions are vectorised over genes (leading axis) and run on the host with NumPy/SciPy;
nothing here draws. df = N - n_par, n_par = number of variance parameters + number of fixed
effects.

- hom2 = 0: one-sided t,  p = t.sf(hom2 / se, df)
- V = 0: iid, one-sided t on v; free, F = v^T Var(v)^-1 v / C, p = f.sf(F, C, df)
- equal cell-type means: T = [I_{C-1}, -1], F = (T b)^T (T Var(b) T^T)^-1 (T b) / (C-1)
- nested models: LRT, p = chi2.sf(2 (l1 - l0), k)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

from . import models
from .data import CTPData, OPData

if TYPE_CHECKING:  # results.py imports this module
    from .results import FitResult


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


def wald_pvalues(model, phi, var_cov, ct_beta, ct_beta_cov, df) -> dict[str, np.ndarray]:
    """The model's Wald tests (models.ModelSpec.tests: p_hom2, p_V, ...; one parameter:
    one-sided t, several: F) and p_ct_beta, as the original CTMM (design.md section 5).
    phi: (G, k), var_cov: (G, k, k), ct_beta: (G, C), ct_beta_cov: (G, C, C), df: (G,)."""
    out = {}
    for name, idx in models.get(model).tests(ct_beta.shape[1]).items():
        if len(idx) == 1:
            out[name] = wald_t(phi[:, idx[0]], var_cov[:, idx[0], idx[0]], df)
        else:
            out[name] = wald_f(phi[:, idx], var_cov[:, idx[:, None], idx], df)
    out["ct_beta"] = wald_ct_beta(ct_beta, ct_beta_cov, df)
    return out


def score_test(score: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Score (Rao) test of V = 0 at the null fit from the score s = d nll / d V (G, k) and its
    variance (G, k, k) (nulltest.score_variance): T = s^T var^-1 s ~ chi2(k); one parameter
    (iid's v): the one-sided z = -s / sqrt(var) ~ N(0, 1) against v > 0, p = norm.sf(z). NaN
    where var is not positive definite or anything is not finite."""
    ok = np.isfinite(var).all((1, 2)) & np.isfinite(score).all(1)
    var, s = (
        np.where(ok[:, None, None], var, np.eye(var.shape[-1])),
        np.where(ok[:, None], score, 0.0),
    )
    ok &= np.linalg.eigvalsh(var)[:, 0] > 0
    var = np.where(ok[:, None, None], var, np.eye(var.shape[-1]))  # singular: solve would raise
    if score.shape[1] == 1:
        z = -s[:, 0] / np.sqrt(np.where(ok, var[:, 0, 0], 1.0))
        return np.where(ok, stats.norm.sf(z), np.nan)
    T = np.einsum("gi,gi->g", s, np.linalg.solve(var, s[..., None])[..., 0])
    return np.where(ok, stats.chi2.sf(T, score.shape[1]), np.nan)


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg q values of p (any shape), over the non-NaN entries (NaN stays NaN):
    q_(i) = min_{j >= i} m p_(j) / j for the m sorted p values, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m:
        order = np.argsort(p[ok])
        ranked = p[ok][order] * m / np.arange(1, m + 1)
        out = np.empty(m)
        out[order] = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
        q[ok] = out
    return q


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


def lrt(l1, l0, k, boundary: bool = False):
    """Likelihood-ratio test: p = chi2.sf(2 (l1 - l0), k); with `boundary` (k variances tested
    at 0 in a fit that keeps them >= 0, nonneg=True) the chi-bar-square mixture of Self and
    Liang (1987), p = sum_j binom(k, j) 2^-k chi2.sf(T, j) (chi2_0: a point mass at 0). The
    binomial weights are exact for uncorrelated estimates of the k variances and an
    approximation otherwise.

    Args:
        l1, l0: (G,) or scalar log-likelihoods of the larger and of the nested model, e.g.
            `free.table["loglik"]` and `hom.table["loglik"]`.
        k: difference in number of parameters (int).
        boundary: the nested model's k parameters lie on the boundary of the larger one's.
    Returns:
        (G,) p values: a pandas Series named "p_lrt" with the index of l1 (or l0) when either is
        a Series, else a NumPy array. Two Series must share their index (no silent alignment).
    """
    series = [x for x in (l1, l0) if isinstance(x, pd.Series)]
    if len(series) == 2 and not l1.index.equals(l0.index):
        raise ValueError("l0: its index differs from l1's; pass both from fits of the same genes.")
    with np.errstate(invalid="ignore"):  # -inf - -inf (two infeasible fits): NaN, no warning
        diff = np.asarray(l1, dtype=np.float64) - np.asarray(l0, dtype=np.float64)
    stat = 2.0 * diff
    if boundary:
        j = np.arange(1, int(k) + 1)
        weights = np.array([math.comb(int(k), int(i)) for i in j]) / 2.0 ** int(k)
        tail = stats.chi2.sf(np.asarray(stat)[..., None], j) @ weights
        p = np.where(stat > 0, tail, np.where(np.isnan(stat), np.nan, 1.0))
    else:
        p = stats.chi2.sf(stat, k)
    return pd.Series(p, index=series[0].index, name="p_lrt") if series else p


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


def natural_vc(phi: np.ndarray, model: str, C: int) -> tuple[np.ndarray, np.ndarray]:
    """(hom2 (G,), V (G, C, C)) from parameters phi (G, n_var[ + n_rand]) of `model` through
    models.unpack (full: hom2 = 0); the random covariates' r2 after n_var are ignored."""
    k = models.n_var(model, C)
    phi = jnp.asarray(np.asarray(phi, dtype=np.float64)[:, :k])
    vc = jax.vmap(lambda theta: models.unpack(theta, model, C))(phi)
    return np.asarray(vc.hom2), np.asarray(vc.V)


def parameters_from_table(table: pd.DataFrame, model: str, celltypes) -> np.ndarray:
    """The parameters phi (G, n_var) of `model` read back from a results table (`fit`'s, or a
    file it wrote): the first table column of each parameter (models.table_columns)."""
    columns = models.table_columns(model, list(celltypes))[: models.n_var(model, len(celltypes))]
    names = [cols[0] for cols in columns]
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise ValueError(
            f"table: no column {missing[0]!r} of the {model} model with cell types "
            f"{list(celltypes)}; pass the table of a {model} fit of these cell types."
        )
    return table[names].to_numpy(np.float64)


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
    hom2, V = natural_vc(result.phi, result.model, len(result.celltypes))
    random = [c for c in result.table.columns if c.startswith("randomvar_")]
    extra = result.table[random].to_numpy(np.float64).sum(axis=1) if random else None
    return partition_variance(hom2, V, data, random=extra)


def partition_variance(
    hom2: np.ndarray, V: np.ndarray, data: CTPData | OPData, random: np.ndarray | None = None
) -> pd.DataFrame:
    """`variance_partition` from the natural parameters of every gene of `data`.

    Args:
        hom2: (G,) shared donor variance; V: (G, C, C) cell type-specific covariance
            (`natural_vc`).
        data: the CTPData or OPData (G genes) the parameters were fitted on.
        random: (G,) variance explained by the random covariates (the sum of a table's
            `randomvar_*`), or None when the fit had none.
    Returns:
        As variance_partition.
    """
    if not isinstance(data, CTPData | OPData):
        raise ValueError(f"data: expected CTPData or OPData, got {type(data).__name__}.")
    hom2, V = np.asarray(hom2, dtype=np.float64), np.asarray(V, dtype=np.float64)
    G, _, C = data.shape
    if hom2.shape != (G,) or V.shape != (G, C, C):
        raise ValueError(
            f"hom2, V: shapes {hom2.shape} and {V.shape}; the data have {G} genes and {C} "
            f"cell types, so pass ({G},) and ({G}, {C}, {C})."
        )
    if isinstance(data, CTPData):
        diag = np.diagonal(V, axis1=1, axis2=2)  # (G, C)
        specific = _observed_mean(np.broadcast_to(diag[:, None, :], data.shape), data.mask)
        noise = _observed_mean(data.ctnu, data.mask)
    else:
        P = data.P_gene if data.P_gene is not None else np.broadcast_to(data.P, data.shape)
        specific = _observed_mean(np.einsum("gnc,gcd,gnd->gn", P, V, P), data.mask)
        noise = _observed_mean(data.nu, data.mask)
    parts = {"shared": hom2, "specific": specific}
    if random is not None:
        parts["random"] = np.asarray(random, dtype=np.float64)
    parts["noise"] = noise
    out = pd.DataFrame(parts, index=pd.Index(data.genes, name="gene"))
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
