"""`python -m ctmm_jax.example`: fit CTP free REML on the shipped example and print the table."""

from __future__ import annotations

import pandas as pd

from .api import fit
from .datasets import load_example


def main() -> None:
    data = load_example()
    # simulated with known noise variances (no cells): the plug-in noise model is exact here
    result = fit(data, model="free", method="reml", noise="plugin")
    cols = ["hom2"] + [f"V_{c}" for c in data.celltypes] + ["p_V", "q_V", "p_V_wald", "status"]
    with pd.option_context(
        "display.width", 250, "display.max_rows", 50, "display.max_columns", None,
        "display.max_colwidth", 45,
    ):  # fmt: skip
        print(f"CTP free REML on the example data: {data.shape} (genes, donors, cell types)")
        print(result.table[cols].round(4))


if __name__ == "__main__":
    main()
