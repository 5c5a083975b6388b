"""Batches of problems (genes, jackknife replicates, traits) of a few fixed sizes.

Every compiled function sees batches of a size from a small set of buckets: powers of two up
to the chunk size. A batch is padded with copies of its first problem, so a new number of
genes (or a jackknife, or a last partial batch) reuses the compiled programs of a bucket
instead of compiling new shapes. Results come back to the host and are scattered into one
array per output with a leading problem axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np


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
        for dst, src in zip(jax.tree.leaves(out), jax.tree.leaves(res), strict=True):
            dst[part] = np.asarray(src)[: len(part)]
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
