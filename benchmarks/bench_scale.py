"""Benchmark: cost against the number of donors N and cell types C, extrapolated to a genome.

Each (N, C) runs in a fresh process (peak RSS is that process's; the persistent compilation
cache is off, so compile times are real) on `--genes` simulated CTP genes:
- free REML with its null hom fit (score test, LRT and Wald of V: one `cj.fit` call),
- HE with the block jackknife (`jackknife=--blocks`), and the leave-one-out jackknife where
  N <= --loo-max.
Each is called twice: the first call compiles and runs (end to end), the second runs warm;
compile = first - second. 20,000 genes are extrapolated as compile + 20000 / G * run. The
log-log slopes of warm run time against N (at the smallest C) and against C (at the largest
N) are fitted and, with --plot, drawn.

    python benchmarks/bench_scale.py --json scale.json --plot scale.png
    python benchmarks/bench_scale.py --donors 1000 --celltypes 4 8 14 --genes 2000
    python benchmarks/bench_scale.py --platform gpu --genes 20000   # the device is recorded

Typical printout (2-core CPU): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GENOME = 20_000


def one(N: int, C: int, G: int, blocks: int, loo: bool) -> dict:
    """Time the fits of one (N, C) in this process."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import ctmm_jax as cj

    data = cj.simulate(G, N, C, hom2=0.25, V=np.full(C, 0.05), ctnu=0.2, seed=1)
    runs = {"free_reml": dict(method="reml"), f"he_jk{blocks}": dict(method="he", jackknife=blocks)}
    if loo:
        runs["he_jk_loo"] = dict(method="he", jackknife=True)
    out = dict(N=N, C=C, genes=G)
    for name, option in runs.items():
        times = []
        for _ in range(2):
            start = time.perf_counter()
            res = cj.fit(data, "free", noise="plugin", **option)
            times.append(time.perf_counter() - start)
        out[name] = dict(first=times[0], run=times[1], compile=max(times[0] - times[1], 0.0),
                         genome=max(times[0] - times[1], 0.0) + GENOME / G * times[1],
                         ok=float(res.table.converged.mean()))  # fmt: skip
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["device"] = str(jax.devices()[0])
    return out


def slope(x, y) -> float:
    """Least-squares slope of log y on log x."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--donors", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--celltypes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=20, help="groups of the block jackknife")
    ap.add_argument("--loo-max", type=int, default=300, help="largest N for the full jackknife")
    ap.add_argument("--platform", choices=("cpu", "gpu"), help="JAX platform (default: JAX's)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        N, C = args.one
        print(json.dumps(one(N, C, args.genes, args.blocks, N <= args.loo_max)))
        return []
    rows = []
    env = dict(os.environ, CTMM_JAX_CACHE="off")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if args.platform:
        env["JAX_PLATFORMS"] = args.platform
    for N in args.donors:
        for C in args.celltypes:
            cmd = [sys.executable, __file__, "--one", str(N), str(C), "--genes", str(args.genes),
                   "--blocks", str(args.blocks), "--loo-max", str(args.loo_max)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"N={N} C={C} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print_row(rows[-1], args.blocks)
    summarise(rows, args)
    return rows


def print_row(r: dict, blocks: int) -> None:
    for name in ("free_reml", f"he_jk{blocks}", "he_jk_loo"):
        if name in r:
            t = r[name]
            print(
                f"N={r['N']:5d} C={r['C']:3d} {name:10s} first {t['first']:7.1f} s  compile "
                f"{t['compile']:6.1f} s  run {t['run']:7.1f} s  20k genes {t['genome'] / 60:6.1f}"
                f" min  ok {t['ok']:.3f}  peak RSS {r['peak_rss_gb']:.2f} GB",
                flush=True,
            )


def summarise(rows: list[dict], args) -> None:
    if not rows:
        return
    fits = {}
    for name in ("free_reml", f"he_jk{args.blocks}"):
        C0, N1 = min(r["C"] for r in rows), max(r["N"] for r in rows)
        byN = [(r["N"], r[name]["run"]) for r in rows if r["C"] == C0]
        byC = [(r["C"], r[name]["run"]) for r in rows if r["N"] == N1]
        fits[name] = dict(
            slope_N=slope(*zip(*byN, strict=True)) if len(byN) > 1 else None,
            slope_C=slope(*zip(*byC, strict=True)) if len(byC) > 1 else None,
            byN=byN, byC=byC, C0=C0, N1=N1,
        )  # fmt: skip
        print(f"{name}: run time ~ N^{fits[name]['slope_N']} (C = {C0}), "
              f"~ C^{fits[name]['slope_C']} (N = {N1})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, slopes=fits), fh, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for name, f in fits.items():
            for ax, key, pts, fixed in ((axes[0], "N", f["byN"], f"C = {f['C0']}"),
                                        (axes[1], "C", f["byC"], f"N = {f['N1']}")):  # fmt: skip
                if len(pts) > 1:
                    x, y = zip(*pts, strict=True)
                    ax.loglog(x, y, "o-", label=f"{name} ({fixed}): slope "
                              f"{f['slope_' + key]:.2f}")  # fmt: skip
                ax.set_xlabel(key)
                ax.set_ylabel(f"warm run time of {rows[0]['genes']} genes (s)")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
