import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each module's compiled programs when it is done: hundreds of XLA CPU executables in
    one process otherwise exhaust the kernel's memory-map limit (vm.max_map_count) and abort."""
    yield
    jax.clear_caches()
