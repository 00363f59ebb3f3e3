"""The eigenvalue-corrected estimator (SPEC §7): ``A``, its eigenbasis ``U`` and scales ``S``.

``stats = {"A": (d, d), "S": (r, d)}`` with r = m (r = 1 for the ``"linear"`` kind), and
``factors = {"U": (d, d)}``.  All start at the identity (``A = I, U = I, S = 1``).  Per update:

1. fresh ``A_hat = mean x~ x~^T`` damped (``+ damping tr(A_hat)/d I``) and
   ``S_hat_l = mean_i nu_il (U^T x~_i)^2 + damping tr(G_hat_l)/d`` with the current U and
   ``tr(G_hat_l) = mean_i nu_il |x~_i|^2``;
2. ``A <- rate A + (1 - rate) A_hat``, ``S <- rate S + (1 - rate) S_hat``;
3. at a refresh, ``U' = eigenvectors(A)``, ``P = U'^T U``, ``s_l <- (P o P) s_l`` (for the
   linear kind, S = eigenvalues(A)), ``U <- U'``;
4. the step is ``U diag(1/s_l) U^T g_l``.

For the linear kind ``A_hat`` is the metric's own ``mean x~ x~^T / sigma^2``: A is then the
exact estimator's average, identity start included, so that S = eigenvalues(A) gives the same
updates as the exact representation for any sigma (SPEC §7).  Dividing by sigma^2 does not move
the eigenvectors, and with the default sigma = 1 it changes nothing.

No (m, d, d) array is formed: the statistics cost ``2 n d^2 + 2 n m d`` and the apply
``4 d^2 m``.  An eigendecomposition that is not finite keeps the previous U and S (a fallback).
"""

from __future__ import annotations

import jax.numpy as jnp

from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import solvers
from rfim_jax._src import statistics as stats_lib
from rfim_jax._src.estimators.base import Estimator, moving_average, num_rows


def damped_scales(x_aug, weights, rotated, damping):
    """``mean_i w_il rotated_i^2 + damping tr(G_hat_l)/d``, (r, d); shared by eigen/diagonal."""
    d = x_aug.shape[-1]
    traces = stats_lib.weighted_traces(x_aug, weights)
    return stats_lib.diagonal_moments(rotated, weights) + (damping * traces / d)[:, None]


class EigenEstimator(Estimator):
    """Per-neuron diagonals in the eigenbasis of the layer's input second moment."""

    name = "eigen"

    def stats_shapes(self, layer):
        return {"A": (layer.d, layer.d), "S": (num_rows(layer), layer.d)}

    def factors_shapes(self, layer):
        return {"U": (layer.d, layer.d)}

    def init(self, layer, dtype):
        d = layer.d
        stats = {"A": jnp.eye(d, dtype=dtype), "S": jnp.ones((num_rows(layer), d), dtype)}
        return stats, {"U": jnp.eye(d, dtype=dtype)}

    def update(self, layer, stats, factors, x_aug, z, damping, rate, axis_name=None):
        dtype = stats["A"].dtype
        x_aug = x_aug.astype(dtype)
        second = stats_lib.second_moment(x_aug)
        if layer.is_linear:
            second = second / jnp.asarray(layer.kind.sigma**2, dtype)
        d = second.shape[-1]
        a_hat = second + (damping * solvers.block_traces(second) / d) * jnp.eye(d, dtype=dtype)
        weights = layer.unit_weights(z).astype(dtype)
        s_hat = damped_scales(x_aug, weights, x_aug @ factors["U"].astype(dtype), damping)
        # A is PSD: its trace decides its finiteness (moving_average); S is checked whole.
        return moving_average(stats, {"A": a_hat, "S": s_hat}, rate, axis_name,
                              finite_of=lambda f: (solvers.block_traces(f["A"]), f["S"]))

    def refresh(self, layer, stats, factors, *, solver, normalize):
        del solver, normalize
        a, s, u = stats["A"], stats["S"], factors["U"]
        evals, u_new = stats_lib.input_eigenbasis(a)
        if layer.is_linear:
            s_new = jnp.broadcast_to(evals, s.shape).astype(s.dtype)
        else:
            p = u_new.T @ u
            s_new = s @ (p * p).T
        ok = jnp.all(jnp.isfinite(u_new)) & jnp.all(jnp.isfinite(s_new))
        # A failed eigendecomposition keeps the previous basis and scales, and is counted.
        s_out = jnp.where(ok, s_new, s).astype(s.dtype)
        u_out = jnp.where(ok, u_new, u).astype(u.dtype)
        return {"A": a, "S": s_out}, {"U": u_out}, (~ok).astype(jnp.int32)

    def _metric(self, layer, basis, scales):
        scales = jnp.broadcast_to(scales, (layer.m, layer.d))
        return metrics_lib.EigenDiagonalMetric(basis, scales, has_bias=layer.has_bias,
                                               layout=layer.layout)

    def preconditioner(self, layer, stats, factors, *, normalize):
        s = stats["S"]
        if normalize:
            s = s / jnp.max(s)
        return self._metric(layer, factors["U"], solvers.reciprocal_scales(s))

    def as_metric(self, layer, stats, factors):
        return self._metric(layer, factors["U"], stats["S"])

    def neuron_axes(self, layer):
        rows = None if layer.is_linear else 0
        return {"A": None, "S": rows}, {"U": None}
