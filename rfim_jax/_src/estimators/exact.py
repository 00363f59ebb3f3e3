"""The exact estimator: stored SPD blocks, averaged, inverted at refreshes (SPEC §4).

``stats`` is the stack of the layer's stored blocks (k, n, n): (m, d, d) per neuron for an
activation kind (eq. 23), (1, d, d) for ``"linear"`` (eq. 22), (1, m d, m d) for
``"softmax"`` (eq. 25).  ``factors`` is their inverses at the last refresh.
"""

from __future__ import annotations

import jax.numpy as jnp

from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src import solvers
from rfim_jax._src.estimators.base import Estimator, moving_average


class ExactEstimator(Estimator):
    """Per-neuron (m, d, d), shared (1, d, d) or full (1, m d, m d) blocks, inverted."""

    name = "exact"
    refresh_keeps_stats = True

    def _block_shape(self, layer) -> tuple[int, int, int]:
        if layer.is_softmax:
            return (1, layer.m * layer.d, layer.m * layer.d)
        if layer.is_linear:
            return (1, layer.d, layer.d)
        return (layer.m, layer.d, layer.d)

    def stats_shapes(self, layer):
        return self._block_shape(layer)

    def factors_shapes(self, layer):
        return self._block_shape(layer)

    def init(self, layer, dtype):
        k, n, _ = self._block_shape(layer)
        eye = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (k, n, n))
        # A distinct buffer for the inverses: a state built outside jit can then be donated.
        return eye, jnp.copy(eye)

    def _wrap(self, layer, blocks):
        if layer.is_softmax:
            return metrics_lib.DenseMetric(blocks[0], num_neurons=layer.m,
                                           has_bias=layer.has_bias, layout=layer.layout)
        if layer.is_linear:
            return metrics_lib.SharedBlockMetric(blocks[0], num_neurons=layer.m,
                                                 has_bias=layer.has_bias, layout=layer.layout)
        return metrics_lib.BlockDiagonalMetric(blocks, has_bias=layer.has_bias,
                                               layout=layer.layout)

    def update(self, layer, stats, factors, x_aug, z, damping, rate, axis_name=None):
        metric = rfim_lib.rows_rfim(
            x_aug, z, layer.kind, has_bias=layer.has_bias
        )
        fresh = solvers.add_damping(metric.stored_blocks(), damping, relative=True)
        # The stored blocks are PSD, so their traces decide finiteness (moving_average).
        return moving_average(stats, fresh.astype(stats.dtype), rate, axis_name,
                              finite_of=solvers.block_traces)

    def refresh(self, layer, stats, factors, *, solver, normalize):
        scale = solvers.spd_max_eigenvalue(stats).max() if normalize else 1.0
        inv, ok = solvers.spd_inverse_and_status(stats / scale, method=solver, previous=factors)
        return stats, inv, jnp.sum(~ok).astype(jnp.int32)

    def preconditioner(self, layer, stats, factors, *, normalize):
        del stats, normalize  # the scale was applied at the refresh.
        return self._wrap(layer, factors)

    def as_metric(self, layer, stats, factors):
        return self._wrap(layer, stats)

    def neuron_axes(self, layer):
        axis = None if (layer.is_softmax or layer.is_linear) else 0
        return axis, axis
