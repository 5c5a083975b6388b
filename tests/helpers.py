"""Shared test helpers: tolerances and small random problems."""

from __future__ import annotations

import numpy as np

import ctmm_jax as cj
from ctmm_jax import blocks, likelihood

CLOSED_FORM = dict(rtol=1e-8, atol=1e-8)  # likelihoods, closed forms
OPTIMIZER = dict(rtol=1e-5, atol=1e-5)  # fitted values

SHAPES = ("ctp", "op")
MODELS = ("hom", "iid", "free", "full")
METHODS = ("ml", "reml")


def small_data(shape: str, G=3, N=15, C=3, seed=0, V=None, alpha=5.0):
    """Simulated CTP (or the OP derived from it); P ~ Dirichlet(alpha): smaller alpha, more
    spread in P across donors, better identified OP fits."""
    V = np.diag(np.linspace(0.3, 0.0, C)) if V is None else V
    P = np.random.default_rng(seed + 1000).dirichlet(np.full(C, alpha), size=N)
    d = cj.simulate(G, N, C, hom2=0.2, V=V, beta=np.arange(C) * 0.5, ctnu=0.3, P=P, seed=seed)
    return d if shape == "ctp" else cj.OPData.from_ctp(d)


def random_phi(model: str, C: int, seed=0) -> np.ndarray:
    """A feasible natural parameter vector with some negative V entries."""
    rng = np.random.default_rng(seed)
    if model == "hom":
        return np.array([0.4])
    if model == "iid":
        return np.array([0.4, -0.05])
    if model == "free":
        return np.concatenate([[0.4], rng.uniform(-0.05, 0.3, C)])
    A = rng.normal(size=(C, C)) * 0.3
    V = A @ A.T + 0.2 * np.eye(C)
    return V[np.triu_indices(C)]


def gene_data(data, model: str, g: int) -> likelihood.GeneData:
    return blocks.to_blocks(data, model).gene(g)
