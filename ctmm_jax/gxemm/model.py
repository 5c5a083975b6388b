"""GxEMM models: inputs, kernels and the map from variance components to heritabilities.

Trait y (N), covariates X (an intercept is added), kinship K (N x N) or genotypes S (N x M,
K = S S^T / M) and environments Z (N x K0) (design.md section 6). Variance components sig2s, in
the original GxEMM's order, multiply

    genetic : hom  K;   iid  K, K o Z Z^T;   free  K, K o z_k z_k^T (k = 1..K0)
    noise   : hom  I;   free diag(z_k^2) (k = 1..K0-1), I

(the last environment's noise kernel is dropped: it is collinear with I for discrete Z).
`component_names` and `h2_names` name them by what they are (sig2g_hom, sig2g_<level>, ...).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

GTYPES = ("hom", "iid", "free")
ETYPES = ("hom", "free")
COLLINEAR_MAX = 1e4  # the original's bound on the singular-value ratio of [1, X]
# K's eigenvalues down to -PSD_RTOL * its largest are rounding (a GRM S S^T / M computed in
# float64 has some near -1e-15 * largest); below that K is not a covariance (issue 18 #7)
PSD_RTOL = 1e-8


class Inputs(NamedTuple):
    """Validated host arrays: y (T, N), X (N, p) with the intercept first, genetic kernels as
    dense (kg, N, N) or as low-rank factors U (N, m) with groups (kg, m) (K_g = sum of the
    group's U_j U_j^T), noise kernels as diagonals (ke, N) with I last."""

    y: np.ndarray
    X: np.ndarray
    K: np.ndarray | None
    U: np.ndarray | None
    groups: np.ndarray | None
    noise: np.ndarray
    gtype: str
    etype: str
    K0: int
    X_map: np.ndarray | None = None  # (p, p) A with X = X_user A (scale_design)
    discrete: bool = False  # Z is one-hot: every individual in exactly one environment

    @property
    def n_genetic(self) -> int:
        return self.K.shape[0] if self.K is not None else self.groups.shape[0]

    @property
    def n_kernels(self) -> int:
        return self.n_genetic + self.noise.shape[0]


def _matrix(a, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1 and ndim == 2:
        a = a[:, None]
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf; remove or impute those individuals.")
    return a


def check_inputs(y, X, K, Z, S, gtype: str, etype: str) -> Inputs:
    """Validate everything before anything is compiled; ValueError names the input and fix."""
    if gtype not in GTYPES or etype not in ETYPES:
        raise ValueError(f"gtype must be one of {GTYPES} and etype one of {ETYPES}.")
    if gtype == "iid" and etype == "free":  # the original's refusal, same reason
        raise ValueError("gtype='iid' with etype='free': iid + het noise is not very meaningful.")
    y = np.asarray(y, dtype=np.float64)
    y = y[None] if y.ndim == 1 else y
    if y.ndim != 2:
        raise ValueError(f"y: expected (N,) or (traits, N), got shape {y.shape}.")
    if y.shape[0] == 0:
        raise ValueError("y: no traits (shape (0, N)); give at least one.")
    if np.isnan(y).any() or not np.all(np.isfinite(y)):
        raise ValueError("y: contains NaN or inf; drop those individuals (from y, X, K and Z).")
    T, N = y.shape
    if (K is None) == (S is None):
        raise ValueError("give exactly one of K (kinship, N x N) and S (genotypes, N x M).")
    Z = np.zeros((N, 0)) if Z is None else _matrix(Z, "Z", 2)
    K0 = Z.shape[1]
    if Z.shape[0] != N:
        raise ValueError(f"Z: {Z.shape[0]} rows for N = {N} individuals in y.")
    if K0 == 0 and (gtype != "hom" or etype != "hom"):
        raise ValueError("Z is None: only gtype='hom', etype='hom' (plain GREML) can be fitted.")
    if K0 and np.isin(Z, (0.0, 1.0)).all() and (Z.sum(1) == 0).any():
        i = int(np.flatnonzero(Z.sum(1) == 0)[0])
        raise ValueError(
            f"Z: row {i} is all zeros; with discrete environments every individual needs one "
            "(one-hot rows), or drop the individual."
        )
    X = np.ones((N, 1)) if X is None else np.hstack([np.ones((N, 1)), _matrix(X, "X", 2)])
    if X.shape[0] != N:
        raise ValueError(f"X: {X.shape[0]} rows for N = {N} individuals in y.")
    n_gen = {"hom": 1, "iid": 2, "free": 1 + K0}[gtype]
    n_noise = 1 + (K0 - 1 if etype == "free" else 0)
    n_par = n_gen + n_noise + X.shape[1]
    if N <= n_par:  # issue 18 #13: REML's df = N - n_par must be >= 1
        raise ValueError(
            f"y: N = {N} individuals but gtype={gtype!r}, etype={etype!r} has n_par = {n_par} "
            f"parameters ({n_gen + n_noise} variance components + {X.shape[1]} fixed effects: "
            "the intercept and X's columns); the number of individuals must exceed the number "
            "of parameters: use more individuals or a smaller model."
        )
    X, X_map = scale_design(X)
    sv = np.linalg.svd(X, compute_uv=False)
    if sv[-1] == 0 or sv[0] / sv[-1] > COLLINEAR_MAX:
        raise ValueError(
            "X: cbind(1, X) is nearly collinear (singular-value ratio > 1e4 after centring and "
            "scaling X's columns): drop a column that the others (or the intercept) explain, "
            "e.g. one environment indicator of a complete set."
        )
    genetic = [np.ones(N)] + (
        [] if gtype == "hom" else [None] if gtype == "iid" else [Z[:, k] for k in range(K0)]
    )
    if K is not None:
        K = _matrix(K, "K", 2)
        if K.shape[0] != K.shape[1]:
            raise ValueError(f"K: must be square (N x N), got shape {K.shape}.")
        if K.shape[0] != N:
            raise ValueError(f"K: {K.shape[0]} rows for N = {N} individuals in y.")
        if not np.allclose(K, K.T, rtol=0, atol=1e-10 * np.abs(K).max()):
            raise ValueError("K: must be symmetric; use (K + K.T) / 2 if it is a rounding issue.")
        ev = np.linalg.eigvalsh(K)
        if ev[0] < -PSD_RTOL * max(ev[-1], 0.0):
            raise ValueError(
                f"K: not positive semi-definite: its smallest eigenvalue is {ev[0]:.3g} (largest "
                f"{ev[-1]:.3g}; eigenvalues down to -{PSD_RTOL:g} x the largest are taken as "
                "rounding). A kinship is a covariance matrix: compute it as S S^T / M from "
                "standardised genotypes (or pass S), or clip its negative eigenvalues to 0 "
                "(w, U = numpy.linalg.eigh(K); K = (U * w.clip(0)) @ U.T)."
            )
        Ks = [K * (Z @ Z.T) if z is None else K * np.outer(z, z) for z in genetic]
        Kg, U, groups = np.stack(Ks), None, None
    else:
        S = _matrix(S, "S", 2)
        if S.shape[0] != N:
            raise ValueError(f"S: {S.shape[0]} rows for N = {N} individuals in y.")
        G = S / np.sqrt(S.shape[1])
        by_env = [Z[:, [k]] * G for k in range(K0)]  # K o z_k z_k^T = (z_k o G)(z_k o G)^T
        factors = {"hom": [[G]], "iid": [[G], by_env], "free": [[G]] + [[f] for f in by_env]}
        factors = factors[gtype]
        U = np.hstack([f for group in factors for f in group])
        sizes = [sum(f.shape[1] for f in group) for group in factors]
        groups = np.repeat(np.eye(len(sizes)), sizes, axis=1)
        Kg = None
    noise = [Z[:, k] ** 2 for k in range(K0 - 1)] if etype == "free" else []
    discrete = bool(K0) and bool(np.isin(Z, (0.0, 1.0)).all()) and bool((Z.sum(1) == 1).all())
    return Inputs(y, X, Kg, U, groups, np.stack(noise + [np.ones(N)]), gtype, etype, K0, X_map,
                  discrete)  # fmt: skip


def scale_design(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[1, X_user] (intercept first) -> (X_s, A): the intercept and X_user's other columns
    centred and scaled to unit standard deviation, X_s = X_user A. Fits use X_s, so units
    (age in years, PCs of 1e-3) do not make a well-posed design look collinear; betas map
    back as beta = A beta_s and the REML log-likelihood as ll = ll_s + log|det A|
    (log|X_s^T Sigma^-1 X_s| = log|X^T Sigma^-1 X| + 2 log|det A|). ValueError for a
    constant column (the intercept already is one)."""
    mean, sd = X[:, 1:].mean(0), X[:, 1:].std(0)
    flat = np.flatnonzero(sd <= 1e-12 * np.maximum(np.abs(mean), 1e-300))
    if len(flat):
        raise ValueError(
            f"X: column {int(flat[0]) + 1} is constant; the intercept is already in the "
            "model: drop it."
        )
    A = np.eye(X.shape[1])
    A[0, 1:] = -mean / sd
    A[1:, 1:] = np.diag(1.0 / sd)
    return X @ A, A


def standardize(y: np.ndarray) -> np.ndarray:
    """R's scale(y): mean 0 and standard deviation 1 (N - 1) per trait (rows)."""
    return (y - y.mean(1, keepdims=True)) / y.std(1, ddof=1, keepdims=True)


def variance_map(sig2s, gtype: str, etype: str, K0: int):
    """(sig2g, sig2e, h2) from sig2s as the original's sig2map (continuous traits): works on
    NumPy and JAX arrays alike, so the delta method can differentiate it.

    hom/hom: h2 = g / (g + e). iid: h2 = (hom, het) = g_j / (g_1 + g_2 + e).
    Otherwise per environment k: h2_k = (g + g_k) / (g + g_k + e_k) with g_k = 0 for hom
    genetics and e_k = e_I + e_k (e_K0 = 0) for free noise."""
    s = jnp.asarray(sig2s)
    kg = 1 if gtype == "hom" else 2 if gtype == "iid" else 1 + K0
    g, e = s[:kg], s[kg:]
    if gtype == "hom" and etype == "hom":
        return g, e, g / (g + e)
    if gtype == "iid":
        return g, e, g / (g.sum() + e[0])
    env_g = jnp.broadcast_to(g[0] + (g[1:] if gtype == "free" else 0.0), (K0,))
    if etype == "hom":
        return g, e, env_g / (env_g + e[0])
    env_e = e[-1] + jnp.concatenate([e[:-1], jnp.zeros(1)])
    return g, env_e, env_g / (env_g + env_e)


def component_names(gtype: str, etype: str, levels) -> list[str]:
    """Names of sig2s, in its order: genetic sig2g_hom (K), then sig2g_iid (K o Z Z^T) or
    sig2g_<level> (K o z_k z_k^T, one per environment); noise sig2e_<level> (diag(z_k^2), every
    level but the last) for free noise, and sig2e_hom (I) last. levels: the K0 environment
    names (any for gtype = etype = 'hom')."""
    levels = [str(v) for v in levels]
    genetic = {"hom": [], "iid": ["iid"], "free": levels}[gtype]
    noise = levels[:-1] if etype == "free" else []
    return [f"sig2g_{g}" for g in ["hom", *genetic]] + [f"sig2e_{e}" for e in [*noise, "hom"]]


def h2_names(gtype: str, etype: str, levels) -> list[str]:
    """Names of the h2 of variance_map: h2 (hom genetics and noise), h2_hom and h2_het (iid:
    the shared and the environment-specific share of the variance), else h2_<level>."""
    if gtype == "hom" and etype == "hom":
        return ["h2"]
    if gtype == "iid":
        return ["h2_hom", "h2_het"]
    return [f"h2_{v}" for v in levels]


def table_names(gtype: str, etype: str, levels) -> tuple[list[str], list[str]]:
    """(component_names, h2_names), checked to make distinct columns (with their se_):
    ValueError for a repeated level, or one named 'hom' beside sig2g_hom."""
    levels = [str(v) for v in levels]
    names, h2 = component_names(gtype, etype, levels), h2_names(gtype, etype, levels)
    if len(set(levels)) < len(levels) or len(set(names + h2)) < len(names + h2):
        raise ValueError(f"levels {levels}: repeated, or a name that makes two columns alike "
                         "(e.g. 'hom' next to sig2g_hom); rename the level.")  # fmt: skip
    return names, h2


def env_main_effects(X: np.ndarray | None, Z: np.ndarray, tol: float = 1e-8) -> list[int]:
    """Columns of Z (N, K0) to add to the covariates X (N, q) so that the fixed effects span
    [1, X, Z]: each column in turn unless [1, X] and the columns already added explain it
    (relative residual <= tol). For one-hot Z that is every environment but the last, the
    intercept standing for it; none when X already holds them."""
    N = Z.shape[0]
    design = np.ones((N, 1)) if X is None else np.hstack([np.ones((N, 1)), X])
    design = design / np.maximum(np.linalg.norm(design, axis=0), 1e-300)  # units do not matter
    added = []
    for k in range(Z.shape[1]):
        z = Z[:, k] - Z[:, k].mean()
        if not np.any(z):
            continue  # constant: the intercept
        z = z / np.linalg.norm(z)
        r = z - design @ np.linalg.lstsq(design, z, rcond=None)[0]
        if np.linalg.norm(r) > tol:
            added.append(k)
            design = np.hstack([design, z[:, None]])
    return added


# A GxE component whose kernel has VIF above this among the model's kernels is reported as
# weakly identified (fit warns, IdentifiabilityWarning): see `gxe_vif_message`.
VIF_WARN = 10.0


class IdentifiabilityWarning(UserWarning):
    """The GxE variance components are weakly identified: their kernels are nearly
    combinations of the model's other kernels (`kernel_vif` above VIF_WARN)."""


def _vif(G: np.ndarray) -> np.ndarray:
    """VIF_j = G_jj (G^-1)_jj of a Gram matrix G (k, k), from the correlation form C =
    G / sqrt(g g^T) (the same number, better scaled); inf where C is numerically singular (an
    exactly collinear kernel: an inverse that fails, or a diagonal below 1, impossible in exact
    arithmetic)."""
    g = np.sqrt(np.diag(G))
    C = G / np.outer(g, g)
    try:
        vif = np.diag(np.linalg.inv(C))
    except np.linalg.LinAlgError:
        return np.full(len(C), np.inf)
    return np.where(np.isfinite(vif) & (vif >= 1 - 1e-8), vif, np.inf)


def vif_of(inputs: Inputs) -> np.ndarray:
    """Each kernel's variance inflation factor among the model's kernels (k,), in sig2s order
    (see `kernel_vif`), from the kernels as `check_inputs` holds them: the Gram matrix
    G_jk = tr(K_j K_k) has blocks tr(K_g K_h) (dense: one (kg, N^2) product; low rank:
    |U_g^T U_h|_F^2 or, with more columns than individuals, the kernels formed), tr(K_g D_e) =
    diag(K_g) . d_e and tr(D_e D_f) = d_e . d_f for the diagonal noise kernels: O(kg^2 N^2)
    once per call, whatever the number of traits."""
    d = inputs.noise  # (ke, N)
    N = d.shape[1]
    if inputs.K is not None:
        flat = inputs.K.reshape(inputs.K.shape[0], -1)
        Ggg = flat @ flat.T
        diag = np.diagonal(inputs.K, axis1=1, axis2=2)
    else:
        U, groups = inputs.U, inputs.groups
        if U.shape[1] <= N:
            Ggg = groups @ (U.T @ U) ** 2 @ groups.T
        else:
            flat = np.stack([((U * g) @ U.T).ravel() for g in groups])  # kg kernels, small N
            Ggg = flat @ flat.T
        diag = groups @ (U**2).T
    Gge = diag @ d.T
    return _vif(np.block([[Ggg, Gge], [Gge.T, d @ d.T]]))


def weak_gxe(vif, gtype: str, etype: str, levels, threshold: float = VIF_WARN) -> dict:
    """{name: VIF} of the GxE components (gtype 'iid': sig2g_iid; 'free': sig2g_<level>) whose
    kernel VIF (vif: (k,) in sig2s order, `vif_of`) exceeds `threshold`; empty for gtype 'hom'
    (no GxE component).

    Why 10 (VIF_WARN): the usual rule of thumb for collinearity, R^2 > 0.9 of a kernel on the
    others, and a standard error about sqrt(10) > 3 times what an orthogonal kernel would give;
    it separates the README simulation (VIF 1.8-2.4, GxE well estimated) from 94 unrelated
    OneK1K donors with sex (27-39: about 1% power for a GxE variance as large as the noise,
    and sex-specific noise passing for GxE under hom noise)."""
    if gtype == "hom":
        return {}
    names = component_names(gtype, etype, levels)
    gxe = range(1, 2 if gtype == "iid" else 1 + len(levels))
    return {names[j]: float(vif[j]) for j in gxe if not vif[j] <= threshold}


def gxe_vif_message(weak: dict, threshold: float = VIF_WARN) -> str:
    """The identifiability warning, one line, for the components of `weak_gxe`."""
    listed = ", ".join(f"{name} {v:.3g}" for name, v in weak.items())
    return (
        f"the GxE variance is weakly identified: kernel VIF {listed} (above {threshold:g} among "
        "the model's kernels, gxemm.kernel_vif). The GxE kernels K o z z^T are nearly "
        "combinations of the other kernels (unrelated individuals make K close to I, and "
        "K o z z^T close to the noise kernel diag(z)): GxE estimates have large standard "
        "errors, the GxE tests little power, and noise that differs between environments can "
        "pass for GxE. Prefer the LRT against gtype='hom' with etype='free' (and nonneg=True), "
        "and more (or related) individuals."
    )


def kernel_vif(K, Z, gtype: str = "free", etype: str = "free", levels=None) -> dict:
    """How far each variance component is from being identified apart from the others: the
    variance inflation factor of its kernel among all the model's kernels (genetic and noise),
    in the Frobenius inner product, VIF_j = G_jj (G^-1)_jj with G_jk = tr(K_j K_k); VIF_j =
    1 / (1 - R_j^2), R_j^2 the share of ||K_j||^2 that a combination of the others explains.
    With unrelated individuals K is close to I, so K o z z^T is close to the noise kernel
    diag(z): VIFs in the tens or more mean the GxE components are barely identifiable (their
    tests have little power, and an unconstrained fit can trade them for noise); `fit` warns
    (IdentifiabilityWarning) when a GxE component's VIF exceeds VIF_WARN. inf: a kernel is an
    exact combination of the others. Dense K only.
    Returns {component name (component_names, levels default env1, env2, ... as
    GxEMMResult.named_table and fit's warning): VIF}."""
    K = np.asarray(K, dtype=np.float64)
    inputs = check_inputs(np.zeros(K.shape[0]), None, K, Z, None, gtype, etype)
    levels = [f"env{k + 1}" for k in range(inputs.K0)] if levels is None else levels
    names = component_names(gtype, etype, levels)
    return dict(zip(names, vif_of(inputs).tolist(), strict=True))
