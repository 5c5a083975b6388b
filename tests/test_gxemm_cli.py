"""`ctmm-jax gxemm` on named inputs (issue 16): PLINK genotypes, an expression table and a
donor table, each in its own row order, matched by donor id. The end-to-end runs equal direct
`gxemm.fit` calls on the arrays matched by hand; mistakes are one line, before any fit."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ctmm_jax import gxemm
from ctmm_jax.cli import main
from ctmm_jax.files import sha256_file
from ctmm_jax.gxemm import tables

bed_reader = pytest.importorskip("bed_reader", reason="bed-reader (extra 'plink') not installed")

N, M = 60, 20  # tests/test_gxemm.py's _data() sizes
TIGHT = dict(rtol=1e-8, atol=1e-10)
COLUMNS = [
    "sig2g_hom", "se_sig2g_hom", "sig2g_1", "se_sig2g_1", "sig2g_2", "se_sig2g_2",
    "sig2e_hom", "se_sig2e_hom", "h2_1", "se_h2_1", "h2_2", "se_h2_2",
    "ll", "converged", "n_iter", "status", "message", "ll_hom", "status_hom",
    "p_gxe_wald", "q_gxe_wald", "p_gxe_lrt", "q_gxe_lrt",
]  # fmt: skip


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ctmm-jax gxemm: error: "), err
    return lines[0]


def numeric(table: pd.DataFrame) -> np.ndarray:
    return table.select_dtypes("number").to_numpy(np.float64)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> SimpleNamespace:
    """Donors in the simulation's order (ids "000".."059", one named "NA"), with sex as the
    environment; written as PLINK files (two more genotyped individuals, shuffled), an
    expression table genes x donors (columns shuffled; a constant gene) and a donor table
    (rows shuffled)."""
    d = tmp_path_factory.mktemp("gx")
    rng = np.random.default_rng(0)
    ids = [f"{i:03d}" for i in range(N)]
    ids[7] = "NA"
    g = rng.binomial(2, 0.3, size=(N + 2, M)).astype(np.float32)
    fam = ids + ["x1", "x2"]
    order = rng.permutation(N + 2)
    prefix = str(d / "geno")
    bed_reader.to_bed(f"{prefix}.bed", g[order],
                      properties={"iid": [fam[i] for i in order],
                                  "sid": [f"v{j}" for j in range(M)]})  # fmt: skip
    sex = rng.permutation(np.repeat([2, 1], N // 2))
    donors = pd.DataFrame({"iid": ids, "age": rng.uniform(20, 80, N).round(1),
                           "PC1": rng.normal(0, 1e-3, N), "sex": sex, "batch": "b1",
                           "group": np.tile(["hom", "het"], N // 2)})  # fmt: skip
    donors.iloc[rng.permutation(N)].to_csv(d / "donors.tsv", sep="\t", index=False)
    Z = np.stack([sex == 1, sex == 2], axis=1).astype(float)
    K = gxemm.grm(prefix, ids=ids).K
    L = np.linalg.cholesky(K + 1e-6 * np.eye(N))

    def trait():  # sex effect, shared and sex-2-specific genetic effects, noise
        shared, specific = L @ rng.normal(size=N), L @ rng.normal(size=N)
        return Z @ [0.3, -0.2] + 0.7 * shared + specific * Z[:, 1] + rng.normal(size=N)

    y = np.stack([trait() for _ in range(3)])
    y = np.insert(y, 1, 5.0, axis=0)  # a constant gene: status 'constant'
    genes = ["ENSG3", "ENSG1", "ENSG2", "ENSG0"]
    expr = pd.DataFrame(y, index=pd.Index(genes, name="gene_id"), columns=ids)
    expr[list(np.array(ids)[rng.permutation(N)])].to_csv(d / "expr.tsv", sep="\t")
    X = np.column_stack([donors["age"], donors["PC1"], Z[:, 0]])  # sex's main effect: level 1
    return SimpleNamespace(dir=d, prefix=prefix, ids=ids, y=y, genes=genes, X=X, K=K, Z=Z,
                           donors=donors)  # fmt: skip


def gx(study, *args: str, out: str = "out.tsv") -> list[str]:
    base = ["gxemm", "-q", "--bfile", study.prefix, "--y", str(study.dir / "expr.tsv"),
            "--donors", str(study.dir / "donors.tsv"), "--donor-col", "iid"]  # fmt: skip
    return [*base, *args, "-o", str(study.dir / out), "--force"]


def test_named_inputs_equal_direct_fits_on_matched_arrays(study, capsys):
    argv = gx(study, "--covars", "age,PC1", "--env", "sex", "--gtype", "free")
    assert main(argv) == 0, capsys.readouterr().err
    got = pd.read_csv(study.dir / "out.tsv", sep="\t", index_col=0)
    free = gxemm.fit(study.y, study.X, study.K, study.Z, gtype="free")
    hom = gxemm.fit(study.y, study.X, study.K, study.Z, gtype="hom")
    expected = free.named_table(["1", "2"], hom=hom)
    assert list(got.columns) == COLUMNS == list(expected.columns)
    assert list(got.index) == study.genes and got.index.name == "gene"
    np.testing.assert_allclose(numeric(got), numeric(expected), **TIGHT)
    assert list(got["status"]) == ["ok", "constant", "ok", "ok"]
    assert got.loc["ENSG1"].drop(["status", "message", "status_hom"]).isna().sum() > 10
    assert got["converged"].sum() == 3 and np.isfinite(got["p_gxe_lrt"]).sum() == 3
    meta = json.loads((study.dir / "out.tsv.json").read_text())
    assert meta["env_levels"] == ["1", "2"] and meta["env_effects"] == ["sex=1"]
    assert meta["covars"] == ["age", "PC1"] and meta["lrt"] is True and meta["n_donors"] == N
    assert meta["y_layout"] == "genes x donors" and meta["n_variants"] == M
    assert meta["input_sha256"] == {
        "y": sha256_file(study.dir / "expr.tsv"), "donors": sha256_file(study.dir / "donors.tsv"),
        **{f"bfile{e}": sha256_file(f"{study.prefix}{e}") for e in (".bed", ".bim", ".fam")},
    }  # fmt: skip
    assert set(meta["tests"]) == {"p_gxe_wald", "p_gxe_lrt"}
    vif = gxemm.kernel_vif(study.K, study.Z, "free", "hom", levels=["1", "2"])
    assert meta["kernel_vif"] == pytest.approx(vif, rel=1e-10) and meta["weakly_identified"] == []
    assert "warning" not in capsys.readouterr().err
    dictionary = pd.read_csv(study.dir / "out.tsv.columns.tsv", sep="\t")
    assert list(dictionary["column"]) == COLUMNS
    assert "K o z z^T" in dictionary.set_index("column").loc["sig2g_2", "meaning"]


def test_kinship_table_instead_of_bfile(study, capsys):
    """--K as a table with donor ids (rows and columns in another order than the others)."""
    order = list(np.array(study.ids)[np.random.default_rng(5).permutation(N)])
    K = pd.DataFrame(study.K, index=study.ids, columns=study.ids).loc[order, order[::-1]]
    K.to_csv(study.dir / "K.tsv", sep="\t")
    argv = gx(study, "--covars", "age,PC1", "--env", "sex", "--gtype", "free", out="k.tsv")
    i = argv.index("--bfile")
    argv[i : i + 2] = ["--K", str(study.dir / "K.tsv")]
    assert main(argv) == 0, capsys.readouterr().err
    got = pd.read_csv(study.dir / "k.tsv", sep="\t", index_col=0)
    free = gxemm.fit(study.y, study.X, study.K, study.Z, gtype="free")
    hom = gxemm.fit(study.y, study.X, study.K, study.Z, gtype="hom")
    expected = free.named_table(["1", "2"], hom=hom)
    np.testing.assert_allclose(numeric(got), numeric(expected), **TIGHT)
    meta = json.loads((study.dir / "k.tsv.json").read_text())
    assert meta["input_sha256"]["K"] == sha256_file(study.dir / "K.tsv") and meta["bfile"] is None


def test_weakly_identified_gxe_is_one_warning_line(study, capsys):
    """Issue 16: K close to I (unrelated donors) makes K o z z^T nearly the noise kernel
    diag(z): one line on stderr names the GxE components with their VIFs (gxemm.kernel_vif),
    the sidecar records every VIF; the table is written as without the warning."""
    K = 0.95 * np.eye(N) + 0.05 * study.K
    pd.DataFrame(K, index=study.ids, columns=study.ids).to_csv(study.dir / "K_near_I.tsv",
                                                               sep="\t")  # fmt: skip
    argv = gx(study, "--covars", "age,PC1", "--env", "sex", "--gtype", "free", "--etype", "free",
              "--nonneg", out="weak.tsv")  # fmt: skip
    i = argv.index("--bfile")
    argv[i : i + 2] = ["--K", str(study.dir / "K_near_I.tsv")]
    assert main(argv) == 0
    vif = gxemm.kernel_vif(K, study.Z, "free", "free", levels=["1", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"ctmm-jax gxemm: warning: the GxE variance is weakly identified: kernel VIF sig2g_1 "
        f"{vif['sig2g_1']:.3g}, sig2g_2 {vif['sig2g_2']:.3g} (above 10 "
    ), err
    meta = json.loads((study.dir / "weak.tsv.json").read_text())
    assert meta["kernel_vif"] == pytest.approx(vif, rel=1e-10)
    assert meta["weakly_identified"] == ["sig2g_1", "sig2g_2"]
    got = pd.read_csv(study.dir / "weak.tsv", sep="\t", index_col=0)
    with pytest.warns(gxemm.IdentifiabilityWarning):
        free = gxemm.fit(study.y, study.X, K, study.Z, gtype="free", etype="free", nonneg=True)
    hom = gxemm.fit(study.y, study.X, K, study.Z, gtype="hom", etype="free", nonneg=True)
    expected = free.named_table(["1", "2"], hom=hom)
    np.testing.assert_allclose(numeric(got), numeric(expected), **TIGHT)


def test_bed_counts_logcpm_filter_and_intersect(study, capsys):
    """Counts as a BED-like .bed.gz with a donor that the other inputs lack, a donor table with
    a donor the expression lacks: --intersect uses the other 60 and says so; --normalize logcpm
    and --min-expressed 0.9 as computed here."""
    rng = np.random.default_rng(6)
    counts = rng.poisson(np.exp(4 + 0.5 * study.y[[0, 2, 3]]), size=(3, N)).astype(float)
    rare = (rng.random(N) < 0.3) * 4.0  # expressed in about 30% of the donors: filtered out
    counts = np.vstack([counts[:1], rare, counts[1:]])
    genes = ["g0", "rare", "g1", "g2"]
    ghost = rng.poisson(5, size=(4, 1))
    cols = study.ids + ["ghost"]
    body = pd.DataFrame(np.hstack([counts, ghost]).astype(int), columns=cols)
    order = list(np.array(cols)[rng.permutation(N + 1)])
    bed = pd.concat([pd.DataFrame({"#Chr": 1, "start": range(4), "end": range(1, 5),
                                   "phenotype_id": genes}), body[order]], axis=1)  # fmt: skip
    with gzip.open(study.dir / "expr.bed.gz", "wt") as f:
        bed.to_csv(f, sep="\t", index=False)
    extra = pd.concat([study.donors, study.donors.iloc[:1].assign(iid="lonely")])
    extra.to_csv(study.dir / "donors2.tsv", sep="\t", index=False)
    argv = gx(study, "--covars", "age,PC1", "--env", "sex", "--gtype", "free", "--intersect",
              "--normalize", "logcpm", "--min-expressed", "0.9", out="bed.tsv")  # fmt: skip
    argv[argv.index(str(study.dir / "expr.tsv"))] = str(study.dir / "expr.bed.gz")
    argv[argv.index(str(study.dir / "donors.tsv"))] = str(study.dir / "donors2.tsv")
    assert main(argv) == 0
    assert capsys.readouterr().err == (
        "ctmm-jax gxemm: --intersect: using the 60 donors in all inputs; 1 of --y left out, "
        f"1 of --donors left out, 2 of {study.prefix}.fam left out.\n"
    )
    got = pd.read_csv(study.dir / "bed.tsv", sep="\t", index_col=0)
    y = np.log1p(counts / counts.sum(0) * 1e6)
    keep = (counts > 0).mean(1) >= 0.9
    assert list(keep) == [True, False, True, True]
    free = gxemm.fit(y[keep], study.X, study.K, study.Z, gtype="free")
    hom = gxemm.fit(y[keep], study.X, study.K, study.Z, gtype="hom")
    expected = free.named_table(["1", "2"], hom=hom)
    assert list(got.index) == ["g0", "g1", "g2"]
    # a fit that stops at the positive-definite boundary (not converged) stops where rounding
    # takes it (the donors are in another order): compare the converged ones
    ok = (expected["converged"] & expected["status_hom"].eq("ok")).to_numpy()
    assert ok.sum() >= 2 and list(got["converged"]) == list(expected["converged"])
    np.testing.assert_allclose(numeric(got)[ok], numeric(expected)[ok], **TIGHT)
    meta = json.loads((study.dir / "bed.tsv.json").read_text())
    assert (meta["y_format"], meta["normalize"], meta["n_genes_in_y"]) == ("bed", "logcpm", 4)
    assert meta["left_out"] == {"--y": 1, "--donors": 1, f"{study.prefix}.fam": 2}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--covars": "age,PC9"}, "--covars: no column 'PC9' in"),
        ({"--env": "batch"}, "--env batch: one level ('b1') among the 60 donors used"),
        ({"--env": "age"}, "--env age: continuous values"),
        ({"--env": None}, "--gtype free --etype hom: needs environments; give --env"),
        ({"--K": "K.tsv"}, "give exactly one of --bfile"),
        ({"--bfile": None}, "give exactly one of --bfile"),
        ({"--donors": "renamed.tsv"},
         "1 of the 60 donors of --y are not in --donors ('NA'); 1 of the 60 donors of --donors "
         "are not in --y ('nA'). Donors are matched by name"),
        ({"--y": "other.tsv"}, "--y: neither its header nor its first column holds donor ids"),
        ({"--Z": "Z.txt"}, "--Z, --X: the original's number files"),
        ({"--lrt": "", "--gtype": "hom"}, "--lrt: tests --gtype iid or free against hom"),
        ({"--env": "group"}, "levels ['het', 'hom']: repeated, or a name that makes two"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_before_fitting(study, monkeypatch, capsys, change, message):
    monkeypatch.chdir(study.dir)
    Path("K.tsv").write_text("x\n")
    study.donors.assign(iid=study.donors.iid.replace("NA", "nA")).to_csv(
        "renamed.tsv", sep="\t", index=False
    )
    pd.DataFrame({"a": [1.0], "b": [2.0]}, index=["g"]).to_csv("other.tsv", sep="\t")
    options = {"--covars": "age,PC1", "--env": "sex", "--gtype": "free", **change}
    argv = gx(study)
    for flag in ("--bfile", "--y", "--donors"):
        if flag in change:
            i = argv.index(flag)
            del argv[i : i + 2]
    extra = [x for k, v in options.items() if v is not None for x in (k, v) if x != ""]
    assert main([*argv[:-3], *extra, *argv[-3:]]) == 1
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("layout", ["genes x donors", "no gene ids", "donors x genes", "bed"])
def test_expression_layouts_read_alike(tmp_path, layout):
    """The orientation comes from matching the ids; "007" and "NA" stay text."""
    donors = ["007", "NA", "10", "2"]
    y = pd.DataFrame([[1.5, 2, 3, 4], [0, 0, 1, 2]], index=["ga", "gb"], columns=donors)
    path = tmp_path / "y.tsv"
    if layout == "genes x donors":
        y.to_csv(path, sep="\t")
    elif layout == "no gene ids":
        y.to_csv(path, sep="\t", index=False)
    elif layout == "donors x genes":
        y.T.to_csv(path, sep="\t")
    else:
        y.insert(0, "phenotype_id", y.index)
        for c, v in (("end", 2), ("start", 1), ("#Chr", "22")):
            y.insert(0, c, v)
        y.to_csv(path, sep="\t", index=False)
    got = tables.read_expression(path, ["2", "007", "10", "NA", "99"])
    names = ["trait0", "trait1"] if layout == "no gene ids" else ["ga", "gb"]
    assert list(got.values.index) == names and list(got.values.columns) == donors
    np.testing.assert_array_equal(got.values.to_numpy(), [[1.5, 2, 3, 4], [0, 0, 1, 2]])
    assert got.fmt == ("bed" if layout == "bed" else "table")
    assert got.layout == ("donors x genes" if layout == "donors x genes" else "genes x donors")


def test_environments_levels_and_refusals():
    Z, levels = tables.environments(pd.Series(["10", "2", "2", "10", "1", "1"]))
    assert levels == ["1", "2", "10"]  # numbers, not text order
    np.testing.assert_array_equal(Z.argmax(1), [2, 1, 1, 2, 0, 0])
    _, levels = tables.environments(pd.Series(["NA", "b", "NA", "b"]))
    assert levels == ["NA", "b"]  # "NA" is a label
    with pytest.raises(ValueError, match="have a single donor"):
        tables.environments(pd.Series(["a", "a", "b"]))
    with pytest.raises(ValueError, match="2 donors have no value"):
        tables.environments(pd.Series(["a", "", "b", ""], index=list("pqrs")))
