"""`lrt` as in the original CTMM's `util`, and the machinery shared by `compat.op`/`compat.ctp`.

The private helpers turn one call of an original-style function into one call of
`ctmm_jax.fit` on a one-gene CTPData/OPData and read the estimates and p values back from the
FitResult into the original's two dicts. Nothing here fits a model.
"""

from __future__ import annotations

import textwrap

import numpy as np
from scipy import linalg

from .. import api, inference, models
from ..data import Covariates, CTPData, OPData, _loadtxt
from ..results import fixed_effect_variances

WALD = ("hom2", "V", "ct_beta")  # the original's Wald tests (V: the Wald test, not the score)

# what an estimates dict holds, beyond hom2 (all but full) and V (all but hom), by method;
# ct_random_var / ct_specific_random_var come with V
_BY_METHOD = {
    "ml": ("beta", "fixedeffect_vars", "randomeffect_vars", "r2", "l", "D", "opt"),
    "reml": ("beta", "fixedeffect_vars", "randomeffect_vars", "r2", "l", "D", "opt"),
    "he": ("beta", "fixedeffect_vars", "randomeffect_vars", "r2"),
}


def lrt(l: float, l0: float, k: int) -> float:  # noqa: E741 (the original's name)
    """Likelihood-ratio test: p = chi2.sf(2 (l - l0), k).

    Args:
        l, l0: log-likelihoods of the larger model and of the nested (null) model, e.g.
            `free['l']` and `hom['l']`.
        k: number of parameters the null model fixes (e.g. C for free vs hom).
    Returns:
        the p value (an array when l, l0 are arrays; a Series when one is a Series).
    """
    p = inference.lrt(l, l0, k)
    return float(p) if np.ndim(p) == 0 else p


def _estimate_keys(model: str, method: str) -> list[str]:
    """Keys of the estimates dict the original returns for (model, method), without `nu`."""
    keys = [] if model == "full" else ["hom2"]
    if model != "hom":
        keys += ["V", "ct_random_var", "ct_specific_random_var"]
    keys += list(_BY_METHOD[method])
    if model == "full" and "D" in keys:  # the original has no Wald test, hence no D, for full
        keys.remove("D")
    return keys


def _read(x, name: str, ndim: int) -> np.ndarray:
    """A path to an original-format text file (no header, one row per donor), or an array."""
    if isinstance(x, str) or hasattr(x, "__fspath__"):
        return _loadtxt(x, name, ndim)
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(-1, 1) if ndim == 2 and a.ndim == 1 else a


def _check_jackknife(jack_knife) -> bool:
    if isinstance(jack_knife, bool | np.bool_) or jack_knife in (0, 1):
        return bool(jack_knife)
    raise ValueError(
        f"jack_knife={jack_knife!r}: only the leave-one-donor-out jackknife (True/False) is "
        "supported, not the original's delete-m block jackknife (an int number of blocks)."
    )


def _run(
    shape: str,
    model: str,
    method: str,
    y_f,
    P_f,
    noise_f,
    fixed_covars_d: dict | None,
    random_covars_d: dict | None,
    jack_knife=False,
    nu_f=None,
) -> dict | tuple[dict, dict]:
    """Fit one gene with `ctmm_jax.fit` and return the original's (estimates, p values), or
    estimates only for the full model (the original returns one dict there).

    shape: "ctp" (y_f: (N, C), noise_f: ctnu (N, C)) or "op" (y_f, noise_f = nu: (N,)).
    """
    jk = _check_jackknife(jack_knife)
    P = _read(P_f, "P_f", 2)
    if shape == "ctp":
        data = CTPData.from_arrays(_read(y_f, "y_f", 2), _read(noise_f, "ctnu_f", 2), P)
    else:
        data = OPData.from_arrays(_read(y_f, "y_f", 1), _read(noise_f, "nu_f", 1), P)
    covars = Covariates.build(fixed_covars_d, data.donors)
    random = Covariates.build(random_covars_d, data.donors, kind="random")
    res = api.fit(
        data, model, method, noise="plugin", jackknife=jk, he_beta="gls",
        fixed_covars=covars.values, random_covars=random.values, chunk_size=1,
    )  # fmt: skip
    est = _estimates(res, data, model, method, covars, random)
    if shape == "op":
        est["nu"] = float(np.mean(data.nu))
    elif nu_f is not None:
        est["nu"] = float(np.mean(_read(nu_f, "nu_f", 1)))
    if model == "full":
        return est
    if method == "he" and not jk:  # HE has no Wald test without the jackknife
        return est, {}
    pvalues = res.pvalues_jk if jk else res.pvalues
    pvalues = {k: pvalues.get(f"{k}_wald", v) for k, v in pvalues.items() if k in WALD}
    return est, {k: float(v[0]) for k, v in pvalues.items()}


def _estimates(res, data, model: str, method: str, covars, random) -> dict:
    """FitResult of one gene -> the original's estimates dict (keys: `_estimate_keys`)."""
    G, N, C = data.shape
    k = models.n_var(model, C)
    phi, row = res.phi[0], res.table.iloc[0]
    est: dict = {}
    if model != "full":
        est["hom2"] = float(phi[0])
    if model != "hom":
        V = np.asarray(models.unpack(phi[:k], model, C).V)
        P = data.P
        est["V"] = V
        est["ct_random_var"] = float(np.trace(V @ P.T @ P) / N)  # tr(V P^T P) / N
        est["ct_specific_random_var"] = np.diag(V) * np.mean(P**2, axis=0)  # V_cc mean(P_c^2)
    beta, start = {"ct_beta": res.beta[0, :C].copy()}, C
    for name, F in covars.values.items():
        beta[name] = res.beta[0, start : start + F.shape[1]].copy()
        start += F.shape[1]
    est["beta"] = beta
    explained = fixed_effect_variances(res.beta, data.P, covars)  # fixedvar_<name>: (1,)
    est["fixedeffect_vars"] = {
        k.removeprefix("fixedvar_"): float(v[0]) for k, v in explained.items()
    }
    est["r2"] = {name: float(phi[k + j]) for j, name in enumerate(random.values)}
    est["randomeffect_vars"] = {name: float(row[f"randomvar_{name}"]) for name in random.values}
    if method != "he":
        est["l"] = float(res.loglik[0])
        if model != "full":
            D = res.var_cov[0]
            est["D"] = D.copy() if method == "reml" else linalg.block_diag(res.beta_cov[0], D)
        est["opt"] = {
            "method": "Fisher scoring (ctmm_jax)",
            "success": bool(res.converged[0]),
            "status": int(res.status[0]),
            "message": str(row["status"]),
            "l": est["l"],
            "nit": int(res.n_iter[0]),
        }
    return est


def _document(shape: str, model: str, method: str, jackknife: str | None):
    """Decorator: the docstring of an original-style function, from its (model, method)."""
    noise = "ctnu_f" if shape == "ctp" else "nu_f"
    what = {"ml": "ML", "reml": "REML", "he": "HE (Haseman-Elston, method of moments)"}[method]
    Vs = {
        "hom": "V = 0",
        "iid": "V = v I_C",
        "free": "V = diag(v_1..v_C)",
        "full": "V any symmetric; hom2 absorbed",
    }[model]
    keys = _estimate_keys(model, method) + (["nu"] if shape == "op" else [])
    if shape == "ctp" and model == "free" and method == "ml":
        keys[keys.index("ct_specific_random_var")] = "ct_specific_var"
    if model == "full":
        returns = "the estimates dict only (the original has no Wald tests for full)"
    else:
        tests = ["hom2"] + (["V"] if model != "hom" else []) + ["ct_beta"]
        when = "with jack_knife=True (else {})" if method == "he" else ""
        returns = f"(estimates, p) with p keys {', '.join(tests)} {when}".rstrip()
    ignored = ""
    if method != "he":
        ignored = (
            "\n    par, method, nrep, optim_by_R: accepted for compatibility and ignored (they"
            "\n        chose the original's optimizer and start values; ctmm_jax runs Fisher"
            "\n        scoring from moment start values, deterministically)."
        )
    jk = ""
    if jackknife:
        instead = "" if method == "he" else " instead of the inverse information"
        jk = textwrap.fill(
            "jack_knife: Wald tests with leave-one-donor-out jackknife covariances"
            f"{instead} (an int, the original's block jackknife, is refused).",
            width=92,
            initial_indent="\n    ",
            subsequent_indent="        ",
        )
    extra_nu = (
        "\n    nu_f: optional OP noise file; only its mean is reported, as `nu`."
        if shape == "ctp"
        else ""
    )

    returned = textwrap.fill(
        f"{returns}. Estimate keys: {', '.join(keys)}.",
        width=92,
        initial_indent="    ",
        subsequent_indent="    ",
    )

    def deco(f):
        f.__doc__ = f"""{what} fit of the {model} model to one gene's {shape.upper()} ({Vs}).

Calls `ctmm_jax.fit(data, "{model}", "{method}")`; see the module docstring for the model.

Args:
    y_f, P_f, {noise}: paths to the original's text files (or arrays).{extra_nu}
    fixed_covars_d, random_covars_d: name -> path (or (N, k) array) of fixed covariates and
        random-effect designs.{jk}{ignored}
Returns:
{returned}
"""
        return f

    return deco
