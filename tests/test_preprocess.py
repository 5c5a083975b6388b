"""Pseudobulk and standardisation (ctmm_jax.preprocess) against pandas groupby references."""

import re
import warnings
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import sparse, stats

from ctmm_jax import preprocess
from ctmm_jax.data import CTPData, OPData
from ctmm_jax.preprocess import Pseudobulk, from_anndata, normalize_log1p, pseudobulk, std
from ctmm_jax.simulation import simulate_anndata, simulate_cells

# The cells here are Poisson counts on purpose (the groupby references take any numbers), which
# pseudobulk warns about; the tests of its warnings catch them with pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore::ctmm_jax.preprocess.ExpressionWarning")

# Cells per (donor, cell type): a single-cell pair (d2, NK), a two-cell pair (d3, NK), an empty
# pair (d4, NK) and a small donor d5 (4 cells). Cell types are listed unsorted on purpose.
DONORS = ["d0", "d1", "d2", "d3", "d4", "d5"]
TYPES = ["T", "B", "NK"]
COUNTS = np.array([[30, 20, 10], [25, 25, 25], [40, 19, 1], [50, 8, 2], [30, 37, 0], [2, 1, 1]])
G = 7


def make_cells(counts=COUNTS, seed=0):
    """(X, cells): Poisson counts with a mean per gene and cell type, cells in random order."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.repeat(DONORS, len(TYPES)), counts.ravel())
    ctype = np.repeat(np.tile(TYPES, len(DONORS)), counts.ravel())
    order = rng.permutation(len(donor))
    cells = pd.DataFrame({"donor": donor[order], "cell_type": ctype[order]})
    rate = rng.uniform(1.0, 8.0, (len(TYPES), G))[pd.Index(TYPES).get_indexer(cells.cell_type)]
    return rng.poisson(rate).astype(np.float64), cells


@pytest.fixture(scope="module")
def data():
    return make_cells()


def groupby_reference(X, cells, keys):
    """Mean, var(ddof=1) and size of each group of cells, by pandas."""
    df = pd.DataFrame(X, columns=[f"gene{j}" for j in range(X.shape[1])])
    df[keys] = cells[keys].to_numpy()
    g = df.groupby(keys)
    return g.mean(), g.var(ddof=1), g.size()


def assert_same(a: Pseudobulk, b: Pseudobulk, rtol=1e-13):
    assert (a.genes, a.donors, a.cell_types) == (b.genes, b.donors, b.cell_types)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.mask, b.mask)
    for f in ("ctp", "ctnu", "P", "op", "nu"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=rtol, atol=1e-14, err_msg=f)


def test_pseudobulk_equals_pandas_groupby(data):
    X, cells = data
    pb = pseudobulk(X, cells)
    mean, var, size = groupby_reference(X, cells, ["donor", "cell_type"])
    assert pb.donors == tuple(DONORS) and pb.cell_types == ("B", "NK", "T")
    assert pb.ctp.shape == pb.ctnu.shape == (G, 6, 3) and pb.op.shape == pb.nu.shape == (G, 6)
    col = [TYPES.index(c) for c in pb.cell_types]
    np.testing.assert_array_equal(pb.counts, COUNTS[:, col])
    for i, d in enumerate(pb.donors):
        for c, t in enumerate(pb.cell_types):
            if size.get((d, t), 0) < 2:
                continue
            np.testing.assert_allclose(pb.ctp[:, i, c], mean.loc[(d, t)], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(
                pb.ctnu[:, i, c], var.loc[(d, t)] / size[(d, t)], rtol=1e-12, atol=1e-12
            )
    np.testing.assert_allclose(pb.P, pb.counts / pb.counts.sum(1, keepdims=True), rtol=1e-15)
    np.testing.assert_allclose(pb.P.sum(1), 1.0, rtol=1e-15)


@pytest.mark.parametrize(
    "fmt", [np.asarray, sparse.csr_matrix, sparse.csc_matrix, sparse.coo_matrix, sparse.csr_array]
)
@pytest.mark.parametrize("chunk_size", [1, 3, 2000])
def test_dense_sparse_and_chunks_agree(data, fmt, chunk_size):
    X, cells = data
    assert_same(pseudobulk(fmt(X), cells, chunk_size=chunk_size), pseudobulk(X, cells))


@pytest.mark.parametrize("sparse_columns", [False, True])
def test_pandas_table_input(data, sparse_columns):
    X, cells = data
    table = pd.DataFrame(X, columns=[f"g{j}" for j in range(G)])
    if sparse_columns:
        table = table.astype(pd.SparseDtype(np.float64, 0.0))
    assert_same(pseudobulk(table, cells), pseudobulk(X, cells, genes=list(table.columns)))


def test_duplicate_and_unsorted_sparse_entries(data):
    """Duplicate entries add up (scipy's convention), also in the squares; order is irrelevant."""
    X, cells = data
    r, c = np.nonzero(X)
    half = np.floor(X[r, c] / 2)
    rows, cols = np.r_[r, r][::-1], np.r_[c, c][::-1]  # each entry split in two, reversed
    coo = sparse.coo_matrix((np.r_[half, X[r, c] - half][::-1], (rows, cols)), shape=X.shape)
    by_col = np.argsort(cols, kind="stable")  # grouped by column, rows still descending
    indptr = np.r_[0, np.cumsum(np.bincount(cols, minlength=G))]
    raw_csc = sparse.csc_matrix((coo.data[by_col], rows[by_col], indptr), shape=X.shape)
    by_row = np.argsort(rows, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(X)))]
    raw_csr = sparse.csr_matrix((coo.data[by_row], cols[by_row], indptr), shape=X.shape)
    assert not raw_csc.has_canonical_format and not raw_csr.has_canonical_format
    for Xs in (coo, raw_csc, raw_csr):
        assert_same(pseudobulk(Xs, cells, chunk_size=3), pseudobulk(X, cells))


def test_integer_and_list_input(data):
    X, cells = data
    assert_same(pseudobulk(sparse.csr_matrix(X.astype(np.int32)), cells), pseudobulk(X, cells))
    assert_same(pseudobulk(X.tolist(), cells), pseudobulk(X, cells))


@pytest.mark.parametrize(
    "ind_cut, dropped", [(0, []), (3, []), (4, ["d5"]), (60, ["d0", "d2", "d3", "d5"])]
)
def test_ind_cut_drops_donors_with_few_cells(data, ind_cut, dropped):
    X, cells = data
    full, pb = pseudobulk(X, cells), pseudobulk(X, cells, ind_cut=ind_cut)
    kept = [d for d in DONORS if d not in dropped]
    assert pb.donors == tuple(kept)
    i = [DONORS.index(d) for d in kept]
    np.testing.assert_array_equal(pb.counts, full.counts[i])
    np.testing.assert_allclose(pb.ctp, full.ctp[:, i], rtol=1e-13)
    np.testing.assert_allclose(pb.op, full.op[:, i], rtol=1e-13)


def test_ind_cut_drops_a_cell_type_left_without_cells():
    counts = COUNTS.copy()
    counts[:, 2], counts[5, 2] = 0, 3  # cell type NK only in the small donor d5
    X, cells = make_cells(counts)
    assert pseudobulk(X, cells).cell_types == ("B", "NK", "T")
    assert pseudobulk(X, cells, ind_cut=6).cell_types == ("B", "T")


@pytest.mark.parametrize("ct_cut", [0, 1, 2, 8])
def test_ct_cut_masks_pairs_with_few_cells(data, ct_cut):
    X, cells = data
    pb, full = pseudobulk(X, cells, ct_cut=ct_cut), pseudobulk(X, cells)
    # pairs with one cell have no sample variance: missing whatever ct_cut
    np.testing.assert_array_equal(pb.mask, pb.counts > max(ct_cut, 1))
    assert not pb.mask.all()
    assert np.isnan(pb.ctp[:, ~pb.mask]).all() and np.isnan(pb.ctnu[:, ~pb.mask]).all()
    assert np.isfinite(pb.ctp[:, pb.mask]).all() and np.isfinite(pb.ctnu[:, pb.mask]).all()
    np.testing.assert_allclose(pb.ctp[:, pb.mask], full.ctp[:, pb.mask], rtol=1e-15)
    # proportions and the overall pseudobulk still use every cell of the donor
    np.testing.assert_array_equal(pb.counts, full.counts)
    np.testing.assert_array_equal(pb.P, full.P)
    np.testing.assert_array_equal(pb.op, full.op)
    np.testing.assert_array_equal(pb.nu, full.nu)


def test_equal_values_give_zero_not_negative_ctnu(data):
    """Rounding in Q - S * mean must not make a negative variance."""
    X, cells = data
    X = X.copy()
    X[:, 4] = 0.1
    pb = pseudobulk(sparse.csr_matrix(X), cells)
    assert (pb.ctnu[4][pb.mask] >= 0).all() and (pb.ctnu[4][pb.mask] < 1e-15).all()
    assert (pb.nu[4] >= 0).all() and (pb.nu[4] < 1e-15).all()


def test_op_and_nu_as_the_original(data):
    """op_i = sum_c P_ic ctp_ic = mean of all donor i's cells; nu_i = sum_c P_ic^2 ctnu_ic,
    with single-cell pairs adding nothing to nu."""
    X, cells = data
    pb = pseudobulk(X, cells, ct_cut=5)
    donor_mean = groupby_reference(X, cells, ["donor"])[0]
    mean, var, size = groupby_reference(X, cells, ["donor", "cell_type"])
    for i, d in enumerate(pb.donors):
        np.testing.assert_allclose(pb.op[:, i], donor_mean.loc[d], rtol=1e-12)
        op, nu = np.zeros(G), np.zeros(G)
        for t in pb.cell_types:
            n = size.get((d, t), 0)
            p = n / size[d].sum()
            op += p * mean.loc[(d, t)].to_numpy() if n else 0.0
            nu += p**2 * var.loc[(d, t)].to_numpy() / n if n > 1 else 0.0
        np.testing.assert_allclose(pb.op[:, i], op, rtol=1e-12)
        np.testing.assert_allclose(pb.nu[:, i], nu, rtol=1e-12)


def test_std_standardises_op_and_scales_the_rest(data):
    X, cells = data
    pb = pseudobulk(X, cells)
    s = std(pb)
    np.testing.assert_allclose(s.op.mean(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(s.op.var(1, ddof=1), 1.0, rtol=1e-12)
    m, sd = pb.op.mean(1), pb.op.std(1, ddof=1)
    np.testing.assert_allclose(s.ctp, (pb.ctp - m[:, None, None]) / sd[:, None, None], rtol=1e-12)
    np.testing.assert_allclose(s.ctnu, pb.ctnu / sd[:, None, None] ** 2, rtol=1e-12)
    np.testing.assert_allclose(s.nu, pb.nu / sd[:, None] ** 2, rtol=1e-12)
    # op = sum_c P_c ctp_c and nu = sum_c P_c^2 ctnu_c still hold on fully observed donors
    full = pb.mask.all(1)
    assert full.sum() >= 2
    np.testing.assert_allclose(
        s.op[:, full], np.einsum("gnc,nc->gn", s.ctp[:, full], s.P[full]), atol=1e-12
    )
    np.testing.assert_allclose(
        s.nu[:, full], np.einsum("gnc,nc->gn", s.ctnu[:, full], s.P[full] ** 2), rtol=1e-12
    )
    np.testing.assert_array_equal(s.mask, pb.mask)
    np.testing.assert_array_equal(s.P, pb.P)


def test_std_rejects_a_gene_with_constant_op(data):
    X, cells = data
    X = X.copy()
    X[:, 4] = 2.0
    with pytest.raises(ValueError, match="constant across donors.*'gene4'"):
        std(pseudobulk(X, cells))


def test_std_needs_two_donors(data):
    with pytest.raises(ValueError, match="std: needs at least 2 donors"):
        std(pseudobulk(*data, ind_cut=74))


def test_to_ctp_and_to_op(data):
    X, cells = data
    # ind_cut=4 drops d5, whose only multi-cell pair has equal values for one gene (nu = 0)
    pb = pseudobulk(X, cells, ind_cut=4, ct_cut=2)
    ctp = pb.to_ctp()
    assert isinstance(ctp, CTPData) and ctp.shape == (G, 5, 3)
    assert (ctp.genes, ctp.donors, ctp.celltypes) == (pb.genes, pb.donors, pb.cell_types)
    np.testing.assert_array_equal(ctp.mask, np.broadcast_to(pb.mask, (G, 5, 3)))
    np.testing.assert_array_equal(ctp.Y[:, pb.mask], pb.ctp[:, pb.mask])
    np.testing.assert_array_equal(ctp.ctnu[:, pb.mask], pb.ctnu[:, pb.mask])
    np.testing.assert_array_equal(ctp.P, pb.P)
    op = pb.to_op()
    assert isinstance(op, OPData) and op.shape == (G, 5, 3)
    np.testing.assert_array_equal(op.y, pb.op)
    np.testing.assert_array_equal(op.nu, pb.nu)
    assert op.donors == pb.donors and op.celltypes == pb.cell_types


def test_zero_variance_values_are_missing_in_plugin_fits(data):
    """A pair whose cells are all equal (ctnu = 0) and a donor whose cells are all equal
    (nu = 0) keep their values in to_ctp / to_op; the plug-in noise model makes them missing,
    the pooled one gives them a positive noise variance (noise.py)."""
    from ctmm_jax import noise

    X, cells = data
    X = X.copy()
    X[(cells.donor == "d0").to_numpy() & (cells.cell_type == "B").to_numpy(), 2] = 0.0
    X[(cells.donor == "d1").to_numpy(), 3] = 5.0
    pb = pseudobulk(X, cells, ct_cut=2)
    assert pb.ctnu[2, 0, pb.cell_types.index("B")] == 0 and pb.nu[3, 1] == 0
    expected = pb.mask & ~((np.arange(G) == 2)[:, None, None] & (np.arange(6)[:, None] == 0)
                           & (np.array(pb.cell_types) == "B"))  # fmt: skip
    expected[3, 1] = False  # all of d1's cells equal for gene 3
    np.testing.assert_array_equal(pb.observed, expected)
    ctp = pb.to_ctp()
    np.testing.assert_array_equal(ctp.mask, np.broadcast_to(pb.mask, ctp.shape))
    plugin = noise.apply(ctp, "plugin").data
    np.testing.assert_array_equal(plugin.mask, expected)
    np.testing.assert_array_equal(plugin.Y[expected], pb.ctp[expected])
    pooled = noise.apply(ctp, "pooled").data
    np.testing.assert_array_equal(pooled.mask, np.broadcast_to(pb.mask, ctp.shape))
    assert (pooled.ctnu > 0).all()
    op_plugin = noise.apply(pb.to_op(), "plugin").data
    np.testing.assert_array_equal(op_plugin.mask, pb.nu > 0)
    np.testing.assert_array_equal(op_plugin.y[op_plugin.mask], pb.op[op_plugin.mask])
    op_pooled = noise.apply(pb.to_op(), "pooled").data
    assert op_pooled.mask is None and (op_pooled.nu > 0).all()


def test_save_and_load_round_trip(data, tmp_path):
    pb = pseudobulk(*data, ct_cut=2, genes=list("abcdefg"))
    pb.save(tmp_path / "pb.npz")
    assert_same(Pseudobulk.load(tmp_path / "pb.npz"), pb, rtol=0)
    np.savez(tmp_path / "other.npz", ctp=pb.ctp)
    with pytest.raises(ValueError, match="not a ctmm_jax pseudobulk dataset"):
        Pseudobulk.load(tmp_path / "other.npz")


def test_a_damaged_dataset_is_a_value_error_naming_the_file(data, tmp_path):
    """Issue 18 #9: a truncated or corrupt file, or arrays of the wrong shape, raise ValueError
    naming the file (not BadZipFile, zlib.error or a later IndexError)."""
    pb = pseudobulk(*data)
    pb.save(tmp_path / "pb.npz")
    raw = (tmp_path / "pb.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    middle = len(raw) // 2
    (tmp_path / "corrupt.npz").write_bytes(raw[:middle] + bytes(64) + raw[middle + 64 :])
    with np.load(tmp_path / "pb.npz") as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(tmp_path / "shape.npz", **{**arrays, "ctp": arrays["ctp"][:, :2]})
    for name, problem in [("cut", "truncated or damaged"), ("empty", "the file is empty"),
                          ("corrupt", "truncated or damaged"),
                          ("shape", "ctp has dtype float64 and shape (7, 2, 3), expected shape "
                           "(7, 6, 3)")]:  # fmt: skip
        path = tmp_path / f"{name}.npz"
        with pytest.raises(ValueError, match=re.escape(f"{path}: {problem}")):
            Pseudobulk.load(path)


def test_integer_labels_are_ordered_as_numbers(data):
    """Issue 18 #15: donor ids 1, 2, 10 in that order (as text: 1, 10, 2); values follow their
    donors. Labels that are not all integers keep the text order."""
    X, cells = data
    ids = dict(zip(DONORS, ["10", "2", "1", "30", "4", "100"], strict=True))
    pb = pseudobulk(X, cells.assign(donor=cells["donor"].map(ids)))
    assert pb.donors == ("1", "2", "4", "10", "30", "100")
    by_name = pseudobulk(X, cells)
    order = [DONORS.index(d) for d in ("d2", "d1", "d4", "d0", "d3", "d5")]
    assert_same(pb, replace(by_name, donors=pb.donors, ctp=by_name.ctp[:, order],
                            ctnu=by_name.ctnu[:, order], counts=by_name.counts[order],
                            P=by_name.P[order], op=by_name.op[:, order],
                            nu=by_name.nu[:, order], mask=by_name.mask[order]))  # fmt: skip
    mixed = pseudobulk(X, cells.assign(donor=cells["donor"].map({**ids, "d5": "x"})))
    assert mixed.donors == ("1", "10", "2", "30", "4", "x")


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_normalize_log1p(data, fmt):
    X = data[0].copy()
    X[0] = 0.0  # a cell with no counts stays 0
    expected = np.zeros_like(X)
    expected[1:] = np.log1p(X[1:] / X[1:].sum(axis=1, keepdims=True) * 1e4)
    got = normalize_log1p(X if fmt == "dense" else sparse.csr_matrix(X))
    assert sparse.issparse(got) == (fmt == "csr")
    np.testing.assert_allclose(got.toarray() if fmt == "csr" else got, expected, rtol=1e-14)
    X[2, 3] = -1.0
    with pytest.raises(ValueError, match="counts: 1 negative values"):
        normalize_log1p(X if fmt == "dense" else sparse.csr_matrix(X))


def test_simulate_cells_is_seeded_and_structured():
    V = np.zeros((6, 3))
    V[3:] = 0.2
    counts, cells, genes = simulate_cells(6, 5, 3, V=V, seed=1)
    again = simulate_cells(6, 5, 3, V=V, seed=1)
    assert (counts != again[0]).nnz == 0 and cells.equals(again[1]) and genes == again[2]
    assert counts.shape == (len(cells), 6) and genes == [f"gene{g}" for g in range(6)]
    assert set(cells.donor) == {f"ind{i}" for i in range(5)}
    assert set(cells.cell_type) <= {"ct0", "ct1", "ct2"}
    assert (cells.n_counts >= np.asarray(counts.sum(axis=1)).ravel()).all()
    adata = simulate_anndata(6, 5, 3, V=V, seed=1)
    expected = normalize_log1p(counts, total=cells.n_counts.to_numpy())
    np.testing.assert_allclose(adata.X.toarray(), expected.toarray(), rtol=1e-15)
    assert (adata.layers["counts"] != counts).nnz == 0 and list(adata.var_names) == genes
    with pytest.raises(ValueError, match="variances must be >= 0"):
        simulate_cells(6, 5, 3, V=-0.1)


def test_select_genes(data):
    X, cells = data
    pb = pseudobulk(X, cells, genes=list("abcdefg"))
    sub = pb.select_genes([4, 1])
    assert sub.genes == ("e", "b")
    assert_same(sub, pseudobulk(X[:, [4, 1]], cells, genes=["e", "b"]))


def stand_in_anndata(X, cells, **layers):
    """What from_anndata reads of an AnnData: X, obs, var_names, layers."""
    var_names = pd.Index([f"g{j}" for j in range(X.shape[1])])
    return SimpleNamespace(X=X, obs=cells, var_names=var_names, layers=layers)


def test_from_anndata(data):
    X, cells = data
    expected = pseudobulk(X, cells, genes=[f"g{j}" for j in range(G)], ct_cut=3)
    adata = stand_in_anndata(sparse.csr_matrix(X), cells, counts=X)
    assert_same(from_anndata(adata, ct_cut=3), expected)
    assert_same(from_anndata(adata, layer="counts", ct_cut=3, chunk_size=2), expected)
    renamed = cells.rename(columns={"donor": "ind", "cell_type": "ct"}).astype("category")
    by_name = from_anndata(stand_in_anndata(X, renamed), donor="ind", cell_type="ct", ct_cut=3)
    assert_same(by_name, expected)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_from_anndata_streams_a_backed_file(data, fmt, tmp_path):
    """A backed .h5ad is read from disk in pieces (CSR: blocks of cells, here of 50; CSC and
    dense: chunks of genes) and gives the in-memory result."""
    anndata = pytest.importorskip("anndata")
    X, cells = data
    stored = X.astype(np.float32) if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(X)
    path = tmp_path / "cells.h5ad"
    obs = cells.astype(str).set_axis(cells.index.astype(str))
    anndata.AnnData(
        stored, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(G)])
    ).write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    expected = pseudobulk(np.asarray(stored, dtype=np.float64) if fmt == "dense" else X, cells,
                          genes=[f"g{j}" for j in range(G)])  # fmt: skip
    assert_same(from_anndata(backed, cell_block=50, chunk_size=3), expected, rtol=1e-12)


def test_from_anndata_missing_layer(data):
    X, cells = data
    with pytest.raises(ValueError, match=r"layer: 'raw' is not in adata.layers \(has \['counts'\]"):
        from_anndata(stand_in_anndata(X, cells, counts=X), layer="raw")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda X, c: (X[None], c), r"X: expected a 2-D cells x genes matrix, got shape \(1, "),
        (lambda X, c: (X[:, 0], c), r"X: expected a 2-D .* got shape \(326,\)"),
        (lambda X, c: (None, c), "X: got None"),
        (lambda X, c: (X, c.iloc[:-1]), "cells: has 325 rows but X has 326 rows"),
        (lambda X, c: (X, c.to_numpy()), "cells: expected a pandas DataFrame"),
        (
            lambda X, c: (X, c.rename(columns={"donor": "ind"})),
            r"cells: no column 'donor'; available columns: \['ind', 'cell_type'\].*donor=",
        ),
        (
            lambda X, c: (X, c.drop(columns="cell_type")),
            r"no column 'cell_type'; available columns: \['donor'\].*cell_type=",
        ),
        (lambda X, c: (X, c.assign(donor=c.donor.where(c.index > 0))), "1 cells have no label"),
    ],
)
def test_bad_input(data, change, match):
    X, cells = change(*data)
    with pytest.raises(ValueError, match=match):
        pseudobulk(X, cells)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"genes": ["a", "b"]}, r"genes: got 2 names but X has 7 columns"),
        ({"ind_cut": 75}, r"ind_cut: no donor left; .*ind_cut=75 .*the most is 75"),
        ({"chunk_size": 0}, "chunk_size, cell_block: must be >= 1"),
    ],
)
def test_bad_options(data, kw, match):
    with pytest.raises(ValueError, match=match):
        pseudobulk(*data, **kw)


def test_repr_is_short_and_names_the_shape(data):
    X, cells = data
    text = repr(pseudobulk(X, cells))
    assert len(text) < 300
    n_pairs = int((COUNTS > 1).sum())  # pairs of one cell have no variance: missing
    assert text == (
        f"Pseudobulk({G} genes x 6 donors x 3 cell types, {COUNTS.sum()} cells, "
        f"{n_pairs}/18 (donor, cell type) pairs observed)"
    )


# ------------------------------------------------------------------ issue 18 #5: cell ids


def barcodes(n):
    return [f"AAAC{i:05d}-1" for i in range(n)]


def test_cell_table_is_matched_by_id_not_position(data):
    """Issue 18 #5: a shuffled cell table with the cells' ids gives the unshuffled result,
    whether the ids are its index or a column, and X's ids come from row_ids, a DataFrame's
    index or an AnnData's obs_names."""
    X, cells = data
    ids = barcodes(len(X))
    expected = pseudobulk(X, cells)
    shuffled = cells.set_axis(ids).sample(frac=1, random_state=1)
    assert_same(pseudobulk(X, shuffled, row_ids=ids), expected)
    in_column = shuffled.rename_axis("barcode").reset_index()  # default index: no ids
    assert_same(pseudobulk(X, in_column, row_ids=ids, cell_id="barcode"), expected)
    table = pd.DataFrame(X, index=ids, columns=[f"gene{j}" for j in range(G)])
    assert_same(pseudobulk(table, shuffled), expected)
    adata = SimpleNamespace(X=X, obs=cells.set_axis(ids), var_names=pd.Index(expected.genes),
                            obs_names=pd.Index(ids), layers={})  # fmt: skip
    assert_same(from_anndata(adata, cells=shuffled), expected)
    # ids compared as text: integer ids match anndata's str obs_names
    numbered = cells.set_axis(np.arange(len(X)) + 10).iloc[::-1]
    assert_same(pseudobulk(X, numbered, row_ids=[str(i + 10) for i in range(len(X))]), expected)


def test_position_is_used_only_when_one_side_has_no_ids(data):
    X, cells = data
    expected = pseudobulk(X, cells)
    ids = barcodes(len(X))
    assert_same(pseudobulk(X, cells.set_axis(ids)), expected)  # X without ids
    assert_same(pseudobulk(X, cells, row_ids=ids), expected)  # default index 0..n-1
    default_obs = [str(i) for i in range(len(X))]  # anndata's default obs_names
    assert_same(pseudobulk(X, cells.set_axis(ids), row_ids=default_obs), expected)


@pytest.mark.parametrize(
    "ids, match",
    [
        (
            lambda ids: ids[:-3] + ["x1", "x2", "x3"],
            r"X and cells: the cell ids differ \(X's row ids vs cells.index\): 3 of X's 326 "
            r"cells are not in the cell table \(e.g. \['x1', 'x2', 'x3'\]\), 3 of its 326 rows "
            r"are not in X \(e.g. \['AAAC00323-1', ",
        ),
        (lambda ids: ids[:-1] + ids[:1], r"X's row ids: cell ids must be unique.*'AAAC00000-1'"),
    ],
)
def test_cell_ids_that_disagree_are_refused(data, ids, match):
    X, cells = data
    with pytest.raises(ValueError, match=match):
        pseudobulk(X, cells.set_axis(barcodes(len(X))), row_ids=ids(barcodes(len(X))))


def test_cell_table_with_more_cells_is_refused_by_id(data):
    X, cells = data
    bigger = pd.concat([cells, cells.iloc[:2]]).set_axis(barcodes(len(X) + 2))
    with pytest.raises(ValueError, match=r"0 of X's 326 cells .* 2 of its 328 rows are not in X"):
        pseudobulk(X, bigger, row_ids=barcodes(len(X)))
    with pytest.raises(ValueError, match="cells: no column 'barcode' .*cell_id"):
        pseudobulk(X, cells, row_ids=barcodes(len(X)), cell_id="barcode")


# ------------------------------------------------------- issue 18 #6: NaN/inf in X, every path


def backed(X, fmt, tmp_path):
    """X written to an .h5ad and read back in backed mode: CSR (streamed by blocks of cells),
    CSC or dense (by chunks of genes)."""
    anndata = pytest.importorskip("anndata")
    stored = X if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(X)
    path = tmp_path / f"{fmt}.h5ad"
    obs = pd.DataFrame(index=barcodes(len(X)))
    var = pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])])
    anndata.AnnData(stored, obs=obs, var=var).write_h5ad(path)
    return anndata.read_h5ad(path, backed="r")


FORMATS = ["dense", "csr", "csc", "backed csr", "backed csc", "backed dense"]


def as_format(X, fmt, tmp_path):
    if fmt.startswith("backed"):
        return backed(X, fmt.split()[1], tmp_path).X
    return X if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(X)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_expression_is_refused_in_every_reader_path(data, fmt, tmp_path):
    """Issue 18 #6: one NaN used to drop a (donor, cell type) pair from CTP and its donor from
    OP without a word; now a ValueError counts them and names the first cells and genes."""
    X, cells = data
    X = X.copy()
    X[5, 3], X[300, 0], X[7, 6] = np.nan, np.inf, -np.inf
    message = (
        r"X: 3 non-finite values \(NaN or inf\) in the cell-level expression, e.g. at "
        r"\(row 5, gene 'gene3'\), \(row 7, gene 'gene6'\), \(row 300, gene 'gene0'\)"
    )
    with pytest.raises(ValueError, match=message):
        pseudobulk(as_format(X, fmt, tmp_path), cells, chunk_size=3, cell_block=50)
    named = cells.set_axis(barcodes(len(X)))
    with pytest.raises(ValueError, match=r"counts.h5: 3 non-finite .* \(cell 'AAAC00005-1', gen"):
        pseudobulk(as_format(X, fmt, tmp_path), named, x_name="counts.h5", cell_block=50)


def test_nonfinite_values_are_found_while_streaming(data, tmp_path, monkeypatch):
    """The check rides on the pass that sums the blocks: a backed CSR file is read once."""
    X, cells = data
    X = X.copy()
    X[320, 2] = np.nan
    adata = backed(X, "csr", tmp_path)
    reads = []
    blocks = preprocess._row_blocks
    monkeypatch.setattr(preprocess, "_row_blocks", lambda *a: reads.append(1) or blocks(*a))
    with pytest.raises(ValueError, match=r"adata.X: 1 non-finite .*\(cell 'AAAC00320-1'"):
        from_anndata(adata, cells=cells.set_axis(barcodes(len(X))), cell_block=100)
    assert len(reads) == 1


# --------------------------------------- issue 18 #14: raw counts, negative values, normalize


def test_raw_counts_are_warned_about(data):
    X, cells = data
    with pytest.warns(preprocess.ExpressionWarning, match="non-negative integer: raw counts?"):
        pseudobulk(sparse.csr_matrix(X), cells)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normalised values: not a word
        pseudobulk(normalize_log1p(X), cells)
        pseudobulk(X, cells, normalize="log1p")


def test_negative_values_are_warned_about_not_refused(data):
    """Scaled expression is negative by design: a warning (counts and log-normalised values are
    never negative), and the pseudobulk is computed."""
    X, cells = data
    scaled = (X - X.mean(0)) / X.std(0)
    with pytest.warns(preprocess.ExpressionWarning, match=r"X: \d+ negative values"):
        pb = pseudobulk(scaled, cells)
    np.testing.assert_allclose(pb.op.mean(1), 0.0, atol=0.2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chunk_size", [2, 2000])
def test_normalize_log1p_while_streaming(data, fmt, chunk_size, tmp_path):
    """normalize='log1p' equals pseudobulk of normalize_log1p(X), in every reader path (cell
    totals over all genes, also when X is read by chunks of genes)."""
    X, cells = data
    X = X.copy()
    X[4] = 0.0  # a cell without counts stays 0
    expected = pseudobulk(normalize_log1p(X), cells)
    got = pseudobulk(as_format(X, fmt, tmp_path), cells, normalize="log1p",
                     chunk_size=chunk_size, cell_block=50)  # fmt: skip
    assert_same(got, expected, rtol=1e-12)
    assert np.all(X[4] == 0.0)  # the input is not modified (X.data is shared with chunks)
    Xs = sparse.csc_matrix(X)
    pseudobulk(Xs, cells, normalize="log1p")
    np.testing.assert_array_equal(Xs.toarray(), X)


def test_normalize_refuses_negative_and_warns_about_non_integer_values(data):
    X, cells = data
    with pytest.raises(ValueError, match=r"X: 1 negative values, but normalize='log1p' needs"):
        pseudobulk(np.where(np.arange(X.size).reshape(X.shape) == 9, -1.0, X), cells,
                   normalize="log1p")  # fmt: skip
    with pytest.warns(preprocess.ExpressionWarning, match="expects raw counts, but some values"):
        pseudobulk(normalize_log1p(X), cells, normalize="log1p")
    with pytest.raises(ValueError, match=r"normalize: expected None or 'log1p', got 'cpm'"):
        pseudobulk(X, cells, normalize="cpm")


def test_count_scale_loadings_equal_dense_stein_chen_means():
    """normalize='log1p' also gives the count-scale loadings l_gc = mean over cell type c's
    cells of x (f(x) - f(x - 1)), f(x) = log1p(x 1e4 / t) (t the cell's total), computed densely
    here; the same from a sparse matrix, by chunks of genes and streamed by rows."""
    counts, cells, genes = simulate_cells(7, 6, 3, seed=11)
    x = counts.toarray().astype(float)
    t = x.sum(1, keepdims=True)
    term = x * (np.log1p(x * 1e4 / t) - np.log1p(np.maximum(x - 1, 0) * 1e4 / t))
    ct = cells["cell_type"].to_numpy()
    types = sorted(set(ct))
    expected = np.stack([term[ct == c].mean(0) for c in types], axis=1)
    for X, chunk in ((x, 3), (counts, 2), (counts.tocsc(), 100)):
        pb = preprocess.pseudobulk(X, cells, genes=genes, normalize="log1p", chunk_size=chunk)
        assert_allclose(pb.loadings, expected, rtol=1e-12, atol=0)
    At = sparse.csr_matrix((np.ones(len(ct)), (np.arange(len(ct)), np.zeros(len(ct), int))))
    prepare = partial(preprocess._prepare, scan=preprocess._Scan(), normalize=True)
    rows = preprocess._row_blocks(counts.tocsr(), 5)
    _, _, T = preprocess._row_moments(rows, At, len(genes), prepare, At)
    assert_allclose(T[:, 0], term.sum(0), rtol=1e-12)
    assert preprocess.pseudobulk(x, cells, genes=genes).loadings is None  # not from counts


def test_stein_chen_loading_is_the_derivative_for_poisson_counts():
    """For Poisson counts of mean m the loading's expectation is d E f(x) / d log m exactly;
    Monte Carlo with 400,000 cells against the derivative summed over the Poisson pmf."""
    rng = np.random.default_rng(0)
    total = np.full(400_000, 2000.0)
    f = lambda k: np.log1p(k * 1e4 / 2000.0)  # noqa: E731
    for m in (0.1, 1.0, 20.0):
        x = rng.poisson(m, size=(len(total), 1)).astype(float)
        k = np.arange(200)
        derivative = m * np.sum(stats.poisson.pmf(k, m) * (f(k + 1) - f(k)))
        assert_allclose(preprocess._stein_terms(x, total).mean(), derivative, rtol=0.01)


def test_to_ctp_divides_by_the_loadings_and_they_survive_save_and_load(tmp_path):
    counts, cells, genes = simulate_cells(5, 8, 3, seed=12)
    pb = preprocess.pseudobulk(counts, cells, genes=genes, normalize="log1p")
    l = pb.loadings[:, None, :]  # noqa: E741
    scaled, plain = pb.to_ctp(), pb.to_ctp(count_scale=False)
    m = np.broadcast_to(pb.mask, pb.ctp.shape)
    assert_allclose(scaled.Y[m], (pb.ctp / l)[m], rtol=1e-14)
    assert_allclose(scaled.ctnu[m], (pb.ctnu / l**2)[m], rtol=1e-14)
    assert_allclose(plain.Y[m], pb.ctp[m], rtol=0)
    pb.save(tmp_path / "pb.npz")
    back = preprocess.Pseudobulk.load(tmp_path / "pb.npz")
    assert_allclose(back.loadings, pb.loadings, rtol=0)
    assert_allclose(back.select_genes([1, 3]).loadings, pb.loadings[[1, 3]], rtol=0)
    without = replace(pb, loadings=None)
    without.save(tmp_path / "old.npz")  # datasets not made from counts have none
    assert preprocess.Pseudobulk.load(tmp_path / "old.npz").loadings is None
