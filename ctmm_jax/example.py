"""`python -m ctmm_jax.example`: fit CTP free REML on the shipped example and print the table."""

from __future__ import annotations

import pandas as pd

from .api import fit
from .datasets import load_example


def main() -> None:
    data = load_example()
    result = fit(data, model="free", method="reml")
    cols = ["hom2"] + [f"V_{c}" for c in data.celltypes] + ["loglik", "p_V", "p_ct_beta", "status"]
    with pd.option_context(
        "display.width", 250, "display.max_rows", 50, "display.max_columns", None,
        "display.max_colwidth", 45,
    ):  # fmt: skip
        print(f"CTP free REML on the example data: {data.shape} (genes, donors, cell types)")
        print(result.table[cols].round(4))


if __name__ == "__main__":
    main()
