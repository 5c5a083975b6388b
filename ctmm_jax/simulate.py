"""Seeded simulation of CTP data (and, through OPData.from_ctp, OP data) from the CTMM model.

For gene g and donor i: Y_gi = beta_g + alpha_gi 1_C + gamma_gi + (sum_r R_ri u_gr) 1_C + eps_gi
with alpha_gi ~ N(0, hom2_g), gamma_gi ~ N(0, V_g), u_gr ~ N(0, r2_r I) (random covariates,
one draw per gene and level, shared by the cell types) and eps_gic ~ N(0, ctnu_gic).
"""

from __future__ import annotations

import numpy as np

from .data import CTPData


def _psd_sqrt(V: np.ndarray) -> np.ndarray:
    """S with S S^T = V for symmetric PSD V (..., C, C); works at V = 0."""
    w, U = np.linalg.eigh(V)
    if (w < -1e-12 * np.maximum(1.0, np.abs(w).max())).any():
        raise ValueError("V: must be positive semi-definite to simulate from it.")
    return U * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


def simulate(
    n_genes: int = 100,
    n_donors: int = 100,
    n_celltypes: int = 4,
    *,
    hom2=0.1,
    V=0.0,
    beta=0.0,
    ctnu=0.1,
    P=None,
    random_covars: dict | None = None,
    r2: dict | None = None,
    seed: int = 0,
) -> CTPData:
    """Draw CTP data from the model.

    Args:
        hom2: scalar or (G,) shared variance.
        V: scalar v (V = v I_C), (C,) diagonal, (C, C) full, or (G, C, C) per gene.
        beta: scalar, (C,) or (G, C) cell-type means.
        ctnu: (G, N, C) noise variances, or a scalar mean: then ctnu ~ mean * Gamma(4) / 4.
        P: (N, C) proportions; default Dirichlet(5, ..., 5) per donor.
        random_covars, r2: name -> (N, m) design and name -> its variance (e.g. one-hot
            batches with a batch effect of variance r2).
        seed: seed of numpy's default_rng; the same seed gives the same data.
    Returns:
        CTPData with genes 'gene0'.., donors 'ind0'.., cell types 'ct0'...
    """
    G, N, C = int(n_genes), int(n_donors), int(n_celltypes)
    rng = np.random.default_rng(seed)
    if P is None:
        P = rng.dirichlet(np.full(C, 5.0), size=N)
    V = np.asarray(V, dtype=np.float64)
    if V.ndim == 0:
        V = V * np.eye(C)
    elif V.ndim == 1:
        V = np.diag(V)
    V = np.broadcast_to(V, (G, C, C))
    hom2 = np.broadcast_to(np.asarray(hom2, dtype=np.float64), (G,))
    if (hom2 < 0).any():
        raise ValueError("hom2: must be >= 0 to simulate from it.")
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), (G, C))
    if np.ndim(ctnu) == 0:
        ctnu = float(ctnu) * rng.gamma(4.0, 0.25, size=(G, N, C))
    ctnu = np.broadcast_to(np.asarray(ctnu, dtype=np.float64), (G, N, C))
    alpha = rng.standard_normal((G, N)) * np.sqrt(hom2)[:, None]
    gamma = np.einsum("gcd,gnd->gnc", _psd_sqrt(V), rng.standard_normal((G, N, C)))
    eps = rng.standard_normal((G, N, C)) * np.sqrt(ctnu)
    Y = beta[:, None, :] + alpha[..., None] + gamma + eps
    for name in sorted(random_covars or {}):
        R = np.asarray(random_covars[name], dtype=np.float64)
        u = rng.standard_normal((G, R.shape[1])) * np.sqrt(float(r2[name]))
        Y = Y + (u @ R.T)[..., None]
    return CTPData.from_arrays(
        Y, np.array(ctnu), P,
        genes=[f"gene{g}" for g in range(G)],
        donors=[f"ind{i}" for i in range(N)],
        celltypes=[f"ct{c}" for c in range(C)],
    )  # fmt: skip
