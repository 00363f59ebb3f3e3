"""A numpy reference of RNGD (SPEC §4), shared by the test modules and tests/_driver.py.

It re-derives every step from the paper (eqs. 22, 23, 25, 30-33) with numpy loops over
samples and neurons and shares no code with rfim_jax.
"""

import math

import numpy as np


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _nu(kind, z):
    if kind == "relu":  # defaults omega=1, iota=0, sigma=1: nu = s(z)^2 (eq. 18)
        return _sigmoid(z) ** 2
    if kind == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if kind == "sigmoid":
        return _sigmoid(z) * (1.0 - _sigmoid(z))
    if kind == "elu":
        return np.where(z >= 0, 1.0, np.exp(2 * z))
    if kind == "gelu":  # f(z) = z Phi(z): f'(z) = Phi(z) + z phi(z), sigma = 1
        phi = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / np.sqrt(2.0)))
        return (cdf + z * phi) ** 2
    raise AssertionError(kind)


def _aug(x, has_bias):
    x = np.asarray(x, np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], 1) if has_bias else x


def _damp(block, eps0):
    return block + eps0 * np.trace(block) / block.shape[0] * np.eye(block.shape[0])


def _linear_sigma(kind):
    """sigma of the linear kind ("linear", or ("linear", sigma)); None for other kinds."""
    if isinstance(kind, tuple) and kind[0] == "linear":
        return float(kind[1])
    return 1.0 if kind == "linear" else None


def reference_blocks(kind, x, z, has_bias, eps0):
    """This batch's damped blocks, as a list."""
    xa = _aug(x, has_bias)
    n, d = xa.shape
    z = np.asarray(z, np.float64)
    m = z.shape[1]
    sigma = _linear_sigma(kind)
    if sigma is not None:  # eq. (22): A = mean x~ x~^T / sigma^2
        return [_damp(sum(np.outer(r, r) for r in xa) / (n * sigma**2), eps0)]
    if kind == "softmax":
        full = np.zeros((m * d, m * d))
        for i in range(n):
            e = np.exp(z[i] - z[i].max())
            eta = e / e.sum()
            full += np.kron(np.diag(eta) - np.outer(eta, eta), np.outer(xa[i], xa[i]))
        return [_damp(full / n, eps0)]
    nu = _nu(kind, z)
    return [
        _damp(sum(nu[i, l] * np.outer(xa[i], xa[i]) for i in range(n)) / n, eps0)
        for l in range(m)
    ]


def reference_precondition(kind, inverses, g_kernel, g_bias):
    cols = np.asarray(g_kernel, np.float64)
    if g_bias is not None:
        cols = np.concatenate([cols, np.asarray(g_bias)[None]], 0)
    d, m = cols.shape
    if _linear_sigma(kind) is not None:
        out = inverses[0] @ cols
    elif kind == "softmax":
        out = (inverses[0] @ cols.T.reshape(-1)).reshape(m, d).T
    else:
        out = np.stack([inverses[l] @ cols[:, l] for l in range(m)], 1)
    return (out[:-1], out[-1]) if g_bias is not None else (out, None)


def _outgrown(G, inverses, eps0, factor):
    """Whether a block has outgrown its stored inverse: ``sum_i G_ii M_ii / n`` past
    ``factor (1 + eps0) / eps0``, its bound right after a refresh (README "Stale inverses")."""
    if factor is None or eps0 <= 0:
        return False
    bound = factor * (1 + eps0) / eps0
    return any(float(np.sum(np.diag(g) * np.diag(inv))) / g.shape[0] > bound
               for g, inv in zip(G, inverses, strict=True))


class ReferenceRNGD:
    """SPEC §4 step by step: fresh damped estimate, EMA from I, refresh, precondition.  A
    step whose averages have outgrown a stored inverse refreshes too (``early`` counts
    those steps); ``stale_factor=None`` leaves that rule out."""

    def __init__(self, specs, decay, inverse_every, eps0, stale_factor=10.0):
        self.specs, self.decay, self.every, self.eps0 = specs, decay, inverse_every, eps0
        self.stale_factor = stale_factor
        self.early = 0
        self.count = 0
        self.G, self.inv = {}, {}
        for path, (kind, d_in, m, has_bias) in specs.items():
            d = d_in + has_bias
            linear = _linear_sigma(kind) is not None
            size, k = (m * d, 1) if kind == "softmax" else (d, 1 if linear else m)
            self.G[path] = [np.eye(size) for _ in range(k)]
            self.inv[path] = [np.eye(size) for _ in range(k)]

    def update(self, grads, acts):
        for path, (kind, _, _, has_bias) in self.specs.items():
            fresh = reference_blocks(kind, acts[path]["inputs"], acts[path]["preacts"],
                                     has_bias, self.eps0)
            self.G[path] = [self.decay * g + (1 - self.decay) * f
                            for g, f in zip(self.G[path], fresh, strict=True)]
        scheduled = self.count % self.every == 0
        stale = any(_outgrown(self.G[p], self.inv[p], self.eps0, self.stale_factor)
                    for p in self.specs)
        if scheduled or stale:
            self.early += int(not scheduled)
            for path in self.specs:
                self.inv[path] = [np.linalg.inv(g) for g in self.G[path]]
        out = {}
        for path, (kind, _, _, _) in self.specs.items():
            out[path] = reference_precondition(
                kind, self.inv[path], grads[path]["kernel"], grads[path].get("bias"))
        self.count += 1
        return out


def _unit_nu(kind, z):
    """Per-sample coefficients of the eigen/diagonal forms; softmax is unit-wise (SPEC §7)."""
    if kind == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        eta = e / e.sum(axis=1, keepdims=True)
        return eta * (1.0 - eta)
    if kind == "linear":
        return np.ones((len(z), 1))
    return _nu(kind, z)


class ReferenceEigenRNGD:
    """SPEC §7 step by step, with loops: A, U, S from the identity; fresh, average, refresh
    (carry S into the new basis), precondition.  ``diagonal=True`` gives the diagonal form."""

    def __init__(self, specs, decay, inverse_every, eps0, diagonal=False):
        self.specs, self.decay, self.every, self.eps0 = specs, decay, inverse_every, eps0
        self.diagonal = diagonal
        self.count = 0
        self.A, self.U, self.S = {}, {}, {}
        for path, (kind, d_in, m, has_bias) in specs.items():
            d = d_in + has_bias
            rows = 1 if kind == "linear" else m
            self.A[path], self.U[path] = np.eye(d), np.eye(d)
            self.S[path] = np.ones((rows, d))

    def update(self, grads, acts):
        out = {}
        for path, (kind, _, _, has_bias) in self.specs.items():
            xa = _aug(acts[path]["inputs"], has_bias)
            n, d = xa.shape
            nu = _unit_nu(kind, np.asarray(acts[path]["preacts"], np.float64))
            u = self.U[path]
            a_hat = sum(np.outer(r, r) for r in xa) / n
            a_hat = a_hat + self.eps0 * np.trace(a_hat) / d * np.eye(d)
            s_hat = np.zeros((nu.shape[1], d))
            for l in range(nu.shape[1]):
                tr = sum(nu[i, l] * xa[i] @ xa[i] for i in range(n)) / n
                for j in range(d):
                    basis_j = np.eye(d)[:, j] if self.diagonal else u[:, j]
                    s_hat[l, j] = sum(nu[i, l] * (basis_j @ xa[i]) ** 2 for i in range(n)) / n
                s_hat[l] += self.eps0 * tr / d
            self.A[path] = self.decay * self.A[path] + (1 - self.decay) * a_hat
            self.S[path] = self.decay * self.S[path] + (1 - self.decay) * s_hat
            if not self.diagonal and self.count % self.every == 0:
                evals, u_new = np.linalg.eigh(self.A[path])
                if kind == "linear":
                    self.S[path] = evals[None, :].copy()
                else:
                    p = u_new.T @ u
                    self.S[path] = np.stack([(p * p) @ s for s in self.S[path]])
                self.U[path] = u_new
            cols = np.asarray(grads[path]["kernel"], np.float64)
            if has_bias:
                cols = np.concatenate([cols, np.asarray(grads[path]["bias"])[None]], 0)
            u = np.eye(d) if self.diagonal else self.U[path]
            res = np.zeros_like(cols)
            for l in range(cols.shape[1]):
                s = self.S[path][0 if kind == "linear" else l]
                res[:, l] = u @ ((u.T @ cols[:, l]) / s)
            out[path] = (res[:-1], res[-1]) if has_bias else (res, None)
        self.count += 1
        return out
