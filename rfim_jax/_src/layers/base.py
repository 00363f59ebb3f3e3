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
from rfim_jax._src import statistics as stats_lib


class LayerAdapter:
    """Mixin of the layer adapters (see the module docstring)."""

    path: str
    kind: object
    d_in: int
    m: int
    has_bias: bool

    #: The representations this layer type supports (SPEC §7); see :meth:`choose`.
    representations: tuple[str, ...] = ("exact", "eigen", "diagonal")

    @property
    def layout(self) -> metrics_lib.ParamLayout | None:
        return None

    @property
    def weights_key(self) -> str:
        """The params entry holding the weights ("kernel", "scale", "embedding")."""
        return self.layout.kernel_key if self.layout is not None else "kernel"

    def choose(self, requested: str, bytes_by_rep: Mapping[str, int], budget: int) -> str:
        """The representation for ``requested`` ("auto" or a name) on this layer type.

        ``"auto"``: exact while its state fits ``budget`` bytes, else eigen.  A layer type
        with one representation (an embedding, whose exact metric is diagonal) always takes it.

        Raises:
          ValueError: for a representation this layer type cannot hold, naming the layer.
        """
        if len(self.representations) == 1:
            return self.representations[0]
        if requested == "auto":
            rep = "exact" if bytes_by_rep["exact"] <= budget else "eigen"
            return rep if rep in self.representations else self.representations[0]
        if requested not in self.representations:
            raise ValueError(
                f"layer {self.path!r} ({type(self).__name__}) supports the representations "
                f"{self.representations}, got {requested!r}."
            )
        return requested

    @property
    def d(self) -> int:
        """Length of one neuron's vector ``w~_l``: ``d_in + 1`` with a bias."""
        return self.d_in + int(self.has_bias)

    @property
    def is_linear(self) -> bool:
        return act_lib.is_shared_linear(self.kind)

    @property
    def is_softmax(self) -> bool:
        return isinstance(self.kind, str) and self.kind == "softmax"

    def unit_weights(self, z: jax.Array) -> jax.Array:
        """Per-sample, per-neuron Fisher coefficients (N, m) for the eigen and diagonal forms.

        An activation's ``nu(z)``; unit-wise ``eta (1 - eta)`` for softmax; and a single column
        of ``1/sigma^2`` for the linear kind, whose rows are all equal (SPEC §7).
        """
        if self.is_softmax:
            return stats_lib.softmax_unit_coefficients(z)
        if self.is_linear:
            return jnp.full((z.shape[0], 1), 1.0 / self.kind.sigma**2, z.dtype)
        return self.kind.nu(z)

    @property
    def num_params(self) -> int:
        return self.d * self.m

    def columns(self, node: Mapping, dtype) -> jax.Array:
        """The node's ``[kernel; bias]`` as (d, m) columns in ``dtype``.

        Raises:
          TypeError: for a complex node.
          ValueError: for shapes that do not match the layer.
        """
        key = self.weights_key
        v = {key: node[key]}
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
