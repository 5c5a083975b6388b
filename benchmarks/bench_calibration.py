"""Benchmark: calibration of the tests of V, hom2 and the cell-type means on cell-level
simulations (type I error and power).

Each configuration simulates cells, makes pseudobulk, and fits CTP free REML (with its null
hom fit) once per noise model: "oracle" (the true noise variance of each pseudobulk value,
plug-in), "plugin" (each pair's own ctnu, as the original CTMM), "pooled" (ctmm_jax's
default, noise.py) and "cells" (the exact likelihood of Gaussian cells, s2_c fitted). Each fit
gives three tests of V = 0: `p_V` (score test at the null fit, the default), `p_V_lrt` (LRT)
and `p_V_wald` (the original's Wald F). Null genes have V = 0, power genes
V = diag(a, 0, 0, a / 2) (a shrinks as 1/sqrt(N)); both have hom2 > 0. `--null hom2` and
`--null ct_beta` instead test hom2 = 0 (`p_hom2`) and equal cell-type means (`p_ct_beta`) on
genes made for them (null_and_power).

Generators (neither is the model's own: the noise variances are estimated from cells):
- gauss: Gaussian cells y = beta_c + alpha_i + gamma_ic + e, e ~ N(0, s2_c), s2_c by cell
  type; n_ic ~ 2 + Poisson(n - 2) cells per pair. Simulated through the pair's sufficient
  statistics (mean ~ N(mu, s2_c / n_ic), SS ~ s2_c chi2(n_ic - 1)), which is exact.
- gauss-hetero: as gauss, but the within-pair variance differs between donors
  (s2_ic = s2_c exp(N(0, 0.5^2))): pooling assumes one s2 per gene and cell type.
- counts: negative-binomial UMI counts (size 5), mean L_k / 1e4 exp(mu + alpha_i + gamma_ic)
  with library sizes L_k ~ 3000 LogNormal(0, 0.3), log-normalised (log1p(x / L * 1e4)) and
  aggregated by `ctmm_jax.preprocess.pseudobulk`; equal baselines mu across cell types. The
  oracle noise is the variance of 400 more cells of the same pair over n_ic.
- counts-baseline: as counts with baselines mu + (0, 0.5, 1, 1.5) by cell type: on the log
  scale the donor effect is then no longer shared equally (the hom null is wrong).

    python benchmarks/bench_calibration.py --quick                # about a minute
    python benchmarks/bench_calibration.py --summarise a.json b.json   # tables from JSON
    python benchmarks/bench_calibration.py --generators gauss --donors 100 --cells 10 25

Writes a JSON of every row (--json), and QQ plots of the null p values (--qq PREFIX, PNG). The
commands behind the README's tables are in its "Calibration" section. Typical rows (2 cores):

    gauss N=100 cells=10: type I error at 0.05 of p_V, oracle 0.055, plugin 0.973, pooled 0.060;
    power pooled p_V 0.88, oracle LRT 0.84
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from common import write_json  # noqa: E402

import ctmm_jax as cj  # noqa: E402
from ctmm_jax import preprocess  # noqa: E402

C = 4
S2 = np.array([1.0, 0.5, 2.0, 1.0])  # within-pair variance of each cell type (Gaussian cells)
HOM2 = 0.05
MEANS = np.array([1.0, 0.5, 0.0, -0.5])  # cell-type means of Gaussian cells (--null V, hom2)
TESTS = {"V": ("p_V", "p_V_lrt", "p_V_wald"), "hom2": ("p_hom2",), "ct_beta": ("p_ct_beta",)}
NOISE = ("oracle", "plugin", "pooled", "cells")


def effect_size(N: int, n: float) -> float:
    """V of the power genes' first cell type: about 3 standard errors of V-hat, (s2 / n + 0.05)
    sqrt(2 / N) with s2 the per-cell variance (about 1 on both scales), for 50-90% power."""
    return 4.5 * (1.0 / n + 0.05) / np.sqrt(N)


def pair_cells(rng, N: int, n: float) -> np.ndarray:
    """(N, C) cells per (donor, cell type): 2 + Poisson(n - 2)."""
    return 2 + rng.poisson(max(n - 2.0, 0.0), size=(N, C))


def pair_effects(rng, G: int, N: int, V: np.ndarray, hom2: np.ndarray) -> np.ndarray:
    """(G, N, C) alpha_i + gamma_ic: a donor effect shared by the cell types (variance hom2,
    one per gene) plus V's part."""
    alpha = rng.normal(size=(G, N, 1)) * np.sqrt(hom2)[:, None, None]
    return alpha + rng.normal(size=(G, N, C)) * np.sqrt(V)[:, None, :]


def simulate_gauss(rng, G, N, n, V, hom2, means, hetero: bool):
    """CTPData (with n_cells) and the true ctnu, via each pair's sufficient statistics; `means`
    (G, C) the cell-type means."""
    counts = pair_cells(rng, N, n)
    mu = pair_effects(rng, G, N, V, hom2) + means[:, None, :]
    s2 = np.broadcast_to(S2, (G, N, C))
    if hetero:
        s2 = s2 * np.exp(rng.normal(0.0, 0.5, size=(G, N, C)))
    true = s2 / counts
    Y = mu + rng.normal(size=mu.shape) * np.sqrt(true)
    ss = s2 * rng.chisquare(counts - 1, size=(G, N, C))
    ctnu = ss / (counts * (counts - 1))
    P = counts / counts.sum(1, keepdims=True)
    return cj.CTPData.from_arrays(Y, ctnu, P, n_cells=counts), true


def _log_counts(rng, mean_cp10k, L, size=5.0):
    """log1p(x / L * 1e4) of NB(mean L / 1e4 * mean_cp10k, size) counts x."""
    m = L / 1e4 * mean_cp10k
    x = rng.negative_binomial(size, size / (size + m))
    return np.log1p(x / L * 1e4)


def simulate_counts(rng, G, N, n, V, hom2, shift, baseline: bool):
    """CTPData from pseudobulk of log-normalised NB counts, and the oracle ctnu; `shift` (G, C)
    moves each cell type's log rate."""
    counts = pair_cells(rng, N, n)
    mu = np.log(3.0) + (np.array([0.0, 0.5, 1.0, 1.5]) if baseline else np.zeros(C))
    rate = np.exp(mu + shift[:, None, :] + pair_effects(rng, G, N, V, hom2))  # per 10,000 UMIs
    donor = np.repeat(np.arange(N * C) // C, counts.ravel())
    ct = np.repeat(np.arange(N * C) % C, counts.ravel())
    L = 3000.0 * np.exp(rng.normal(0.0, 0.3, size=len(donor)))
    X = np.stack([_log_counts(rng, rate[g, donor, ct], L) for g in range(G)], axis=1)
    cells = pd.DataFrame({"donor": [f"d{i:05d}" for i in donor], "cell_type": ct.astype(str)})
    pb = preprocess.pseudobulk(X, cells, genes=[f"g{g}" for g in range(G)], ind_cut=0, ct_cut=1)
    M = 400  # the oracle: the variance of M more cells of each pair, over n_ic
    oracle = np.empty((G, N, C))
    for g in range(G):
        Lm = 3000.0 * np.exp(rng.normal(0.0, 0.3, size=(N, C, M)))
        oracle[g] = _log_counts(rng, rate[g][..., None], Lm).var(axis=-1, ddof=1)
    return pb.to_ctp(), oracle / counts


def simulate(generator: str, G: int, N: int, n: float, V: np.ndarray, seed: int,
             hom2: np.ndarray, shift: np.ndarray, equal_means: bool = False):  # fmt: skip
    """Gaussian cells have means MEANS + shift (0 + shift with equal_means), counts log rates
    mu + shift."""
    rng = np.random.default_rng(seed)
    if generator.startswith("gauss"):
        return simulate_gauss(rng, G, N, n, V, hom2, (0.0 if equal_means else MEANS) + shift,
                              hetero=generator == "gauss-hetero")  # fmt: skip
    return simulate_counts(rng, G, N, n, V, hom2, shift, baseline=generator == "counts-baseline")


def null_and_power(null: str, N: int, n: float, n_null: int, n_power: int):
    """Per gene V (G, C), hom2 (G,) and shift of the means (G, C), for the null genes (the
    first n_null) and the power genes of the test of `null`:
    - V: V = 0, and V = diag(a, 0, 0, a / 2) for power (hom2 = 0.05);
    - hom2: hom2 = 0 (V = 0.05 I), and hom2 = a / 3 for power;
    - ct_beta: equal cell-type means (simulate's equal_means; hom2 = 0.05, V = 0), and the
      first cell type's mean moved by b, about 2.5 standard errors of a difference of means."""
    G, a = n_null + n_power, effect_size(N, n)
    V, hom2, shift = np.zeros((G, C)), np.full(G, HOM2), np.zeros((G, C))
    if null == "V":
        V[n_null:] = [a, 0.0, 0.0, a / 2]
    elif null == "hom2":
        V[:], hom2[:n_null], hom2[n_null:] = 0.05, 0.0, a / 3
    else:
        shift[n_null:, 0] = 2.5 * np.sqrt(2 * (1.0 / n + 0.05) / N)
    return V, hom2, shift


def with_oracle_noise(data, true):
    """The CTPData with the true noise variances (plug-in)."""
    observed = np.ones(data.shape, bool) if data.mask is None else data.mask
    return cj.CTPData.from_arrays(data.Y, np.where(observed, true, 1.0), data.P, mask=data.mask)


def run_config(generator, N, n, n_null, n_power, seed, model="free", method="reml", pcs=0,
               shape="ctp", nonneg=False, noises=NOISE, null="V"):  # fmt: skip
    """Type I error (null genes) and power (the others) of each noise model and test of
    `null` (V, hom2 or ct_beta: null_and_power); shape "op" fits the overall pseudobulk of
    the same cells (OPData.from_ctp: nu from ctnu)."""
    V, hom2, shift = null_and_power(null, N, n, n_null, n_power)
    data, true = simulate(
        generator, n_null + n_power, N, n, V, seed, hom2, shift, equal_means=null == "ct_beta"
    )
    fixed = None
    if pcs:
        rng = np.random.default_rng(seed + 1)
        fixed = {"pc": rng.normal(size=(N, pcs))}
    rows, pvals = [], {}
    for noise in noises:
        d = with_oracle_noise(data, true) if noise == "oracle" else data
        if shape == "op":
            d = cj.OPData.from_ctp(d)
        t0 = time.perf_counter()
        res = cj.fit(d, model, method, noise="plugin" if noise == "oracle" else noise,
                     fixed_covars=fixed, nonneg=nonneg)  # fmt: skip
        seconds = time.perf_counter() - t0
        tab = res.table
        zero, alt = tab.iloc[:n_null], tab.iloc[n_null:]
        for test in [t for t in TESTS[null] if t in tab]:  # lowrank: p_V only
            p0, p1 = zero[test].to_numpy(), alt[test].to_numpy()
            pvals[(noise, test)] = p0
            ok0, ok1 = ~np.isnan(p0), ~np.isnan(p1)
            rows.append(dict(
                generator=generator, shape=shape, donors=N, cells=n, model=model,
                method=method, pcs=pcs, nonneg=nonneg, null=null,
                noise=noise, test=test, n_null=int(ok0.sum()), n_power=int(ok1.sum()),
                alpha05=float(np.mean(p0[ok0] < 0.05)), alpha01=float(np.mean(p0[ok0] < 0.01)),
                power05=float(np.mean(p1[ok1] < 0.05)) if ok1.any() else float("nan"),
                V_power=effect_size(N, n), seconds=round(seconds, 2),
            ))  # fmt: skip
    return rows, pvals


def qq_plot(pvals: dict, title: str, path: str) -> None:
    noises = [n for n in NOISE if any(k[0] == n for k in pvals)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(noises), figsize=(4 * len(noises), 4), sharey=True)
    for ax, noise in zip(np.atleast_1d(axes), noises, strict=True):
        for test in [t for tests in TESTS.values() for t in tests if (noise, t) in pvals]:
            p = np.sort(pvals[(noise, test)][~np.isnan(pvals[(noise, test)])])
            e = (np.arange(1, len(p) + 1) - 0.5) / len(p)
            ax.plot(-np.log10(e), -np.log10(np.maximum(p, 1e-300)), ".", ms=3, label=test)
        lim = -np.log10(0.5 / max(len(p), 1))
        ax.plot([0, lim], [0, lim], "k-", lw=0.8)
        ax.set(title=f"{noise}", xlabel="expected -log10 p")
    np.atleast_1d(axes)[0].set_ylabel("observed -log10 p")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generators", nargs="+",
                    default=["gauss", "gauss-hetero", "counts", "counts-baseline"])  # fmt: skip
    ap.add_argument("--donors", type=int, nargs="+", default=[60, 100, 300, 1000])
    ap.add_argument("--cells", type=float, nargs="+", default=[5, 10, 25, 50, 100])
    ap.add_argument("--null-genes", type=int, default=400)
    ap.add_argument("--power-genes", type=int, default=100)
    ap.add_argument(
        "--max-count-cells",
        type=float,
        default=1.2e5,
        help="skip count configurations with more simulated cells per gene",
    )
    ap.add_argument("--shape", default="ctp", choices=("ctp", "op"))
    ap.add_argument(
        "--model",
        default="free",
        help="free (V = 0 against hom) or lowrank (diag(V) beyond the loadings)",
    )
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also free/iid x ML/REML x with/without 4 PCs (gauss, N=100, n=25)",
    )
    ap.add_argument(
        "--nonneg",
        action="store_true",
        help="fit with nonneg=True (variances >= 0; the LRT's chi-bar-square null)",
    )
    ap.add_argument(
        "--noise",
        nargs="+",
        default=list(NOISE),
        choices=NOISE,
        help="noise models to compare (oracle and pooled are in the summary)",
    )
    ap.add_argument("--null", default="V", choices=tuple(TESTS),
                    help="the hypothesis of the null genes: V = 0 (p_V, p_V_lrt, p_V_wald), "
                    "hom2 = 0 (p_hom2) or equal cell-type means (p_ct_beta)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="gauss and counts, N=100, n=10 and 50")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--qq", help="write QQ plots of the null p values to PREFIX_<config>.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.generators, args.donors, args.cells = ["gauss", "counts"], [100], [10, 50]
        args.null_genes, args.power_genes = 200, 50
    configs = [(g, N, n, args.model, "reml", 0) for g in args.generators for N in args.donors
               for n in args.cells
               if not (g.startswith("counts") and N * C * n > args.max_count_cells)]  # fmt: skip
    if args.variants:
        configs += [("gauss", 100, 25, m, meth, pcs) for m in ("free", "iid")
                    for meth in ("ml", "reml") for pcs in (0, 4)]  # fmt: skip
    rows = []
    for k, (gen, N, n, model, method, pcs) in enumerate(configs):
        r, pvals = run_config(gen, N, n, args.null_genes, args.power_genes, args.seed + k,
                              model, method, pcs, args.shape, args.nonneg,
                              tuple(args.noise), args.null)  # fmt: skip
        rows += r
        tab = pd.DataFrame(r).pivot(index="noise", columns="test",
                                    values=["alpha05", "alpha01", "power05"])  # fmt: skip
        print(f"\n{gen} N={N} cells={n:g} {model} {method} pcs={pcs} nonneg={args.nonneg} "
              f"null={args.null}", flush=True)  # fmt: skip
        print(tab.round(3).to_string())
        if args.qq:
            qq_plot(pvals, f"{gen}, N = {N}, {n:g} cells per pair, {model} {method}",
                    f"{args.qq}_{gen}_N{N}_n{n:g}_{model}_{method}_pcs{pcs}.png")  # fmt: skip
        write_json(args.json, rows)
    summary(pd.DataFrame(rows))


def summary(df: pd.DataFrame) -> None:
    """The README table: type I error at 0.05 / 0.01 of p_V (the default test) by noise model,
    the original's Wald test with plug-in noise, and power next to the oracle LRT's (free) or
    the oracle p_V's (lowrank, which has no LRT); the other nulls' tests in tables of their
    own (summary_of_test)."""
    if "null" not in df:  # JSON written before --null
        df = df.assign(null="V")
    for test in df.loc[df.null != "V", "test"].unique():
        summary_of_test(df[df.test == test], test)
    main_rows = df[(df.method == "reml") & (df.pcs == 0) & (df.null == "V")]
    if main_rows.empty:
        return
    if "shape" not in main_rows:  # JSON written before --shape
        main_rows = main_rows.assign(shape="ctp")
    keys = ["generator", "shape", "model", "donors", "cells"]
    out = []
    for (gen, shape, model, N, n), g in main_rows.groupby(keys, sort=False):
        cell = g.set_index(["noise", "test"])
        rate = lambda r: f"{r.alpha05:.3f}/{r.alpha01:.3f}"  # noqa: E731
        row = {"generator": gen, "shape": shape, "model": model, "N": N, "cells": f"{n:g}"}
        row.update({f"{noise} p_V": rate(cell.loc[(noise, "p_V")]) for noise in NOISE
                    if (noise, "p_V") in cell.index})  # fmt: skip
        oracle = "p_V_lrt" if ("oracle", "p_V_lrt") in cell.index else "p_V"
        if ("plugin", "p_V_wald") in cell.index:
            row["plugin p_V_wald"] = rate(cell.loc[("plugin", "p_V_wald")])
        power = cell.loc[("pooled", "p_V")].power05, cell.loc[("oracle", oracle)].power05
        row[f"power pooled p_V / oracle {oracle}"] = "{:.2f}/{:.2f}".format(*power)
        if ("cells", "p_V") in cell.index:
            row["power cells p_V"] = f"{cell.loc[('cells', 'p_V')].power05:.2f}"
        out.append(row)
    print("\nType I error at 0.05/0.01 of p_V (score test) by noise model; power at 0.05")
    print(markdown(pd.DataFrame(out)))


def summary_of_test(df: pd.DataFrame, test: str) -> None:
    """Type I error at 0.05 / 0.01 and power at 0.05 of `test` by noise model."""
    keys = ["generator", "shape", "model", "method", "donors", "cells"]
    out = []
    for (gen, shape, model, method, N, n), g in df.groupby(keys, sort=False):
        row = {"generator": gen, "shape": shape, "model": model, "method": method, "N": N,
               "cells": f"{n:g}"}  # fmt: skip
        for r in g.itertuples():
            row[f"{r.noise} {test}"] = f"{r.alpha05:.3f}/{r.alpha01:.3f} ({r.power05:.2f})"
        out.append(row)
    print(f"\nType I error at 0.05/0.01 of {test} by noise model (power at 0.05)")
    print(markdown(pd.DataFrame(out)))


def markdown(df: pd.DataFrame) -> str:
    """A markdown table of df (no tabulate dependency)."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * df.shape[1]]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def summarise(paths: list[str]) -> None:
    """The README table from JSON files written by --json."""
    import json

    rows = [r for p in paths for r in json.load(open(p))["rows"]]
    summary(pd.DataFrame(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarise"]:  # python bench_calibration.py --summarise a.json ...
        summarise(sys.argv[2:])
    else:
        main()
