"""The variance models: one registry entry per model (`MODELS`), read by every other module.

A model writes the shared (between-donor) covariance of one donor's C cell types as a
combination of fixed C x C kernels with weights that are a map of the model's parameters phi:

    A = hom2 J_C + V = sum_k w_k(phi) E_k

| model   | phi (reported)           | A                       | w(phi)                    |
|---------|--------------------------|-------------------------|---------------------------|
| hom     | hom2                     | hom2 J_C                | phi                       |
| iid     | hom2, v                  | hom2 J_C + v I_C        | phi                       |
| free    | hom2, v_1..v_C           | hom2 J_C + diag(v)      | phi                       |
| full    | vech(V) (upper triangle) | V (hom2 absorbed)       | phi                       |
| lowrank | hom2, l_1..l_C           | hom2 J_C + l l^T        | [hom2, vech(l l^T)]       |

`lowrank` is a shared donor effect with cell-type loadings l (V of rank 1) on top of hom2.
The likelihood takes the kernel weights w; the optimizer works in coordinates theta. By
default phi = theta, unconstrained (any value while every donor's covariance is positive
definite, as the original CTMM); `nonneg=True` keeps the variances (`positive`) and the r2 >= 0
as bounds that the optimizer's projected Newton steps respect (a variance can be exactly 0),
and gives the full V as L L^T with a softplus diagonal. Adding a model is one `ModelSpec` here;
the likelihood, optimizer, start values, table columns and Wald tests read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import linalg
from .optimize import project


class VarComp(NamedTuple):
    """Natural variance components of one gene: hom2 (), V (C, C)."""

    hom2: jax.Array
    V: jax.Array


class ModelSpec(NamedTuple):
    """One covariance model. C is the number of cell types; phi the model's parameters.

    n_var: C -> number of parameters; kernels: C -> (n_kernels, C, C) the E_k;
    names: cell types -> parameter names (table columns); unpack: (phi, C) -> VarComp;
    start: (s, C) -> start phi, with s the share of the residual variance each of the
    model's `n_parts` parts gets (the original CTMM's start values); tests: C -> {name:
    parameter indices} of its Wald tests (one index: one-sided t, several: F; design.md 5);
    weights: (phi, C) -> kernel weights w, None when w = phi (linear models; only those have
    HE); positive: C -> which parameters nonneg=True keeps >= 0 (default all);
    constrain/unconstrain: (theta, C) <-> phi under nonneg, for a model whose constraint is not
    a bound on its parameters (full: V positive semi-definite); columns: cell types -> the
    table columns of each parameter (default: its name);
    null: the model nested in this one with its `tests`["V"] parameters at 0 (the other
    parameters, in order, are the null model's), for the score and LR tests of V, or None;
    diag_test: the model's test of V is a score test of diag(v_1..v_C) added to its own
    covariance, at its own fit (its kernels must include every e_c e_c^T)."""

    n_var: Callable[[int], int]
    kernels: Callable[[int], np.ndarray]
    names: Callable[[Sequence[str]], list[str]]
    unpack: Callable[[jax.Array, int], VarComp]
    start: Callable[[jax.Array, int], jax.Array]
    n_parts: int
    tests: Callable[[int], dict[str, np.ndarray]]
    weights: Callable[[jax.Array, int], jax.Array] | None = None
    positive: Callable[[int], np.ndarray] | None = None
    constrain: Callable[[jax.Array, int], jax.Array] | None = None
    unconstrain: Callable[[jax.Array, int], jax.Array] | None = None
    columns: Callable[[Sequence[str]], list[list[str]]] | None = None
    null: str | None = None
    diag_test: bool = False

    @property
    def linear(self) -> bool:
        return self.weights is None


def _softplus_inv(x):
    return x + jnp.log(-jnp.expm1(-x))


def _vech_kernels(C: int) -> np.ndarray:
    """E_k = e_i e_j^T + e_j e_i^T (i < j) or e_i e_i^T, over the upper triangle (i <= j)."""
    rows, cols = np.triu_indices(C)
    E = np.zeros((len(rows), C, C))
    E[np.arange(len(rows)), rows, cols] = 1.0
    E[np.arange(len(rows)), cols, rows] = 1.0
    return E


def _vech_to_matrix(v: jax.Array, C: int) -> jax.Array:
    V = jnp.zeros((C, C)).at[np.triu_indices(C)].set(v)
    return V + jnp.triu(V, 1).T


def _full_constrain(theta, C):
    """V = L L^T, L lower triangular with a softplus diagonal; returns vech(V)."""
    L = jnp.zeros((C, C)).at[np.tril_indices(C)].set(theta)
    L = L - jnp.diag(jnp.diag(L)) + jnp.diag(jax.nn.softplus(jnp.diag(L)))
    return (L @ L.T)[np.triu_indices(C)]


def _full_unconstrain(phi, C):
    L = linalg.cholesky(_vech_to_matrix(phi, C))
    L = L - jnp.diag(jnp.diag(L)) + jnp.diag(_softplus_inv(jnp.diag(L)))
    return L[np.tril_indices(C)]


def _pairs(cts: Sequence[str]) -> list[str]:
    rows, cols = np.triu_indices(len(cts))
    return [f"V_{cts[i]}_{cts[j]}" for i, j in zip(rows, cols, strict=True)]


def _loadings_start(s, C):
    """hom2 = s and loadings sqrt(s) (0.5 .. 1.5): not proportional to 1_C, where l l^T and
    hom2 J_C would be collinear (a singular information)."""
    return jnp.concatenate([s[None], jnp.sqrt(s) * jnp.linspace(0.5, 1.5, C)])


_J = lambda C: np.ones((1, C, C))  # noqa: E731
_hom2_test = lambda C: {"hom2": np.array([0])}  # noqa: E731

MODELS: dict[str, ModelSpec] = {
    "hom": ModelSpec(
        n_var=lambda C: 1,
        kernels=_J,
        names=lambda cts: ["hom2"],
        unpack=lambda phi, C: VarComp(phi[0], jnp.zeros((C, C))),
        start=lambda s, C: s[None],
        n_parts=1,
        tests=_hom2_test,
    ),
    "iid": ModelSpec(
        n_var=lambda C: 2,
        kernels=lambda C: np.concatenate([_J(C), np.eye(C)[None]]),
        names=lambda cts: ["hom2", "V"],
        unpack=lambda phi, C: VarComp(phi[0], phi[1] * jnp.eye(C)),
        start=lambda s, C: jnp.full(2, s),
        n_parts=2,
        tests=lambda C: {"hom2": np.array([0]), "V": np.array([1])},
        null="hom",
        columns=lambda cts: [["hom2"], [f"V_{c}" for c in cts]],  # one V, shown per cell type
    ),
    "free": ModelSpec(
        n_var=lambda C: 1 + C,
        kernels=lambda C: np.concatenate([_J(C), np.eye(C)[:, :, None] * np.eye(C)[:, None]]),
        names=lambda cts: ["hom2"] + [f"V_{c}" for c in cts],
        unpack=lambda phi, C: VarComp(phi[0], jnp.diag(phi[1:])),
        start=lambda s, C: jnp.full(1 + C, s),
        n_parts=2,
        tests=lambda C: {"hom2": np.array([0]), "V": np.arange(1, 1 + C)},
        null="hom",
    ),
    "full": ModelSpec(
        n_var=lambda C: C * (C + 1) // 2,
        kernels=_vech_kernels,
        names=_pairs,
        unpack=lambda phi, C: VarComp(jnp.zeros(()), _vech_to_matrix(phi, C)),
        start=lambda s, C: s * jnp.eye(C)[np.triu_indices(C)],
        n_parts=1,
        tests=lambda C: {},  # the original has no test on a full V
        constrain=_full_constrain,
        unconstrain=_full_unconstrain,
    ),
    "lowrank": ModelSpec(
        n_var=lambda C: 1 + C,
        kernels=lambda C: np.concatenate([_J(C), _vech_kernels(C)]),
        names=lambda cts: ["hom2"] + [f"L_{c}" for c in cts],
        unpack=lambda phi, C: VarComp(phi[0], jnp.outer(phi[1:], phi[1:])),
        start=_loadings_start,
        n_parts=2,
        tests=_hom2_test,  # l = 0 is not identified (sign, and a zero information): no test
        weights=lambda phi, C: jnp.concatenate(
            [phi[:1], jnp.outer(phi[1:], phi[1:])[np.triu_indices(C)]]
        ),
        positive=lambda C: np.arange(1 + C) == 0,  # hom2 only; loadings take any sign
        diag_test=True,
    ),
}


def get(model: str) -> ModelSpec:
    """The registry entry of `model`; ValueError naming the known models otherwise."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; use one of {', '.join(MODELS)}.")
    return MODELS[model]


def check_model(model: str) -> None:
    get(model)


def n_var(model: str, C: int) -> int:
    """Number of parameters of `model` with C cell types."""
    return get(model).n_var(C)


def kernels(model: str, C: int) -> np.ndarray:
    """Kernels E_k with A = sum_k w_k E_k.  Returns (n_kernels, C, C) float64."""
    return get(model).kernels(C)


def param_names(model: str, celltypes: Sequence[str]) -> list[str]:
    """Names of the parameters phi, in order."""
    return get(model).names(list(celltypes))


def unpack(phi: jax.Array, model: str, C: int) -> VarComp:
    """Parameters phi (n_var,) -> VarComp(hom2, V)."""
    return get(model).unpack(phi, C)


def kernel_weights(phi: jax.Array, model: str, C: int) -> jax.Array:
    """phi (n_var + n_rand,) -> the likelihood's kernel weights (n_kernels + n_rand,); the
    random-covariate variances r2 at the end pass through."""
    spec = get(model)
    if spec.linear:
        return phi
    k = spec.n_var(C)
    return jnp.concatenate([spec.weights(phi[:k], C), phi[k:]])


def _positive(spec: ModelSpec, C: int) -> np.ndarray:
    return np.ones(spec.n_var(C), bool) if spec.positive is None else spec.positive(C)


def bounded(model: str, C: int, n_rand: int, nonneg: bool) -> np.ndarray | None:
    """(n_var + n_rand,) bool: the optimizer's coordinates theta bounded below by 0 (the
    `positive` parameters and the r2 under nonneg, where theta = phi; none for a model with
    its own `constrain` map), or None when nothing is bounded."""
    if not nonneg:
        return None
    spec = get(model)
    k = spec.n_var(C)
    own = np.zeros(k, bool) if spec.constrain is not None else _positive(spec, C)
    out = np.concatenate([own, np.ones(n_rand, bool)])
    return out if out.any() else None


def identity_map(model: str, nonneg: bool) -> bool:
    """Whether theta is the kernel weights w itself (a linear model without a constrain map):
    the objective then needs no chain rule."""
    spec = get(model)
    return spec.linear and (not nonneg or spec.constrain is None)


def to_natural(theta: jax.Array, model: str, C: int, nonneg: bool) -> jax.Array:
    """Optimizer coordinates theta (n_var + n_rand,) -> phi: the model's parameters, then the
    random-covariate variances r2. theta = phi, except under nonneg for a model with its own
    `constrain` map (full: V = L L^T with a softplus diagonal); the bounds of the other
    models are kept by the optimizer (`bounded`, optimize.fisher_scoring)."""
    spec = get(model)
    if not nonneg or spec.constrain is None:
        return theta
    k = spec.n_var(C)
    return jnp.concatenate([spec.constrain(theta[:k], C), theta[k:]])


def from_natural(phi: jax.Array, model: str, C: int, nonneg: bool) -> jax.Array:
    """Inverse of `to_natural`, and under nonneg the projection onto the constrained set
    (bounded coordinates clipped at 0; full's V must be positive definite)."""
    if not nonneg:
        return phi
    spec = get(model)
    k = spec.n_var(C)
    theta = project(phi, bounded(model, C, phi.shape[0] - k, nonneg))
    if spec.constrain is None:
        return theta
    return jnp.concatenate([spec.unconstrain(theta[:k], C), theta[k:]])


def from_natural_batch(phi, model: str, C: int, nonneg: bool) -> jax.Array:
    """`from_natural` over a leading gene axis: phi (G, n_var)."""
    return jax.vmap(lambda p: from_natural(p, model, C, nonneg))(jnp.asarray(phi))


def start_values(s: jax.Array, model: str, C: int, n_rand: int) -> jax.Array:
    """Start phi (n_var + n_rand,) from the residual variance s, as the original CTMM: s split
    equally over the model's parts and the random covariates."""
    spec = get(model)
    share = s / (n_rand + spec.n_parts)
    return jnp.concatenate([spec.start(share, C), jnp.full(n_rand, share)])


def table_columns(model: str, celltypes: Sequence[str]) -> list[list[str]]:
    """The table columns of each parameter (iid's single V appears as V_<ct> for each ct)."""
    spec = get(model)
    cts = list(celltypes)
    return spec.columns(cts) if spec.columns is not None else [[n] for n in spec.names(cts)]


def embed_null(phi0: np.ndarray, model: str, C: int) -> np.ndarray:
    """Parameters (G, n_var + n_rand) of `model` at its null model's estimates phi0 (G,
    n_var0 + n_rand): the tested V parameters 0, the others (then the random r2) from phi0."""
    tested = get(model).tests(C)["V"]
    kept = np.setdiff1d(np.arange(n_var(model, C)), tested)
    n_rand = phi0.shape[1] - len(kept)
    phi = np.zeros((phi0.shape[0], n_var(model, C) + n_rand))
    phi[:, kept] = phi0[:, : len(kept)]
    phi[:, n_var(model, C) :] = phi0[:, len(kept) :]
    return phi


def diag_j_coefficients(model: str, C: int) -> np.ndarray | None:
    """(n_kernels, C + 1) rows [a_k, c_k] with E_k = diag(a_k) + c_k J_C when every kernel of
    `model` has that form (hom, iid, free: likelihood.GeneData.diag_j), else None."""
    E = kernels(model, C)
    off = ~np.eye(C, dtype=bool)
    c = E[:, off].mean(1) if C > 1 else np.zeros(len(E))
    if not np.all(E[:, off] == c[:, None]):
        return None
    return np.concatenate([np.diagonal(E, axis1=1, axis2=2) - c[:, None], c[:, None]], 1)


def diag_kernels(model: str, C: int) -> np.ndarray:
    """(C,) the index of the kernel e_c e_c^T of each cell type c among the model's kernels."""
    E = kernels(model, C)
    idx = [np.flatnonzero(np.all(E == np.diag(np.eye(C)[c]), axis=(1, 2))) for c in range(C)]
    if any(len(i) != 1 for i in idx):
        raise ValueError(f"model {model!r}: its kernels do not include each e_c e_c^T once.")
    return np.array([i[0] for i in idx])
