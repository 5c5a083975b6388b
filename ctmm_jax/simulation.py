"""Seeded simulation of CTP data (and, through OPData.from_ctp, OP data) from the CTMM model.

For gene g and donor i: Y_gi = beta_g + alpha_gi 1_C + gamma_gi + (sum_r R_ri u_gr) 1_C + eps_gi
with alpha_gi ~ N(0, hom2_g), gamma_gi ~ N(0, V_g), u_gr ~ N(0, r2_r I) (random covariates,
one draw per gene and level, shared by the cell types) and eps_gic ~ N(0, ctnu_gic).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

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


def cell_log_means(rng, G: int, N: int, C: int, hom2, V, ct_sd: float) -> np.ndarray:
    """(G, N, C) log rates per 10,000 UMIs of simulate_cells: log r_g + b_gc + a_gi + g_gic,
    the first draws of its generator `rng` (so the same seed gives the same rates whatever the
    cells drawn after them)."""
    hom2 = np.broadcast_to(np.asarray(hom2, dtype=np.float64), (G,))
    V = np.broadcast_to(np.asarray(V, dtype=np.float64), (G, C))
    if (hom2 < 0).any() or (V < 0).any():
        raise ValueError("hom2, V: variances must be >= 0 to simulate from them.")
    log_rate = np.log(5.0) + rng.standard_normal(G)
    ct_effect = ct_sd * rng.standard_normal((G, C))
    donor_effect = np.sqrt(hom2)[:, None] * rng.standard_normal((G, N))
    specific = np.sqrt(V)[:, None, :] * rng.standard_normal((G, N, C))
    return log_rate[:, None, None] + ct_effect[:, None, :] + donor_effect[..., None] + specific


def simulate_cells(
    n_genes: int = 200,
    n_donors: int = 40,
    n_celltypes: int = 4,
    *,
    cells_per_donor: float = 100.0,
    hom2=0.05,
    V=0.05,
    ct_sd: float = 0.5,
    depth: float = 5000.0,
    nb_size: float | None = None,
    seed: int = 0,
) -> tuple[sparse.csr_matrix, pd.DataFrame, list[str]]:
    """Draw single-cell UMI counts with donor and cell-type structure on the log scale.

    Gene g has a base rate r_g ~ LogNormal(log 5, 1) per 10,000 UMIs and cell-type effects
    b_gc ~ N(0, ct_sd^2); donor i adds a_gi ~ N(0, hom2_g) shared by its cell types and
    g_gic ~ N(0, V_gc) specific to each (hom2: scalar or (G,); V: scalar, (C,) or (G, C)).
    Donor i has Poisson(cells_per_donor) cells (at least 2), of cell types drawn from its
    proportions p_i ~ Dirichlet(2, ..., 2); cell j has a library size
    L_j ~ depth * LogNormal(0, 0.3) and counts
    x_jg ~ Poisson(L_j / 1e4 * r_g * exp(b_gc + a_gi + g_gic)) (with `nb_size`, negative
    binomial of that mean and size nb_size: overdispersed). The simulated genes are a
    small part of a transcriptome: the cell's total UMI count n_counts is theirs plus
    Poisson(L_j) from the other genes, so normalising by it does not mix the genes' donor
    effects into every gene (as normalising by the sum over a few hundred genes would).

    Returns:
        counts: (cells, genes) CSR of int64 counts; cells: one row per cell (index 'cell0'..)
        with columns donor ('ind0'..), cell_type ('ct0'..) and n_counts (the cell's total);
        genes: names 'gene0'...
    """
    G, N, C = int(n_genes), int(n_donors), int(n_celltypes)
    rng = np.random.default_rng(seed)
    log_mu = cell_log_means(rng, G, N, C, hom2, V, ct_sd)
    n_cells = np.maximum(rng.poisson(cells_per_donor, N), 2)
    donor = np.repeat(np.arange(N), n_cells)
    props = rng.dirichlet(np.full(C, 2.0), size=N)
    cell_type = (rng.random(len(donor))[:, None] > np.cumsum(props[donor], 1)).sum(1)
    cell_type = np.minimum(cell_type, C - 1)
    library = depth * np.exp(0.3 * rng.standard_normal(len(donor)))
    blocks = []  # 256 genes at a time: the rates are a dense (cells, 256) temporary
    for j in range(0, G, 256):
        lam = library[:, None] / 1e4 * np.exp(log_mu[j : j + 256, donor, cell_type].T)
        x = rng.poisson(lam) if nb_size is None else (
            rng.negative_binomial(nb_size, nb_size / (nb_size + lam)))  # fmt: skip
        blocks.append(sparse.csr_matrix(x))
    counts = sparse.hstack(blocks, format="csr")
    own = np.asarray(counts.sum(axis=1)).ravel()
    n_counts = own + rng.poisson(library)  # plus the rest of the transcriptome
    cells = pd.DataFrame(
        {
            "donor": [f"ind{i}" for i in donor],
            "cell_type": [f"ct{c}" for c in cell_type],
            "n_counts": n_counts,
        },
        index=pd.Index([f"cell{j}" for j in range(len(donor))], name="cell"),
    )
    return counts, cells, [f"gene{g}" for g in range(G)]


def simulate_anndata(*args, **kwargs):
    """`simulate_cells` as an AnnData: X = log1p(counts / n_counts * 1e4) (CSR), the raw
    counts in layers['counts'], obs = the cell table, var_names = the genes. Needs anndata
    (`pip install "ctmm_jax[anndata]"`)."""
    try:
        import anndata
    except ImportError as err:
        raise ImportError('simulate_anndata needs: pip install "ctmm_jax[anndata]"') from err
    from .preprocess import normalize_log1p

    counts, cells, genes = simulate_cells(*args, **kwargs)
    X = normalize_log1p(counts, total=cells["n_counts"].to_numpy())
    adata = anndata.AnnData(X=X, obs=cells, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    adata.layers["counts"] = counts
    return adata
