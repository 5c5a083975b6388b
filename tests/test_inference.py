"""ctmm_jax.inference.lrt against chi2.sf(2 (l1 - l0), k), and the LRT wrappers that reuse it."""

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import stats

from ctmm_jax import gxemm, inference
from ctmm_jax.compat import util

L1 = np.array([-10.0, -3.0, -7.5])
L0 = np.array([-12.0, -3.0, -9.0])
EXPECTED = stats.chi2.sf(2 * (L1 - L0), 2)


def test_lrt_arrays_and_scalars():
    p = inference.lrt(L1, L0, 2)
    assert isinstance(p, np.ndarray)
    assert_allclose(p, EXPECTED, rtol=1e-14)
    assert_allclose(inference.lrt(-10.0, -12.0, 2), stats.chi2.sf(4.0, 2), rtol=1e-14)
    k = np.array([1, 2, 3])
    assert_allclose(inference.lrt(L1, L0, k), stats.chi2.sf(2 * (L1 - L0), k), rtol=1e-14)


@pytest.mark.parametrize("which", ["l1", "l0", "both"])
def test_lrt_series_keeps_the_index(which):
    genes = pd.Index(["g0", "g1", "g2"], name="gene")
    l1 = pd.Series(L1, index=genes) if which in ("l1", "both") else L1
    l0 = pd.Series(L0, index=genes) if which in ("l0", "both") else L0
    p = inference.lrt(l1, l0, 2)
    assert isinstance(p, pd.Series) and p.name == "p_lrt"
    assert p.index.equals(genes)
    assert_allclose(p.to_numpy(), EXPECTED, rtol=1e-14)


def test_lrt_series_with_other_genes_is_refused():
    l1 = pd.Series(L1, index=["g0", "g1", "g2"])
    l0 = pd.Series(L0, index=["g2", "g1", "g0"])
    with pytest.raises(ValueError, match="l0: its index differs"):
        inference.lrt(l1, l0, 2)


def test_wrappers_are_the_same_test():
    assert_allclose(gxemm.lrt(L1, L0, 2), EXPECTED, rtol=1e-14)
    p = util.lrt(-10.0, -12.0, 2)
    assert isinstance(p, float) and p == inference.lrt(-10.0, -12.0, 2)
    assert_allclose(util.lrt(L1, L0, 2), EXPECTED, rtol=1e-14)
