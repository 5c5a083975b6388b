"""ctmm_jax: cell type-specific linear mixed models (CTMM), batched over genes in JAX.

Importing ctmm_jax turns on float64 in JAX (`jax_enable_x64`): the likelihoods and the Wald
tests need it. Set it back with `jax.config.update("jax_enable_x64", False)` only if you know
what you are doing; `fit` refuses to run without it. It also turns on JAX's persistent
compilation cache (`compilation_cache_dir`; CTMM_JAX_CACHE=off turns it off).

The public names below load on first use (PEP 562), so `import ctmm_jax` and the command line's
start-up and one-line errors do not wait for JAX.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

CACHE_MIN_COMPILE_SECS = "0.2"  # programs that compile faster than this are not cached


def compilation_cache_dir() -> str | None:
    """The folder of JAX's persistent compilation cache that importing ctmm_jax turns on:
    $CTMM_JAX_CACHE, else $XDG_CACHE_HOME/ctmm_jax/xla (~/.cache/ctmm_jax/xla); None when
    CTMM_JAX_CACHE is 'off' or '0'. A compiled program (its key: the program, the JAX
    version, the XLA flags) is then loaded, not recompiled, by later runs, e.g. the second
    and later chunks of `ctmm-jax fit --chunk i/N`. A cache folder set for JAX itself
    (JAX_COMPILATION_CACHE_DIR or jax.config) is left as it is."""
    path = os.environ.get("CTMM_JAX_CACHE")
    if path is not None and path.strip().lower() in ("off", "0", ""):
        return None
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "ctmm_jax", "xla")
    return path


def _configure_jax() -> None:
    cache = compilation_cache_dir()
    if "jax" in sys.modules:  # JAX already imported: switch things on now
        config = sys.modules["jax"].config
        config.update("jax_enable_x64", True)
        if cache is not None and config.jax_compilation_cache_dir is None:
            config.update("jax_compilation_cache_dir", cache)
            config.update(
                "jax_persistent_cache_min_compile_time_secs", float(CACHE_MIN_COMPILE_SECS)
            )
    else:  # read by JAX when it is imported, whoever imports it
        os.environ["JAX_ENABLE_X64"] = "1"
        if cache is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
            os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
            os.environ.setdefault(
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", CACHE_MIN_COMPILE_SECS
            )


_configure_jax()

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
