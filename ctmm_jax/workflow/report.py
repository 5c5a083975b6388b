"""The workflow's last two steps, computed from the merged tables of the fits (files, not
FitResults): `combine` (all models in one per-gene table, with the likelihood-ratio test of
the main model against its null and BH q values) and `summary`, `qq_series`, `fitted_data`
(the report). `ctmm-jax workflow table` and `workflow report` read and write the files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import inference, models
from ..results import column_dictionary, with_qvalues

ALPHA = 0.05  # the report's discoveries: q < ALPHA

# fit settings that the models of one table must share: the same data, as the fit saw it, and
# comparable likelihoods (method, noise, parameter space)
SHARED = ("input_sha256", "genes_selected", "shape", "method", "noise", "std", "fixed",
          "random", "nonneg")  # fmt: skip


def _check_fits(tables: dict[str, pd.DataFrame], settings: dict[str, dict]) -> None:
    """ValueError unless the tables are fits of the same genes, data and settings."""
    first = next(iter(tables))
    for name, table in tables.items():
        if settings[name].get("model") != name:
            raise ValueError(f"{name}: its table is a fit of model "
                             f"{settings[name].get('model')!r}, not {name!r}.")  # fmt: skip
        if not table.index.equals(tables[first].index):
            raise ValueError(f"{name}: its genes differ from those of {first} (or their order); "
                             "give fits of the same genes.")  # fmt: skip
        differ = [k for k in SHARED if settings[name].get(k) != settings[first].get(k)]
        if differ:
            raise ValueError(f"{name}: fitted with other data or settings than {first} "
                             f"({', '.join(differ)}).")  # fmt: skip


def lrt(tables: dict[str, pd.DataFrame], settings: dict[str, dict], main: str, C: int):
    """The likelihood-ratio test of `main` against its null model (models.MODELS[main].null),
    (p (G,) with NaN where either fit is not ok, a record of it), or (None, None) when the null
    model is not among the tables or `main` has no test of V. k = the number of V parameters,
    with the chi-bar-square boundary mixture for nonneg fits (inference.lrt)."""
    spec = models.get(main)
    null = spec.null
    tested = spec.tests(C).get("V")
    if null is None or null not in tables or tested is None:
        return None, None
    big, small = tables[main], tables[null]
    boundary = bool(settings[main].get("nonneg", False))
    p = inference.lrt(big["loglik"].to_numpy(np.float64), small["loglik"].to_numpy(np.float64),
                      len(tested), boundary=boundary)  # fmt: skip
    ok = big["converged"].to_numpy(bool) & small["converged"].to_numpy(bool)
    record = {"model": main, "null": null, "df": len(tested), "boundary": boundary}
    return np.where(ok, p, np.nan), record


def combine(
    tables: dict[str, pd.DataFrame], settings: dict[str, dict], C: int, main: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """One row per gene: the columns of each model's table prefixed by the model (`free_p_V`),
    then `p_lrt`, the LRT of the main model against its null model where both are fitted, and
    its BH q value `q_lrt` (each model's q values are already over all genes).

    Args:
        tables: model -> its merged `fit` table (indexed by gene); the first is the main model
            unless `main` says otherwise.
        settings: model -> the table's sidecar (the fit's settings).
        C: number of cell types (the LRT's degrees of freedom).
        main: the main model (default: the first).
    Returns:
        (table, its column dictionary, a record of the LRT or None).
    """
    if not tables:
        raise ValueError("tables: give the table of at least one model.")
    main = next(iter(tables)) if main is None else main
    if main not in tables:
        raise ValueError(f"main: {main!r} is not among the models {list(tables)}.")
    _check_fits(tables, settings)
    parts, meanings = [], []
    for name, table in tables.items():
        parts.append(table.add_prefix(f"{name}_"))
        d = column_dictionary(table.columns)
        d["column"] = f"{name}_" + d["column"]
        d["meaning"] = f"{name} fit: " + d["meaning"]
        meanings.append(d)
    out = pd.concat(parts, axis=1)
    p, record = lrt(tables, settings, main, C)
    if p is not None:
        out["p_lrt"] = p
        out = with_qvalues(out)  # q_lrt: the only p_ column; each model's q are prefixed
        test = (f"likelihood-ratio test of {main} against {record['null']} (chi2({record['df']})"
                f"{', chi-bar-square at the boundary' if record['boundary'] else ''}; NaN "
                "unless both fits are ok)")  # fmt: skip
        meanings.append(pd.DataFrame(
            [("p_lrt", "float64", test, "p value"),
             ("q_lrt", "float64", "Benjamini-Hochberg q value of p_lrt over the table's genes",
              "q value")], columns=["column", "dtype", "meaning", "units"]))  # fmt: skip
    return out, pd.concat(meanings, ignore_index=True), record


def summary(table: pd.DataFrame, names: list[str], alpha: float = ALPHA) -> dict:
    """Counts for summary.json: genes, converged genes per model, and per q column (`q_lrt`,
    `free_q_V`, ...) the genes with q < alpha."""
    q = [c for c in table.columns if c == "q_lrt" or any(c.startswith(f"{m}_q_") for m in names)]
    return {
        "n_genes": len(table),
        "converged": {m: int(table[f"{m}_converged"].sum()) for m in names},
        "alpha": alpha,
        "discoveries": {c: int((table[c] < alpha).sum()) for c in q},
    }


def qq_series(table: pd.DataFrame, main: str) -> dict[str, np.ndarray]:
    """The main p values for the QQ plot: the main model's test of V (`<main>_p_V`) and the
    LRT (`p_lrt`), those present with at least one p value; else the main model's other
    tests (`<main>_p_*`, not jackknife or sandwich ones)."""

    def usable(cols):
        return {c: table[c].to_numpy(np.float64) for c in cols
                if c in table and np.isfinite(table[c].to_numpy(np.float64)).any()}  # fmt: skip

    series = usable([f"{main}_p_V", "p_lrt"])
    if not series:
        prefix = f"{main}_p_"
        series = usable([c for c in table.columns if c.startswith(prefix)
                         and not c.endswith(("_jk", "_sw"))])  # fmt: skip
    return series


def fitted_data(pb, genes, fit: dict):
    """The data of the genes `genes` as `ctmm-jax fit` saw them, from the pseudobulk dataset
    `pb` and the fit's sidecar settings `fit`: --std, --shape, count_scale, and the noise model
    (noise.apply: pooled or plug-in noise variances, zero-noise values missing), for the
    variance partition."""
    from .. import noise, preprocess

    position = {g: j for j, g in enumerate(pb.genes)}
    missing = [g for g in genes if g not in position]
    if missing:
        raise ValueError(f"dataset: has no gene {missing[0]!r} of the table; pass the dataset "
                         "the fits read.")  # fmt: skip
    pb = pb.select_genes(np.array([position[g] for g in genes], dtype=int))
    if fit.get("std"):
        pb = preprocess.std(pb)
    data = pb.to_op() if fit.get("shape") == "op" else pb.to_ctp(bool(fit.get("count_scale")))
    return noise.apply(data, fit.get("noise")).data


def variance_partition(table: pd.DataFrame, main: str, data) -> pd.DataFrame:
    """inference.partition_variance of the main model's estimates in the combined table (the
    `<main>_` columns) on `data` (fitted_data)."""
    own = table[[c for c in table.columns if c.startswith(f"{main}_")]]
    own = own.rename(columns=lambda c: c[len(main) + 1 :])
    phi = inference.parameters_from_table(own, main, data.celltypes)
    hom2, V = inference.natural_vc(phi, main, len(data.celltypes))
    random = [c for c in own.columns if c.startswith("randomvar_")]
    extra = own[random].to_numpy(np.float64).sum(axis=1) if random else None
    return inference.partition_variance(hom2, V, data, random=extra)
