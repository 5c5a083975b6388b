"""Benchmark: calibration of GxEMM's GxSex tests on real data (OneK1K CD14+ monocytes, 94
donors, chr22 kinship; ../shared/realdata/onek1k_cd14, not part of the project).

Traits: log1p(CPM) of --genes genes (a count in >= 90% of donors; a seeded random subset),
K = gxemm.grm(chr22, MAF >= 0.01), Z = sex (one-hot), X = age, PC1-PC3 (unscaled) and sex.
Each configuration fits gtype free and gtype hom with the same noise model and reports, for
the GxSex tests (LRT free vs hom, with the chi-bar-square null under nonneg; MVWald of the two
sex-specific genetic components), the genomic inflation lambda, the share of p < 0.05, and the
share of traits converged in both fits. Scenarios (--scenarios):
  real       the real sex labels
  permuted   sex permuted across donors (real expression and kinship, no GxSex): the null
  sim-null   simulated traits on the real K and Z: h2 = 0.3 shared by the sexes, no GxE, noise
             variance 1 for one sex and 2 for the other (environment-specific noise, no GxE)
  sim-gxe    as sim-null plus a genetic variance of 1.0 on K o z z^T for one sex (power)
Noise models: etype hom and free, each unconstrained and with nonneg=True.

    python benchmarks/bench_gxemm_onek1k.py --genes 500 --json gxemm_onek1k.json

Result on this 2-core machine (2026-12-02, 500 genes / 500 simulated traits): see the README
section "GxEMM on real data".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from common import write_json  # noqa: E402

from ctmm_jax import gxemm  # noqa: E402
from ctmm_jax.inference import genomic_inflation  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "onek1k_cd14"


def load(n_genes: int, seed: int):
    """(y (T, N) log1p CPM, K, sex (N,) 0/1, X (N, 4) age and PCs) with donors in K's order."""
    expr = pd.read_csv(DATA / "n94_CD14_positive_monocyte.bed.gz", sep="\t")
    counts = expr.set_index("phenotype_id").iloc[:, 3:]
    donors = pd.read_csv(DATA / "donor_features.n94.tsv", sep="\t", dtype={"iid": str})
    donors = donors.set_index("iid")
    grm = gxemm.grm(DATA / "chr22.n94", ids=list(counts.columns))
    donors = donors.loc[list(grm.ids)]
    expressed = counts[(counts > 0).mean(1) >= 0.9]
    y = np.log1p(expressed / counts.sum(0) * 1e6).to_numpy()
    rng = np.random.default_rng(seed)
    y = y[rng.choice(len(y), min(n_genes, len(y)), replace=False)]
    X = donors[["age", "PC1", "PC2", "PC3"]].to_numpy(float)
    return y, grm.K, donors["sex"].to_numpy(int), X


def simulate(K, sex, n_traits: int, gxe: float, seed: int) -> np.ndarray:
    """Traits with h2 = 0.3 shared genetics, noise variance 1 / 2 by sex, and a genetic
    variance `gxe` on K o z z^T for sex 1."""
    rng = np.random.default_rng(seed)
    N = len(sex)
    z = (sex == 1).astype(float)
    cov = 0.3 * K + gxe * K * np.outer(z, z) + np.diag(np.where(sex == 1, 2.0, 1.0))
    L = np.linalg.cholesky(cov + 1e-10 * np.eye(N))
    return (L @ rng.normal(size=(N, n_traits))).T


def gxsex_tests(y, K, sex, X, etype: str, nonneg: bool) -> dict:
    Z = np.stack([sex == 0, sex == 1], 1).astype(float)
    Xz = np.hstack([X, Z[:, 1:]])
    t0 = time.perf_counter()
    free = gxemm.fit(y, Xz, K, Z, gtype="free", etype=etype, nonneg=nonneg)
    hom = gxemm.fit(y, Xz, K, Z, gtype="hom", etype=etype, nonneg=nonneg)
    seconds = time.perf_counter() - t0
    ok = free.converged & hom.converged
    lrt = np.where(ok, gxemm.lrt(free.ll, hom.ll, 2, boundary=nonneg), np.nan)
    wald = np.array([
        gxemm.mvwald_test(free.sig2s[t, 1:3], free.sig2Var[t, 1:3, 1:3])
        if free.converged[t] else np.nan for t in range(len(y))
    ])  # fmt: skip
    row = dict(etype=etype, nonneg=nonneg, traits=len(y), converged=float(ok.mean()),
               seconds=round(seconds, 1))  # fmt: skip
    for name, p in (("lrt", lrt), ("mvwald", wald)):
        p = p[~np.isnan(p)]
        row[f"lambda_{name}"] = genomic_inflation(p) if len(p) else np.nan
        row[f"p05_{name}"] = float(np.mean(p < 0.05)) if len(p) else np.nan
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--scenarios", nargs="+",
                    default=["real", "permuted", "sim-null", "sim-gxe"])  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/realdata/onek1k_cd14.")
    y, K, sex, X = load(args.genes, args.seed)
    perm = np.random.default_rng(args.seed + 1).permutation(sex)
    traits = {
        "real": (y, sex),
        "permuted": (y, perm),
        "sim-null": (simulate(K, sex, args.genes, 0.0, args.seed + 2), sex),
        "sim-gxe": (simulate(K, sex, args.genes, 1.0, args.seed + 3), sex),
    }
    rows = []
    for scenario in args.scenarios:
        ys, labels = traits[scenario]
        for etype in ("hom", "free"):
            for nonneg in (False, True):
                row = dict(scenario=scenario) | gxsex_tests(ys, K, labels, X, etype, nonneg)
                rows.append(row)
                print(pd.DataFrame([row]).round(3).to_string(index=False, header=len(rows) == 1),
                      flush=True)  # fmt: skip
        write_json(args.json, rows)
    print()
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
