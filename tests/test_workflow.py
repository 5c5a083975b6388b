"""The Snakemake workflow (ctmm_jax/workflow): `workflow init`, the config checks, the combined
table's LRT, and one end-to-end run on a small simulated .h5ad in which one fit job fails: the
rerun makes only what is missing, and results/ctmm.tsv equals direct `cj.fit` calls."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

import ctmm_jax as cj
from ctmm_jax import inference, noise, preprocess
from ctmm_jax.cli import main
from ctmm_jax.files import sha256_file
from ctmm_jax.simulation import simulate_anndata
from ctmm_jax.workflow import TEMPLATES, template
from ctmm_jax.workflow.config import DATASET, DEFAULTS, read_config
from ctmm_jax.workflow.report import combine

TIGHT = dict(rtol=1e-8, atol=1e-10)  # the same fit, in another batch shape
HAS_SNAKEMAKE = importlib.util.find_spec("snakemake") is not None


def test_init_writes_the_templates_and_refuses_to_overwrite(tmp_path, capsys):
    w = tmp_path / "w"
    assert main(["workflow", "init", str(w)]) == 0
    for name in TEMPLATES:
        assert (w / name).read_text() == template(name)
    assert "snakemake -s" in capsys.readouterr().err
    (w / "config.yaml").write_text("cells: mine.h5ad\n")
    assert main(["workflow", "init", str(w)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ctmm-jax workflow init: error: {w / 'Snakefile'} exists; pass --force to "
                   "overwrite it."]  # fmt: skip
    assert (w / "config.yaml").read_text() == "cells: mine.h5ad\n"  # nothing was replaced
    assert main(["workflow", "init", str(w), "--force", "-q"]) == 0
    assert (w / "config.yaml").read_text() == template("config.yaml")


def test_config_template_holds_the_defaults():
    yaml = pytest.importorskip("yaml", reason="reading config.yaml needs PyYAML (snakemake's)")
    assert yaml.safe_load(template("config.yaml")) == {**DEFAULTS, "cells": "cells.h5ad"}


def test_read_config_gives_the_options(tmp_path):
    s = read_config({"cells": "c.h5ad", "jackknife": 5, "fixed": {"pca": "my pcs.tsv"},
                     "random": {"batch": "b.tsv"}, "fit_args": "--nonneg --std",
                     "layer": "logn", "normalize": True, "models": ["iid", "hom"],
                     "resources": {"fit": {"mem_mb": 9000}}})  # fmt: skip
    assert (s.dataset, s.pseudobulk, s.main, s.chunks) == (DATASET, True, "iid", 4)
    assert s.pseudobulk_options == (
        "--donor donor --cell-type cell_type --ct-cut 10 --ind-cut 0 --layer logn --normalize"
    )
    assert s.fit_options == ("--method reml --jackknife 5 --fixed 'pca=my pcs.tsv' "
                             "--random batch=b.tsv --memory 2GB --nonneg --std")  # fmt: skip
    assert s.fit_inputs == ("my pcs.tsv", "b.tsv")
    assert (s.resources["fit"].threads, s.resources["fit"].mem_mb) == (2, 9000)
    assert read_config({"cells": "c.h5ad", "jackknife": True}).fit_options.startswith(
        "--method reml --jackknife --memory"
    )
    # Snakemake's --config gives false, null and nested numbers as text; labels stay text
    s = read_config({"cells": "c.h5ad", "normalize": "false", "chunks": "3", "layer": "null",
                     "jackknife": "True", "resources": {"fit": {"threads": "1"}},
                     "donor": "007"})  # fmt: skip
    assert s.pseudobulk_options == "--donor 007 --cell-type cell_type --ct-cut 10 --ind-cut 0"
    assert (s.chunks, s.resources["fit"].threads) == (3, 1)
    assert "--jackknife --memory" in s.fit_options
    dataset = tmp_path / "pb.npz"  # what the check looks at: the dataset's format member
    np.savez(dataset, format=np.array(preprocess.DATASET_FORMAT))
    s = read_config({"cells": str(dataset)})
    assert (s.dataset, s.pseudobulk) == (str(dataset), False)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"cells": "c.h5ad", "ct-cut": 3}, "unknown key 'ct-cut'"),
        ({}, "config cells: give the input"),
        ({"cells": "c.loom"}, "give an AnnData .h5ad"),
        ({"cells": "c.h5ad", "models": []}, "give a list"),
        ({"cells": "c.h5ad", "models": ["free", "free"]}, "names a model twice"),
        ({"cells": "c.h5ad", "method": "REML"}, "use one of ml, reml, he"),
        ({"cells": "c.h5ad", "chunks": 0}, "chunks: 0; give a whole number >= 1"),
        ({"cells": "c.h5ad", "jackknife": 1}, "jackknife: 1"),
        ({"cells": "c.h5ad", "fixed": ["pcs.tsv"]}, "give NAME: FILE pairs"),
        ({"cells": "c.h5ad", "fit_args": "--model iid"}, "--model is set by the workflow"),
        ({"cells": "c.h5ad", "resources": {"fit": {"cpus": 2}}}, "resources fit"),
        ({"cells": "c.h5ad", "resources": {"fitt": {}}}, "no rule 'fitt'"),
    ],
)
def test_read_config_mistakes(config, message):
    with pytest.raises(ValueError, match=message):
        read_config(config)


def test_read_config_refuses_a_sparse_matrix_as_dataset(tmp_path):
    counts = tmp_path / "counts.npz"
    sparse.save_npz(counts, sparse.csr_matrix(np.eye(3)))
    with pytest.raises(ValueError, match="is not a pseudobulk dataset"):
        read_config({"cells": str(counts)})


def _fit_table(loglik, converged):
    genes = pd.Index([f"g{i}" for i in range(len(loglik))], name="gene")
    return pd.DataFrame({"hom2": 0.1, "loglik": loglik, "converged": converged, "p_hom2": 0.5},
                        index=genes)  # fmt: skip


def test_combine_lrt_is_nan_unless_both_fits_are_ok():
    settings = {m: {"model": m, "method": "reml", "nonneg": False} for m in ("free", "hom")}
    tables = {"free": _fit_table([-10.0, -12.0, -9.0], [True, False, True]),
              "hom": _fit_table([-14.0, -13.0, -9.5], [True, True, True])}  # fmt: skip
    table, dictionary, record = combine(tables, settings, C=3)
    assert record == {"model": "free", "null": "hom", "df": 3, "boundary": False}
    expected = [stats.chi2.sf(8.0, 3), np.nan, stats.chi2.sf(1.0, 3)]
    np.testing.assert_allclose(table["p_lrt"], expected, rtol=1e-14)
    np.testing.assert_allclose(table["q_lrt"], inference.bh_qvalues(expected), rtol=1e-14)
    assert list(table.columns[:4]) == ["free_hom2", "free_loglik", "free_converged", "free_p_hom2"]
    assert list(dictionary["column"]) == list(table.columns)
    assert dictionary.set_index("column").loc["hom_hom2", "meaning"].startswith("hom fit: ")
    one, _, none = combine({"hom": tables["hom"]}, settings, C=3)  # no null model: no LRT
    assert none is None and "p_lrt" not in one
    boundary = {m: {**s, "nonneg": True} for m, s in settings.items()}
    _, _, record = combine(tables, boundary, C=3)
    assert record["boundary"]


def test_combine_refuses_fits_of_other_data_or_genes():
    settings = {m: {"model": m, "method": "reml"} for m in ("free", "hom")}
    free = _fit_table([-10.0, -12.0], [True, True])
    hom = _fit_table([-14.0, -13.0], [True, True])
    other = {**settings, "hom": {"model": "hom", "method": "ml"}}
    with pytest.raises(ValueError, match=r"hom: fitted with other data or settings .*method"):
        combine({"free": free, "hom": hom}, other, C=3)
    with pytest.raises(ValueError, match="hom: its genes differ"):
        combine({"free": free, "hom": hom.iloc[::-1]}, settings, C=3)
    with pytest.raises(ValueError, match="is a fit of model 'free', not 'hom'"):
        combine({"free": free, "hom": free}, {"free": settings["free"],
                                              "hom": settings["free"]}, C=3)  # fmt: skip
    with pytest.raises(ValueError, match="main: 'iid' is not among"):
        combine({"free": free, "hom": hom}, settings, C=3, main="iid")


def test_table_and_report_mistakes_are_one_line(tmp_path, capsys):
    def error(argv):
        assert main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ctmm-jax workflow {argv[1]}: error: ")
        return lines[0]

    assert "write MODEL=TABLE" in error(["workflow", "table", "free", "--dataset", "pb.npz",
                                         "-o", str(tmp_path / "t.tsv")])  # fmt: skip
    table = tmp_path / "free.tsv"
    table.write_text("gene\tconverged\ng0\tTrue\n")
    Path(f"{table}.json").write_text(json.dumps({"command": "fit"}))
    out = str(tmp_path / "report")
    assert "not an output of `ctmm-jax workflow table`" in error(
        ["workflow", "report", str(table), "-o", out]
    )
    Path(f"{table}.json").write_text(
        json.dumps({"command": "workflow table", "table": {"sha256": sha256_file(table)}})
    )
    assert "--dataset: give the dataset" in error(["workflow", "report", str(table), "-o", out])
    table.write_text("gene\tconverged\ng1\tTrue\n")  # changed after it was written
    assert "does not match the sha256" in error(["workflow", "report", str(table), "-o", out])


# a `ctmm-jax` that fails the free model's second chunk while the flag file exists: a job that
# dies (here: at once) in the middle of a run
FAIL_ONCE = """\
import os, sys
args = sys.argv[1:]
if os.path.exists({flag!r}) and args[:1] == ["fit"] and "free" in args and "2/2" in args:
    sys.exit("ctmm-jax fit: error: a failure of this job, for the test")
os.execv(sys.executable, [sys.executable, "-m", "ctmm_jax", *args])
"""


def snakemake(w: Path, command: str, *extra: str) -> subprocess.CompletedProcess:
    config = ["cells=cells.h5ad", "chunks=2", "ct_cut=3", f"command={command}"]
    argv = ["-s", str(w / "Snakefile"), "-d", str(w), "--cores", "2", "--set-threads", "fit=1",
            "--config", *config, *extra]  # fmt: skip
    return subprocess.run([sys.executable, "-m", "snakemake", *argv], capture_output=True,
                          text=True)  # fmt: skip


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


@pytest.mark.skipif(not HAS_SNAKEMAKE, reason='needs snakemake: pip install "ctmm_jax[workflow]"')
def test_workflow_end_to_end_and_rerun_after_a_failed_job(tmp_path):
    """8 genes (4 with V = 0), 30 donors, 3 cell types, models free and hom in 2 chunks each."""
    w = tmp_path / "w"
    assert main(["workflow", "init", str(w), "-q"]) == 0
    V = np.repeat([[0.08], [0.0]], 4, axis=0) * np.ones(3)
    simulate_anndata(8, 30, 3, V=V, seed=3).write_h5ad(w / "cells.h5ad")
    flag, wrapper = tmp_path / "fail", tmp_path / "ctmm_fail_once.py"
    flag.touch()
    wrapper.write_text(FAIL_ONCE.format(flag=str(flag)))
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(wrapper))}"

    failed = snakemake(w, command, "--keep-going")
    assert failed.returncode != 0, failed.stderr
    assert "a failure of this job" in (w / "logs" / "fit" / "free.2.log").read_text()
    results = w / "results"
    made = set(mtimes(results))
    assert not any(p.startswith("fits/free/free.2.") for p in made)  # removed by Snakemake
    assert {"fits/free/free.1.tsv", "fits/hom/hom.2.tsv", "hom.tsv.json"} <= made
    assert not made & {"free.tsv", "ctmm.tsv"} and not (results / "report").exists()

    # a leftover of the failed job (as a hard kill may leave): Snakemake removes it, the fit
    # does not refuse to replace it
    (results / "fits" / "free" / "free.2.tsv.json").write_text("{")
    before = mtimes(results)
    flag.unlink()
    rerun = snakemake(w, command)
    assert rerun.returncode == 0, rerun.stderr
    after = mtimes(results)
    redone = {p for p in after if before.get(p) != after[p]}
    assert redone == {p for p in after if p.startswith(("fits/free/free.2.", "free.tsv",
                                                        "ctmm.tsv", "report/"))}  # fmt: skip
    again = snakemake(w, command, "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # the table equals direct fits of the workflow's pseudobulk
    data = preprocess.Pseudobulk.load(results / "pseudobulk.npz").to_ctp()
    fits = {m: cj.fit(data, m, "reml") for m in ("free", "hom")}
    table = pd.read_csv(results / "ctmm.tsv", sep="\t", index_col=0)
    assert list(table.index) == list(data.genes)
    for m, fit in fits.items():
        ours = table[[f"{m}_{c}" for c in fit.table.columns]].set_axis(fit.table.columns, axis=1)
        number = fit.table.select_dtypes("number").columns
        np.testing.assert_allclose(ours[number], fit.table[number], **TIGHT)
        for c in ("converged", "status"):
            assert list(ours[c]) == list(fit.table[c]), c
    ok = fits["free"].converged & fits["hom"].converged
    assert ok.all()
    p = inference.lrt(fits["free"].loglik, fits["hom"].loglik, 3)
    np.testing.assert_allclose(table["p_lrt"], np.where(ok, p, np.nan), **TIGHT)
    np.testing.assert_allclose(table["q_lrt"], inference.bh_qvalues(p), **TIGHT)

    # the report: summary counts, plots, the variance partition of the fitted data
    report = results / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_genes"] == 8 and summary["converged"] == {"free": 8, "hom": 8}
    assert summary["discoveries"]["q_lrt"] == int((table["q_lrt"] < 0.05).sum())
    assert summary["discoveries"]["free_q_V"] == int((table["free_q_V"] < 0.05).sum())
    assert summary["lrt"] == {"model": "free", "null": "hom", "df": 3, "boundary": False}
    assert summary["notes"] == []
    for png in ("qq.png", "variance_partition.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"
    vp = pd.read_csv(report / "variance_partition.tsv", sep="\t", index_col=0)
    expected = inference.variance_partition(fits["free"], noise.apply(data, "pooled").data)
    np.testing.assert_allclose(vp.to_numpy(), expected.to_numpy(), **TIGHT)
    assert list(vp.columns) == list(expected.columns)
