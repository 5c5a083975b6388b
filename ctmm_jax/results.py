"""Per-gene results: arrays from the fit -> Wald tests -> one pandas row per gene."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import inference, models
from .optimize import MESSAGES, Status


@dataclass(frozen=True)
class FitResult:
    """Fit of every gene. Arrays carry a leading gene axis (G).

    phi: (G, n_var) natural variance parameters (models.py order); var_cov: (G, n_var, n_var)
    their covariance (inverse information); beta: (G, p); beta_cov: (G, p, p); loglik: (G,)
    with the constants of design.md section 4; status: (G,) optimize.Status codes; pvalues:
    name -> (G,) Wald p values; table: one row per gene.
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
    df: int
    pvalues: dict[str, np.ndarray]
    table: pd.DataFrame

    @property
    def converged(self) -> np.ndarray:
        return self.status == Status.OK

    @classmethod
    def build(
        cls, data, model, method, information, fits, loglik, n_iter, status, n_par: int
    ) -> FitResult:
        G, N, C = data.shape
        cts = list(data.celltypes)
        not_fitted = status == Status.NO_VARIATION
        if not_fitted.any():  # no estimates for genes that were not fitted: NaN, with a status
            fits = type(fits)(*(np.where(_expand(not_fitted, a), np.nan, a) for a in fits))
            loglik = np.where(not_fitted, np.nan, loglik)
        df = N - n_par
        var_se = np.sqrt(np.where(np.diagonal(fits.var_cov, axis1=1, axis2=2) > 0,
                                  np.diagonal(fits.var_cov, axis1=1, axis2=2), np.nan))  # fmt: skip
        names = models.param_names(model, cts)
        status = status.astype(int)
        # a singular information leaves standard errors undefined: say so in the status
        status = np.where(
            (status == Status.OK) & ~np.all(np.isfinite(var_se), axis=1), Status.SINGULAR_INFO, status
        )
        pvalues = wald_pvalues(model, fits.phi, fits.var_cov, fits.beta[:, :C], fits.beta_cov[:, :C, :C], df)

        cols: dict[str, np.ndarray] = {}
        for j, name in enumerate(names):
            if model == "iid" and name == "V":
                for c in cts:
                    cols[f"V_{c}"] = fits.phi[:, j]
            else:
                cols[name] = fits.phi[:, j]
        for c, ct in enumerate(cts):
            cols[f"beta_{ct}"] = fits.beta[:, c]
        cols["loglik"] = loglik
        cols["converged"] = status == Status.OK
        cols["n_iter"] = n_iter.astype(int)
        cols["status"] = np.array([MESSAGES[Status(s)] for s in status], dtype=object)
        for j, name in enumerate(names):
            if model == "iid" and name == "V":
                for c in cts:
                    cols[f"se_V_{c}"] = var_se[:, j]
            else:
                cols[f"se_{name}"] = var_se[:, j]
        beta_se = np.sqrt(np.diagonal(fits.beta_cov, axis1=1, axis2=2))
        for c, ct in enumerate(cts):
            cols[f"se_beta_{ct}"] = beta_se[:, c]
        cols.update({f"p_{k}": v for k, v in pvalues.items()})
        table = pd.DataFrame(cols, index=pd.Index(data.genes, name="gene"))
        return cls(
            model, method, information, tuple(data.genes), tuple(cts), fits.phi, fits.var_cov,
            fits.beta, fits.beta_cov, loglik, n_iter.astype(int), status, df, pvalues, table,
        )  # fmt: skip


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
        out["V"] = inference.wald_f(phi[:, 1:], var_cov[:, 1:, 1:], df)
    out["ct_beta"] = inference.wald_ct_beta(ct_beta, ct_beta_cov, df)
    return out
