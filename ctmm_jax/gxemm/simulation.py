"""Seeded simulation of the original GxEMM README example (discrete environments)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Simulated(NamedTuple):
    y: np.ndarray  # (N,) or (n_traits, N)
    X: np.ndarray  # (N, K0 - 1) covariates (environment indicators but the first)
    K: np.ndarray  # (N, N) kinship S S^T / M
    Z: np.ndarray  # (N, K0) one-hot environments
    S: np.ndarray  # (N, M) standardised genotypes


def simulate(
    n: int = 1000, n_snps: int = 100, *, maf: float = 0.1, sig2g=(0.1, 0.4), sig2g_hom=0.0,
    sig2e: float = 1.0, mean=(0.1, -0.5), n_traits: int | None = None, seed: int = 0,
) -> Simulated:  # fmt: skip
    """README example of the original GxEMM: genotypes binomial(2, maf), each SNP standardised
    (monomorphic SNPs set to 0); K = S S^T / M; K0 = len(sig2g) discrete environments with
    equal probabilities (two: z ~ Bernoulli(0.5), Z = [z, 1 - z]); X = Z[:, 1:];

        y = Z mean + S b / sqrt(M) + sum_k z_k o (S b_k / sqrt(M)) + e,
        b ~ N(0, sig2g_hom I), b_k ~ N(0, sig2g_k I), e ~ N(0, sig2e I),

    i.e. genetic covariance sig2g_hom K + sum_k sig2g_k K o z_k z_k^T (the free model; the
    README example has no shared part) and homogeneous noise. n_traits draws that many traits
    (rows of y) from the same S and Z."""
    rng = np.random.default_rng(seed)
    G = rng.binomial(2, maf, size=(n, n_snps)).astype(np.float64)
    sd = G.std(0, ddof=1)
    S = np.where(sd > 0, (G - G.mean(0)) / np.where(sd > 0, sd, 1.0), 0.0)
    K0 = len(sig2g)
    env = rng.integers(0, K0, size=n) if K0 > 2 else (rng.random(n) >= 0.5).astype(int)
    Z = np.eye(K0)[env]
    T = 1 if n_traits is None else n_traits
    b = rng.normal(size=(T, K0, n_snps)) * np.sqrt(np.asarray(sig2g, float))[None, :, None]
    g = np.einsum("nk,nm,tkm->tn", Z, S, b) / np.sqrt(n_snps)
    b_hom = rng.normal(scale=np.sqrt(sig2g_hom), size=(T, n_snps))
    g = g + b_hom @ S.T / np.sqrt(n_snps)
    y = Z @ np.asarray(mean, float) + g + rng.normal(scale=np.sqrt(sig2e), size=(T, n))
    return Simulated(y[0] if n_traits is None else y, Z[:, 1:], S @ S.T / n_snps, Z, S)
