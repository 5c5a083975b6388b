"""The delete-m block jackknife (jackknife=k) against direct fits without each group."""

import numpy as np
import pytest
from helpers import CLOSED_FORM, OPTIMIZER, small_data
from numpy.testing import assert_allclose

import ctmm_jax as cj
from ctmm_jax.jackknife import donor_groups


def _without(data, keep):
    return cj.CTPData.from_arrays(data.Y[:, keep], data.ctnu[:, keep], data.P[keep])


@pytest.mark.parametrize("method", ["he", "reml"])
def test_block_replicates_equal_fits_without_the_group(method):
    data = small_data("ctp", G=2, N=30, C=3, seed=11)
    res = cj.fit(data, "free", method, noise="plugin", jackknife=5)
    groups = donor_groups(30, 5)
    assert res.jackknife.phi.shape == (2, 5, 4) and res.jackknife.present.all()
    tol = CLOSED_FORM if method == "he" else OPTIMIZER
    for j in (0, 3):
        direct = cj.fit(_without(data, groups != j), "free", method, noise="plugin")
        ok = direct.table.status.to_numpy() == "ok"  # a boundary stop depends on the start
        assert ok.any()
        assert_allclose(res.jackknife.phi[ok, j], direct.phi[ok], **tol)
    dev = res.jackknife.phi - res.jackknife.phi.mean(1, keepdims=True)
    assert_allclose(res.jackknife.var_cov, 4 / 5 * np.einsum("gni,gnj->gij", dev, dev), rtol=1e-12)
    clean = res.jackknife.n_failed == 0  # 5 replicates: one failure is over JK_MAX_FAILED
    assert (np.isfinite(res.table["p_V_jk"]) == clean).all() and clean.any()


def test_donor_groups():
    assert (donor_groups(7, 3) == [0, 1, 2, 0, 1, 2, 0]).all()
    assert (donor_groups(4, True) == np.arange(4)).all() and donor_groups(4, False) is None
    for bad in (1, 8, 2.5):
        with pytest.raises(ValueError, match="jackknife="):
            donor_groups(7, bad)
