"""Genotypes for GxEMM from PLINK 1 binary files (.bed/.bim/.fam): filters, standardised
genotypes S and the genetic relatedness matrix K = S S^T / M.

For allele counts g_ij (0, 1, 2; missing allowed) of individual i at variant j, with p_j the
allele frequency among the individuals with a call:

    S_ij = (g_ij - 2 p_j) / sqrt(2 p_j (1 - p_j)),   missing calls -> 0 (the mean),

over the variants with minor allele frequency >= maf and missing rate <= max_missing; then
K = S S^T / M (M kept variants), as the GxEMM README's `snps %*% t(snps) / S`. `grm` streams
the variants in blocks (memory O(N block)); `read_genotypes` returns S itself for the
genotype path of gxemm.fit (K never formed: O(N M^2) per iteration, for M << N).

Read with bed-reader (the optional extra `plink`: `pip install ctmm_jax[plink]`): maintained by
the FaST-LMM authors, it reads any subset of individuals and variants of a .bed straight into
NumPy with no other dependency (pandas-plink brings dask and xarray for the same job).
Individuals are identified by the .fam's second column (IID) and selected by name, never by
position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

BLOCK = 20_000  # variants per read in grm


class GRM(NamedTuple):
    """K: (N, N) genetic relatedness of `ids` (in that order); n_variants: M, the variants
    kept by the filters."""

    K: np.ndarray
    ids: tuple[str, ...]
    n_variants: int


class Genotypes(NamedTuple):
    """S: (N, M) standardised genotypes of `ids` (rows) at the M kept variants."""

    S: np.ndarray
    ids: tuple[str, ...]


def _open(prefix):
    """bed_reader.open_bed on PREFIX.bed (PREFIX may end in .bed); errors name the files."""
    try:
        from bed_reader import open_bed
    except ImportError as e:  # optional extra
        raise ImportError(
            "reading PLINK files needs bed-reader: pip install 'ctmm_jax[plink]'."
        ) from e
    prefix = str(prefix)
    prefix = prefix[:-4] if prefix.endswith(".bed") else prefix
    missing = [f"{prefix}{s}" for s in (".bed", ".bim", ".fam") if not Path(prefix + s).is_file()]
    if missing:
        raise ValueError(f"bfile {prefix!r}: missing {', '.join(missing)}.")
    try:
        return open_bed(prefix + ".bed")
    except Exception as e:  # bed-reader reports damage as several exception types
        raise ValueError(f"bfile {prefix!r}: cannot read the .bed/.fam ({e}).") from e


def _rows(bed, ids: Sequence[str] | None, prefix) -> tuple[np.ndarray, tuple[str, ...]]:
    """Rows of the .bed for `ids` (all, in file order, when None); ValueError naming ids that
    the .fam lacks, or repeated ids."""
    fam = [str(i) for i in bed.iid]
    if len(set(fam)) != len(fam):
        raise ValueError(f"bfile {str(prefix)!r}: the .fam repeats individual ids (IID).")
    if ids is None:
        return np.arange(len(fam)), tuple(fam)
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("ids: repeated individual ids.")
    where = {v: k for k, v in enumerate(fam)}
    absent = [i for i in ids if i not in where]
    if absent:
        raise ValueError(
            f"ids: {len(absent)} individuals are not in {str(prefix)!r}.fam (e.g. "
            f"{', '.join(absent[:5])}); match the ids to the .fam's second column."
        )
    return np.array([where[i] for i in ids]), tuple(ids)


def fam_ids(bfile) -> tuple[str, ...]:
    """The individual ids (IID, the .fam's second column) of PLINK files PREFIX, in file
    order."""
    with _open(bfile) as bed:
        return tuple(str(i) for i in bed.iid)


def standardize(g: np.ndarray, maf: float, max_missing: float) -> np.ndarray:
    """Standardised columns of the allele counts g (N, m) (NaN = missing) that pass the
    filters (module docstring); (N, kept)."""
    called = ~np.isnan(g)
    n_called = called.sum(0)
    p = np.where(n_called > 0, np.nansum(g, 0) / np.maximum(2 * n_called, 1), 0.0)
    keep = (np.minimum(p, 1 - p) >= maf) & (1 - n_called / g.shape[0] <= max_missing)
    keep &= (p > 0) & (p < 1)
    p = p[keep]
    z = (g[:, keep] - 2 * p) / np.sqrt(2 * p * (1 - p))
    return np.where(called[:, keep], z, 0.0)


def _check_filters(maf: float, max_missing: float) -> None:
    if not 0 <= maf < 0.5:
        raise ValueError(f"maf={maf!r}: give a minor allele frequency in [0, 0.5).")
    if not 0 <= max_missing <= 1:
        raise ValueError(f"max_missing={max_missing!r}: give a missing rate in [0, 1].")


def grm(
    bfile, ids: Sequence[str] | None = None, *, maf: float = 0.01, max_missing: float = 0.05,
    block: int = BLOCK,
) -> GRM:  # fmt: skip
    """K = S S^T / M of the individuals `ids` (default: all, in .fam order) from PLINK files
    PREFIX.bed/.bim/.fam, reading `block` variants at a time."""
    _check_filters(maf, max_missing)
    with _open(bfile) as bed:
        rows, names = _rows(bed, ids, bfile)
        K, M = np.zeros((len(rows), len(rows))), 0
        for start in range(0, bed.sid_count, block):
            g = bed.read(index=np.s_[rows, start : start + block], dtype="float64")
            S = standardize(g, maf, max_missing)
            K += S @ S.T
            M += S.shape[1]
    if M == 0:
        raise ValueError(f"bfile {str(bfile)!r}: no variant passes maf >= {maf} and "
                         f"missing rate <= {max_missing}.")  # fmt: skip
    return GRM(K / M, names, M)


def read_genotypes(
    bfile, ids: Sequence[str] | None = None, *, maf: float = 0.01, max_missing: float = 0.05
) -> Genotypes:
    """Standardised genotypes S (N, M) of the individuals `ids`, for gxemm.fit(..., S=S)."""
    _check_filters(maf, max_missing)
    with _open(bfile) as bed:
        rows, names = _rows(bed, ids, bfile)
        S = standardize(bed.read(index=np.s_[rows, :], dtype="float64"), maf, max_missing)
    if S.shape[1] == 0:
        raise ValueError(f"bfile {str(bfile)!r}: no variant passes the filters.")
    return Genotypes(S, names)
