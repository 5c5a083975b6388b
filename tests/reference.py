"""Dense, obviously-correct NumPy/SciPy evaluations (no ctmm_jax code), natural parameters.

Everything builds the full stacked covariance: CTP (NC x NC), OP (N x N).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def ctp_dense(hom2, V, Y, ctnu):
    """y = vec(Y) donor-major, X = 1_N (x) I_C, Sigma = I_N (x) (hom2 J + V) + diag(vec(ctnu))."""
    N, C = Y.shape
    Sigma = np.kron(np.eye(N), hom2 * np.ones((C, C)) + V) + np.diag(ctnu.ravel())
    return Y.ravel(), np.kron(np.ones((N, 1)), np.eye(C)), Sigma


def op_dense(hom2, V, y, nu, P):
    """X = P, Sigma = diag(hom2 + P_i^T V P_i + nu_i)."""
    return y, P, np.diag(hom2 + np.einsum("nc,cd,nd->n", P, V, P) + nu)


def ml_loglik(y, X, Sigma):
    Si = np.linalg.inv(Sigma)
    beta = np.linalg.solve(X.T @ Si @ X, X.T @ Si @ y)
    return stats.multivariate_normal(X @ beta, Sigma).logpdf(y)


def projection(X, Sigma):
    """Pi = S^-1 - S^-1 X (X^T S^-1 X)^-1 X^T S^-1."""
    Si = np.linalg.inv(Sigma)
    return Si - Si @ X @ np.linalg.solve(X.T @ Si @ X, X.T @ Si)


def reml_loglik(y, X, Sigma):
    """-1/2 [log|S| + log|X^T S^-1 X| + y^T Pi y + (n - p) log 2 pi]."""
    n, p = X.shape
    Si = np.linalg.inv(Sigma)
    return -0.5 * (
        np.linalg.slogdet(Sigma)[1]
        + np.linalg.slogdet(X.T @ Si @ X)[1]
        + y @ projection(X, Sigma) @ y
        + (n - p) * np.log(2 * np.pi)
    )


def dense(data, g, hom2, V):
    """(y, X, Sigma) of gene g of a CTPData or OPData."""
    if hasattr(data, "Y"):
        return ctp_dense(hom2, V, data.Y[g], data.ctnu[g])
    return op_dense(hom2, V, data.y[g], data.nu[g], data.P)


def loglik(data, g, hom2, V, method):
    y, X, Sigma = dense(data, g, hom2, V)
    return (ml_loglik if method == "ml" else reml_loglik)(y, X, Sigma)


def kernels(data, model):
    """Dense covariance kernels K_k (d Sigma / d phi_k), written out per model."""
    C = data.P.shape[1]
    if hasattr(data, "Y"):
        N = data.Y.shape[1]
        lift = lambda B: np.kron(np.eye(N), B)  # noqa: E731
    else:
        lift = lambda B: np.diag(np.einsum("nc,cd,nd->n", data.P, B, data.P))  # noqa: E731
    e = np.eye(C)
    if model == "hom":
        Bs = [np.ones((C, C))]
    elif model == "iid":
        Bs = [np.ones((C, C)), np.eye(C)]
    elif model == "free":
        Bs = [np.ones((C, C))] + [np.outer(e[c], e[c]) for c in range(C)]
    else:
        Bs = [np.outer(e[i], e[j]) + np.outer(e[j], e[i]) * (i != j)
              for i in range(C) for j in range(i, C)]  # fmt: skip
    return [lift(B) for B in Bs]


def expected_information(data, g, hom2, V, model, method):
    """ML: 1/2 tr(S^-1 K_k S^-1 K_l); REML: 1/2 tr(Pi K_k Pi K_l)."""
    y, X, Sigma = dense(data, g, hom2, V)
    Pm = projection(X, Sigma) if method == "reml" else np.linalg.inv(Sigma)
    Ks = kernels(data, model)
    return np.array([[0.5 * np.trace(Pm @ Ki @ Pm @ Kj) for Kj in Ks] for Ki in Ks])


def he(y, X, D, Ks):
    """HE written out: OLS of vec(M y y^T M - M D M) on the vec(M K M), M = I - X (X^T X)^-1 X^T."""
    M = np.eye(len(y)) - X @ np.linalg.solve(X.T @ X, X.T)
    t = (M @ np.outer(y, y) @ M - M @ D @ M).ravel()
    Q = np.stack([(M @ K @ M).ravel() for K in Ks], axis=1)
    return np.linalg.lstsq(Q, t, rcond=None)[0]


def natural(model, phi, C):
    """phi -> (hom2, V) written out per model."""
    phi = np.asarray(phi)
    if model == "hom":
        return phi[0], np.zeros((C, C))
    if model == "iid":
        return phi[0], phi[1] * np.eye(C)
    if model == "free":
        return phi[0], np.diag(phi[1:])
    V = np.zeros((C, C))
    V[np.triu_indices(C)] = phi
    return 0.0, V + np.triu(V, 1).T
