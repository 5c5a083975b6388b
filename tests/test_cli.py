"""The `ctmm-jax` command line: round trip in subprocesses, chunked = unchunked, the outputs
equal the library's, and common mistakes end in one line on stderr (never a traceback).

Only the round trip, one mistake and Ctrl-C run in real processes (each compiles its JAX
programs again); the other mistakes go through `main(argv)` in this process."""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from tenx import FEATURES, GEX, SYMBOLS, write_10x

import ctmm_jax as cj
from ctmm_jax import cli as cli_module
from ctmm_jax import gxemm, preprocess
from ctmm_jax.cli import UserError, main
from ctmm_jax.files import fingerprint, sha256_file
from ctmm_jax.models import MODELS
from ctmm_jax.simulation import simulate_cells

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctmm_example"
TIGHT = dict(rtol=1e-8, atol=1e-10)  # the same fit, in another batch shape
DICTIONARY = ["column", "dtype", "meaning", "units"]  # columns of <output>.columns.tsv


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctmm_jax", *args], cwd=cwd, capture_output=True, text=True
    )


def one_error_line(err: str, command: str) -> str:
    """The only line of stderr, checked to be `ctmm-jax <command>: error: ...`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ctmm-jax {command}: error: ")
    return lines[0]


def numeric(table: pd.DataFrame) -> np.ndarray:
    return table.select_dtypes("number").to_numpy(np.float64)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", index_col=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """simulate -> pseudobulk -> fit in two chunks -> merge, each through `main(argv)` in this
    process (a subprocess would add only JAX's import; `python -m ctmm_jax` is tested on its
    own below)."""
    d = tmp_path_factory.mktemp("cli")
    steps = [
        ("simulate", "-o", "cells.h5ad", "--n-genes", "24", "--n-donors", "30", "--seed", "3"),
        ("pseudobulk", "cells.h5ad", "--ct-cut", "3", "-o", "pb.npz"),
        ("fit", "pb.npz", "--model", "iid", "--chunk", "1/2", "-o", "chunks/iid.1.tsv"),
        ("fit", "pb.npz", "--model", "iid", "--chunk", "2/2", "-o", "chunks/iid.2.tsv"),
        ("merge", "chunks/iid.2.tsv", "chunks/iid.1.tsv", "-o", "iid.tsv"),
    ]
    with contextlib.chdir(d):
        for step in steps:
            assert main([step[0], "-q", *step[1:]]) == 0, step
    return d


def test_round_trip_equals_the_library(run_dir):
    """The merged chunk fits equal one unchunked library fit of the same pseudobulk."""
    import anndata

    pb = preprocess.from_anndata(anndata.read_h5ad(run_dir / "cells.h5ad"), ct_cut=3)
    saved = preprocess.Pseudobulk.load(run_dir / "pb.npz")
    np.testing.assert_array_equal(saved.mask, pb.mask)
    np.testing.assert_allclose(saved.ctp, pb.ctp, rtol=1e-14)
    expected = cj.fit(pb.to_ctp(), "iid", "reml").table
    merged = read(run_dir / "iid.tsv")
    assert list(merged.index) == list(expected.index)  # chunk order restored
    assert list(merged.columns) == list(expected.columns)
    np.testing.assert_allclose(numeric(merged), numeric(expected), **TIGHT)
    assert merged["converged"].all()
    for table in ("chunks/iid.1.tsv", "iid.tsv"):
        columns = pd.read_csv(run_dir / f"{table}.columns.tsv", sep="\t")
        assert list(columns.columns) == DICTIONARY
        assert list(columns["column"]) == list(merged.columns)


def test_sidecars_carry_settings_and_version(run_dir):
    chunk = json.loads((run_dir / "chunks" / "iid.1.tsv.json").read_text())
    assert chunk["ctmm_jax_version"] == cj.__version__
    assert (chunk["model"], chunk["method"], chunk["shape"], chunk["chunk"]) == (
        "iid", "reml", "ctp", "1/2",
    )  # fmt: skip
    assert (chunk["information"], chunk["nonneg"], chunk["max_iter"]) == ("expected", False, 200)
    env, device = chunk["environment"], jax.devices()[0]
    assert (env["jax"], env["device"], env["platform"], env["x64"]) == (
        jax.__version__, str(device), device.platform, True,
    )  # fmt: skip
    assert env["jaxlib"]
    merged = json.loads((run_dir / "iid.tsv.json").read_text())
    assert merged["chunk"] is None and merged["n_genes"] == 24
    assert merged["merged"] == ["chunks/iid.1.tsv", "chunks/iid.2.tsv"]


def test_sidecars_record_the_table_the_inputs_and_the_genes(run_dir):
    """What merge checks (issue 18 #1): each table's rows, columns and sha256, the sha256 of the
    dataset, the positions of the chunk's genes, and the fingerprint of the shared settings."""
    metas = []
    for name in ("chunks/iid.1.tsv", "chunks/iid.2.tsv", "iid.tsv"):
        meta = sidecar(run_dir / name)
        table = read(run_dir / name)
        assert meta["table"] == {"file": Path(name).name, "rows": len(table),
                                 "columns": list(table.columns),
                                 "sha256": sha256_file(run_dir / name)}  # fmt: skip
        assert meta["input_sha256"] == {"dataset": sha256_file(run_dir / "pb.npz")}
        assert meta["settings_sha256"] == fingerprint(cli_module._shared_settings(meta))
        metas.append(meta)
    assert [m["gene_positions"] for m in metas] == [[0, 12], [12, 24], [0, 24]]
    genes = list(read(run_dir / "iid.tsv").index)
    assert {m["settings_sha256"] for m in metas} == {metas[0]["settings_sha256"]}
    assert metas[0]["genes_selected"] == {"n": 24, "sha256": fingerprint(genes)}


def sidecar(table: Path) -> dict:
    return json.loads(Path(f"{table}.json").read_text())


def edit(path: Path, /, fingerprinted: bool = True, **changes) -> None:
    """Change a chunk's sidecar as a hand edit would; `fingerprinted`: update its settings_sha256
    too, so that the check under test, not the fingerprint, has to catch the change."""
    meta = {**sidecar(path), **changes}
    if fingerprinted:
        meta["settings_sha256"] = fingerprint(cli_module._shared_settings(meta))
    Path(f"{path}.json").write_text(json.dumps(meta))


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_hom2(table: Path) -> None:
    """The table without a column, its sidecar's sha256 updated to match."""
    read(table).drop(columns="hom2").to_csv(table, sep="\t")
    edit(table, table={**sidecar(table)["table"], "sha256": sha256_file(table)})


def swap(one: Path, two: Path, *keys: str) -> None:
    a, b = sidecar(one), sidecar(two)
    edit(one, **{k: b[k] for k in keys})
    edit(two, **{k: a[k] for k in keys})


C1, C2 = Path("chunks/iid.1.tsv"), Path("chunks/iid.2.tsv")


@pytest.mark.parametrize(
    "change, inputs, message",
    [
        (lambda: cut(C2), (C1, C2),
         f"{C2}: its content does not match the sha256 in iid.2.tsv.json"),
        (lambda: C2.write_text(C2.read_text().splitlines()[0] + "\n"), (C1, C2),
         f"{C2}: its content does not match the sha256"),
        (lambda: drop_hom2(C2), (C1, C2), f"{C2}: its columns differ from those in its sidecar "
         "(missing: ['hom2'])"),
        (lambda: edit(C2, table={**sidecar(C2)["table"], "rows": 11}), (C1, C2),
         f"{C2}: has 12 rows, its sidecar says 11"),
        (lambda: edit(C2, chunk="0/0"), (C1, C2), f"{C2}.json: chunk label '0/0' is not I/N"),
        (lambda: edit(C2, chunk="-1/0"), (C1, C2), f"{C2}.json: chunk label '-1/0' is not I/N"),
        (lambda: edit(C2, chunk=2), (C1, C2), f"{C2}.json: chunk label 2 is not I/N"),
        (lambda: Path(f"{C2}.json").write_text("[]"), (C1, C2),
         f"{C2}.json: an array, not the JSON object `fit` writes"),
        (lambda: Path(f"{C2}.json").write_text('{"command": "fit",'), (C1, C2),
         f"{C2}.json: not valid JSON"),
        (lambda: Path(f"{C2}.json").unlink(), (C1, C2), f"{C2}: no sidecar iid.2.tsv.json"),
        (lambda: edit(C2, table=None), (C1, C2),
         f"{C2}.json: no valid record of its table's rows, columns and sha256"),
        (lambda: edit(C2, input_sha256={"dataset": "0" * 64}), (C1, C2),
         f"{C2}: fitted to other input files than {C1} (the content of ['dataset'] differs)"),
        (lambda: edit(C2, model="free"), (C1, C2),
         f"{C2}: fitted with other settings than {C1} (['model'])"),
        (lambda: edit(C2, fingerprinted=False, model="free"), (C1, C2),
         f"{C2}.json: its settings do not match their fingerprint"),
        (lambda: swap(C1, C2, "chunk"), (C1, C2),
         f"{C2}: as chunk 1/2 of 24 genes it should hold genes 1-12, its sidecar says 13-24"),
        (lambda: swap(C1, C2, "chunk", "gene_positions"), (C1, C2),
         "the chunks' genes, in chunk order, are not the 24 genes their fits selected"),
        (lambda: None, (C1, C1, C2), f"{C1}: chunk 1/2 is given twice (also as {C1})"),
        (lambda: edit(C2, chunk="2/3"), (C1, C2), f"{C2}: chunk 2/3 of another run than {C1}"),
        (lambda: edit(C2, chunk=None), (C1, C2), f"{C2}: not a chunk (fitted without --chunk)"),
    ],
    ids=["cut mid-row", "header only", "column removed", "row count", "label 0/0",
         "label -1/0", "label not a string", "sidecar []", "sidecar not JSON", "no sidecar",
         "older sidecar", "other dataset", "other settings", "settings edited", "labels swapped",
         "tables swapped", "chunk twice", "other run", "unchunked"],
)  # fmt: skip
def test_merge_refuses_chunks_that_do_not_check_out(run_dir, tmp_path, monkeypatch, capsys,
                                                    change, inputs, message):  # fmt: skip
    """Issue 18 #1, #9: a chunk whose table does not match its sidecar, a damaged or edited
    sidecar, or chunks that are not the chunks of one run, each once, are refused with one line
    naming the chunk and the reason, before anything is written."""
    shutil.copytree(run_dir / "chunks", tmp_path / "chunks")
    monkeypatch.chdir(tmp_path)
    change()
    assert main(["merge", *map(str, inputs), "-o", "m.tsv"]) == 1
    assert message in one_error_line(capsys.readouterr().err, "merge")
    assert os.listdir(tmp_path) == ["chunks"]


def test_outputs_are_replaced_whole_and_only_with_force(run_dir, tmp_path, monkeypatch, capsys):
    """Issue 18 #1: an existing output is refused without --force; a rewrite stopped by a
    file-size limit leaves the old table and sidecar as they were (no cut table beside them)."""
    shutil.copytree(run_dir / "chunks", tmp_path / "chunks")
    monkeypatch.chdir(tmp_path)
    merge = ["merge", "-q", str(C1), str(C2), "-o", "m.tsv"]
    assert main(merge) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("m.tsv*")}
    assert sorted(before) == ["m.tsv", "m.tsv.columns.tsv", "m.tsv.json"]
    assert main(merge) == 1
    assert "m.tsv exists; pass --force to overwrite it" in one_error_line(
        capsys.readouterr().err, "merge"
    )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # the table is larger
    try:
        code = main([*merge, "--force"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert code == 1
    assert "m.tsv: cannot write it" in one_error_line(capsys.readouterr().err, "merge")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("m.tsv*")} == before
    assert sorted(os.listdir(tmp_path)) == ["chunks", "m.tsv", "m.tsv.columns.tsv", "m.tsv.json"]
    assert main([*merge, "--force"]) == 0


@pytest.mark.parametrize(
    "args",
    [
        ("simulate", "-o", "cells.h5ad"),
        ("pseudobulk", "cells.h5ad", "-o", "pb.npz"),
        ("fit", "pb.npz", "-o", "iid.tsv"),
        ("gxemm", "--y", "y.txt", "--K", "K.txt", "--Z", "Z.txt", "-o", "iid.tsv"),
    ],
)
def test_every_command_refuses_to_overwrite_without_force(run_dir, args, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    assert main(list(args)) == 1
    message = f"{args[-1]} exists; pass --force to overwrite it"
    assert message in one_error_line(capsys.readouterr().err, args[0])


def test_a_missing_output_folder_is_created_and_said(tmp_path, capsys):
    """Issue 18 #15: created, with one line on stderr (even with -q), not silently."""
    out = tmp_path / "new" / "sub" / "c.npz"
    argv = ["simulate", "-q", "-o", str(out), "--n-genes", "7", "--n-donors", "6", "--seed", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().err == f"ctmm-jax simulate: created the output folder {out.parent}\n"
    assert sorted(os.listdir(out.parent)) == ["c.cells.tsv", "c.genes.txt", "c.npz"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("fit", "cut.npz", "-o", "x.tsv"), "cut.npz: truncated or damaged"),
        (("fit", "empty.npz", "-o", "x.tsv"), "empty.npz: the file is empty"),
        (("pseudobulk", "cut.npz", "--cells", "cells.tsv", "-o", "x.npz"),
         "input: cut.npz: not a scipy.sparse .npz matrix, or truncated or damaged"),
        (("pseudobulk", "cut.h5ad", "-o", "x.npz"), "cut.h5ad: cannot read as .h5ad"),
        (("gxemm", "--y", "cut.npy", "--K", "K.txt", "--Z", "Z.txt", "-o", "x.tsv"),
         "--y: cut.npy: not a .npy array, or truncated or damaged"),
    ],
)  # fmt: skip
def test_damaged_inputs_are_one_line_errors(run_dir, tmp_path, monkeypatch, capsys, args, message):
    """Issue 18 #9: truncated .npz, .h5ad and .npy inputs name the file (no traceback)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(run_dir / "pb.npz", "cut.npz")
    shutil.copy(run_dir / "cells.h5ad", "cut.h5ad")
    np.save("cut.npy", np.arange(100.0))
    for name in ("cut.npz", "cut.h5ad", "cut.npy"):
        cut(Path(name))
    Path("empty.npz").write_bytes(b"")
    Path("cells.tsv").write_text("donor\tcell_type\nd1\tB\n")
    assert main(list(args)) == 1
    assert message in one_error_line(capsys.readouterr().err, args[0])


def test_a_mistake_in_a_real_process_is_one_line_and_exit_code_1(run_dir):
    done = cli("fit", "missing.npz", "-o", "x.tsv", cwd=run_dir)
    assert done.returncode == 1
    assert "no such file 'missing.npz'" in one_error_line(done.stderr, "fit")


@pytest.mark.parametrize(
    "args, message",
    [
        (("pseudobulk", "cells.h5ad", "--donor", "individual", "-o", "x.npz"),
         "no column 'individual'"),
        (("fit", "pb.npz", "--genes", "gene1,NOTAGENE", "-o", "x.tsv"),
         "1 of 2 genes are not in pb.npz (e.g. 'NOTAGENE')"),
        (("fit", "cells.h5ad", "-o", "x.tsv"), "not a ctmm_jax pseudobulk dataset"),
        (("merge", "chunks/iid.1.tsv", "-o", "x.tsv"), "missing chunks [2] of 2"),
        (("fit", "pb.npz", "-o", "x.xlsx"), "use a .tsv, .csv or .parquet file name"),
        (("fit", "pb.npz", "--max-iter", "0", "-o", "x.tsv"), "--max-iter: must be >= 1"),
        (("fit", "pb.npz", "--tol", "0", "-o", "x.tsv"), "--tol: must be > 0"),
    ],
)  # fmt: skip
def test_mistakes_get_one_line_and_exit_code_1(run_dir, args, message, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    assert main(list(args)) == 1
    assert message in one_error_line(capsys.readouterr().err, args[0])


def test_tables_without_the_expected_columns_are_user_errors(run_dir, tmp_path, monkeypatch,
                                                             capsys):  # fmt: skip
    """A merge input without `converged`, a --random table without values: one line, not a
    KeyError or IndexError."""
    monkeypatch.chdir(tmp_path)
    table = pd.DataFrame({"hom2": [0.1]}, index=pd.Index(["g1"], name="gene"))
    record = {"command": "fit", "input_sha256": {}, "chunk": None, "gene_positions": [0, 1],
              "genes_selected": {"n": 1, "sha256": fingerprint(["g1"])}}  # fmt: skip
    cli_module._write_table(table, Path("t.tsv"), record)  # a sidecar that checks out
    assert main(["merge", "t.tsv", "-o", "m.tsv"]) == 1
    assert "not the columns of a `fit` table" in one_error_line(capsys.readouterr().err, "merge")
    Path("batch.tsv").write_text("donor\nd1\nd2\n")
    assert main(["fit", str(run_dir / "pb.npz"), "--random", "b=batch.tsv", "-o", "x.tsv"]) == 1
    assert "--random b: batch.tsv has one column" in one_error_line(capsys.readouterr().err, "fit")


@pytest.mark.parametrize("argv", [["--debug", "fit"], ["fit", "--debug"]])
def test_debug_shows_the_traceback(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such file 'missing.npz'"):
        main([*argv, "missing.npz", "-o", "x.tsv"])


@pytest.mark.parametrize(
    "error",
    [KeyError("hom2"), ImportError("no name x in ctmm_jax.results", name="ctmm_jax.results")],
)
def test_internal_errors_are_not_user_errors(error, monkeypatch):
    """An error that input validation does not raise is a bug: it propagates (traceback)."""

    def broken(args):
        raise error

    monkeypatch.setattr(cli_module, "run_simulate", broken)
    with pytest.raises(type(error)):
        main(["simulate", "-o", "x.npz"])


def test_interrupt_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "run_simulate", interrupted)
    assert main(["simulate", "-o", "x.npz"]) == 130
    assert capsys.readouterr().err == "ctmm-jax simulate: interrupted\n"


def test_fit_options_reach_the_library_and_the_sidecar(run_dir, tmp_path, monkeypatch):
    calls = []

    def fake_fit(data, model, method, **options):  # records the options, fits nothing
        calls.append((model, method, options))
        genes = pd.Index(data.genes, name="gene")
        table = pd.DataFrame({"converged": True}, index=genes)
        return SimpleNamespace(table=table, batching={"chunk_size": options["chunk_size"]})

    monkeypatch.setattr("ctmm_jax.api.fit", fake_fit)
    out = tmp_path / "x.tsv"
    options = ["--information", "observed", "--nonneg", "--max-iter", "7", "--tol", "1e-6",
               "--chunk-size", "16", "--memory", "1GB", "--jackknife", "5", "--robust",
               "--devices", "2"]  # fmt: skip
    assert main(["fit", "-q", str(run_dir / "pb.npz"), "--model", "hom", *options,
                 "-o", str(out)]) == 0  # fmt: skip
    expected = dict(information="observed", nonneg=True, max_iter=7, tol=1e-6, chunk_size=16,
                    memory="1GB", jackknife=5, robust=True)  # fmt: skip
    model, method, passed = calls[0]
    assert (model, method) == ("hom", "reml") and passed.items() >= expected.items()
    assert passed["devices"] == 2  # per output (the sidecar's batching), not a shared setting
    assert json.loads(Path(f"{out}.json").read_text()).items() >= expected.items()


@pytest.mark.parametrize("value, message", [("x", "give a number of devices"),
                                            ("9", "local device")])  # fmt: skip
def test_devices_option_errors(value, message, run_dir, tmp_path, capsys):
    out = str(tmp_path / "x.tsv")
    assert main(["fit", "-q", str(run_dir / "pb.npz"), "--devices", value, "-o", out]) == 1
    assert message in one_error_line(capsys.readouterr().err, "fit")


def test_python_m_ctmm_jax_help():
    done = subprocess.run([sys.executable, "-m", "ctmm_jax", "--help"], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0 and "examples:" in done.stdout and "--debug" in done.stdout


def test_help_and_quick_mistakes_do_not_import_jax(tmp_path):
    code = (
        "import sys, ctmm_jax\n"
        "eager = 'jax' in sys.modules\n"
        "from ctmm_jax.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "code = main(['fit', 'missing.npz', '-o', 'x.tsv'])\n"
        "print(eager, 'jax' in sys.modules, code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    eager, imported, code = done.stdout.split()
    if eager == "True":
        pytest.skip("ctmm_jax/__init__.py imports jax eagerly; this test runs once it is lazy")
    assert (imported, code) == ("False", "1")


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--chunk I/N" in out and "examples:" in out and "ctmm-jax merge" in out
    assert ", ".join(MODELS) in out  # the model registry's names


@pytest.mark.parametrize("argv", [["fit", "--model", "fre", "-o", "x.tsv"], ["fitt"], []])
def test_usage_mistakes_get_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and "--help" in err[0]


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert {s.name: s.value for s in scripts}.get("ctmm-jax") in ("ctmm_jax.cli:main",
                                                                  "ctmm_jax.cli:run")  # fmt: skip


@pytest.mark.filterwarnings("ignore::ctmm_jax.preprocess.ExpressionWarning")  # raw counts
def test_counts_and_cell_table_input(tmp_path):
    """simulate .npz (counts + cell table + gene list) -> pseudobulk equals the library's."""
    assert main(["simulate", "-q", "-o", str(tmp_path / "c.npz"), "--n-genes", "7",
                 "--n-donors", "6", "--seed", "2"]) == 0  # fmt: skip
    assert main(["pseudobulk", "-q", str(tmp_path / "c.npz"), "--cells",
                 str(tmp_path / "c.cells.tsv"), "--gene-names", str(tmp_path / "c.genes.txt"),
                 "-o", str(tmp_path / "pb.npz")]) == 0  # fmt: skip
    counts, cells, genes = simulate_cells(7, 6, 4, seed=2)
    expected = preprocess.pseudobulk(counts, cells, genes=genes)
    got = preprocess.Pseudobulk.load(tmp_path / "pb.npz")
    assert got.genes == expected.genes and got.donors == expected.donors
    np.testing.assert_allclose(got.ctp, expected.ctp, rtol=1e-14)
    np.testing.assert_allclose(got.ctnu, expected.ctnu, rtol=1e-14)


@pytest.mark.skipif(
    not EXAMPLE.is_dir(), reason=f"needs the original CTMM example files in {EXAMPLE}"
)
def test_original_files_fit_equals_library(tmp_path):
    files = dict(y=EXAMPLE / "CTP.gz", P=EXAMPLE / "P.gz", ctnu=EXAMPLE / "ctnu.gz")
    out = tmp_path / "he.tsv"
    args = ["fit", "-q", "--method", "he", "--jackknife", "-o", str(out)]
    assert main(args + [f"--{k}={v}" for k, v in files.items()]) == 0
    expected = cj.fit(cj.CTPData.from_files(**files), "free", "he", jackknife=True).table
    np.testing.assert_allclose(numeric(read(out)), numeric(expected), rtol=1e-10)


def test_covariates_genes_and_std_equal_library(tmp_path):
    """--fixed (donor-indexed table), --random (labels), --genes and --std, OP and CTP."""
    counts, cells, genes = simulate_cells(12, 30, 3, seed=5)
    pb = preprocess.pseudobulk(preprocess.normalize_log1p(counts), cells, genes=genes)
    pb.save(tmp_path / "pb.npz")
    rng = np.random.default_rng(0)
    pcs = pd.DataFrame(rng.normal(size=(30, 2)), index=list(pb.donors), columns=["PC1", "PC2"])
    pcs.iloc[::-1].to_csv(tmp_path / "pcs.tsv", sep="\t")  # rows matched by donor, not order
    batch = pd.Series(np.array(["a", "b", "c"])[np.arange(30) % 3], index=list(pb.donors))
    batch.rename("batch").to_csv(tmp_path / "batch.tsv", sep="\t")
    pick = ["gene7", "gene2", "gene9"]
    sub = preprocess.std(pb.select_genes([7, 2, 9]))
    covariates = [
        "--fixed",
        f"pc={tmp_path / 'pcs.tsv'}",
        "--random",
        f"batch={tmp_path / 'batch.tsv'}",
    ]
    for shape, data in (("ctp", sub.to_ctp()), ("op", sub.to_op())):
        out = tmp_path / f"{shape}.tsv"
        options = ["--shape", shape, "--method", "he", "--genes", ",".join(pick), "--std"]
        assert (
            main(["fit", "-q", str(tmp_path / "pb.npz"), *options, *covariates, "-o", str(out)])
            == 0
        )
        expected = cj.fit(data, "free", "he", fixed_covars={"pc": pcs},
                          random_covars={"batch": batch}).table  # fmt: skip
        got = read(out)
        assert list(got.index) == pick and "r2_batch" in got and "beta_pc_PC2" in got
        np.testing.assert_allclose(numeric(got), numeric(expected), rtol=1e-10)


def test_datasets_from_counts_fit_on_the_count_scale(tmp_path):
    """`pseudobulk --normalize` keeps the count-scale loadings; `fit` divides by them (the
    sidecar says count_scale) unless --no-count-scale: each equals the library's fit of
    to_ctp() / to_ctp(count_scale=False)."""
    counts, cells, genes = simulate_cells(6, 30, 3, seed=6)
    sparse.save_npz(tmp_path / "counts.npz", counts)
    cells.to_csv(tmp_path / "cells.tsv", sep="\t")
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    pb_path = tmp_path / "pb.npz"
    assert main(["pseudobulk", "-q", str(tmp_path / "counts.npz"), "--cells",
                 str(tmp_path / "cells.tsv"), "--gene-names", str(tmp_path / "genes.txt"),
                 "--normalize", "-o", str(pb_path)]) == 0  # fmt: skip
    pb = preprocess.Pseudobulk.load(pb_path)
    assert pb.loadings is not None and pb.loadings.shape == (6, 3)
    for flag, data, scaled in (
        ([], pb.to_ctp(), True),
        (["--no-count-scale"], pb.to_ctp(count_scale=False), False),
    ):
        out = tmp_path / f"fit{len(flag)}.tsv"
        assert main(["fit", "-q", str(pb_path), "--method", "he", *flag, "-o", str(out)]) == 0
        assert json.loads(Path(f"{out}.json").read_text())["count_scale"] is scaled
        expected = cj.fit(data, "free", "he").table
        np.testing.assert_allclose(numeric(read(out)), numeric(expected), rtol=1e-10)


def save_small_dataset(path: Path, seed: int) -> None:
    """4 genes, 20 donors, 2 cell types, 5 cells a pair: HE fits of its chunks are quick."""
    pb = cj.simulate(4, 20, 2, seed=seed)
    saved = preprocess.Pseudobulk(
        pb.genes, pb.donors, pb.celltypes, pb.Y, pb.ctnu, np.full((20, 2), 5), pb.P,
        np.einsum("gnc,nc->gn", pb.Y, pb.P), np.einsum("gnc,nc->gn", pb.ctnu, pb.P**2),
        np.ones((20, 2), bool),
    )  # fmt: skip
    saved.save(path)


def fit_he_chunk(dataset, i: int, model: str, out, *options: str) -> int:
    return main(["fit", "-q", str(dataset), "--method", "he", "--model", model,
                 "--chunk", f"{i}/2", "-o", str(out), *options])  # fmt: skip


def test_merge_refuses_other_settings(tmp_path, capsys):
    save_small_dataset(tmp_path / "pb.npz", seed=1)
    for i, model in ((1, "hom"), (2, "iid")):
        assert fit_he_chunk(tmp_path / "pb.npz", i, model, tmp_path / f"{i}.tsv") == 0
    assert main(["merge", str(tmp_path / "1.tsv"), str(tmp_path / "2.tsv"), "-o",
                 str(tmp_path / "m.tsv")]) == 1  # fmt: skip
    assert "fitted with other settings" in capsys.readouterr().err


def test_merge_refuses_chunks_of_another_dataset_of_the_same_name(tmp_path, monkeypatch, capsys):
    """Issue 18 #1: two datasets both called pb.npz; a chunk of each is refused by content."""
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        save_small_dataset(tmp_path / folder / "pb.npz", seed=seed)
    for i, folder in ((1, "a"), (2, "b")):
        monkeypatch.chdir(tmp_path / folder)
        assert fit_he_chunk("pb.npz", i, "hom", f"{i}.tsv") == 0
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "a/1.tsv", "b/2.tsv", "-o", "m.tsv"]) == 1
    message = "b/2.tsv: fitted to other input files than a/1.tsv (the content of ['dataset']"
    assert message in one_error_line(capsys.readouterr().err, "merge")
    assert not Path("m.tsv").exists()


def test_merge_refuses_a_chunk_whose_rewrite_was_interrupted(tmp_path, monkeypatch, capsys):
    """Issue 18 #1: chunk 2 re-run with another model and stopped after its new table replaced
    the old one, before its sidecar did. The stopped run leaves no temporary file, and merge
    names the chunk whose table no longer matches its sidecar."""
    save_small_dataset(tmp_path / "pb.npz", seed=1)
    for i in (1, 2):
        assert fit_he_chunk(tmp_path / "pb.npz", i, "hom", tmp_path / f"{i}.tsv") == 0
    replace, replaced = os.replace, []

    def stop_after_the_table(src, dst):
        if replaced:
            raise KeyboardInterrupt
        replaced.append(dst)
        replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", stop_after_the_table)
        assert fit_he_chunk(tmp_path / "pb.npz", 2, "iid", tmp_path / "2.tsv", "--force") == 130
    assert replaced == [tmp_path / "2.tsv"]
    assert capsys.readouterr().err == "ctmm-jax fit: interrupted\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert sidecar(tmp_path / "2.tsv")["model"] == "hom"  # the old sidecar, the new table
    assert main(["merge", str(tmp_path / "1.tsv"), str(tmp_path / "2.tsv"), "-o",
                 str(tmp_path / "m.tsv")]) == 1  # fmt: skip
    message = f"{tmp_path / '2.tsv'}: its content does not match the sha256 in 2.tsv.json"
    assert message in one_error_line(capsys.readouterr().err, "merge")


def test_ctrl_c_while_compiling_exits_130_with_one_line_and_no_output(run_dir, tmp_path):
    """Issue 18 #10: SIGINT while JAX compiles printed a traceback, then the interpreter's
    teardown segfaulted (exit 139). Now: exit 130, one line, no output file."""
    out = tmp_path / "x.tsv"
    argv = ["fit", str(run_dir / "pb.npz"), "--model", "full", "--cache", "off", "-o", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "ctmm_jax", *argv],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        started = process.stderr.readline()  # the 'compiling' line: the fit has begun
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=300)[1]
    finally:
        process.kill()
    assert "compiling" in started, started
    assert process.returncode == 130, rest
    assert rest.splitlines() == ["ctmm-jax fit: interrupted"]
    assert os.listdir(tmp_path) == []


def test_labels_are_text_and_byte_order_marks_are_dropped(tmp_path, monkeypatch, capsys):
    """Issue 18 #15: integer donor ids are ordered as numbers; a donor named NA is a donor
    (only an empty cell is missing); a byte-order mark does not stick to the first name of a
    cell table or gene list."""
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "-q", "-o", "c.npz", "--n-genes", "7", "--n-donors", "6",
                 "--seed", "2"]) == 0  # fmt: skip
    cells = pd.read_csv("c.cells.tsv", sep="\t", index_col=0)
    genes = Path("c.genes.txt").read_text()
    Path("genes.txt").write_text(genes, encoding="utf-8-sig")
    pseudobulk = ["pseudobulk", "-q", "c.npz", "--cells", "cells.tsv", "--gene-names",
                  "genes.txt", "--normalize", "-o", "pb.npz", "--force"]  # fmt: skip
    numbers = {f"ind{i}": d for i, d in enumerate(["10", "2", "1", "30", "4", "100"])}
    for ids, donors in (
        (numbers, ("1", "2", "4", "10", "30", "100")),
        ({**numbers, "ind5": "NA"}, ("1", "10", "2", "30", "4", "NA")),  # not all integers
    ):
        cells.assign(donor=cells["donor"].map(ids)).to_csv("cells.tsv", sep="\t",
                                                            encoding="utf-8-sig")  # fmt: skip
        assert main(pseudobulk) == 0
        saved = preprocess.Pseudobulk.load("pb.npz")
        assert saved.donors == donors and saved.genes == tuple(genes.split())
    unlabelled = cells["donor"].where(np.arange(len(cells)) > 0, "")  # the first cell's: empty
    cells.assign(donor=unlabelled).to_csv("cells.tsv", sep="\t")
    assert main(pseudobulk) == 1
    assert "1 cells have no label" in one_error_line(capsys.readouterr().err, "pseudobulk")


def test_gxemm_command_equals_library(tmp_path):
    """The original's number files (donors by position). Without --X the environments' main
    effects are added (Z's columns but the last): the same fixed effects as X = Z[:, 1:]."""
    y, X, K, Z = (a for a in gxemm.simulate(80, seed=4)[:4])
    for name, a in (("y", y), ("X", X), ("K", K), ("Z", Z)):
        np.savetxt(tmp_path / f"{name}.txt", a)
    out = tmp_path / "g.tsv"
    files = ["--y", str(tmp_path / "y.txt"), "--K", str(tmp_path / "K.txt"),
             "--Z", str(tmp_path / "Z.txt")]  # fmt: skip
    assert main(["gxemm", "-q", *files, "--X", str(tmp_path / "X.txt"), "--gtype", "iid",
                 "--no-lrt", "-o", str(out)]) == 0  # fmt: skip
    expected = gxemm.fit(y, X, K, Z, gtype="iid").named_table()
    got = read(out)
    assert list(got.columns) == list(expected.columns)
    assert list(got.columns[:4]) == ["sig2g_hom", "se_sig2g_hom", "sig2g_iid", "se_sig2g_iid"]
    assert "h2_het" in got and "p_gxe_wald" in got and "p_gxe_lrt" not in got
    np.testing.assert_allclose(numeric(got), numeric(expected), rtol=1e-10)
    columns = pd.read_csv(f"{out}.columns.tsv", sep="\t")
    assert list(columns["column"]) == list(expected.columns)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["environment"]["x64"] is True and meta["env_effects"] == []
    assert main(["gxemm", "-q", *files, "--gtype", "iid", "--no-lrt", "-o", str(out),
                 "--force"]) == 0  # fmt: skip
    np.testing.assert_allclose(numeric(read(out)), numeric(expected), rtol=1e-8)
    assert json.loads(Path(f"{out}.json").read_text())["env_effects"] == ["Z column 1"]


# ----------------------------------------- pseudobulk inputs (issue 18 #5, #6, #14, #15)


@pytest.fixture
def tenx(tmp_path):
    """A 10x v3 folder (gzipped; a repeated symbol, an antibody) with raw counts, and a cell
    table written by pandas (ids in an unnamed first column) in another order, with a BOM and
    a donor named "NA"."""
    counts, cells, _ = simulate_cells(len(FEATURES), 6, 3, seed=4)
    X = counts.toarray()
    ids = [f"AAAC{i:05d}-1" for i in range(len(X))]
    cells = cells[["donor", "cell_type"]].set_axis(ids)
    cells["donor"] = cells.donor.replace("ind0", "NA")
    write_10x(tmp_path / "10x", X, ids)
    text = cells.sample(frac=1, random_state=0).to_csv(sep="\t")
    (tmp_path / "cells.tsv").write_bytes(("\ufeff" + text).encode())
    expected = preprocess.pseudobulk(preprocess.normalize_log1p(X[:, GEX]), cells, genes=SYMBOLS)
    return SimpleNamespace(dir=tmp_path, X=X, ids=ids, cells=cells, expected=expected)


def assert_same_dataset(path, expected):
    got = preprocess.Pseudobulk.load(path)
    assert (got.genes, got.donors, got.cell_types) == (expected.genes, expected.donors,
                                                       expected.cell_types)  # fmt: skip
    for f in ("ctp", "ctnu", "op", "nu", "P"):
        np.testing.assert_allclose(getattr(got, f), getattr(expected, f), rtol=1e-12, err_msg=f)


def test_10x_folder_with_a_shuffled_cell_table_and_normalize(tenx, capsys):
    """Issue 18 #5, #14, #15: a 10x folder as scanpy reads it, cells matched by barcode (not
    position), --normalize, a donor "NA" kept; no warning."""
    d = tenx.dir
    args = ["pseudobulk", "-q", str(d / "10x"), "--cells", str(d / "cells.tsv"), "--normalize"]
    assert main([*args, "-o", str(d / "pb.npz")]) == 0
    assert capsys.readouterr().err == ""
    assert_same_dataset(d / "pb.npz", tenx.expected)
    assert "NA" in tenx.expected.donors


def test_bare_mtx_with_10x_features_and_barcodes(tenx, capsys):
    """Issue 18 #14: features.tsv.gz as --gene-names ("can't decode byte 0x8b"), or plain with
    three columns (whole lines as names), with --barcodes for the ids."""
    d = tenx.dir
    features = d / "features.tsv"
    features.write_bytes(gzip.decompress((d / "10x" / "features.tsv.gz").read_bytes()))
    for gene_names in (d / "10x" / "features.tsv.gz", features):
        assert main(["pseudobulk", "-q", str(d / "10x" / "matrix.mtx.gz"), "--genes-by-cells",
                     "--gene-names", str(gene_names), "--barcodes",
                     str(d / "10x" / "barcodes.tsv.gz"), "--cells", str(d / "cells.tsv"),
                     "--normalize", "-o", str(d / "pb.npz"), "--force"]) == 0  # fmt: skip
        assert_same_dataset(d / "pb.npz", tenx.expected)
    assert capsys.readouterr().err == ""


def test_raw_counts_get_a_one_line_warning(tenx, capsys):
    d = tenx.dir
    assert main(["pseudobulk", "-q", str(d / "10x"), "--cells", str(d / "cells.tsv"),
                 "-o", str(d / "pb.npz")]) == 0  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctmm-jax pseudobulk: warning: 10x: every")
    assert "--normalize" in lines[0]


def test_h5ad_with_a_cell_table_matched_by_obs_names(tenx, capsys):
    """Issue 18 #5: --cells with .h5ad input was ignored; it replaces obs, matched by id."""
    anndata = pytest.importorskip("anndata")
    d = tenx.dir
    X = preprocess.normalize_log1p(tenx.X[:, GEX])
    obs = pd.DataFrame({"donor": "x", "cell_type": "y"}, index=tenx.ids)
    anndata.AnnData(X, obs=obs, var=pd.DataFrame(index=tenx.expected.genes)).write_h5ad(
        d / "c.h5ad"
    )
    assert main(["pseudobulk", "-q", str(d / "c.h5ad"), "--cells", str(d / "cells.tsv"),
                 "-o", str(d / "pb.npz")]) == 0  # fmt: skip
    assert_same_dataset(d / "pb.npz", tenx.expected)
    other = tenx.cells.set_axis([f"X{i}" for i in range(len(tenx.ids))])
    other.to_csv(d / "other.tsv", sep="\t")
    assert main(["pseudobulk", str(d / "c.h5ad"), "--cells", str(d / "other.tsv"),
                 "-o", str(d / "pb.npz"), "--force"]) == 1  # fmt: skip
    line = one_error_line(capsys.readouterr().err, "pseudobulk")
    assert "c.h5ad and cells: the cell ids differ" in line and "'AAAC00000-1'" in line


def test_truncated_h5ad_and_nan_input_name_the_file(tenx, capsys):
    d = tenx.dir
    (d / "cut.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert main(["pseudobulk", str(d / "cut.h5ad"), "-o", str(d / "pb.npz")]) == 1
    assert "cut.h5ad: cannot read as .h5ad" in one_error_line(capsys.readouterr().err,
                                                               "pseudobulk")  # fmt: skip
    anndata = pytest.importorskip("anndata")
    h5py = pytest.importorskip("h5py")
    X = sparse.csr_matrix(preprocess.normalize_log1p(tenx.X))
    anndata.AnnData(X, obs=tenx.cells).write_h5ad(d / "bad.h5ad", compression="gzip")
    with h5py.File(d / "bad.h5ad") as f:  # zero a compressed block of X's values
        block = f["X/data"].id.get_chunk_info(0)
    data = bytearray((d / "bad.h5ad").read_bytes())
    data[block.byte_offset + 4 : block.byte_offset + block.size] = bytes(block.size - 4)
    (d / "bad.h5ad").write_bytes(bytes(data))
    assert main(["pseudobulk", str(d / "bad.h5ad"), "-o", str(d / "pb.npz")]) == 1
    line = one_error_line(capsys.readouterr().err, "pseudobulk")
    assert "bad.h5ad: cannot read its data (" in line and "corrupt" in line
    table = pd.DataFrame(tenx.X, index=tenx.ids, columns=[f"g{j}" for j in range(6)])
    table.iloc[3, 2] = np.nan
    table.to_csv(d / "x.tsv", sep="\t")
    assert main(["pseudobulk", str(d / "x.tsv"), "--cells", str(d / "cells.tsv"),
                 "-o", str(d / "pb.npz")]) == 1  # fmt: skip
    line = one_error_line(capsys.readouterr().err, "pseudobulk")
    assert "x.tsv: 1 non-finite values" in line and "(cell 'AAAC00003-1', gene 'g2')" in line


def one_gene_files(tmp_path, seed):
    """The original's one-gene files (y, P, ctnu) plus cell counts, 30 donors x 3 cell types:
    the arrays and the `--y=... --P=... --ctnu=... --n-cells=...` arguments."""
    rng = np.random.default_rng(seed)
    N, C = 30, 3
    n_cells = rng.integers(5, 40, size=(N, C)).astype(float)
    P = rng.dirichlet(np.ones(C), size=N)
    Y = rng.normal(size=(N, C)) + rng.normal(size=(N, 1))
    ctnu = rng.gamma(4.0, 0.25, size=(N, C)) / n_cells
    files = {"y": Y, "P": P, "ctnu": ctnu, "n-cells": n_cells}
    for name, values in files.items():
        np.savetxt(tmp_path / f"{name}.txt", values)
    return files, [f"--{k}={tmp_path / k}.txt" for k in files]


def test_original_files_with_cell_counts_pool_the_noise(tmp_path, capsys):
    """--n-cells with the original's one-gene files: the fit pools the noise (no plug-in
    warning) and equals the library's fit of the same arrays with their cell counts."""
    files, args = one_gene_files(tmp_path, 5)
    Y, P, ctnu, n_cells = files.values()
    out = tmp_path / "one.tsv"
    assert main(["fit", "-q", *args, "--model", "free", "-o", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    one = cj.CTPData.from_arrays(Y[None], ctnu[None], P, genes=["gene"], n_cells=n_cells)
    expected = cj.fit(one, "free", "reml").table
    assert json.loads(Path(f"{out}.json").read_text())["noise"] == "pooled"
    np.testing.assert_allclose(numeric(read(out)), numeric(expected), **TIGHT)
    op = ["fit", "-q", *args[:2], f"--nu={tmp_path / 'y.txt'}", args[3], "--shape", "op"]
    assert main([*op, "-o", str(out), "--force"]) == 1
    assert "--n-cells" in one_error_line(capsys.readouterr().err, "fit")
    assert main(["fit", "-q", "pb.npz", args[3], "-o", str(out), "--force"]) == 1
    assert "--n-cells" in one_error_line(capsys.readouterr().err, "fit")


def test_cells_noise_from_the_command_line(tmp_path, capsys):
    """--noise cells: the library's exact cells likelihood (s2_<ct> columns, the sidecar names
    it); refused with HE and without cell counts, each with a one-line error."""
    files, args = one_gene_files(tmp_path, 6)
    Y, P, ctnu, n_cells = files.values()
    C = P.shape[1]
    out = tmp_path / "cells.tsv"
    assert main(["fit", "-q", *args, "--model", "free", "--noise", "cells", "-o", str(out)]) == 0
    one = cj.CTPData.from_arrays(Y[None], ctnu[None], P, genes=["gene"], n_cells=n_cells)
    expected = cj.fit(one, "free", "reml", noise="cells").table
    table = read(out)
    assert [f"s2_ct{c}" for c in range(C)] == [c for c in table if c.startswith("s2_")]
    assert json.loads(Path(f"{out}.json").read_text())["noise"] == "cells"
    np.testing.assert_allclose(numeric(table), numeric(expected), **TIGHT)
    he = ["fit", "-q", *args, "--noise", "cells", "--method", "he", "-o", str(out), "--force"]
    assert main(he) == 1
    assert "use method='ml' or 'reml'" in one_error_line(capsys.readouterr().err, "fit")
    assert main(["fit", "-q", *args[:3], "--noise", "cells", "-o", str(out), "--force"]) == 1
    assert "--noise cells: needs cell counts" in one_error_line(capsys.readouterr().err, "fit")
