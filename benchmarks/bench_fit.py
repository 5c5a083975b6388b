"""Benchmark: batched CTMM fits (CTP and OP; ML, REML or HE; optionally jackknife).

Checks the fit on a few genes against the dense NumPy likelihood before timing. Then fits all
genes twice: the first call compiles every batch shape and runs (end to end, what a user
waits for), the second runs warm; compile time is the difference. Results come back to the
host as NumPy arrays, so every timing includes finishing the device work.

    python benchmarks/bench_fit.py --genes 10000 --donors 100 --celltypes 4 --json out.json
    python benchmarks/bench_fit.py --shape ctp --pcs 6 --batches 20   # with covariates
    python benchmarks/bench_fit.py --shape ctp --missing 0.2          # 20% missing pairs
    python benchmarks/bench_fit.py --platform gpu                     # on the GPU
    python benchmarks/bench_fit.py --method he --jackknife --float32  # float32 vs float64
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python benchmarks/bench_fit.py --devices 2                    # 1 vs 2 devices

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


def bench(data, model, method, chunk, jackknife, covars, devices=None, precision="float64"):
    """First call (compiles every batch shape, then runs) and a second, warm call; compile time
    is their difference. Peak memory is the process's maximum resident set so far."""
    G, N, C = data.shape
    kw = dict(chunk_size=chunk, jackknife=jackknife, devices=devices, precision=precision,
              **covars)  # fmt: skip
    t0 = time.perf_counter()
    cj.fit(data, model, method, noise="plugin", **kw)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = cj.fit(data, model, method, noise="plugin", **kw)
    run_s = time.perf_counter() - t0
    t = res.table
    return dict(
        table=t, device=res.batching["device_kind"], devices=res.batching["n_devices"],
        precision=precision,
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


METHODS = ("ml", "reml", "he")


def precision_differences(t64, t32) -> dict:
    """Max abs differences (over genes ok in both) of the variance estimates and p values,
    and the share of genes whose status differs."""
    both = (t64.status == "ok") & (t32.status == "ok")
    est = [c for c in t64.columns if c == "hom2" or c.startswith("V_")]
    ps = [c for c in t64.columns if c.startswith("p_")]

    def gap(cols):
        a, b = t64.loc[both, cols].to_numpy(float), t32.loc[both, cols].to_numpy(float)
        return float(np.nanmax(np.abs(a - b))) if cols and both.any() else float("nan")

    return dict(max_abs_estimate=gap(est), max_abs_p=gap(ps),
                status_differs=float((t64.status != t32.status).mean()))  # fmt: skip


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
    p.add_argument("--platform", choices=("cpu", "gpu"), help="JAX platform (default: JAX's)")
    p.add_argument(
        "--devices", type=int, default=0, help="also fit on this many devices (speed-up vs one)"
    )
    p.add_argument(
        "--float32",
        action="store_true",
        help="also fit in float32: time and max abs difference of estimates and p values",
    )
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.platform:
        jax.config.update("jax_platforms", a.platform)

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
        args = (data, a.model, a.method, a.chunk, a.jackknife, covars)
        rows.append(base := bench(*args))
        if a.devices > 1:
            rows.append(bench(*args, devices=a.devices))
            rows[-1]["speedup"] = round(base["run_s"] / rows[-1]["run_s"], 2)
        if a.float32:
            cj.api.FLOAT32_METHODS = METHODS  # measure what fit refuses too (README)
            rows.append(bench(*args, precision="float32"))
            rows[-1].update(precision_differences(base["table"], rows[-1]["table"]))
    keys = ["shape", "model", "method", "jackknife", "genes", "donors", "celltypes",
            "covariates", "missing", "device", "devices", "precision",
            "end_to_end_s", "compile_s", "run_s", "genes_per_s", "converged", "boundary",
            "mean_iter", "peak_rss_gb", "speedup", "max_abs_estimate", "max_abs_p"]  # fmt: skip
    keys = [k for k in keys if any(k in r for r in rows)]
    for r in rows:
        del r["table"]
    print(" | ".join(f"{k:>10}" for k in keys))
    for r in rows:
        cells = (r.get(k, "") for k in keys)
        print(" | ".join(f"{v:>10.4g}" if isinstance(v, float) else f"{v!s:>10}" for v in cells))
    write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    main()
