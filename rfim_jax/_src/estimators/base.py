"""The estimator protocol: how a layer's metric is represented inside RNGD (SPEC §4, §7).

An estimator is a static object.  For one layer (a layer adapter, :mod:`rfim_jax._src.layers`)
it owns two pytrees of the optimiser state:

* ``stats``: what is averaged every step (``ScaleByRNGDState.metrics[path]``);
* ``factors``: what is recomputed at a refresh (``ScaleByRNGDState.inverses[path]``).

and the four steps of an RNGD update, in this order:

1. :meth:`Estimator.update` - this batch's damped fresh estimate and the moving average
   ``stats <- rate stats + (1 - rate) fresh``; a non-finite fresh estimate is skipped;
2. :meth:`Estimator.refresh` - every ``inverse_every`` steps (inside ``lax.cond``);
3. :meth:`Estimator.preconditioner` - a metric whose ``matvec`` is the preconditioned step.

:meth:`Estimator.as_metric` returns the averaged metric itself, for diagnostics and tests.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import sharding as sharding_lib

Stats = Any
Factors = Any


class Estimator:
    """Base class: one representation of a layer metric inside the optimiser."""

    #: the ``representation`` name this estimator implements.
    name: str = ""
    #: whether :meth:`refresh` returns ``stats`` unchanged.  The optimiser then keeps them
    #: out of the refresh ``lax.cond``, whose not-taken branch would otherwise copy them
    #: every step.
    refresh_keeps_stats: bool = False

    def stats_shapes(self, layer) -> Any:
        """Pytree of the stats' shapes."""
        raise NotImplementedError

    def factors_shapes(self, layer) -> Any:
        """Pytree of the factors' shapes."""
        raise NotImplementedError

    def init(self, layer, dtype) -> tuple[Stats, Factors]:
        """The state before any data: the identity metric."""
        raise NotImplementedError

    def update(self, layer, stats, factors, x_aug, z, damping, rate, axis_name=None):
        """Steps 1-2: returns ``(stats, bad)``, ``bad`` an int32 1 if the batch was skipped.

        ``axis_name``, if given, averages the fresh statistics across that mapped axis.
        """
        raise NotImplementedError

    def refresh(self, layer, stats, factors, *, solver: str, normalize: bool):
        """Step 3: returns ``(stats, factors, fallbacks)``."""
        raise NotImplementedError

    def stale(self, layer, stats, factors, *, damping, normalize: bool) -> jax.Array:
        """Whether a stored factor no longer fits the current ``stats`` (a bool scalar), so
        that this step must refresh.  Only stored inverses go stale (the exact estimator);
        ``damping`` is the relative damping eps0, which bounds a fresh inverse."""
        del layer, stats, factors, damping, normalize
        return jnp.zeros([], bool)

    def preconditioner(self, layer, stats, factors, *, normalize: bool):
        """Step 4: a metric (:class:`AbstractMetric`) whose ``matvec`` gives the step."""
        raise NotImplementedError

    def as_metric(self, layer, stats, factors) -> metrics_lib.AbstractMetric:
        """The moving-average metric in its representation."""
        raise NotImplementedError

    def neuron_axes(self, layer) -> tuple[Any, Any]:
        """Per leaf of (stats, factors): the axis indexed by neuron, or None (replicated)."""
        raise NotImplementedError

    def state_bytes(self, layer, itemsize: int) -> int:
        """Bytes of ``stats`` and ``factors`` together at ``itemsize`` bytes per number."""
        def is_shape(s):
            return isinstance(s, tuple) and all(isinstance(i, int) for i in s)

        shapes = [
            *jax.tree.leaves(self.stats_shapes(layer), is_leaf=is_shape),
            *jax.tree.leaves(self.factors_shapes(layer), is_leaf=is_shape),
        ]
        return sum(math.prod(shape) for shape in shapes) * itemsize


def moving_average(old, fresh, rate, axis_name=None, *, finite_of=None):
    """``rate old + (1 - rate) fresh``, or ``old`` (and bad = 1) when ``fresh`` is not finite.

    A non-finite batch must not poison the average, so it is skipped and counted.  With an
    ``axis_name`` (pmap, shard_map) the fresh statistics are first averaged across it, so
    every replica sees the global batch's statistics and the replicas stay identical.

    ``finite_of``, if given, maps ``fresh`` to a smaller pytree that is finite exactly when
    ``fresh`` is (for a stack of PSD blocks, their traces: ``|G_ij| <= max(G_ii, G_jj)``,
    so a non-finite entry makes the diagonal non-finite).  The check then reads that instead
    of every entry, which for the (m, d, d) blocks of an exact layer was a pass over the
    whole state each step.
    """
    if axis_name is not None:
        fresh = jax.lax.pmean(fresh, axis_name)
    # Under explicit sharding the fresh estimate follows the activations' sharding; the
    # average keeps the state's own.
    fresh = sharding_lib.match_sharding(fresh, old)
    check = fresh if finite_of is None else finite_of(fresh)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(c)) for c in jax.tree.leaves(check)]))
    avg = jax.tree.map(lambda o, f: jnp.where(finite, rate * o + (1.0 - rate) * f, o), old, fresh)
    return avg, (~finite).astype(jnp.int32)


def num_rows(layer) -> int:
    """Rows of the scales ``S``: 1 for the linear kind (shared), else m."""
    return 1 if layer.is_linear else layer.m
