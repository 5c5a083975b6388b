"""Benchmark: the scalable jackknives against the leave-one-out jackknife.

Null genes (V = 0, data drawn from the model with known noise) fitted with the full
leave-one-donor-out jackknife (`jackknife=True`), the delete-m block jackknife
(`jackknife=k`) and the donor-clustered sandwich (`robust=True`, ML/REML only). For each:
the run time, the median ratio of its standard errors of hom2 and V to the leave-one-out ones,
and the rejection rate of its Wald test of V (`p_V_*`) at 0.05 and 0.01 (NaN p values, from
fits that are not ok, left out; their share is reported).

    python benchmarks/bench_jackknife.py --genes 1000 --donors 100 --json jk.json
    python benchmarks/bench_jackknife.py --method he --blocks 10 20 50

Typical printout (2-core CPU): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from common import write_json  # noqa: E402

import ctmm_jax as cj  # noqa: E402


def _run(data, method, option: dict):
    cj.fit(data.select_genes(slice(2)), "free", method, noise="plugin", **option)  # compile
    start = time.perf_counter()
    res = cj.fit(data, "free", method, noise="plugin", **option)
    return res.table, time.perf_counter() - start


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--donors", type=int, default=100)
    ap.add_argument("--celltypes", type=int, default=4)
    ap.add_argument("--method", choices=("reml", "ml", "he"), default="reml")
    ap.add_argument("--blocks", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    C = args.celltypes
    data = cj.simulate(args.genes, args.donors, C, hom2=0.25, V=0.0, ctnu=0.2, seed=args.seed)
    options = {"loo": dict(jackknife=True)}
    options.update({f"block{k}": dict(jackknife=k) for k in args.blocks})
    if args.method != "he":
        options["sandwich"] = dict(robust=True)
    tables, rows = {}, []
    for name, option in options.items():
        tables[name], seconds = _run(data, args.method, option)
        suffix = "_sw" if name == "sandwich" else "_jk"
        t = tables[name]
        se_cols = ["se_hom2"] + [f"se_V_{c}" for c in data.celltypes]
        ref = tables["loo"][[c + "_jk" for c in se_cols]].to_numpy()
        ratio = t[[c + suffix for c in se_cols]].to_numpy() / ref
        p = t[f"p_V{suffix}"].to_numpy()
        ok = np.isfinite(p)
        rows.append(dict(
            option=name, method=args.method, genes=args.genes, donors=args.donors, celltypes=C,
            seconds=round(seconds, 2), se_ratio_hom2=float(np.nanmedian(ratio[:, 0])),
            se_ratio_V=float(np.nanmedian(ratio[:, 1:])), nan_share=float(1 - ok.mean()),
            reject_05=float((p[ok] < 0.05).mean()), reject_01=float((p[ok] < 0.01).mean()),
        ))  # fmt: skip
    print(f"free {args.method}, {args.genes} null genes, N = {args.donors}, C = {C}")
    print(f"{'option':10s} {'s':>7s} {'se/se_loo hom2':>15s} {'V':>6s} {'p NaN':>6s} "
          f"{'<0.05':>6s} {'<0.01':>6s}")  # fmt: skip
    for r in rows:
        print(f"{r['option']:10s} {r['seconds']:7.2f} {r['se_ratio_hom2']:15.3f} "
              f"{r['se_ratio_V']:6.3f} {r['nan_share']:6.3f} {r['reject_05']:6.3f} "
              f"{r['reject_01']:6.3f}")  # fmt: skip
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
