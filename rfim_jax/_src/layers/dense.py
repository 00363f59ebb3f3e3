"""The dense layer adapter: any layer ``z = x . kernel + bias`` that contracts input axes.

This one adapter serves every layer type of SPEC §8 whose neurons are the output units of a
kernel:

* ``nn.Dense`` / ``nnx.Linear``: kernel ``(d_in, m)``, bias ``(m,)``;
* multi-axis dense (``nn.DenseGeneral``, ``nnx.LinearGeneral``, ``nnx.Einsum``): kernel
  ``(*in_axes, *out_axes)``, bias ``out_axes``, read as ``(prod(in_axes), prod(out_axes))``;
* convolutions (``nn.Conv``, ``nnx.Conv``): kernel ``(*window, c_in / G, c_out)``, bias
  ``(c_out,)``, a dense layer over the *patches* (:func:`rfim_jax.conv_patches`) with
  ``d_in = prod(window) c_in / G``.

**Input and output axes.**  The bias shape is the output axes: a kernel of rank k with a bias
of rank r has ``k - r`` input axes.  Without a bias the last kernel axis is the only output
axis (Dense, Conv, a single-feature DenseGeneral).  Neuron l's vector is column l of
``kernel.reshape(d_in, m)`` with ``bias.reshape(-1)[l]`` appended (:class:`ParamLayout`).

**Activations.**  ``{"inputs": (n..., d_in) or (n..., *in_axes), "preacts": (n..., m) or
(n..., *out_axes)}``; every leading index is a row.  A grouped convolution's patches are
``(n..., G, d_in)`` (what :func:`rfim_jax.conv_patches` returns): neuron l sees group
``l // (m / G)``.  The capture helpers record this format for every supported layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rfim_jax._src import activations as act_lib
from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src import sharding as sharding_lib
from rfim_jax._src.layers.base import LayerAdapter


def kind_name(kind: Any) -> str:
    """A readable name of a resolved kind ("softmax", "relu", "linear", ...).

    ``Linear(per_neuron=True)`` reads "linear (per neuron)": its state is m blocks, not one.
    """
    if isinstance(kind, act_lib.Linear) and kind.per_neuron:
        return "linear (per neuron)"
    return kind if isinstance(kind, str) else kind.name


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def unpack_layer(node: Mapping, where: str) -> tuple[Any, Any, tuple[int, ...] | None]:
    """(kernel, bias, bias_shape) of a layer node, with the bias checked against the kernel.

    Raises:
      ValueError: naming ``where`` and the shapes, for a missing kernel, a kernel of rank < 2,
        or a bias that is not the kernel's trailing (output) axes.
    """
    if not isinstance(node, Mapping) or "kernel" not in node:
        got = f"keys {sorted(node)}" if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(f"{where}: expected a dict with a 'kernel' entry, got {got}.")
    kernel = node["kernel"]
    if not hasattr(kernel, "shape"):
        kernel = jnp.asarray(kernel)
    shape = _shape(kernel)
    if len(shape) < 2:
        raise ValueError(
            f"{where}: a kernel has at least an input and an output axis, e.g. (d_in, m), "
            f"got shape {shape}."
        )
    bias = node.get("bias")
    if bias is None:
        return kernel, None, None
    if not hasattr(bias, "shape"):
        bias = jnp.asarray(bias)
    bshape = _shape(bias)
    if not bshape or len(bshape) >= len(shape) or shape[len(shape) - len(bshape):] != bshape:
        raise ValueError(
            f"{where}: bias must have shape ({shape[-1]},) to match kernel {shape}, got "
            f"{bshape} (a bias holds the kernel's output axes, a trailing part of its shape)."
        )
    return kernel, bias, bshape


@dataclasses.dataclass(frozen=True)
class DenseLayer(LayerAdapter):
    """Static description of one layer under an optimiser (see the module docstring).

    Attributes:
      path: the layer's path in the params tree ("Dense_1", "block/Conv_0").
      kind: ``"softmax"`` or an :class:`Activation` (``"linear"`` is ``Linear()``).
      d_in: length of one neuron's input (product of the kernel's input axes).
      m: number of neurons (product of the kernel's output axes).
      has_bias: whether the layer has a bias.
      kernel_shape: the kernel's own shape.
      bias_shape: the bias's own shape (the output axes), or None.
    """

    path: str
    kind: Any
    d_in: int
    m: int
    has_bias: bool
    kernel_shape: tuple[int, ...] = ()
    bias_shape: tuple[int, ...] | None = None

    @classmethod
    def from_params(cls, path: str, kind: Any, node: Mapping) -> DenseLayer:
        """Validates a layer node (arrays or ``jax.ShapeDtypeStruct``) and describes it.

        Raises:
          ValueError: naming the layer, for a kernel of rank < 2 or a bias that does not match.
          TypeError: for complex params.
        """
        where = f"layer {path!r}"
        kernel, bias, bias_shape = unpack_layer(node, where)
        for leaf in (kernel, bias):
            if leaf is not None:
                dtypes_lib.reject_complex(leaf.dtype, where)
        shape = _shape(kernel)
        m = math.prod(bias_shape) if bias_shape else shape[-1]
        return cls(path, kind, math.prod(shape) // m, m, bias is not None, shape, bias_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The kernel's output axes."""
        return self.bias_shape or self.kernel_shape[-1:]

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The kernel's input axes."""
        return self.kernel_shape[: len(self.kernel_shape) - len(self.out_shape)]

    @property
    def layout(self) -> metrics_lib.ParamLayout | None:
        if len(self.kernel_shape) <= 2:
            return None
        return metrics_lib.ParamLayout(self.kernel_shape, self.bias_shape)

    # -------------------------------------------------------------- activations
    def _expected(self) -> str:
        inputs = f"(n, {self.d_in})"
        preacts = f"(n, {self.m})"
        if len(self.in_shape) > 1:
            inputs += f" or (n, *{self.in_shape})"
        if len(self.out_shape) > 1:
            preacts += f" or (n, *{self.out_shape})"
        return f"expected activations[{self.path!r}] = {{'inputs': {inputs}, 'preacts': {preacts}}}"

    def _width_error(self, name: str, shape, width: int, label: str) -> ValueError:
        hint = ""
        if name == "inputs" and len(self.kernel_shape) > 2 and len(self.out_shape) == 1:
            hint = (
                f" If this is a convolution (kernel (*window, c_in / groups, c_out) = "
                f"{self.kernel_shape}), its inputs are its patches, (n, *out_spatial, "
                f"{self.d_in}) or (n, *out_spatial, groups, {self.d_in}): capture_linen and "
                f"capture_nnx record them, and rfim_jax.conv_patches(x, window, strides=..., "
                f"padding=..., kernel_dilation=..., feature_group_count=...) builds them."
            )
        lead = self.kernel_shape[0]
        if len(self.kernel_shape) > 2 and len(shape) > 2 and shape[0] == lead:
            what = ("bias-free layers" if not self.has_bias else
                    f"layers (a stack with a bias whose input width equals its length, kernel "
                    f"{self.kernel_shape}, has the shapes of one multi-axis dense layer)")
            hint += (
                f" If the params are a stack of {lead} {what} (nn.scan, nnx.scan, a vmap over "
                f"layers), declare it: stacked_layers=[{self.path!r}]."
            )
        return ValueError(
            f"layer {self.path!r}: {name} have shape {shape}, but the kernel "
            f"{self.kernel_shape} expects width {label}={width}; {self._expected()}.{hint}"
        )

    def rows(self, activations: Any) -> tuple[jax.Array, jax.Array]:
        """This layer's augmented inputs ``x~`` (N, d) and pre-activations (N, m).

        A grouped convolution's rows are ``x~`` (N, G, d) (see the module docstring).

        Raises:
          ValueError: naming the layer, the shapes expected and the shapes got, when the
            activations are missing, have the wrong width, no sample axis, mismatched sample
            counts, or no samples.
        """
        where = f"layer {self.path!r}"
        entry = paths_lib.activation_entry(
            activations, self.path, self._expected(),
            " capture_linen and capture_nnx record the layer types their docstrings list; for "
            "any other dense module, record its inputs and outputs with rfim_jax.record. A "
            "layer the capture refuses (ConvTranspose, ConvLocal) is not a dense layer over "
            "its input's windows and cannot be preconditioned: leave it out of `layers` (name "
            "the layers instead of layers=None) or give it to another optimiser with "
            "optax.partition.")
        x, z = jnp.asarray(entry["inputs"]), jnp.asarray(entry["preacts"])
        for arr in (x, z):
            dtypes_lib.reject_complex(arr.dtype, where)
        for name, arr, width in (("inputs", x, self.d_in), ("preacts", z, self.m)):
            if arr.ndim < 2:
                raise ValueError(
                    f"{where}: {name} have shape {_shape(arr)} with no sample axis; a single "
                    f"example needs one, shape (1, {width}); {self._expected()}."
                )
        x_shape, z_shape = _shape(x), _shape(z)
        # Multi-axis outputs and inputs may come unflattened.
        k = len(self.out_shape)
        if k > 1 and z.ndim > k and z_shape[-k:] == self.out_shape:
            z = z.reshape(z_shape[:-k] + (self.m,))
        k = len(self.in_shape)
        if k > 1 and x.ndim > k and x_shape[-k:] == self.in_shape:
            x = x.reshape(x_shape[:-k] + (self.d_in,))
        if x.shape[-1] != self.d_in:
            raise self._width_error("inputs", x_shape, self.d_in, "d_in")
        if z.shape[-1] != self.m:
            raise self._width_error("preacts", z_shape, self.m, "m")
        groups = 1
        if x.ndim == z.ndim + 1 and x.shape[:-2] == z.shape[:-1]:
            groups = int(x.shape[-2])
            if groups < 1 or self.m % groups:
                raise ValueError(
                    f"{where}: inputs {x_shape} look like grouped patches (n..., groups, d_in) "
                    f"with groups={groups}, which does not divide the m={self.m} outputs."
                )
        # Conv patches carry a group axis (n..., G, d_in), of length 1 when ungrouped.
        x_lead = x.shape[:-2] if x.ndim == z.ndim + 1 else x.shape[:-1]
        z_lead = z.shape[:-1]
        x = x.reshape((-1, groups, self.d_in)) if groups > 1 else rfim_lib.flatten_batch(x)
        z = rfim_lib.flatten_batch(z)
        if x.shape[0] != z.shape[0]:
            raise ValueError(
                f"{where}: inputs have {x.shape[0]} samples but preacts have {z.shape[0]} "
                f"(shapes {x_shape} and {z_shape}); {self._expected()}."
            )
        # Rows pair by position once flattened: leading axes must agree, unless one side
        # comes already flattened to (N, ...).
        if x_lead != z_lead and len(x_lead) > 1 and len(z_lead) > 1:
            raise ValueError(
                f"{where}: inputs and preacts have different leading (sample) axes, "
                f"{tuple(x_lead)} and {tuple(z_lead)} (shapes {x_shape} and {z_shape}); their "
                f"rows would be paired wrongly. {self._expected()}."
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"{where}: the batch is empty (inputs {x_shape}, preacts {z_shape})."
            )
        dtype = rfim_lib.stats_dtype(x, z)
        x = sharding_lib.replicate_last_axis(x.astype(dtype))
        return rfim_lib.augment(x, self.has_bias), z.astype(dtype)

    def check_rows(self, x_aug: jax.Array, representation: str) -> None:
        """Refuses grouped rows (a grouped convolution) where the state cannot hold them.

        Raises:
          ValueError: naming the layer, for grouped rows with the ``"eigen"`` representation
            (one input basis per layer), the shared ``"linear"`` kind (one block; use
            ``Linear(per_neuron=True)``) or
            ``"softmax"`` (channels of different groups coupled).
        """
        if x_aug.ndim != 3:
            return
        groups, d = x_aug.shape[1], x_aug.shape[-1]
        where = (f"layer {self.path!r}: a grouped convolution (groups={groups}, patches "
                 f"{tuple(x_aug.shape)}) gives each group of output channels its own inputs")
        if self.is_linear:
            raise ValueError(
                f"{where}, but the 'linear' kind keeps one block shared by all neurons (the "
                f"default kind of layers=None). Give the layer "
                f"rfim_jax.Linear(per_neuron=True): the same metric, one block per output "
                f"channel (each its group's, d={d}), in the exact or diagonal representation."
            )
        if representation == "eigen":
            # The kind is fine here; the representation is what cannot hold the groups.  It
            # is often "auto"'s choice, made at init from the params, which do not show G.
            raise ValueError(
                f"{where}, but its state is in the eigen representation (asked for, or "
                f"\"auto\"'s choice for a layer whose exact state exceeds "
                f"exact_budget_bytes; init sees only the params, which do not show the "
                f"groups), which keeps one input basis per layer. Pass "
                f"representation={{{self.path!r}: 'exact'}} "
                f"(grouped blocks are small, d={d}) or 'diagonal' for this layer."
            )
        if self.is_softmax:
            raise ValueError(
                f"{where}, but 'softmax' couples channels that see different inputs. Give "
                f"the layer an activation kind (or rfim_jax.Linear(per_neuron=True)), in the "
                f"exact (grouped blocks are small, d={d}) or diagonal representation."
            )
