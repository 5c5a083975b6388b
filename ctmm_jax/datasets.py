"""The small example dataset shipped with the package.

`example_ctp.npz` was made by `make_example()` (simulate, seed 2024): 40 genes, 80 donors,
4 cell types; hom2 = 0.2, V = diag(0.3, 0, 0, 0.1) for the first 20 genes and V = 0 for the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import CTPData

EXAMPLE = Path(__file__).with_name("example_ctp.npz")


def make_example(path: Path = EXAMPLE) -> None:
    """Write the example dataset (deterministic)."""
    from .simulation import simulate

    V = np.zeros((40, 4, 4))
    V[:20] = np.diag([0.3, 0.0, 0.0, 0.1])
    d = simulate(40, 80, 4, hom2=0.2, V=V, beta=[1.0, 0.5, 0.0, -0.5], ctnu=0.2, seed=2024)
    np.savez_compressed(
        path, Y=d.Y, ctnu=d.ctnu, P=d.P, genes=d.genes, donors=d.donors, celltypes=d.celltypes
    )


def load_example() -> CTPData:
    """The shipped example as CTPData (40 genes x 80 donors x 4 cell types)."""
    with np.load(EXAMPLE) as z:
        return CTPData.from_arrays(
            z["Y"],
            z["ctnu"],
            z["P"],
            genes=z["genes"],
            donors=z["donors"],
            celltypes=z["celltypes"],
        )
