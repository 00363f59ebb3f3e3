"""The diagonal RFIM: each neuron block replaced by its diagonal (SPEC §7).

Block l is ``diag(G_l)`` with ``G_l = mean_i nu_f(z_il) x~_i x~_i^T`` (eq. 23), i.e.
``diag(G_l)_j = mean_i nu_f(z_il) x~_ij^2``; stored as (m, d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rfim_jax._src import solvers
from rfim_jax._src.metrics.base import (
    AbstractMetric,
    Arithmetic,
    ParamLayout,
    Params,
    PerNeuronScales,
)


@struct.dataclass
class DiagonalMetric(PerNeuronScales, AbstractMetric, Arithmetic):
    """A layer RFIM kept as the diagonal of each neuron's block (SPEC §7).

    Attributes:
      scales: (m, d); row l is ``diag(G_l)``, so ``to_dense()`` is ``diag(scales.reshape(-1))``
        (neuron-major, SPEC §2).
      has_bias: whether ``w~_l`` ends with the bias (static).
      layout: the kernel's :class:`ParamLayout`, or None for a 2-D dense kernel (static).
    """

    representation = "diagonal"

    scales: jax.Array
    has_bias: bool = struct.field(pytree_node=False, default=True)
    layout: ParamLayout | None = struct.field(pytree_node=False, default=None)
    _tag: str = struct.field(pytree_node=False, default="diagonal", repr=False)

    def to_dense(self) -> jax.Array:
        return jnp.diag(self.scales.reshape(-1))

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        return cols * self.scales.T

    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        """``V / (S^T + damping)`` for V the (d, m) columns of ``v``; ``method`` is checked,
        not used.  A scale below the smallest normal number (a dead unit's) divides by 1.

        ``damping`` is absolute by default; with ``relative=True`` neuron l gets
        ``damping * mean(s_l)`` (eq. 30's ``tr(G_l)/d``), as in :func:`rfim_jax.rngd`.

        Raises:
          ValueError: for a negative or NaN ``damping`` known now (a number or 0-d array),
            an unknown ``method``, or ``v`` of the wrong shapes.
        """
        solvers.resolve_method(method)
        cols = self._columns(v, "DiagonalMetric.solve")
        scales = self._in_dtype(cols.dtype).damped(damping, relative=relative).scales
        return self._params(cols * solvers.reciprocal_scales(scales).T)

    def diagonal(self) -> jax.Array:
        return self.scales.reshape(-1)


