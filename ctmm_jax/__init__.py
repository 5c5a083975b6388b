"""ctmm_jax: cell type-specific linear mixed models (CTMM), batched over genes in JAX.

Importing ctmm_jax turns on float64 in JAX (`jax_enable_x64`): the likelihoods and the Wald
tests need it. Set it back with `jax.config.update("jax_enable_x64", False)` only if you know
what you are doing; `fit` refuses to run without it.

The public names below load on first use (PEP 562), so `import ctmm_jax` and the command line's
start-up and one-line errors do not wait for JAX.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

if "jax" in sys.modules:  # JAX already imported: switch it on now
    sys.modules["jax"].config.update("jax_enable_x64", True)
else:  # read by JAX when it is imported, whoever imports it
    os.environ["JAX_ENABLE_X64"] = "1"

_PUBLIC = {
    "fit": ".api",
    "CTPData": ".data",
    "OPData": ".data",
    "load_example": ".datasets",
    "lrt": ".inference",
    "FitResult": ".results",
    "simulate": ".simulation",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ctmm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
