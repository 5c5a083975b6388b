"""PLINK input for GxEMM (gxemm/plink.py): filters, standardisation and the GRM against a
direct NumPy computation, selection by id, errors; the real chr22 genotypes when present."""

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ctmm_jax.gxemm import plink

bed_reader = pytest.importorskip("bed_reader", reason="bed-reader (extra 'plink') not installed")
REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata" / "onek1k_cd14"


def _write_bed(path: Path, g: np.ndarray, ids) -> str:
    """PLINK files PREFIX.bed/.bim/.fam of allele counts g (N, M), NaN for missing."""
    prefix = str(path / "geno")
    props = {"iid": list(ids), "sid": [f"v{j}" for j in range(g.shape[1])]}
    bed_reader.to_bed(prefix + ".bed", g.astype(np.float32), properties=props)
    return prefix


@pytest.fixture(scope="module")
def genotypes(tmp_path_factory):
    rng = np.random.default_rng(0)
    N, M = 30, 250
    p = rng.uniform(0.0, 0.5, M)
    p[:5] = 0.0  # monomorphic
    g = rng.binomial(2, p, size=(N, M)).astype(float)
    g[rng.random((N, M)) < 0.02] = np.nan  # 2% missing calls
    g[: N // 5, 7] = np.nan  # one variant with 20% missing
    ids = [f"id{i}" for i in range(N)]
    return _write_bed(tmp_path_factory.mktemp("plink"), g, ids), g, ids


def _direct_grm(g, maf, max_missing):
    """Variant by variant, as written in the module docstring."""
    N, M = g.shape
    cols = []
    for j in range(M):
        called = ~np.isnan(g[:, j])
        p = g[called, j].sum() / (2 * called.sum())
        if min(p, 1 - p) < maf or 1 - called.mean() > max_missing or p in (0.0, 1.0):
            continue
        z = np.zeros(N)
        z[called] = (g[called, j] - 2 * p) / np.sqrt(2 * p * (1 - p))
        cols.append(z)
    S = np.array(cols).T
    return S @ S.T / S.shape[1], S.shape[1]


@pytest.mark.parametrize("maf, max_missing", [(0.01, 0.05), (0.1, 0.5), (0.0, 1.0)])
def test_grm_equals_direct_computation(genotypes, maf, max_missing):
    prefix, g, ids = genotypes
    out = plink.grm(prefix, maf=maf, max_missing=max_missing, block=64)  # 4 blocks
    K, M = _direct_grm(g, maf, max_missing)
    assert out.ids == tuple(ids) and out.n_variants == M
    assert_allclose(out.K, K, rtol=1e-12, atol=1e-12)
    S = plink.read_genotypes(prefix, maf=maf, max_missing=max_missing).S
    assert_allclose(S @ S.T / S.shape[1], K, rtol=1e-12, atol=1e-12)


def test_individuals_are_selected_by_id(genotypes):
    prefix, g, ids = genotypes
    pick = [ids[5], ids[0], ids[17]]
    K, _ = _direct_grm(g[[5, 0, 17]], 0.01, 0.05)
    out = plink.grm(prefix, ids=pick)
    assert out.ids == tuple(pick)
    assert_allclose(out.K, K, rtol=1e-12, atol=1e-12)  # frequencies from the selected ones


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ids=["id0", "nobody"]), r"ids: 1 individuals are not in .*nobody"),
        (dict(ids=["id0", "id0"]), "ids: repeated"),
        (dict(maf=0.7), "maf=0.7"),
        (dict(max_missing=-1), "max_missing=-1"),
    ],
)
def test_bad_requests_name_the_input(genotypes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plink.grm(genotypes[0], **kwargs)


def test_missing_or_damaged_files_are_named(genotypes, tmp_path):
    with pytest.raises(ValueError, match=r"missing .*nothing\.bed"):
        plink.grm(tmp_path / "nothing")
    prefix = tmp_path / "cut"
    for suffix in (".bim", ".fam"):
        Path(str(prefix) + suffix).write_bytes(Path(genotypes[0] + suffix).read_bytes())
    Path(str(prefix) + ".bed").write_bytes(Path(genotypes[0] + ".bed").read_bytes()[:40])
    with pytest.raises(ValueError, match="cut"):
        plink.grm(prefix)


def test_no_variant_left_is_an_error(tmp_path):
    prefix = _write_bed(tmp_path, np.zeros((4, 3)), ["a", "b", "c", "d"])  # monomorphic
    with pytest.raises(ValueError, match="no variant passes"):
        plink.grm(prefix)
    with pytest.raises(ValueError, match="no variant passes"):
        plink.read_genotypes(prefix)


@pytest.mark.skipif(not REAL.exists(), reason="../shared/realdata/onek1k_cd14 not beside the repo")
def test_real_chr22_grm():
    """94 OneK1K donors, chr22: unrelated individuals, so K is close to the identity."""
    out = plink.grm(REAL / "chr22.n94")
    assert out.K.shape == (94, 94) and out.n_variants > 50_000
    assert abs(np.diag(out.K).mean() - 1) < 0.05
    assert np.abs(out.K - np.diag(np.diag(out.K))).max() < 0.5
    assert np.linalg.eigvalsh(out.K)[0] > -1e-8
