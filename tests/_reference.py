"""A numpy reference of RNGD (SPEC §4), shared by the test modules and tests/_driver.py.

It re-derives every step from the paper (eqs. 22, 23, 25, 30-33) with numpy loops over
samples and neurons and shares no code with rfim_jax.
"""

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
    raise AssertionError(kind)


def _aug(x, has_bias):
    x = np.asarray(x, np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], 1) if has_bias else x


def _damp(block, eps0):
    return block + eps0 * np.trace(block) / block.shape[0] * np.eye(block.shape[0])


def reference_blocks(kind, x, z, has_bias, eps0):
    """This batch's damped blocks, as a list."""
    xa = _aug(x, has_bias)
    n, d = xa.shape
    z = np.asarray(z, np.float64)
    m = z.shape[1]
    if kind == "linear":
        return [_damp(sum(np.outer(r, r) for r in xa) / n, eps0)]
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
    if kind == "linear":
        out = inverses[0] @ cols
    elif kind == "softmax":
        out = (inverses[0] @ cols.T.reshape(-1)).reshape(m, d).T
    else:
        out = np.stack([inverses[l] @ cols[:, l] for l in range(m)], 1)
    return (out[:-1], out[-1]) if g_bias is not None else (out, None)


class ReferenceRNGD:
    """SPEC §4 step by step: fresh damped estimate, EMA from I, refresh, precondition."""

    def __init__(self, specs, decay, inverse_every, eps0):
        self.specs, self.decay, self.every, self.eps0 = specs, decay, inverse_every, eps0
        self.count = 0
        self.G, self.inv = {}, {}
        for path, (kind, d_in, m, has_bias) in specs.items():
            d = d_in + has_bias
            size, k = (m * d, 1) if kind == "softmax" else (d, 1 if kind == "linear" else m)
            self.G[path] = [np.eye(size) for _ in range(k)]
            self.inv[path] = [np.eye(size) for _ in range(k)]

    def update(self, grads, acts):
        out = {}
        for path, (kind, _, _, has_bias) in self.specs.items():
            fresh = reference_blocks(kind, acts[path]["inputs"], acts[path]["preacts"],
                                     has_bias, self.eps0)
            self.G[path] = [self.decay * g + (1 - self.decay) * f
                            for g, f in zip(self.G[path], fresh, strict=True)]
            if self.count % self.every == 0:
                self.inv[path] = [np.linalg.inv(g) for g in self.G[path]]
            out[path] = reference_precondition(
                kind, self.inv[path], grads[path]["kernel"], grads[path].get("bias"))
        self.count += 1
        return out
