"""Any estimator over a stack of layers (SPEC §8): every step under ``jax.vmap`` over slices.

The stats and factors of a :class:`~rfim_jax._src.layers.stacked.StackedLayer` are the inner
estimator's with a leading layer axis; the counters (skipped batches, fallbacks) are summed
over the slices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rfim_jax._src.estimators.base import Estimator


def _stack_shapes(shapes, num: int):
    return jax.tree.map(lambda s: (num, *s), shapes,
                        is_leaf=lambda s: isinstance(s, tuple) and all(
                            isinstance(i, int) for i in s))


@struct.dataclass
class StackedPreconditioner:
    """A batch of per-slice metrics; ``matvec_columns`` applies slice k's to columns k."""

    metric: object

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        return jax.vmap(lambda m, c: m.matvec_columns(c))(self.metric, cols)


class StackedEstimator(Estimator):
    """``inner`` applied slice by slice to a stacked layer."""

    def __init__(self, inner: Estimator):
        self.inner = inner
        self.name = inner.name

    def stats_shapes(self, layer):
        return _stack_shapes(self.inner.stats_shapes(layer.inner), layer.num)

    def factors_shapes(self, layer):
        return _stack_shapes(self.inner.factors_shapes(layer.inner), layer.num)

    def init(self, layer, dtype):
        stats, factors = self.inner.init(layer.inner, dtype)
        stack = lambda a: jnp.broadcast_to(a, (layer.num, *a.shape)) + 0  # noqa: E731 - own buffer
        return jax.tree.map(stack, stats), jax.tree.map(stack, factors)

    def update(self, layer, stats, factors, x_aug, z, damping, rate, axis_name=None):
        new, bad = jax.vmap(
            lambda s, f, x, zz: self.inner.update(layer.inner, s, f, x, zz, damping, rate,
                                                  axis_name)
        )(stats, factors, x_aug, z)
        return new, jnp.sum(bad).astype(jnp.int32)

    @property
    def refresh_keeps_stats(self) -> bool:
        return self.inner.refresh_keeps_stats

    def refresh(self, layer, stats, factors, *, solver, normalize):
        out = jax.vmap(lambda s, f: self.inner.refresh(layer.inner, s, f, solver=solver,
                                                       normalize=normalize))(stats, factors)
        return out[0], out[1], jnp.sum(out[2]).astype(jnp.int32)

    def stale(self, layer, stats, factors, *, damping, normalize):
        return jnp.any(jax.vmap(lambda s, f: self.inner.stale(
            layer.inner, s, f, damping=damping, normalize=normalize))(stats, factors))

    def preconditioner(self, layer, stats, factors, *, normalize):
        return StackedPreconditioner(jax.vmap(
            lambda s, f: self.inner.preconditioner(layer.inner, s, f, normalize=normalize)
        )(stats, factors))

    def as_metric(self, layer, stats, factors):
        """The per-slice metrics as one batched metric (its arrays carry the layer axis)."""
        return jax.vmap(lambda s, f: self.inner.as_metric(layer.inner, s, f))(stats, factors)

    def neuron_axes(self, layer):
        shift = lambda a: None if a is None else a + 1  # noqa: E731
        stats_axes, factors_axes = self.inner.neuron_axes(layer.inner)
        return (jax.tree.map(shift, stats_axes, is_leaf=lambda a: a is None),
                jax.tree.map(shift, factors_axes, is_leaf=lambda a: a is None))
