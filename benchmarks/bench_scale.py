"""Benchmark: cost against the number of donors N and cell types C, extrapolated to a genome.

Each (N, C) runs in a fresh process (peak RSS is that process's; the persistent compilation
cache is off, so compile times are real) on `--genes` simulated CTP genes:
- free REML with its null hom fit (score test, LRT and Wald of V: one `cj.fit` call),
- HE with the block jackknife (`jackknife=--blocks`), and the leave-one-out jackknife where
  N <= --loo-max.
Each is called twice: the first call compiles and runs (end to end), the second runs warm;
compile = first - second. 20,000 genes are extrapolated as compile + 20000 / G * run. The
log-log slope of warm run time is fitted against N for each C and against C for each N,
printed with the README's markdown table and, with --plot, drawn (2 x 2: free REML and HE,
against N and against C). --replot JSON redraws an earlier run without fitting.

    python benchmarks/bench_scale.py --json scale.json --plot scale.png
    python benchmarks/bench_scale.py --donors 1000 --celltypes 4 8 14 --genes 2000
    python benchmarks/bench_scale.py --replot scale.json --plot benchmarks/scale.png
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
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per (N, C) process")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--replot", metavar="JSON", help="summarise a JSON of an earlier run; no fits")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            rows = json.load(fh)["rows"]
        summarise(rows, args)
        return rows
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
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      timeout=args.timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                print(f"N={N} C={C} ran past --timeout {args.timeout} s", file=sys.stderr)
                continue
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


def lines(rows: list[dict], name: str, along: str, across: str) -> dict[int, tuple]:
    """{value of `across`: (values of `along`, warm run times, log-log slope)}, e.g. run time
    against N for each C (along="N", across="C"); lines of one point get no slope."""
    out = {}
    for value in sorted({r[across] for r in rows}):
        pts = sorted((r[along], r[name]["run"]) for r in rows if r[across] == value and name in r)
        x, y = (list(v) for v in zip(*pts, strict=True)) if pts else ([], [])
        out[value] = (x, y, slope(x, y) if len(x) > 1 else None)
    return out


def markdown(rows: list[dict], blocks: int) -> str:
    """The README's table: free REML compile and run, and each fit extrapolated to 20,000 genes."""
    head = (f"| N | C | free REML: compile | run ({rows[0]['genes']:,} genes) | 20,000 genes "
            f"| HE + block jackknife ({blocks}): 20,000 genes | peak RSS |")  # fmt: skip
    out = [head, "|" + "---|" * 7]
    for r in sorted(rows, key=lambda r: (r["N"], r["C"])):
        f, h = r["free_reml"], r[f"he_jk{blocks}"]
        out.append(f"| {r['N']} | {r['C']} | {f['compile']:.1f} s | {f['run']:.1f} s | "
                   f"{f['genome'] / 60:.1f} min | {h['genome'] / 60:.1f} min | "
                   f"{r['peak_rss_gb']:.1f} GB |")  # fmt: skip
    return "\n".join(out)


def summarise(rows: list[dict], args) -> None:
    """Slopes of warm run time against N (one per C) and against C (one per N), the markdown
    table, and with --json / --plot the JSON and a 2 x 2 log-log plot (fit x axis)."""
    if not rows:
        return
    names = ("free_reml", f"he_jk{args.blocks}")
    fits = {
        name: {f"vs_{a}": {str(k): dict(x=x, run=y, slope=b)
                           for k, (x, y, b) in lines(rows, name, a, c).items()}
               for a, c in (("N", "C"), ("C", "N"))}
        for name in names
    }  # fmt: skip
    for name, f in fits.items():
        for axis, per in f.items():
            fixed = "C" if axis == "vs_N" else "N"
            text = ", ".join(f"{fixed} = {k}: {v['slope']:.2f}" for k, v in per.items()
                             if v["slope"] is not None)  # fmt: skip
            print(f"{name}: slope of run time {axis.replace('_', ' ')} ({text})")
    print(markdown(rows, args.blocks))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, slopes=fits), fh, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        titles = {names[0]: "free REML (free + hom null fits, tests)",
                  names[1]: f"HE + block jackknife ({args.blocks} groups)"}  # fmt: skip
        fig, axes = plt.subplots(2, 2, figsize=(9, 7), squeeze=False)
        for i, name in enumerate(names):
            for j, (axis, guide) in enumerate((("vs_N", 1), ("vs_C", 2))):
                ax, fixed = axes[i, j], "C" if axis == "vs_N" else "N"
                for k, v in fits[name][axis].items():
                    if v["slope"] is not None:
                        ax.loglog(v["x"], v["run"], "o-",
                                  label=f"{fixed} = {k}: slope {v['slope']:.2f}")  # fmt: skip
                x, y = max(((v["x"], v["run"]) for v in fits[name][axis].values()),
                           key=lambda p: p[1][-1])  # fmt: skip
                ref = y[-1] * (np.asarray(x, float) / x[-1]) ** guide
                ax.loglog(x, ref, "k:", label=f"slope {guide}")
                ax.set_xticks(x, [str(v) for v in x])
                ax.minorticks_off()
                ax.set_xlabel(axis[-1])
                ax.set_ylabel(f"warm run, {rows[0]['genes']:,} genes (s)")
                ax.set_title(titles[name], fontsize=9)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
