"""The original CTMM's `ctmm.op` functions on overall pseudobulk (OP), on ctmm_jax.

Model, for donor i: `y_i = P_i^T beta + f_i^T b + alpha_i + P_i^T gamma_i + eps_i`, so
`Var(y_i) = hom2 + P_i^T V P_i + nu_i` (design X = [P, F], no intercept); a random covariate
R adds `r2 R R^T` across donors. Models: hom (V = 0), iid (V = v I), free (V diagonal), full
(any V, hom2 absorbed).

Each `<model>_<method>(y_f, P_f, nu_f, fixed_covars_d, random_covars_d, ...)` takes the
original's arguments (file paths as before, or arrays) and returns its dicts, with the
original's keys and shapes: `hom2` (float), `V` (C x C), `beta` ({'ct_beta': (C,), one (k,)
entry per fixed covariate}), `r2`, `fixedeffect_vars`, `randomeffect_vars`, `ct_random_var`,
`ct_specific_random_var`, `l`, `D`, `opt`, `nu` (mean noise variance); p values `hom2`, `V`,
`ct_beta`. The full model returns the estimates dict alone, as the original. All numbers come
from one `ctmm_jax.fit(..., chunk_size=1)` call (HE with `he_beta="gls"`, as the original).

Differences from the original (see also `ctmm_jax.compat.ctp`):
- `par`, `method`, `nrep`, `optim_by_R` are accepted and ignored (they chose the original's
  optimizer and start values). With `optim_by_R=True` the original returned `hess` and
  `convergence` (from R) instead of `opt`, and Wald p values per coefficient (`beta`, `Vi`);
  here the keys are always those of its default (scipy) path.
- `opt` is `{'method', 'success', 'status', 'message', 'l', 'nit'}` from ctmm_jax's
  convergence report, not scipy's output; `l` includes the `2 pi` constants.
- jack_knife exists where the original has it (free_REML and the HE functions) and is the
  leave-one-donor-out jackknife.
"""

from __future__ import annotations

from .util import _document, _run

__all__ = [f"{m}_{e}" for m in ("hom", "iid", "free", "full") for e in ("ML", "REML", "HE")]


@_document("op", "hom", "ml", None)
def hom_ML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
           nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "hom", "ml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "hom", "reml", None)
def hom_REML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
             nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "hom", "reml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "hom", "he", "loo")
def hom_HE(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, jack_knife=False):
    return _run("op", "hom", "he", y_f, P_f, nu_f, fixed_covars_d, random_covars_d, jack_knife)


@_document("op", "iid", "ml", None)
def iid_ML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
           nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "iid", "ml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "iid", "reml", None)
def iid_REML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
             nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "iid", "reml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "iid", "he", "loo")
def iid_HE(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, jack_knife=False):
    return _run("op", "iid", "he", y_f, P_f, nu_f, fixed_covars_d, random_covars_d, jack_knife)


@_document("op", "free", "ml", None)
def free_ML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
            nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "free", "ml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "free", "reml", "loo")
def free_REML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
              nrep=10, jack_knife=False, optim_by_R=False):  # fmt: skip
    return _run("op", "free", "reml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d, jack_knife)


@_document("op", "free", "he", "loo")
def free_HE(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, jack_knife=False):
    return _run("op", "free", "he", y_f, P_f, nu_f, fixed_covars_d, random_covars_d, jack_knife)


@_document("op", "full", "ml", None)
def full_ML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
            nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "full", "ml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "full", "reml", None)
def full_REML(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None, par=None, method=None,
              nrep=10, optim_by_R=False):  # fmt: skip
    return _run("op", "full", "reml", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)


@_document("op", "full", "he", None)
def full_HE(y_f, P_f, nu_f, fixed_covars_d=None, random_covars_d=None):
    return _run("op", "full", "he", y_f, P_f, nu_f, fixed_covars_d, random_covars_d)
