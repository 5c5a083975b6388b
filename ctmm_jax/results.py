"""Per-gene results: estimates -> final status -> Wald tests -> one pandas row per gene, and
the declared table columns (`column_dictionary`: name, dtype, meaning, units)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import inference, models, status
from .estimators import Estimates, final_status
from .jackknife import Jackknife
from .nulltest import NullFit
from .robust import Sandwich
from .status import Status

JK_MAX_FAILED = 0.05  # jackknife p values need at least 95% of the replicates to end ok

# The table's columns: exact names, then patterns (<x> is a cell type, parameter or covariate
# name) in the order they are matched. dtype, meaning, units ("y" = the expression's unit).
COLUMNS: list[tuple[str, str, str, str]] = [
    ("hom2", "float64", "variance of the donor effect shared by all cell types", "y^2"),
    (
        "loglik",
        "float64",
        "log-likelihood at the estimates (ML or REML, with the 2 pi constants; NaN for HE)",
        "nats",
    ),  # fmt: skip
    ("n_donors", "int64", "donors with an observed value", "count"),
    ("converged", "bool", "status == 'ok'", ""),
    ("n_iter", "int64", "optimizer iterations (0 for HE)", "count"),
    (
        "status",
        "object",
        "outcome: ok, max_iter, no_descent, boundary, infeasible_start, "
        "singular_info, constant, not_finite, not_identified, too_few_donors (ctmm_jax.status)",
        "",
    ),  # fmt: skip
    ("message", "object", "the status in words", ""),
    ("loglik_null", "float64", "log-likelihood of the null model (hom) behind p_V", "nats"),
    ("status_null", "object", "outcome of the null model's fit (p_V is NaN unless ok)", ""),
    ("n_jk_failed", "int64", "jackknife replicates that did not end ok", "count"),
    ("<x>_jk", "", "<x> from the jackknife (donors, or groups of donors, left out)", "as <x>"),
    ("<x>_sw", "", "<x> from the donor-clustered sandwich covariance", "as <x>"),
    ("ll", "float64", "GxEMM REML log-likelihood of the standardised trait", "nats"),
    ("ll_hom", "float64", "GxEMM: ll of the gtype hom fit behind p_gxe_lrt", "nats"),
    (
        "status_hom",
        "object",
        "GxEMM: outcome of the gtype hom fit (p_gxe_lrt is NaN unless ok)",
        "",
    ),  # fmt: skip
    (
        "p_gxe_wald",
        "float64",
        "GxEMM test of GxE in the genetic variance: free, multivariate Wald (chi2(number of "
        "environments)) of the environment-specific genetic components; iid, one-sided Wald of "
        "h2_het",
        "p value",
    ),  # fmt: skip
    (
        "p_gxe_lrt",
        "float64",
        "GxEMM likelihood-ratio test of the iid or free genetic model against hom (same noise "
        "model): chi2(difference in components), chi-bar-square when fitted with nonneg",
        "p value",
    ),  # fmt: skip
    ("h2", "float64", "GxEMM heritability (hom genetics and noise)", "fraction"),
    ("p_ct_beta", "float64", "Wald F test of equal cell-type means", "p value"),
    ("p_hom2", "float64", "one-sided Wald t test of hom2 = 0", "p value"),
    (
        "p_V",
        "float64",
        "test of V = 0: ML/REML, score test at the null (hom) fit (iid: one-sided normal; "
        "free: chi2(C)); lowrank, score test of diag(V) beyond the loadings, chi2(C); HE, "
        "Wald (iid: one-sided t; free: F)",
        "p value",
    ),  # fmt: skip
    (
        "p_V_wald",
        "float64",
        "Wald test of V = 0 (iid: one-sided t; free: F), as the original "
        "CTMM; anti-conservative near V = 0",
        "p value",
    ),  # fmt: skip
    (
        "p_V_lrt",
        "float64",
        "likelihood-ratio test of V = 0 against the null (hom) fit, chi2(number of V parameters)",
        "p value",
    ),  # fmt: skip
    ("q_<x>", "float64", "Benjamini-Hochberg q value of p_<x> over the table's genes", "q value"),
    ("se_<x>", "float64", "standard error of <x>", "as <x>"),
    ("p_<x>", "float64", "Wald test of <x>", "p value"),
    (
        "beta_<x>",
        "float64",
        "fixed effect: mean of cell type <x>, or the coefficient of covariate column <x>",
        "y",
    ),  # fmt: skip
    ("V_<x>", "float64", "cell type-specific variance (V entry) of <x>", "y^2"),
    ("r2_<x>", "float64", "variance of random covariate <x>", "y^2"),
    (
        "s2_<x>",
        "float64",
        "within-pair variance of the cells of cell type <x>, fitted with the model "
        "(noise='cells'); the noise variance of a value is s2 / its cells",
        "y^2",
    ),  # fmt: skip
    (
        "randomvar_<x>",
        "float64",
        "variance explained by random covariate <x>: r2 tr(R R^T) / N",
        "y^2",
    ),  # fmt: skip
    ("fixedvar_<x>", "float64", "variance explained by fixed effects <x>: b^T cov(X) b", "y^2"),
    (
        "sig2s_<x>",
        "float64",
        "GxEMM variance component <x> (genetic kernels, then noise)",
        "var(y) = 1",
    ),  # fmt: skip
    (
        "sig2g_<x>",
        "float64",
        "GxEMM genetic variance component <x>: hom, of K; iid, of K o ZZ^T; an environment, "
        "of K o z z^T (its specific genetic variance)",
        "var(y) = 1",
    ),  # fmt: skip
    (
        "sig2e_<x>",
        "float64",
        "GxEMM noise variance component <x>: hom, of I; an environment, of diag(z^2) (its "
        "noise beyond hom)",
        "var(y) = 1",
    ),  # fmt: skip
    (
        "h2_<x>",
        "float64",
        "GxEMM heritability <x>: of an environment, or (iid) hom and het, the shared and the "
        "environment-specific genetic shares",
        "fraction",
    ),  # fmt: skip
    ("<x>", "float64", "model parameter <x> (ctmm_jax.models)", "y or y^2"),
]


def _describe(column: str) -> tuple[str, str, str]:
    """(dtype, meaning, units) of one column, from the first entry of COLUMNS it matches."""
    for pattern, dtype, meaning, units in COLUMNS:
        regex = "^" + re.escape(pattern).replace("<x>", "(.+)") + "$"
        match = re.match(regex, column)
        if not match:
            continue
        if "<x>" not in pattern:
            return dtype, meaning, units
        x = match.group(1)
        if pattern in ("<x>_jk", "<x>_sw"):  # the jackknife / sandwich version of another
            inner = _describe(x)
            how = "the jackknife" if pattern == "<x>_jk" else "the sandwich covariance"
            return inner[0], f"{inner[1]}, from {how}", inner[2]
        if units == "as <x>":
            units = _describe(x)[2]
        return dtype, meaning.replace("<x>", x), units.replace("<x>", x)
    raise AssertionError("the last pattern matches every name")


def column_dictionary(columns) -> pd.DataFrame:
    """One row per column of a results table: column, dtype, meaning, units."""
    rows = [(c, *_describe(str(c))) for c in columns]
    return pd.DataFrame(rows, columns=["column", "dtype", "meaning", "units"])


@dataclass(frozen=True)
class FitResult:
    """Fit of every gene. Arrays carry a leading gene axis (G).

    phi: (G, n_var [+ C] + n_rand) the model's parameters (models.py order; then, with
    noise="cells", the within-pair variances s2_c; then r2 of each random covariate);
    var_cov: their covariance (inverse information; NaN for HE); beta: (G, p);
    beta_cov: (G, p, p) (NaN for HE); loglik: (G,) with the constants of design.md section 4
    (NaN for HE); status: (G,) status.Status codes; df: (G,) N_g - n_par with N_g the donors
    with an observed value; pvalues: name -> (G,) p values (`pvalues` below; NaN where the
    fit behind them is not ok); jackknife and pvalues_jk when fitted with jackknife=True;
    table: one row per gene (`column_dictionary`); noise: the noise model (noise.py); null:
    the null model's fit behind p_V (nulltest.py), or None; batching: the memory budget and
    batch size used (api.fit's `memory`).
    """

    model: str
    method: str
    information: str
    genes: tuple[str, ...]
    celltypes: tuple[str, ...]
    phi: np.ndarray
    var_cov: np.ndarray
    beta: np.ndarray
    beta_cov: np.ndarray
    loglik: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    df: np.ndarray
    pvalues: dict[str, np.ndarray]
    jackknife: Jackknife | None
    pvalues_jk: dict[str, np.ndarray] | None
    table: pd.DataFrame
    noise: str = "plugin"
    null: NullFit | None = None
    batching: dict | None = None

    @property
    def converged(self) -> np.ndarray:
        return self.status == Status.OK

    def __repr__(self) -> str:
        counts = pd.Series(status.short_names(self.status)).value_counts()
        summary = ", ".join(f"{n} {name}" for name, n in counts.items())
        jk = ", jackknife" if self.jackknife is not None else ""
        return (
            f"FitResult({self.model} {self.method}{jk}: {len(self.genes)} genes x "
            f"{len(self.celltypes)} cell types; status: {summary}; .table has "
            f"{self.table.shape[1]} columns)"
        )

    @classmethod
    def build(
        cls, data, model, method, information, est: Estimates, unidentified, n_par: int,
        jackknife: Jackknife | None = None, covariates=None, random=None,
        null: NullFit | None = None, noise: str = "plugin", batching: dict | None = None,
        robust: Sandwich | None = None,
    ) -> FitResult:  # fmt: skip
        G, N, C = data.shape
        cts = list(data.celltypes)
        k, p = est.phi.shape[1], est.beta.shape[1]
        or_nan = lambda a, shape: np.full(shape, np.nan) if a is None else a  # noqa: E731
        var_cov = or_nan(est.var_cov, (G, k, k))
        beta_cov, loglik = or_nan(est.beta_cov, (G, p, p)), or_nan(est.loglik, G)
        codes = final_status(est, unidentified)
        not_fitted = np.isin(codes, status.NOT_FITTED)
        if not_fitted.any():  # no estimates for genes that were not fitted: NaN, with a status
            blank = lambda a: np.where(_expand(not_fitted, a), np.nan, a)  # noqa: E731
            phi, var_cov, beta, beta_cov = map(blank, (est.phi, var_cov, est.beta, beta_cov))
            loglik = np.where(not_fitted, np.nan, loglik)
        else:
            phi, beta = est.phi, est.beta
        n_donors = data.observed_donors.sum(axis=1)  # a donor with nothing observed is dropped
        df = n_donors - n_par
        rand_names = list(random.values) if random is not None else []
        s2_names = [[f"s2_{ct}"] for ct in cts] if noise == "cells" else []
        columns = models.table_columns(model, cts) + s2_names + [[f"r2_{n}"] for n in rand_names]
        ct_beta, ct_beta_cov = beta[:, :C], beta_cov[:, :C, :C]
        pvalues = _pvalues(model, phi, var_cov, ct_beta, ct_beta_cov, df, codes, loglik, null)
        ok = (codes == Status.OK) & (df >= 1)  # TOO_FEW_DONORS implies the second; kept explicit

        cols: dict[str, np.ndarray] = {}
        cols.update(_by_name(columns, phi))
        cols.update({f"beta_{ct}": beta[:, c] for c, ct in enumerate(cts)})
        labels = covariates.labels() if covariates is not None else []
        cols.update({f"beta_{lab}": beta[:, C + j] for j, lab in enumerate(labels)})
        if labels:
            cols.update(fixed_effect_variances(beta, data.P, covariates))
        n_model = phi.shape[1] - len(rand_names)
        for j, name in enumerate(rand_names):  # r2 tr(R^T R) / N, as the original
            cols[f"randomvar_{name}"] = phi[:, n_model + j] * np.sum(random.values[name] ** 2) / N
        cols["loglik"] = loglik
        cols["n_donors"] = n_donors
        cols["converged"] = codes == Status.OK
        cols["n_iter"] = est.n_iter
        cols["status"] = status.short_names(codes)
        cols["message"] = status.messages(codes)
        if null is not None and null.model != model:
            cols["loglik_null"] = np.where(np.isin(null.status, status.NOT_FITTED), np.nan,
                                           null.loglik)  # fmt: skip
            cols["status_null"] = status.short_names(null.status)
        cols.update(_se_columns(columns, cts, var_cov, ct_beta_cov, ""))
        beta_se = _sqrt_diag(beta_cov)
        cols.update({f"se_beta_{lab}": beta_se[:, C + j] for j, lab in enumerate(labels)})
        cols.update({f"p_{k}": v for k, v in pvalues.items()})
        pvalues_jk = None
        if jackknife is not None:
            jk_var, jk_beta = jackknife.var_cov, jackknife.ct_beta_cov
            # k groups give the covariance k - 1 degrees of freedom (leave one out: N - 1)
            df_jk = np.minimum(df, jackknife.present.sum(axis=1) - 1)
            pvalues_jk = inference.wald_pvalues(model, phi, jk_var, ct_beta, jk_beta, df_jk)
            trusted = (
                ok
                & (df_jk >= 1)
                & (jackknife.n_failed <= JK_MAX_FAILED * jackknife.present.sum(axis=1))
            )
            pvalues_jk = {k: np.where(trusted, v, np.nan) for k, v in pvalues_jk.items()}
            cols.update(_se_columns(columns, cts, jk_var, jk_beta, "_jk"))
            cols.update({f"p_{k}_jk": v for k, v in pvalues_jk.items()})
            cols["n_jk_failed"] = jackknife.n_failed
        if robust is not None:
            pv = inference.wald_pvalues(model, phi, robust.var_cov, ct_beta, robust.ct_beta_cov,
                                        df)  # fmt: skip
            cols.update(_se_columns(columns, cts, robust.var_cov, robust.ct_beta_cov, "_sw"))
            cols.update({f"p_{k}_sw": np.where(ok, v, np.nan) for k, v in pv.items()})
        table = pd.DataFrame(cols, index=pd.Index(data.genes, name="gene"))
        table = _typed(with_qvalues(table))
        return cls(
            model, method, information, tuple(data.genes), tuple(cts), phi, var_cov, beta,
            beta_cov, loglik, np.asarray(est.n_iter, int), codes, df, pvalues, jackknife,
            pvalues_jk, table, noise, null, batching,
        )  # fmt: skip


def _pvalues(model, phi, var_cov, ct_beta, ct_beta_cov, df, codes, loglik, null):
    """The model's Wald tests (inference.wald_pvalues) where the fit is ok, NaN elsewhere; with
    a null fit, V's test is the score test at it (`V`, where the null fit is ok and the gene
    passed the checks made before fitting: status.NOT_FITTED), with the LRT (`V_lrt`, where
    both are ok) and the Wald test (`V_wald`) next to it. Never a p value with df < 1."""
    ok = (codes == Status.OK) & (df >= 1)
    wald = inference.wald_pvalues(model, phi, var_cov, ct_beta, ct_beta_cov, df)
    out = {k: np.where(ok, v, np.nan) for k, v in wald.items()}
    if null is None:
        return out
    null_ok = (null.status == Status.OK) & ~np.isin(codes, status.NOT_FITTED) & (df >= 1)
    score = inference.score_test(null.score, null.score_var)
    if null.model == model:  # diag_test (lowrank): a score test at the model's own fit
        return {"hom2": out["hom2"], "V": np.where(null_ok, score, np.nan),
                "ct_beta": out["ct_beta"]}  # fmt: skip
    idx = models.get(model).tests(ct_beta.shape[1])["V"]
    lrt = inference.lrt(loglik, null.loglik, len(idx), boundary=null.boundary)
    return {
        "hom2": out["hom2"],
        "V": np.where(null_ok, score, np.nan),
        "V_lrt": np.where(ok & null_ok, lrt, np.nan),
        "V_wald": out["V"],
        "ct_beta": out["ct_beta"],
    }


def with_qvalues(table: pd.DataFrame) -> pd.DataFrame:
    """The table with q_<x> = Benjamini-Hochberg q values of every p_<x> column (over its
    rows, NaN-aware) right after it; existing q columns are recomputed (e.g. after merging
    chunks of genes)."""
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("q_")])
    for col in [c for c in table.columns if str(c).startswith("p_")]:
        at = table.columns.get_loc(col) + 1
        table.insert(at, "q_" + col[2:], inference.bh_qvalues(table[col].to_numpy()))
    return table


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the declared dtype of each column (column_dictionary)."""
    dtypes = column_dictionary(table.columns).set_index("column")["dtype"]
    return table.astype({c: t for c, t in dtypes.items() if t and t != "object"})


def _by_name(columns: list[list[str]], values: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of per-parameter values: parameter j fills every column in columns[j]."""
    return {col: values[:, j] for j, cols in enumerate(columns) for col in cols}


def _sqrt_diag(cov: np.ndarray) -> np.ndarray:
    d = np.diagonal(cov, axis1=1, axis2=2)
    return np.sqrt(np.where(d > 0, d, np.nan))


def _se_columns(columns, cts, var_cov, ct_beta_cov, suffix: str) -> dict[str, np.ndarray]:
    se = _by_name(columns, _sqrt_diag(var_cov))
    cols = {f"se_{k}{suffix}": v for k, v in se.items()}
    beta_se = _sqrt_diag(ct_beta_cov)
    cols.update({f"se_beta_{ct}{suffix}": beta_se[:, c] for c, ct in enumerate(cts)})
    return cols


def fixed_effect_variances(beta: np.ndarray, P: np.ndarray, covariates) -> dict[str, np.ndarray]:
    """Variance explained by each group of fixed effects, b^T cov(Z) b with np.cov (N - 1), as
    the original CTMM's `fixedeffect_vars`: Z = P for the cell-type means, F for a covariate."""
    C = P.shape[1]
    out = {
        "fixedvar_ct_beta": np.einsum(
            "gi,ij,gj->g", beta[:, :C], np.atleast_2d(np.cov(P.T)), beta[:, :C]
        )
    }
    start = C
    for name, F in covariates.values.items():
        b = beta[:, start : start + F.shape[1]]
        out[f"fixedvar_{name}"] = np.einsum("gi,ij,gj->g", b, np.atleast_2d(np.cov(F.T)), b)
        start += F.shape[1]
    return out


def _expand(mask: np.ndarray, a: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (a.ndim - 1))
