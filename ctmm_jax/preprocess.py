"""Pseudobulk from single-cell data, and the original CTMM's standardisation (host side).

For one gene, donor i and cell type c with n_ic cells of expression x_1, ..., x_n:

    ctp_ic  = mean(x)                   cell type-specific pseudobulk (CTP)
    ctnu_ic = var(x, ddof=1) / n_ic     its noise variance, the squared standard error
    P_ic    = n_ic / n_i                cell-type proportions, n_i = sum_c n_ic
    op_i    = sum_c P_ic ctp_ic         overall pseudobulk (OP) = mean of all donor i's cells
    nu_i    = sum_c P_ic^2 ctnu_ic      its noise variance

as in the original CTMM (github.com/Minhui-Chen/CTMM, `ctmm/preprocess.py`: `pseudobulk` gives
ctp, ctnu = `stats.sem`**2 and P; `std` computes op and nu from them and standardises). The
original's AnnData branch computes ctnu as (mean(x^2) - mean(x)^2) / n^2, which disagrees with
its own groupby branch; we follow the groupby branch (sem^2) everywhere.
Per-(donor, cell type) sums and sums of squares come from a sparse one-hot matrix product over
chunks of genes, so a sparse X is never densified.

Count-scale loadings (normalize="log1p" only, where the raw counts are seen). On the log scale a
donor effect a on a gene's log rate moves the mean of f(x) = log1p(x 10^4 / t) by l_c a, with
l_c = d E f(x) / d log(rate) smaller where the cell type expresses the gene less (f is concave
near 0), so a donor effect shared on the count scale is not shared equally on the log scale.
For Poisson counts the Stein-Chen identity E[m g(x + 1)] = E[x g(x)] gives

    l_c = E[m (f(x + 1) - f(x))] = E[x (f(x) - f(x - 1))],

estimated by its mean over the cell type's cells (`loadings`, (G, C)). `Pseudobulk.to_ctp`
divides ctp by l_c and ctnu by l_c^2 (count_scale=True, the default where loadings exist): the
values are then on the scale of the log rates, where hom2 is shared equally by the cell types
and the test of V = 0 is unchanged in meaning (V_c / l_c^2 = 0 exactly when V_c = 0).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial

import numpy as np
import pandas as pd
from scipy import sparse

from .data import CTPData, OPData
from .files import NPZ_ERRORS, atomic_paths

DATASET_FORMAT = "ctmm_jax.pseudobulk/1"
INTEGER = re.compile(r"[+-]?[0-9]+")  # a label ordered as a number (_levels)
NORMALIZE_TARGET = 1e4  # normalize="log1p": counts per 10,000 (scanpy's target_sum=1e4)
_SHOW = 5  # ids or positions named in a message


class ExpressionWarning(UserWarning):
    """`pseudobulk` about the values of X: raw counts averaged as they are, negative values,
    or normalize='log1p' given values that are not counts."""


@dataclass(frozen=True)
class Pseudobulk:
    """Pseudobulk of G genes, N donors and C cell types (see the module docstring for the math).

    ctp, ctnu: (G, N, C), NaN where `mask` is False; counts: (N, C) cells per (donor, cell
    type); P: (N, C) proportions counts / donor total; op, nu: (G, N) overall pseudobulk and its
    noise variance, from all the donor's cells; mask: (N, C) True for observed pairs;
    loadings: (G, C) count-scale loadings l_gc (module docstring), or None (not from raw counts).
    """

    genes: tuple[str, ...]
    donors: tuple[str, ...]
    celltypes: tuple[str, ...]
    ctp: np.ndarray
    ctnu: np.ndarray
    counts: np.ndarray
    P: np.ndarray
    op: np.ndarray
    nu: np.ndarray
    mask: np.ndarray
    loadings: np.ndarray | None = None

    def __repr__(self) -> str:
        """Shape and counts only; the arrays are too large to print."""
        G, N, C = len(self.genes), len(self.donors), len(self.celltypes)
        return (
            f"Pseudobulk({G} genes x {N} donors x {C} cell types, "
            f"{int(np.sum(self.counts))} cells, {int(np.sum(self.mask))}/{N * C} "
            "(donor, cell type) pairs observed)"
        )

    def select_genes(self, idx) -> Pseudobulk:
        """The genes at positions `idx` (an int array, slice or boolean mask)."""
        i = np.arange(len(self.genes))[idx]
        return replace(
            self,
            genes=tuple(np.array(self.genes)[i]),
            ctp=self.ctp[i],
            ctnu=self.ctnu[i],
            op=self.op[i],
            nu=self.nu[i],
            loadings=None if self.loadings is None else self.loadings[i],
        )

    @property
    def cell_types(self) -> tuple[str, ...]:
        """Alias of `celltypes` (the name CTPData and OPData use)."""
        return self.celltypes

    @property
    def observed(self) -> np.ndarray:
        """(G, N, C) pairs with cells beyond the cut-off (`mask`) and ctnu > 0: the values a
        plug-in fit uses (noise='plugin' drops ctnu = 0; 'pooled' keeps them, noise.py)."""
        return self.mask & (np.nan_to_num(self.ctnu) > 0)

    def to_ctp(self, count_scale: bool = True) -> CTPData:
        """CTPData of (ctp, ctnu, P) with the cell counts, missing where `mask` is False
        (unobserved pairs, or too few cells): never imputed. With `loadings` (made from raw
        counts) and count_scale, ctp_gic / l_gc and ctnu_gic / l_gc^2 (module docstring; a
        cell type whose loading is 0, never expressed, is left as it is).

        Pairs whose cells all have the same value (ctnu = 0; for counts, usually all zero) keep
        their value: the fit's noise model decides (noise.py). The default pools each cell
        type's within-pair variance over donors, which gives them a positive noise variance;
        the plug-in model (ctnu as known) makes them missing, since a noise variance of 0 would
        make the donor's covariance singular as V_c -> 0 (the original CTMM leaves such zeros
        in place and can break there)."""
        mask = np.broadcast_to(self.mask, self.ctp.shape)
        ctp, ctnu = self.ctp, self.ctnu
        if count_scale and self.loadings is not None:
            l = np.where(self.loadings > 0, self.loadings, 1.0)[:, None, :]  # noqa: E741
            ctp, ctnu = ctp / l, ctnu / l**2
        return CTPData.from_arrays(
            np.where(mask, ctp, 0.0), np.where(mask, ctnu, 1.0), self.P,
            genes=self.genes, donors=self.donors, celltypes=self.celltypes, mask=mask,
            n_cells=self.counts,
        )  # fmt: skip

    def to_op(self) -> OPData:
        """OPData of (op, nu, P) with the pairs' ctnu and cell counts (to pool the noise,
        noise.py). A donor whose noise variance is 0 for a gene (all its cells equal) is
        missing for that gene's fit, as zero-variance pairs are in `to_ctp`."""
        return OPData.from_arrays(
            self.op, self.nu, self.P, genes=self.genes, donors=self.donors,
            celltypes=self.celltypes, ctnu=self.ctnu, n_cells=self.counts,
        )  # fmt: skip

    def save(self, path) -> None:
        """Write to a compressed .npz (arrays and names; loads without pickle). `.npz` is added
        to a name without it (as np.savez). The file is replaced in one step (files.py): an
        interrupted save leaves the old file, never part of a new one."""
        path = str(path) if str(path).endswith(".npz") else f"{path}.npz"
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.loadings is None:
            del arrays["loadings"]
        for name in ("genes", "donors", "celltypes"):
            arrays[name] = np.array(arrays[name], dtype=str)
        with atomic_paths(path) as (tmp,):
            np.savez_compressed(tmp, format=np.array(DATASET_FORMAT), **arrays)

    @classmethod
    def load(cls, path) -> Pseudobulk:
        """Read a dataset written by `save` (or `ctmm-jax pseudobulk`). A file that is not one,
        or is truncated or damaged, raises ValueError naming the file and what is wrong."""
        not_ours = ValueError(
            f"{path}: not a ctmm_jax pseudobulk dataset (make one with `ctmm-jax pseudobulk` "
            "or Pseudobulk.save)."
        )
        with open(path, "rb") as handle:  # a missing file: FileNotFoundError, as open's
            head = handle.read(4)
            if not head:
                raise ValueError(f"{path}: the file is empty; write it again.")
            if head != b"PK\x03\x04":  # every .npz is a zip archive
                raise not_ours
            handle.seek(0)
            try:
                with np.load(handle, allow_pickle=False) as f:
                    arrays = {key: f[key] for key in f.files}
            except NPZ_ERRORS as err:
                raise ValueError(
                    f"{path}: truncated or damaged, cannot read it ({type(err).__name__}: "
                    f"{err}); write it again with `ctmm-jax pseudobulk` or Pseudobulk.save."
                ) from err
        if "format" not in arrays or str(arrays["format"]) != DATASET_FORMAT:
            raise not_ours
        old = {"celltypes": "celltypes" if "celltypes" in arrays else "cell_types"}
        keys = {fl.name: old.get(fl.name, fl.name) for fl in fields(cls)}
        if "loadings" not in arrays:  # optional: datasets not made from raw counts
            del keys["loadings"]
        missing = [k for k in keys.values() if k not in arrays]
        if missing:
            raise ValueError(
                f"{path}: a pseudobulk dataset without {missing}; the file is damaged, or was "
                "not written by Pseudobulk.save."
            )
        kw = {name: arrays[key] for name, key in keys.items()}
        _check_saved(kw, path)
        for name in ("genes", "donors", "celltypes"):
            kw[name] = tuple(str(x) for x in kw[name])
        return cls(**kw)


def _check_saved(arrays: dict, path) -> None:
    """The shapes and kinds of a loaded dataset's arrays, so that a damaged or hand-made file
    fails here, naming the file, not later in a fit."""
    for name in ("genes", "donors", "celltypes"):
        a = arrays[name]
        if a.ndim != 1 or a.dtype.kind not in "US":
            raise ValueError(
                f"{path}: {name} must be a 1-D array of names, got {a.dtype} with shape "
                f"{a.shape}; the file is damaged."
            )
    G, N, C = (len(arrays[n]) for n in ("genes", "donors", "celltypes"))
    shapes = dict(ctp=(G, N, C), ctnu=(G, N, C), counts=(N, C), P=(N, C), op=(G, N),
                  nu=(G, N), mask=(N, C), loadings=(G, C))  # fmt: skip
    for name, shape in shapes.items():
        if name not in arrays:  # loadings are optional
            continue
        a = arrays[name]
        if a.shape != shape or a.dtype.kind not in ("b" if name == "mask" else "iuf"):
            raise ValueError(
                f"{path}: {name} has dtype {a.dtype} and shape {a.shape}, expected shape "
                f"{shape} ({G} genes, {N} donors, {C} cell types); the file is damaged."
            )


def _as_matrix(X):
    """X as CSC (sparse input) or as it is (an array, or a 2-D sliceable array-like such as an
    h5py dataset, read one chunk of columns at a time)."""
    if X is None:
        raise ValueError("X: got None; pass the cells x genes expression matrix.")
    if sparse.issparse(X):
        if X.ndim != 2:
            raise ValueError(f"X: expected a 2-D cells x genes matrix, got shape {X.shape}.")
        csc = X.tocsc()  # one copy (none for CSC); column chunks are then views of it
        if not csc.has_canonical_format:  # sum duplicate entries before squaring them
            csc = csc.copy() if csc is X else csc
            csc.sum_duplicates()
        return csc
    if not (hasattr(X, "shape") and hasattr(X, "__getitem__")):
        X = np.asarray(X)
    if len(X.shape) != 2:
        raise ValueError(f"X: expected a 2-D cells x genes matrix, got shape {X.shape}.")
    return X


def _labels(cells: pd.DataFrame, column: str, arg: str) -> np.ndarray:
    """(cells,) the labels in `cells[column]` as str."""
    if column not in cells.columns:
        raise ValueError(
            f"cells: no column {column!r}; available columns: {list(cells.columns)}. "
            f"Name the column with {arg}=... (command line: --{arg.replace('_', '-')})."
        )
    col = cells[column]
    if col.isna().any():
        raise ValueError(
            f"cells[{column!r}]: {int(col.isna().sum())} cells have no label; drop them first."
        )
    return col.astype(str).to_numpy(dtype=object)


def _ids(values) -> np.ndarray:
    """(n,) cell ids as str (ids are compared as text: 7 and '7' are the same cell)."""
    return np.asarray(pd.Index(values).astype(str), dtype=object)


def _is_default(ids: np.ndarray) -> bool:
    """ids are 0, 1, ..., n-1 in order: pandas' and anndata's default index, no real ids."""
    return bool(np.array_equal(ids, np.arange(len(ids)).astype(str).astype(object)))


def _repeated(ids: np.ndarray) -> list[str]:
    counts = pd.Series(ids).value_counts()
    return list(counts.index[counts > 1][:_SHOW])


def _align(
    cells: pd.DataFrame, row_ids, cell_id: str | None, n_cells: int, x_name: str
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """cells in the order of X's rows, and the cells' ids (None when neither side has ids).

    Rows are matched by id when X's rows (`row_ids`) and the cell table (column `cell_id`, else
    its index) both carry ids and these are the same set. Otherwise, when one side has no
    ids (X a plain array; a table with the default index 0, 1, ..., n-1), by position; ids
    that disagree are refused (matching them by position would pair cells silently wrong).
    """
    if cell_id is not None:
        if cell_id not in cells.columns:
            raise ValueError(
                f"cells: no column {cell_id!r} (cell_id, the cell ids); available columns: "
                f"{list(cells.columns)}."
            )
        if cells[cell_id].isna().any():
            raise ValueError(
                f"cells[{cell_id!r}]: {int(cells[cell_id].isna().sum())} cells have no id."
            )
        theirs, where = _ids(cells[cell_id]), f"cells[{cell_id!r}]"
    else:
        theirs, where = _ids(cells.index), "cells.index"
    ours = None if row_ids is None else _ids(row_ids)
    if ours is not None and len(ours) != n_cells:
        raise ValueError(f"row_ids: got {len(ours)} ids but {x_name} has {n_cells} rows (cells).")
    if ours is not None and not (_is_default(ours) and _is_default(theirs)):
        unique = pd.Index(theirs).is_unique and pd.Index(ours).is_unique
        position = pd.Index(theirs).get_indexer(ours) if unique else None
        if len(theirs) == len(ours) and position is not None and (position >= 0).all():
            return cells.iloc[position], ours  # the same cells: in X's order
        if not (_is_default(ours) or _is_default(theirs)):
            for ids, name in ((ours, f"{x_name}'s row ids"), (theirs, where)):
                if twice := _repeated(ids):
                    raise ValueError(
                        f"{name}: cell ids must be unique to match {x_name}'s rows to the cell "
                        f"table; repeated: {twice}."
                    )
            only_x = ours[~pd.Index(ours).isin(theirs)]
            only_cells = theirs[~pd.Index(theirs).isin(ours)]
            raise ValueError(
                f"{x_name} and cells: the cell ids differ ({x_name}'s row ids vs {where}): "
                f"{len(only_x)} of {x_name}'s {len(ours)} cells are not in the cell table "
                f"(e.g. {list(only_x[:_SHOW])}), {len(only_cells)} of its {len(theirs)} rows "
                f"are not in {x_name} (e.g. {list(only_cells[:_SHOW])}). Rows are matched by "
                "cell id when both carry ids; subset both to the same cells (or drop the "
                "table's ids, cells.reset_index(drop=True), to match by position)."
            )
    if len(cells) != n_cells:
        raise ValueError(
            f"cells: has {len(cells)} rows but {x_name} has {n_cells} rows (cells); give one "
            f"row per cell, in {x_name}'s row order (or give both cell ids to match them by)."
        )
    if ours is not None and not _is_default(ours):
        return cells, ours
    return cells, (None if _is_default(theirs) else theirs)


def _levels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct labels in order, and each label's position among them. Labels that are all
    integers ('1', '2', '10', e.g. donor ids or cluster numbers) are ordered as numbers, not as
    text ('1', '10', '2'); others as text."""
    levels, inverse = np.unique(labels, return_inverse=True)
    if all(INTEGER.fullmatch(x) for x in levels):
        order = sorted(range(len(levels)), key=lambda j: (int(levels[j]), levels[j]))
        rank = np.empty(len(order), dtype=np.intp)
        rank[order] = np.arange(len(order))
        levels, inverse = levels[order], rank[inverse]
    return levels, inverse


def _gene_names(genes: Sequence | None, G: int) -> tuple[str, ...]:
    if genes is None:
        return tuple(f"gene{j}" for j in range(G))
    names = tuple(str(g) for g in genes)
    if len(names) != G:
        raise ValueError(f"genes: got {len(names)} names but X has {G} columns (genes).")
    return names


def _csc_columns(X, j0: int, j1: int) -> sparse.csc_matrix:
    """Columns j0:j1 of CSC X, float64, sharing X's index arrays (X[:, j0:j1] copies them)."""
    a, b = X.indptr[j0], X.indptr[j1]
    data = X.data[a:b].astype(np.float64, copy=False)
    return sparse.csc_matrix(
        (data, X.indices[a:b], X.indptr[j0 : j1 + 1] - a), shape=(X.shape[0], j1 - j0)
    )


def _column_blocks(X, chunk_size: int) -> Iterator[tuple[slice, object]]:
    """(columns, float64 block) over chunks of `chunk_size` genes: sparse blocks stay sparse
    (also those read from a backed sparse matrix)."""
    for j in range(0, X.shape[1], chunk_size):
        cols = slice(j, min(j + chunk_size, X.shape[1]))
        if sparse.issparse(X):
            yield cols, _csc_columns(X, cols.start, cols.stop)
            continue
        block = X[:, cols]
        if sparse.issparse(block):
            block = sparse.csc_matrix(block, dtype=np.float64)
            block.sum_duplicates()
            yield cols, block
        else:
            yield cols, np.asarray(block, dtype=np.float64)


def _backed_format(X) -> str | None:
    """'csr' or 'csc' for a sparse matrix on disk (anndata's backed datasets), else None."""
    fmt = getattr(X, "format", None)
    if not sparse.issparse(X) and hasattr(X, "to_memory") and fmt in ("csr", "csc"):
        return fmt
    return None


def _row_blocks(X, size: int) -> Iterator[tuple[slice, object]]:
    """(rows, block) over blocks of `size` cells of a row-sliceable matrix."""
    for i in range(0, X.shape[0], size):
        rows = slice(i, min(i + size, X.shape[0]))
        yield rows, X[rows]


def _square(block):
    """Elementwise square; a (canonical, CSR or CSC) sparse block keeps its format and index
    arrays."""
    if not sparse.issparse(block):
        return block**2
    return type(block)((block.data**2, block.indices, block.indptr), shape=block.shape)


def _dense(a) -> np.ndarray:
    return a.toarray() if sparse.issparse(a) else np.asarray(a)


@dataclass
class _Scan:
    """What X's values show, collected from the blocks as pseudobulk streams them (no pass of
    its own): the non-finite entries (how many, the first positions), the negative entries, and
    whether every value is an integer (raw counts)."""

    n_nonfinite: int = 0
    first: list[tuple[int, int]] = field(default_factory=list)  # (row, column) in X
    n_negative: int = 0
    integer: bool = True

    def see(self, block, rows: slice, cols: slice) -> None:
        """Record one float64 block, X[rows, cols] (sparse: its stored entries)."""
        values = block.data if sparse.issparse(block) else block
        finite = np.isfinite(values)
        if not finite.all():
            self.n_nonfinite += int(values.size - np.count_nonzero(finite))
            if len(self.first) < _SHOW:
                if sparse.issparse(block):
                    coo = block.tocoo()
                    bad = ~np.isfinite(coo.data)
                    r, c = coo.row[bad], coo.col[bad]
                else:
                    r, c = np.nonzero(~finite)
                self.first += list(zip(r + rows.start, c + cols.start, strict=True))[:_SHOW]
            values = values[finite]
        self.n_negative += int(np.count_nonzero(values < 0))
        if self.integer:
            self.integer = bool(np.array_equal(values, np.rint(values)))

    def report(self, x_name: str, ids, genes, normalize: str | None) -> None:
        """Refuse non-finite values (and negative ones to normalise as counts); warn about raw
        counts and negative values (ExpressionWarning)."""
        if self.n_nonfinite:
            at = ", ".join(
                f"(cell {ids[r]!r}, gene {genes[c]!r})" if ids is not None
                else f"(row {r}, gene {genes[c]!r})"
                for r, c in sorted(self.first)[:_SHOW]
            )  # fmt: skip
            raise ValueError(
                f"{x_name}: {self.n_nonfinite} non-finite values (NaN or inf) in the cell-level "
                f"expression, e.g. at {at}; a mean over cells would be NaN there. Fix or drop "
                "those cells or genes first."
            )
        if normalize is not None and self.n_negative:
            raise ValueError(
                f"{x_name}: {self.n_negative} negative values, but normalize={normalize!r} "
                "needs raw counts (>= 0); give the counts (e.g. layer='counts'), or normalised "
                "values without normalize."
            )
        if normalize is not None and not self.integer:
            warnings.warn(
                f"{x_name}: normalize={normalize!r} expects raw counts, but some values are not "
                "integers (already normalised? then leave normalize off).",
                ExpressionWarning,
                stacklevel=3,
            )
        elif normalize is None and self.n_negative:
            warnings.warn(
                f"{x_name}: {self.n_negative} negative values. Counts and log-normalised "
                "expression cannot be negative; fine if X is centred or scaled on purpose, "
                "otherwise check that X is the matrix you mean (e.g. layer=...).",
                ExpressionWarning,
                stacklevel=3,
            )
        elif normalize is None and self.integer:
            warnings.warn(
                f"{x_name}: every value is a non-negative integer: raw counts? They are averaged "
                "as they are; CTMM expects normalised expression: pass normalize='log1p' "
                "(log1p(counts / cell total * 10,000), scanpy's convention; command line: "
                "--normalize), or normalise X first.",
                ExpressionWarning,
                stacklevel=3,
            )


def _log1p_scaled(block, total: np.ndarray, target: float = NORMALIZE_TARGET):
    """log1p(block_jg * target / total_j) per row j; rows with total 0 stay 0. A sparse block
    keeps its format and index arrays (zeros stay zero); the input is not modified.

    Args:
        block: (cells, genes) dense, or scipy.sparse CSR/CSC; total: (cells,)."""
    scale = np.divide(target, total, out=np.zeros(len(total)), where=total > 0)
    # negative "counts" give NaN here; pseudobulk refuses them after the pass (_Scan.report)
    with np.errstate(invalid="ignore"):
        if not sparse.issparse(block):
            return np.log1p(block * scale[:, None])
        if block.format not in ("csr", "csc"):
            block = block.tocsr()
        row = block.indices if block.format == "csc" else (
            np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)))  # fmt: skip
        data = np.log1p(block.data * scale[row])
    return type(block)((data, block.indices, block.indptr), shape=block.shape)


def _row_totals(X, chunk_size: int) -> np.ndarray:
    """(cells,) each cell's total over all genes, over chunks of genes (one pass over X)."""
    total = np.zeros(X.shape[0])
    for _, block in _column_blocks(X, chunk_size):
        total += np.asarray(block.sum(axis=1)).ravel()
    return total


def _stein_terms(block, total: np.ndarray, target: float = NORMALIZE_TARGET):
    """x (f(x) - f(x - 1)) with f(x) = log1p(x target / total) per entry of a block of raw
    counts (0 where x = 0; sparse blocks keep their structure): the cells' terms of the
    count-scale loadings (module docstring)."""
    scale = np.divide(target, total, out=np.zeros(len(total)), where=total > 0)
    with np.errstate(invalid="ignore"):
        if not sparse.issparse(block):
            s = scale[:, None]
            return block * (np.log1p(block * s) - np.log1p(np.maximum(block - 1, 0) * s))
        if block.format not in ("csr", "csc"):
            block = block.tocsr()
        row = block.indices if block.format == "csc" else (
            np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)))  # fmt: skip
        x, s = block.data, scale[row]
        data = x * (np.log1p(x * s) - np.log1p(np.maximum(x - 1, 0) * s))
    return type(block)((data, block.indices, block.indptr), shape=block.shape)


def _prepare(block, rows: slice, cols: slice, *, scan: _Scan, normalize: bool, total=None):
    """(values, terms) of a float64 block X[rows, cols] as pseudobulk uses it: recorded by
    `scan`, then, with `normalize`, log1p-normalised by the cells' totals (`total` (cells,),
    or the block's row sums when it holds all the genes of its rows: total None), with the
    count-scale loadings' terms (`_stein_terms`); terms None without `normalize`."""
    scan.see(block, rows, cols)
    if not normalize:
        return block, None
    t = np.asarray(block.sum(axis=1)).ravel() if total is None else total[rows]
    return _log1p_scaled(block, t), _stein_terms(block, t)


def _group_moments(
    X, At, chunk_size: int = 2000, prepare: Callable | None = None, Bt=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-group sums S = (A X)^T and sums of squares Q = (A (X * X))^T, gene by group, one
    chunk of genes at a time (a CSC chunk's transpose is CSR, so the sparse product needs no
    format conversion of the chunk); T = (B terms)^T, the sums of `prepare`'s terms over the
    groups of Bt (cells, groups') (None without terms).

    Args:
        X: (cells, G) canonical scipy.sparse CSC (no duplicate entries), or a dense array.
        At: (cells, groups) CSR indicator A^T.
        prepare: (block, rows, cols) -> (block, terms or None), applied to each block first
            (`_prepare`).
    Returns:
        S, Q, T: (G, groups). Temporaries are (cells, chunk_size) at most: a sparse block's
        nonzeros, or a dense block and its square.
    """
    S = np.empty((X.shape[1], At.shape[1]))
    Q = np.empty((X.shape[1], At.shape[1]))
    T = None
    for cols, block in _column_blocks(X, chunk_size):
        terms = None
        if prepare is not None:
            block, terms = prepare(block, slice(0, X.shape[0]), cols)
        S[cols] = _dense(block.T @ At)
        Q[cols] = _dense(_square(block).T @ At)
        if terms is not None:
            T = np.empty((X.shape[1], Bt.shape[1])) if T is None else T
            T[cols] = _dense(terms.T @ Bt)
    return S, Q, T


def _row_moments(
    rows: Iterator, At, G: int, prepare: Callable | None = None, Bt=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`_group_moments` over blocks of cells (rows) instead of genes, for a matrix streamed
    from disk by rows (a backed CSR .h5ad): rows yields (row slice, (cells, G) block); each
    block's sums are added into S and Q (G, groups), so only one block is in memory. prepare:
    as in `_group_moments`."""
    S = np.zeros((G, At.shape[1]))
    Q = np.zeros((G, At.shape[1]))
    T = None
    for rs, block in rows:
        A, terms = At[rs], None
        B = None if Bt is None else Bt[rs]
        if sparse.issparse(block):
            block = sparse.csr_matrix(block, dtype=np.float64)
            block.sum_duplicates()
        else:
            block = np.asarray(block, dtype=np.float64)
        if prepare is not None:
            block, terms = prepare(block, rs, slice(0, G))
        if terms is not None and T is None:
            T = np.zeros((G, Bt.shape[1]))
        sums = ((S, block, A), (Q, _square(block), A))
        for out, b, ind in sums + (() if terms is None else ((T, terms, B),)):
            if sparse.issparse(b):
                prod = (b.T @ ind).tocoo()  # (G, groups), no duplicate entries
                out[prod.row, prod.col] += prod.data
            else:
                out += _dense(ind.T @ b).T
    return S, Q, T


def _cell_stats(S: np.ndarray, Q: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and squared standard error of each group from its moments.

    mean = S / n;  ctnu = (Q - S mean) / ((n - 1) n) = var(ddof=1) / n.
    The sum of squared deviations Q - S mean is floored at 0 (rounding can make it slightly
    negative when all the group's values are equal).

    Args:
        S, Q: (..., groups) sums and sums of squares; n: (groups,) group sizes.
    Returns:
        mean: NaN where n = 0; ctnu: NaN where n < 2 (undefined); both shaped as S.
    """
    n = np.broadcast_to(n, S.shape).astype(np.float64)
    mean = np.divide(S, n, out=np.full(S.shape, np.nan), where=n > 0)
    ss = np.maximum(Q - S * np.where(n > 0, mean, 0.0), 0.0)
    ctnu = np.divide(ss, (n - 1) * n, out=np.full(S.shape, np.nan), where=n > 1)
    return mean, ctnu


def _finish(S, Q, counts, ct_cut: int, chunk_size: int):
    """ctp, ctnu (G, N, C), op, nu (G, N), P and mask from the moments S, Q (G, N C), written
    over S and Q chunk by chunk of genes (no second copy of the (G, N, C) arrays)."""
    (N, C), G = counts.shape, S.shape[0]
    P = counts / counts.sum(axis=1, keepdims=True)
    mask = counts > max(ct_cut, 1)
    n, m = counts.ravel(), mask.ravel()
    op, nu = np.empty((G, N)), np.empty((G, N))
    for j in range(0, G, chunk_size):
        rows = slice(j, min(j + chunk_size, G))
        mean, ctnu = _cell_stats(S[rows], Q[rows], n)
        op[rows] = np.einsum("gnc,nc->gn", np.where(n > 0, mean, 0.0).reshape(-1, N, C), P)
        nu[rows] = np.einsum("gnc,nc->gn", np.where(n > 1, ctnu, 0.0).reshape(-1, N, C), P**2)
        S[rows], Q[rows] = np.where(m, mean, np.nan), np.where(m, ctnu, np.nan)
    return S.reshape(G, N, C), Q.reshape(G, N, C), op, nu, P, mask


def pseudobulk(
    X,
    cells: pd.DataFrame,
    *,
    donor: str = "donor",
    cell_type: str = "cell_type",
    genes: Sequence | None = None,
    row_ids: Sequence | None = None,
    cell_id: str | None = None,
    normalize: str | None = None,
    ind_cut: int = 0,
    ct_cut: int = 0,
    chunk_size: int = 2000,
    cell_block: int = 20_000,
    x_name: str = "X",
) -> Pseudobulk:
    """Cell type-specific and overall pseudobulk of single-cell expression, as the original CTMM.

    ctp_ic = mean of the n_ic cells of donor i and type c; ctnu_ic = their var(ddof=1) / n_ic;
    P_ic = n_ic / n_i; op_i = sum_c P_ic ctp_ic; nu_i = sum_c P_ic^2 ctnu_ic.

    Filters, in the original's order: first donors with <= `ind_cut` cells in all are dropped
    (their cells are ignored; donors and cell types are those of the remaining cells). Then
    (donor, cell type) pairs with <= max(ct_cut, 1) cells are missing: mask False, ctp and ctnu
    NaN, never imputed. Pairs with one cell are always missing, since their sample variance is
    undefined (the original drops them too). P counts all the donor's cells, masked pairs too.

    op and nu use all the donor's cells: where the original sums over imputed ctp/ctnu of
    missing pairs, we use the pairs' own cells, so op_i is exactly the mean of all donor i's
    cells. In nu, single-cell pairs add no term (their variance is undefined).

    Matching cells to X's rows: by cell id when both sides carry ids, X's `row_ids` (a
    DataFrame X: its index) and the table's `cell_id` column (default: its index); the table
    is then reordered to X's rows, and ids that are not the same set on both sides are refused
    (ValueError naming a few). By position only when one side has no ids: X a plain matrix
    without `row_ids`, or a table with pandas' default index 0, 1, ..., n-1 (also anndata's
    default obs_names "0", "1", ...).

    The values are checked as they stream (no extra pass): NaN or inf anywhere is refused (a
    ValueError with their number and the first few cells and genes), since a single one makes
    its pair's mean and its donor's OP NaN. Without `normalize`, an ExpressionWarning says when
    every value is a non-negative integer (raw counts, averaged as they are: CTMM expects
    normalised expression) or when some are negative: negative values are only warned about,
    since centred or scaled expression (e.g. scanpy's `pp.scale`) is negative by design, while
    counts and log-normalised values never are.

    Args:
        X: (cells, G) expression: a NumPy array, any scipy.sparse matrix or array (converted to
            CSC once, never densified), a pandas DataFrame (genes = its columns; all-sparse
            columns stay sparse) or a 2-D sliceable array-like (read by column chunks).
        cells: one row per cell, with the `donor` and `cell_type` columns (labels are used
            as str; sorted as numbers when all of a column's labels are integers, '2' before
            '10', else as text); in X's row order unless both carry cell ids (above).
        genes: (G,) gene names; default "gene0", "gene1", ...
        row_ids: (cells,) ids of X's rows (AnnData obs_names, 10x barcodes), matched as str.
        cell_id: the column of `cells` holding the cell ids; default its index.
        normalize: None (X as it is) or "log1p": X holds raw counts, and each cell's values
            become log1p(x / cell total * 10,000) (`normalize_log1p`; scanpy's
            `normalize_total(target_sum=1e4)` then `log1p`) as the blocks stream. Negative
            values are then refused (counts cannot be negative). The totals are over all of
            X's genes; a backed CSR matrix gets them from each block of cells, other inputs from
            one extra pass over X by chunks of genes.
        chunk_size: genes per chunk; bounds the temporaries (see `_group_moments`).
        cell_block: cells per block when X is a backed CSR matrix (anndata's backed mode),
            which is streamed from disk by rows (`_row_moments`): memory is then the
            (G, N C) sums plus one block, whatever the number of cells.
        x_name: how messages name X (the command line gives the file name).
    Returns:
        Pseudobulk with ctp, ctnu: (G, N, C); counts, P, mask: (N, C); op, nu: (G, N).
    """
    if normalize not in (None, "log1p"):
        raise ValueError(f"normalize: expected None or 'log1p', got {normalize!r}.")
    if isinstance(X, pd.DataFrame):  # cells x genes table: genes from its columns
        genes = list(X.columns) if genes is None else genes
        row_ids = X.index if row_ids is None else row_ids
        X = X.sparse.to_coo() if all(isinstance(t, pd.SparseDtype) for t in X.dtypes) else (
            X.to_numpy(np.float64))  # fmt: skip
    rows = None
    if _backed_format(X) == "csr":
        rows = partial(_row_blocks, X)
    else:
        X = _as_matrix(X)
    n_cells, G = X.shape
    if not isinstance(cells, pd.DataFrame):
        raise ValueError(f"cells: expected a pandas DataFrame, got {type(cells).__name__}.")
    if chunk_size < 1 or cell_block < 1:
        raise ValueError(f"chunk_size, cell_block: must be >= 1, got {chunk_size}, {cell_block}.")
    gene_names = _gene_names(genes, G)
    cells, ids = _align(cells, row_ids, cell_id, n_cells, x_name)
    donor_of = _labels(cells, donor, "donor")
    type_of = _labels(cells, cell_type, "cell_type")

    _, donor_idx, donor_total = np.unique(donor_of, return_inverse=True, return_counts=True)
    keep = (donor_total > ind_cut)[donor_idx]
    if not keep.any():
        most = int(donor_total.max()) if len(donor_total) else 0
        raise ValueError(
            f"ind_cut: no donor left; every donor has <= ind_cut={ind_cut} cells (the most is "
            f"{most}). Lower ind_cut."
        )
    donors, d = _levels(donor_of[keep])
    cell_types, c = _levels(type_of[keep])
    N, C = len(donors), len(cell_types)
    group = d * C + c
    At = sparse.csr_matrix(
        (np.ones(len(group)), (np.flatnonzero(keep), group)), shape=(n_cells, N * C)
    )
    Bt = sparse.csr_matrix(  # cell types only: the loadings' terms
        (np.ones(len(c)), (np.flatnonzero(keep), c)), shape=(n_cells, C)
    )
    scan = _Scan()
    prepare = partial(_prepare, scan=scan, normalize=normalize is not None)
    if rows is None:
        if normalize is not None:  # chunks of genes: the cells' totals first
            prepare = partial(prepare, total=_row_totals(X, chunk_size))
        S, Q, T = _group_moments(X, At, chunk_size, prepare, Bt)
    else:
        S, Q, T = _row_moments(rows(cell_block), At, G, prepare, Bt)
    scan.report(x_name, ids, gene_names, normalize)
    counts = np.bincount(group, minlength=N * C).reshape(N, C)
    loadings = None  # count-scale loadings: the mean term over each cell type's cells
    if T is not None:
        loadings = T / np.maximum(counts.sum(0), 1)
    ctp, ctnu, op, nu, P, mask = _finish(S, Q, counts, ct_cut, chunk_size)
    return Pseudobulk(
        genes=gene_names,
        donors=tuple(str(x) for x in donors),
        celltypes=tuple(str(x) for x in cell_types),
        ctp=ctp, ctnu=ctnu, counts=counts, P=P, op=op, nu=nu, mask=mask, loadings=loadings,
    )  # fmt: skip


def std(pb: Pseudobulk) -> Pseudobulk:
    """Standardise each gene's OP across donors, scaling CTP and the noise variances to match.

    With m_g and s_g the mean and sd (ddof=1, pandas' default, as the original `std`) of op_g:
    op' = (op - m) / s, ctp' = (ctp - m) / s, nu' = nu / s^2, ctnu' = ctnu / s^2; as sum_c P_c = 1,
    op' = sum_c P_c ctp'_c and nu' = sum_c P_c^2 ctnu'_c still hold (for donors whose pairs are
    all observed). The original also replaces negative ctnu (its imputation can make them);
    ours are never negative.
    """
    if len(pb.donors) < 2:
        raise ValueError("std: needs at least 2 donors to estimate each gene's sd.")
    m = pb.op.mean(axis=1, keepdims=True)
    s = pb.op.std(axis=1, ddof=1, keepdims=True)
    flat = ~(s[:, 0] > 1e-12 * np.abs(m[:, 0]))  # constant up to rounding
    if flat.any():
        raise ValueError(
            f"std: OP is constant across donors for {int(flat.sum())} genes (first "
            f"{pb.genes[int(np.argmax(flat))]!r}); drop them first, e.g. pb.select_genes(...)."
        )
    return replace(
        pb,
        op=(pb.op - m) / s,
        nu=pb.nu / s**2,
        ctp=(pb.ctp - m[..., None]) / s[..., None],
        ctnu=pb.ctnu / s[..., None] ** 2,
    )


def from_anndata(
    adata,
    *,
    donor: str = "donor",
    cell_type: str = "cell_type",
    layer: str | None = None,
    cells: pd.DataFrame | None = None,
    **kw,
) -> Pseudobulk:
    """`pseudobulk` of an AnnData: X = adata.X (or adata.layers[layer]), cells = adata.obs,
    genes = adata.var_names. A backed X (anndata.read_h5ad(path, backed="r")) is streamed from
    disk: CSR by blocks of cells, CSC and dense by chunks of genes. anndata itself is not
    imported.

    cells: a cell table to use instead of adata.obs (donor and cell type from another file),
    matched to adata's cells by obs_names = its index (or its `cell_id` column), as in
    `pseudobulk`. `kw` go to `pseudobulk` (normalize, cell_id, ind_cut, ct_cut, chunk_size,
    cell_block, x_name)."""
    if layer is None:
        X, name = adata.X, "adata.X"
    elif layer in adata.layers:
        X, name = adata.layers[layer], f"adata.layers[{layer!r}]"
    else:
        raise ValueError(
            f"layer: {layer!r} is not in adata.layers (has {list(adata.layers.keys())})."
        )
    kw.setdefault("x_name", name)
    if cells is None:  # obs is X's own cell table: nothing to match
        cells = adata.obs
    else:
        kw.setdefault("row_ids", adata.obs_names)
    return pseudobulk(X, cells, donor=donor, cell_type=cell_type, genes=list(adata.var_names), **kw)


def normalize_log1p(counts, target: float = NORMALIZE_TARGET, total=None):
    """log1p(x_jg / n_j * target) with n_j the total count of cell j (the usual library-size
    normalisation; scanpy's `normalize_total(target_sum=1e4)` then `log1p`); sparse input stays
    sparse (CSR; zeros stay zero). Cells with no counts stay 0. `pseudobulk(...,
    normalize="log1p")` applies it block by block as X streams.

    total: (cells,) n_j, e.g. the cell's UMIs over all genes when `counts` holds a subset;
    default the row sums of `counts`."""
    X = sparse.csr_matrix(counts, dtype=np.float64, copy=True) if sparse.issparse(counts) else (
        np.asarray(counts, dtype=np.float64))  # fmt: skip
    total = np.asarray(X.sum(axis=1)).ravel() if total is None else np.asarray(total, float)
    if total.shape != (X.shape[0],):
        raise ValueError(f"total: expected one value per cell ({X.shape[0]}), got {total.shape}.")
    if (n := int(np.count_nonzero((X.data if sparse.issparse(X) else X) < 0))) > 0:
        raise ValueError(f"counts: {n} negative values; raw counts are >= 0.")
    return _log1p_scaled(X, total, target)
