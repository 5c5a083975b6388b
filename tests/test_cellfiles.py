"""Reading single cells from files (ctmm_jax.cellfiles), as scanpy users expect: issue 18 #14
(10x folders and features, gzip, truncated files) and #15 (byte-order marks, a donor "NA")."""

import gzip

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from tenx import FEATURES, GENE_IDS, GEX, SYMBOLS, mtx_bytes, write_10x, write_text

from ctmm_jax import cellfiles


def counts(n_cells=12, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (n_cells, len(FEATURES))).astype(float)


@pytest.mark.parametrize("gz", [False, True])
def test_features_give_symbols_made_unique_or_ids(tmp_path, gz):
    """Issue 18 #14: a gzipped features.tsv.gz was read as UTF-8 text ("can't decode byte
    0x8b") and a plain one gave whole lines as names."""
    path = write_text(tmp_path / "features.tsv", ["\t".join(f) for f in FEATURES], gz=gz)
    names, keep = cellfiles.read_features(path)
    assert [names[i] for i in np.flatnonzero(keep)] == SYMBOLS
    assert keep.tolist() == [True, True, True, True, False, True]
    names, _ = cellfiles.read_features(path, "gene_ids")
    assert [names[i] for i in GEX] == GENE_IDS
    with pytest.raises(ValueError, match="var_names: expected one of"):
        cellfiles.read_features(path, "symbols")


def test_repeated_gene_ids_and_ragged_files_are_refused(tmp_path):
    path = write_text(tmp_path / "f.tsv", ["A\tX", "A\tY"])
    with pytest.raises(ValueError, match=r"f.tsv: gene ids must be unique; repeated: \['A'\]"):
        cellfiles.read_features(path, "gene_ids")
    assert cellfiles.read_features(path) == (["X", "Y"], None)
    with pytest.raises(ValueError, match="some lines have one tab-separated field"):
        cellfiles.read_features(write_text(tmp_path / "g.tsv", ["A\tX", "B"]))


def test_gene_lists_with_a_byte_order_mark(tmp_path):
    """Issue 18 #15: a BOM (Excel's UTF-8) was part of the first gene's name."""
    path = write_text(tmp_path / "genes.txt", ["CD3E", "", "MS4A1 "], bom=True)
    assert cellfiles.read_features(path) == (["CD3E", "MS4A1"], None)
    assert cellfiles.read_lines(write_text(tmp_path / "b.gz", ["AAAC-1"], gz=True, bom=True)) == [
        "AAAC-1"
    ]
    (tmp_path / "latin1.txt").write_bytes("CD3E\nG\xe9ne\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        cellfiles.read_lines(tmp_path / "latin1.txt")


@pytest.mark.parametrize("v3", [True, False])
def test_10x_folder_as_scanpy(tmp_path, v3):
    X = counts()
    cells = [f"AAAC{i:04d}-1" for i in range(len(X))]
    got, genes, barcodes = cellfiles.read_10x(write_10x(tmp_path / "10x", X, cells, v3=v3))
    assert barcodes == cells
    if v3:  # gene expression only, as scanpy's gex_only=True
        assert genes == SYMBOLS
        np.testing.assert_array_equal(got.toarray(), X[:, GEX])
    else:  # v2 has no feature types: everything
        assert genes == ["CD3E", "MT-X", "MT-X-2", "MT-X-1", "CD4", "MS4A1"]
        np.testing.assert_array_equal(got.toarray(), X)
    _, ids, _ = cellfiles.read_10x(tmp_path / "10x", "gene_ids")
    assert ids[:4] == GENE_IDS[:4]


def test_10x_folder_with_missing_or_mismatched_files(tmp_path):
    folder = write_10x(tmp_path / "10x", counts(), [f"c{i}" for i in range(12)])
    write_text(folder / "barcodes.tsv.gz", ["c0", "c1"], gz=True)
    with pytest.raises(ValueError, match=r"is 6 genes x 12 cells, but .* barcodes.tsv.gz 2"):
        cellfiles.read_10x(folder)
    (folder / "barcodes.tsv.gz").unlink()
    with pytest.raises(ValueError, match=r"not a 10x matrix folder: .*found \['features.tsv.gz'"):
        cellfiles.read_10x(folder)


def test_truncated_or_corrupt_files_are_named(tmp_path):
    X = sparse.random(40, 30, density=0.3, format="coo", random_state=0)
    whole = mtx_bytes(X)
    (tmp_path / "cut.mtx").write_bytes(whole[: whole.index(b"\n", len(whole) // 2) + 1])
    (tmp_path / "cut.mtx.gz").write_bytes(gzip.compress(whole)[:300])
    (tmp_path / "gz_without_suffix.mtx").write_bytes(gzip.compress(whole))
    for name in ("cut.mtx", "cut.mtx.gz"):
        with pytest.raises(
            ValueError, match=rf"{name}: cannot read as a Matrix Market .*truncated"
        ):
            cellfiles.read_mtx(tmp_path / name)
    np.testing.assert_allclose(cellfiles.read_mtx(tmp_path / "gz_without_suffix.mtx").toarray(),
                               X.toarray())  # fmt: skip


def test_truncated_h5ad_is_named(tmp_path):
    anndata = pytest.importorskip("anndata")
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(sparse.csr_matrix(counts())).write_h5ad(path)
    (tmp_path / "cut.h5ad").write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cut.h5ad: cannot read as .h5ad .*truncated"):
        cellfiles.read_h5ad(tmp_path / "cut.h5ad")
    assert cellfiles.read_h5ad(path).n_obs == 12


@pytest.mark.parametrize("sep, name", [("\t", "cells.tsv"), (",", "cells.csv.gz")])
def test_cell_table_keeps_na_labels_and_takes_an_unnamed_first_column_as_ids(tmp_path, sep,
                                                                             name):  # fmt: skip
    """Issue 18 #15: donor "NA" (or "None") was read as missing; only empty fields are."""
    lines = [sep.join(r) for r in [["", "donor", "cell_type"], ["c1", "NA", "T"],
                                   ["c2", "None", "B"], ["c3", "", "T"]]]  # fmt: skip
    path = write_text(tmp_path / name, lines, gz=name.endswith(".gz"), bom=True)
    table = cellfiles.read_cells(path)
    assert list(table.columns) == ["donor", "cell_type"] and list(table.index) == ["c1", "c2", "c3"]
    assert table.donor.iloc[:2].tolist() == ["NA", "None"] and pd.isna(table.donor.iloc[2])
    named = write_text(tmp_path / "named.tsv", ["barcode\tdonor", "007\tNA"])
    assert cellfiles.read_cells(named).to_dict("list") == {"barcode": ["007"], "donor": ["NA"]}
