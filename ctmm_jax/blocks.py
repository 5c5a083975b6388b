"""The block form of a dataset, and start values.

Every fit sees N blocks of b values (b = C for CTP, 1 for OP): y_i, noise_i, design X_i and
kernels E_ki with Sigma_i = sum_k w_k E_ki + diag(noise_i) (likelihood.GeneData), w the
model's kernel weights (models.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import likelihood, linalg, models
from . import noise as noise_models
from .data import CTPData, OPData
from .likelihood import GeneData


class Design(NamedTuple):
    """Device arrays shared by every gene (likelihood.GeneData): X (N, b, p_b), E (n_var, N or 1,
    b, b), F (N, k) donor-level fixed covariates, U (N, m) and groups (n_rand, m) or None
    without random covariates; diag_j (n_var, b + 1) or None (likelihood.GeneData.diag_j)."""

    X: jax.Array
    E: jax.Array
    F: jax.Array
    U: jax.Array | None = None
    groups: jax.Array | None = None
    diag_j: jax.Array | None = None

    @property
    def full(self) -> tuple[jax.Array, jax.Array | None]:
        """The lifted designs: fixed [X_i, 1_b f_i^T] (..., N, b, p) and random 1_b u_i^T
        (N, b, m) or None."""
        U = None if self.U is None else likelihood.lift(self.U, self.X.shape[-2])
        return likelihood.fixed_design(self.X, self.F), U


class Blocks(NamedTuple):
    """Host arrays of the block form (see likelihood.GeneData); y, noise and mask carry a gene
    axis, and so do X and E when the design differs by gene (OP with per-gene proportions).
    mask: (G, N, b) 1 observed / 0 missing, or None when everything is observed."""

    y: np.ndarray  # (G, N, b)
    noise: np.ndarray  # (G, N, b)
    X: np.ndarray  # ([G,] N, b, p_b) columns that vary within a block
    E: np.ndarray  # ([G,] n_var, N or 1, b, b)
    F: np.ndarray  # (N, k) donor-level fixed covariates
    U: np.ndarray | None = None  # (N, m) donor-level random-covariate designs
    groups: np.ndarray | None = None  # (n_rand, m)
    mask: np.ndarray | None = None  # (G, N, b)
    diag_j: np.ndarray | None = None  # (n_var, b + 1), likelihood.GeneData.diag_j
    cells: noise_models.Cells | None = None  # noise="cells": noise is then 0 (its fixed part)

    @property
    def per_gene(self) -> bool:
        """True when X and E carry a gene axis."""
        return self.X.ndim == 4

    def design(self, genes: np.ndarray | None = None) -> Design:
        """Device design; with per-gene X and E, those of `genes`."""
        X, E = (self.X, self.E) if not self.per_gene else (self.X[genes], self.E[genes])
        arrays = (X, E, self.F, self.U, self.groups, self.diag_j)
        return Design(*(None if a is None else jax.device_put(a) for a in arrays))

    def noise_of(self, genes: np.ndarray):
        """The `noise` argument of the estimators for `genes` (device arrays): the known
        variances (len(genes), N, b), or under noise="cells" a likelihood.CellNoise."""
        noise = jax.device_put(self.noise[genes])
        if self.cells is None:
            return noise
        return likelihood.CellNoise(noise, *(jax.device_put(a[genes]) for a in self.cells))

    def gene(self, g: int) -> GeneData:
        """Gene g as likelihood.GeneData (device arrays), e.g. to evaluate its likelihood."""
        X, E = (self.X[g], self.E[g]) if self.per_gene else (self.X, self.E)
        mask = None if self.mask is None else self.mask[g]
        arrays = (self.y[g], self.noise[g], X, E, mask, self.F, self.U, self.groups, self.diag_j)
        d = GeneData(*(None if a is None else jnp.asarray(a) for a in arrays))
        return d if self.cells is None else with_cells(d, self.noise_of(g))

    @property
    def n_fixed(self) -> int:
        return self.X.shape[-1] + self.F.shape[-1]

    def full_X(self) -> np.ndarray:
        """([G,] N, b, p) the lifted fixed design [X_i, 1_b f_i^T] (host copy, for checks)."""
        return np.asarray(likelihood.fixed_design(self.X, self.F))

    @property
    def n_rand(self) -> int:
        return 0 if self.groups is None else self.groups.shape[0]

    def working_bytes(self) -> int:
        """Estimated working memory of one gene in a compiled batch, from XLA's memory
        analysis of the fitting programs (benchmarks/bench_scale.py --memory): about
        30 N b + 2 N b^2 doubles for the closed forms of CTP hom/iid/free, 16 N b^2 for CTP
        with the general blocks, 25 N K for OP (K kernels), plus the covariates."""
        _, N, b = self.y.shape
        K = self.E.shape[-4]
        if b == 1:
            doubles = 25 * N * (K + b)
        elif self.diag_j is not None:
            doubles = 30 * N * b + 2 * N * b * b
        else:
            doubles = 16 * N * b * b + (K * N * b * b if self.E.shape[-3] > 1 else 0)
        doubles += 4 * N * (self.F.shape[1] + (0 if self.U is None else self.U.shape[1]))
        return 8 * (doubles + 4 * N * b)


def with_cells(d: GeneData, noise) -> GeneData:
    """d with the estimators' `noise` argument: known variances (an array) as they are, or a
    likelihood.CellNoise (noise="cells"): its fixed part, the loadings of the s2_c and the
    within-pair term."""
    if not isinstance(noise, likelihood.CellNoise):
        return d._replace(noise=noise)
    return d._replace(noise=noise.fixed, loadings=noise.loadings,
                      within=likelihood.Within(noise.dof, noise.ss))  # fmt: skip


def to_blocks(
    data: CTPData | OPData, model: str, F: np.ndarray | None = None,
    R: np.ndarray | None = None, groups: np.ndarray | None = None,
    cells: noise_models.Cells | None = None,
) -> Blocks:  # fmt: skip
    """CTP: N blocks of C values, X_i = I_C, kernels E_k; OP: N scalars, X_i = P_i^T, kernels
    P_i^T E_k P_i. The covariates stay donor-level (likelihood.GeneData): the full design is
    [X_i, 1_b f_i^T] and the random part 1_b r_i^T (R R^T (x) J_C for CTP).
    F: (N, k) fixed covariates (design.md 2-3: one coefficient per covariate, shared by the cell
    types); R: (N, m) random-covariate designs side by side, groups (n_rand, m) their columns;
    cells: noise="cells" (noise.Cells): the noise variances are then fitted, s2_c loadings_ic,
    and the blocks' known noise is 0."""
    blocks = _blocks(data, model, F, R, groups)
    if cells is None:
        return blocks
    return blocks._replace(noise=np.zeros_like(blocks.noise), cells=cells)


def _blocks(data, model, F, R, groups) -> Blocks:
    G, N, C = data.shape
    F = np.zeros((N, 0)) if F is None else F
    E = models.kernels(model, C)
    b = C if isinstance(data, CTPData) else 1
    U = None if R is None or R.shape[1] == 0 else R
    groups = None if U is None else groups
    mask = None if data.mask is None else data.mask.astype(np.float64).reshape(G, N, b)
    if isinstance(data, CTPData):
        X = np.broadcast_to(np.eye(C), (N, C, C))
        diag_j = models.diag_j_coefficients(model, C)
        return Blocks(data.Y, data.ctnu, X, E[:, None], F, U, groups, mask, diag_j)
    if data.P_gene is None:
        E_op = np.einsum("kcd,nc,nd->kn", E, data.P, data.P)[:, :, None, None]
        X = data.P[:, None, :]
    else:  # per-gene proportions (OP from a CTP with missing values): a gene axis in front
        P = data.P_gene
        E_op = np.einsum("kcd,gnc,gnd->gkn", E, P, P)[..., None, None]
        X = P[:, :, None, :]
    return Blocks(data.y[..., None], data.nu[..., None], X, E_op, F, U, groups, mask)


def ols_residuals(d: GeneData) -> jax.Array:
    """(N, b) OLS residuals of the observed y on the fixed effects (0 where missing)."""
    d = likelihood.observed(d)
    X = likelihood.fixed_design(d.X, d.F)
    if d.mask is not None:
        X = X * d.mask[..., None]
    XtX = jnp.einsum("nbp,nbq->pq", X, X)
    beta = linalg.spd_solve(XtX, jnp.einsum("nbp,nb->p", X, d.y))
    return d.y - jnp.einsum("nbp,p->nb", X, beta)


def residual_variance(d: GeneData) -> jax.Array:
    """s = mean squared OLS residual of the observed y on X (the original CTMM's start-value
    scale)."""
    return jnp.sum(ols_residuals(d) ** 2) / likelihood.n_observed(d)


def start_values(d: GeneData, model: str, C: int) -> jax.Array:
    """Start parameters phi of one gene (models.start_values): the mean squared OLS residual
    shared by the model's parts and the random covariates, as the original CTMM, and under
    noise="cells" the pooled within-pair variances sum_i ss_ic / sum_i dof_ic (1 where a cell
    type has no pair with 2 cells or more) before the r2. Positive definite whenever that
    residual is > 0."""
    n_rand = 0 if d.groups is None else d.groups.shape[0]
    phi = models.start_values(residual_variance(d), model, C, n_rand)
    if d.within is None:
        return phi
    m = 1.0 if d.mask is None else d.mask
    dof, ss = (d.within.dof * m).sum(0), (d.within.ss * m).sum(0)
    s2 = jnp.where((dof > 0) & (ss > 0), ss / jnp.where(dof > 0, dof, 1.0), 1.0)
    k = models.n_var(model, C)
    return jnp.concatenate([phi[:k], s2, phi[k:]])
