"""Host-side data containers with all input validation.

`CTPData` holds cell type-specific pseudobulk (genes x donors x cell types) and `OPData` the
overall pseudobulk (genes x donors); both carry the cell-type proportions P (donors x cell
types) and names. Every check runs in NumPy when a container is built, before anything is
compiled, and a failure is a ValueError that names the input and says what to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from os import PathLike

import numpy as np
import pandas as pd

PROPORTION_TOL = 1e-6  # |row sum of P - 1| allowed
# largest |value| of y and the noise variances: the fits square them (sums of squares, norms
# of covariances), and above sqrt(float64 max) ~ 1.3e154 a square is inf (issue 18 #2: HE
# called a gene with ctnu = 1e300 ok)
MAX_ABS = 1e150


def _names(names: Sequence | None, n: int, prefix: str, what: str) -> tuple[str, ...]:
    if names is None:
        return tuple(f"{prefix}{i}" for i in range(n))
    names = tuple(str(x) for x in names)
    if len(names) != n:
        raise ValueError(f"{what}: got {len(names)} names for {n} entries.")
    if len(set(names)) != n:
        raise ValueError(f"{what}: names are not unique ({_duplicates(names)} repeated).")
    return names


def _duplicates(labels) -> str:
    """The repeated labels, e.g. "'d3', 'd7'" (the first five)."""
    dup = pd.Index(labels)
    dup = dup[dup.duplicated()].unique()
    more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
    return ", ".join(repr(x if isinstance(x, tuple) else str(x)) for x in dup[:5]) + more


def _unique_rows(df: pd.DataFrame, name: str, what: str) -> None:
    """ValueError naming the frame and its repeated row labels (`what`: donor, ...)."""
    if df.index.has_duplicates:
        raise ValueError(
            f"{name}: repeated {what} in the index (rows): {_duplicates(df.index)}; keep one "
            f"row per {what}."
        )


def _numbers(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """df with every column as float64 (numbers written as text are read); ValueError naming
    the frame, the column and the first entry that is not a number."""
    out = {}
    for j, col in enumerate(df.columns):
        s = df.iloc[:, j]
        num = s if pd.api.types.is_numeric_dtype(s) else pd.to_numeric(s, errors="coerce")
        bad = num.isna() & s.notna()
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise ValueError(
                f"{name}: column {str(col)!r} holds {int(bad.sum())} entries that are not "
                f"numbers, first {s.iloc[i]!r} at row {df.index[i]!r}; give numbers (e.g. "
                "read the file with the right separator, or drop text columns)."
            )
        out[j] = num.astype(np.float64)
    return pd.DataFrame(out, index=df.index).set_axis(df.columns, axis=1)


def _as_float(x, name: str, ndim: int | None = None) -> np.ndarray:
    """x as a float64 array of `ndim` dimensions (None: any), or a ValueError naming it."""
    try:
        raw = np.asarray(x)
        complex_values = np.iscomplexobj(raw)
        a = raw.real.astype(np.float64) if complex_values else raw.astype(np.float64)
    except (TypeError, ValueError) as e:
        if "inhomogeneous" in str(e):  # NumPy's words for nested lists of unequal lengths
            raise ValueError(
                f"{name}: is ragged (nested lists of unequal lengths); give an array with the "
                "same number of entries in every row."
            ) from None
        raise ValueError(f"{name}: could not be read as numbers ({e}).") from None
    if complex_values:
        raise ValueError(f"{name}: has complex values; give real numbers.")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}.")
    return a


def _check_sizes(G: int, C: int) -> None:
    """At least one gene, and two cell types: with one, hom2 J + V is one variance and CTMM's
    parts are not identified."""
    if G == 0:
        raise ValueError("the data have no genes (G = 0); select at least one gene.")
    if C < 2:
        raise ValueError(
            f"the data have {C} cell type(s); CTMM separates variance shared by cell types "
            "(hom2) from cell type-specific variance (V), which needs at least 2 cell types."
        )


def _where(bad: np.ndarray, axes: Sequence[tuple[str, Sequence[str]]]) -> str:
    """'first at gene 'g', donor 'd'' for the first True entry of `bad`."""
    idx = np.argwhere(bad)[0]
    parts = [f"{label} {names[i]!r}" for (label, names), i in zip(axes, idx, strict=True)]
    return f"{int(bad.sum())} entries, first at " + ", ".join(parts)


def _check_finite(a: np.ndarray, name: str, axes) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(
            f"{name}: has NaN or infinite values ({_where(bad, axes)}); "
            "remove those genes or donors, or mark the values missing (CTP: `mask`)."
        )


def _check_magnitude(a: np.ndarray, name: str, axes) -> None:
    """|a| <= MAX_ABS where finite: larger values overflow float64 once squared."""
    bad = np.abs(np.where(np.isfinite(a), a, 0.0)) > MAX_ABS
    if bad.any():
        raise ValueError(
            f"{name}: has values beyond {MAX_ABS:.0e} in magnitude ({_where(bad, axes)}); "
            "the fits square them, which overflows float64: rescale the data (e.g. normalised "
            "or log expression) or drop those genes or donors."
        )


def _check_positive(a: np.ndarray, name: str, axes, zero_ok: bool = False) -> None:
    """Noise variances > 0 (>= 0 with cell counts: a 0 is missing for the fit, noise.py)."""
    bad = ~(a >= 0) if zero_ok else ~(a > 0)
    if bad.any():
        raise ValueError(
            f"{name}: noise variances must be {'>=' if zero_ok else '>'} 0 "
            f"({_where(bad, axes)} are not); drop those genes or donors, or floor the "
            "variances at a small positive value."
        )


def _cell_counts(n, shape: tuple[int, int, int], observed, axes) -> np.ndarray | None:
    """n_cells as float (N, C) or (G, N, C), validated: finite and >= 1 where observed."""
    if n is None:
        return None
    G, N, C = shape
    n = _as_float(n, "n_cells")
    if n.shape not in ((N, C), (G, N, C)):
        raise ValueError(
            f"n_cells: expected shape (donors, cell types) = {(N, C)} or (genes, donors, cell "
            f"types) = {(G, N, C)}; got {n.shape}."
        )
    full = np.broadcast_to(n, shape)
    _check_finite(full, "n_cells", axes)
    bad = observed & ~(full >= 1)
    if bad.any():
        raise ValueError(
            f"n_cells: an observed value needs at least 1 cell ({_where(bad, axes)} have fewer); "
            "mark those values missing (mask) or fix the counts."
        )
    return n


def _check_proportions(P: np.ndarray, donors, celltypes) -> None:
    axes = [("donor", donors), ("cell type", celltypes)]
    _check_finite(P, "P", axes)
    if (P < 0).any():
        raise ValueError(f"P: proportions must be >= 0 ({_where(P < 0, axes)} are negative).")
    dev = np.abs(P.sum(1) - 1.0)
    if (dev > PROPORTION_TOL).any():
        i = int(np.argmax(dev))
        raise ValueError(
            f"P: each donor's proportions must sum to 1 (donor {donors[i]!r} sums to "
            f"{P[i].sum():.6g}); divide each row by its sum."
        )


def _loadtxt(path, name: str, ndim: int) -> np.ndarray:
    """A whitespace-separated number table (.gz too); a byte-order mark is dropped."""
    try:
        a = np.loadtxt(path, dtype=np.float64, ndmin=ndim, encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path!s} ({e}).") from None
    except ValueError as e:
        raise ValueError(
            f"{name}: {path!s} is not a whitespace-separated number table ({e})."
        ) from None
    return a


def _frame_like(df: pd.DataFrame, P: pd.DataFrame, name: str) -> np.ndarray:
    """df's values in P's row (donor) and column (cell type) order."""
    out = df.set_axis(df.index.astype(str), axis=0).set_axis(df.columns.astype(str), axis=1)
    _unique_rows(out, name, "donor")
    try:
        out = out.loc[P.index.astype(str), P.columns.astype(str)]
    except KeyError as e:
        raise ValueError(f"{name}: needs P's donors (rows) and cell types (columns); {e}") from None
    return _numbers(out, name).to_numpy()


@dataclass(frozen=True)
class CTPData:
    """Cell type-specific pseudobulk.

    Y: (G, N, C) pseudobulk of each gene, donor and cell type; ctnu: (G, N, C) its noise
    variance (sample variance of the cells / number of cells); P: (N, C) cell-type proportions.
    mask: (G, N, C) True where the (donor, cell type) value is observed, or None when all are.
    Missing values are not imputed: the likelihood is that of the observed values (design.md
    4); Y and ctnu hold 0 and 1 there. n_cells: (N, C) or (G, N, C) cells behind each value,
    or None; with them the fit can pool the noise variances (noise.py), and ctnu may be 0
    (every cell equal: missing for the fit).
    """

    Y: np.ndarray
    ctnu: np.ndarray
    P: np.ndarray
    genes: tuple[str, ...]
    donors: tuple[str, ...]
    celltypes: tuple[str, ...]
    mask: np.ndarray | None = None
    n_cells: np.ndarray | None = None

    def __post_init__(self):
        G, N, C = self.Y.shape
        _check_sizes(G, C)
        if self.ctnu.shape != self.Y.shape:
            raise ValueError(f"ctnu: shape {self.ctnu.shape} does not match Y's {self.Y.shape}.")
        if self.P.shape != (N, C):
            raise ValueError(
                f"P: shape {self.P.shape} does not match (donors, cell types) = {(N, C)}."
            )
        axes = [("gene", self.genes), ("donor", self.donors), ("cell type", self.celltypes)]
        for name, a in (("Y", self.Y), ("ctnu", self.ctnu)):
            _check_finite(a, name, axes)
            _check_magnitude(a, name, axes)
        _check_positive(self.ctnu, "ctnu", axes, zero_ok=self.n_cells is not None)
        _check_proportions(self.P, self.donors, self.celltypes)
        if self.mask is not None and (self.mask.shape != self.Y.shape or self.mask.dtype != bool):
            raise ValueError(f"mask: expected a boolean array of shape {self.Y.shape}.")
        observed = np.ones(self.Y.shape, bool) if self.mask is None else self.mask
        object.__setattr__(self, "n_cells", _cell_counts(self.n_cells, self.shape, observed, axes))

    @property
    def observed_donors(self) -> np.ndarray:
        """(G, N) True where the donor has at least one observed value for the gene."""
        return np.ones(self.shape[:2], bool) if self.mask is None else self.mask.any(axis=2)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(G, N, C)."""
        return self.Y.shape

    def select_genes(self, idx) -> CTPData:
        """The genes at positions `idx` (an int array, slice or boolean mask)."""
        i = np.arange(self.shape[0])[idx]
        mask = None if self.mask is None else self.mask[i]
        genes = tuple(np.array(self.genes)[i])
        n = self.n_cells if self.n_cells is None or self.n_cells.ndim == 2 else self.n_cells[i]
        return replace(self, Y=self.Y[i], ctnu=self.ctnu[i], genes=genes, mask=mask, n_cells=n)

    @classmethod
    def from_arrays(
        cls, Y, ctnu, P, genes=None, donors=None, celltypes=None, mask=None, n_cells=None
    ) -> CTPData:
        """From arrays Y, ctnu: (G, N, C) or (N, C) for one gene; P: (N, C). mask: (N, C) shared
        or (G, N, C) per gene, True (or 1) for observed (donor, cell type) values, False for
        missing ones (absent, or too few cells); Y and ctnu are ignored where it is False.
        n_cells: (N, C) or (G, N, C) cells behind each value (ctnu = their variance / n_cells),
        which lets the fit pool the noise variances (noise.py; the default when given)."""
        Y = _as_float(Y, "Y")
        if Y.ndim == 2:
            Y, ctnu = Y[None], _as_float(ctnu, "ctnu")[None]
        Y = _as_float(Y, "Y", 3)
        ctnu = _as_float(ctnu, "ctnu", 3)
        P = _as_float(P, "P", 2)
        G, N, C = Y.shape
        if mask is not None:
            m = _as_float(mask, "mask")
            if m.shape not in ((N, C), (G, N, C)) or not np.isin(m, (0, 1)).all():
                raise ValueError(
                    f"mask: expected 0/1 or booleans of shape (donors, cell types) = {(N, C)} "
                    f"or (genes, donors, cell types) = {(G, N, C)}; got shape {m.shape}."
                )
            mask = np.broadcast_to(m.astype(bool), (G, N, C)).copy()
            Y, ctnu = np.where(mask, Y, 0.0), np.where(mask, ctnu, 1.0)
            mask = None if mask.all() else mask
        return cls(
            Y,
            ctnu,
            P,
            _names(genes, G, "gene", "genes"),
            _names(donors, N, "donor", "donors"),
            _names(celltypes, C, "ct", "celltypes"),
            mask,
            n_cells,
        )

    @classmethod
    def from_frames(
        cls, ctp: pd.DataFrame, ctnu: pd.DataFrame, P: pd.DataFrame,
        n_cells: pd.DataFrame | None = None,
    ) -> CTPData:  # fmt: skip
        """From pandas: ctp and ctnu indexed by (donor, cell type), one column per gene;
        P (and n_cells, cells per pair, optional) indexed by donor, one column per cell type.
        Donor and cell-type order follow P. (donor, cell type) pairs absent from ctp, or NaN in
        ctp or ctnu, are missing values (`mask`)."""
        for name, df in (("ctp", ctp), ("ctnu", ctnu)):
            if not isinstance(df.index, pd.MultiIndex) or df.index.nlevels != 2:
                raise ValueError(f"{name}: index must be a (donor, cell type) MultiIndex.")
        if list(ctnu.columns) != list(ctp.columns):
            raise ValueError(
                "ctnu: columns (genes) differ from ctp's; use the same genes in order."
            )
        _unique_rows(P.set_axis(P.index.astype(str), axis=0), "P", "donor")
        donors, celltypes = [str(d) for d in P.index], [str(c) for c in P.columns]
        full = pd.MultiIndex.from_product([donors, celltypes])

        def cube(df: pd.DataFrame, name: str) -> np.ndarray:
            df = df.copy()
            df.index = pd.MultiIndex.from_arrays(
                [df.index.get_level_values(i).astype(str) for i in range(2)]
            )
            _unique_rows(df, name, "(donor, cell type) pair")
            extra = df.index.difference(full)
            if len(extra):
                raise ValueError(
                    f"{name}: {len(extra)} (donor, cell type) rows not in P, e.g. {extra[0]}; "
                    "P must list every donor (rows) and cell type (columns)."
                )
            a = _numbers(df, name).reindex(full).to_numpy()  # (N*C, G); absent pairs: NaN
            return a.T.reshape(len(df.columns), len(donors), len(celltypes))

        Y, nu = cube(ctp, "ctp"), cube(ctnu, "ctnu")
        return cls.from_arrays(
            Y, nu, _numbers(P, "P").to_numpy(),
            genes=[str(g) for g in ctp.columns], donors=donors, celltypes=celltypes,
            mask=np.isfinite(Y) & np.isfinite(nu),
            n_cells=None if n_cells is None else _frame_like(n_cells, P, "n_cells"),
        )  # fmt: skip

    @classmethod
    def from_files(
        cls, y: str | PathLike, P: str | PathLike, ctnu: str | PathLike, gene: str = "gene",
        n_cells: str | PathLike | None = None,
    ) -> CTPData:  # fmt: skip
        """One gene from the original CTMM text files (whitespace separated, no header, one row
        per donor, one column per cell type; .gz is fine); n_cells: a file of the cells behind
        each value, in the same layout (then the noise can be pooled, noise.py)."""
        Y, ctnu = _loadtxt(y, "y (CTP file)", 2), _loadtxt(ctnu, "ctnu file", 2)
        cells = None if n_cells is None else _loadtxt(n_cells, "n_cells file", 2)
        return cls.from_arrays(Y, ctnu, _loadtxt(P, "P file", 2), genes=[gene], n_cells=cells)


@dataclass(frozen=True)
class OPData:
    """Overall pseudobulk.

    y: (G, N) overall pseudobulk y_i = sum_c P_ic Y_ic; nu: (G, N) its noise variance
    nu_i = sum_c P_ic^2 ctnu_ic; P: (N, C) cell-type proportions. From a CTP with missing
    values (`from_ctp`), P_gene: (G, N, C) each gene's proportions renormalised over its
    observed cell types, and mask: (G, N) False for donors with no observed cell type.
    n_cells: (N, C) or (G, N, C) cells per (donor, cell type) and ctnu: (G, N, C) their
    pseudobulk noise variances (NaN where undefined), or None; with them the fit can pool the
    noise variances (noise.py), and nu may be 0 (missing for the fit).
    """

    y: np.ndarray
    nu: np.ndarray
    P: np.ndarray
    genes: tuple[str, ...]
    donors: tuple[str, ...]
    celltypes: tuple[str, ...]
    P_gene: np.ndarray | None = None
    mask: np.ndarray | None = None
    ctnu: np.ndarray | None = None
    n_cells: np.ndarray | None = None

    def __post_init__(self):
        G, N = self.y.shape
        if self.nu.shape != self.y.shape:
            raise ValueError(f"nu: shape {self.nu.shape} does not match y's {self.y.shape}.")
        if self.P.shape[0] != N:
            raise ValueError(f"P: has {self.P.shape[0]} rows (donors) but y has {N} donors.")
        _check_sizes(G, self.P.shape[1])
        axes = [("gene", self.genes), ("donor", self.donors)]
        for name, a in (("y", self.y), ("nu", self.nu)):
            _check_finite(a, name, axes)
            _check_magnitude(a, name, axes)
        _check_positive(self.nu, "nu", axes, zero_ok=self.n_cells is not None)
        _check_proportions(self.P, self.donors, self.celltypes)
        if (self.ctnu is None) != (self.n_cells is None):
            raise ValueError("OPData: give both ctnu and n_cells (to pool the noise), or neither.")
        if self.ctnu is not None:
            C = self.P.shape[1]
            if self.ctnu.shape != (G, N, C):
                raise ValueError(f"ctnu: expected shape {(G, N, C)}, got {self.ctnu.shape}.")
            _check_magnitude(self.ctnu, "ctnu", axes + [("cell type", self.celltypes)])
            present = np.broadcast_to(self.P > 0, (G, N, C))
            n = _cell_counts(
                self.n_cells, (G, N, C), present, axes + [("cell type", self.celltypes)]
            )
            object.__setattr__(self, "n_cells", n)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(G, N, C)."""
        return self.y.shape + (self.P.shape[1],)

    def select_genes(self, idx) -> OPData:
        """The genes at positions `idx` (an int array, slice or boolean mask)."""
        i = np.arange(self.shape[0])[idx]
        per_gene = {
            k: v if v is None or (k == "n_cells" and v.ndim == 2) else v[i]
            for k, v in (
                ("P_gene", self.P_gene), ("mask", self.mask), ("ctnu", self.ctnu),
                ("n_cells", self.n_cells),
            )
        }  # fmt: skip
        return replace(
            self, y=self.y[i], nu=self.nu[i], genes=tuple(np.array(self.genes)[i]), **per_gene
        )

    @property
    def observed_donors(self) -> np.ndarray:
        """(G, N) True where the donor is observed for the gene."""
        return np.ones(self.y.shape, bool) if self.mask is None else self.mask

    @classmethod
    def from_arrays(
        cls, y, nu, P, genes=None, donors=None, celltypes=None, ctnu=None, n_cells=None
    ) -> OPData:
        """From arrays y, nu: (G, N) or (N,) for one gene; P: (N, C). Optional, to pool the
        noise (noise.py): ctnu (G, N, C) or (N, C) each pair's noise variance (NaN where it
        has fewer than 2 cells) and n_cells (N, C) or (G, N, C) its cells."""
        y, nu = _as_float(y, "y"), _as_float(nu, "nu")
        if y.ndim == 1:
            y, nu = y[None], nu[None]
            ctnu = None if ctnu is None else _as_float(ctnu, "ctnu")[None]
        y, nu, P = _as_float(y, "y", 2), _as_float(nu, "nu", 2), _as_float(P, "P", 2)
        ctnu = None if ctnu is None else _as_float(ctnu, "ctnu", 3)
        G, N = y.shape
        return cls(
            y,
            nu,
            P,
            _names(genes, G, "gene", "genes"),
            _names(donors, N, "donor", "donors"),
            _names(celltypes, P.shape[1], "ct", "celltypes"),
            ctnu=ctnu,
            n_cells=n_cells,
        )

    @classmethod
    def from_frames(cls, y: pd.DataFrame, nu: pd.DataFrame, P: pd.DataFrame) -> OPData:
        """From pandas: y and nu indexed by donor, one column per gene; P indexed by donor,
        one column per cell type. Donor order follows P."""
        _unique_rows(P.set_axis(P.index.astype(str), axis=0), "P", "donor")
        donors = [str(d) for d in P.index]

        def matrix(df: pd.DataFrame, name: str) -> np.ndarray:
            df = df.set_axis(df.index.astype(str), axis=0)
            _unique_rows(df, name, "donor")
            missing = pd.Index(donors).difference(df.index)
            if len(missing):
                raise ValueError(f"{name}: donors of P missing, e.g. {missing[0]!r}.")
            return _numbers(df.loc[donors], name).to_numpy().T

        if list(nu.columns) != list(y.columns):
            raise ValueError("nu: columns (genes) differ from y's; use the same genes in order.")
        return cls.from_arrays(
            matrix(y, "y"), matrix(nu, "nu"), _numbers(P, "P").to_numpy(),
            genes=[str(g) for g in y.columns], donors=donors, celltypes=[str(c) for c in P.columns],
        )  # fmt: skip

    @classmethod
    def from_files(
        cls, y: str | PathLike, P: str | PathLike, nu: str | PathLike, gene: str = "gene"
    ) -> OPData:
        """One gene from the original CTMM text files (y and nu: one value per line)."""
        return cls.from_arrays(
            _loadtxt(y, "y (OP file)", 1), _loadtxt(nu, "nu file", 1), _loadtxt(P, "P file", 2),
            genes=[gene],
        )  # fmt: skip

    @classmethod
    def from_ctp(cls, ctp: CTPData) -> OPData:
        """y_i = sum_c P_ic Y_ic and nu_i = sum_c P_ic^2 ctnu_ic (design.md section 1). With
        missing CTP values the sums run over each gene's observed cell types with P_i
        renormalised over them; a donor with none observed is missing (mask) for that gene.
        The cell counts, if any, come along (to pool the noise, noise.py)."""
        cells = {} if ctp.n_cells is None else {"ctnu": ctp.ctnu, "n_cells": ctp.n_cells}
        if ctp.mask is None:
            y = np.einsum("gnc,nc->gn", ctp.Y, ctp.P)
            nu = np.einsum("gnc,nc->gn", ctp.ctnu, ctp.P**2)
            return cls(y, nu, ctp.P, ctp.genes, ctp.donors, ctp.celltypes, **cells)
        Pm = ctp.P * ctp.mask
        total = Pm.sum(axis=2, keepdims=True)
        present = total[..., 0] > 0
        Pg = np.where(total > 0, Pm / np.where(total > 0, total, 1.0), ctp.P)
        y = np.where(present, np.einsum("gnc,gnc->gn", ctp.Y, Pg), 0.0)
        nu = np.where(present, np.einsum("gnc,gnc->gn", ctp.ctnu, Pg**2), 1.0)
        return cls(y, nu, ctp.P, ctp.genes, ctp.donors, ctp.celltypes, Pg, present, **cells)


@dataclass(frozen=True)
class Covariates:
    """Fixed or random covariates: name -> (N, k) values with column labels, in sorted name
    order (the original CTMM's order)."""

    n_donors: int
    values: dict[str, np.ndarray]
    columns: dict[str, tuple[str, ...]]

    @property
    def matrix(self) -> np.ndarray:
        """(N, sum k) all covariates side by side."""
        return np.hstack([np.zeros((self.n_donors, 0)), *self.values.values()])

    def labels(self) -> list[str]:
        """`<name>_<column>` for every column of `matrix`."""
        return [f"{name}_{c}" for name in self.values for c in self.columns[name]]

    @property
    def groups(self) -> np.ndarray:
        """(n_covariates, total columns) 0/1: which columns of `matrix` belong to each name."""
        sizes = [v.shape[1] for v in self.values.values()]
        return np.repeat(np.eye(len(sizes)), sizes, axis=1)

    @classmethod
    def build(cls, covars: dict | None, donors: Sequence[str], kind: str = "fixed") -> Covariates:
        """covars: name -> (N, k) array, (N,) array, pandas DataFrame/Series (rows matched to
        the donors by index) or a path to a whitespace-separated text file (one row per donor,
        in the data's donor order). kind="random": a design matrix (e.g. one-hot batches; a
        pandas Series of labels is one-hot encoded) whose columns must not be all zero."""
        values, columns = {}, {}
        for name in sorted(covars or {}):
            v = covars[name]
            what = f"{kind} covariate {name!r}"
            if kind == "random" and isinstance(v, pd.Series) and not pd.api.types.is_float_dtype(v):
                if v.isna().any():  # not a level of its own: the user decides what they are
                    raise ValueError(
                        f"{what}: no label for donor(s) {list(v.index[v.isna()].astype(str)[:5])}"
                        "; give them a label (their own level, if that is what they are) or "
                        "drop those donors."
                    )
                v = pd.get_dummies(v.astype(str), dtype=float)
            if isinstance(v, pd.Series):
                v = v.to_frame()
            if isinstance(v, pd.DataFrame):
                idx = v.index.astype(str)
                missing = pd.Index(donors).difference(idx)
                if len(missing):
                    raise ValueError(
                        f"{what}: no row for donor {missing[0]!r}; index rows by donor."
                    )
                cols = tuple(str(c) for c in v.columns)
                a = _as_float(v.set_axis(idx, axis=0).loc[list(donors)], what, 2)
            else:
                a = _loadtxt(v, what, 2) if isinstance(v, str | PathLike) else np.asarray(v)
                a = _as_float(a[:, None] if np.ndim(a) == 1 else a, what, 2)
                cols = tuple(str(j + 1) for j in range(a.shape[1]))
            if a.shape[0] != len(donors):
                raise ValueError(
                    f"{what}: has {a.shape[0]} rows but the data has {len(donors)} donors; "
                    "give one row per donor, in the data's donor order."
                )
            _check_finite(a, what, [("donor", donors), ("column", cols)])
            empty = ~np.any(a != 0, axis=0)
            if kind == "random" and empty.any():
                raise ValueError(
                    f"{what}: column {cols[int(np.argmax(empty))]!r} is all zero (a level with no "
                    "donor); drop empty columns from the random design."
                )
            values[name], columns[name] = a, cols
        return cls(len(donors), values, columns)
