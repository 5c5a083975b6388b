"""Benchmark: pseudobulk of a sparse single-cell count matrix (ctmm_jax.preprocess.pseudobulk).

Simulates a cells x genes CSR matrix of integer counts (each entry nonzero with probability
`--density`, nonzero values 1 + Poisson(1)), donors and cell types assigned at random (cell
types with Dirichlet proportions). Checks pseudobulk on a slice against a pandas groupby before
timing. Then times one call (wall clock) and measures memory twice: the process's peak RSS
(ru_maxrss, which includes the simulated matrix) and, in a second call under tracemalloc, the
peak of the memory pseudobulk allocates itself (NumPy and SciPy arrays are traced).

    python benchmarks/bench_pseudobulk.py --json out.json
    python benchmarks/bench_pseudobulk.py --cells 20000 --genes 2000 --format csc

Typical printout (2-core CPU shared with other jobs, float32 CSR input as in an .h5ad file;
max RSS includes the JAX import, ~350 MB, and the simulated X):

     cells  genes  donors  celltypes      nnz  x_mb  time_s  alloc_peak_mb  max_rss_mb
    200000   5000     100          8 48775876 372.9   2.958          889.4      1587.4
    checked against pandas groupby: max abs error 4.44e-16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import tracemalloc

import numpy as np
import pandas as pd
from scipy import sparse

from ctmm_jax.preprocess import pseudobulk


def simulate_counts(
    cells: int, genes: int, density: float, rng: np.random.Generator, dtype, block: int = 20000
) -> sparse.csr_matrix:
    """(cells, genes) CSR counts, built a block of rows at a time so that the simulation never
    holds much more than the matrix itself."""
    starts = range(0, cells, block)
    sizes = [min(block, cells - r0) * genes for r0 in starts]
    draws = rng.binomial(sizes, density)
    indices = np.empty(draws.sum(), np.int32)
    data = np.empty(draws.sum(), dtype)
    row_nnz, at = [], 0
    for r0, k in zip(starts, draws, strict=True):
        rows = min(block, cells - r0)
        key = np.sort(rng.integers(0, rows * genes, size=k))  # row-major
        key = key[np.r_[True, key[1:] != key[:-1]]]  # distinct (faster than np.unique)
        r, c = np.divmod(key, genes)
        indices[at : at + len(key)] = c
        data[at : at + len(key)] = 1 + rng.poisson(1.0, len(key))
        row_nnz.append(np.bincount(r, minlength=rows))
        at += len(key)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))])
    return sparse.csr_matrix((data[:at], indices[:at], indptr), shape=(cells, genes))


def simulate_cells(cells: int, donors: int, celltypes: int, rng) -> pd.DataFrame:
    props = rng.dirichlet(np.full(celltypes, 2.0))
    width = len(str(donors - 1))
    return pd.DataFrame(
        {
            "donor": [f"donor{i:0{width}d}" for i in rng.integers(0, donors, cells)],
            "cell_type": [f"ct{c}" for c in rng.choice(celltypes, cells, p=props)],
        }
    )


def check_correctness(X, cells, n_cells: int = 5000, n_genes: int = 30) -> float:
    """Max abs difference of ctp and ctnu from a pandas groupby on a slice of the data."""
    Xs, cs = X[:n_cells, :n_genes], cells.iloc[:n_cells].reset_index(drop=True)
    pb = pseudobulk(Xs, cs, chunk_size=7)
    df = pd.DataFrame(Xs.toarray().astype(np.float64)).assign(
        donor=cs.donor, cell_type=cs.cell_type
    )
    g = df.groupby(["donor", "cell_type"])
    mean, var, size = g.mean(), g.var(ddof=1), g.size()
    i = pd.Index(pb.donors).get_indexer(mean.index.get_level_values(0))
    c = pd.Index(pb.cell_types).get_indexer(mean.index.get_level_values(1))
    ok = pb.mask[i, c]
    err_ctp = np.abs(pb.ctp[:, i, c].T[ok] - mean.to_numpy()[ok]).max()
    ctnu = var.to_numpy() / size.to_numpy()[:, None]
    err_ctnu = np.abs(pb.ctnu[:, i, c].T[ok] - ctnu[ok]).max()
    return float(max(err_ctp, err_ctnu))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=5_000)
    parser.add_argument("--donors", type=int, default=100)
    parser.add_argument("--celltypes", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["csr", "csc"], default="csr")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    X = simulate_counts(args.cells, args.genes, args.density, rng, np.dtype(args.dtype))
    X = X.asformat(args.format)
    cells = simulate_cells(args.cells, args.donors, args.celltypes, rng)
    simulate_s = time.perf_counter() - t0
    x_mb = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20
    err = check_correctness(X, cells)
    if not err < 1e-9:
        raise SystemExit(f"pseudobulk differs from the pandas groupby by {err:.3g}")
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

    t0 = time.perf_counter()
    pb = pseudobulk(X, cells, chunk_size=args.chunk_size)
    time_s = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB
    del pb
    tracemalloc.start()
    pseudobulk(X, cells, chunk_size=args.chunk_size)
    alloc_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    out = {
        "cells": args.cells,
        "genes": args.genes,
        "donors": args.donors,
        "celltypes": args.celltypes,
        "density": args.density,
        "format": args.format,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "nnz": int(X.nnz),
        "x_mb": round(x_mb, 1),
        "simulate_s": round(simulate_s, 2),
        "check_max_abs_err": err,
        "time_s": round(time_s, 3),
        "alloc_peak_mb": round(alloc_peak_mb, 1),
        "max_rss_before_mb": round(rss_before_mb, 1),
        "max_rss_mb": round(rss_mb, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    cols = ["cells", "genes", "donors", "celltypes", "nnz", "x_mb", "time_s"]
    cols += ["alloc_peak_mb", "max_rss_mb"]
    print(pd.DataFrame([out])[cols].to_string(index=False))
    print(f"checked against pandas groupby: max abs error {err:.2e}")
    print(f"max RSS before the timed call (simulation): {rss_before_mb:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
