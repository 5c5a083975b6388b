"""The Snakemake workflow shipped with ctmm_jax: single cells -> pseudobulk -> chunked fits of
each model -> merged tables -> one per-gene table (`results/ctmm.tsv`) -> a report folder.

`ctmm-jax workflow init DIR` writes the workflow's `Snakefile` and a commented `config.yaml`
(package data of this folder) into DIR; `snakemake -s DIR/Snakefile -d DIR --cores 2` runs it,
on a cluster through Snakemake's executor plugins (README, "Running on a cluster"). Snakemake
schedules the jobs and reruns only what is missing or out of date; each job is a `ctmm-jax`
command, whose outputs appear whole or not at all (files.py).

- `config.py`: config.yaml checked, and the command-line options it gives each rule;
- `report.py`: the per-gene table of all the models (with the LRT and q values) and the
  report (QQ plot, variance partition, summary.json).
"""

from __future__ import annotations

from importlib import resources

TEMPLATES = ("Snakefile", "config.yaml")  # what `workflow init` writes


def template(name: str) -> str:
    """The text of a shipped workflow file (a name in TEMPLATES)."""
    if name not in TEMPLATES:
        raise ValueError(f"{name!r} is not a workflow file; use one of {', '.join(TEMPLATES)}.")
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
