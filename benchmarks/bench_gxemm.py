"""Benchmark: GxEMM fits (ctmm_jax.gxemm) on the original GxEMM README simulation.

Cases (--case, default all):
  readme     REML hom, iid and free (noise hom) for one trait, dense K (N = --n); the last row
             sums the three (target: <= 20 s end to end together at N = 1000, 2-core CPU)
  traits     REML hom, iid and free for --traits traits sharing K (simulate(n_traits=...))
  eigen      REML hom/hom for --traits traits in K's eigenbasis (the default for that model,
             O(N p^2) per trait and iteration after one eigendecomposition of K) and on the
             dense path (eigen=False, O(N^3) per iteration) for min(--traits, --dense-traits)
  he         HE (free genetics, hom noise) for --he-traits traits (target: <= 60 s for 10,000)
  genotypes  REML free for one trait from the genotypes S (K never formed) and from dense K

path: how REML ran (GxEMMResult.structure, the JSON's `structure`): K dense (Cholesky of the
N x N Sigma), eig in K's eigenbasis (gtype = etype = hom only), S low rank (genotypes,
Woodbury); for HE the design's; "-" for a sum of rows.
Simulation: N individuals, --snps SNPs with allele frequency 0.1, two environments, genetic
variances 0.1 and 0.4 (environment-specific only), noise 1, means Z @ (0.1, -0.5), X = Z[:, 1:].
Every fit starts from empty JAX caches (jax.clear_caches, so no row reuses another's compiled
code) and is called 1 + --repeat (default 1) times: the first call compiles and runs (end to
end, what a user waits for), the others run warm; run_s is the fastest warm call, second_s the
first of them (on a loaded CPU it can be slower) and compile_s = end_to_end_s - run_s. Results
come back to the host as NumPy arrays, so every timing includes finishing the device work.
Each timed result is then checked on its first trait (nothing is printed if a check fails):
REML against the dense NumPy REML log-likelihood at the estimate (tests/reference.py), HE
against the dense least squares on the lower triangle. conv is the share of traits converged,
iter the mean number of iterations (0 for HE).

    python benchmarks/bench_gxemm.py --json gxemm.json        # all cases, full size
    python benchmarks/bench_gxemm.py --case readme            # --case he, traits, genotypes

Small-size printout, to show the format (2-core CPU shared with other work, float64, jax 0.10.2,
2026-12-02; `python benchmarks/bench_gxemm.py --n 200 --traits 5 --he-traits 200`):

     case        gtype method path traits   N e2e_s compile 2nd_s run_s traits/s conv  iter rss_gb
   readme          hom   reml  eig      1 200  2.62   2.608 0.013 0.013     79.2    1     3  0.485
   readme          iid   reml    K      1 200 2.663   2.608 0.055 0.055     18.2    1     4  0.533
   readme         free   reml    K      1 200 2.711   2.637 0.074 0.074     13.5    1     4  0.555
   readme hom+iid+free   reml    -      1 200 7.994   7.853 0.142 0.142        7    1 3.667  0.555
   traits          hom   reml  eig      5 200 2.455   2.431 0.024 0.024    205.4    1   2.8  0.613
   traits          iid   reml    K      5 200 3.105   2.869 0.236 0.236     21.2    1     5  0.652
   traits         free   reml    K      5 200 3.278   2.971 0.306 0.306     16.3    1   5.2  0.677
    eigen          hom   reml  eig      5 200 1.114   1.084  0.03  0.03    166.9    1   2.8  0.677
    eigen          hom   reml    K      5 200  2.14   2.033 0.108 0.108     46.3    1   2.8  0.677
       he         free     he    K    200 200 1.268   1.225 0.043 0.043     4637    1     0  0.677
genotypes         free   reml    S      1 200 5.813   3.592 2.221 2.221      0.5    1     3  0.854
genotypes         free   reml    K      1 200 1.232   1.095 0.137 0.137      7.3    1     4  0.854

The eigen path at full size (benchmarks/README.md):

    python benchmarks/bench_gxemm.py --case eigen --n 1000 --traits 1000 --dense-traits 32 \\
        --repeat 3
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

jax.config.update("jax_enable_x64", True)

from common import write_json  # noqa: E402

from ctmm_jax import gxemm  # noqa: E402

CASES = ("readme", "traits", "eigen", "he", "genotypes")
PATHS = {"dense": "K", "eigen": "eig", "lowrank": "S"}  # GxEMMResult.structure, shortened
README_GTYPES = ("hom", "iid", "free")


def simulate(n, n_snps, seed, n_traits=None):
    """The original README example: 2 environments, genetic variances 0.1 and 0.4."""
    return gxemm.simulate(
        n=n, n_snps=n_snps, maf=0.1, sig2g=(0.1, 0.4), sig2e=1.0, mean=(0.1, -0.5),
        n_traits=n_traits, seed=seed,
    )  # fmt: skip


def kernels(K, Z, gtype, etype):
    """Dense kernels in sig2s order, written out (genetic, then noise with I last)."""
    N, K0 = Z.shape
    genetic = {"hom": [K], "iid": [K, K * (Z @ Z.T)]}
    genetic["free"] = [K] + [K * np.outer(Z[:, k], Z[:, k]) for k in range(K0)]
    noise = [np.diag(Z[:, k] ** 2) for k in range(K0 - 1)] if etype == "free" else []
    return genetic[gtype] + noise + [np.eye(N)]


def check(out, sim, gtype, etype, method):
    """First trait of a timed result against the dense NumPy computation."""
    import reference

    y = sim.y if sim.y.ndim == 1 else sim.y[0]
    res = out.trait(0)  # a dict of the first trait (or of the only one)
    Ks = kernels(sim.K, sim.Z, gtype, etype)
    X = np.hstack([np.ones((len(y), 1)), sim.X])
    if method == "he":
        M = np.eye(len(y)) - X @ np.linalg.solve(X.T @ X, X.T)
        r = M @ y
        r = r / r.std(ddof=1)
        rows, cols = np.tril_indices(len(y))
        half = np.where(rows == cols, 0.5, 1.0)  # the original's lowtri: diagonal halved
        t = half * np.outer(r, r)[rows, cols]
        Q = np.stack([half * (M @ Kk @ M)[rows, cols] for Kk in Ks], axis=1)
        ref = np.linalg.lstsq(Q, t, rcond=None)[0]
        assert np.allclose(res["sig2s"], ref, rtol=1e-6, atol=1e-8), (res["sig2s"], ref)
        return
    ys = (y - y.mean()) / y.std(ddof=1)  # REML fits the standardised trait
    Sigma = sum(s * Kk for s, Kk in zip(res["sig2s"], Ks, strict=True))
    ll = reference.reml_loglik(ys, X, Sigma)
    assert abs(ll - res["ll"]) < 1e-6 * max(1.0, abs(ll)), (ll, res["ll"])


def bench(case, sim, gtype, etype="hom", method="reml", path="K", chunk=None, repeat=1,
          eigen=None):  # fmt: skip
    """First call from empty caches (compiles, then runs), then `repeat` warm calls. path "K"
    (kinship) or "S" (genotypes); eigen as gxemm.fit's."""
    K, S = (sim.K, None) if path == "K" else (None, sim.S)
    kw = dict(gtype=gtype, etype=etype, method=method, S=S, chunk_size=chunk, eigen=eigen)
    jax.clear_caches()
    times = []
    for _ in range(1 + repeat):
        t0 = time.perf_counter()
        out = gxemm.fit(sim.y, sim.X, K, sim.Z, **kw)
        times.append(time.perf_counter() - t0)
    first_s, run_s = times[0], min(times[1:])
    check(out, sim, gtype, etype, method)
    T = 1 if sim.y.ndim == 1 else sim.y.shape[0]
    return dict(
        case=case, gtype=gtype, etype=etype, method=method, path=PATHS[out.structure],
        structure=out.structure, traits=T,
        n=sim.Z.shape[0], snps=sim.S.shape[1],
        end_to_end_s=round(first_s, 3), compile_s=round(first_s - run_s, 3),
        second_s=round(times[1], 3), run_s=round(run_s, 3), traits_per_s=round(T / run_s, 1),
        converged=float(np.mean(out.converged)),
        mean_iter=float(np.mean(out.n_iter)), max_iter=int(np.max(out.n_iter)),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    )  # fmt: skip


def together(rows, case):
    """The sum of the rows of one case (the README's three fits, as a user runs them)."""
    mine = [r for r in rows if r["case"] == case]
    total = dict(mine[-1], gtype="+".join(r["gtype"] for r in mine),
                 path="-", structure="-")  # fmt: skip
    for k in ("end_to_end_s", "compile_s", "second_s", "run_s"):
        total[k] = round(sum(r[k] for r in mine), 3)
    total["traits_per_s"] = round(total["traits"] / total["run_s"], 1)
    total["converged"] = float(np.mean([r["converged"] for r in mine]))
    total["mean_iter"] = float(np.mean([r["mean_iter"] for r in mine]))
    total["max_iter"] = max(r["max_iter"] for r in mine)
    return total


COLUMNS = dict(case="case", gtype="gtype", method="method", path="path", traits="traits", n="N",
               end_to_end_s="e2e_s", compile_s="compile", second_s="2nd_s", run_s="run_s",
               traits_per_s="traits/s", converged="conv", mean_iter="iter",
               peak_rss_gb="rss_gb")  # fmt: skip


def fmt(v) -> str:
    """4 significant digits; large rates as integers."""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table(rows) -> str:
    """Right-aligned columns, each as wide as its widest entry."""
    cells = [list(COLUMNS.values())]
    cells += [[fmt(r[k]) for k in COLUMNS] for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(COLUMNS))]
    return "\n".join(
        " ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", default="all", choices=CASES + ("all",))
    p.add_argument("--n", type=int, default=1000, help="individuals")
    p.add_argument("--snps", type=int, default=100)
    p.add_argument("--traits", type=int, default=100, help="traits of the 'traits' case")
    p.add_argument("--he-traits", type=int, default=10_000, help="traits of the 'he' case")
    p.add_argument("--dense-traits", type=int, default=32,
                   help="traits of the 'eigen' case's dense row (at most --traits)")  # fmt: skip
    p.add_argument("--chunk", type=int, default=None, help="traits per batch (library default)")
    p.add_argument("--repeat", type=int, default=1, help="warm calls per fit (run_s: fastest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1 (run_s is the fastest warm call).")

    cases = CASES if a.case == "all" else (a.case,)
    rows = []
    if "readme" in cases:
        sim = simulate(a.n, a.snps, a.seed)
        rows += [bench("readme", sim, g, chunk=a.chunk, repeat=a.repeat) for g in README_GTYPES]
        rows.append(together(rows, "readme"))
    if "traits" in cases:
        sim = simulate(a.n, a.snps, a.seed, n_traits=a.traits)
        rows += [bench("traits", sim, g, chunk=a.chunk, repeat=a.repeat) for g in README_GTYPES]
    if "eigen" in cases:
        sim = simulate(a.n, a.snps, a.seed, n_traits=a.traits)
        rows.append(bench("eigen", sim, "hom", chunk=a.chunk, repeat=a.repeat, eigen=True))
        if a.dense_traits > 0:
            few = sim._replace(y=sim.y[: a.dense_traits])
            rows.append(bench("eigen", few, "hom", chunk=a.chunk, repeat=a.repeat, eigen=False))
    if "he" in cases:
        sim = simulate(a.n, a.snps, a.seed, n_traits=a.he_traits)
        rows.append(bench("he", sim, "free", method="he", chunk=a.chunk, repeat=a.repeat))
    if "genotypes" in cases:
        sim = simulate(a.n, a.snps, a.seed)
        rows += [
            bench("genotypes", sim, "free", path=path, chunk=a.chunk, repeat=a.repeat)
            for path in "SK"
        ]
    print(table(rows))
    write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    main()
