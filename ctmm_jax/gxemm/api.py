"""`gxemm.fit`: GxEMM by native REML or HE, batched over traits, with the original's outputs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import batching, checks, inference, status
from ..status import Status
from . import he, model, reml
from .model import IdentifiabilityWarning, Inputs, check_inputs, standardize, variance_map
from .stats import lrt, mvwald_test, wald_test


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
    converged, n_iter, status: per trait ('constant': not fitted, NaN estimates);
    n_env: the number of environments K0 (columns of Z); nonneg: fitted with nonneg=True;
    kernel_vif: (k,) each kernel's variance inflation factor among the model's kernels, in
    sig2s order (model.vif_of; shared by the traits); structure: how REML was computed
    ('dense', 'lowrank' or 'eigen', reml.design_of; HE: the design's 'dense' or 'lowrank')."""

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
    n_env: int = 0  # K0, the number of environments (columns of Z)
    nonneg: bool = False
    kernel_vif: np.ndarray | None = None  # (k,) model.vif_of, sig2s order
    structure: str | None = None  # reml.design_of's structure

    @property
    def table(self) -> pd.DataFrame:
        """One row per trait: sig2s, h2 and their standard errors numbered (sig2s_1, ...,
        h2_1, ...), ll, status. `named_table` names them by what they are."""
        k, h = np.shape(self.sig2s)[-1], np.shape(self.h2)[-1]
        return self._frame([f"sig2s_{j + 1}" for j in range(k)],
                           [f"h2_{j + 1}" for j in range(h)])  # fmt: skip

    def named_table(self, levels=None, hom: GxEMMResult | None = None) -> pd.DataFrame:
        """One row per trait, the variance components named by what they are
        (model.component_names: sig2g_hom, sig2g_iid or sig2g_<level>, sig2e_<level>,
        sig2e_hom) and the heritabilities too (model.h2_names: h2, h2_hom and h2_het, or
        h2_<level>), each with its standard error se_<name>; ll, converged, n_iter, status,
        message; for gtype 'iid' and 'free' the GxE tests of `gxe_tests` with Benjamini-Hochberg
        q values over the table's traits: p_gxe_wald, q_gxe_wald and, given `hom` (the
        gtype='hom' fit of the same traits with the same X, Z and etype), ll_hom, status_hom,
        p_gxe_lrt, q_gxe_lrt.

        levels: the names of the n_env environments, Z's columns in order (default env1,
        env2, ...)."""
        levels = [f"env{k + 1}" for k in range(self.n_env)] if levels is None else levels
        levels = [str(v) for v in levels]
        if len(levels) != self.n_env:
            raise ValueError(f"levels: {len(levels)} names for {self.n_env} environments.")
        table = self._frame(*model.table_names(self.gtype, self.etype, levels))
        tests = gxe_tests(self, hom)
        if hom is not None:
            table["ll_hom"] = np.atleast_1d(hom.ll)
            table["status_hom"] = status.short_names(np.atleast_1d(hom.status))
        for name, p in tests.items():
            table[name] = p
            table[f"q{name[1:]}"] = inference.bh_qvalues(p)
        return table

    def _frame(self, names: list[str], h2_names: list[str]) -> pd.DataFrame:
        """The table's columns (names: of sig2s; h2_names: of h2). A variance below 0 (an
        indefinite inverse information, in a fit that did not converge) has se NaN."""
        cols = {}
        s, v = np.atleast_2d(self.sig2s), self.sig2Var.reshape((-1,) + self.sig2Var.shape[-2:])
        h, hv = np.atleast_2d(self.h2), self.h2Covmat.reshape((-1,) + self.h2Covmat.shape[-2:])
        se = lambda var: np.sqrt(np.where(var >= 0, var, np.nan))  # noqa: E731
        for j, name in enumerate(names):
            cols[name] = s[:, j]
            cols[f"se_{name}"] = se(v[:, j, j])
        for j, name in enumerate(h2_names):
            cols[name] = h[:, j]
            cols[f"se_{name}"] = se(hv[:, j, j])
        cols["ll"] = np.atleast_1d(self.ll)
        cols["converged"] = np.atleast_1d(self.converged)
        cols["n_iter"] = np.atleast_1d(self.n_iter)
        cols["status"] = status.short_names(np.atleast_1d(self.status))
        cols["message"] = status.messages(np.atleast_1d(self.status))
        return pd.DataFrame(cols)

    def trait(self, t: int) -> dict:
        """The original's output list for trait t, as a dict (kernel_vif, shared by the traits,
        as it is)."""
        many = self.sig2s.ndim == 2
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v[t] if many and isinstance(v, np.ndarray) and k != "kernel_vif" else v
                for k, v in values.items()}  # fmt: skip


def gxe_tests(fit: GxEMMResult, hom: GxEMMResult | None = None) -> dict[str, np.ndarray]:
    """Tests of gene-by-environment heterogeneity of the genetic variance, per trait (T,):

    p_gxe_wald: gtype 'free', the multivariate Wald test that the n_env environment-specific
    genetic components are 0 (mvwald_test on their block of sig2Var); gtype 'iid', the
    one-sided Wald test of h2_het (wald_test, as the original's README); none for 'hom'.
    p_gxe_lrt, given `hom` (the gtype='hom' REML fit of the same traits with the same X, Z and
    etype): lrt(ll, hom.ll, df - hom.df), with the chi-bar-square null when `fit` was
    constrained (nonneg=True: the tested components lie on their bound under the null).
    p values are NaN where a fit behind them did not end ok."""
    ok = np.atleast_1d(fit.converged)
    s, V = np.atleast_2d(fit.sig2s), fit.sig2Var.reshape((-1,) + fit.sig2Var.shape[-2:])
    out = {}
    if fit.gtype == "free":
        env = slice(1, 1 + fit.n_env)
        p = [mvwald_test(s[t, env], V[t, env, env]) for t in range(len(s))]
        out["p_gxe_wald"] = np.where(ok, np.asarray(p, dtype=np.float64), np.nan)
    elif fit.gtype == "iid":
        h2, cov = np.atleast_2d(fit.h2), fit.h2Covmat.reshape((-1,) + fit.h2Covmat.shape[-2:])
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where not ok anyway
            out["p_gxe_wald"] = np.where(ok, wald_test(h2[:, 1], cov[:, 1, 1]), np.nan)
    if hom is None:
        return out
    if fit.gtype == "hom" or hom.gtype != "hom" or hom.etype != fit.etype:
        raise ValueError(f"hom: the LRT compares a gtype 'iid' or 'free' fit with the gtype "
                         f"'hom' fit of the same etype; got {fit.gtype}/{fit.etype} against "
                         f"{hom.gtype}/{hom.etype}.")  # fmt: skip
    if fit.method != "reml" or hom.method != "reml":
        raise ValueError("hom: the LRT needs REML fits (HE has no likelihood).")
    if np.shape(hom.ll) != np.shape(fit.ll):
        raise ValueError(f"hom: fitted to {np.size(hom.ll)} traits, not {np.size(fit.ll)}.")
    both = ok & np.atleast_1d(hom.converged)
    p = lrt(np.atleast_1d(fit.ll), np.atleast_1d(hom.ll), fit.df - hom.df, boundary=fit.nonneg)
    out["p_gxe_lrt"] = np.where(both, p, np.nan)
    return out


def fit(
    y, X=None, K=None, Z=None, *, gtype: str = "hom", etype: str = "hom", method: str = "reml",
    S=None, max_iter: int = 100, tol: float = 1e-8, chunk_size: int | None = None,
    nonneg: bool = False, eigen: bool | None = None,
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
    environment's noise is kept >= 0 (reml.constrained_coordinates).

    eigen: REML for gtype = etype = 'hom' with dense K (Sigma = s_g K + s_e I) in K's
    eigenbasis (reml.py, "eigen"): K = Q diag(lam) Q^T once, then O(N p^2) per trait and
    iteration instead of O(N^3). None (default): whenever exact (that model with K); False:
    the dense path; True: ValueError unless exact. The estimates are the dense path's up to
    rounding (the same iterations).

    Identifiability: each kernel's VIF among the model's kernels (model.vif_of, once per call,
    kept in `kernel_vif`); when a GxE component's exceeds model.VIF_WARN (10) one
    IdentifiabilityWarning names them (model.weak_gxe, levels env1, env2, ...)."""
    if method not in ("reml", "he"):
        raise ValueError(f"method={method!r}: use 'reml' or 'he'.")
    if not (int(max_iter) >= 1 and tol > 0):
        raise ValueError("max_iter must be >= 1 and tol > 0.")
    if eigen not in (None, True, False):
        raise ValueError(f"eigen={eigen!r}: use None (whenever exact), True or False.")
    one = np.ndim(y) == 1
    inputs = check_inputs(y, X, K, Z, S, gtype, etype)
    if eigen and not reml.eigen_exact(inputs):
        raise ValueError(
            f"eigen=True: the eigen path is exact only for gtype='hom', etype='hom' with a "
            f"dense K (got gtype={gtype!r}, etype={etype!r}"
            f"{', genotypes S' if inputs.K is None else ''}); use eigen=None."
        )
    vif = model.vif_of(inputs)
    levels = [f"env{k + 1}" for k in range(inputs.K0)]
    weak = model.weak_gxe(vif, gtype, etype, levels)
    if weak:
        warnings.warn(model.gxe_vif_message(weak), IdentifiabilityWarning, stacklevel=2)
    design, structure = reml.design_of(inputs)  # dense or low rank: HE's design
    T = inputs.y.shape[0]
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
        fitted = np.flatnonzero(~flat)  # a flat trait cannot be standardised
        if eigen is not False and len(fitted):
            design, structure = reml.design_of(inputs, eigen=True)
        size = int(chunk_size or {"dense": 8, "lowrank": 256, "eigen": 1024}[structure])
        keys = dict(structure=structure, max_iter=int(max_iter), tol=float(tol),
                    nonneg=bool(nonneg), discrete=inputs.discrete,
                    batch=size if structure == "eigen" else None)  # fmt: skip
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
    return GxEMMResult(**out, gtype=gtype, etype=etype, method=method, n_env=inputs.K0,
                       nonneg=bool(nonneg), kernel_vif=vif, structure=structure)  # fmt: skip


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
