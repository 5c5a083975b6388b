"""Named inputs for GxEMM: an expression table and a donor table, matched to the genotypes by
donor id, never by position (what `ctmm-jax gxemm` reads).

- Expression: genes x donors or donors x genes (.tsv, .csv, gzipped too), the orientation found
  by matching the header and the first column against the donor ids of the other inputs; an
  optional first column of gene ids; or BED-like (`#Chr start end phenotype_id`, then one
  column per donor, as tensorQTL and jaxQTL write phenotypes).
- Donor table: one row per donor, the id in the first column (or a named one), covariate and
  environment columns by name.

Every cell is read as text and only an empty cell is missing, so ids like "007" or "NA" keep
their names; numbers are parsed where numbers are wanted. Mistakes are ValueErrors naming the
file or option and a few of the ids concerned. No JAX here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

INTEGER = re.compile(r"[+-]?[0-9]+")
EXAMPLES = 3  # ids named in an error


class Expression(NamedTuple):
    """values: genes x donors, float64 (NaN where a cell is empty or not a number); genes:
    gene ids (None when the file has none); fmt: 'bed' or 'table'; layout: 'genes x donors'
    or 'donors x genes' (as in the file)."""

    values: pd.DataFrame
    genes: tuple[str, ...] | None
    fmt: str
    layout: str


def _few(ids) -> str:
    ids = list(ids)
    more = ", ..." if len(ids) > EXAMPLES else ""
    return ", ".join(repr(str(i)) for i in ids[:EXAMPLES]) + more


def _read_text(path: Path, what: str) -> pd.DataFrame:
    """Every cell as text ('' = empty), no header: .csv[.gz] comma-separated, else tabs."""
    name = path.name.lower()
    sep = "," if name.endswith((".csv", ".csv.gz")) else "\t"
    try:
        raw = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False,
                          encoding="utf-8-sig")  # fmt: skip
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as e:
        raise ValueError(f"{what}: cannot read {path} as a {sep!r}-separated table "
                         f"({type(e).__name__}: {e}).") from None  # fmt: skip
    if raw.shape[0] < 2 or raw.shape[1] < 2:
        raise ValueError(f"{what}: {path} has {raw.shape[0]} lines and {raw.shape[1]} columns; "
                         "give a header and at least one row of values.")  # fmt: skip
    return raw


def _unique(names: Sequence[str], what: str, kind: str) -> None:
    """ValueError for an empty or a repeated name (kind: e.g. 'donor id')."""
    seen, repeated = set(), []
    for n in names:
        if n in seen:
            repeated.append(n)
        seen.add(n)
    if "" in seen:
        raise ValueError(f"{what}: an empty {kind}.")
    if repeated:
        raise ValueError(f"{what}: repeated {kind}s ({_few(dict.fromkeys(repeated))}).")


def _numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells -> float64, NaN where empty or not a number."""
    return frame.apply(pd.to_numeric, errors="coerce").astype(np.float64)


def read_expression(path, ids, *, fmt: str = "auto", what: str = "--y") -> Expression:
    """The expression table at `path`, as genes x donors.

    ids: the donor ids of the other inputs (genotypes, donor table); the orientation is the
    axis that holds more of them (refused when neither does, or both as many). fmt 'bed' (the
    first four columns are `#Chr start end phenotype_id`), 'table' or 'auto' (bed when the
    first header cell is '#Chr'). In a genes x donors table the first column holds gene ids
    when its header is not a donor id and its cells are not all numbers; without gene ids,
    genes are named by row (None)."""
    path = Path(path)
    if fmt not in ("auto", "table", "bed"):
        raise ValueError(f"fmt={fmt!r}: use 'auto', 'table' or 'bed'.")
    raw = _read_text(path, what)
    header = [str(h) for h in raw.iloc[0]]
    body = raw.iloc[1:]
    if fmt == "auto":
        fmt = "bed" if header[0].strip().lower() == "#chr" else "table"
    if fmt == "bed":
        if len(header) < 5:
            raise ValueError(
                f"{what}: {path} has {len(header)} columns; a BED-like table has #Chr, start, "
                "end, phenotype_id, then one column per donor."
            )
        genes, donors = list(body.iloc[:, 3]), header[4:]
        values = body.iloc[:, 4:]
        layout = "genes x donors"
    else:
        known = set(map(str, ids))
        first = [str(v) for v in body.iloc[:, 0]]
        in_header = sum(h in known for h in header)
        in_first = sum(v in known for v in first)
        if in_header == in_first == 0:
            raise ValueError(
                f"{what}: neither its header nor its first column holds donor ids of the other "
                f"inputs (header: {_few(header)}; first column: {_few(first)}; the donors are "
                f"named like {_few(sorted(known))}); donors are matched by name."
            )
        if in_header == in_first:
            raise ValueError(f"{what}: its header and its first column hold as many donor ids "
                             f"({in_header}); cannot tell genes x donors from donors x "
                             "genes.")  # fmt: skip
        if in_header > in_first:
            numeric = _numbers(body.iloc[:, [0]]).notna().all().all()
            named = header[0] not in known and not numeric
            genes = first if named else None
            donors = header[1:] if named else header
            values = body.iloc[:, 1:] if named else body
            layout = "genes x donors"
        else:
            genes, donors = header[1:], first
            values = body.iloc[:, 1:].T
            layout = "donors x genes"
    _unique(donors, what, "donor id")
    if genes is not None:
        _unique(genes, what, "gene id")
    frame = _numbers(values).set_axis(donors, axis=1)
    frame = frame.set_axis(
        genes if genes is not None else [f"trait{t}" for t in range(len(frame))], axis=0
    )
    return Expression(frame, None if genes is None else tuple(genes), fmt, layout)


def read_donor_table(path, *, donor_col: str | None = None, what: str = "--donors"):
    """The donor table at `path`: a header, one row per donor; every cell as text ('' for an
    empty one), indexed by the donor ids (the column `donor_col`, default the first)."""
    path = Path(path)
    raw = _read_text(path, what)
    columns = [str(c) for c in raw.iloc[0]]
    _unique([c for c in columns if c], what, "column name")
    table = raw.iloc[1:].set_axis(columns, axis=1)
    col = columns[0] if donor_col is None else donor_col
    if col not in table:
        raise ValueError(f"{what}: no column {col!r} in {path.name} (its columns: "
                         f"{_few(columns)}); --donor-col names the donor ids' column.")  # fmt: skip
    ids = list(table[col])
    if "" in ids:
        raise ValueError(f"{what}: {ids.count('')} rows of {path.name} have no donor id.")
    _unique(ids, what, "donor id")
    return table.set_index(col)


def read_kinship(path, what: str = "--K") -> pd.DataFrame:
    """A kinship table with the donor ids in its header (after a corner cell) and in its first
    column, as a DataFrame indexed both ways (the same ids, in any order)."""
    path = Path(path)
    raw = _read_text(path, what)
    cols, rows = [str(c) for c in raw.iloc[0, 1:]], [str(r) for r in raw.iloc[1:, 0]]
    _unique(cols, what, "donor id")
    _unique(rows, what, "donor id")
    if set(cols) != set(rows):
        odd = sorted(set(cols) ^ set(rows))
        raise ValueError(f"{what}: its header and its first column must list the same donor "
                         f"ids ({len(odd)} differ: {_few(odd)}).")  # fmt: skip
    K = _numbers(raw.iloc[1:, 1:]).set_axis(rows, axis=0).set_axis(cols, axis=1)
    if K.isna().any().any():
        raise ValueError(f"{what}: {int(K.isna().sum().sum())} cells are empty or not numbers.")
    return K.loc[rows, rows]


def match_donors(
    y_ids: Sequence[str], *, table_ids: Sequence[str] | None = None,
    genotype_ids: Sequence[str] | None = None, intersect: bool = False,
    names: tuple[str, str, str] = ("--y", "--donors", "the genotypes"),
) -> tuple[list[str], dict[str, int]]:  # fmt: skip
    """The donors to use, in y's order, matched by id: every donor of y must be in the donor
    table and in the genotypes, and every donor of the table in y; the genotypes may hold
    more individuals (only y's are used). Otherwise ValueError naming a few, unless
    `intersect`: then the donors in all inputs. Returns (donors, {input name: donors of that
    input left out}).
    """
    y_ids = [str(i) for i in y_ids]
    sources = [(names[1], table_ids, True), (names[2], genotype_ids, False)]
    used, problems, dropped = list(y_ids), [], {}
    for name, ids, both_ways in sources:
        if ids is None:
            continue
        ids = [str(i) for i in ids]
        have = set(ids)
        absent = [d for d in y_ids if d not in have]
        if absent:
            problems.append(f"{len(absent)} of the {len(y_ids)} donors of {names[0]} are not "
                            f"in {name} ({_few(absent)})")  # fmt: skip
        extra = [d for d in ids if d not in set(y_ids)]
        if both_ways and extra:
            problems.append(f"{len(extra)} of the {len(ids)} donors of {name} are not in "
                            f"{names[0]} ({_few(extra)})")  # fmt: skip
        used = [d for d in used if d in have]
    if problems and not intersect:
        raise ValueError("; ".join(problems) + ". Donors are matched by name: fix the ids, or "
                         "pass --intersect to use the donors in all inputs.")  # fmt: skip
    if not used:
        raise ValueError(f"no donor of {names[0]} is in all inputs; donors are matched by name.")
    keep = set(used)
    dropped[names[0]] = len(y_ids) - len(used)
    for name, ids, _ in sources:
        if ids is not None:
            dropped[name] = sum(str(i) not in keep for i in ids)
    return used, dropped


def covariates(table: pd.DataFrame, columns: Sequence[str], what: str = "--covars"):
    """(N, q) float64: the named columns of the donor table (rows already selected)."""
    out = []
    for c in columns:
        if c not in table:
            raise ValueError(f"{what}: no column {c!r} in the donor table (its columns: "
                             f"{_few(table.columns)}).")  # fmt: skip
        x = pd.to_numeric(table[c], errors="coerce")
        bad = ~np.isfinite(x)
        if bad.any():
            eg = [f"{d!r}: {table[c][d]!r}" for d in table.index[bad][:EXAMPLES]]
            raise ValueError(f"{what} {c}: {int(bad.sum())} donors have no finite number "
                             f"({', '.join(eg)}); fill them or drop those donors.")  # fmt: skip
        out.append(x.to_numpy(np.float64))
    return np.column_stack(out) if out else None


def environments(values: pd.Series, what: str = "--env") -> tuple[np.ndarray, list[str]]:
    """One-hot Z (N, K0) of a column of discrete environments (text; '' is missing) and its
    K0 levels: integers sorted as numbers, other labels as text. Refused: a missing value, a
    single level, a level with one donor, non-integer numbers (a continuous environment: this
    version fits discrete ones)."""
    v = [str(x) for x in values]
    empty = [d for d, x in zip(values.index, v, strict=True) if x == ""]
    if empty:
        raise ValueError(f"{what}: {len(empty)} donors have no value ({_few(empty)}); fill "
                         "them or drop those donors.")  # fmt: skip
    levels = list(dict.fromkeys(v))
    if all(INTEGER.fullmatch(x.strip()) for x in levels):
        levels.sort(key=lambda x: (int(x), x))
    else:
        numbers = pd.to_numeric(pd.Series(levels), errors="coerce")
        if numbers.notna().all() and np.isfinite(numbers).all():
            raise ValueError(
                f"{what}: continuous values ({_few(levels)}); this version fits discrete "
                "environments only (integer codes or labels): group the values into a few "
                "levels in the donor table."
            )
        levels.sort()
    counts = {lv: v.count(lv) for lv in levels}
    if len(levels) < 2:
        raise ValueError(f"{what}: one level ({levels[0]!r}) among the {len(v)} donors used; "
                         "GxE needs at least two environments.")  # fmt: skip
    rare = [lv for lv in levels if counts[lv] < 2]
    if rare:
        raise ValueError(f"{what}: {len(rare)} of its {len(levels)} levels have a single donor "
                         f"({_few(rare)}); each environment needs at least 2 donors "
                         "(discrete environments only: group the values).")  # fmt: skip
    Z = (np.asarray(v)[:, None] == np.asarray(levels)[None, :]).astype(np.float64)
    return Z, levels


def logcpm(counts: np.ndarray, what: str = "--normalize logcpm") -> np.ndarray:
    """log1p(counts per million) of genes x donors counts (T, N): each donor's counts divided
    by its total over all the genes given, times 1e6."""
    counts = np.asarray(counts, dtype=np.float64)
    if (counts < 0).any():
        raise ValueError(f"{what}: needs counts (>= 0); the expression has negative values.")
    total = counts.sum(0)
    if (total <= 0).any():
        raise ValueError(f"{what}: {int((total <= 0).sum())} donors have no counts at all.")
    return np.log1p(counts / total * 1e6)
