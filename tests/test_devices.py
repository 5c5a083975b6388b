"""The gene axis sharded over devices (devices.py): the suite runs with 2 host devices
(conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=2)."""

import jax
import numpy as np
import pytest
from helpers import small_data

import ctmm_jax as cj
from ctmm_jax import devices


def _numbers(result) -> np.ndarray:
    table = result.table
    return table.select_dtypes("number").to_numpy(float)


def test_the_suite_sees_two_devices():
    assert len(jax.local_devices()) >= 2, "conftest.py should force 2 host devices"


@pytest.mark.parametrize(
    "shape, model, method, jackknife",
    [("ctp", "free", "reml", False), ("ctp", "iid", "he", 3), ("op", "free", "ml", False)],
)
def test_sharded_fit_equals_one_device(shape, model, method, jackknife):
    """40 genes in batches of 16 per device: each device gets exactly the batches a single
    device would run (16, 16, 8 + padding), so the statuses are identical and the fits that
    converged agree to rounding (XLA fuses the sharded program's elementwise arithmetic
    differently, so the last bits may differ; measured 2e-14 relative), including the null
    fit, p values and the jackknife. Fits that stop at the boundary are ill-conditioned
    (their standard errors moved by 3e-3 relative) and are not compared."""
    data = small_data(shape, G=40, N=15, seed=3)
    one = cj.fit(data, model, method, chunk_size=16, jackknife=jackknife)
    two = cj.fit(data, model, method, chunk_size=16, jackknife=jackknife, devices=2)
    assert (one.table["status"] == two.table["status"]).all()
    ok = (one.table["status"] == "ok").to_numpy()
    assert ok.any()
    np.testing.assert_allclose(_numbers(two)[ok], _numbers(one)[ok], rtol=1e-10, atol=1e-12)
    assert two.batching["n_devices"] == 2 and one.batching["n_devices"] == 1


def test_sharded_fit_with_other_widths_agrees_to_rounding():
    """20 genes, default chunk_size: one device runs a batch of 32, two devices 16 each. XLA's
    arithmetic differs in the last bits between widths: converged fits agree to rtol 1e-10
    (measured 2e-13); fits that stop unsettled are rerun at the canonical width anyway."""
    data = small_data("ctp", G=20, N=15, seed=3)
    one, two = cj.fit(data, "free", "reml"), cj.fit(data, "free", "reml", devices="all")
    assert (one.table["status"] == two.table["status"]).all()
    np.testing.assert_allclose(_numbers(two), _numbers(one), rtol=1e-10, atol=1e-12)


def test_few_cell_type_options_change_only_rounding(monkeypatch):
    """Fits with C <= FEW_CELL_TYPES compile with YNNPACK fusions and multi-threaded Eigen off
    on the CPU (only for speed): the statuses are those of the default compilation and the
    converged fits agree to rounding (measured 3e-14 relative)."""
    monkeypatch.setattr(devices, "FEW_CELL_TYPES", 6)  # the default (conftest.py sets 0)
    assert devices.compiler_options(None, {"C": 6}) == devices.FEW_CELL_TYPES_CPU_OPTIONS
    assert devices.compiler_options(None, {"C": 7}) == ()
    assert devices.compiler_options(None, {}) == ()  # programs without C
    compiled, used = devices._compiled, []
    monkeypatch.setattr(devices, "_compiled", lambda *a: used.append(a[-1]) or compiled(*a))
    data = small_data("ctp", G=40, N=15, seed=3)
    few = cj.fit(data, "free", "reml", chunk_size=16)
    assert used and set(used) == {devices.FEW_CELL_TYPES_CPU_OPTIONS}  # every fit program
    monkeypatch.setattr(devices, "FEW_CELL_TYPES", 0)
    default = cj.fit(data, "free", "reml", chunk_size=16)
    assert (few.table["status"] == default.table["status"]).all()
    ok = (few.table["status"] == "ok").to_numpy()
    assert ok.any()
    np.testing.assert_allclose(_numbers(few)[ok], _numbers(default)[ok], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 3, "two", [1, 2], True])
def test_devices_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="devices"):
        devices.mesh(bad)
