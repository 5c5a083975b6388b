"""`fit`: validate -> block form -> estimator (and jackknife) -> per-gene table. No math."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from . import batching, models
from . import noise as noise_models
from .blocks import to_blocks
from .data import Covariates, CTPData, OPData
from .devices import describe as describe_devices
from .devices import mesh as device_mesh
from .estimators import Problems, final_status
from .estimators.he import MethodOfMoments
from .estimators.mlreml import MaximumLikelihood
from .jackknife import donor_groups
from .jackknife import jackknife as run_jackknife
from .nulltest import fit_null
from .progress import Progress, fit_call
from .results import FitResult
from .robust import sandwich

METHODS = ("ml", "reml", "he")
INFORMATION = ("expected", "observed")
FLOAT32_METHODS = ("he",)  # where float32 is measured to be safe (fit(precision=...))


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
    noise: str | None = None,
    jackknife: bool | int = False,
    robust: bool = False,
    progress: bool | Progress = False,
    information: str = "expected",
    nonneg: bool = False,
    he_beta: str = "ols",
    fixed_covars: dict | None = None,
    random_covars: dict | None = None,
    chunk_size: int = 256,
    memory: str | int | None = None,
    max_iter: int = 200,
    tol: float = 1e-10,
    devices: int | str | Sequence | None = None,
    precision: str = "float64",
) -> FitResult:
    """Fit CTMM to every gene of `data` (batched with `jax.vmap`, in chunks of genes).

    Args:
        data: CTPData (CTP fit) or OPData (OP fit).
        model: a name in models.MODELS: "hom", "iid", "free", "full", ... (models.py).
        method: "ml" or "reml" (fixed effects profiled out by GLS), or "he" (Haseman-Elston
            method of moments, he.py).
        noise: the noise variances (noise.py): "pooled" (each cell type's within-pair
            variance pooled over donors, divided by the pair's cells; the default when the
            data carry cell counts), "cells" (the exact likelihood of Gaussian cells: the
            within-pair variances s2_c are fitted with the model and reported as `s2_<ct>`;
            ML/REML) or "plugin" (ctnu / nu as given, treated as known; the default
            otherwise, with a warning: with few cells per pair it inflates the test of V).
        jackknife: also refit with each donor left out (True) or, with k (an int), with
            each of k groups of donors left out (the delete-m block jackknife: k fits per gene
            instead of N; jackknife.donor_groups), and add jackknife standard errors and Wald
            p values (`se_*_jk`, `p_*_jk`, design.md section 5).
        robust: also add the donor-clustered sandwich standard errors and Wald p values
            (`se_*_sw`, `p_*_sw`; robust.py): one evaluation per gene where the jackknife
            refits N (or k) times. ML/REML without random covariates.
        progress: show a progress bar on stderr (True), or advance the given
            progress.Progress (the CLI's, over several calls); its ETA counts run time only.
        information: "expected" (Fisher; as the original CTMM) or "observed" (autodiff Hessian
            of the NLL) for the standard errors and Wald tests of ML/REML.
        nonneg: constrain variances to be >= 0 (bounds kept by projected Newton steps: a
            variance can end exactly at 0, converged when its score points out of the
            constrained set; full: V = L L^T). By default any value is allowed while every
            donor's covariance is positive definite. The LRT of V (`p_V_lrt`) then uses the
            chi-square mixture of a null on the boundary. ML/REML only: HE estimates are
            unconstrained.
        he_beta: fixed effects of HE: "ols" or "gls" (GLS at the HE variances, as the
            original CTMM; NaN where those are not positive definite).
        fixed_covars: name -> (N, k) fixed covariates (arrays, pandas frames indexed by donor,
            or text files), e.g. {"pca": pcs}; one coefficient per column, shared by the cell
            types; added in sorted name order as the original CTMM.
        random_covars: name -> (N, m) random-effect designs (e.g. one-hot batches; a pandas
            Series of labels is one-hot encoded), each with its own variance `r2_<name>`:
            Sigma gets r2 R R^T (OP) or r2 R R^T (x) J_C (CTP), fitted with the Woodbury
            identity (likelihood.py) in ML, REML and HE.
        chunk_size: most genes per compiled batch (a power of two; the last batch is padded
            so each shape compiles once).
        memory: working memory of one batch, e.g. "4GB" (default batching.DEFAULT_MEMORY):
            the batch is halved until its estimated need (blocks.Blocks.working_bytes) fits.
            `result.batching` records the budget and the batch size used.
        max_iter, tol: Newton / Fisher scoring stops when g^T I^-1 g < tol.
        precision: "float64" (default), or "float32" for HE: the device arithmetic of the fit
            (host bookkeeping stays float64). Measured (benchmarks/README.md): HE estimates
            and p values within 5e-5 of float64; ML/REML in float32 are refused.
        devices: split each batch's genes over local devices (devices.py; `jax.shard_map` on
            a 1-D mesh): a count k, "all", or a list of jax devices; None: the default device.
            Each device gets up to chunk_size genes of a batch and runs exactly the
            single-device program on them, so estimates equal the one-device fit's bit for
            bit wherever the per-device batches are the same (always once the genes fill
            every device's chunk; otherwise converged fits agree to ~1e-12, see
            estimators.mlreml.MaximumLikelihood.fit).

    Returns:
        FitResult; `.table` has one row per gene. For models with a nested null (iid, free)
        and ML/REML, `p_V` is the score test of V = 0 at the null (hom) fit, `p_V_lrt` the LRT
        and `p_V_wald` the original CTMM's Wald test; p values are NaN where the fit behind
        them did not end ok, and every `p_*` has its Benjamini-Hochberg `q_*`.
    """
    if not isinstance(data, CTPData | OPData):
        raise ValueError(f"data: expected CTPData or OPData, got {type(data).__name__}.")
    models.get(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision={precision!r}: use 'float64' or 'float32'.")
    if precision == "float32" and method not in FLOAT32_METHODS:
        raise ValueError(
            f"precision='float32' with method={method!r}: float32 is allowed for "
            f"{', '.join(FLOAT32_METHODS)} only; Fisher scoring in float32 cannot reach the "
            "convergence tolerance and moves p values by up to 0.03 (benchmarks/bench_fit.py "
            "--float32): use the default float64."
        )
    if information not in INFORMATION:
        raise ValueError(f"information={information!r}: use 'expected' or 'observed'.")
    if he_beta not in ("ols", "gls"):
        raise ValueError(f"he_beta={he_beta!r}: use 'ols' or 'gls'.")
    _check_options(chunk_size=chunk_size, max_iter=max_iter, tol=tol,
                   fixed_covars=fixed_covars, random_covars=random_covars)  # fmt: skip
    budget = batching.parse_memory(batching.DEFAULT_MEMORY if memory is None else memory)
    mesh = device_mesh(devices)
    if not jax.config.jax_enable_x64:
        raise ValueError(
            "jax_enable_x64 is off; ctmm_jax needs float64 (importing it turns it on)."
        )
    if noise == "cells" and method == "he":
        raise ValueError(
            "noise='cells' is a likelihood (the s2_c are fitted with the model): use method="
            "'ml' or 'reml', or noise='pooled' with HE."
        )
    data, noise, s2_var, cells = noise_models.apply(data, noise)
    G, N, C = data.shape
    if method == "he" and not models.get(model).linear:
        raise ValueError(
            f"method='he' needs a model linear in its parameters; {model!r} is not: use "
            "method='ml' or 'reml'."
        )
    covars = Covariates.build(fixed_covars, data.donors)
    random = Covariates.build(random_covars, data.donors, kind="random")
    blocks = to_blocks(data, model, covars.matrix, random.matrix, random.groups, cells)
    n_var = models.n_var(model, C) + len(random.values)
    n_par = n_var + blocks.n_fixed
    name = "CTP design" if isinstance(data, CTPData) else "OP design (P)"
    X_all = blocks.full_X()
    if blocks.per_gene:  # checked on the proportions of all cell types
        X_all = np.concatenate([data.P, covars.matrix], 1)[:, None]
    _check_design(X_all, n_var, name, list(covars.values))
    chunk_size = batching.memory_chunk(chunk_size, budget, blocks.working_bytes())
    if robust and (method == "he" or random.values):
        raise ValueError(
            "robust=True: the sandwich needs ML or REML and no random covariates (their "
            "kernels couple donors); use jackknife=k instead."
        )
    groups = donor_groups(N, jackknife)
    left = N if groups is None else N - np.bincount(groups).max()
    if groups is not None and left <= n_par:
        raise ValueError(
            f"jackknife: leaving a group of donors out leaves {left} donors for n_par = "
            f"{n_par} parameters; the jackknife needs more donors than parameters: use more "
            "donors, more groups or a smaller model."
        )
    spec = models.get(model)
    refits_null = method != "he" and spec.null is not None
    bar = Progress(G, f"{model} {method}") if progress is True else (progress or None)
    try:
        with (
            fit_call(bar, G, 1 + refits_null + (groups is not None)),
            jax.enable_x64(precision == "float64"),
        ):
            return _fit(data, model, method, blocks, covars, random, s2_var, noise, groups,
                        n_par, information=information, nonneg=nonneg, he_beta=he_beta,
                        chunk_size=chunk_size, max_iter=max_iter, tol=tol, robust=robust,
                        budget=budget, mesh=mesh)  # fmt: skip
    finally:
        if progress is True:
            bar.close()


def _fit(
    data,
    model,
    method,
    blocks,
    covars,
    random,
    s2_var,
    noise,
    groups,
    n_par,
    *,
    information,
    nonneg,
    he_beta,
    chunk_size,
    max_iter,
    tol,
    robust,
    budget,
    mesh,
) -> FitResult:
    """The estimators behind `fit`, on validated inputs."""
    G, N, C = data.shape
    estimator = _estimator(
        method, model, C, information=information, nonneg=nonneg, he_beta=he_beta,
        chunk_size=int(chunk_size), max_iter=int(max_iter), tol=float(tol), mesh=mesh,
    )  # fmt: skip
    est = estimator.fit(blocks, Problems(np.arange(G)))
    unidentified = _unidentified(blocks)
    null = None
    spec = models.get(model)
    if method != "he" and (spec.null is not None or spec.diag_test):
        codes = final_status(est, unidentified)
        null = fit_null(
            data, model, blocks, covars, random, unidentified, s2_var, est, codes,
            reml=method == "reml", max_iter=int(max_iter), tol=float(tol),
            chunk_size=int(chunk_size), nonneg=bool(nonneg), mesh=mesh,
        )  # fmt: skip
    jk = None
    if groups is not None:
        jk = run_jackknife(estimator, blocks, data.observed_donors, est, C, groups)
    sw = None
    if robust:
        sw = sandwich(blocks, est, data.observed_donors.sum(1), model=model, C=C,
                      reml=method == "reml", chunk_size=chunk_size)  # fmt: skip
    return FitResult.build(
        data, model, method, information, est, unidentified, n_par, jackknife=jk,
        covariates=covars, random=random, null=null, noise=noise,
        batching={"memory_budget": budget, "chunk_size": chunk_size,
                  "working_bytes_per_gene": blocks.working_bytes(),
                  **describe_devices(mesh)},
        robust=sw,
    )  # fmt: skip


def _check_options(*, chunk_size, max_iter, tol, fixed_covars, random_covars) -> None:
    """ValueError naming the option: whole numbers >= 1, tol > 0, covariates as dicts."""
    for name, value in (("chunk_size", chunk_size), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}={value!r}: give a whole number >= 1.")
    if isinstance(tol, bool) or not isinstance(tol, int | float | np.number) or not tol > 0:
        raise ValueError(f"tol={tol!r}: give a number > 0.")
    for name, value in (("fixed_covars", fixed_covars), ("random_covars", random_covars)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f"{name}: expected a dict of name -> covariate (e.g. {{'pca': pcs}}), got "
                f"{type(value).__name__}."
            )


def _estimator(method, model, C, *, information, nonneg, he_beta, chunk_size, max_iter, tol,
               mesh):  # fmt: skip
    """The estimator of `method` (estimators.Estimator); nonneg constrains the optimizer only
    (HE is a closed form)."""
    if method == "he":
        return MethodOfMoments(model, C, he_beta, chunk_size, mesh)
    return MaximumLikelihood(
        model, C, reml=method == "reml", nonneg=bool(nonneg),
        observed=information == "observed", max_iter=max_iter, tol=tol, chunk_size=chunk_size,
        mesh=mesh,
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
