"""Containers: constructors agree, and bad input is a clear ValueError before any fit."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

import ctmm_jax as cj

EXAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ctmm_example"


def _ctp(G=2, N=6, C=3, seed=0):
    return cj.simulate(G, N, C, hom2=0.1, V=0.1, seed=seed)


def test_from_frames_equals_arrays():
    d = _ctp()
    idx = pd.MultiIndex.from_product([d.donors, d.celltypes], names=["donor", "ct"])
    ctp = pd.DataFrame(d.Y.reshape(2, -1).T, index=idx, columns=d.genes)
    ctnu = pd.DataFrame(d.ctnu.reshape(2, -1).T, index=idx, columns=d.genes)
    P = pd.DataFrame(d.P, index=list(d.donors), columns=list(d.celltypes))
    f = cj.CTPData.from_frames(ctp.sample(frac=1.0, random_state=1), ctnu, P)  # row order free
    assert_allclose(f.Y, d.Y)
    assert_allclose(f.ctnu, d.ctnu)
    assert f.genes == d.genes and f.donors == d.donors and f.celltypes == d.celltypes
    op = cj.OPData.from_ctp(d)
    o = cj.OPData.from_frames(
        pd.DataFrame(op.y.T, index=list(d.donors), columns=list(d.genes)),
        pd.DataFrame(op.nu.T, index=list(d.donors), columns=list(d.genes)),
        P,
    )
    assert_allclose(o.y, op.y)
    assert_allclose(o.nu, op.nu)


def test_from_ctp_formulas():
    d = _ctp()
    op = cj.OPData.from_ctp(d)
    assert_allclose(op.y[1, 3], (d.P[3] * d.Y[1, 3]).sum(), rtol=1e-14)
    assert_allclose(op.nu[1, 3], (d.P[3] ** 2 * d.ctnu[1, 3]).sum(), rtol=1e-14)


@pytest.mark.skipif(not EXAMPLE.exists(), reason="../shared/data/ctmm_example not beside the repo")
def test_original_files():
    ctp = cj.CTPData.from_files(y=EXAMPLE / "CTP.gz", P=EXAMPLE / "P.gz", ctnu=EXAMPLE / "ctnu.gz")
    op = cj.OPData.from_files(y=EXAMPLE / "OP.gz", P=EXAMPLE / "P.gz", nu=EXAMPLE / "nu.gz")
    assert ctp.shape == (1, 50, 4) and op.shape == (1, 50, 4)
    derived = cj.OPData.from_ctp(ctp)
    assert_allclose(derived.y, op.y, atol=1e-12)  # the shipped OP is sum_c P_ic CTP_ic
    assert_allclose(derived.nu, op.nu, atol=1e-12)
    for data in (ctp, op):
        t = cj.fit(data, "hom", "reml").table
        assert t.converged.all()


def test_missing_file_message(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        cj.OPData.from_files(y=tmp_path / "nope.gz", P=tmp_path / "P", nu=tmp_path / "nu")


def _bad(**changes):
    d = _ctp()
    kw = dict(Y=d.Y, ctnu=d.ctnu, P=d.P)
    kw.update(changes)
    return cj.CTPData.from_arrays(**kw)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(ctnu=np.ones((2, 6, 2))), "ctnu: shape"),
        (dict(P=np.full((5, 3), 1 / 3)), "P: shape"),
        (dict(Y=np.full((2, 6, 3), np.nan)), "Y: has NaN or infinite values"),
        (dict(ctnu=np.full((2, 6, 3), np.inf)), "ctnu: has NaN or infinite"),
        (dict(ctnu=np.zeros((2, 6, 3))), "ctnu: noise variances must be > 0"),
        (dict(ctnu=-np.ones((2, 6, 3))), "ctnu: noise variances must be > 0"),
        (dict(P=np.full((6, 3), 0.5)), "P: each donor's proportions must sum to 1"),
        (dict(P=np.tile([1.5, -0.25, -0.25], (6, 1))), "P: proportions must be >= 0"),
        (dict(Y=[["a"]]), "Y: could not be read as numbers"),
    ],
)
def test_bad_ctp_input(changes, message):
    with pytest.raises(ValueError, match=message):
        _bad(**changes)


def test_bad_op_input():
    d = cj.OPData.from_ctp(_ctp())
    with pytest.raises(ValueError, match="nu: noise variances must be > 0"):
        cj.OPData.from_arrays(d.y, -d.nu, d.P)
    with pytest.raises(ValueError, match="P: has 5 rows"):
        cj.OPData.from_arrays(d.y, d.nu, d.P[:5])
    with pytest.raises(ValueError, match="genes: got 1 names for 2"):
        cj.OPData.from_arrays(d.y, d.nu, d.P, genes=["a"])


def test_error_names_the_entry():
    d = _ctp()
    ctnu = d.ctnu.copy()
    ctnu[1, 4, 2] = -1.0
    with pytest.raises(ValueError, match="gene 'gene1', donor 'ind4', cell type 'ct2'"):
        cj.CTPData.from_arrays(
            d.Y, ctnu, d.P, genes=d.genes, donors=d.donors, celltypes=d.celltypes
        )


def test_fit_rejects_other_objects():
    with pytest.raises(ValueError, match="expected CTPData or OPData"):
        cj.fit(np.zeros((2, 3)))


def test_simulate_is_seeded():
    a, b, c = _ctp(seed=3), _ctp(seed=3), _ctp(seed=4)
    assert_allclose(a.Y, b.Y, rtol=0)
    assert not np.allclose(a.Y, c.Y)


def test_example_dataset_loads():
    d = cj.load_example()
    assert d.shape == (40, 80, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda Y, ctnu, P: (Y[:, :, :1], ctnu[:, :, :1], P[:, :1] / P[:, :1]), "1 cell type"),
        (lambda Y, ctnu, P: (Y[:0], ctnu[:0], P), r"no genes \(G = 0\)"),
        (lambda Y, ctnu, P: (Y + 1j, ctnu, P), "Y: has complex values"),
    ],
)
def test_sizes_and_complex_values_are_refused(change, message):
    data = cj.simulate(2, 12, 3, seed=0)
    with pytest.raises(ValueError, match=message):
        cj.CTPData.from_arrays(*change(data.Y, data.ctnu, data.P))


def _frames():
    d = _ctp()
    op = cj.OPData.from_ctp(d)
    idx = pd.MultiIndex.from_product([d.donors, d.celltypes])
    frame = lambda a, index: pd.DataFrame(a, index=index, columns=list(d.genes))  # noqa: E731
    P = pd.DataFrame(d.P, index=list(d.donors), columns=list(d.celltypes))
    ctp, ctnu = frame(d.Y.reshape(2, -1).T, idx), frame(d.ctnu.reshape(2, -1).T, idx)
    return ctp, ctnu, frame(op.y.T, list(d.donors)), frame(op.nu.T, list(d.donors)), P


def _with(df, i, j, value):
    df = df.astype(object)
    df.iloc[i, j] = value
    return df


def _twice(df, i=2):
    return pd.concat([df, df.iloc[[i]]])


@pytest.mark.parametrize(
    "build, message",
    [
        # text in a frame: the frame, the column, the entry (was NumPy's "could not convert")
        (lambda c, n, y, nu, P: cj.OPData.from_frames(_with(y, 2, 1, "abc"), nu, P),
         "y: column 'gene1' holds 1 entries that are not numbers, first 'abc' at row 'ind2'"),
        (lambda c, n, y, nu, P: cj.OPData.from_frames(y, nu, _with(P, 1, 2, "x")),
         "P: column 'ct2' holds 1 entries that are not numbers, first 'x' at row 'ind1'"),
        (lambda c, n, y, nu, P: cj.CTPData.from_frames(_with(c, 4, 0, "n/a"), n, P),
         r"ctp: column 'gene0' .* first 'n/a' at row \('ind1', 'ct1'\)"),
        (lambda c, n, y, nu, P: cj.CTPData.from_frames(c, _with(n, 0, 1, "?"), P),
         "ctnu: column 'gene1' holds 1 entries that are not numbers"),
        (lambda c, n, y, nu, P: cj.CTPData.from_frames(c, n, P, n_cells=_with(P, 0, 0, "ten")),
         "n_cells: column 'ct0' holds 1 entries that are not numbers"),
        # a repeated donor, by name (was "donors: got 6 names for 7 entries")
        (lambda c, n, y, nu, P: cj.OPData.from_frames(_twice(y), nu, P),
         r"y: repeated donor in the index \(rows\): 'ind2'; keep one row per donor"),
        (lambda c, n, y, nu, P: cj.OPData.from_frames(y, _twice(nu, 4), P),
         "nu: repeated donor in the index .*'ind4'"),
        (lambda c, n, y, nu, P: cj.OPData.from_frames(y, nu, _twice(P)),
         "P: repeated donor in the index .*'ind2'"),
        (lambda c, n, y, nu, P: cj.CTPData.from_frames(c, n, _twice(P)),
         "P: repeated donor in the index .*'ind2'"),
        (lambda c, n, y, nu, P: cj.CTPData.from_frames(_twice(c), n, P),
         r"ctp: repeated \(donor, cell type\) pair .*\('ind0', 'ct2'\)"),
        (lambda c, n, y, nu, P: cj.OPData.from_arrays(y.T, nu.T, P, genes=["g", "g"]),
         r"genes: names are not unique \('g' repeated\)"),
        # ragged nested lists: the input by name (was NumPy's "inhomogeneous shape")
        (lambda *_: cj.CTPData.from_arrays([[1.0, 2.0], [3.0]], np.ones((2, 2)), np.eye(2)),
         r"Y: is ragged \(nested lists of unequal lengths\)"),
        (lambda *_: cj.OPData.from_arrays([[1.0, 2.0], [3.0]], np.ones((2, 2)), np.eye(2)),
         "y: is ragged"),
        (lambda *_: cj.OPData.from_arrays([1.0, 2.0], [[1.0], [1.0, 2.0]], np.eye(2)),
         "nu: is ragged"),
    ],
)  # fmt: skip
def test_frames_and_lists_errors_name_the_input(build, message):
    """Issue 18 #12: text in a frame, a repeated donor and ragged lists are refused naming the
    frame (or array) and the column or donor at fault."""
    with pytest.raises(ValueError, match=message):
        build(*_frames())


def test_numbers_written_as_text_are_read():
    ctp, ctnu, y, nu, P = _frames()
    got = cj.OPData.from_frames(_with(y, 2, 1, "1.5"), nu, P)
    assert got.y[1, 2] == 1.5


def test_absurdly_large_values_are_refused():
    """Issue 18 #2: ctnu = 1e300 was fitted (HE: `ok`, hom2 ~ 1e282). Values beyond
    data.MAX_ABS = 1e150 overflow float64 once squared: refused, naming the input and entry."""
    d = _ctp()
    ctnu = d.ctnu.copy()
    ctnu[1, 3, 2] = 1e300
    names = dict(genes=d.genes, donors=d.donors, celltypes=d.celltypes)
    with pytest.raises(ValueError, match="ctnu: has values beyond 1e\\+150 in magnitude .*"
                       "gene 'gene1', donor 'ind3', cell type 'ct2'"):  # fmt: skip
        cj.CTPData.from_arrays(d.Y, ctnu, d.P, **names)
    with pytest.raises(ValueError, match="Y: has values beyond 1e\\+150"):
        cj.CTPData.from_arrays(-1e151 * d.Y, d.ctnu, d.P)
    op = cj.OPData.from_ctp(d)
    with pytest.raises(ValueError, match="nu: has values beyond 1e\\+150"):
        cj.OPData.from_arrays(op.y, op.nu * 1e200, d.P)
    cj.CTPData.from_arrays(d.Y * 1e100, d.ctnu * 1e149, d.P)  # large but below the bound
