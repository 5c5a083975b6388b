"""`fit`: validate -> block form -> batched fits (engine.py) -> per-gene table."""

from __future__ import annotations

import jax
import numpy as np

from . import models
from .data import Covariates, CTPData, OPData
from .engine import BOUNDARY_COND, GeneFit, Problems, finish, run_fits
from .he import run_he, run_he_jackknife
from .optimize import Status
from .results import FitResult, Jackknife
from .structure import to_blocks

METHODS = ("ml", "reml", "he")
INFORMATION = ("expected", "observed")


def _check_design(X: np.ndarray, n_var: int, name: str, covariates: list[str]) -> None:
    N, b, p = X.shape
    n_par = n_var + p
    if N <= n_par:
        raise ValueError(
            f"{name}: {N} donors but the model has n_par = {n_par} parameters "
            f"({n_var} variance + {p} fixed); need more donors than parameters (df = N - n_par)."
        )
    rank = np.linalg.matrix_rank(X.reshape(N * b, p))
    if rank < p:
        what = f"cell-type means + fixed covariates {', '.join(covariates)}" if covariates else (
            "cell-type means")  # fmt: skip
        raise ValueError(
            f"{name}: the fixed-effect design ({what}) has rank {rank} < {p} columns. "
            "A covariate collinear with the cell-type indicators (e.g. an intercept column: the "
            "cell-type means already play that role) or with another covariate must be dropped; "
            "for OP, P may have linearly dependent columns (e.g. a cell type absent from every "
            "donor): drop such cell types."
        )


def fit(
    data: CTPData | OPData,
    model: str = "free",
    method: str = "reml",
    *,
    jackknife: bool = False,
    information: str = "expected",
    nonneg: bool = False,
    he_beta: str = "ols",
    fixed_covars: dict | None = None,
    random_covars: dict | None = None,
    chunk_size: int = 256,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> FitResult:
    """Fit CTMM to every gene of `data` (batched with `jax.vmap`, in chunks of genes).

    Args:
        data: CTPData (CTP fit) or OPData (OP fit).
        model: "hom", "iid", "free" or "full" (models.py).
        method: "ml" or "reml" (fixed effects profiled out by GLS), or "he" (Haseman-Elston
            method of moments, he.py).
        jackknife: also refit with each donor left out and add jackknife standard errors and
            Wald p values (`se_*_jk`, `p_*_jk`, design.md section 5).
        information: "expected" (Fisher; as the original CTMM) or "observed" (autodiff Hessian
            of the NLL) for the standard errors and Wald tests of ML/REML.
        nonneg: constrain variances to be >= 0 (softplus; full V = L L^T). By default any
            value is allowed while every donor's covariance is positive definite. ML/REML
            only: HE estimates are unconstrained.
        he_beta: fixed effects of HE: "ols" or "gls" (GLS at the HE variances, as the
            original CTMM; NaN where those are not positive definite).
        fixed_covars: name -> (N, k) fixed covariates (arrays, pandas frames indexed by donor,
            or text files), e.g. {"pca": pcs}; one coefficient per column, shared by the cell
            types; added in sorted name order as the original CTMM.
        random_covars: name -> (N, m) random-effect designs (e.g. one-hot batches; a pandas
            Series of labels is one-hot encoded), each with its own variance `r2_<name>`:
            Sigma gets r2 R R^T (OP) or r2 R R^T (x) J_C (CTP), fitted with the Woodbury
            identity (likelihood.py) in ML, REML and HE.
        chunk_size: genes per compiled batch; the last chunk is padded so each shape compiles
            once.
        max_iter, tol: Newton / Fisher scoring stops when g^T I^-1 g < tol.

    Returns:
        FitResult; `.table` has one row per gene.
    """
    if not isinstance(data, CTPData | OPData):
        raise ValueError(f"data: expected CTPData or OPData, got {type(data).__name__}.")
    models.check_model(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if information not in INFORMATION:
        raise ValueError(f"information={information!r}: use 'expected' or 'observed'.")
    if he_beta not in ("ols", "gls"):
        raise ValueError(f"he_beta={he_beta!r}: use 'ols' or 'gls'.")
    if int(chunk_size) < 1 or int(max_iter) < 1 or not tol > 0:
        raise ValueError("chunk_size and max_iter must be >= 1 and tol > 0.")
    if not jax.config.jax_enable_x64:
        raise ValueError(
            "jax_enable_x64 is off; ctmm_jax needs float64 (importing it turns it on)."
        )
    G, N, C = data.shape
    covars = Covariates.build(fixed_covars, data.donors)
    random = Covariates.build(random_covars, data.donors, kind="random")
    blocks = to_blocks(data, model, covars.matrix, random.matrix, random.groups)
    n_var = models.n_var(model, C) + len(random.values)
    n_par = n_var + blocks.n_fixed
    name = "CTP design" if isinstance(data, CTPData) else "OP design (P)"
    X_all = blocks.full_X()
    if blocks.per_gene:  # checked on the proportions of all cell types
        X_all = np.concatenate([data.P, covars.matrix], 1)[:, None]
    _check_design(X_all, n_var, name, list(covars.values))
    if jackknife and N - 1 <= n_par:
        raise ValueError(
            f"jackknife: leaving a donor out leaves N - 1 = {N - 1} donors for n_par = {n_par} "
            "parameters; the jackknife needs N - 1 > n_par: use more donors or a smaller model."
        )
    # nonneg constrains the optimizer; HE is a closed form and GLS at HE takes it as it is
    keys = dict(model=model, C=C, reml=method != "ml", nonneg=bool(nonneg) and method != "he")
    size = int(chunk_size)
    everything = Problems(np.arange(G))
    unidentified = _unidentified(blocks)
    if method == "he":
        he_fit = run_he(blocks, chunk_size=size)
        fits, status = _he_estimates(blocks, everything, he_fit, he_beta, keys, size)
        loglik, n_iter = np.full(G, np.nan), np.zeros(G, int)
    else:
        fits, state = run_fits(
            blocks, everything, **keys, observed=information == "observed",
            max_iter=int(max_iter), tol=float(tol), chunk_size=size,
        )  # fmt: skip
        # a fit that did not converge and ended close to singular is reported as on the boundary
        status = np.where(
            (state.status != Status.OK) & (fits.cond > BOUNDARY_COND), Status.BOUNDARY, state.status
        )
        loglik, n_iter = -state.nll, state.n_iter
    status = np.where(unidentified, Status.NOT_IDENTIFIED, status)
    jk = None
    if jackknife:
        jk = _jackknife(
            blocks, data.observed_donors, method, fits, keys, he_beta, max_iter, tol, size
        )
    return FitResult.build(
        data, model, method, information, fits, loglik, n_iter, status, n_par, jackknife=jk,
        covariates=covars, random=random,
    )  # fmt: skip


def _unidentified(blocks) -> np.ndarray:
    """(G,) genes whose fixed effects are not identified from their observed values (e.g. a
    cell type with no observed value): the design restricted to them is rank deficient."""
    G, N, b = blocks.y.shape
    if blocks.mask is None and not blocks.per_gene:
        return np.zeros(G, bool)
    X = blocks.full_X()
    X = X if blocks.per_gene else X[None]
    if blocks.mask is not None:
        X = X * blocks.mask[..., None]
    X = np.broadcast_to(X, (G,) + X.shape[1:]).reshape(G, N * b, -1)
    return np.linalg.matrix_rank(X) < X.shape[-1]


def _he_estimates(blocks, problems, he_fit, he_beta, keys, size):
    """GeneFit of HE estimates: variances from HE, beta OLS (or GLS at the HE variances),
    no information-based covariance (NaN). Status OK when the estimates are finite."""
    P, k = he_fit.phi.shape
    nan = np.full((P, k, k), np.nan)
    if he_beta == "gls":
        gls = finish(blocks, problems, he_fit.phi, **keys, observed=False, chunk_size=size)
        fits = GeneFit(he_fit.phi, nan, gls.beta, np.full_like(gls.beta_cov, np.nan), gls.cond)
    else:
        p = he_fit.beta.shape[1]
        fits = GeneFit(he_fit.phi, nan, he_fit.beta, np.full((P, p, p), np.nan), np.full(P, np.nan))
    finite = np.all(np.isfinite(fits.phi), axis=1) & np.all(np.isfinite(fits.beta), axis=1)
    return fits, np.where(finite, Status.OK, Status.NOT_FINITE)


def _jackknife(blocks, present, method, fits, keys, he_beta, max_iter, tol, size) -> Jackknife:
    """Leave-one-donor-out refits of every gene over its present donors (G, N): HE in closed
    form (he.py), ML/REML by the optimizer from the full-data estimates, as one more batched
    axis (gene x donor). Replicates of absent donors are NaN and do not count."""
    G, N = blocks.y.shape[:2]
    C = keys["C"]
    gene, drop = np.nonzero(present)
    problems = Problems(gene, drop)
    if method == "he":
        reps = run_he_jackknife(blocks, chunk_size=size)  # (G, N, k), (G, N, p)
        phi, beta = reps.phi[gene, drop], reps.beta[gene, drop]
        if he_beta == "gls":
            beta = finish(blocks, problems, phi, **keys, observed=False, chunk_size=size).beta
        failed = ~np.all(np.isfinite(phi), axis=1)
    else:
        theta0 = np.asarray(models.from_natural_batch(fits.phi, keys["model"], C, keys["nonneg"]))
        reps, state = run_fits(
            blocks, problems._replace(theta0=theta0[gene]), **keys, observed=False,
            max_iter=int(max_iter), tol=float(tol), chunk_size=size,
        )  # fmt: skip
        phi, beta, failed = reps.phi, reps.beta, state.status != Status.OK

    def per_donor(x):  # (P, ...) over present pairs -> (G, N, ...), NaN for absent donors
        out = np.full((G, N) + x.shape[1:], np.nan)
        out[gene, drop] = x
        return out

    n_failed = np.bincount(gene, weights=failed, minlength=G).astype(int)
    return Jackknife(per_donor(phi), per_donor(beta[:, :C]), n_failed, present)
