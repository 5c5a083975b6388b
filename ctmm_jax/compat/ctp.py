"""The original CTMM's `ctmm.ctp` functions on cell type-specific pseudobulk (CTP), on ctmm_jax.

Model, for donor i (C cell types): `y_i = beta + 1_C f_i^T b + alpha_i 1_C + gamma_i + eps_i`,
`alpha_i ~ N(0, hom2)`, `gamma_i ~ N(0, V)`, `eps_i ~ N(0, diag(ctnu_i))`, so
`Cov(y_i) = hom2 J_C + V + diag(ctnu_i)`; a random covariate R adds `r2 (R R^T (x) J_C)`
across donors. Models: hom (V = 0), iid (V = v I), free (V diagonal), full (any V).

Each `<model>_<method>(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d, random_covars_d, ...)`
takes the original's arguments (file paths as before, or arrays) and returns its dicts, with
the original's keys and shapes: `hom2` (float), `V` (C x C), `beta` ({'ct_beta': (C,), one
(k,) entry per fixed covariate}), `r2`, `fixedeffect_vars`, `randomeffect_vars`,
`ct_random_var`, `ct_specific_random_var` (`ct_specific_var` in free_ML, as the original),
`l`, `D`, `opt`, and `nu` when nu_f is given; p values `hom2`, `V`, `ct_beta`. The full model
returns the estimates dict alone, as the original. All numbers come from one
`ctmm_jax.fit(..., chunk_size=1)` call (HE with `he_beta="gls"`, as the original's GLS beta).

Differences from the original:
- `par`, `method`, `nrep`, `optim_by_R` are accepted and ignored: they chose the original's
  optimizer (scipy or R `optim`, random restarts) and its start values. Fits here are
  deterministic Fisher scoring to a small score statistic.
- `opt` is `{'method', 'success', 'status', 'message', 'l', 'nit'}` from ctmm_jax's
  convergence report (status codes of `ctmm_jax.optimize.Status`), not scipy's output.
- `l` includes the `2 pi` constants (ML: `-n/2 log 2 pi`, REML: `-(n - p)/2 log 2 pi`), which
  the original's scipy path drops; LRTs between models fitted to the same data are unchanged.
- `D`: ML, block-diag((X^T Sigma^-1 X)^-1, I^-1) over (beta, variances); REML, the inverse
  REML information of the variances; variances ordered hom2, V parameters, then r2 (sorted).
- jack_knife: leave-one-donor-out only; the block jackknife (an int) raises ValueError.
"""

from __future__ import annotations

from .util import _document, _run

__all__ = [f"{m}_{e}" for m in ("hom", "iid", "free", "full") for e in ("ML", "REML", "HE")]


@_document("ctp", "hom", "ml", None)
def hom_ML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
           method=None, nrep=10, optim_by_R=False):  # fmt: skip
    return _run("ctp", "hom", "ml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, nu_f=nu_f)


@_document("ctp", "hom", "reml", "loo")
def hom_REML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
             method=None, nrep=10, jack_knife=False, optim_by_R=False):  # fmt: skip
    return _run(
        "ctp", "hom", "reml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, jack_knife, nu_f
    )


@_document("ctp", "hom", "he", "loo")
def hom_HE(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None,
           jack_knife=True):  # fmt: skip
    return _run(
        "ctp", "hom", "he", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, jack_knife, nu_f
    )


@_document("ctp", "iid", "ml", None)
def iid_ML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
           method=None, nrep=10, optim_by_R=False):  # fmt: skip
    return _run("ctp", "iid", "ml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, nu_f=nu_f)


@_document("ctp", "iid", "reml", "loo")
def iid_REML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
             method=None, nrep=10, jack_knife=False, optim_by_R=False):  # fmt: skip
    return _run(
        "ctp", "iid", "reml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, jack_knife, nu_f
    )


@_document("ctp", "iid", "he", "loo")
def iid_HE(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None,
           jack_knife=True):  # fmt: skip
    return _run(
        "ctp", "iid", "he", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, jack_knife, nu_f
    )


@_document("ctp", "free", "ml", None)
def free_ML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
            method=None, nrep=10, optim_by_R=False):  # fmt: skip
    est, p = _run("ctp", "free", "ml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, nu_f=nu_f)
    # the original's free_ML (and only it) names this key ct_specific_var
    est["ct_specific_var"] = est.pop("ct_specific_random_var")
    return est, p


@_document("ctp", "free", "reml", "loo")
def free_REML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
              method=None, nrep=10, jack_knife=False, optim_by_R=False):  # fmt: skip
    return _run(
        "ctp", "free", "reml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, jack_knife, nu_f
    )


@_document("ctp", "free", "he", "loo")
def free_HE(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None,
            jack_knife=True):  # fmt: skip
    return _run(
        "ctp", "free", "he", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, jack_knife, nu_f
    )


@_document("ctp", "full", "ml", None)
def full_ML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
            method=None, nrep=10, optim_by_R=False):  # fmt: skip
    return _run("ctp", "full", "ml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, nu_f=nu_f)


@_document("ctp", "full", "reml", None)
def full_REML(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None, par=None,
              method=None, nrep=10, optim_by_R=False):  # fmt: skip
    return _run("ctp", "full", "reml", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, nu_f=nu_f)


@_document("ctp", "full", "he", None)
def full_HE(y_f, P_f, ctnu_f, nu_f=None, fixed_covars_d=None, random_covars_d=None):
    return _run("ctp", "full", "he", y_f, P_f, ctnu_f, fixed_covars_d, random_covars_d, nu_f=nu_f)
