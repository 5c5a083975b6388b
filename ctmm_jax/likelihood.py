"""Per-gene ML/REML negative log-likelihood, score and expected information.

Written for N donors, each a block of b values (b = C for CTP, b = 1 for OP),

    Sigma = blockdiag(Sigma_i) + U R2 U^T,   Sigma_i = sum_k w_k E_ki + diag(noise_i),
    y = X beta + e,

with kernels E_ki (b x b) and their weights w (models.kernel_weights; CTP uses the model
kernels for every donor, OP the scalars P_i^T E_k P_i, design.md 2-3) and optional random
covariates U (N blocks 1_b u_i^T; R2 = diag of each column's r2, one r2 per covariate). The
fixed design is X_i (columns that vary within a block) plus donor-level columns 1_b f_i^T.
Donor-level columns are never expanded to b rows: sums over donors that involve them are
contractions with the (N x k) matrix of donor values (see `_sym_block` and below).

With W_i = Sigma_i^-1 and Z = [X, U], the Woodbury identity (see `_low_rank`) gives
Sigma^-1 = W - W U M U^T W and the REML projection Pi = W - W Z N Z^T W (N the inverse of
Henderson's mixed-model equations, written without R2^-1). With u = Pi y:

    ML   : 2 nll = log|Sigma| + y^T u + n log(2 pi)
    REML : 2 nll = log|Sigma| + log|X^T Sigma^-1 X| + y^T u + (n - p) log(2 pi)
    score: d nll / d phi_k = 1/2 [tr(Pj K_k) - u^T K_k u]
    info : 1/2 tr(Pj K_k Pj K_l) = 1/2 [T1_kl - 2 sum_i tr(H_i E_ki W_i E_li) + tr(N F_k N F_l)]
    hess : d2 nll / d phi_k d phi_l = u^T K_k Pi K_l u - info   (beta profiled out)

where Pj is Pi (REML) or Sigma^-1 (ML: N = M in the U block, 0 elsewhere),
T1_kl = sum_i tr(W_i E_ki W_i E_li), F_k = sum_i Z_i^T W_i E_ki W_i Z_i and
H_i = (W Z N Z^T W)_ii; the random-covariate rows are
in `_add_random`. Nothing larger than b x b or (p + m) x (p + m) is ever formed per gene. OP's
blocks are 1 x 1 (Sigma is diagonal plus the random covariates): its sums over donors are
products of rows shared by the genes of a batch with per-gene weights (`_terms_diagonal`). A
covariance that is not positive definite gives nll = +inf; the optimizer rejects such steps.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import linalg, rankone

LOG_2PI = jnp.log(2.0 * jnp.pi)
COND_MAX = 1e8  # feasible region: max_i |Sigma_i|_F * max_i |Sigma_i^-1|_F <= COND_MAX


class Within(NamedTuple):
    """The cells of each (donor, cell type) pair, (N, C) each, 0 where no pair is observed:
    dof = n_ic - 1 and ss = sum_k (y_ick - ybar_ic)^2 (the within-pair sum of squares)."""

    dof: jax.Array
    ss: jax.Array


class CellNoise(NamedTuple):
    """The `noise` argument of a gene under noise="cells" (estimators, noise.py): values with
    noise variance fixed + sum_c s2_c loadings_ic, s2 fitted. fixed: (N, b); loadings, dof,
    ss: (N, C) (`Within`). Everywhere else `noise` is the (N, b) array of known variances."""

    fixed: jax.Array
    loadings: jax.Array
    dof: jax.Array
    ss: jax.Array


class GeneData(NamedTuple):
    """One gene in block form.

    y: (N, b) values; noise: (N, b) known noise variances; X: (N, b, p_b) fixed-effect columns
    that vary within a block (CTP: the cell-type indicators I_C; OP: the proportions P_i^T);
    E: (n_var, N, b, b) kernels of each block (a leading 1 instead of N broadcasts);
    mask: (N, b) 1 for observed values, 0 for missing ones (a dropped donor is a row of 0s),
    or None when everything is observed;
    F: (N, k) donor-level fixed covariates and U: (N, m) donor-level random-covariate designs
    (or None): donor i's block of the full design is 1_b f_i^T (resp. 1_b u_i^T);
    groups: (n_rand, m) 0/1, which columns of U belong to each random covariate (its variance
    r2 multiplies sum_{j in group} U_j U_j^T (x) J_b);
    diag_j: (n_var, b + 1) or None: when every kernel is diag(a_k) + c_k J_b and shared by the
    donors (CTP hom, iid, free; models.diag_j_coefficients), the rows [a_k, c_k]. The
    likelihood then inverts each Sigma_i = diag(d_i) + h J_b by Sherman-Morrison and sums its
    traces in O(N b^2) (rankone.py) instead of O(N b^4); X_i must be I_b (CTP);
    loadings: (N, n_l) or None: n_l more kernels, their weights after the model's: per donor
    diag(loadings_i o e_c) (CTP, n_l = b) or the scalars loadings_ic (OP, b = 1), e.g. d Sigma /
    d s2_c of the pooled within-pair variances (nulltest.py);
    within: the cells behind the values, for the exact likelihood of noise="cells"
    (`Within`): the weights of the n_l = C loadings are then the within-pair variances s2_c,
    and the NLL adds the cells' within-pair term (`within_nll2`).
    """

    y: jax.Array
    noise: jax.Array
    X: jax.Array
    E: jax.Array
    mask: jax.Array | None = None
    F: jax.Array | None = None
    U: jax.Array | None = None
    groups: jax.Array | None = None
    diag_j: jax.Array | None = None
    loadings: jax.Array | None = None
    within: Within | None = None

    @property
    def n_kernels(self) -> int:
        """Kernel weights before the random covariates' r2: n_var, and n_l more with loadings."""
        return self.E.shape[0] + (0 if self.loadings is None else self.loadings.shape[1])

    def all_kernels(self) -> jax.Array:
        """(n_kernels, N or 1, b, b): E and the loadings' kernels."""
        if self.loadings is None:
            return self.E
        (n_k, _, b, _), N = self.E.shape, self.y.shape[0]
        if b == 1:
            extra = self.loadings.T[:, :, None, None]
        else:
            extra = jnp.einsum("nc,ca,cb->cnab", self.loadings, jnp.eye(b), jnp.eye(b))
        return jnp.concatenate([jnp.broadcast_to(self.E, (n_k, N, b, b)), extra])

    @property
    def donor_columns(self) -> jax.Array:
        """FU = [F, U] (N, k + m): the donor-level columns of the full design Z = [X, 1 FU^T]."""
        N = self.y.shape[0]
        cols = [c for c in (self.F, self.U) if c is not None]
        return jnp.concatenate(cols, axis=1) if cols else jnp.zeros((N, 0), self.y.dtype)

    @property
    def n_fixed(self) -> int:
        return self.X.shape[-1] + (0 if self.F is None else self.F.shape[-1])


def lift(cols: jax.Array, b: int) -> jax.Array:
    """Donor-level columns (N, k) as blocks 1_b d_i^T: (N, b, k)."""
    return jnp.broadcast_to(cols[:, None, :], (cols.shape[0], b, cols.shape[1]))


def fixed_design(X: jax.Array, F: jax.Array | None) -> jax.Array:
    """The full fixed-effect design [X_i, 1_b f_i^T] ([G,] N, b, p) from the block-level X
    ([G,] N, b, p_b) and the donor-level F (N, k), for one-off uses (checks, start values, HE)."""
    if F is None:
        return X
    return jnp.concatenate([X, jnp.broadcast_to(F[:, None, :], X.shape[:-1] + F.shape[-1:])], -1)


def observed(d: GeneData) -> GeneData:
    """Exact likelihood of the observed values (design.md 4): for masked entries the rows and
    columns of Sigma become the identity (kernels 0, noise 1) and y and X become 0, so they
    add log|1| = 0 and nothing else. F and U need no mask: they enter only through W_i, whose
    masked rows and columns are 0 (`factor`)."""
    if d.mask is None:
        return d
    m = d.mask
    return d._replace(
        y=d.y * m,
        noise=jnp.where(m > 0, d.noise, 1.0),
        X=d.X * m[..., None],
        E=d.E * (m[:, :, None] * m[:, None, :]),
    )


def n_observed(d: GeneData) -> jax.Array:
    return d.y.size if d.mask is None else d.mask.sum()


class Moments(NamedTuple):
    """Everything a Fisher-scoring step and the Wald tests need at one phi."""

    nll: jax.Array  # ()
    cond: jax.Array  # () conditioning bound, see factor
    score: jax.Array  # (n_par,)  d nll / d phi
    info: jax.Array  # (n_par, n_par) expected information
    hess: jax.Array  # (n_par, n_par) observed information (Hessian of nll in phi)
    beta: jax.Array  # (p,) GLS estimate
    beta_cov: jax.Array  # (p, p) (X^T Sigma^-1 X)^-1


class Factor(NamedTuple):
    """Sigma^-1 = W - W U M U^T W and the REML projection Pi = W - W Z N Z^T W, Z = [X, U]."""

    W: jax.Array | None  # (N, b, b) block inverses
    WX1: (
        jax.Array | None
    )  # (N, b, p_b + 1) [W_i X_i, w_i], w_i = W_i 1_b: W_i Z_i = [W_i X_i, w_i d_i^T]
    S: jax.Array  # (q, q) Z^T W Z, q = p + m
    mme_inv: jax.Array  # (q, q) N of the module doc; its (p, p) block is (X^T Sigma^-1 X)^-1
    M: jax.Array | None  # (m, m) (R2^-1 + U^T W U)^-1 (None without random covariates)
    u: jax.Array  # (N, b) Pi y = Sigma^-1 (y - X beta)
    beta: jax.Array  # (p,)
    nll: jax.Array  # ()
    cond: jax.Array  # ()
    r1: rankone.RankOne | None = None  # the closed forms instead of W and WX1 (GeneData.diag_j)


# Donor-level columns. With Z_i = [X_i, 1_b d_i^T] (FU = [F, U]) and W_i Z_i = [W_i X_i, w_i d_i^T]
# (w_i = W_i 1_b), every sum over donors of products of such blocks splits into a block-level
# part over the p_b columns of X and donor-level parts that are contractions with FU, e.g.
#     Z^T W Z = [[sum_i X_i^T W_i X_i, sum_i X_i^T w_i d_i^T], [., FU^T diag(1_b^T w_i) FU]],
# so a gene costs O(N b^2 p_b + N k^2) instead of O(N b q^2) (q = p_b + k; CTP: p_b = C).


def _sym_block(A: jax.Array, B: jax.Array, C: jax.Array) -> jax.Array:
    """[[A, B], [B^T, C]] over the last two axes."""
    top = jnp.concatenate([A, B], -1)
    return jnp.concatenate([top, jnp.concatenate([jnp.swapaxes(B, -1, -2), C], -1)], -2)


def _donor_gram(s: jax.Array, FU: jax.Array) -> jax.Array:
    """FU^T diag(s_k) FU for every row s_k of s (k, N): (k, m, m); for small m as one product
    with the rows d_i d_i^T (N x m^2, which vectorises best), else column-scaled products."""
    N, m = FU.shape
    if m > 32:  # static
        return jnp.einsum("kni,nj->kij", s[:, :, None] * FU, FU)
    return (s @ (FU[:, :, None] * FU[:, None, :]).reshape(N, m * m)).reshape(s.shape[0], m, m)


def _frobenius_cond(A: jax.Array, Ainv: jax.Array) -> jax.Array:
    """max |A_i|_F * max |A_i^-1|_F over the leading axis (or of one matrix)."""
    return jnp.sqrt(
        jnp.max(jnp.sum(A**2, axis=(-2, -1))) * jnp.max(jnp.sum(Ainv**2, axis=(-2, -1)))
    )


def _low_rank(phi_r, S_uu, groups):
    """Woodbury pieces of Sigma = B + U R2 U^T (B = blockdiag(Sigma_i)), R2 = diag(groups^T r2):
    with S_uu = U^T W U = L L^T (a 1e-12 ridge keeps L finite when U^T W U is singular, e.g.
    an empty batch level; the ridge acts only on directions that U maps to 0), C = I + L^T R2 L
    and

        M = (R2^-1 + S_uu)^-1 = R2 - R2 L C^-1 L^T R2,    log|Sigma| = log|B| + log|C|.

    Sigma is positive definite exactly when B and C are, so negative r2 are allowed as long as
    C is PD. Returns (M, logdet C, cond of C)."""
    m = S_uu.shape[0]
    g = groups.T @ phi_r
    ridge = 1e-12 * jnp.max(jnp.diagonal(S_uu)) + jnp.finfo(S_uu.dtype).tiny
    L = linalg.cholesky(S_uu + ridge * jnp.eye(m))
    Cm = jnp.eye(m) + L.T @ (g[:, None] * L)
    Lc = linalg.cholesky(Cm)
    Cinv = linalg.inv_from_cholesky(Lc)
    GL = g[:, None] * L
    M = jnp.diag(g) - GL @ Cinv @ GL.T
    return 0.5 * (M + M.T), linalg.logdet_from_cholesky(Lc), _frobenius_cond(Cm, Cinv)


def _cholesky_blocks(w: jax.Array, d: GeneData):
    """W_i = Sigma_i^-1 (zero on missing values), sum_i log|Sigma_i| and the Sigma_i (zero on
    missing values) by a Cholesky factor of every block (NaN where one is not PD)."""
    b = d.y.shape[1]
    Sigma = jnp.einsum("k,knij->nij", w, d.all_kernels()) + d.noise[..., None] * jnp.eye(b)
    if d.mask is not None:
        mm = d.mask[:, :, None] * d.mask[:, None, :]
        Sigma = Sigma * mm + (1.0 - d.mask)[..., None] * jnp.eye(b)
    L = linalg.cholesky(Sigma, unroll=True)
    W = linalg.inv_from_cholesky(L, unroll=True)
    if d.mask is not None:
        W, Sigma = W * mm, Sigma * mm
    return W, linalg.logdet_from_cholesky(L).sum(), Sigma


def _scalar_kernels(d: GeneData) -> jax.Array:
    """OP's kernels e_ki, the loadings' after the model's: (n_kernels, N)."""
    return d.all_kernels()[:, :, 0, 0]


def _observed_donors(d: GeneData) -> jax.Array | bool:
    """OP: (N,) True where the donor's value is observed (True when nothing is missing)."""
    return True if d.mask is None else d.mask[:, 0] > 0


def _diagonal_design(d: GeneData) -> jax.Array:
    """OP's full design Z (N, q): with 1 x 1 blocks a donor's block-level columns X_i and
    donor-level columns d_i are one row [X_i, d_i]."""
    return jnp.concatenate([d.X[:, 0, :], d.donor_columns], axis=1)


def _outer_rows(A: jax.Array, B: jax.Array) -> jax.Array:
    """The outer products a_i b_i^T of the rows of A (N, a) and B (N, b), flattened: (N, a b)."""
    return (A[:, :, None] * B[:, None, :]).reshape(A.shape[0], -1)


def _diagonal_inverse(w: jax.Array, d: GeneData):
    """OP (1 x 1 blocks, no closed forms needed): Sigma_i = sigma_i = sum_k w_k e_ki + noise_i,
    so W_i = 1/sigma_i (0 where missing), log|Sigma| = sum_i log sigma_i (NaN or -inf where a
    sigma_i <= 0) and `factor`'s cond is max_i |sigma_i| max_i |1/sigma_i| over the observed
    donors, the ratio of the largest to the smallest sigma_i. Returns (1/sigma (N,), logdet,
    cond)."""
    sigma = w @ _scalar_kernels(d) + d.noise[:, 0]
    seen = _observed_donors(d)
    sigma = jnp.where(seen, sigma, 1.0)
    iv = jnp.where(seen, 1.0 / sigma, 0.0)
    cond = jnp.max(jnp.where(seen, jnp.abs(sigma), 0.0)) * jnp.max(jnp.abs(iv))
    return iv, jnp.log(sigma).sum(), cond


def factor(phi: jax.Array, d: GeneData, reml: bool | jax.Array) -> Factor:
    """Cholesky of every block Sigma_i, the Woodbury correction for random covariates, GLS and the
    NLL. Missing values (mask 0) get an identity row and column in Sigma_i (so they add log 1 = 0),
    and W_i is then zeroed on them: W is the inverse of the observed part embedded in zeros, and
    every sum over W below (GLS, quadratic form, score, information) runs over the observed
    values only, with y, X, U and the kernels left as they are. OP's 1 x 1 blocks are inverted
    elementwise, and its sums over donors are products of the per-donor rows of the design
    (shared by the genes of a batch) with per-gene weights: matrix products under vmap."""
    N, b = d.y.shape
    p = d.n_fixed
    n_var = d.n_kernels
    FU = d.donor_columns
    pb = d.X.shape[-1]
    r1 = None
    if d.diag_j is not None:  # static: closed forms, X_i = I_b (rankone.py)
        r1 = rankone.inverse(phi[:n_var], d.diag_j, d.noise, d.mask, d.loadings)
        W = WX1 = None
        logdet, cond, w, S_bb = r1.logdet, r1.cond, r1.w, rankone.gram(r1)
        WXty = rankone.apply(r1, d.y).sum(0)
        apply_W = partial(rankone.apply, r1)
    elif b == 1:  # static: OP
        iv, logdet, cond = _diagonal_inverse(phi[:n_var], d)
        Z = _diagonal_design(d)
        W = iv[:, None, None]
        WX1 = W * jnp.concatenate([d.X, jnp.ones((N, 1, 1), d.X.dtype)], axis=2)
        S = (iv @ _outer_rows(Z, Z)).reshape(Z.shape[1], Z.shape[1])
        Zty = (iv * d.y[:, 0]) @ Z

        def apply_W(v):
            return iv[:, None] * v
    else:
        W, logdet, Sigma = _cholesky_blocks(phi[:n_var], d)
        X1 = jnp.concatenate([d.X, jnp.ones((N, b, 1), d.X.dtype)], axis=2)  # [X_i, 1_b]
        WX1 = linalg.small_matmul(W, X1)  # [W_i X_i, w_i]
        WX, w = WX1[..., :pb], WX1[..., pb]
        S_bb, WXty = jnp.einsum("nap,naq->pq", d.X, WX), jnp.einsum("nap,na->p", WX, d.y)
        # max_i |Sigma_i|_F * max_i |W_i|_F (observed entries) is between the eigenvalue ratio
        # of the Sigma_i and b times it (exact for 1 x 1 blocks, `_diagonal_inverse`). Past
        # COND_MAX the fit counts as outside the positive-definite region: the likelihood grows
        # without bound as one donor's covariance becomes singular (GLS then fits that donor
        # exactly, design.md 9), so the region must stop short of the boundary. With random
        # covariates the conditioning of C counts too.
        cond = _frobenius_cond(Sigma, W)

        def apply_W(v):
            return (W * v[:, None, :]).sum(-1)

    if b > 1:  # static: block-level and donor-level parts
        S_bd = jnp.einsum("nap,na->pn", d.X, w) @ FU
        S = _sym_block(S_bb, S_bd, _donor_gram(w.sum(1)[None], FU)[0])
        Zty = jnp.concatenate([WXty, (w * d.y).sum(1) @ FU])
    if d.U is None:
        M, XtVX = None, S
    else:
        M, logdet_C, cond_C = _low_rank(phi[n_var:], S[p:, p:], d.groups)
        logdet, cond = logdet + logdet_C, jnp.maximum(cond, cond_C)
        XtVX = S[:p, :p] - S[:p, p:] @ M @ S[p:, :p]
    Lx = linalg.cholesky(XtVX)
    A = linalg.inv_from_cholesky(Lx)
    if d.U is None:
        mme_inv = A
    else:  # inverse of Henderson's [[X'WX, X'WU], [U'WX, U'WU + R2^-1]], written without R2^-1
        AXU_M = A @ S[:p, p:] @ M
        mme_inv = jnp.block([[A, -AXU_M], [-AXU_M.T, M + AXU_M.T @ S[:p, p:] @ M]])
    gamma = mme_inv @ Zty
    fitted = jnp.einsum("nbp,p->nb", d.X, gamma[:pb]) + (FU @ gamma[pb:])[:, None]
    u = apply_W(d.y - fitted)
    nll2 = logdet + jnp.sum(d.y * u) + n_observed(d) * LOG_2PI
    # reml may be traced: ML and REML share one compiled program
    nll2 = nll2 + jnp.where(reml, linalg.logdet_from_cholesky(Lx) - p * LOG_2PI, 0.0)
    if d.within is not None:  # static: noise="cells"
        nll2 = nll2 + within_nll2(phi, d)
    feasible = jnp.isfinite(nll2) & (cond <= COND_MAX)
    nll = jnp.where(feasible, 0.5 * nll2, jnp.inf)
    return Factor(W, WX1, S, mme_inv, M, u, gamma[:p], nll, cond, r1)


def _within(d: GeneData, phi: jax.Array):
    """(s2 (C,), dof, ss (N, C)) of the cells model: the weights of the loadings, and the
    cells of the observed pairs (a missing value or left-out donor contributes nothing)."""
    n_e, C = d.E.shape[0], d.within.dof.shape[1]
    m = 1.0 if d.mask is None else d.mask  # (N, C) CTP, (N, 1) OP
    return phi[n_e : n_e + C], d.within.dof * m, d.within.ss * m


def within_nll2(phi: jax.Array, d: GeneData) -> jax.Array:
    """Twice the NLL of the cells' deviations from their pair means (noise="cells"). Given
    the pair's effects the n_ic cells are iid N(mean, s2_c), and their density factorises
    into that of the mean, N(ybar_ic; ., s2_c / n_ic) (the pseudobulk likelihood), times

        (2 pi s2_c)^(-(n_ic - 1)/2) n_ic^(-1/2) exp(-ss_ic / (2 s2_c)),

    so the sum of the two is the log-likelihood of the cells themselves:
    2 nll_within = sum_ic (n_ic - 1)(log 2 pi + log s2_c) + log n_ic + ss_ic / s2_c.
    +inf unless every s2_c > 0."""
    s2, dof, ss = _within(d, phi)
    safe = jnp.where(s2 > 0, s2, 1.0)  # finite gradients where infeasible
    used = dof > 0
    terms = dof * (LOG_2PI + jnp.log(safe)) + jnp.log1p(dof) + ss / safe
    return jnp.where(jnp.all(s2 > 0), jnp.where(used, terms, 0.0).sum(), jnp.inf)


def _add_within(phi, d: GeneData, score, info, hess):
    """The within-pair term's score 1/2 sum_i (dof/s2 - ss/s2^2), expected information
    1/2 sum_i dof/s2^2 and Hessian 1/2 sum_i (2 ss/s2^3 - dof/s2^2) on the s2 coordinates."""
    s2, dof, ss = _within(d, phi)
    D, SS = dof.sum(0), ss.sum(0)
    idx = d.E.shape[0] + jnp.arange(s2.shape[0])
    return (
        score.at[idx].add(0.5 * (D / s2 - SS / s2**2)),
        info.at[idx, idx].add(0.5 * D / s2**2),
        hess.at[idx, idx].add(0.5 * (2.0 * SS / s2**3 - D / s2**2)),
    )


def nll(phi: jax.Array, d: GeneData, reml: bool | jax.Array) -> jax.Array:
    """Negative log-likelihood of one gene at natural parameters phi; +inf if not PD."""
    return factor(phi, d, reml).nll


ROUNDING_MARGIN = 1e-9  # of the largest |w|^T |e_i| + |dw|^T |e_i| + noise_i: far above rounding


def infeasible_from(d: GeneData, w: jax.Array, dw: jax.Array) -> jax.Array:
    """A step a beyond which the kernel weights w - a dw are certainly infeasible (`factor`'s
    nll is +inf), for 1 x 1 blocks (OP) and 0 <= a <= 1; +inf when none is known.

    There Sigma_i = sigma_i is a scalar, affine in the step: sigma_i(a) = s_i - a t_i with
    s_i = w^T e_i + noise_i and t_i = dw^T e_i (e_ki the kernels, the loadings' after the
    model's). A trial is infeasible when an observed sigma_i <= 0 (its log is not finite) or
    max_j sigma_j > COND_MAX min_i sigma_i (`factor`'s cond, exact for OP). With a margin m
    far above the rounding of either evaluation (ROUNDING_MARGIN of the largest term), both
    are certain past

        a_i = (s_i + m) / t_i                                      (t_i > 0),
        a_i = (COND_MAX (s_i + m) - s_j + m) / (COND_MAX t_i - t_j)  (denominator > 0),

    j the donor of the largest s_j (a lower bound on the largest sigma). The blocks' conditions
    are necessary with random covariates too (`_low_rank`), so the bound never hides a
    feasible step; steps below it promise nothing."""
    e = _scalar_kernels(d)  # (k, N)
    k, noise = e.shape[0], d.noise[:, 0]
    s, t = w[:k] @ e + noise, dw[:k] @ e
    size = (jnp.abs(w[:k]) + jnp.abs(dw[:k])) @ jnp.abs(e) + jnp.abs(noise)
    seen = _observed_donors(d)  # missing: not in Sigma
    m = ROUNDING_MARGIN * jnp.where(seen, size, 0.0).max()
    j = jnp.argmax(jnp.where(seen, s, -jnp.inf))
    walls = [(s + m, t), (COND_MAX * (s + m) - s[j] + m, COND_MAX * t - t[j])]
    steps = [jnp.where(seen & (den > 0), num / den, jnp.inf) for num, den in walls]
    return jnp.min(jnp.stack(steps))


class _Traces(NamedTuple):
    """Sums over donors that the score, information and Hessian are made of (module doc)."""

    trWK: jax.Array  # (k,) sum_i tr(W_i E_ki)
    quad: jax.Array  # (k,) sum_i u_i^T E_ki u_i
    T1: jax.Array  # (k, k) sum_i tr(W_i E_ki W_i E_li)
    uKWKu: jax.Array  # (k, k) sum_i u_i^T E_ki W_i E_li u_i
    T2: jax.Array  # (k, k) sum_i tr(H_i E_ki W_i E_li),  H_i = (W Z N Z^T W)_ii


def _traces_per_donor(E, W, u, H) -> _Traces:
    """Kernels that differ by donor, in blocks larger than 1 x 1 (OP's 1 x 1 blocks:
    `_terms_diagonal`): products block by block."""
    M = W[None] @ E  # W_i E_ki
    Ku = (E @ u[None, ..., None])[..., 0]  # E_ki u_i
    return _Traces(
        trWK=jnp.trace(M, axis1=2, axis2=3).sum(1),
        quad=jnp.einsum("ni,kni->k", u, Ku),
        T1=jnp.einsum("knij,lnji->kl", M, M),
        uKWKu=jnp.einsum("kni,lni->kl", Ku, (W[None] @ Ku[..., None])[..., 0]),
        T2=jnp.einsum("knil,mnli->km", H[None] @ E, M),
    )


def _traces_shared(E0, W, u, H) -> _Traces:
    """Kernels shared by every donor (CTP): sum over donors first (contractions over N, which
    vectorise far better than N small matrix products), then contract with the kernels."""
    S_WW = jnp.einsum("nbc,nda->bcda", W, W)
    S_uWu = jnp.einsum("na,nbc,nd->abcd", u, W, u)
    S_HW = jnp.einsum("nda,nbc->dabc", H, W)
    return _Traces(
        trWK=jnp.einsum("kab,ab->k", E0, W.sum(0)),
        quad=jnp.einsum("kab,na,nb->k", E0, u, u),
        T1=jnp.einsum("kab,lcd,bcda->kl", E0, E0, S_WW),
        uKWKu=jnp.einsum("kab,lcd,abcd->kl", E0, E0, S_uWu),
        T2=jnp.einsum("kab,lcd,dabc->kl", E0, E0, S_HW),
    )


def _design_terms_shared(E0, WX, w, u, FU):
    """Kernels shared by every donor (CTP): the block-level parts of `_design_terms` summed over
    donors first, then contracted with the kernels."""
    F_bb = jnp.einsum("kab,apbq->kpq", E0, jnp.einsum("nap,nbq->apbq", WX, WX))
    F_bd = jnp.einsum("kab,apbj->kpj", E0, jnp.einsum("nap,nb,nj->apbj", WX, w, FU))
    ZtWKu_b = jnp.einsum("kab,apb->kp", E0, jnp.einsum("nap,nb->apb", WX, u))
    s = jnp.einsum("kab,na,nb->kn", E0, w, w)  # w_i^T E_k w_i
    t = jnp.einsum("kab,na,nb->kn", E0, w, u)  # w_i^T E_k u_i
    return F_bb, F_bd, s, ZtWKu_b, t


def _design_terms_per_donor(E, WX, w, u, FU):
    """Kernels that differ by donor: block by block."""
    KWX, Kw, Ku = E @ WX[None], (E @ w[None, ..., None])[..., 0], (E @ u[None, ..., None])[..., 0]
    F_bb = jnp.einsum("nap,knaq->kpq", WX, KWX)
    F_bd = jnp.einsum("nap,kna,nj->kpj", WX, Kw, FU)
    ZtWKu_b = jnp.einsum("nap,kna->kp", WX, Ku)
    return F_bb, F_bd, jnp.einsum("na,kna->kn", w, Kw), ZtWKu_b, jnp.einsum("na,kna->kn", w, Ku)


def _design_terms(E, WX1, u, FU) -> tuple[jax.Array, jax.Array]:
    """F_k = Z^T W K_k W Z (k, q, q) and Z^T W K_k u (k, q) with W_i Z_i = [W_i X_i, w_i d_i^T]
    (WX1 = [W X, w]): the donor-level parts are [F_k]_dd = FU^T diag(w_i^T E_ki w_i) FU,
    [F_k]_bd = sum_i (W_i X_i)^T E_ki w_i d_i^T and [Z^T W K_k u]_d = FU^T (w_i^T E_ki u_i)."""
    pb = WX1.shape[-1] - 1
    WX, w = WX1[..., :pb], WX1[..., pb]
    if E.shape[1] == 1:  # static
        F_bb, F_bd, s, ZtWKu_b, t = _design_terms_shared(E[:, 0], WX, w, u, FU)
    else:
        F_bb, F_bd, s, ZtWKu_b, t = _design_terms_per_donor(E, WX, w, u, FU)
    return _sym_block(F_bb, F_bd, _donor_gram(s, FU)), jnp.concatenate([ZtWKu_b, t @ FU], -1)


def _terms_diagonal(d, f, Nj):
    """`_Traces`, F_k and Z^T W K_k u for OP's 1 x 1 blocks. With e_ik the kernels, the weights
    W_i = 1/sigma_i, the design rows Z_i and h_i = W_i^2 Z_i^T Nj Z_i:

        trWK_k = sum_i W_i e_ik,              quad_k = sum_i u_i^2 e_ik,
        T1_kl = sum_i W_i^2 e_ik e_il,        uKWKu_kl = sum_i W_i u_i^2 e_ik e_il,
        T2_kl = sum_i W_i h_i e_ik e_il,      F_k = sum_i W_i^2 e_ik Z_i Z_i^T,
        (Z^T W K_k u) = sum_i W_i u_i e_ik Z_i,

    each (e o per-gene donor weights)^T times e, Z or the rows Z_i Z_i^T. The kernels and Z
    are shared by the genes of a batch (unless loadings or per-gene designs make them
    differ), so under vmap these are single matrix products for the whole batch."""
    e = _scalar_kernels(d).T  # (N, k)
    Z = _diagonal_design(d)
    k, q = e.shape[1], Z.shape[1]
    iv, u = f.W[:, 0, 0], f.u[:, 0]
    h = iv**2 * ((Z @ Nj) * Z).sum(1)
    T = (jnp.concatenate([iv**2 * e.T, iv * u**2 * e.T, iv * h * e.T]) @ e).reshape(3, k, k)
    t = _Traces(iv @ e, u**2 @ e, *T)
    F = ((iv**2 * e.T) @ _outer_rows(Z, Z)).reshape(k, q, q)
    return t, F, (iv * u * e.T) @ Z


def _terms_rank_one(d, r1, u, Nj, FU):
    """`_Traces`, F_k and Z^T W K_k u in the closed forms of rankone.py (X_i = I_b)."""
    b, S = u.shape[1], d.diag_j
    v = FU @ Nj[b:, :b]  # Nj_bd d_i
    hd = jnp.einsum("ni,ij,nj->n", FU, Nj[b:, b:], FU)
    t = _Traces(*rankone.traces(S, d.loadings, r1, u, Nj[:b, :b], v, hd))
    F_bb, F_bd, s, ZtWKu_b, tk = rankone.design_terms(S, d.loadings, r1, u, FU)
    return t, _sym_block(F_bb, F_bd, _donor_gram(s, FU)), jnp.concatenate([ZtWKu_b, tk @ FU], -1)


def moments(phi: jax.Array, d: GeneData, reml: bool | jax.Array) -> Moments:
    """NLL, analytic score, expected information and Hessian of one gene at phi (module doc).

    The score and information use Pj = W - W Z Nj Z^T W with Nj = N (REML: Pj = Pi) or M in
    the U block and 0 elsewhere (ML: Pj = Sigma^-1); the Hessian's y^T Pi K Pi K Pi y always
    uses Pi (beta profiled out)."""
    f = factor(phi, d, reml)
    p, q = d.n_fixed, f.S.shape[0]
    FU = d.donor_columns
    Nj_ml = jnp.zeros((q, q)) if f.M is None else jnp.zeros((q, q)).at[p:, p:].set(f.M)
    Nj = jnp.where(reml, f.mme_inv, Nj_ml)
    if f.r1 is not None:  # static
        t, F, ZtWKu = _terms_rank_one(d, f.r1, f.u, Nj, FU)
    elif d.y.shape[1] == 1:  # static: OP
        t, F, ZtWKu = _terms_diagonal(d, f, Nj)
    else:
        H, E = _projected_blocks(f.WX1, Nj, FU), d.all_kernels()
        if E.shape[1] == 1:  # static
            t = _traces_shared(E[:, 0], f.W, f.u, H)
        else:
            t = _traces_per_donor(E, f.W, f.u, H)
        F, ZtWKu = _design_terms(E, f.WX1, f.u, FU)
    Njk = jnp.broadcast_to(Nj, F.shape)  # batched products vectorise, broadcast ones do not
    NFN = Njk @ F @ Njk  # tr(Nj F_k Nj F_l) = <Nj F_k Nj, F_l> (all symmetric)
    score = 0.5 * (t.trWK - (Nj * F).sum((1, 2)) - t.quad)
    info = 0.5 * (t.T1 - t.T2 - t.T2.T + (NFN[:, None] * F[None]).sum((2, 3)))
    Q = t.uKWKu - ZtWKu @ f.mme_inv @ ZtWKu.T  # y'Pi K_k Pi K_l Pi y
    if d.U is not None:
        score, info, Q = _add_random(d, f, F, ZtWKu, Nj, reml, score, info, Q)
    hess = Q - info
    if d.within is not None:  # static: noise="cells"
        score, info, hess = _add_within(phi, d, score, info, hess)
    return Moments(f.nll, f.cond, score, info, hess, f.beta, f.mme_inv[:p, :p])


def donor_scores(phi: jax.Array, d: GeneData, reml: bool | jax.Array):
    """Each donor's part of the score in the kernel weights and of GLS's estimating equation:
    s_ik = 1/2 [tr((Pj)_ii E_ki) - u_i^T E_ki u_i] (N, n_kernels) and g_i = Z_i^T u_i (N, p),
    which sum over donors to the score (`moments`) and to X^T Sigma^-1 (y - X beta) = 0. Without
    random covariates only: their kernels couple donors. For the sandwich covariance
    (robust.py); evaluated once per gene, on the general (Cholesky) path."""
    f = factor(phi, d._replace(diag_j=None), reml)
    N, b = d.y.shape
    FU = d.donor_columns
    q = f.S.shape[0]
    Nj = jnp.where(reml, f.mme_inv, jnp.zeros((q, q)))
    P = f.W - _projected_blocks(f.WX1, Nj, FU)
    E = d.all_kernels()
    E = jnp.broadcast_to(E, (E.shape[0], N, b, b))
    s = 0.5 * (jnp.einsum("nab,knba->nk", P, E) - jnp.einsum("na,knab,nb->nk", f.u, E, f.u))
    g = jnp.concatenate([jnp.einsum("nap,na->np", d.X, f.u), f.u.sum(1)[:, None] * FU], 1)
    if d.within is not None:  # static: each donor's cells, 1/2 (dof_ic / s2_c - ss_ic / s2_c^2)
        s2, dof, ss = _within(d, phi)
        n_e = d.E.shape[0]
        s = s.at[:, n_e : n_e + s2.shape[0]].add(0.5 * (dof / s2 - ss / s2**2))
    return s, g


def _projected_blocks(WX1, Nj, FU):
    """H_i = (W Z Nj Z^T W)_ii = (W X)_i A (W X)_i^T + v_i w_i^T + w_i v_i^T + h_i w_i w_i^T with
    A the (p_b, p_b) block of Nj, v_i = (W X)_i Nj_bd d_i and h_i = d_i^T Nj_dd d_i."""
    pb = WX1.shape[-1] - 1
    WX, w = WX1[..., :pb], WX1[..., pb]
    v = jnp.einsum("nap,np->na", WX, FU @ Nj[pb:, :pb])
    h = jnp.einsum("ni,ij,nj->n", FU, Nj[pb:, pb:], FU)
    wv = w[:, :, None] * v[:, None, :]
    H = linalg.small_matmul(linalg.small_matmul(WX, Nj[:pb, :pb]), jnp.swapaxes(WX, 1, 2))
    return H + wv + jnp.swapaxes(wv, 1, 2) + h[:, None, None] * w[:, :, None] * w[:, None, :]


def _add_random(d, f, F, ZtWKu, Nj, reml, score, info, Q):
    """Append the rows of the random-covariate kernels K_r = sum_{j in r} U_j U_j^T. With the
    projection written Pj = W - W Z Nj Z^T W (as in `moments`), Pj U = W Z c with
    c = I_u - Nj Z^T W U (q x m), so

        tr(Pj K_k Pj K_r) = sum_{j in r} c_j^T F_k c_j,   tr(Pj K_r Pj K_s) = |(U^T Pj U)_rs|_F^2,
        tr(Pj K_r) = sum_{j in r} (U^T Pj U)_jj,          u^T K_r u = |U_r^T u|^2,

    and for the Hessian (always Pi) u^T K_k Pi K_r u = (Z^T W K_k u)^T c_r U_r^T u and
    u^T K_r Pi K_s u = (U_r^T u)^T (U^T Pi U)_rs (U_s^T u)."""
    p = d.n_fixed
    groups = d.groups
    Uu = d.U.T @ f.u.sum(-1)  # U^T u, U's rows repeated over each block

    def projected(N):  # c (q x m) and U^T Pj U (m x m)
        SU = f.S[:, p:]
        return jnp.eye(f.S.shape[0])[:, p:] - N @ SU, SU[p:] - SU.T @ N @ SU

    c, PjU = projected(Nj)
    cP, PiU = projected(f.mme_inv)  # = (c, PjU) for REML
    score_r = 0.5 * groups @ (jnp.diagonal(PjU) - Uu**2)
    info_kr = 0.5 * ((F @ jnp.broadcast_to(c, F.shape[:1] + c.shape)) * c).sum(1) @ groups.T
    info_rr = 0.5 * groups @ PjU**2 @ groups.T
    Q_kr = (ZtWKu @ cP * Uu) @ groups.T
    Q_rr = groups @ (PiU * jnp.outer(Uu, Uu)) @ groups.T
    return (
        jnp.concatenate([score, score_r]),
        jnp.block([[info, info_kr], [info_kr.T, info_rr]]),
        jnp.block([[Q, Q_kr], [Q_kr.T, Q_rr]]),
    )
