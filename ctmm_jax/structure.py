"""Block form of a gene's data, and start values.

Every fit sees N blocks of b values (b = C for CTP, 1 for OP): y_i, noise_i, design X_i and
kernels E_ki with Sigma_i = sum_k phi_k E_ki + diag(noise_i) (likelihood.GeneData).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import likelihood, models
from .data import CTPData, OPData
from .likelihood import GeneData


class Blocks(NamedTuple):
    """Host arrays of the block form (see likelihood.GeneData); y and noise carry a gene axis."""

    y: np.ndarray  # (G, N, b)
    noise: np.ndarray  # (G, N, b)
    X: np.ndarray  # (N, b, p)
    E: np.ndarray  # (n_var, N or 1, b, b)


def to_blocks(data: CTPData | OPData, model: str, F: np.ndarray | None = None) -> Blocks:
    """CTP: N blocks of C values, X_i = [I_C, 1_C f_i^T], kernels E_k. OP: N scalars,
    X_i = [P_i^T, f_i^T], kernels P_i^T E_k P_i. F: (N, k) fixed covariates (design.md 2-3:
    one coefficient per covariate, shared by the cell types)."""
    G, N, C = data.shape
    F = np.zeros((N, 0)) if F is None else F
    E = models.kernels(model, C)
    if isinstance(data, CTPData):
        X = np.concatenate([np.broadcast_to(np.eye(C), (N, C, C)), np.repeat(F[:, None], C, 1)], 2)
        return Blocks(data.Y, data.ctnu, X, E[:, None])
    E_op = np.einsum("kcd,nc,nd->kn", E, data.P, data.P)[:, :, None, None]
    X = np.concatenate([data.P, F], 1)[:, None, :]
    return Blocks(data.y[..., None], data.nu[..., None], X, E_op)


def residual_variance(d: GeneData) -> jax.Array:
    """s = mean squared OLS residual of the observed y on X (the original CTMM's start-value
    scale)."""
    n = likelihood.n_observed(d)
    d = likelihood.observed(d)
    XtX = jnp.einsum("nbp,nbq->pq", d.X, d.X)
    beta = jnp.linalg.solve(XtX, jnp.einsum("nbp,nb->p", d.X, d.y))
    return jnp.sum((d.y - jnp.einsum("nbp,p->nb", d.X, beta)) ** 2) / n


def start_values(d: GeneData, model: str, C: int) -> jax.Array:
    """Natural start values as the original CTMM: hom2 and every V parameter s / 2 (hom:
    hom2 = s; full: V = s I), s = residual_variance. Positive definite whenever s > 0."""
    s = residual_variance(d)
    if model == "hom":
        return s[None]
    if model == "full":
        return s * jnp.eye(C)[np.triu_indices(C)]
    return jnp.full(models.n_var(model, C), s / 2)
