"""Per-gene likelihood, score, Hessian and information against dense NumPy/SciPy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import CLOSED_FORM, METHODS, MODELS, SHAPES, gene_data, random_phi, small_data
from numpy.testing import assert_allclose

from ctmm_jax import likelihood, models, rankone


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_loglik_equals_dense(shape, model, method):
    data = small_data(shape, seed=1)
    C = data.shape[2]
    for g in range(data.shape[0]):
        phi = random_phi(model, C, seed=g)
        ours = -float(likelihood.nll(jnp.asarray(phi), gene_data(data, model, g), method == "reml"))
        hom2, V = reference.natural(model, phi, C)
        assert_allclose(ours, reference.loglik(data, g, hom2, V, method), **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_score_hessian_information(shape, model, method):
    data = small_data(shape, seed=2)
    C = data.shape[2]
    d, reml = gene_data(data, model, 0), method == "reml"
    phi = jnp.asarray(random_phi(model, C, seed=3))
    m = likelihood.moments(phi, d, reml)
    f = lambda p: float(likelihood.nll(jnp.asarray(p), d, reml))  # noqa: E731
    eps = np.sqrt(np.finfo(float).eps) * np.maximum(1.0, np.abs(np.asarray(phi)))
    fd = [
        (f(phi.at[k].add(eps[k])) - f(phi.at[k].add(-eps[k]))) / (2 * eps[k])
        for k in range(len(phi))
    ]
    assert_allclose(m.score, fd, rtol=1e-5, atol=1e-5)
    assert_allclose(m.score, jax.grad(likelihood.nll)(phi, d, reml), **CLOSED_FORM)
    assert_allclose(m.hess, jax.hessian(likelihood.nll)(phi, d, reml), **CLOSED_FORM)
    hom2, V = reference.natural(model, np.asarray(phi), C)
    dense_info = reference.expected_information(data, 0, hom2, V, model, method)
    assert_allclose(m.info, dense_info, **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
def test_gls_beta_equals_dense(shape):
    data = small_data(shape, seed=4)
    phi = random_phi("free", data.shape[2], seed=4)
    m = likelihood.moments(jnp.asarray(phi), gene_data(data, "free", 1), True)
    y, X, Sigma = reference.dense(data, 1, *reference.natural("free", phi, data.shape[2]))
    Si = np.linalg.inv(Sigma)
    cov = np.linalg.inv(X.T @ Si @ X)
    assert_allclose(m.beta, cov @ X.T @ Si @ y, **CLOSED_FORM)
    assert_allclose(m.beta_cov, cov, **CLOSED_FORM)


@pytest.mark.parametrize("shape", SHAPES)
def test_not_positive_definite_is_inf(shape):
    data = small_data(shape)
    d = gene_data(data, "free", 0)
    phi = jnp.array([0.1, -5.0, 0.1, 0.1])  # V_0 far below -ctnu: Sigma not PD
    assert likelihood.nll(phi, d, True) == jnp.inf
    assert likelihood.nll(phi, d, False) == jnp.inf


def test_vmap_equals_single_gene():
    data = small_data("ctp", G=4)
    phis = jnp.asarray(np.stack([random_phi("free", 3, seed=s) for s in range(4)]))
    from ctmm_jax import blocks

    b = blocks.to_blocks(data, "free")
    batched = jax.vmap(
        lambda p, y, nu: likelihood.nll(p, likelihood.GeneData(y, nu, b.X, b.E), True)
    )(phis, jnp.asarray(b.y), jnp.asarray(b.noise))
    single = [likelihood.nll(phis[g], gene_data(data, "free", g), True) for g in range(4)]
    assert_allclose(batched, single, rtol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_masked_values_give_the_likelihood_of_the_observed_subvector(shape, method):
    """A mask (a dropped donor, or single missing values) equals deleting those entries from
    the stacked y, X and Sigma; score, Hessian and information follow."""
    data = small_data(shape, G=1, N=12, C=3, seed=5)
    d = gene_data(data, "free", 0)
    rng = np.random.default_rng(5)
    mask = (rng.uniform(size=d.y.shape) > 0.2).astype(float)
    mask[3] = 0.0  # a whole donor
    dm = d._replace(mask=jnp.asarray(mask))
    phi = random_phi("free", 3, seed=6)
    y, X, Sigma = reference.dense(data, 0, *reference.natural("free", phi, 3))
    obs = mask.ravel() > 0
    y, X, Sigma = y[obs], X[obs], Sigma[np.ix_(obs, obs)]
    ref = (reference.ml_loglik if method == "ml" else reference.reml_loglik)(y, X, Sigma)
    reml = method == "reml"
    assert_allclose(-likelihood.nll(jnp.asarray(phi), dm, reml), ref, **CLOSED_FORM)
    m = likelihood.moments(jnp.asarray(phi), dm, reml)
    assert_allclose(m.score, jax.grad(likelihood.nll)(jnp.asarray(phi), dm, reml), **CLOSED_FORM)
    assert_allclose(m.hess, jax.hessian(likelihood.nll)(jnp.asarray(phi), dm, reml), **CLOSED_FORM)


@pytest.mark.parametrize("method", METHODS)
def test_shared_and_per_donor_kernel_paths_agree(method):
    """CTP kernels are shared by donors (sums over donors first); the same kernels broadcast
    to every donor go through the block-by-block path: both give the same moments."""
    data = small_data("ctp", G=1, N=10, C=3, seed=8)
    d = gene_data(data, "full", 0)
    d_per_donor = d._replace(E=jnp.broadcast_to(d.E, (d.E.shape[0], 10, 3, 3)))
    phi = jnp.asarray(random_phi("full", 3, seed=9))
    a = likelihood.moments(phi, d, method == "reml")
    b = likelihood.moments(phi, d_per_donor, method == "reml")
    for x, y in zip(a, b, strict=True):
        assert_allclose(x, y, **CLOSED_FORM)


def rank_one_problem(model, loaded, N=30, C=5):
    """One CTP gene with missing values, fixed covariates, a random covariate and, if loaded,
    per-donor loading kernels (GeneData.loadings), on the general path and on the closed
    forms (the model's constants as NumPy, as the fits pass them); phi with a V entry < 0."""
    rng = np.random.default_rng(5)
    mask = (rng.uniform(size=(N, C)) > 0.2).astype(float)
    mask[0], mask[3] = 0.0, 1.0
    arrays = (
        rng.normal(size=(N, C)) * mask, rng.uniform(0.1, 0.5, (N, C)),
        np.broadcast_to(np.eye(C), (N, C, C)), models.kernels(model, C)[:, None], mask,
        rng.normal(size=(N, 2)), np.eye(6)[rng.integers(0, 6, N)], np.ones((1, 6)), None,
        rng.uniform(0.05, 0.5, (N, C)) if loaded else None,
    )  # fmt: skip
    general = likelihood.GeneData(*(None if a is None else jnp.asarray(a) for a in arrays))
    closed = general._replace(diag_j=models.diag_j_coefficients(model, C))
    n_k = models.n_var(model, C) + (C if loaded else 0)
    phi = np.concatenate([rng.uniform(0.05, 0.3, n_k), [0.2]])
    if model != "hom":
        phi[1 if model == "iid" else 2] = -0.05
    return general, closed, phi


@pytest.mark.parametrize("model", ["hom", "iid", "free"])
@pytest.mark.parametrize("loaded", [True, False])
def test_rank_one_closed_forms_equal_cholesky(model, loaded):
    """CTP blocks diag(e_i) + hom2 J (rankone.py) against the general Cholesky path
    (`rank_one_problem`): moments at one phi, and the same positive-definite region (nll
    finite) at 400 phi with V of either sign. Without loadings, hom takes the 1_C entry alone
    (rankone.only_j)."""
    general, closed, phi = rank_one_problem(model, loaded)
    assert rankone.only_j(closed.diag_j, closed.loadings) == (model == "hom" and not loaded)
    for reml in (False, True):
        ms = likelihood.moments(jnp.asarray(phi), general, reml)
        for a, b in zip(ms, likelihood.moments(jnp.asarray(phi), closed, reml), strict=True):
            assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    if not loaded:  # the region is `factor`'s, which only_j leaves alone
        return
    rng = np.random.default_rng(6)
    phis = np.column_stack([rng.normal(0.0, 0.5, (400, len(phi) - 1)), np.full(400, 0.2)])
    nll = jax.jit(jax.vmap(likelihood.nll, in_axes=(0, None, None)), static_argnums=2)
    a, b = nll(jnp.asarray(phis), general, True), nll(jnp.asarray(phis), closed, True)
    assert 20 < int(jnp.isinf(a).sum()) < 380
    assert_allclose(b, a, rtol=1e-10)


@pytest.mark.parametrize("model", ["iid", "free"])
@pytest.mark.parametrize("loaded", [True, False])
@pytest.mark.parametrize("edge", [-1e-7, 1e-7])
def test_rank_one_closed_forms_near_a_zero_diagonal(model, loaded, edge):
    """One pair's e_ic = V_c + noise_ic (+ loading) set to +-1e-7 while Sigma_i stays well
    conditioned (h > 0; 1 + h s_i < 0 when e_ic < 0): delta_ic ~ 1e7, and W_cc written as
    delta - kappa delta^2 would cancel (rankone.py, Rounding). The closed forms still equal
    the Cholesky path, the information to 1e-9 (written that way its error here was 3 to 80
    times its largest entry; 4% at a fitted gene of benchmarks/bench_fit.py's 10,000)."""
    general, closed, phi = rank_one_problem(model, loaded)
    K, C = models.n_var(model, 5), 5
    e = (phi[:K] @ closed.diag_j)[:C] + (phi[K : K + C] * closed.loadings[3] if loaded else 0)
    noise = general.noise.at[3, 1].set(edge - e[1])
    general, closed = general._replace(noise=noise), closed._replace(noise=noise)
    assert abs(float(rankone.inverse(jnp.asarray(phi[:-1]), closed.diag_j, noise, closed.mask,
                                     closed.loadings).delta[3, 1]) * edge - 1) < 1e-8  # fmt: skip
    for reml in (False, True):
        ms = likelihood.moments(jnp.asarray(phi), general, reml)
        for a, b in zip(ms, likelihood.moments(jnp.asarray(phi), closed, reml), strict=True):
            assert_allclose(b, a, rtol=1e-9, atol=1e-9 * float(jnp.abs(a).max()))


@pytest.mark.parametrize("masked", [False, True])
def test_infeasible_bound_hides_no_feasible_step(masked):
    """likelihood.infeasible_from (OP, 1 x 1 blocks): every step a = 2^-j at or past the bound
    is outside the feasible region by its dense definition (an observed donor variance <= 0,
    or a max/min ratio of the observed donor variances > COND_MAX), so the optimizer's skip
    passes over trials it would reject; and in most directions the first step below the bound
    is feasible (the bound is tight, not merely safe)."""
    C = 3
    data = small_data("op", G=1, N=40, C=C, seed=3)
    d = gene_data(data, "free", 0)
    seen = np.ones(40, bool)
    if masked:
        seen[::4] = False
        d = d._replace(mask=jnp.asarray(seen[:, None], float))
    rng = np.random.default_rng(7)
    phi = random_phi("free", C, seed=1)
    steps = 2.0 ** -np.arange(41.0)
    bound = jax.jit(likelihood.infeasible_from)

    def feasible(p):
        s = np.diag(reference.dense(data, 0, *reference.natural("free", p, C))[2])[seen]
        return s.min() > 0 and s.max() <= likelihood.COND_MAX * s.min()

    walls, tight = 0, 0
    for _ in range(200):
        dw = rng.normal(size=C + 1) * 10.0 ** rng.uniform(-2, 2)
        wall = float(bound(d, jnp.asarray(phi), jnp.asarray(dw)))
        assert wall > 0
        past = steps >= wall
        assert not any(feasible(phi - a * dw) for a in steps[past])
        if past.any() and not past.all():
            walls += 1
            tight += feasible(phi - steps[~past][0] * dw)
    assert walls > 40 and tight >= 0.9 * walls, (walls, tight)
