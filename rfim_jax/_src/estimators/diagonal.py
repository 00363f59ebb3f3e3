"""The diagonal estimator (SPEC §7): ``S`` (r, d), row l the diagonal of ``G_l``.

``stats = {"S": (r, d)}`` (r = 1 for the ``"linear"`` kind, else m), starting at 1; no factors.
Fresh ``S_hat_l = mean_i nu_il x~_i^2 + damping tr(G_hat_l)/d``; the step is ``g_l / s_l``.
Costs ``2 n m d`` for the statistics and ``m d`` for the apply.
"""

from __future__ import annotations

import jax.numpy as jnp

from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import solvers
from rfim_jax._src.estimators.base import Estimator, moving_average, num_rows
from rfim_jax._src.estimators.eigen import damped_scales


class DiagonalEstimator(Estimator):
    """Each neuron's block replaced by its diagonal."""

    name = "diagonal"
    refresh_keeps_stats = True

    def stats_shapes(self, layer):
        return {"S": (num_rows(layer), layer.d)}

    def factors_shapes(self, layer):
        return {}

    def init(self, layer, dtype):
        return {"S": jnp.ones((num_rows(layer), layer.d), dtype)}, {}

    def update(self, layer, stats, factors, x_aug, z, damping, rate, axis_name=None):
        dtype = stats["S"].dtype
        x_aug = x_aug.astype(dtype)
        weights = layer.unit_weights(z).astype(dtype)
        fresh = {"S": damped_scales(x_aug, weights, x_aug, damping)}
        return moving_average(stats, fresh, rate, axis_name)

    def refresh(self, layer, stats, factors, *, solver, normalize):
        return stats, factors, jnp.zeros([], jnp.int32)

    def _metric(self, layer, scales):
        scales = jnp.broadcast_to(scales, (layer.m, layer.d))
        return metrics_lib.DiagonalMetric(scales, has_bias=layer.has_bias, layout=layer.layout)

    def preconditioner(self, layer, stats, factors, *, normalize):
        s = stats["S"]
        if normalize:
            s = s / jnp.max(s)
        return self._metric(layer, solvers.reciprocal_scales(s))

    def as_metric(self, layer, stats, factors):
        return self._metric(layer, stats["S"])

    def neuron_axes(self, layer):
        return {"S": None if layer.is_linear else 0}, {}
