"""The dense layer adapter: ``{"kernel": (d_in, m), "bias": (m,)}``, ``z = x @ kernel + bias``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src import sharding as sharding_lib
from rfim_jax._src.layers.base import LayerAdapter


def kind_name(kind: Any) -> str:
    """A readable name of a resolved kind ("softmax", "relu", "linear", ...)."""
    return kind if isinstance(kind, str) else kind.name


@dataclasses.dataclass(frozen=True)
class DenseLayer(LayerAdapter):
    """Static description of one dense layer under an optimiser.

    Attributes:
      path: the layer's path in the params tree ("Dense_1", "block/Dense_0").
      kind: ``"softmax"`` or an :class:`Activation` (``"linear"`` is ``Linear()``).
      d_in: input width.
      m: number of neurons (output width).
      has_bias: whether the layer has a bias.
    """

    path: str
    kind: Any
    d_in: int
    m: int
    has_bias: bool

    @classmethod
    def from_params(cls, path: str, kind: Any, node: Mapping) -> DenseLayer:
        """Validates a dense node (arrays or ``jax.ShapeDtypeStruct``) and describes it."""
        kernel, bias = metrics_lib.unpack_dense(node, f"layer {path!r}")
        for leaf in (kernel, bias):
            if leaf is not None:
                dtypes_lib.reject_complex(leaf.dtype, f"layer {path!r}")
        return cls(path, kind, int(kernel.shape[0]), int(kernel.shape[1]), bias is not None)

    # -------------------------------------------------------------- activations
    def rows(self, activations: Any) -> tuple[jax.Array, jax.Array]:
        """This layer's augmented inputs ``x~`` (N, d) and pre-activations (N, m).

        Raises:
          ValueError: naming the layer, the shapes expected and the shapes got, when the
            activations are missing, have the wrong width, no sample axis, mismatched sample
            counts, or no samples.
        """
        expected = (
            f"expected activations[{self.path!r}] = {{'inputs': (n, {self.d_in}), "
            f"'preacts': (n, {self.m})}}"
        )
        entry = None if activations is None else paths_lib.get_by_path(activations, self.path)
        if not isinstance(entry, Mapping) or "inputs" not in entry or "preacts" not in entry:
            raise ValueError(f"layer {self.path!r}: no activations passed; {expected}.")
        x, z = jnp.asarray(entry["inputs"]), jnp.asarray(entry["preacts"])
        for arr in (x, z):
            dtypes_lib.reject_complex(arr.dtype, f"layer {self.path!r}")
        for name, arr, width, label in (("inputs", x, self.d_in, "d_in"),
                                        ("preacts", z, self.m, "m")):
            if arr.ndim < 2:
                raise ValueError(
                    f"layer {self.path!r}: {name} have shape {tuple(arr.shape)} with no sample "
                    f"axis; a single example needs one, shape (1, {width}); {expected}."
                )
            if arr.shape[-1] != width:
                raise ValueError(
                    f"layer {self.path!r}: {name} have shape {tuple(arr.shape)}, but the kernel "
                    f"({self.d_in}, {self.m}) expects width {label}={width}; {expected}."
                )
        x = rfim_lib.flatten_batch(x)
        z = rfim_lib.flatten_batch(z)
        if x.shape[0] != z.shape[0]:
            raise ValueError(
                f"layer {self.path!r}: inputs have {x.shape[0]} samples but preacts have "
                f"{z.shape[0]} (shapes {tuple(entry['inputs'].shape)} and "
                f"{tuple(entry['preacts'].shape)})."
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"layer {self.path!r}: the batch is empty (inputs {tuple(x.shape)}, preacts "
                f"{tuple(z.shape)})."
            )
        dtype = rfim_lib.stats_dtype(x, z)
        x = sharding_lib.replicate_last_axis(x.astype(dtype))
        return rfim_lib.augment(x, self.has_bias), z.astype(dtype)
