"""The four CTMM variance models: kernels, parameter names and the theta <-> natural maps.

Every model writes the shared (between-donor) covariance of one donor's C cell types as a
linear combination of fixed C x C kernels,

    A(phi) = sum_k phi_k E_k,        phi = natural parameters,

| model | phi                      | A                     |
|-------|--------------------------|-----------------------|
| hom   | hom2                     | hom2 J_C              |
| iid   | hom2, v                  | hom2 J_C + v I_C      |
| free  | hom2, v_1..v_C           | hom2 J_C + diag(v)    |
| full  | vech(V) (upper triangle) | V (hom2 absorbed)     |

The optimizer sees an unconstrained `theta`. By default `phi = theta` (as the original CTMM:
any value is allowed as long as every donor's covariance is positive definite). With
`nonneg=True` variances go through softplus and the full V is `L L^T` with a softplus diagonal.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MODELS = ("hom", "iid", "free", "full")


class VarComp(NamedTuple):
    """Natural variance components of one gene: hom2 (), V (C, C)."""

    hom2: jax.Array
    V: jax.Array


def check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; use one of {', '.join(MODELS)}.")


def n_var(model: str, C: int) -> int:
    """Number of variance parameters of `model` with C cell types."""
    return {"hom": 1, "iid": 2, "free": 1 + C, "full": C * (C + 1) // 2}[model]


def kernels(model: str, C: int) -> np.ndarray:
    """Kernels E_k with A(phi) = sum_k phi_k E_k.  Returns (n_var, C, C) float64."""
    J, eye = np.ones((C, C)), np.eye(C)
    if model == "hom":
        return J[None]
    if model == "iid":
        return np.stack([J, eye])
    if model == "free":
        return np.concatenate([J[None], eye[:, :, None] * eye[:, None, :]])
    rows, cols = np.triu_indices(C)
    E = np.zeros((len(rows), C, C))
    E[np.arange(len(rows)), rows, cols] = 1.0
    E[np.arange(len(rows)), cols, rows] = 1.0
    return E


def param_names(model: str, celltypes: list[str]) -> list[str]:
    """Names of the natural parameters, in the order of `kernels`."""
    if model == "hom":
        return ["hom2"]
    if model == "iid":
        return ["hom2", "V"]
    if model == "free":
        return ["hom2"] + [f"V_{c}" for c in celltypes]
    rows, cols = np.triu_indices(len(celltypes))
    return [f"V_{celltypes[i]}_{celltypes[j]}" for i, j in zip(rows, cols, strict=True)]


def unpack(phi: jax.Array, model: str, C: int) -> VarComp:
    """Natural parameters (n_var,) -> VarComp(hom2, V)."""
    if model == "hom":
        return VarComp(phi[0], jnp.zeros((C, C)))
    if model == "iid":
        return VarComp(phi[0], phi[1] * jnp.eye(C))
    if model == "free":
        return VarComp(phi[0], jnp.diag(phi[1:]))
    V = jnp.zeros((C, C)).at[np.triu_indices(C)].set(phi)
    return VarComp(jnp.zeros(()), V + jnp.triu(V, 1).T)


def _softplus_inv(x):
    return x + jnp.log(-jnp.expm1(-x))


def to_natural(theta: jax.Array, model: str, C: int, nonneg: bool) -> jax.Array:
    """Unconstrained theta (n_var + n_rand,) -> natural phi: the model's parameters, then the
    random-covariate variances r2 (softplus too when nonneg)."""
    if not nonneg:
        return theta
    k = n_var(model, C)
    r2 = jax.nn.softplus(theta[k:])
    if model != "full":
        return jnp.concatenate([jax.nn.softplus(theta[:k]), r2])
    rows, cols = np.tril_indices(C)
    L = jnp.zeros((C, C)).at[rows, cols].set(theta[:k])
    L = L - jnp.diag(jnp.diag(L)) + jnp.diag(jax.nn.softplus(jnp.diag(L)))
    return jnp.concatenate([(L @ L.T)[np.triu_indices(C)], r2])


def from_natural_batch(phi, model: str, C: int, nonneg: bool) -> jax.Array:
    """`from_natural` over a leading gene axis: phi (G, n_var)."""
    return jax.vmap(lambda p: from_natural(p, model, C, nonneg))(jnp.asarray(phi))


def from_natural(phi: jax.Array, model: str, C: int, nonneg: bool) -> jax.Array:
    """Inverse of `to_natural`; phi must be strictly inside the constrained set when nonneg."""
    if not nonneg:
        return phi
    k = n_var(model, C)
    r2 = _softplus_inv(phi[k:])
    if model != "full":
        return jnp.concatenate([_softplus_inv(phi[:k]), r2])
    L = jnp.linalg.cholesky(unpack(phi[:k], model, C).V)
    L = L - jnp.diag(jnp.diag(L)) + jnp.diag(_softplus_inv(jnp.diag(L)))
    return jnp.concatenate([L[np.tril_indices(C)], r2])
