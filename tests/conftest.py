"""Test session setup: float64, fast compilation, JAX's persistent compilation cache.

The suite is mostly XLA compilation (a CTMM program takes 2-5 s to compile and milliseconds to
run on test-sized data), so the tests
- compile with LLVM's optimisation level 0 (`--xla_backend_optimization_level=0`, unless
  XLA_FLAGS is set): about 40% less compile time for a slower run of tiny problems; the
  arithmetic is the same (no fast-math either way);
- write compiled programs to JAX's on-disk cache (`CTMM_JAX_TEST_CACHE`, default
  `$XDG_CACHE_HOME/ctmm_jax/jax-tests` or `~/.cache/ctmm_jax/jax-tests`), so a program
  compiled once is loaded, not recompiled, by later modules (whose in-memory caches are
  cleared), by the CLI's subprocesses, the notebooks' kernels and later runs, clones and
  checkouts. The cache's keys include the program, the JAX version and the XLA flags;
- run BLAS single-threaded (OPENBLAS_NUM_THREADS=1, for the libraries loaded later and the
  subprocesses; threadpoolctl for numpy's, which a pytest plugin loads before this file): the
  dense NumPy/SciPy oracles are small matrices, and OpenBLAS threads competing with XLA's and
  with the other xdist worker on 2 cores made one oracle 25x slower (171 s vs 6.4 s);
- compile every program with XLA's default options (CTMM_JAX_FEW_CELL_TYPES=0; fits with up to
  6 cell types otherwise turn two CPU options off for speed, which changes only rounding:
  test_devices.py checks that), so the cached programs stay those of earlier runs;
- see 2 host devices (`--xla_force_host_platform_device_count=2`), so test_devices.py shards
  batches in-process; everything else runs on the default device as before.
"""

import os
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import jax  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402, F401  (SciPy's OpenBLAS loads now, under the limit)
from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(1, user_api="blas")  # the BLAS already loaded (numpy's)

USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = Path(os.environ.get("CTMM_JAX_TEST_CACHE", USER_CACHE / "ctmm_jax" / "jax-tests"))

os.environ.setdefault("CTMM_JAX_FEW_CELL_TYPES", "0")  # before ctmm_jax is imported
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")  # before any compile
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:  # test_devices.py
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE)  # the CLI's subprocesses
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each module's compiled programs when it is done: hundreds of XLA CPU executables in
    one process otherwise exhaust the kernel's memory-map limit (vm.max_map_count) and abort.
    The persistent cache makes a later module's reuse a load, not a compile."""
    yield
    jax.clear_caches()
