"""The delete-m block jackknife (jackknife=k) against direct fits without each group; the
donor-clustered sandwich (robust=True) against its dense formula."""

import numpy as np
import pytest
import reference
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


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_sandwich_equals_dense(method):
    """se_*_sw = sqrt diag of I^-1 (n/(n-1)) sum_i s_i s_i^T I^-1 with the donors' score
    contributions s_ik = 1/2 [tr((Pj)_ii K_k,ii) - u_i^T K_k,ii u_i] from the dense Sigma
    (Pj = Pi for REML, Sigma^-1 for ML; u = Pi y), and the same for beta with g_i = X_i^T u_i."""
    N, C = 25, 3
    data = small_data("ctp", G=2, N=N, C=C, seed=12)
    res = cj.fit(data, "free", method, noise="plugin", robust=True)
    Ks = reference.kernels(data, "free")
    for g in range(2):
        hom2, V = reference.natural("free", res.phi[g], C)
        y, X, Sigma = reference.dense(data, g, hom2, V)
        Pi = reference.projection(X, Sigma)
        Pj = Pi if method == "reml" else np.linalg.inv(Sigma)
        u = Pi @ y
        blk = [slice(i * C, (i + 1) * C) for i in range(N)]
        s = np.array([[0.5 * (np.trace(Pj[b, b] @ K[b, b]) - u[b] @ K[b, b] @ u[b]) for K in Ks]
                      for b in blk])  # fmt: skip
        gb = np.array([X[b].T @ u[b] for b in blk])
        info = reference.expected_information(data, g, hom2, V, "free", method)
        Vi, B = np.linalg.inv(info), np.linalg.inv(X.T @ np.linalg.solve(Sigma, X))
        se = np.sqrt(np.diag(Vi @ (N / (N - 1) * s.T @ s) @ Vi))
        se_beta = np.sqrt(np.diag(B @ (N / (N - 1) * gb.T @ gb) @ B))
        names = ["hom2"] + [f"V_{c}" for c in data.celltypes]
        row = res.table.iloc[g]
        assert_allclose([row[f"se_{n}_sw"] for n in names], se, rtol=1e-9)
        assert_allclose([row[f"se_beta_{c}_sw"] for c in data.celltypes], se_beta, rtol=1e-9)
