"""The exact estimator: stored SPD blocks, averaged, inverted at refreshes (SPEC §4).

``stats`` is the stack of the layer's stored blocks (k, n, n): (m, d, d) per neuron for an
activation kind (eq. 23), (1, d, d) for ``"linear"`` (eq. 22), (1, m d, m d) for
``"softmax"`` (eq. 25).  ``factors`` is their inverses at the last refresh.

**Stale inverses.**  Between refreshes a block is applied through the inverse of what it was
at the last refresh.  A block can shrink by at most ``decay^T`` in that time, but it can grow
without bound: a relu unit that was dead at a refresh (its block decayed towards 0, and
relative damping, ``eps0 tr(G_hat)/d``, adds nothing for it) and fires again would get that
tiny block's inverse, a step up to 1e15 times too long, for up to ``inverse_every`` steps.
The eigen and diagonal representations divide by the current scales every step and do not
have this fault.  So after each update of the statistics, each block's staleness is
measured from d diagonal entries of the current block ``G`` and of its stored inverse ``M``:

    rho_b = sum_i G_ii M_ii / n.

Right after a refresh ``rho_b <= (1 + eps0) / eps0``: relative damping keeps every eigenvalue
of the averaged block at least ``eps0 / (1 + eps0)`` times its mean, so ``M_ii <= n (1 + eps0)
/ (eps0 tr G)``.  A block whose ``rho_b`` exceeds :data:`STALE_FACTOR` times that bound has
grown, since its inverse was taken, by at least that factor along some direction, and its
stored inverse would overshoot there.  Such a block makes this step a refresh
(:func:`rfim_jax.scale_by_rngd`): every inverse is recomputed from the current blocks before
the step is taken.  In healthy training at the usual input scale no block comes near the
threshold (README, "Guards", for the measurements), so the refreshes are SPEC §4's schedule;
features with second moments far above 1 can cross it once while the average grows from its
identity start.  With ``eps0 = 0`` there is no bound and no early refresh; under
``normalize_max_eigenvalue`` the stored inverse carries the layer's scale, so neither.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src import solvers
from rfim_jax._src.estimators.base import Estimator, moving_average

#: A block is stale when ``rho_b`` exceeds this many times its bound right after a refresh
#: (module docstring).
STALE_FACTOR = 10.0


def stale_blocks(blocks: jax.Array, inverses: jax.Array, damping) -> jax.Array:
    """Which of the (k, n, n) ``blocks`` their stored ``inverses`` no longer fit, (k,) bool.

    ``rho_b = sum_i G_ii M_ii / n > STALE_FACTOR (1 + eps0) / eps0`` (module docstring).
    """
    n = blocks.shape[-1]
    rho = jnp.sum(solvers.block_diagonals(blocks) * solvers.block_diagonals(inverses), -1) / n
    damping = jnp.asarray(damping, rho.dtype)
    # eps0 = 0 gives an infinite bound: no block is ever stale.
    bound = STALE_FACTOR * (1.0 + damping) / damping
    return rho > bound


def _average_one_block(stats, block, damping, rate, axis_name):
    """``moving_average(stats, block + eps I)`` for one (1, n, n) block, the damping added last.

    The same average as the per-neuron path, ``rate G + (1 - rate)(G_hat + eps I)`` with
    ``eps = damping tr(G_hat) / n`` (eq. 30), but ``(1 - rate) eps`` is added to the n diagonal
    entries of the result in place, after the full-block pass, instead of inside it.  On the
    CPU the identity inside the pass made it 30% slower (265 against 200 us per step for the
    paper MLP's 785 x 785 input block; README, *Where the step time went*).  The per-neuron
    (m, d, d) blocks keep the identity in the pass: their average was bound by reading the
    mirrored triangle, and a separate update of their m d diagonal entries costs more than it
    saves (measured with the earlier, transposed layout of those blocks: 14-15 us per layer
    for the update, no gain in the pass).
    """
    n = block.shape[-1]
    eps = solvers.damping_shifts(block, damping, relative=True)
    damping = jnp.asarray(damping, block.dtype)
    if axis_name is not None:  # eps is linear in the block, as the average across replicas is
        eps = jax.lax.pmean(eps, axis_name)
    # Finite exactly when the damped block's traces, tr(G_hat)(1 + damping), are.
    avg, bad = moving_average(stats, block, rate, axis_name,
                              finite_of=lambda b: solvers.block_traces(b) * (1.0 + damping))
    diagonal = jnp.arange(n)
    step = jnp.where(bad == 0, (1.0 - rate) * eps, jnp.zeros_like(eps))
    return avg.at[..., diagonal, diagonal].add(step[..., None]), bad


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
        blocks = metric.stored_blocks()
        if blocks.shape[0] > 1:
            fresh = solvers.add_damping(blocks, damping, relative=True)
            # The stored blocks are PSD, so their traces decide finiteness (moving_average).
            return moving_average(stats, fresh.astype(stats.dtype), rate, axis_name,
                                  finite_of=solvers.block_traces)
        return _average_one_block(stats, blocks.astype(stats.dtype), damping, rate, axis_name)

    def refresh(self, layer, stats, factors, *, solver, normalize):
        scale = solvers.spd_max_eigenvalue(stats).max() if normalize else 1.0
        inv, ok = solvers.spd_inverse_and_status(stats / scale, method=solver, previous=factors)
        return stats, inv, jnp.sum(~ok).astype(jnp.int32)

    def stale(self, layer, stats, factors, *, damping, normalize):
        if normalize:  # the stored inverses carry the layer's scale: no bound to test
            return jnp.zeros([], bool)
        return jnp.any(stale_blocks(stats, factors, damping))

    def preconditioner(self, layer, stats, factors, *, normalize):
        del stats, normalize  # the scale was applied at the refresh.
        return self._wrap(layer, factors)

    def as_metric(self, layer, stats, factors):
        return self._wrap(layer, stats)

    def neuron_axes(self, layer):
        axis = None if (layer.is_softmax or layer.is_linear) else 0
        return axis, axis
