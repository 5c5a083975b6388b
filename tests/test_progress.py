"""The progress bar counts every gene once, however many times the estimators refit it."""

import numpy as np
from helpers import small_data

import ctmm_jax as cj
from ctmm_jax.progress import Progress


class Counting(Progress):
    """A Progress that records how far it was advanced instead of drawing a bar."""

    def __init__(self, total):
        super().__init__(total, enabled=False)
        self.advanced = 0.0

    def advance(self, genes):
        self.advanced += genes


def test_refitted_genes_are_counted_once():
    """OP free REML on 40 genes in batches of 32: some fits stall or end at the wall and are
    rerun at the canonical width; the bar still advances by exactly the number of genes."""
    data = cj.OPData.from_ctp(small_data("ctp", G=40, N=30, C=3, seed=3))
    bar = Counting(40)
    res = cj.fit(data, "free", "reml", noise="plugin", chunk_size=32, progress=bar)
    assert not np.all(res.table.status == "ok")  # some were rerun
    np.testing.assert_allclose(bar.advanced, 40.0, rtol=1e-12)
