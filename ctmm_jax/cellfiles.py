"""Single cells from files, read as scanpy users expect (what `ctmm-jax pseudobulk` reads).

- Text (cell tables, gene and barcode lists, 10x features): gzip-compressed or not, told by
  the file's first bytes whatever its name; UTF-8 with or without a byte-order mark (Excel
  writes one); in cell tables only empty fields are missing, so a donor named "NA" stays "NA".
- 10x Genomics folders (`filtered_feature_bc_matrix/`: matrix.mtx[.gz], features.tsv[.gz] or
  v2's genes.tsv, barcodes.tsv[.gz]) as scanpy's `read_10x_mtx`: the genes x cells matrix is
  transposed; genes are named by symbol (`var_names="gene_symbols"`, duplicates made unique
  as anndata's `var_names_make_unique`: the second MT-X is MT-X-1) or by gene id
  (`"gene_ids"`); only "Gene Expression" features are kept when the file gives feature types
  (scanpy's `gex_only=True`).
- A truncated or corrupt .mtx or .h5ad is a ValueError that names the file.
"""

from __future__ import annotations

import gzip
import io
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # scipy is imported when a matrix is read: `ctmm-jax --help` stays quick
    from scipy import sparse

VAR_NAMES = ("gene_symbols", "gene_ids")
GENE_EXPRESSION = "Gene Expression"  # 10x's feature type of genes (features.tsv column 3)
_GZIP_MAGIC = b"\x1f\x8b"


def open_text(path: str | PathLike) -> io.TextIOBase:
    """The file as text: gunzipped if it starts with gzip's magic bytes, decoded as UTF-8 with
    a byte-order mark, if any, removed ("utf-8-sig")."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _read_text(path) -> str:
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save it as UTF-8.") from None
    except (EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: a truncated or corrupt gzip file ({err}).") from None


def read_lines(path: str | PathLike) -> list[str]:
    """The non-empty lines of a text file, stripped (a gene or barcode list)."""
    return [s.strip() for s in _read_text(path).splitlines() if s.strip()]


def make_unique(names) -> list[str]:
    """Names made unique as anndata's `make_index_unique` (scanpy's default for 10x symbols):
    the first of a repeated name keeps it, the next ones get "-1", "-2", ..., skipping names
    already taken."""
    names = [str(n) for n in names]
    taken, used = set(names), {}
    out = []
    for name, repeat in zip(names, pd.Index(names).duplicated(), strict=True):
        if repeat:
            k = used.get(name, 0)
            while f"{name}-{k + 1}" in taken:
                k += 1
            used[name] = k + 1
            name = f"{name}-{k + 1}"
            taken.add(name)
        out.append(name)
    return out


def read_features(
    path: str | PathLike, var_names: str = "gene_symbols"
) -> tuple[list[str], np.ndarray | None]:
    """Gene names from a gene list (one name per line) or a 10x features/genes.tsv[.gz].

    A tab-separated file with two or more columns is 10x's: gene id, gene symbol and (v3)
    feature type. `var_names` picks the name: "gene_symbols" (column 2, repeated symbols made
    unique by `make_unique`) or "gene_ids" (column 1, which must be unique).

    Returns:
        names: (G,) one per line of the file; keep: (G,) bool, True for the "Gene Expression"
        features when the file has a type column, else None (keep all).
    """
    if var_names not in VAR_NAMES:
        raise ValueError(f"var_names: expected one of {VAR_NAMES}, got {var_names!r}.")
    rows = [line.split("\t") for line in read_lines(path)]
    if not rows:
        raise ValueError(f"{path}: no gene names in the file.")
    width = {len(r) for r in rows}
    if width == {1}:
        return [r[0].strip() for r in rows], None
    if min(width) < 2:
        raise ValueError(
            f"{path}: some lines have one tab-separated field, others {max(width)}; expected "
            "one gene name per line or 10x's gene id, symbol[, type] per line."
        )
    ids = [r[0].strip() for r in rows]
    if var_names == "gene_ids":
        names = ids
        if twice := list(pd.Index(ids)[pd.Index(ids).duplicated()][:5]):
            raise ValueError(f"{path}: gene ids must be unique; repeated: {twice}.")
    else:
        names = make_unique(r[1].strip() for r in rows)
    keep = None
    if min(width) >= 3:
        keep = np.array([r[2].strip() == GENE_EXPRESSION for r in rows])
        if not keep.any():  # e.g. an antibody-only panel: keep what there is
            keep = None
    return names, keep


def read_mtx(path: str | PathLike) -> sparse.csr_matrix:
    """A Matrix Market matrix (.mtx, or gzipped) as CSR, in the file's orientation."""
    from scipy import io as sio
    from scipy import sparse

    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == _GZIP_MAGIC
        if gzipped:
            with gzip.open(path, "rb") as f:
                X = sio.mmread(f)
        else:
            X = sio.mmread(path)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{path}: cannot read as a Matrix Market (.mtx) matrix ({err}); the file may be "
            "truncated or corrupt: download or write it again."
        ) from None
    return sparse.csr_matrix(X)


def _find(folder: Path, *names: str) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_10x(
    folder: str | PathLike, var_names: str = "gene_symbols"
) -> tuple[sparse.csr_matrix, list[str], list[str]]:
    """A 10x Genomics matrix folder (Cell Ranger's `filtered_feature_bc_matrix/`, v3:
    matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz; v2: matrix.mtx, genes.tsv, barcodes.tsv),
    as scanpy's `read_10x_mtx(folder, var_names=...)` (see the module docstring).

    Returns:
        X: (cells, G) CSR, cells x genes; genes: (G,) names; barcodes: (cells,) cell ids.
    """
    folder = Path(folder)
    matrix = _find(folder, "matrix.mtx")
    features = _find(folder, "features.tsv", "genes.tsv")
    barcodes = _find(folder, "barcodes.tsv")
    if matrix is None or features is None or barcodes is None:
        found = sorted(p.name for p in folder.iterdir())
        raise ValueError(
            f"{folder}: not a 10x matrix folder: expected matrix.mtx[.gz], features.tsv[.gz] "
            f"(or genes.tsv) and barcodes.tsv[.gz]; found {found}."
        )
    X = read_mtx(matrix).T.tocsr()  # 10x stores genes x cells
    genes, keep = read_features(features, var_names)
    cells = read_lines(barcodes)
    if X.shape != (len(cells), len(genes)):
        raise ValueError(
            f"{folder}: {matrix.name} is {X.shape[1]} genes x {X.shape[0]} cells, but "
            f"{features.name} has {len(genes)} lines and {barcodes.name} {len(cells)}."
        )
    if keep is not None:
        X, genes = X[:, np.flatnonzero(keep)], [g for g, k in zip(genes, keep, strict=True) if k]
    return X, genes, cells


def read_cells(path: str | PathLike, what: str = "cells") -> pd.DataFrame:
    """A cell table (.tsv, .csv or .parquet, gzipped or not; header row), all columns as text.

    Only empty fields are missing (a donor "NA" or "None" is a label). A first column with an
    empty header (pandas' `to_csv` writes the index so, R's `write.csv` the row names) becomes
    the index: the cell ids, by which `pseudobulk` matches the table to the matrix's cells."""
    path = Path(path)
    if path.name.lower().endswith(".parquet"):
        return pd.read_parquet(path)
    sep = "," if path.name.lower().endswith((".csv", ".csv.gz")) else "\t"
    try:
        with open_text(path) as f:
            table = pd.read_csv(f, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {path}: not UTF-8 text ({err}); save it as UTF-8.") from None
    except (ValueError, EOFError, gzip.BadGzipFile, pd.errors.ParserError) as err:
        message = f"{what}: cannot read {path} as a {sep!r}-separated table ({err})."
        raise ValueError(message) from None
    if len(table.columns) and str(table.columns[0]).startswith("Unnamed: 0"):
        table = table.set_index(table.columns[0]).rename_axis(None)
    return table


def read_h5ad(path: str | PathLike):
    """An AnnData file opened in backed mode (X stays on disk; `preprocess.from_anndata`
    streams it); a truncated or corrupt file is a ValueError naming it."""
    try:
        import anndata
    except ImportError:
        raise ImportError('reading .h5ad needs: pip install "ctmm_jax[anndata]".') from None
    try:
        return anndata.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path}: cannot read as .h5ad (AnnData/HDF5: {err}); the file may be truncated "
            "or corrupt (an interrupted copy or write): copy or write it again."
        ) from None
