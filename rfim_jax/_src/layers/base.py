"""What every layer adapter shares: the kind flags and the param layout <-> (d, m) columns.

A concrete adapter is a frozen dataclass with the fields ``path``, ``kind``, ``d_in``, ``m``,
``has_bias`` and a ``layout`` property (a :class:`ParamLayout`, or None for a 2-D kernel), plus
its own ``from_params`` and ``rows``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from rfim_jax._src import activations as act_lib
from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics as metrics_lib


class LayerAdapter:
    """Mixin of the layer adapters (see the module docstring)."""

    path: str
    kind: object
    d_in: int
    m: int
    has_bias: bool

    @property
    def layout(self) -> metrics_lib.ParamLayout | None:
        return None

    @property
    def d(self) -> int:
        """Length of one neuron's vector ``w~_l``: ``d_in + 1`` with a bias."""
        return self.d_in + int(self.has_bias)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.kind, act_lib.Linear)

    @property
    def is_softmax(self) -> bool:
        return isinstance(self.kind, str) and self.kind == "softmax"

    @property
    def num_params(self) -> int:
        return self.d * self.m

    def columns(self, node: Mapping, dtype) -> jax.Array:
        """The node's ``[kernel; bias]`` as (d, m) columns in ``dtype``.

        Raises:
          TypeError: for a complex node.
          ValueError: for shapes that do not match the layer.
        """
        v = {"kernel": node["kernel"]}
        if self.has_bias:
            v["bias"] = node["bias"]
        for leaf in v.values():
            dtypes_lib.reject_complex(jnp.result_type(leaf), f"layer {self.path!r}")
        v = jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), v)
        return metrics_lib.params_to_columns(v, self.has_bias, name=f"layer {self.path!r}",
                                             layout=self.layout)

    def write_columns(self, node: Mapping, cols: jax.Array) -> dict:
        """``node`` with its kernel (and bias) replaced by ``cols``, in the node's dtypes."""
        metrics_lib.check_columns(cols, self.d, self.m, f"layer {self.path!r}")
        out = dict(node)
        for name, val in metrics_lib.columns_to_params(cols, self.has_bias, self.layout).items():
            out[name] = val.astype(node[name].dtype)
        return out
