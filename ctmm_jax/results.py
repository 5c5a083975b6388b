"""Per-gene results: arrays from the fit -> Wald tests -> one pandas row per gene."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import inference, models
from .optimize import MESSAGES, Status


@dataclass(frozen=True)
class Jackknife:
    """Leave-one-donor-out replicates of every gene.

    phi: (G, N, n_var) and ct_beta: (G, N, C) replicate estimates; present: (G, N) the donors
    observed for each gene (only their replicates count; the others are NaN); var_cov
    (G, n_var, n_var) and ct_beta_cov (G, C, C): (n-1)/n sum_i (x_(-i) - mean)(x_(-i) - mean)^T
    over the n present donors; n_failed: (G,) replicates that did not converge (ML/REML; their
    estimates are still used, as the original).
    """

    phi: np.ndarray
    ct_beta: np.ndarray
    n_failed: np.ndarray
    present: np.ndarray

    @property
    def var_cov(self) -> np.ndarray:
        return inference.jackknife_cov(self.phi, self.present)

    @property
    def ct_beta_cov(self) -> np.ndarray:
        return inference.jackknife_cov(self.ct_beta, self.present)


@dataclass(frozen=True)
class FitResult:
    """Fit of every gene. Arrays carry a leading gene axis (G).

    phi: (G, n_var + n_rand) natural variance parameters (models.py order, then r2 of each
    random covariate); var_cov: their covariance (inverse information; NaN for HE); beta:
    (G, p); beta_cov: (G, p, p); loglik: (G,) with the constants of design.md section 4 (NaN
    for HE); status: (G,) optimize.Status codes; df: (G,) N_g - n_par with N_g the donors with
    an observed value; pvalues: name -> (G,) Wald p values (information); jackknife and
    pvalues_jk when fitted with jackknife=True; table: one row per gene.
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

    @property
    def converged(self) -> np.ndarray:
        return self.status == Status.OK

    @classmethod
    def build(
        cls, data, model, method, information, fits, loglik, n_iter, status, n_par: int,
        jackknife: Jackknife | None = None, covariates=None, random=None,
    ) -> FitResult:  # fmt: skip
        G, N, C = data.shape
        cts = list(data.celltypes)
        not_fitted = np.isin(status, (Status.NO_VARIATION, Status.NOT_IDENTIFIED))
        if not_fitted.any():  # no estimates for genes that were not fitted: NaN, with a status
            fits = type(fits)(*(np.where(_expand(not_fitted, a), np.nan, a) for a in fits))
            loglik = np.where(not_fitted, np.nan, loglik)
        n_donors = data.observed_donors.sum(axis=1)  # a donor with nothing observed is dropped
        df = n_donors - n_par
        rand_names = list(random.values) if random is not None else []
        names = models.param_names(model, cts) + [f"r2_{name}" for name in rand_names]
        status = status.astype(int)
        if method != "he":  # a singular information leaves standard errors undefined
            bad = ~np.all(np.diagonal(fits.var_cov, axis1=1, axis2=2) > 0, axis=1)
            status = np.where((status == Status.OK) & bad, Status.SINGULAR_INFO, status)
        ct_beta, ct_beta_cov = fits.beta[:, :C], fits.beta_cov[:, :C, :C]
        pvalues = wald_pvalues(model, fits.phi, fits.var_cov, ct_beta, ct_beta_cov, df)

        cols: dict[str, np.ndarray] = {}
        cols.update(_by_name(names, cts, fits.phi))
        cols.update({f"beta_{ct}": fits.beta[:, c] for c, ct in enumerate(cts)})
        labels = covariates.labels() if covariates is not None else []
        cols.update({f"beta_{lab}": fits.beta[:, C + j] for j, lab in enumerate(labels)})
        if labels:
            cols.update(fixed_effect_variances(fits.beta, data.P, covariates))
        for j, name in enumerate(rand_names):  # r2 tr(R^T R) / N, as the original
            R = random.values[name]
            cols[f"randomvar_{name}"] = (
                fits.phi[:, len(names) - len(rand_names) + j] * np.sum(R**2) / N
            )
        cols["loglik"] = loglik
        cols["n_donors"] = n_donors
        cols["converged"] = status == Status.OK
        cols["n_iter"] = n_iter.astype(int)
        cols["status"] = np.array([MESSAGES[Status(s)] for s in status], dtype=object)
        cols.update(_se_columns(names, cts, fits.var_cov, ct_beta_cov, ""))
        beta_se = _sqrt_diag(fits.beta_cov)
        cols.update({f"se_beta_{lab}": beta_se[:, C + j] for j, lab in enumerate(labels)})
        cols.update({f"p_{k}": v for k, v in pvalues.items()})
        pvalues_jk = None
        if jackknife is not None:
            jk_var, jk_beta = jackknife.var_cov, jackknife.ct_beta_cov
            pvalues_jk = wald_pvalues(model, fits.phi, jk_var, ct_beta, jk_beta, df)
            cols.update(_se_columns(names, cts, jk_var, jk_beta, "_jk"))
            cols.update({f"p_{k}_jk": v for k, v in pvalues_jk.items()})
            cols["n_jk_failed"] = jackknife.n_failed.astype(int)
        table = pd.DataFrame(cols, index=pd.Index(data.genes, name="gene"))
        return cls(
            model, method, information, tuple(data.genes), tuple(cts), fits.phi, fits.var_cov,
            fits.beta, fits.beta_cov, loglik, n_iter.astype(int), status, df, pvalues,
            jackknife, pvalues_jk, table,
        )  # fmt: skip


def _by_name(names: list[str], cts: list[str], values: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of per-parameter values; iid's single V is repeated as V_<ct> for every ct."""
    cols = {}
    for j, name in enumerate(names):
        for col in [f"V_{c}" for c in cts] if name == "V" else [name]:
            cols[col] = values[:, j]
    return cols


def _sqrt_diag(cov: np.ndarray) -> np.ndarray:
    d = np.diagonal(cov, axis1=1, axis2=2)
    return np.sqrt(np.where(d > 0, d, np.nan))


def _se_columns(names, cts, var_cov, ct_beta_cov, suffix: str) -> dict[str, np.ndarray]:
    se = _by_name(names, cts, _sqrt_diag(var_cov))
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


def wald_pvalues(model, phi, var_cov, ct_beta, ct_beta_cov, df) -> dict[str, np.ndarray]:
    """p_hom2, p_V and p_ct_beta as the original CTMM (design.md section 5).

    The full model gets only p_ct_beta: the original has no test on a full V."""
    out = {}
    if model != "full":
        out["hom2"] = inference.wald_t(phi[:, 0], var_cov[:, 0, 0], df)
    if model == "iid":
        out["V"] = inference.wald_t(phi[:, 1], var_cov[:, 1, 1], df)
    elif model == "free":
        C = ct_beta.shape[1]
        out["V"] = inference.wald_f(phi[:, 1 : 1 + C], var_cov[:, 1 : 1 + C, 1 : 1 + C], df)
    out["ct_beta"] = inference.wald_ct_beta(ct_beta, ct_beta_cov, df)
    return out
