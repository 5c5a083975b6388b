"""Benchmark: optax L-BFGS as a fallback for genes that Fisher scoring leaves unconverged.

Question: optax is a declared dependency that nothing imports. Does it have a job as a
first-order fallback (optax.lbfgs, zoom line search) for the genes whose Fisher-scoring (FS)
fit ends with a status other than ok (max_iter, no_descent, boundary, singular_info)?

Scenarios, free model, REML, simulated with hom2 = 0.2, ctnu ~ 0.2 Gamma(4)/4 and V =
diag(0, 0, 0.1, 0.2) (C = 4: half the cell types with V_c = 0): `ctp` (CTP, unconstrained
parameters), `op` (OPData.from_ctp of the same data: weakly identified, many fits end on the
positive-definite wall), `ctp_nonneg` (CTP, nonneg=True: softplus coordinates, where a true
variance of 0 is at theta = -inf) and `op_nonneg` (OP, nonneg=True). For each scenario:

1. cj.fit gives every gene's status (first call: compile + run); the optimizer alone
   (MaximumLikelihood.optimize, warm) gives FS's endpoint theta and its run time. Checked
   before timing: that endpoint is the fit's (phi, NLL = -loglik), the objective L-BFGS
   minimises has that NLL there, and the gradient L-BFGS sees (the analytic score, through a
   custom JVP: 4x cheaper than autodiff of the NLL on CTP) equals finite differences of it.
2. L-BFGS (optax.lbfgs: zoom line search, memory 10) on the package's objective in the
   optimizer's coordinates (estimators.mlreml.objective), jit(vmap) over all genes, from FS's
   endpoint ("fs_end") and from the package's start values ("start"); at most --steps steps,
   stopping after 3 steps in a row that lower the NLL by < 1e-13 relative (stuck or done).
   Compile (lower().compile()) and run are timed separately.
3. Every endpoint is judged with the package's own measure, the score test statistic dec =
   g^T I^-1 g in the optimizer's coordinates (objective.evaluate; converged: dec < 1e-10).

Tables (shares in %). Fisher scoring: per FS status, n genes, median FS iterations, and the
share of FS endpoints that are converged (conv: dec < 1e-10), at a Karush-Kuhn-Tucker point
(kkt; nonneg only, else = conv: every variance < 1e-6 has a score d nll / d phi >= 0 and the
score test of the others, phi coordinates, is < 1e-10), or against the wall (wall: the
steepest-descent direction leaves the feasible region, NLL +inf: not positive definite or cond
> COND_MAX = 1e8, within a step of 1e-3; not nonneg). L-BFGS: per FS status and start,
NLL(L-BFGS) - NLL(FS) (dnll_med median, dnll_min most negative; < 0: L-BFGS went lower), the
share lower / higher by > max(1e-6, 1e-12 cond) relative (the NLL's rounding error grows with
cond: ~3e-5 relative at cond = 1e8), conv / kkt / wall at the L-BFGS endpoint, dec_med (inf:
singular information), steps: median L-BFGS steps until within 1e-8 (relative) of FS's NLL (ok
genes), evals: median value + gradient evaluations (each line-search trial once; under vmap
optax's lax.cond in the line search runs both branches, so twice that are paid). Times: cj.fit
end to end (compile + run), the FS optimizer alone (warm), L-BFGS compile and runs; us_*: per
gene.

    python benchmarks/bench_optax.py --json benchmarks/results/optax.json     # 2.5-3 min
    python benchmarks/bench_optax.py --genes 192 --seed 1 --scenarios op op_nonneg ctp_nonneg

Typical printout (2-core CPU shared with other jobs, float64, jax 0.10.2, optax 0.2.8, default
options: 64 genes x 100 donors x 4 cell types, seed 0, at most 100 steps; 3 min 7 s; package
at commit f324292 with uncommitted edits by others; a gene or two changed status between
package versions, these endpoints being ill-conditioned):

Fisher scoring endpoints (shares in %):
  scenario     FS status    n  iter  conv  kkt  wall
       ctp            ok   63     5   100  100     0
       ctp      boundary    1     9     0    0   100
        op            ok   41     6   100  100     0
        op      boundary   23    10     0    0    96
ctp_nonneg            ok   15     8   100  100     0
ctp_nonneg      max_iter   22   200     0  100     0
ctp_nonneg    no_descent    9    51     0  100     0
ctp_nonneg singular_info   18     5     0    0     0
 op_nonneg            ok    2    10   100  100     0
 op_nonneg      max_iter    3   200     0  100     0
 op_nonneg    no_descent   48    18     0   10     0
 op_nonneg singular_info   11     4     0    0     0

L-BFGS from FS's endpoint (fs_end) or the start values (start), vs FS:
  scenario     FS status   from dnll_med dnll_min lower higher conv  kkt wall dec_med steps evals
       ctp            ok fs_end -5.7e-14 -5.6e-11     0      0  100  100    0 1.2e-18     0    13
       ctp            ok  start -5.7e-14 -5.6e-11     0      0  100  100    0   7e-20     9    22
       ctp      boundary fs_end        0        0     0      0    0    0  100    0.46     -    61
       ctp      boundary  start     0.17     0.17     0    100    0    0  100     0.8     -   172
        op            ok fs_end -2.8e-14   -4e-11     0      0  100  100    0 3.2e-15     0    30
        op            ok  start        0 -4.1e-11     0      5   95   95    2 6.6e-17    33    49
        op      boundary fs_end        0  -0.0012     4      0    0    0  100    0.43     -    61
        op      boundary  start     0.27    -0.64     4     96    0    0   61     inf     -   108
ctp_nonneg            ok fs_end        0 -1.6e-11     0      0  100  100    0 7.4e-16     0     6
ctp_nonneg            ok  start        0   -2e-11     0      0  100  100    0 1.9e-18    14    23
ctp_nonneg      max_iter fs_end        0 -5.7e-14     0      0    0  100    0    0.29     -    26
ctp_nonneg      max_iter  start  1.1e-11  3.7e-12     0      0    0  100    0    0.29     -    60
ctp_nonneg    no_descent fs_end  5.7e-14        0     0      0    0  100    0   0.023     -    25
ctp_nonneg    no_descent  start  9.4e-12  5.9e-12     0      0    0  100    0   0.023     -    66
ctp_nonneg singular_info fs_end   -0.029   -0.083   100      0    0  100    0     inf     -    18
ctp_nonneg singular_info  start   -0.029   -0.083   100      0    0  100    0     2.1     -    70
 op_nonneg            ok fs_end -1.2e-12 -2.4e-12     0      0  100  100    0 1.1e-11     0     8
 op_nonneg            ok  start -1.3e-11 -2.5e-11     0      0  100  100    0 3.1e-16    42    67
 op_nonneg      max_iter fs_end        0 -1.4e-14     0      0    0  100    0   0.048     -     5
 op_nonneg      max_iter  start  2.4e-12  1.6e-12     0      0    0  100    0   0.048     -   101
 op_nonneg    no_descent fs_end    -0.94       -3    90      0    0   92    0    0.51     -    75
 op_nonneg    no_descent  start    -0.94       -3    90      0    0   96    0    0.57     -    88
 op_nonneg singular_info fs_end     -1.2     -2.5   100      0    0   73    0     inf     -    83
 op_nonneg singular_info  start     -1.2     -2.5   100      0    0  100    0    0.68     -    86

Times in s (us_*: per gene; FS opt = the optimizer alone, warm):
  scenario genes FS fit FS opt  us_FS LB compile LB fs_end LB start us_fs_end us_start
       ctp    64   17.9  0.128   1996       11.3      1.51     4.59     23535    71682
        op    64   12.4  0.099   1544        9.3      1.83     1.38     28616    21530
ctp_nonneg    64     22   3.95  61771       13.3      15.3     6.93    238872   108291
 op_nonneg    64   15.4  0.596   9318       9.83      1.67     1.91     26138    29867

Reading (this run; the seed-1 run with 192 genes reads the same, except that L-BFGS also
found a lower NLL than FS for 1% of OP ok genes, up to 0.4, and 4% of OP boundary genes, up
to 0.35 from FS's endpoint, none converged):
- boundary (unconstrained fits on the PD wall; 23 of 64 OP genes): no rescue. From FS's
  endpoint L-BFGS moves the NLL by ~1e-3 at most and never converges; downhill leaves the
  feasible region (wall 100%). Along the line from the start values to FS's endpoint the NLL
  falls monotonically up to the wall (smallest donor variance ~1e-7, V entries down to -2.5,
  infeasible 0.1% further): no interior optimum exists, the likelihood grows as one donor's
  covariance becomes singular. From the start values L-BFGS ends higher than FS in 96%.
- nonneg singular_info (CTP and OP) and OP nonneg no_descent: a Fisher step sends a variance's
  theta to -30 or below (CTP: down to -1e33; softplus ~ 0, dw/dtheta ~ 0, the information
  numerically singular) and FS stops with the other parameters unconverged. L-BFGS from FS's
  endpoint lowers the NLL in 90-100% of these genes (median 0.03 CTP, ~1 OP, up to 3) and ends
  at a KKT point in 71-100%: a real rescue, and these are over 90% of an OP nonneg fit's genes.
- CTP nonneg max_iter / no_descent, OP nonneg max_iter: FS already sits at the constrained
  optimum (kkt 100%; L-BFGS from the start values finds the same NLL to 1e-11). dec cannot
  fall below 1e-10 at a variance of 0: it is invariant to the softplus map, and the score of a
  variance at 0 is not 0. Neither optimizer can make these "ok"; a KKT test would.
- ok genes: L-BFGS from the start values reaches FS's optimum (CTP 100%, OP 95%: 5% end
  higher, some on the wall) in 9-42 steps (22-67 evaluations) vs 5-10 FS iterations. Over a
  whole unconstrained scenario (ctp, op) it costs 14-36x the FS optimizer's time per gene
  under vmap (a batch runs until its slowest gene; the line search pays two evaluations).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import optax  # noqa: E402
from common import write_json  # noqa: E402
from jax import lax  # noqa: E402

import ctmm_jax as cj  # noqa: E402
from ctmm_jax import batching, likelihood, models  # noqa: E402
from ctmm_jax import blocks as cj_blocks  # noqa: E402
from ctmm_jax.estimators import Problems  # noqa: E402
from ctmm_jax.estimators.mlreml import MaximumLikelihood, objective  # noqa: E402

STALL_STEPS = 3
ACTIVE = 1e-6  # nonneg: a variance below this counts as at its bound 0 (simulated scale ~0.2)
DNLL_RTOL = 1e-6  # an NLL counts as lower/higher beyond max(DNLL_RTOL, 1e-12 cond) relative:
# its rounding error grows with cond, to ~3e-13 cond relative near the wall (check_correctness)
TOL = 1e-10  # the package's default: converged when g^T I^-1 g < tol
SCENARIOS = {  # name -> (shape, nonneg)
    "ctp": ("ctp", False),
    "op": ("op", False),
    "ctp_nonneg": ("ctp", True),
    "op_nonneg": ("op", True),
}


def stack_genes(blocks, genes) -> likelihood.GeneData:
    """GeneData of `genes` with a leading gene axis on every array (blocks.gene, stacked)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *[blocks.gene(int(g)) for g in genes])


def diagnostics(theta, d, *, model, C, reml, nonneg):
    """(nll, |g|, dec, dec_kkt, wall, cond) at theta in the optimizer's coordinates.

    dec = g^T I^-1 g, the package's convergence measure (NaN when I is not positive definite).
    dec_kkt, for nonneg: a variance at the bound (phi_k < ACTIVE) is at a constrained optimum
    when its score d nll / d phi_k >= 0 (moving it up raises the NLL); dec_kkt is the score
    test of the other parameters (phi coordinates, information restricted to them), +inf when
    some variance at the bound has a negative score; without nonneg, dec_kkt = dec.
    wall: the steepest-descent direction leaves the feasible region (NLL +inf: a covariance
    not positive definite or cond > COND_MAX) within a step of length 1e-3 (theta = phi, the
    variances' scale is ~0.1-1): the point is against the positive-definite wall, downhill is
    outside. False under nonneg (softplus keeps every covariance positive definite; theta can
    be -1e13 there, no step length fits every coordinate)."""
    obj = objective(d, model=model, C=C, reml=reml, nonneg=nonneg)
    nll, cond = obj.value(theta)
    g, info = obj.evaluate(theta)[:2]
    dec = _score_test(g, info)
    if not nonneg:
        wall = ~jnp.isfinite(obj.value(theta - 1e-3 * g / jnp.linalg.norm(g))[0])
        return nll, jnp.linalg.norm(g), dec, dec, wall, cond
    phi = models.to_natural(theta, model, C, nonneg)
    m = likelihood.moments(models.kernel_weights(phi, model, C), d, reml)
    pos = models.get(model).positive
    active = (phi < ACTIVE) & (pos(C) if pos is not None else True)
    free = ~active
    info_f = jnp.where(free[:, None] & free[None, :], m.info, jnp.eye(len(phi)))
    dec_f = _score_test(jnp.where(free, m.score, 0.0), info_f)
    dec_kkt = jnp.where(jnp.all(jnp.where(active, m.score, 0.0) >= 0), dec_f, jnp.inf)
    return nll, jnp.linalg.norm(g), dec, dec_kkt, jnp.array(False), cond


def _score_test(g, info):
    L = jnp.linalg.cholesky(info)
    z = jax.scipy.linalg.solve_triangular(L, g, lower=True)
    return z @ z


def value_fn(keys):
    """f(theta, d) = the NLL of the package's objective, with the analytic score as its
    gradient (custom JVP): L-BFGS sees exactly Fisher scoring's NLL and score. Autodiff through
    likelihood.factor gives the same gradient but is about 4x slower than the analytic score on
    CTP, 2-core CPU (64 genes: 45 vs 10 ms per evaluation, outside loops)."""

    @jax.custom_jvp
    def f(theta, d):
        return objective(d, **keys).value(theta)[0]

    @f.defjvp
    def f_jvp(primals, tangents):
        theta, d = primals
        obj = objective(d, **keys)
        return obj.value(theta)[0], obj.evaluate(theta).score @ tangents[0]

    return f


def lbfgs_gene(theta0, d, *, model, C, reml, nonneg, steps):
    """At most `steps` L-BFGS steps (optax.lbfgs: zoom line search, memory 10) on one gene's
    NLL; stops early after STALL_STEPS steps in a row that each lower the NLL by less than
    1e-13 max(1, |NLL|) (the line search found no decrease: the gene is stuck or done).
    Returns the final theta, the NLL before each step (steps,; NaN after the stop), the number
    of steps and of function + gradient evaluations (the first, then the line search's: each
    step reuses the line search's last value and gradient, value_and_grad_from_state)."""
    f = value_fn(dict(model=model, C=C, reml=reml, nonneg=nonneg))
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(c):
        th, state, k, n_eval, n_stall, trace = c
        v, g = value_and_grad(th, d, state=state)
        updates, state = opt.update(g, state, th, value=v, grad=g, value_fn=f, d=d)
        n_ls = optax.tree.get(state, "num_linesearch_steps")
        new_v = optax.tree.get(state, "value")
        stalled = ~(new_v < v - 1e-13 * jnp.maximum(1.0, jnp.abs(v)))
        th = optax.apply_updates(th, updates)
        n_stall = jnp.where(stalled, n_stall + 1, 0)
        return th, state, k + 1, n_eval + n_ls, n_stall, trace.at[k].set(v)

    def go(c):
        return (c[2] < steps) & (c[4] < STALL_STEPS)

    trace = jnp.full(steps, jnp.nan)
    zero = jnp.zeros((), int)
    init = (theta0, opt.init(theta0), zero, jnp.ones((), int), zero, trace)
    theta, _, k, n_eval, _, trace = lax.while_loop(go, step, init)
    return theta, trace, k, n_eval


def make_lbfgs(theta0, d, *, model, C, reml, nonneg, steps):
    """jit(vmap(L-BFGS + endpoint diagnostics)) compiled for these shapes (compile timed)."""
    keys = dict(model=model, C=C, reml=reml, nonneg=nonneg)

    def one(t0, dg):
        theta, trace, k, n_eval = lbfgs_gene(t0, dg, **keys, steps=steps)
        return theta, trace, k, n_eval, diagnostics(theta, dg, **keys)

    return jax.jit(jax.vmap(one)).lower(theta0, d).compile()


def check_correctness(res, state, theta_start, d, *, model, C, reml, nonneg):
    """Before timing: the Fisher-scoring endpoint (optimizer state) is the fit's (same
    parameters, NLL = -loglik of the table), the NLL L-BFGS minimises is the package's at that
    endpoint, and the gradient L-BFGS sees (analytic score, `value_fn`) equals central finite
    differences of the NLL at the start values."""
    keys = dict(model=model, C=C, reml=reml, nonneg=nonneg)
    theta = jnp.asarray(state.theta)
    phi = np.asarray(jax.vmap(lambda t: models.to_natural(t, model, C, nonneg))(theta))
    assert np.allclose(phi, res.phi, rtol=1e-12, atol=0), "optimizer state != fit"
    ll = np.asarray(res.loglik)
    assert np.array_equal(-state.nll[np.isfinite(ll)], ll[np.isfinite(ll)]), "nll != -loglik"
    value = jax.jit(jax.vmap(lambda t, dg: objective(dg, **keys).value(t)))
    nll, cond = (np.asarray(a) for a in value(theta, d))
    nll = -nll
    ok = np.asarray(res.table.status) == "ok"
    assert np.allclose(nll[ok], ll[ok], rtol=1e-10, atol=0), "NLL != -loglik (ok genes)"
    # near the wall the NLL is ill-conditioned: recomputed in another compiled batch (other
    # rounding) it differs by up to ~3e-13 cond relative (3e-5 for OP ML at cond = COND_MAX =
    # 1e8), and an endpoint at cond = COND_MAX (1 - 1e-5) can come out past it (+inf)
    fin = np.isfinite(ll) & np.isfinite(nll)
    rtol = np.maximum(1e-10, 1e-12 * cond[fin])
    assert np.all(np.abs(nll[fin] - ll[fin]) <= rtol * np.abs(ll[fin])), "NLL != -loglik"
    grad = np.asarray(jax.jit(jax.vmap(jax.grad(value_fn(keys))))(theta_start, d))
    fd = np.zeros_like(grad)  # central differences of the NLL (same compiled `value`)
    for k in range(grad.shape[1]):
        h = 1e-5 * np.maximum(1.0, np.abs(np.asarray(theta_start[:, k])))
        e = np.zeros(grad.shape[1])
        e[k] = 1.0
        up, down = (
            np.asarray(value(theta_start + sign * h[:, None] * e, d)[0]) for sign in (1, -1)
        )
        fd[:, k] = (up - down) / (2 * h)
    scale = np.abs(grad).max(axis=1, keepdims=True)
    err = np.abs(grad - fd) <= 1e-5 * np.abs(fd) + 1e-7 * scale
    assert err.all(), "score != finite differences of the NLL"


def run_scenario(name, ctp, *, model, reml, steps):
    """Fisher scoring (cj.fit, then the optimizer alone, warm) and L-BFGS from its endpoints
    and from the start values on every gene of one scenario: (rows by FS status, timing)."""
    shape, nonneg = SCENARIOS[name]
    data = ctp if shape == "ctp" else cj.OPData.from_ctp(ctp)
    G, N, C = data.shape
    keys = dict(model=model, C=C, reml=reml, nonneg=nonneg)
    t0 = time.perf_counter()
    res = cj.fit(data, model, "reml" if reml else "ml", noise="plugin", nonneg=nonneg)
    fs_first = time.perf_counter() - t0
    status = np.asarray(res.table.status, dtype=str)
    blocks = cj_blocks.to_blocks(data, model)
    # the optimizer's own endpoint theta: phi -> theta loses a variance that underflowed to 0
    # under softplus (theta = -800 gives phi = 0 and back -inf)
    est = MaximumLikelihood(model, C, reml=reml, nonneg=nonneg)
    t0 = time.perf_counter()
    size = batching.bucket(G, est.chunk_size)
    state = est.optimize(blocks, Problems(np.arange(G)), size)  # compiled by cj.fit: warm
    fs_run = time.perf_counter() - t0
    theta_fs = jnp.asarray(state.theta)

    d = stack_genes(blocks, range(G))
    phi_start = jax.vmap(lambda dg: cj_blocks.start_values(dg, model, C))(d)
    theta_start = models.from_natural_batch(phi_start, model, C, nonneg)
    check_correctness(res, state, theta_start, d, **keys)
    fs_diag = [np.asarray(a) for a in jax.jit(jax.vmap(partial(diagnostics, **keys)))(theta_fs, d)]

    t0 = time.perf_counter()
    run = make_lbfgs(theta_fs, d, **keys, steps=steps)
    compile_s = time.perf_counter() - t0
    out, run_s = {}, {}
    for start, th0 in (("fs_end", theta_fs), ("start", theta_start)):
        t0 = time.perf_counter()
        _, trace, k, n_eval, diag = jax.block_until_ready(run(th0, d))
        run_s[start] = time.perf_counter() - t0
        out[start] = dict(
            trace=np.asarray(trace),
            n_steps=np.asarray(k),
            n_eval=np.asarray(n_eval),
            diag=[np.asarray(a) for a in diag],
        )

    timing = dict(scenario=name, genes=G, donors=N, celltypes=C, max_steps=steps,
                  statuses={str(s): int((status == s).sum()) for s in np.unique(status)},
                  fs_end_to_end_s=round(fs_first, 3), fs_optimize_s=round(fs_run, 3),
                  fs_us_per_gene=round(1e6 * fs_run / G),
                  lbfgs_compile_s=round(compile_s, 3),
                  lbfgs_run_s={k: round(v, 3) for k, v in run_s.items()},
                  lbfgs_us_per_gene={k: round(1e6 * v / G) for k, v in run_s.items()})  # fmt: skip
    fs_nll, _, fs_dec, fs_kkt, fs_wall, fs_cond = fs_diag
    rows = []
    for st in sorted(np.unique(status), key=lambda s: (s != "ok", s)):
        idx = np.flatnonzero(status == st)
        for start in ("fs_end", "start"):
            o = out[start]
            nll, gnorm, dec, kkt, wall, cond = (a[idx] for a in o["diag"])
            f0 = fs_nll[idx]
            dnll = nll - f0
            thr = np.maximum(DNLL_RTOL, 1e-12 * fs_cond[idx]) * np.maximum(1.0, np.abs(f0))
            steps_to = None
            if st == "ok":  # L-BFGS steps until within 1e-8 (relative) of Fisher scoring's NLL
                close = o["trace"][idx] <= (f0 + 1e-8 * np.maximum(1, np.abs(f0)))[:, None]
                if close.any():
                    steps_to = int(np.median(close.argmax(1)[close.any(1)]))
            rows.append(dict(
                scenario=name, fs_status=st, n=len(idx),
                fs_iter=float(np.median(state.n_iter[idx])),
                fs_conv=float(_below(fs_dec[idx]).mean()),
                fs_kkt=float(_below(fs_kkt[idx]).mean()),
                fs_wall=float(fs_wall[idx].mean()), start=start,
                dnll_med=float(np.median(dnll)), dnll_min=float(np.min(dnll)),
                better=float((dnll < -thr).mean()), worse=float((dnll > thr).mean()),
                conv=float(_below(dec).mean()), kkt=float(_below(kkt).mean()),
                wall=float(wall.mean()),
                dec_med=float(np.median(np.where(np.isnan(dec), np.inf, dec))),
                gnorm_med=float(np.median(gnorm)),
                lg_cond=float(np.median(np.log10(cond))), steps=steps_to,
                lb_steps=float(np.median(o["n_steps"][idx])),
                evals=float(np.median(o["n_eval"][idx])),
                evals_max=int(np.max(o["n_eval"][idx])),
            ))  # fmt: skip
    return rows, timing


def _below(dec):
    """Converged by the package's measure: dec < TOL (NaN, a singular information, is not)."""
    return np.isfinite(dec) & (dec < TOL)


def _table(rows: list[dict], cols: list[tuple[str, str, int, str]]) -> None:
    """Print rows; cols: (key, header, width, kind): kind "s" as is, "g" 2 significant
    digits, "t" 3, "n" a whole number, "%" a share as a whole percentage."""

    def cell(x, kind):
        if x is None:
            return "-"
        if kind == "%":
            return f"{100 * x:.0f}"
        if kind == "n":
            return f"{x:.0f}"
        if kind in "gt":
            return f"{x:.{2 if kind == 'g' else 3}g}"
        return str(x)

    print(" ".join(f"{h:>{w}}" for _, h, w, _ in cols))
    for r in rows:
        print(" ".join(f"{cell(r[k], kind):>{w}}" for k, _, w, kind in cols))


def print_tables(rows: list[dict], timings: list[dict]) -> None:
    """Three tables: Fisher scoring per status; L-BFGS per status and start (shares in %);
    times."""
    s = [("scenario", "scenario", 10, "s"), ("fs_status", "FS status", 13, "s")]
    fs_rows = [r for r in rows if r["start"] == "fs_end"]
    print("Fisher scoring endpoints (shares in %):")
    _table(fs_rows, s + [("n", "n", 4, "s"), ("fs_iter", "iter", 5, "n"),
                         ("fs_conv", "conv", 5, "%"), ("fs_kkt", "kkt", 4, "%"),
                         ("fs_wall", "wall", 5, "%")])  # fmt: skip
    print("\nL-BFGS from FS's endpoint (fs_end) or the start values (start), vs FS:")
    _table(rows, s + [("start", "from", 6, "s"), ("dnll_med", "dnll_med", 8, "g"),
                      ("dnll_min", "dnll_min", 8, "g"), ("better", "lower", 5, "%"),
                      ("worse", "higher", 6, "%"), ("conv", "conv", 4, "%"),
                      ("kkt", "kkt", 4, "%"), ("wall", "wall", 4, "%"),
                      ("dec_med", "dec_med", 7, "g"), ("steps", "steps", 5, "n"),
                      ("evals", "evals", 5, "n")])  # fmt: skip
    print("\nTimes in s (us_*: per gene; FS opt = the optimizer alone, warm):")
    t_rows = [dict(t, lb_fs_end=t["lbfgs_run_s"]["fs_end"], lb_start=t["lbfgs_run_s"]["start"],
                   us_fs_end=t["lbfgs_us_per_gene"]["fs_end"],
                   us_start=t["lbfgs_us_per_gene"]["start"]) for t in timings]  # fmt: skip
    _table(t_rows, [("scenario", "scenario", 10, "s"), ("genes", "genes", 5, "s"),
                    ("fs_end_to_end_s", "FS fit", 6, "t"), ("fs_optimize_s", "FS opt", 6, "t"),
                    ("fs_us_per_gene", "us_FS", 6, "n"),
                    ("lbfgs_compile_s", "LB compile", 10, "t"),
                    ("lb_fs_end", "LB fs_end", 9, "t"), ("lb_start", "LB start", 8, "t"),
                    ("us_fs_end", "us_fs_end", 9, "n"),
                    ("us_start", "us_start", 8, "n")])  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--genes", type=int, default=64)
    p.add_argument("--donors", type=int, default=100)
    p.add_argument("--celltypes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="at most this many L-BFGS steps per gene")
    p.add_argument("--method", default="reml", choices=("ml", "reml"))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS),
                   choices=list(SCENARIOS))  # fmt: skip
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)

    C = a.celltypes
    v = np.zeros(C)
    v[C // 2 :] = np.linspace(0.1, 0.2, C - C // 2)  # half the cell types with V_c = 0
    ctp = cj.simulate(a.genes, a.donors, C, hom2=0.2, V=np.diag(v), ctnu=0.2, seed=a.seed)
    rows, timings = [], []
    for name in a.scenarios:
        r, t = run_scenario(name, ctp, model="free", reml=a.method == "reml", steps=a.steps)
        rows += r
        timings.append(t)

    print_tables(rows, timings)
    write_json(
        a.json, [dict(r, kind="row") for r in rows] + [dict(t, kind="timing") for t in timings]
    )
    return rows, timings


if __name__ == "__main__":
    main()
