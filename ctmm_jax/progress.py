"""Progress of long fits: one bar over the genes, fed by the estimators as fits finish.

A `Progress` counts genes. Each `fit` call on n genes runs a few stages (the model's fit, the
null fit, the jackknife's replicates); the estimators report the share of a stage's problems
that have finished (`report`), and the bar advances by n / n_stages times that share. The
first report of a run comes after compiling; the bar starts then (with that progress as its
initial value) after a one-line 'compiling' message, so its rate and ETA count run time only.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

BAR_FORMAT = "{l_bar}{bar}| {n:.0f}/{total} genes [{elapsed}<{remaining}]"


class Progress:
    """A bar over `total` genes (tqdm on stderr), or nothing when not enabled."""

    def __init__(self, total: int, desc: str = "fit", enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar = None
        self.unit = 0.0  # genes per stage of the current call
        self.pending = 0.0  # progress before the bar starts
        if enabled:
            print(f"{desc}: compiling and fitting the first batch ...", file=sys.stderr,
                  flush=True)  # fmt: skip

    def advance(self, genes: float) -> None:
        if not self.enabled or genes <= 0:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=min(genes, self.total), unit="gene",
                            desc=self.desc, file=sys.stderr, bar_format=BAR_FORMAT)  # fmt: skip
            return
        self.bar.update(min(genes, self.total - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_current: ContextVar[Progress | None] = ContextVar("ctmm_jax_progress", default=None)


@contextmanager
def fit_call(progress: Progress | None, n_genes: int, n_stages: int):
    """Route the estimators' reports of one fit call on n_genes genes to `progress`."""
    if progress is None:
        yield
        return
    progress.unit = n_genes / max(n_stages, 1)
    token = _current.set(progress)
    try:
        yield
    finally:
        _current.reset(token)


def report(finished: int, of: int) -> None:
    """`finished` more of a stage's `of` problems are done."""
    progress = _current.get()
    if progress is not None and of > 0:
        progress.advance(progress.unit * finished / of)
