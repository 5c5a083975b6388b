"""Haseman-Elston (method of moments) estimator, batched over genes in closed form.

With the OLS residual maker M = I - X A0 X^T, A0 = (X^T X)^-1, HE regresses
vec(M y y^T M - M D M) on vec(M K_k M) (design.md section 4):

    (Q^T Q)_kl = tr(M K_k M K_l)
               = sum_i tr(E_ki E_li) - 2 sum_i tr(H0_i E_ki E_li) + tr(A0 B_k A0 B_l)
    (Q^T t)_k  = r^T K_k r - sum_j D_jj (M K_k M)_jj,        r = M y
    (M K_k M)_ii = E_ki - H0_i E_ki - E_ki H0_i + X_i A0 B_k A0 X_i^T

with H0_i = X_i A0 X_i^T and B_k = sum_i X_i^T E_ki X_i. Everything is a sum over donor
blocks: no NC x NC matrix is formed. Q^T Q and diag(M K_k M) depend only on the design and
kernels (`Normal`), computed once and shared by every gene; a gene costs its OLS residuals and
quadratic forms, and all genes are solved at once.

A dropped donor (jackknife) is a mask over its block, which for HE is
the same as deleting it. X^T X and Q^T Q are Gram matrices, inverted and solved by Cholesky
(linalg.py: no LAPACK, whose batched kernels can hang a CPU; NaN, hence NOT_FINITE, where
one is singular).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .. import batching, checks, devices, linalg, progress
from ..blocks import Blocks, Design
from ..status import Status
from . import Estimates, Problems
from .mlreml import design_axes, gls, over_genes

NORMALS_BATCH = 16  # jackknife replicates whose normal equations are computed together
# the closed-form partition jackknife holds per-donor tensors of k x p values per gene
# (`_partition_bytes`); past this size a batch takes the replicate-by-replicate path
PARTITION_BYTES = 256 * 2**20


class Normal(NamedTuple):
    """Design-only pieces of HE: QtQ (k, k), diag_MKM (k, N, b) = the diagonals of the blocks
    of M K_k M, A0 (p, p); k counts the model's kernels, then the random covariates'."""

    QtQ: jax.Array
    diag_MKM: jax.Array
    A0: jax.Array


def normal(design: Design, mask: jax.Array | None = None) -> Normal:
    """Shared HE normal equations of a design (blocks.Design); mask: (N, b) or None.

    A random covariate r has K_r = U_r U_r^T (U_r its columns of U), so with MU = M U:
    tr(M K_k M K_r) = sum_{j in r} (MU_j)^T K_k (MU_j), tr(M K_r M K_s) = |U_r^T M U_s|_F^2 and
    (M K_r M)_ii = sum_{j in r} (MU_j)_i^2."""
    (X, U), E = design.full, design.E
    N, b, p = X.shape
    if mask is not None:
        X, E = X * mask[..., None], E * (mask[:, :, None] * mask[:, None, :])
        U = None if U is None else U * mask[..., None]
    E = jnp.broadcast_to(E, (E.shape[0], N, b, b))
    A0 = linalg.spd_inverse(jnp.einsum("nbp,nbq->pq", X, X))
    H0 = X @ A0 @ jnp.swapaxes(X, 1, 2)  # (N, b, b)
    B = jnp.einsum("nip,knij,njq->kpq", X, E, X)
    T1 = jnp.einsum("knij,lnji->kl", E, E)
    T2 = jnp.einsum("nij,knjl,mnli->km", H0, E, E)
    AB = A0 @ B
    T3 = jnp.einsum("kpq,lqp->kl", AB, AB)
    XABAX = jnp.einsum("nip,kpq,njq->knij", X, AB @ A0, X)
    diag_MKM = (
        jnp.diagonal(E, axis1=2, axis2=3)
        - 2.0 * jnp.diagonal(H0[None] @ E, axis1=2, axis2=3)
        + jnp.diagonal(XABAX, axis1=2, axis2=3)
    )
    QtQ = T1 - T2 - T2.T + T3
    if U is None:
        return Normal(QtQ, diag_MKM, A0)
    G = design.groups
    MU = U - X @ (A0 @ jnp.einsum("nbp,nbj->pj", X, U))  # (N, b, m)
    Q_kr = jnp.einsum("naj,knab,nbj->kj", MU, E, MU) @ G.T
    Q_rr = G @ jnp.einsum("nbj,nbl->jl", U, MU) ** 2 @ G.T
    diag_r = jnp.einsum("nbj,rj->rnb", MU**2, G)
    QtQ = jnp.block([[QtQ, Q_kr], [Q_kr.T, Q_rr]])
    return Normal(QtQ, jnp.concatenate([diag_MKM, diag_r]), A0)


class HEFit(NamedTuple):
    """HE estimates of a batch of genes."""

    phi: jax.Array  # (G, k) variance parameters
    beta: jax.Array  # (G, p) OLS fixed effects
    outcome: jax.Array  # (G,) checks.outcome: OK, TOO_FEW_DONORS or NO_VARIATION


def he_genes(y, noise, design: Design, nm: Normal, mask: jax.Array | None = None) -> HEFit:
    """HE for many genes sharing the design. y, noise: (G, N, b); mask (N, b) as given to
    `normal` or None (noise may be anything where missing, since diag_MKM is 0 there). The
    outcome is that of the checks every estimator makes (checks.outcome, from the same OLS
    residuals), with n_par = k variances + p fixed effects."""
    (X, U), E = design.full, design.E
    if mask is not None:
        y = y * mask
    beta = jnp.einsum("pq,nbq,gnb->gp", nm.A0, X, y)
    r = y - jnp.einsum("nbp,gp->gnb", X, beta)
    if mask is not None:
        r = r * mask
    if E.shape[1] == 1:  # kernels shared by donors (CTP): sum_i r_i^T E_k r_i = tr(E_k S)
        S = jnp.einsum("gni,gnj->gij", r, r)
        quad = jnp.einsum("kij,gji->gk", E[:, 0], S)
    else:
        quad = jnp.einsum("gni,knij,gnj->gk", r, E, r)
    if U is not None:  # r^T K_r r = |U_r^T r|^2
        quad_r = jnp.einsum("nbj,gnb->gj", U, r) ** 2 @ design.groups.T
        quad = jnp.concatenate([quad, quad_r], axis=1)
    Qt = quad - jnp.einsum("gnb,knb->gk", noise, nm.diag_MKM)
    outcome = checks.outcome(y, r, mask, nm.QtQ.shape[0] + X.shape[-1])  # (G,)
    return HEFit(linalg.spd_solve_columns(nm.QtQ, Qt.T).T, beta, outcome)


@jax.jit
def he_chunk(y, noise, design) -> HEFit:
    """HE for a batch of genes, all donors. y, noise: (G, N, b)."""
    return he_genes(y, noise, design, normal(design))


def _replicate_masks(keep, b: int):
    return jnp.repeat(keep[:, :, None], b, axis=2)  # (R, N, b)


@jax.jit
def jackknife_normals(design, keep) -> Normal:
    """The shared normal equations of the R replicates of keep (R, N) (1: donor kept;
    leave-one-out: 1 - I_N), NORMALS_BATCH at a time (each holds every donor's kernels)."""
    masks = _replicate_masks(keep, design.X.shape[1])
    return jax.lax.map(partial(normal, design), masks, batch_size=NORMALS_BATCH)


@jax.jit
def jackknife_gram(design, keep) -> jax.Array:
    """QtQ (R, k, k) of the replicates of keep alone (`jackknife_normals` without the
    diag_MKM that only the replicate-by-replicate path uses; XLA drops their computation)."""
    return jackknife_normals(design, keep).QtQ


@jax.jit
def he_jackknife_chunk(y, noise, design, keep, normals: Normal) -> HEFit:
    """Jackknife HE for a batch of genes: (G, R, k) and (G, R, p) for the R replicates of
    keep with their normal equations (`jackknife_normals`, computed once for all batches),
    solved replicate by replicate (lax.map keeps memory at one replicate's residuals)."""

    def replicate(args):
        m, nm = args
        return he_genes(y, noise, design, nm, m)

    masks = _replicate_masks(keep, y.shape[-1])
    fits = jax.lax.map(replicate, (masks, normals))  # leading replicate axis
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), fits)


def _group_sums(values, drop):
    """(G, N, ...) per-donor values -> (G, R, ...) their sums over the donors each replicate
    leaves out; drop (R, N) 0/1, or None for leave-one-out (the values themselves)."""
    if drop is None:
        return values
    return jnp.einsum("rn,gn...->gr...", drop, values)


@jax.jit
def he_jackknife_partition(y, noise, design, drop, QtQ) -> HEFit:
    """`he_jackknife_chunk` in closed form when the replicates partition the donors (each
    donor left out by exactly one replicate: drop (R, N) 0/1 for delete-m blocks, None for
    leave-one-out) and the kernels are shared by donors with no random covariates (CTP).

    With the full-data OLS residuals r and beta, replicate g's residuals on its kept donors
    are r_j + X_j d, d = beta - beta(-g) = -A(-g) u(-g), u = sum_kept X_j^T r_j, so with
    B_k(-g) = sum_kept X_j^T E_k X_j:
        quad_k(-g) = sum_kept r_j^T E_k r_j + 2 d^T sum_kept X_j^T E_k r_j + d^T B_k(-g) d,
        sum_kept noise_j . diag(M K_k M)_j = sum_kept noise_j . diag(E_k)
            - 2 tr(A Omega_k) + tr(A B_k A V),
    Omega_k = sum_kept X_j^T diag(noise_j) E_k X_j, V = sum_kept X_j^T diag(noise_j) X_j
    (`normal`'s diag_MKM, summed against the noise). Every kept sum is the sum over all donors
    minus the left-out group's: O(N b^2 p^2 + R k p^2) per gene instead of O(R N b^2)."""
    (X, _), E = design.full, design.E[:, 0]  # X (N, b, p), E (k, b, b)
    XtX = jnp.einsum("nbp,nbq->npq", X, X)
    A0 = linalg.spd_inverse(XtX.sum(0))
    beta = jnp.einsum("pq,nbq,gnb->gp", A0, X, y)
    r = y - jnp.einsum("nbp,gp->gnb", X, beta)
    EX = jnp.einsum("kab,nbp->knap", E, X)  # E_k X_j

    def kept(per_donor):  # (G, N, ...) -> (G, R, ...) sums over the kept donors
        return per_donor.sum(1, keepdims=True) - _group_sums(per_donor, drop)

    ones = jnp.ones((1, X.shape[0]))
    XtX_kept = kept(XtX[None])[0]  # (R, p, p)
    A = linalg.spd_inverse(XtX_kept)
    B = kept(jnp.einsum("nap,knaq->nkpq", X, EX)[None])[0]  # (R, k, p, p)
    n_kept = kept(ones)[0]  # (R,)
    u = kept(jnp.einsum("nbp,gnb->gnp", X, r))  # (G, R, p)
    d = -jnp.einsum("rpq,grq->grp", A, u)
    quad = (kept(jnp.einsum("gna,kab,gnb->gnk", r, E, r))
            + 2 * jnp.einsum("grp,grkp->grk", d, kept(jnp.einsum("knap,gna->gnkp", EX, r)))
            + jnp.einsum("grp,rkpq,grq->grk", d, B, d))  # fmt: skip
    n1 = kept(jnp.einsum("gnb,kb->gnk", noise, jnp.diagonal(E, axis1=1, axis2=2)))
    # tr(A Omega_k(-g)) and tr(A B_k A V(-g)): the all-donor sums (G, k, p, p) against each
    # replicate's A, minus the left-out donors' terms sum_a noise_ja (E_k X_j A X_j^T)_aa and
    # sum_a noise_ja (X_j A B_k A X_j^T)_aa with the A of the replicate that leaves j out
    # (design-only (N, k, b) factors): no (G, N, k, p, p) tensor
    owner = jnp.arange(X.shape[0]) if drop is None else jnp.argmax(drop, axis=0)  # (N,)
    ABA = jnp.einsum("rpq,rkqs,rst->rkpt", A, B, A)
    XA = jnp.einsum("nap,npq->naq", X, A[owner])  # X_j A of j's replicate
    own_omega = jnp.einsum("knap,nap->nka", EX, XA)
    own_v = jnp.einsum("nap,nkpq,naq->nka", X, ABA[owner], X)
    left_out = _group_sums(jnp.einsum("gna,nka->gnk", noise, 2 * own_omega - own_v), drop)
    omega = jnp.einsum("nap,gna,knaq->gkpq", X, noise, EX)
    v = jnp.einsum("nap,gna,naq->gpq", X, noise, X)
    expected = (n1 - 2 * jnp.einsum("rpq,gkqp->grk", A, omega)
                + jnp.einsum("rkpq,gqp->grk", ABA, v) + left_out)  # fmt: skip
    phi = linalg.spd_solve_columns(QtQ, jnp.transpose(quad - expected, (1, 2, 0)))  # (R, k, G)
    phi = jnp.transpose(phi, (2, 0, 1))  # one factorisation per replicate, not per gene
    ssr = kept(jnp.sum(r**2, axis=2)) + 2 * jnp.einsum("grp,grp->gr", d, u)
    ssr = ssr + jnp.einsum("grp,rpq,grq->gr", d, XtX_kept, d)
    flat = ssr <= checks.VARIATION_RTOL * kept(jnp.sum(y**2, axis=2))
    code = jnp.where(flat, int(Status.NO_VARIATION), int(Status.OK))
    n_par = QtQ.shape[-1] + X.shape[-1]
    outcome = jnp.where(n_kept <= n_par, int(Status.TOO_FEW_DONORS), code)
    return HEFit(phi, beta[:, None] - d, jnp.broadcast_to(outcome, phi.shape[:2]))


def _he_per_gene(y, noise, mask, design) -> HEFit:
    """HE where the observed values (mask (G, N, b)) or the design differ by gene: each gene
    gets its own normal equations (vmapped over genes)."""

    def one(y, noise, mask, design):
        nm = normal(design, mask)
        return jax.tree.map(lambda a: a[0], he_genes(y[None], noise[None], design, nm, mask))

    return over_genes(one, 3, design)(y, noise, mask, design)


he_chunk_per_gene = jax.jit(_he_per_gene)


@jax.jit
def he_jackknife_chunk_per_gene(y, noise, mask, design, keep) -> HEFit:
    """`he_jackknife_chunk` with per-gene masks or designs: replicate r multiplies every gene's
    mask by keep[r] (lax.map over replicates, vmap over genes)."""
    reps = _replicate_masks(keep, y.shape[-1])
    fits = jax.lax.map(lambda rep: _he_per_gene(y, noise, mask * rep, design), reps)
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), fits)


def run_he(blocks: Blocks, genes: np.ndarray, *, chunk_size: int, mesh=None) -> HEFit:
    """HE for genes of `blocks`: phi (P, k), beta (P, p), outcome (P,)."""
    return _run(he_chunk, he_chunk_per_gene, (), (), blocks, genes, chunk_size, mesh)


def run_he_jackknife(
    blocks: Blocks, genes: np.ndarray, keep: np.ndarray, *, chunk_size: int, mesh=None
) -> HEFit:
    """Jackknife HE for genes of `blocks`: phi (P, R, k), beta (P, R, p), outcome (P, R) for
    the replicates of keep (R, N) (Problems.kept)."""
    keep = jnp.asarray(keep)
    per_gene = he_jackknife_chunk_per_gene
    if blocks.mask is not None or blocks.per_gene:  # `_run` takes the per-gene path
        return _run(None, per_gene, (), (keep,), blocks, genes, chunk_size, mesh)
    design, keep_host = blocks.design(), np.asarray(keep)
    if (
        _partition(keep_host)
        and design.E.shape[1] == 1
        and design.U is None
        and _partition_bytes(design, min(chunk_size, len(genes))) <= PARTITION_BYTES
    ):
        loo = np.array_equal(keep_host, 1.0 - np.eye(len(keep_host)))
        extra = (None if loo else 1.0 - keep, jackknife_gram(design, keep))
        return _run(he_jackknife_partition, per_gene, extra, (keep,), blocks, genes,
                    chunk_size, mesh)  # fmt: skip
    normals = jackknife_normals(design, keep)
    return _run(he_jackknife_chunk, per_gene, (keep, normals), (keep,), blocks, genes,
                chunk_size, mesh)  # fmt: skip


def _partition_bytes(design: Design, batch: int) -> int:
    """Bytes of the largest per-donor tensor of `he_jackknife_partition` (sum_a E_k X_j r_j:
    batch x N x k x p doubles)."""
    (X, _), E = design.full, design.E
    N, _, p = X.shape
    return 8 * batch * N * E.shape[0] * p


def _partition(keep: np.ndarray) -> bool:
    """Whether the replicates keep (R, N) partition the donors: each left out by exactly one
    (leave-one-out, delete-m blocks)."""
    return bool(np.all((keep == 0) | (keep == 1)) and np.all((keep == 0).sum(0) == 1))


def _run(shared_fn, per_gene_fn, shared_extra: tuple, per_gene_extra: tuple, blocks: Blocks,
         genes: np.ndarray, chunk_size: int, mesh) -> HEFit:  # fmt: skip
    """Batches of genes, sharded over the devices of mesh (devices.py); the shared-normal path
    (shared_fn(y, noise, design, *shared_extra)) unless genes differ in mask or design
    (per_gene_fn(y, noise, mask, design, *per_gene_extra))."""
    per_gene = blocks.mask is not None or blocks.per_gene
    k = devices.count(mesh)

    def batch(g):
        y, noise = jax.device_put(blocks.y[g]), jax.device_put(blocks.noise[g])
        design = blocks.design(g)
        if not per_gene:
            args = (y, noise, design, *shared_extra)
            return devices.call(shared_fn, mesh, args, (0, 0) + (None,) * (len(args) - 2))
        mask = np.ones(blocks.y[g].shape) if blocks.mask is None else blocks.mask[g]
        args = (y, noise, jax.device_put(mask), design, *per_gene_extra)
        axes = (0, 0, 0, design_axes(design)) + (None,) * len(per_gene_extra)
        return devices.call(per_gene_fn, mesh, args, axes)

    width = batching.bucket(-(-len(genes) // k), chunk_size)  # per device
    return batching.map_batches(batch, genes, width * k)


@dataclass(frozen=True)
class MethodOfMoments:
    """HE for linear models (models.ModelSpec.linear): variances in closed form, beta by OLS
    (beta="ols") or GLS at the HE variances (beta="gls", as the original CTMM). A problem with
    donors left out takes the jackknife path: all replicates of a gene at once, sharing the
    normal equations across genes."""

    model: str
    C: int
    beta: str = "ols"
    chunk_size: int = 256
    mesh: Mesh | None = None  # devices sharing each batch (devices.py); None: one device

    def fit(self, blocks: Blocks, problems: Problems) -> Estimates:
        if problems.drop is None:
            he_fit = run_he(blocks, problems.gene, chunk_size=self.chunk_size, mesh=self.mesh)
            phi, beta, checked = he_fit.phi, he_fit.beta, he_fit.outcome
        else:
            genes, which = np.unique(problems.gene, return_inverse=True)
            N = blocks.y.shape[1]
            n_groups = N if problems.groups is None else int(problems.groups.max()) + 1
            keep = problems._replace(drop=np.arange(n_groups)).kept(np.arange(n_groups), N)
            reps = run_he_jackknife(blocks, genes, keep, chunk_size=self.chunk_size, mesh=self.mesh)
            if len(which) == reps.phi.shape[0] * n_groups and np.array_equal(
                which * n_groups + problems.drop, np.arange(len(which))
            ):  # every replicate of every gene, in order (the usual case): no gather
                phi, beta, checked = (a.reshape((len(which),) + a.shape[2:]) for a in reps)
            else:
                phi, beta = reps.phi[which, problems.drop], reps.beta[which, problems.drop]
                checked = reps.outcome[which, problems.drop]
        cond = None
        if self.beta == "gls":
            beta, _, cond = gls(
                blocks, problems, phi, model=self.model, C=self.C, chunk_size=self.chunk_size
            )
        finite = np.all(np.isfinite(phi), axis=1) & np.all(np.isfinite(beta), axis=1)
        P = len(problems.gene)
        progress.report(P, P)
        outcome = np.where(checked != Status.OK, checked,
                           np.where(finite, Status.OK, Status.NOT_FINITE))  # fmt: skip
        return Estimates(phi, None, beta, None, None, np.zeros(P, int), outcome, cond)
