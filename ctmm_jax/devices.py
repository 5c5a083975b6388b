"""The gene axis of a batch, sharded over local devices (a 1-D `jax.sharding.Mesh`).

Every compiled chunk function is a vmap over problems (genes, jackknife replicates) of one
problem's computation, so problems never talk to each other: `call` runs the same function
under `jax.shard_map`, each device on its own contiguous block of the batch. Inside the map a
device runs exactly the single-device program of its block's width (its own optimizer loop,
no collectives), so a batch of k * w problems on k devices gives what k single-device
batches of width w give, up to rounding (XLA may fuse the sharded program's elementwise
arithmetic differently). Batches are therefore sized per device: w from
batching.bucket, times k.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXIS = "problems"


def mesh(devices: int | str | Sequence | None) -> Mesh | None:
    """The 1-D mesh of `devices`: None (one device, no mesh), a count k (the first k local
    devices), "all", or a sequence of jax devices; ValueError naming the input otherwise."""
    if devices is None:
        return None
    local = jax.local_devices()
    if isinstance(devices, str) and devices == "all":
        chosen = local
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices={devices}: this process sees {len(local)} local device(s) "
                f"({local[0].platform}); give 1..{len(local)} or 'all' (on a CPU, "
                "XLA_FLAGS=--xla_force_host_platform_device_count=K makes K host devices)."
            )
        chosen = local[: int(devices)]
    elif isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices):
        chosen = list(devices)
        if not all(isinstance(d, jax.Device) for d in chosen):
            raise ValueError("devices: a sequence must hold jax devices (jax.local_devices()).")
    else:
        raise ValueError(f"devices={devices!r}: give a number of devices, 'all' or None.")
    return Mesh(np.array(chosen), (AXIS,))


def count(m: Mesh | None) -> int:
    """Devices in mesh m (1 without one)."""
    return 1 if m is None else m.size


def describe(m: Mesh | None) -> dict:
    """What the sidecar records: platform, device kind and count."""
    devs = [jax.devices()[0]] if m is None else list(m.devices.flat)
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind,
            "n_devices": len(devs)}  # fmt: skip


def spec(axes) -> object:
    """vmap in_axes (0: per problem, None: shared; a pytree of them) -> shard_map specs."""
    return jax.tree.map(lambda a: P(AXIS) if a == 0 else P(), axes, is_leaf=lambda a: a is None)


# XLA CPU options for the programs of fits with few cell types (statics C <= FEW_CELL_TYPES):
# their matrix products are tiny (C x C per donor), and YNNPACK's fusions and Eigen's
# multi-threaded products cost more to dispatch than they compute. Off, a CTP free REML
# iteration at width 256 takes 25-40% less time at C = 4 (N = 100 and 1,000), 15% at C = 6,
# 8% at C = 8 and none at C = 16, where compilation takes 40% longer (benchmarks/README.md).
# CTMM_JAX_FEW_CELL_TYPES=0 compiles every program with XLA's defaults (the test suite does, to
# share its compilation cache; the results differ by rounding only).
FEW_CELL_TYPES = int(os.environ.get("CTMM_JAX_FEW_CELL_TYPES", "6"))
FEW_CELL_TYPES_CPU_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),
                              ("xla_cpu_multi_thread_eigen", False))  # fmt: skip


def compiler_options(m: Mesh | None, statics: dict) -> tuple:
    """XLA options (a tuple of items) for a program with these statics on m's devices."""
    platform = (jax.devices()[0] if m is None else m.devices.flat[0]).platform
    few = "C" in statics and statics["C"] <= FEW_CELL_TYPES
    return FEW_CELL_TYPES_CPU_OPTIONS if few and platform == "cpu" else ()


@cache
def _compiled(fn: Callable, m: Mesh | None, in_specs: tuple, statics: tuple, options: tuple
              ) -> Callable:  # fmt: skip
    def body(*args):
        return fn(*args, **dict(statics))

    body.__name__ = getattr(fn, "__name__", "program")  # names the compiled program
    if m is not None:
        body = jax.shard_map(body, mesh=m, in_specs=in_specs, out_specs=P(AXIS))
    return jax.jit(body, compiler_options=dict(options) or None)


def call(fn: Callable, m: Mesh | None, args: tuple, axes: tuple, **statics):
    """fn(*args, **statics), with the problem axis (axes[j] == 0: args[j] has a leading problem
    axis; None: shared) split over the devices of m (plain fn(...) when m is None), compiled
    with `compiler_options`. Outputs all carry the problem axis."""
    options = compiler_options(m, statics)
    if m is None and not options:
        return fn(*args, **statics)
    in_specs = None if m is None else tuple(spec(a) for a in axes)
    return _compiled(fn, m, in_specs, tuple(sorted(statics.items())), options)(*args)
