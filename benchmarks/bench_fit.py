"""Benchmark: batched CTMM fits (CTP and OP; ML, REML or HE; optionally jackknife).

Checks the fit on a few genes against the dense NumPy likelihood before timing. Then fits all
genes twice: the first call compiles every batch shape and runs (end to end, what a user
waits for), the second runs warm; compile time is the difference. Results come back to the
host as NumPy arrays, so every timing includes finishing the device work.

    python benchmarks/bench_fit.py --genes 10000 --donors 100 --celltypes 4 --json out.json
    python benchmarks/bench_fit.py --shape ctp --pcs 6 --batches 20   # with covariates
    python benchmarks/bench_fit.py --shape ctp --missing 0.2          # 20% missing pairs

Typical printout (2-core CPU, float64): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from common import write_json  # noqa: E402

import ctmm_jax as cj  # noqa: E402
from ctmm_jax import models  # noqa: E402


def check_correctness(data, model, method, covars):
    """Before timing: the fitted log-likelihood of the first genes equals the dense reference
    (ML/REML) on the observed values, with the covariates; HE equals the dense least squares."""
    import reference

    sub = data.select_genes(slice(3))
    res = cj.fit(sub, model, method, noise="plugin", **covars)
    N, C = data.shape[1:]
    ctp = isinstance(data, cj.CTPData)
    lift = (lambda A: np.kron(A, np.ones((C, 1)))) if ctp else (lambda A: A)  # noqa: E731
    F = [np.atleast_2d(v.T).T for _, v in sorted(covars.get("fixed_covars", {}).items())]
    R = [v for _, v in sorted(covars.get("random_covars", {}).items())]
    for g in range(3):
        vc = models.unpack(jnp.asarray(res.phi[g, : models.n_var(model, C)]), model, C)
        y, X, Sigma = reference.dense(sub, g, float(vc.hom2), np.asarray(vc.V))
        X = np.hstack([X] + [lift(f) for f in F])
        Ks = [lift(r) @ lift(r).T for r in R]
        o = sub.mask[g].ravel() if getattr(sub, "mask", None) is not None else y == y
        if method == "he":
            D = np.diag(sub.ctnu[g].ravel() if ctp else sub.nu[g])[np.ix_(o, o)]
            Xo = X[o]
            M = np.eye(len(Xo)) - Xo @ np.linalg.solve(Xo.T @ Xo, Xo.T)
            t = (M @ np.outer(y[o], y[o]) @ M - M @ D @ M).ravel()
            kern = reference.kernels(sub, model) + Ks
            Q = np.stack([(M @ K[np.ix_(o, o)] @ M).ravel() for K in kern], axis=1)
            assert np.allclose(res.phi[g], np.linalg.lstsq(Q, t, rcond=None)[0], rtol=1e-8)
            continue
        r2 = res.phi[g, models.n_var(model, C) :]
        Sigma = Sigma + sum((v * K for v, K in zip(r2, Ks, strict=True)), np.zeros_like(Sigma))
        ll = (reference.ml_loglik if method == "ml" else reference.reml_loglik)(
            y[o], X[o], Sigma[np.ix_(o, o)]
        )
        assert abs(ll - res.loglik[g]) < 1e-6 * max(1.0, abs(ll)), (ll, res.loglik[g])


def bench(data, model, method, chunk, jackknife, covars):
    """First call (compiles every batch shape, then runs) and a second, warm call; compile time
    is their difference. Peak memory is the process's maximum resident set so far."""
    G, N, C = data.shape
    kw = dict(chunk_size=chunk, jackknife=jackknife, **covars)
    t0 = time.perf_counter()
    cj.fit(data, model, method, noise="plugin", **kw)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = cj.fit(data, model, method, noise="plugin", **kw)
    run_s = time.perf_counter() - t0
    t = res.table
    return dict(
        shape="CTP" if isinstance(data, cj.CTPData) else "OP", model=model, method=method,
        jackknife=jackknife, genes=G, donors=N, celltypes=C, chunk=min(chunk, G),
        covariates=",".join(f"{k}:{v.shape[1]}" for c in covars.values() for k, v in c.items()),
        missing=float(1 - data.mask.mean()) if getattr(data, "mask", None) is not None else 0.0,
        end_to_end_s=round(first_s, 3), compile_s=round(first_s - run_s, 3),
        run_s=round(run_s, 3), genes_per_s=round(G / run_s, 1),
        converged=float(t.converged.mean()),
        boundary=float(t.status.str.contains("boundary").mean()),
        mean_iter=float(t.n_iter.mean()), max_iter=int(t.n_iter.max()),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    )  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--genes", type=int, default=10_000)
    p.add_argument("--donors", type=int, default=100)
    p.add_argument("--celltypes", type=int, default=4)
    p.add_argument("--model", default="free", choices=models.MODELS)
    p.add_argument("--method", default="reml", choices=("ml", "reml", "he"))
    p.add_argument("--jackknife", action="store_true", help="leave-one-donor-out refits too")
    p.add_argument("--shape", default="both", choices=("ctp", "op", "both"))
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pcs", type=int, default=0, help="fixed covariate 'pca' with this many columns"
    )
    p.add_argument(
        "--batches", type=int, default=0, help="random one-hot 'batch' with this many levels"
    )
    p.add_argument("--missing", type=float, default=0.0, help="fraction of CTP pairs missing")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)

    C = a.celltypes
    V = np.zeros((a.genes, C, C))
    V[: a.genes // 2] = np.diag(np.linspace(0.2, 0.0, C))  # half the genes with V != 0
    rng = np.random.default_rng(a.seed + 1)
    covars = {}
    if a.pcs:
        covars["fixed_covars"] = {"pca": rng.normal(size=(a.donors, a.pcs))}
    if a.batches:
        batch = np.eye(a.batches)[np.arange(a.donors) % a.batches]
        covars["random_covars"] = {"batch": batch}
    ctp = cj.simulate(a.genes, a.donors, C, hom2=0.2, V=V, ctnu=0.2, seed=a.seed,
                      random_covars=covars.get("random_covars"), r2={"batch": 0.1})  # fmt: skip
    if a.missing:
        mask = rng.random(ctp.shape) >= a.missing
        ctp = cj.CTPData.from_arrays(ctp.Y, ctp.ctnu, ctp.P, mask=mask)
    datasets = {"ctp": [ctp], "op": [cj.OPData.from_ctp(ctp)]}
    datasets["both"] = datasets["ctp"] + datasets["op"]
    rows = []
    for data in datasets[a.shape]:
        check_correctness(data, a.model, a.method, covars)
        rows.append(bench(data, a.model, a.method, a.chunk, a.jackknife, covars))
    keys = ["shape", "model", "method", "jackknife", "genes", "donors", "celltypes",
            "covariates", "missing",
            "end_to_end_s", "compile_s", "run_s", "genes_per_s", "converged", "boundary",
            "mean_iter", "peak_rss_gb"]  # fmt: skip
    print(" | ".join(f"{k:>10}" for k in keys))
    for r in rows:
        print(
            " | ".join(f"{r[k]:>10.4g}" if isinstance(r[k], float) else f"{r[k]:>10}" for k in keys)
        )
    write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    main()
