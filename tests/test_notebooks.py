"""Notebooks are documents, so they cannot rot: each is committed with the outputs and figures
of one top-to-bottom run, and each runs top to bottom in a Jupyter kernel, as a reader runs it.

Re-execute and save them (outputs and figures in the .ipynb) after changing a notebook, or the
package in a way a notebook shows:

    python tests/test_notebooks.py              # every notebook; or name some
"""

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"  # ipykernel's own spec: jupyter_client runs it with sys.executable
CELL_TIMEOUT_S = 600
MAX_BYTES = 1_000_000
REFRESH = "re-execute and save it: python tests/test_notebooks.py"


def execute(path: Path) -> nbformat.NotebookNode:
    """Run the notebook at `path` in a fresh kernel and return it with its outputs.

    It runs in a temporary copy of its folder, so files it writes never land in the repo. The
    kernel gets its default inline matplotlib backend (MPLBACKEND would override it), so the
    figures are saved in the notebook as images. No per-cell timestamps, to keep diffs small.
    """
    path = path.resolve()
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(shutil.copytree(path.parent, Path(tmp) / "notebooks"))
        client = NotebookClient(
            nb,
            timeout=CELL_TIMEOUT_S,
            kernel_name=KERNEL,
            record_timing=False,
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute(env=env)
    return nb


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def _outputs(nb, output_type):
    return [o for c in _code_cells(nb) for o in c.outputs if o.output_type == output_type]


def _n_figures(nb) -> int:
    return sum("image/png" in o.data for o in _outputs(nb, "display_data"))


def _warnings(nb) -> list[str]:
    """Python warnings the kernel printed (`file:line: SomeWarning: message`)."""
    stderr = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stderr")
    return re.findall(r"^.*\b\w*Warning: .*$", stderr, flags=re.MULTILINE)


def test_there_are_notebooks():
    assert NOTEBOOKS


def test_kernel_runs_this_python():
    """The kernel must run this interpreter (with ctmm_jax installed), not another Python that
    installed a kernelspec of the same name in a user or system folder."""
    argv = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert os.path.abspath(argv[0]) == os.path.abspath(sys.executable), argv


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    """Committed with the outputs of one top-to-bottom run without errors, and not too big."""
    nb = nbformat.read(path, as_version=4)
    counts = [c.execution_count for c in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name} is not executed in order; {REFRESH}"
    )
    assert not _outputs(nb, "error"), f"{path.name} was saved with an error; {REFRESH}"
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size:,} bytes; print less, or smaller figures"


def missing_data(path: Path) -> str | None:
    """The folder (relative to the repository) that a notebook's metadata says it reads
    (`ctmm_jax.needs`, e.g. ../shared/realdata/...) when it is absent, else None."""
    needs = nbformat.read(path, as_version=4).metadata.get("ctmm_jax", {}).get("needs")
    if needs and not (Path(__file__).resolve().parents[1] / needs).exists():
        return needs
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    """Runs top to bottom in a Jupyter kernel, without warnings, drawing its committed figures;
    a notebook on data outside the project skips when that data is absent."""
    if missing_data(path):
        pytest.skip(f"{path.name} reads {missing_data(path)}, which is not beside the repo")
    try:
        nb = execute(path)
    except CellExecutionError as err:  # its message has the cell's source and traceback
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # without the terminal colours
        pytest.fail(f"{path.name}: a cell failed\n{plain}", pytrace=False)
    assert not _warnings(nb), f"{path.name} printed warnings:\n" + "\n".join(_warnings(nb))
    committed = _n_figures(nbformat.read(path, as_version=4))
    assert _n_figures(nb) == committed, (
        f"{path.name} draws {_n_figures(nb)} figures, {committed} committed"
    )


if __name__ == "__main__":
    for arg in sys.argv[1:] or NOTEBOOKS:
        start = time.perf_counter()
        nb = execute(Path(arg))
        nbformat.write(nb, arg)
        size = Path(arg).stat().st_size
        print(
            f"{arg}: {time.perf_counter() - start:.0f} s, {size:,} bytes, {_n_figures(nb)} figures"
        )
