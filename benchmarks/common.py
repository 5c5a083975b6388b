"""What every benchmark script writes with its rows: the machine and the JAX set-up."""

from __future__ import annotations

import json
import os
import platform

import jax


def write_json(path: str | None, rows: list[dict]) -> None:
    """rows plus the device, JAX version, CPU count, platform and float64 flag, to path."""
    if not path:
        return
    meta = dict(device=str(jax.devices()[0]), jax=jax.__version__, cpus=os.cpu_count(),
                platform=platform.platform(), x64=bool(jax.config.jax_enable_x64))  # fmt: skip
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=2)
