"""Benchmark: pseudobulk of a cohort-scale .h5ad streamed from disk (anndata backed mode).

Writes (once; kept for later runs, never committed) an AnnData file of `--cells` cells x
`--genes` genes with about `--nnz` nonzero counts per cell, in CSR, block by block with h5py
so that the writer never holds the matrix; donors and cell types are drawn at random. Then runs
`ctmm_jax.preprocess.from_anndata(anndata.read_h5ad(path, backed="r"))` in a fresh process
(what `ctmm-jax pseudobulk` does) and reports its wall time and peak RSS (VmHWM). Then checks
the streamed result against the in-memory one on the first 20,000 cells.

    python benchmarks/bench_h5ad.py --path /tmp/cohort.h5ad --json h5ad.json
    python benchmarks/bench_h5ad.py --cells 200000 --genes 5000 --path /tmp/small.h5ad

Typical printout (2-core CPU): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

# peak RSS from VmHWM: ru_maxrss carries the parent's peak over fork and exec
RUN = """
import json, sys, time
import anndata
from ctmm_jax.preprocess import from_anndata
start = time.perf_counter()
pb = from_anndata(anndata.read_h5ad(sys.argv[1], backed="r"), cell_block=int(sys.argv[2]))
seconds = time.perf_counter() - start
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps(dict(seconds=seconds, shape=list(pb.ctp.shape), peak_rss_gb=int(hwm) / 2**20)))
"""


def write_cells(path, cells, genes, nnz, donors, celltypes, seed, block=20_000) -> None:
    """An AnnData .h5ad (CSR X of float32 counts 1 + Poisson(1); obs donor and cell_type)
    written a block of cells at a time. Each cell's genes are distinct and sorted: cumulative
    random gaps of mean genes / nnz."""
    import anndata
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": (cells, genes)})  # fmt: skip
        kw = dict(maxshape=(None,), chunks=(1 << 20,))
        data = X.create_dataset("data", (0,), dtype="float32", **kw)
        indices = X.create_dataset("indices", (0,), dtype="int32", **kw)
        indptr = [np.zeros(1, np.int64)]
        for start in range(0, cells, block):
            n = min(block, cells - start)
            cols = np.cumsum(rng.integers(1, 2 * genes // nnz, size=(n, nnz)), axis=1) - 1
            keep = cols < genes
            cols = cols[keep].astype(np.int32)
            size = data.shape[0]
            data.resize((size + len(cols),))
            indices.resize((size + len(cols),))
            data[size:] = 1.0 + rng.poisson(1.0, len(cols)).astype(np.float32)
            indices[size:] = cols
            indptr.append(size + np.cumsum(keep.sum(1)))
        X.create_dataset("indptr", data=np.concatenate(indptr))
        weights = rng.dirichlet(np.full(celltypes, 2.0))
        obs = pd.DataFrame(
            {"donor": pd.Categorical([f"d{i}" for i in rng.integers(0, donors, cells)]),
             "cell_type": pd.Categorical([f"ct{c}" for c in rng.choice(celltypes, cells,
                                                                          p=weights)])},
            index=[f"cell{i}" for i in range(cells)],
        )  # fmt: skip
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(genes)]))
        for empty in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            anndata.io.write_elem(f, empty, {})


class _Head:
    """The first n rows of a backed CSR matrix, itself streamed as a backed matrix."""

    format = "csr"

    def __init__(self, X, n):
        self.X, self.shape = X, (n, X.shape[1])

    def __getitem__(self, rows):
        return self.X[rows]

    def to_memory(self):
        return self.X[: self.shape[0]]


def check(path, n: int = 20_000) -> float:
    """Max abs difference of the streamed pseudobulk (blocks of 3,000 cells) and the in-memory
    one on the first n cells."""
    import anndata

    from ctmm_jax.preprocess import pseudobulk

    adata = anndata.read_h5ad(path, backed="r")
    cells = adata.obs.iloc[:n]
    streamed = pseudobulk(_Head(adata.X, n), cells, cell_block=3000)
    memory = pseudobulk(adata.X[:n], cells)
    return float(np.nanmax(np.abs(streamed.ctp - memory.ctp)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", required=True, help="the .h5ad to write (if absent) and read")
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=30_000)
    ap.add_argument("--nnz", type=int, default=1000, help="nonzeros per cell (about)")
    ap.add_argument("--donors", type=int, default=1000)
    ap.add_argument("--celltypes", type=int, default=8)
    ap.add_argument("--cell-block", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    row = dict(cells=args.cells, genes=args.genes, nnz_per_cell=args.nnz, donors=args.donors,
               celltypes=args.celltypes, cell_block=args.cell_block)  # fmt: skip
    if not os.path.exists(args.path):
        start = time.perf_counter()
        write_cells(args.path, args.cells, args.genes, args.nnz, args.donors, args.celltypes,
                    args.seed)  # fmt: skip
        row["write_seconds"] = time.perf_counter() - start
    row["file_gb"] = os.path.getsize(args.path) / 2**30
    done = subprocess.run([sys.executable, "-c", RUN, args.path, str(args.cell_block)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    row["check_max_abs_diff"] = check(args.path)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=[row]), fh, indent=2)
    return row


if __name__ == "__main__":
    main()
