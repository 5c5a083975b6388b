"""The workflow's settings: config.yaml (as Snakemake read it) checked, with the defaults of
the shipped template, and the command-line options they give each rule, so that the Snakefile
holds rules and no logic.

No JAX here: Snakemake reads the Snakefile, and so imports this, once per run and once per
cluster job. A mistake raises ValueError naming the key and the fix (Snakemake shows it with
the Snakefile line that read the config).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

RULES = ("pseudobulk", "fit", "merge", "table", "report")
RESOURCE_KEYS = ("threads", "mem_mb", "time")  # time: wall minutes (Snakemake's `runtime`)
DATASET = "results/pseudobulk.npz"  # the dataset the workflow makes from cells (.h5ad)

# the template's values (config.yaml; tests check that they agree)
DEFAULTS: dict = {
    "cells": None,
    "donor": "donor",
    "cell_type": "cell_type",
    "ct_cut": 10,
    "ind_cut": 0,
    "layer": None,
    "normalize": False,
    "models": ["free", "hom"],
    "method": "reml",
    "jackknife": False,
    "fixed": {},
    "random": {},
    "fit_args": "",
    "chunks": 4,
    "memory": "2GB",
    "variance_partition": True,
    "command": "ctmm-jax",
    "resources": {
        "pseudobulk": {"threads": 1, "mem_mb": 8000, "time": 60},
        "fit": {"threads": 2, "mem_mb": 4000, "time": 120},
        "merge": {"threads": 1, "mem_mb": 2000, "time": 10},
        "table": {"threads": 1, "mem_mb": 2000, "time": 10},
        "report": {"threads": 1, "mem_mb": 8000, "time": 30},
    },
}
PLAIN = (
    "ct_cut",
    "ind_cut",
    "layer",
    "normalize",
    "jackknife",
    "chunks",
    "memory",
    "variance_partition",
)  # numbers, flags and nullable keys (`_plain`)
METHODS = ("ml", "reml", "he")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # model and covariate names


@dataclass(frozen=True)
class Resources:
    """A rule's jobs: cores, memory (MB) and wall time (minutes)."""

    threads: int
    mem_mb: int
    time: int


@dataclass(frozen=True)
class Settings:
    """config.yaml, checked.

    dataset: the pseudobulk .npz the fits read (`cells` itself, or DATASET made from it);
    pseudobulk: whether the workflow makes it; models: main model first; options: each rule's
    `ctmm-jax` options (shell-quoted); inputs: files the fits read besides the dataset
    (covariates); resources: per rule."""

    cells: str
    dataset: str
    pseudobulk: bool
    models: tuple[str, ...]
    chunks: int
    command: str
    pseudobulk_options: str
    fit_options: str
    fit_inputs: tuple[str, ...]
    variance_partition: bool
    resources: dict[str, Resources]

    @property
    def main(self) -> str:
        return self.models[0]


def _plain(value):
    """A value as YAML would read it: Snakemake's --config reads `false`, `null` and nested
    numbers (`resources={fit: {threads: 1}}`) as text."""
    if not isinstance(value, str):
        return value
    word = value.strip()
    if word.lower() in ("true", "false"):
        return word.lower() == "true"
    if word.lower() in ("null", "~", "none"):
        return None
    return int(word) if word.isdigit() else value


def _int(value, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config {key}: {value!r}; give a whole number >= {low}.")
    return value


def _text(value, key: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"config {key}: {value!r}; give a text value.")
    return value


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"config {key}: {value!r}; give true or false.")
    return value


def _covariates(value, key: str) -> dict[str, str]:
    """fixed/random: {NAME: FILE} (an empty value: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"config {key}: {value!r}; give NAME: FILE pairs, e.g. {{pca: pcs.tsv}}.")
    for name, path in value.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"config {key}: the name {name!r} is not a plain name (letters, "
                             "digits, _).")  # fmt: skip
        _text(path, f"{key} {name}")
    return dict(value)


def _resources(value) -> dict[str, Resources]:
    given = value or {}
    if not isinstance(given, dict):
        raise ValueError(f"config resources: {given!r}; give one entry per rule ({RULES}).")
    unknown = sorted(set(given) - set(RULES))
    if unknown:
        raise ValueError(f"config resources: no rule {unknown[0]!r}; the rules are {RULES}.")
    out = {}
    for rule in RULES:
        entry = given.get(rule) or {}
        if not isinstance(entry, dict) or set(entry) - set(RESOURCE_KEYS):
            raise ValueError(f"config resources {rule}: {entry!r}; give {RESOURCE_KEYS}.")
        merged = {**DEFAULTS["resources"][rule], **{k: _plain(v) for k, v in entry.items()}}
        out[rule] = Resources(*(_int(merged[k], f"resources {rule} {k}", 1)
                                for k in RESOURCE_KEYS))  # fmt: skip
    return out


def _is_dataset(path: str) -> bool:
    """Whether an .npz is a pseudobulk dataset (its `format` member says so; a scipy sparse
    matrix's says e.g. 'csr'), read alone; a file that is not there yet counts as one
    (Snakemake then says it is missing), a damaged one not."""
    from ..files import NPZ_ERRORS
    from ..preprocess import DATASET_FORMAT  # NumPy and pandas, no JAX

    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            return "format" in f.files and str(f["format"]) == DATASET_FORMAT
    except FileNotFoundError:
        return True
    except NPZ_ERRORS:
        return False


def _is(path: str, *suffixes: str) -> bool:
    return path.lower().endswith(suffixes)


def read_config(config: dict) -> Settings:
    """Settings from Snakemake's `config` (config.yaml, and --config on the command line);
    missing keys take DEFAULTS. ValueError for an unknown key or a bad value."""
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config: unknown key {unknown[0]!r} (a typo?); the keys are "
                         f"{', '.join(DEFAULTS)}.")  # fmt: skip
    c = {**DEFAULTS, **config}
    c.update({k: _plain(c[k]) for k in PLAIN})
    if c["cells"] is None:
        raise ValueError("config cells: give the input, an .h5ad or a pseudobulk .npz.")
    cells = _text(c["cells"], "cells")
    if _is(cells, ".npz"):
        if not _is_dataset(cells):
            raise ValueError(
                f"config cells: {cells} is not a pseudobulk dataset; give an .h5ad, or make the "
                "dataset with `ctmm-jax pseudobulk` (e.g. from a sparse matrix and --cells)."
            )
        dataset, pseudobulk = cells, False
    elif _is(cells, ".h5ad"):
        dataset, pseudobulk = DATASET, True
    else:
        raise ValueError(
            f"config cells: {cells}; give an AnnData .h5ad, or a pseudobulk .npz made by "
            "`ctmm-jax pseudobulk` (which also reads 10x folders, .mtx and .tsv files)."
        )

    models = c["models"]
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models:
        raise ValueError(f"config models: {models!r}; give a list, e.g. [free, hom].")
    for m in models:
        if not isinstance(m, str) or not NAME.fullmatch(m):
            raise ValueError(f"config models: {m!r} is not a model name (e.g. free, hom).")
    if len(set(models)) < len(models):
        raise ValueError(f"config models: {models} names a model twice.")
    method = c["method"]
    if method not in METHODS:
        raise ValueError(f"config method: {method!r}; use one of {', '.join(METHODS)}.")
    jackknife = c["jackknife"]
    if not isinstance(jackknife, bool):
        _int(jackknife, "jackknife", 2)
    fixed, random = _covariates(c["fixed"], "fixed"), _covariates(c["random"], "random")
    fit_args = c["fit_args"] or ""
    if not isinstance(fit_args, str):
        raise ValueError(f"config fit_args: {fit_args!r}; give the options as one text.")
    for owned in ("--model", "--method", "--chunk", "--jackknife", "--fixed", "--random",
                  "--memory", "-o", "--output", "--force"):  # fmt: skip
        if owned in shlex.split(fit_args):
            raise ValueError(f"config fit_args: {owned} is set by the workflow; use its key.")
    memory = _text(c["memory"], "memory", allow_none=True)

    quote = shlex.quote
    pb = ["--donor", quote(_text(c["donor"], "donor")),
          "--cell-type", quote(_text(c["cell_type"], "cell_type")),
          "--ct-cut", str(_int(c["ct_cut"], "ct_cut", 0)),
          "--ind-cut", str(_int(c["ind_cut"], "ind_cut", 0))]  # fmt: skip
    layer = _text(c["layer"], "layer", allow_none=True)
    if layer is not None:
        pb += ["--layer", quote(layer)]
    if _flag(c["normalize"], "normalize"):
        pb.append("--normalize")

    fit = ["--method", method]
    if jackknife is True:
        fit.append("--jackknife")
    elif jackknife is not False:
        fit += ["--jackknife", str(jackknife)]
    for option, covariates in (("--fixed", fixed), ("--random", random)):
        fit += [f"{option} {quote(f'{name}={path}')}" for name, path in covariates.items()]
    if memory is not None:
        fit += ["--memory", quote(memory)]
    if fit_args.strip():
        fit.append(" ".join(quote(a) for a in shlex.split(fit_args)))

    return Settings(
        cells=cells,
        dataset=dataset,
        pseudobulk=pseudobulk,
        models=tuple(models),
        chunks=_int(c["chunks"], "chunks", 1),
        command=_text(c["command"], "command"),
        pseudobulk_options=" ".join(pb),
        fit_options=" ".join(fit),
        fit_inputs=tuple(str(PurePath(p)) for p in [*fixed.values(), *random.values()]),
        variance_partition=_flag(c["variance_partition"], "variance_partition"),
        resources=_resources(c["resources"]),
    )
