"""`gxemm.fit`: GxEMM by native REML or HE, batched over traits, with the original's outputs."""

from __future__ import annotations

from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import batching, checks, status
from ..status import Status
from . import he, reml
from .model import Inputs, check_inputs, standardize, variance_map


@dataclass(frozen=True)
class GxEMMResult:
    """Per-trait outputs with the original GxEMM's names (a leading trait axis when y was
    (T, N), none when y was one trait):

    sig2s: variance components (genetic kernels, then noise kernels with I last);
    sig2Var: their covariance, the inverse expected REML information (NaN for HE);
    sig2g, sig2e, h2: as the original's sig2map (model.variance_map);
    h2Covmat: delta-method covariance of h2 (autodiff of the h2 map; NaN for HE);
    ll: REML log-likelihood of the standardised trait (NaN for HE); df: number of variance
    components but the noise I (REML) or all of them (HE), as the original reports;
    betas: fixed effects of [1, X] on X's own scale (REML: GLS of the standardised trait; HE:
    OLS of y); X's columns are centred and scaled inside (model.scale_design);
    converged, n_iter, status: per trait."""

    sig2s: np.ndarray
    sig2Var: np.ndarray
    sig2g: np.ndarray
    sig2e: np.ndarray
    h2: np.ndarray
    h2Covmat: np.ndarray
    ll: np.ndarray
    df: int
    betas: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    gtype: str
    etype: str
    method: str

    @property
    def table(self) -> pd.DataFrame:
        """One row per trait: sig2s, h2 and their standard errors, ll, status."""
        cols = {}
        s, v = np.atleast_2d(self.sig2s), self.sig2Var.reshape((-1,) + self.sig2Var.shape[-2:])
        h, hv = np.atleast_2d(self.h2), self.h2Covmat.reshape((-1,) + self.h2Covmat.shape[-2:])
        for j in range(s.shape[1]):
            cols[f"sig2s_{j + 1}"] = s[:, j]
            cols[f"se_sig2s_{j + 1}"] = np.sqrt(v[:, j, j])
        for j in range(h.shape[1]):
            cols[f"h2_{j + 1}"] = h[:, j]
            cols[f"se_h2_{j + 1}"] = np.sqrt(hv[:, j, j])
        cols["ll"] = np.atleast_1d(self.ll)
        cols["converged"] = np.atleast_1d(self.converged)
        cols["n_iter"] = np.atleast_1d(self.n_iter)
        cols["status"] = status.short_names(self.status)
        cols["message"] = status.messages(self.status)
        return pd.DataFrame(cols)

    def trait(self, t: int) -> dict:
        """The original's output list for trait t, as a dict."""
        many = self.sig2s.ndim == 2
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v[t] if many and isinstance(v, np.ndarray) else v for k, v in values.items()}


def fit(
    y, X=None, K=None, Z=None, *, gtype: str = "hom", etype: str = "hom", method: str = "reml",
    S=None, max_iter: int = 100, tol: float = 1e-8, chunk_size: int | None = None,
    nonneg: bool = False,
) -> GxEMMResult:  # fmt: skip
    """Fit GxEMM to one trait y (N) or many traits (T, N) sharing X, K (or genotypes S) and Z.

    gtype 'hom' | 'iid' | 'free' (genetic variance shared / plus one exchangeable GxE term /
    per environment), etype 'hom' | 'free' (noise), method 'reml' (Fisher scoring from the HE
    estimates or the all-noise start, whichever is more likely) or 'he'. With S (N x M
    genotypes) instead of K, K = S S^T / M is never formed (Woodbury, O(N M^2) per iteration).
    The trait is standardised as the original (R's scale) before REML; HE residualises on X
    and then standardises. Before either, a trait with nothing left after the fixed effects
    (checks.no_variation: a constant trait, or one equal to a combination of [1, X]) is not
    fitted: status NO_VARIATION ('constant'), NaN estimates (standardising would blow its
    rounding noise up to unit variance). nonneg=True (REML) keeps the genetic variance
    components and the noise >= 0 (projected Newton): GxE components can end exactly at 0, and
    their LRT is then `lrt(..., boundary=True)`; with free noise and discrete environments each
    environment's noise is kept >= 0 (reml.constrained_coordinates)."""
    if method not in ("reml", "he"):
        raise ValueError(f"method={method!r}: use 'reml' or 'he'.")
    if not (int(max_iter) >= 1 and tol > 0):
        raise ValueError("max_iter must be >= 1 and tol > 0.")
    one = np.ndim(y) == 1
    inputs = check_inputs(y, X, K, Z, S, gtype, etype)
    design, lowrank = reml.design_of(inputs)
    T = inputs.y.shape[0]
    size = int(chunk_size or (256 if lowrank else 8))
    resid = inputs.y - inputs.y @ np.linalg.pinv(inputs.X).T @ inputs.X.T  # OLS on [1, X]
    flat = np.asarray(checks.no_variation(inputs.y, resid, axis=-1))  # (T,)
    checked = np.where(flat, Status.NO_VARIATION, Status.OK)
    he_fit = _chunks(lambda ys: he.he_chunk(ys, design), inputs.y, 1024)
    if method == "he":
        sig2s = he_fit.sig2s
        nan_k = np.full(sig2s.shape + sig2s.shape[-1:], np.nan)
        codes = status.decide(checked, finite=np.all(np.isfinite(sig2s), axis=1))
        out = dict(
            sig2s=sig2s, sig2Var=nan_k, ll=np.full(T, np.nan), df=inputs.n_kernels,
            betas=he_fit.betas, n_iter=np.zeros(T, int), status=codes,
        )  # fmt: skip
    else:
        null = np.zeros((T, inputs.n_kernels))
        null[:, -1] = 1.0  # all noise: Sigma = I for the standardised trait
        starts = np.stack([np.nan_to_num(he_fit.sig2s, nan=0.0), null])
        keys = dict(lowrank=lowrank, max_iter=int(max_iter), tol=float(tol), nonneg=bool(nonneg),
                    discrete=inputs.discrete)  # fmt: skip
        fitted = np.flatnonzero(~flat)  # a flat trait cannot be standardised
        if len(fitted):
            r = _chunks(
                lambda ys, st: reml.fit_chunk(ys, st, design, **keys),
                standardize(inputs.y[fitted]), size, starts=starts[:, fitted],
            )  # fmt: skip
        else:  # nothing to fit: empty results of the right shapes
            k, p = inputs.n_kernels, inputs.X.shape[1]
            r = reml.Fit(*(np.zeros((0,) + sh) for sh in ((k,), (k, k), (p,), (p, p), (), (k,))),
                         np.zeros(0, int), np.zeros(0, int))  # fmt: skip
        out = dict(
            sig2s=_scatter(r, "sig2s", fitted, T), sig2Var=_scatter(r, "sig2Var", fitted, T),
            ll=-_scatter(r, "nll", fitted, T), df=inputs.n_kernels - 1,
            betas=_scatter(r, "betas", fitted, T), n_iter=_scatter(r, "n_iter", fitted, T, 0),
            status=status.decide(_scatter(r, "status", fitted, T, checked)),
        )  # fmt: skip
    not_fitted = np.isin(out["status"], status.NOT_FITTED)
    for key in ("sig2s", "sig2Var", "betas"):  # no estimates for traits that were not fitted
        a = out[key]
        out[key] = np.where(not_fitted.reshape((T,) + (1,) * (a.ndim - 1)), np.nan, a)
    out["converged"] = out["status"] == Status.OK
    out.update(_user_scale(out["betas"], out["ll"], inputs.X_map))
    out.update(_heritability(out["sig2s"], out["sig2Var"], inputs))
    if one:
        out = {k: v[0] if isinstance(v, np.ndarray) else v for k, v in out.items()}
    return GxEMMResult(**out, gtype=gtype, etype=etype, method=method)


def _user_scale(betas, ll, A) -> dict:
    """Betas and REML log-likelihood of the user's X from those of the scaled design
    (model.scale_design): beta = A beta_s, ll = ll_s + log|det A|."""
    return dict(betas=betas @ A.T, ll=ll + np.linalg.slogdet(A)[1])


def _scatter(fit, key: str, idx: np.ndarray, T: int, fill=np.nan) -> np.ndarray:
    """fit.<key> of the traits idx placed in a (T, ...) array, `fill` elsewhere (fill may be
    a (T,) array)."""
    a = np.asarray(getattr(fit, key))
    out = np.empty((T,) + a.shape[1:], a.dtype)
    out[...] = np.reshape(fill, (-1,) + (1,) * (a.ndim - 1)) if np.ndim(fill) else fill
    out[idx] = a
    return out


def _chunks(fn, y, size, starts=None):
    """fn over batches of traits (batching.py: bucketed sizes, padded)."""
    T = y.shape[0]

    def batch(i):
        args = (jnp.asarray(y[i]),) + (() if starts is None else (jnp.asarray(starts[:, i]),))
        return fn(*args)

    return batching.map_batches(batch, np.arange(T), batching.bucket(T, size))


def _heritability(sig2s, sig2Var, inputs: Inputs) -> dict:
    """sig2g, sig2e, h2 and the delta-method h2Covmat = J sig2Var J^T, J = d h2 / d sig2s."""
    keys = (inputs.gtype, inputs.etype, inputs.K0)
    g, e, h2 = jax.vmap(lambda s: variance_map(s, *keys))(jnp.asarray(sig2s))
    J = jax.vmap(jax.jacfwd(lambda s: variance_map(s, *keys)[2]))(jnp.asarray(sig2s))
    cov = jnp.einsum("thk,tkl,tgl->thg", J, jnp.asarray(sig2Var), J)
    return dict(sig2g=np.asarray(g), sig2e=np.asarray(e), h2=np.asarray(h2),
                h2Covmat=np.asarray(cov))  # fmt: skip
