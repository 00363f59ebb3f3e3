"""Stacked layers (SPEC §8): params with a leading layer axis, as ``nn.scan``/``nnx.scan`` or a
``vmap`` over layers produce.  Slice k is an independent layer with its own metric.

A stack is recognised by its bias: a kernel ``(L, *in, *out)`` with a bias ``(L, *out)`` (a
bias that is not the kernel's trailing axes, but is once the leading axis is dropped); a
LayerNorm's ``scale``/``bias`` of shape ``(L, D)``.  A bias-free stacked kernel cannot be told
from a multi-axis one by its shapes, so it is read as multi-axis unless the caller declares it
(``stacked_layers=[path]``); a declared node is sliced along its leading axis whatever its bias.

Activations carry the layer axis first: ``{"inputs": (L, n..., d_in), "preacts": (L, n...,
m)}`` (what ``sow`` inside ``nn.scan`` with ``variable_axes={..: 0}`` produces).  The
optimiser's state carries it too: every estimator step runs under ``jax.vmap`` over the slices
(:mod:`rfim_jax._src.estimators.stacked`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from rfim_jax._src import paths as paths_lib
from rfim_jax._src.layers.base import LayerAdapter


def unstacked(node: Mapping, declared: bool = False, path: str = "") -> Mapping | None:
    """Slice 0 of a stacked layer node (its shapes define one layer), or None if not stacked.

    Args:
      node: the layer's params (arrays or ``jax.ShapeDtypeStruct`` leaves).
      declared: the caller declared the layer a stack (``stacked_layers``): slice it along its
        leading axis whatever its bias says.
      path: the layer's path, for errors.

    Raises:
      ValueError: for a declared stack whose entries lack a common leading axis, naming the
        layer and the shapes.
    """
    if declared:
        shapes = {k: tuple(v.shape) for k, v in node.items()}
        lead = {sh[0] if sh else None for sh in shapes.values()}
        key = paths_lib.layer_key(node)
        min_rank = 2 if key == "scale" else 3
        if len(lead) != 1 or None in lead or len(shapes[key]) < min_rank:
            raise ValueError(
                f"layer {path!r} is declared in stacked_layers, so every entry needs the same "
                f"leading layer axis L and the {key!r} rank >= {min_rank} ((L, d_in, m) for a "
                f"kernel, (L, D) for a scale); got shapes {shapes}."
            )
        return {k: jax.ShapeDtypeStruct(tuple(v.shape[1:]), v.dtype) for k, v in node.items()}
    key = paths_lib.layer_key(node)
    if key is None or "bias" not in node or key == "embedding":
        return None
    weights, bias = node[key], node["bias"]
    w, b = tuple(weights.shape), tuple(bias.shape)
    if len(w) < 2 or len(b) < 2 or w[0] != b[0]:
        return None
    trailing = w[len(w) - len(b):] == b
    if key == "scale":
        stacked = len(w) == 2 and w == b
    else:
        stacked = not trailing and w[len(w) - len(b) + 1:] == b[1:]
    if not stacked:
        return None
    return {k: jax.ShapeDtypeStruct(tuple(v.shape[1:]), v.dtype) for k, v in node.items()}


@dataclasses.dataclass(frozen=True)
class StackedLayer(LayerAdapter):
    """L independent copies of ``inner`` along a leading axis (see the module docstring)."""

    inner: Any
    num: int

    # The per-slice description is the inner layer's.
    path = property(lambda self: self.inner.path)
    kind = property(lambda self: self.inner.kind)
    d_in = property(lambda self: self.inner.d_in)
    m = property(lambda self: self.inner.m)
    has_bias = property(lambda self: self.inner.has_bias)
    layout = property(lambda self: self.inner.layout)
    is_linear = property(lambda self: self.inner.is_linear)
    representations = property(lambda self: self.inner.representations)

    @property
    def num_params(self) -> int:
        return self.num * self.inner.num_params

    def choose(self, requested, bytes_by_rep, budget):
        return self.inner.choose(requested, bytes_by_rep, budget)

    def unit_weights(self, z):
        return self.inner.unit_weights(z)

    def columns(self, node: Mapping, dtype) -> jax.Array:
        """(L, d, m) columns, slice by slice."""
        return jax.vmap(lambda n: self.inner.columns(n, dtype))(dict(node))

    def write_columns(self, node: Mapping, cols: jax.Array) -> dict:
        out = dict(node)
        keys = [self.weights_key] + (["bias"] if self.has_bias else [])
        new = jax.vmap(lambda n, c: self.inner.write_columns(n, c))(
            {k: node[k] for k in keys}, cols)
        out.update({k: new[k] for k in keys})
        return out

    def rows(self, activations: Any) -> tuple[jax.Array, jax.Array]:
        """Each slice's rows, stacked: (L, N, d) (or (L, N, G, d)) and (L, N, m).

        Raises:
          ValueError: naming the layer, when the activations lack the leading layer axis of
            length L, or a slice's rows do not fit (the inner layer's errors).
        """
        where = f"layer {self.path!r}"
        entry = paths_lib.activation_entry(
            activations, self.path,
            f"a stack of {self.num} layers expects {{'inputs': ({self.num}, n..., "
            f"{self.d_in}), 'preacts': ({self.num}, n..., {self.m})}}")
        x, z = entry["inputs"], entry["preacts"]
        for name, arr in (("inputs", x), ("preacts", z)):
            if not arr.shape or arr.shape[0] != self.num:
                raise ValueError(
                    f"{where}: {name} have shape {tuple(arr.shape)}, but the layer is a stack of "
                    f"{self.num} (its params have a leading axis of {self.num}), so they need "
                    f"that leading layer axis: ({self.num}, n..., width)."
                )
        flat = {self.path: None}

        def one(xk, zk):
            flat[self.path] = {"inputs": xk, "preacts": zk}
            return self.inner.rows(flat)

        return jax.vmap(one)(x, z)

    def check_rows(self, x_aug: jax.Array, representation: str) -> None:
        self.inner.check_rows(x_aug[0], representation)
