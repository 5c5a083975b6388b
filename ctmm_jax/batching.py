"""Batches of problems (genes, jackknife replicates, traits) of a few fixed sizes.

Every compiled function sees batches of a size from a small set of buckets: powers of two up
to the chunk size. A batch is padded with copies of its first problem, so a new number of
genes (or a jackknife, or a last partial batch) reuses the compiled programs of a bucket
instead of compiling new shapes. Results come back to the host and are scattered into one
array per output with a leading problem axis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

DEFAULT_MEMORY = "2GB"  # working memory of one compiled batch, unless fit(memory=...) says
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30,
          "gb": 2**30, "t": 2**40, "tb": 2**40}  # fmt: skip


def parse_memory(value: str | int | float) -> int:
    """Bytes from a size: a number of bytes, or a string such as '4GB', '512MB', '1.5g'
    (binary units); ValueError naming the input otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = "" if match is None else match.group(2).lower()
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"memory={value!r}: give a size such as '4GB', '512MB' or a number of bytes."
            )
        size = float(match.group(1)) * _UNITS[unit]
    if not size >= 1:
        raise ValueError(f"memory={value!r}: must be a positive size, e.g. '4GB'.")
    return int(size)


def memory_chunk(chunk_size: int, budget: int, per_problem: int) -> int:
    """The largest power of two <= chunk_size whose batch needs at most `budget` bytes at
    `per_problem` bytes a problem (at least 1)."""
    size = 1 << (max(int(chunk_size), 1).bit_length() - 1)
    while size > 1 and size * per_problem > budget:
        size //= 2
    return size


def bucket(n: int, chunk_size: int) -> int:
    """Batch size for n problems: the smallest power of two >= n, at most chunk_size (itself
    rounded down to a power of two, so every size in use is one)."""
    top = 1 << (max(int(chunk_size), 1).bit_length() - 1)
    return min(1 << max(int(n) - 1, 0).bit_length(), top)


def batches(idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(part, padded) per batch: part holds up to `size` indices, padded repeats part[0] to
    exactly `size`."""
    for start in range(0, len(idx), size):
        part = idx[start : start + size]
        yield part, np.concatenate([part, np.full(size - len(part), part[0])])


def scatter(out, parts):
    """Write each batch's results (a pytree with a leading batch axis) into the host pytree
    `out` at its indices; the padded rows are dropped."""
    for part, res in parts:
        n = len(part)
        if n and np.all(np.diff(part) == 1):
            part = slice(part[0], part[0] + n)  # contiguous: a block copy, not a scatter
        for dst, src in zip(jax.tree.leaves(out), jax.tree.leaves(res), strict=True):
            dst[part] = np.asarray(src)[:n]
    return out


def gather(parts, n: int):
    """[(indices, batched pytree)] -> one host pytree over all n problems."""
    first = jax.tree.map(np.asarray, parts[0][1])
    out = jax.tree.map(lambda a: np.empty((n,) + a.shape[1:], a.dtype), first)
    return scatter(out, parts)


def map_batches(fn: Callable[[np.ndarray], object], idx: np.ndarray, size: int):
    """fn(padded indices) over the batches of idx (each of exactly `size`), gathered into one
    host pytree over len(idx) problems."""
    idx = np.asarray(idx)
    parts = [(part, fn(idx[pad])) for part, pad in batches(np.arange(len(idx)), size)]
    return gather(parts, len(idx))
