"""Benchmark: calibration end to end, as a user runs it: cells -> .h5ad -> `ctmm-jax pseudobulk`
-> `ctmm-jax fit`, both with their defaults (free REML, pooled noise, `p_V` the score test).

The cells come from `ctmm_jax.simulation.simulate_anndata`, another generator than
bench_calibration's: Poisson UMI counts with log-normal donor effects (hom2 = 0.05 shared,
V specific), gene rates LogNormal(log 5, 1) per 10,000 UMIs, cell-type baselines
N(0, ct_sd^2) on the log scale, Poisson(cells per donor) cells split by Dirichlet(2)
proportions, library sizes LogNormal, normalised by each cell's total UMI count (scanpy's
normalize_total + log1p). Null genes have V = 0, power genes V = diag(a, 0, 0, a / 2).

The oracle is a REML LRT that knows each pair's true noise variance: the variance of the
normalised value of one cell of that pair, log1p(x / t * 1e4) with x ~ Poisson(L mu / 1e4)
and the cell's total t = x + Poisson(L (1 + sum of the other genes' mu / 1e4)) (exactly the
simulator's law), estimated from M cells drawn from it, over the pair's n_ic cells.

    python benchmarks/bench_cli_calibration.py                       # about 5 minutes
    python benchmarks/bench_cli_calibration.py --ct-sd 0 --cells-per-donor 40 100
    python benchmarks/bench_cli_calibration.py --counts    # from raw counts: count-scale loadings

Prints a table (type I error at 0.05 / 0.01, power at 0.05) and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from common import write_json  # noqa: E402

import ctmm_jax as cj  # noqa: E402
from ctmm_jax.cli import main as ctmm_jax_cli  # noqa: E402
from ctmm_jax.preprocess import Pseudobulk, normalize_log1p  # noqa: E402
from ctmm_jax.simulation import cell_log_means, simulate_anndata, simulate_cells  # noqa: E402

C = 4
HOM2 = 0.05
DEPTH = 5000.0  # simulate_cells' default library size


def oracle_cell_variance(log_mu: np.ndarray, M: int, seed: int, nb_size: float | None = None
                         ) -> np.ndarray:  # fmt: skip
    """(G, N, C) variance of one cell's normalised value log1p(x / t * 1e4) in each pair, from
    M cells drawn from the simulator's law (module docstring; negative binomial counts with
    nb_size); 16 genes at a time."""
    rng = np.random.default_rng(seed)
    mu = np.exp(log_mu)
    rest = mu.sum(0) - mu  # (G, N, C) the other simulated genes' rates
    out = np.empty(mu.shape)
    for lo in range(0, len(mu), 16):
        m, r = mu[lo : lo + 16, ..., None], rest[lo : lo + 16, ..., None]
        L = DEPTH * np.exp(0.3 * rng.standard_normal(m.shape[:-1] + (M,)))
        lam = L * m / 1e4
        x = rng.poisson(lam) if nb_size is None else (
            rng.negative_binomial(nb_size, nb_size / (nb_size + lam)))  # fmt: skip
        total = x + rng.poisson(L * (1.0 + r / 1e4))
        out[lo : lo + 16] = np.log1p(x / total * 1e4).var(axis=-1, ddof=1)
    return out


def with_counts(G: int, N: int, C: int, **kw):
    """simulate_cells as an AnnData whose layers["counts"] are the raw counts plus a gene
    "rest" holding the rest of each cell's UMIs (n_counts minus the simulated genes'), so that
    `pseudobulk --layer counts --normalize` divides by n_counts, as a whole transcriptome would
    (a total over a few hundred simulated genes would carry their donor effects)."""
    import anndata

    counts, cells, genes = simulate_cells(G, N, C, **kw)
    rest = cells["n_counts"].to_numpy() - np.asarray(counts.sum(axis=1)).ravel()
    full = sparse.hstack([counts, sparse.csr_matrix(rest[:, None])], format="csr")
    adata = anndata.AnnData(
        X=normalize_log1p(full),
        obs=cells,
        var=pd.DataFrame(index=pd.Index([*genes, "rest"], name="gene")),
    )
    adata.layers["counts"] = full
    return adata


def run(N: int, cells_per_donor: float, ct_sd: float, n_null: int, n_power: int, seed: int,
        workdir: Path, oracle_cells: int, model: str = "free", counts: bool = False,
        nb_size: float | None = None) -> dict:  # fmt: skip
    """One configuration: simulate, run the command line with defaults (and --noise plugin),
    fit the oracle; rates of each test."""
    G, n_pair = n_null + n_power, cells_per_donor / C
    a = 4.5 * (1.0 / n_pair + 0.05) / np.sqrt(N)
    V = np.zeros((G, C))
    V[n_null:] = [a, 0.0, 0.0, a / 2]
    kw = dict(
        cells_per_donor=cells_per_donor, hom2=HOM2, V=V, ct_sd=ct_sd, seed=seed, nb_size=nb_size
    )
    adata = with_counts(G, N, C, **kw) if counts else simulate_anndata(G, N, C, **kw)
    h5ad, pb_path = workdir / "cells.h5ad", workdir / "pb.npz"
    adata.write_h5ad(h5ad)
    t0 = time.perf_counter()
    from_counts = ["--layer", "counts", "--normalize"] if counts else []
    assert ctmm_jax_cli(["pseudobulk", str(h5ad), "-o", str(pb_path), "-q", "--force",
                         *from_counts]) == 0  # fmt: skip
    tables = {}
    for name, extra in (("default", []), ("plugin", ["--noise", "plugin"])):
        out = workdir / f"{name}.tsv"
        argv = ["fit", str(pb_path), "-o", str(out), "-q", "--force", "--model", model, *extra]
        assert ctmm_jax_cli(argv) == 0
        tables[name] = pd.read_csv(out, sep="\t", index_col=0)
    seconds = time.perf_counter() - t0

    pb = Pseudobulk.load(pb_path)
    pb = pb.select_genes(np.array([g.startswith("gene") for g in pb.genes]))  # not "rest"
    log_mu = cell_log_means(np.random.default_rng(seed), G, N, C, HOM2, V, ct_sd)
    gene = np.array([int(g.removeprefix("gene")) for g in pb.genes])
    donor = np.array([int(d.removeprefix("ind")) for d in pb.donors])
    ct = np.array([int(c.removeprefix("ct")) for c in pb.celltypes])
    variance = oracle_cell_variance(
        log_mu[np.ix_(gene, donor, ct)], oracle_cells, seed + 1, nb_size
    )
    data = pb.to_ctp()  # on the count scale where the dataset has loadings (--counts)
    true = variance / np.maximum(pb.counts, 1)[None]
    if pb.loadings is not None:
        true = true / np.where(pb.loadings > 0, pb.loadings, 1.0)[:, None, :] ** 2
    observed = np.broadcast_to(data.mask if data.mask is not None else True, data.shape)
    oracle = cj.CTPData.from_arrays(data.Y, np.where(observed, true, 1.0), data.P,
                                    mask=data.mask, genes=data.genes)  # fmt: skip
    tables["oracle"] = cj.fit(oracle, model, "reml", noise="plugin").table

    is_null = pd.Series(gene < n_null, index=list(pb.genes))
    row = dict(model=model, counts=counts, nb_size=nb_size, donors=N,
               cells_per_donor=cells_per_donor,
               cells_per_pair=n_pair, ct_sd=ct_sd, genes=G, V_power=a,
               cli_seconds=round(seconds, 1))  # fmt: skip
    assert "q_V" in tables["default"], "the default table must have q_V"
    for name, test in (("default", "p_V"), ("default", "p_V_lrt"), ("plugin", "p_V"),
                       ("oracle", "p_V_lrt"), ("oracle", "p_V")):  # fmt: skip
        if test not in tables[name]:  # lowrank: no LRT
            continue
        p = tables[name][test].reindex(is_null.index)
        null, alt = p[is_null.loc[p.index]].dropna(), p[~is_null.loc[p.index]].dropna()
        key = f"{name} {test}"
        row[f"{key} a05"], row[f"{key} a01"] = np.mean(null < 0.05), np.mean(null < 0.01)
        row[f"{key} power"] = np.mean(alt < 0.05)
        row[f"{key} n"] = len(null) + len(alt)
    q = tables["default"]["q_V"].reindex(is_null.index)
    row["default q_V<0.1 null"] = int((q[is_null] < 0.1).sum())
    oracle = "oracle p_V_lrt" if "oracle p_V_lrt power" in row else "oracle p_V"
    row["oracle"], row["oracle power"] = oracle, row[f"{oracle} power"]
    row["power ratio"] = row["default p_V power"] / row["oracle power"]
    return row


def table(rows: list[dict]) -> str:
    """Markdown: type I error at 0.05/0.01 and power of each test."""
    head = ["model", "input", "N", "cells/pair", "ct_sd", "default p_V", "default p_V_lrt",
            "plugin p_V", "oracle", "power default p_V / oracle (ratio)",
            "null q_V < 0.1"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:

        def rate(k, r=r):
            return f"{r[k + ' a05']:.3f}/{r[k + ' a01']:.3f}" if k + " a05" in r else "-"

        lines.append("| " + " | ".join([
            r["model"], ("counts" if r.get("counts") else "X")
            + (f", NB {r['nb_size']:g}" if r.get("nb_size") else ""), str(r["donors"]),
            f"{r['cells_per_pair']:g}", f"{r['ct_sd']:g}",
            rate("default p_V"), rate("default p_V_lrt"), rate("plugin p_V"),
            f"{r['oracle'].removeprefix('oracle ')} {rate(r['oracle'])}",
            f"{r['default p_V power']:.2f} / {r['oracle power']:.2f} "
            f"({r['power ratio']:.2f})", str(r["default q_V<0.1 null"]),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--donors", type=int, nargs="+", default=[100])
    ap.add_argument("--cells-per-donor", type=float, nargs="+", default=[40, 100, 200])
    ap.add_argument("--ct-sd", type=float, nargs="+", default=[0.0, 0.5],
                    help="sd of cell-type baselines on the log scale (simulator: 0.5)")  # fmt: skip
    ap.add_argument("--model", default="free", help="--model of the fits (default free)")
    ap.add_argument("--null-genes", type=int, default=400)
    ap.add_argument("--power-genes", type=int, default=100)
    ap.add_argument("--oracle-cells", type=int, default=400)
    ap.add_argument("--counts", action="store_true",
                    help="pseudobulk the raw counts (--layer counts --normalize): the dataset "
                    "then has count-scale loadings, which fit uses by default")  # fmt: skip
    ap.add_argument("--nb-size", type=float,
                    help="negative binomial counts of this size (overdispersed) instead of "
                    "Poisson")  # fmt: skip
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (N, cpd, sd) in enumerate((N, cpd, sd) for sd in args.ct_sd for N in args.donors
                                         for cpd in args.cells_per_donor):  # fmt: skip
            rows.append(run(N, cpd, sd, args.null_genes, args.power_genes, args.seed + k,
                            Path(tmp), args.oracle_cells, args.model, args.counts,
                            args.nb_size))  # fmt: skip
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            write_json(args.json, rows)
    print("\nType I error at 0.05/0.01 (power at 0.05), end to end through the command line")
    print(table(rows))


if __name__ == "__main__":
    main()
