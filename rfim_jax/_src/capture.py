"""Capture of each layer's inputs and pre-activations (paper Sec. 5, eqs. 31-33; SPEC §8).

RNGD estimates layer l's RFIM from the batch that also gives the gradient: neuron l of a dense
layer needs the layer's inputs ``x`` (for ``x~ = [x, 1]``) and its pre-activations
``z = x @ kernel + bias`` (for ``nu_f(z)``), so that eq. (32) can form

    G_hat_l = mean_i nu_f(z_il) x~_i x~_i^T.

This module records both, from the same forward pass, without rewriting the model.

Format
------
``activations`` has the params pytree's nesting down to each dense layer (the mapping that holds
``"kernel"``); each layer maps to ``{"inputs": (n..., d_in), "preacts": (n..., m)}``::

    params      = {"Dense_0": {"kernel": (784, 64), "bias": (64,)}, "block": {"Dense_0": ...}}
    activations = {"Dense_0": {"inputs": (B, 784), "preacts": (B, 64)}, "block": {"Dense_0": ...}}

A layer's *path* is its keys joined by ``"/"`` (``"Dense_0"``, ``"block/Dense_0"``). Keys that are
not strings (``nnx.List`` indices are ints) are joined as ``str(key)``: the path of
``{"layers": {0: {"kernel": ...}}}`` is ``"layers/0"``. The nested dicts keep the original keys
(the int ``0``), so ``activations`` mirrors ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
Paths are those of ``rfim_jax._src.paths`` (``layer_paths``, ``get_by_path``), which compare
keys by ``str``.

Sources
-------
* flax.linen: :func:`capture_linen`, built on ``nn.intercept_methods``; records ``nn.Dense``,
  ``nn.DenseGeneral`` and ``nn.Conv``, keyed by the module's scope path (which is its key path
  in ``variables["params"]``).
* flax.nnx: :func:`capture_nnx`, which wraps the ``__call__`` of ``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv`` for the duration of the call and keys
  each layer by its graph path (``nnx.iter_modules``).
* plain JAX: :func:`rfim_jax.capture_jax` (``rfim_jax._src.capture_jaxpr``) reads the dense
  layers out of the unmodified function's jaxpr; or build the dict yourself with
  :func:`record` (and :func:`rfim_jax.conv_patches` for a convolution).

Layer types (the format of :mod:`rfim_jax._src.layers.dense`): a multi-axis dense layer's
contracted input axes are moved last and flattened, and its feature axes flattened; a
convolution's inputs are its patches, ``(n, *out_spatial, d_in)`` (``(..., G, d_in)`` with
``feature_group_count`` G > 1).

Both Flax helpers run in Python at trace time only: they add no operations to the compiled
program, and the recorded arrays are the very values the forward pass used, so gradients through
``jax.value_and_grad(..., has_aux=True)`` are unchanged. A dense layer applied more than once in
one pass (a tied or shared layer, a layer in a Python loop) contributes every use: the uses
are stacked as extra rows (SPEC §8). Layers inside lifted transforms of the model
(``nn.scan``/``nn.vmap``/``nn.remat``, ``nnx.scan``/``nnx.vmap``/``nnx.remat``) would be
recorded as tracers of the inner transform and leak; they are not supported.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import tracers

from rfim_jax._src import paths as paths_lib
from rfim_jax._src.layers import conv as conv_lib
from rfim_jax._src.layers.embed import ATTEND_INPUTS, ATTEND_PREACTS

LayerActivations = dict[str, jax.Array]

INPUTS = "inputs"
PREACTS = "preacts"
#: The collection through which rows recorded inside ``nn.scan``/``nn.vmap``/``nn.remat`` leave
#: the transform (add it to the transform's ``variable_axes``).
LIFTED_COLLECTION = "rfim_activations"


# --------------------------------------------------------------------------------------------
# Plain JAX and inspection. Paths are those of rfim_jax._src.paths (keys joined by "/", compared
# by str), so int keys of nnx lists match.


def _set(tree: Mapping | None, parts: Sequence[str], value: Any) -> Any:
    """A copy of nested dict ``tree`` with ``value`` at ``parts``; existing keys match by str."""
    if not parts:
        return value
    node = dict(tree or {})
    key = next((k for k in node if str(k) == parts[0]), parts[0])
    child = node.get(key)
    if len(parts) > 1 and child is not None and not isinstance(child, Mapping):
        raise ValueError(f"cannot record below {parts[0]!r}: it is a {type(child).__name__}.")
    node[key] = _set(child, parts[1:], value)
    return node


def record(
    activations: Mapping | None,
    path: str,
    inputs: jax.Array,
    preacts: jax.Array,
) -> dict:
    """Returns ``activations`` with layer ``path``'s ``{"inputs", "preacts"}`` added (plain JAX).

    Functional, for hand-written models whose params are nested dicts::

        def loss(params, x, y):
            acts = {}
            z0 = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
            acts = rfim_jax.record(acts, "Dense_0", x, z0)
            h = jax.nn.relu(z0)
            z1 = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
            acts = rfim_jax.record(acts, "Dense_1", h, z1)
            return cross_entropy(z1, y), acts

    ``path`` is the layer's params keys joined by "/" (``"block/Dense_0"``); missing levels are
    created as dicts. ``inputs`` is the layer's input ``x``, shape (n..., d_in), and ``preacts``
    is ``z = x @ kernel + bias``, shape (n..., m). For a convolution, ``inputs`` are its
    patches, :func:`rfim_jax.conv_patches` (``(n..., d_in)``, or ``(n..., G, d_in)`` grouped).

    Recording a layer again (a tied layer, a block applied twice) adds the new use's rows as
    extra samples (SPEC §8): both uses are flattened to rows and concatenated.

    Raises:
      ValueError: if the leading (batch) axes of inputs and preacts differ, a repeated use
        has another width, or ``path`` already holds entries that are not a layer's.
    """
    inputs = jnp.asarray(inputs)
    preacts = jnp.asarray(preacts)
    lead = preacts.ndim - 1
    if (preacts.ndim < 1 or inputs.ndim not in (preacts.ndim, preacts.ndim + 1)
            or inputs.shape[:lead] != preacts.shape[:lead]):
        raise ValueError(
            f"record: layer {path!r}: inputs {tuple(inputs.shape)} and preacts "
            f"{tuple(preacts.shape)} must share their leading (batch) axes."
        )
    existing = paths_lib.get_by_path(activations, path) if activations else None
    if isinstance(existing, Mapping) and INPUTS in existing:
        inputs, preacts = _stack_uses(
            [(existing[INPUTS], existing[PREACTS]), (inputs, preacts)], f"record: layer {path!r}"
        )
    elif existing is not None and not (isinstance(existing, Mapping) and not existing):
        raise ValueError(f"record: {path!r} already holds other entries; it cannot be a layer.")
    parts = path.split(paths_lib.SEP) if path else []
    return _set(activations, parts, {INPUTS: inputs, PREACTS: preacts})


def _stack_uses(uses: Sequence[tuple[Any, Any]], where: str) -> tuple[jax.Array, jax.Array]:
    """Several uses of one layer as one batch of rows: (N, *tail) inputs and (N, m) preacts.

    A use's rows are its preacts' leading axes; the inputs keep their trailing feature axes
    (one, or two for grouped patches).
    """
    xs, zs = [], []
    for x, z in uses:
        x, z = jnp.asarray(x), jnp.asarray(z)
        lead = z.ndim - 1
        xs.append(x.reshape((-1,) + x.shape[lead:]))
        zs.append(z.reshape(-1, z.shape[-1]))
    for name, arrays in (("inputs", xs), ("preacts", zs)):
        tails = {a.shape[1:] for a in arrays}
        if len(tails) > 1:
            raise ValueError(
                f"{where}: the uses of this layer have {name} of different widths "
                f"{sorted(tails)}; every use of one layer must have the same shapes per row."
            )
    return jnp.concatenate(xs), jnp.concatenate(zs)


# --------------------------------------------------------------------------------------------
# Recording shared by the Flax helpers.


class _Recorder:
    """Per-call bookkeeping: every use of every layer, keyed by its path."""

    def __init__(self, source: str):
        self.source = source
        self.layers: dict[tuple, list[tuple[jax.Array, jax.Array]]] = {}
        self.attends: dict[tuple, list[tuple[jax.Array, jax.Array]]] = {}
        # Layers with a use that could not be recorded and was skipped: left out whole, as
        # rows from their other uses alone would give a metric of part of the layer's data.
        self.dropped: set[tuple] = set()

    def add(self, keys: tuple, inputs: Any, preacts: Any) -> None:
        self.layers.setdefault(keys, []).append((jnp.asarray(inputs), preacts))

    def add_attend(self, keys: tuple, inputs: Any, logits: Any) -> None:
        """An embedding table used as an output head (``Embed.attend``, tied weights)."""
        self.attends.setdefault(keys, []).append((jnp.asarray(inputs), logits))

    def _stacked(self, keys, uses):
        if len(uses) == 1:
            return uses[0]
        name = paths_lib.display_path(keys)
        return _stack_uses(uses, f"{self.source}: layer {name!r}")

    def tree(self) -> dict:
        out: dict = {}
        for keys, uses in self.layers.items():
            if keys in self.dropped:
                continue
            inputs, preacts = self._stacked(keys, uses)
            acts = {INPUTS: inputs, PREACTS: preacts}
            if keys in self.attends:
                acts[ATTEND_INPUTS], acts[ATTEND_PREACTS] = self._stacked(
                    keys, self.attends[keys])
            if not keys:
                return acts  # the model is itself one layer
            node = out
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = acts
        return out


# --------------------------------------------------------------------------------------------
# What each layer type records, shared by linen and nnx: (inputs, preacts) in the format of
# rfim_jax._src.layers.dense (inputs (n..., d_in) or grouped patches, preacts (n..., m)).


class Unsupported(ValueError):
    """A layer the capture cannot record: raised, or skipped with ``skip_unsupported``."""


def _tuple(value) -> tuple:
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)


def _unsupported(source: str, kind: str, name: str, why: str) -> Unsupported:
    return Unsupported(
        f"{source}: layer {name!r} is {kind}, which RNGD cannot precondition ({why}). Pass "
        f"skip_unsupported=True to leave it out of the activations; its params then pass "
        f"through scale_by_rngd unchanged when not named in `layers` (or give them to another "
        f"optimiser with optax.partition)."
    )


def _contract_last(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """``x`` with ``axes`` moved last, in the given order, and flattened into one."""
    lead = x.ndim - len(axes)
    x = jnp.moveaxis(x, list(axes), list(range(lead, x.ndim)))
    return x.reshape(x.shape[:lead] + (-1,))


def general_rows(inputs, out, axis, n_out: int, batch_axes, source: str, name: str):
    """A multi-axis dense layer's rows (``DenseGeneral``, ``LinearGeneral``).

    Flax's kernel is ``(*inputs.shape[sorted(axis)], *features)``, so the contracted axes go
    last in sorted order and are flattened; the ``n_out`` feature axes of ``out`` are
    flattened into m.
    """
    if batch_axes:
        raise _unsupported(source, "a multi-axis dense layer with batch axes", name,
                           f"batch axes {tuple(batch_axes)} give each batch index its own "
                           f"kernel")
    x = jnp.asarray(inputs)
    x = _contract_last(x, sorted(a % x.ndim for a in _tuple(axis)))
    return x, out.reshape(out.shape[: out.ndim - n_out] + (-1,))


def conv_rows(inputs, out, module, source: str, name: str):
    """A convolution's rows: its patches (:func:`rfim_jax.conv_patches`) and its outputs.

    ``module`` is an ``nn.Conv`` or ``nnx.Conv``; its geometry is read from it.
    """
    dilation = module.input_dilation
    if any(v != 1 for v in _tuple(1 if dilation is None else dilation)):
        raise _unsupported(source, f"a convolution with input_dilation={dilation}", name,
                           "its patches are not windows of the input")
    if getattr(module, "mask", None) is not None:
        raise _unsupported(source, "a masked convolution (mask=...)", name,
                           "its effective kernel is kernel * mask, so the patches times the "
                           "kernel would not give its outputs")
    kernel_size = _tuple(module.kernel_size)
    x = jnp.asarray(inputs)
    if x.ndim == len(kernel_size) + 1:  # Flax adds the batch axis of an unbatched input
        x, out = x[None], out[None]
    groups = module.feature_group_count
    patches = conv_lib.conv_patches(
        x, kernel_size, strides=module.strides, padding=module.padding,
        kernel_dilation=module.kernel_dilation, feature_group_count=groups,
    )
    if groups == 1:
        patches = patches[..., 0, :]
    return patches, out


def einsum_rows(inputs, out, einsum_str: str, has_bias: bool, source: str, name: str):
    """``nnx.Einsum`` or ``nn.Einsum`` rows, where it contracts input axes against a kernel
    (SPEC §8).

    Supported: ``"<inputs>,<kernel>-><outputs>"`` without an ellipsis, where the kernel's
    letters are its contracted letters then its output letters, and the outputs are the
    inputs' other letters (in order) then the kernel's output letters (in order).
    """
    spec = einsum_str.replace(" ", "")
    ins, _, res = spec.partition("->")
    operands = ins.split(",")
    problem = None
    if "." in spec or len(operands) != 2 or not res:
        problem = "it is not of the form '<inputs>,<kernel>-><outputs>' without an ellipsis"
        xs = ks = ""
    else:
        xs, ks = operands
    contracted = [c for c in ks if c in xs and c not in res]
    produced = [c for c in ks if c in res and c not in xs]
    if problem is None:
        if list(ks) != contracted + produced:
            problem = "the kernel's letters must be its contracted ones, then its output ones"
        elif res != "".join(c for c in xs if c not in contracted) + "".join(produced):
            problem = ("the outputs must be the inputs' other letters in their order, then "
                       "the kernel's output letters in its order")
        elif not has_bias and len(produced) > 1:
            problem = ("without a bias a kernel's output axes are read as its last axis only, "
                       "but this one has several")
    if problem:
        raise _unsupported(source, f"an einsum {einsum_str!r}", name, problem)
    x = _contract_last(jnp.asarray(inputs), [xs.index(c) for c in contracted])
    return x, out.reshape(out.shape[: out.ndim - len(produced)] + (-1,))


def norm_rows(inputs, out, module, kind: str, source: str, name: str):
    """A LayerNorm's or RMSNorm's rows: the normalised input ``u`` and the output.

    ``u`` is recomputed from the input with the module's epsilon (SPEC §8: the response is
    ``scale u + bias``); only the last axis may be reduced and scaled.
    """
    ndim = jnp.ndim(inputs)
    for attr in ("reduction_axes", "feature_axes"):
        axes = {a % ndim for a in _tuple(getattr(module, attr))}
        if axes != {ndim - 1}:
            raise _unsupported(source, f"a {kind} with {attr}={getattr(module, attr)}", name,
                               "only the last axis reduced and scaled is supported")
    if getattr(module, "axis_name", None) is not None:
        raise _unsupported(source, f"a {kind} with axis_name={module.axis_name!r}", name,
                           "its statistics span devices")
    x = jnp.asarray(inputs)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if kind == "LayerNorm":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    u = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + module.epsilon)
    return u, out


# --------------------------------------------------------------------------------------------
# flax.linen.


def _linen_rows(module: Any, inputs: Any, out: Any, name: str, einsum_str: str | None = None):
    """(inputs, preacts) of a linen layer, or None for a module that is not a layer.

    ``einsum_str`` is an ``nn.Einsum``'s call-time equation, which overrides its attribute.

    Raises:
      Unsupported: for a layer type or configuration RNGD cannot precondition.
    """
    import flax.linen as nn

    src = "capture_linen"
    if isinstance(module, nn.Dense):
        return inputs, out
    if isinstance(module, nn.DenseGeneral):
        features = _tuple(module.features)
        if not module.use_bias and len(features) > 1:
            raise _unsupported(src, "a DenseGeneral without bias and with several feature axes",
                               name, f"features={module.features}: a bias-free kernel's last "
                               f"axis is read as its only output axis; use use_bias=True")
        batch = _tuple(module.batch_dims) if module.batch_dims != () else ()
        return general_rows(inputs, out, module.axis, len(features), batch, src, name)
    if isinstance(module, nn.Einsum):
        return einsum_rows(inputs, out, einsum_str or module.einsum_str, module.use_bias, src,
                           name)
    if isinstance(module, nn.Conv):
        return conv_rows(inputs, out, module, src, name)
    if isinstance(module, nn.Embed):
        return inputs, out
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        if not module.use_scale:
            return None  # no scale: a bias alone is not a scale-and-shift layer
        return norm_rows(inputs, out, module, type(module).__name__, src, name)
    if isinstance(module, nn.ConvTranspose):
        raise _unsupported(src, "an nn.ConvTranspose", name,
                           "a transposed convolution's kernel is not applied to windows of its "
                           "input")
    if isinstance(module, nn.ConvLocal):
        raise _unsupported(src, "an nn.ConvLocal", name,
                           "a locally connected layer has one kernel per position, not shared "
                           "weights")
    return None


def _linen_module(model: Any) -> Any:
    """The linen Module of ``model``: the module itself, or the owner of a bound ``.apply``.

    Raises:
      TypeError: for anything else, saying what to pass.
    """
    import flax.linen as nn

    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    if isinstance(owner, nn.Module) and getattr(model, "__name__", "") == "apply":
        return owner  # e.g. a TrainState's apply_fn, which is model.apply
    raise TypeError(
        f"capture_linen: model must be a flax.linen Module or its bound `.apply` (such as a "
        f"TrainState's apply_fn), got {type(model).__name__}. Pass the module: "
        f"capture_linen(model, variables, x)."
    )


def capture_linen(
    model: Any,
    variables: Mapping,
    *args: Any,
    method: Callable[..., Any] | str | None = None,
    skip_unsupported: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``model.apply(variables, *args, method=method, **kwargs)``, also returning activations.

    Records, for every layer that RNGD preconditions, its inputs and pre-activations (the
    module's output) during the apply, keyed by the module's scope path, which is its key path
    in ``variables["params"]``: a ``Dense_0`` inside a submodule ``block`` lands at
    ``activations["block"]["Dense_0"]``.

    - ``nn.Dense``: ``{"inputs": x, "preacts": x @ kernel + bias}``.
    - ``nn.DenseGeneral`` (any ``axis`` and ``features``): the contracted axes moved last and
      flattened, inputs (n..., prod(in axes)), preacts (n..., prod(features)).
    - ``nn.Einsum`` (``"<inputs>,<kernel>-><outputs>"``, as for ``nnx.Einsum`` in
      :func:`capture_nnx`): the contracted axes moved last and flattened.
    - ``nn.Conv`` (any number of spatial dimensions, strides, padding, dilation, groups, all
      read from the module): the inputs are the patches, :func:`rfim_jax.conv_patches`,
      ``(n, *out_spatial, d_in)``, or ``(n, *out_spatial, G, d_in)`` for
      ``feature_group_count`` G > 1.  Under ``jit`` the patches of a layer that no optimiser
      reads are dead code and are never computed.  A masked conv (``mask=...``) is
      unsupported.
    - A layer applied several times in one apply (tied weights, a block used twice): every
      use is recorded, stacked as extra rows (SPEC §8).
    - Unsupported, with a ``ValueError`` that names the layer (or left out with
      ``skip_unsupported=True``): ``nn.ConvTranspose``, ``nn.ConvLocal``, a conv with
      ``input_dilation``, a DenseGeneral with ``batch_dims``, or without bias and with several
      feature axes; and a layer called inside a plain JAX transform in the model's code
      (``jax.lax.scan``, ``jax.vmap``, ``jax.checkpoint``: use ``nn.scan``, ``nn.vmap``,
      ``nn.remat``), whose values cannot leave it (skipped, the layer is left out whole).

    - ``nn.Embed``: ``{"inputs": ids, "preacts": embeddings}``, and ``Embed.attend`` (a tied
      output head) as a dense use of the table.
    - ``nn.LayerNorm`` and ``nn.RMSNorm`` with a scale, normalising the last axis:
      ``{"inputs": u, "preacts": output}`` with ``u`` the normalised input (SPEC §8).

    Other modules (BatchNorm, GroupNorm, a norm without a scale, ...) are not recorded.

    The first return value is exactly what ``apply`` returns: with ``mutable=["batch_stats"]``
    it is ``(output, mutated_variables)``, so the call reads
    ``(out, updates), acts = capture_linen(model, variables, x, mutable=["batch_stats"])``.
    Use it inside the loss, under ``jax.jit`` and ``jax.value_and_grad(..., has_aux=True)``::

        def loss_fn(params):
            logits, acts = capture_linen(model, {"params": params}, x)
            return cross_entropy(logits, y), acts

        (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    Recording happens at trace time in Python; the compiled program is unchanged.

    Args:
      model: a ``flax.linen`` Module, or its bound ``.apply`` (a ``TrainState``'s
        ``apply_fn``).
      variables: ``{"params": ...}`` and any other collections.
      *args: the apply's positional arguments.
      method: as in ``Module.apply``.
      skip_unsupported: leave unsupported layers out instead of raising.
      **kwargs: the apply's keyword arguments (``rngs=``, ``mutable=``, ``train=``, ...).

    Returns:
      ``(output, activations)``.

    Raises:
      ValueError: for an unsupported layer, naming it and what to do.
      TypeError: if ``model`` is neither a linen Module nor its bound ``apply``.
    """
    import flax.linen as nn

    model = _linen_module(model)
    recorder = _Recorder("capture_linen")

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "attend" and isinstance(module, nn.Embed):
            out = next_fun(*call_args, **call_kwargs)
            query = call_args[0] if call_args else call_kwargs.get("query")
            if _in_plain_jax_transform(module, outer[0], tuple(module.path), recorder,
                                       skip_unsupported):
                return out
            recorder.add_attend(tuple(module.path), query, out)
            return out
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        keys = tuple(module.path)
        inputs = call_args[0] if call_args else call_kwargs.get("inputs")
        # A subclass whose __call__ wraps super().__call__ (scaling the input or the output)
        # passes here twice for one use; the innermost call is the layer's own product.
        frame = [module, False]
        calls.append(frame)
        try:
            out = next_fun(*call_args, **call_kwargs)
        finally:
            calls.pop()
        if frame[1]:
            return out
        try:
            call_str = call_args[1] if len(call_args) > 1 else call_kwargs.get("einsum_str")
            rows = _linen_rows(module, inputs, out, paths_lib.display_path(keys),
                               call_str)
        except Unsupported:
            if skip_unsupported:
                return out
            raise
        if rows is None or _in_plain_jax_transform(module, outer[0], keys, recorder,
                                                   skip_unsupported):
            return out
        for enclosing in reversed(calls):
            if enclosing[0] is module:
                enclosing[1] = True
                break
        if tracers.current_trace() != outer[0]:
            # Inside a lifted transform (nn.scan, nn.vmap, nn.remat): values of the inner trace
            # must leave through a collection, which the transform stacks along its axis.
            module.sow(LIFTED_COLLECTION, INPUTS, rows[0])
            module.sow(LIFTED_COLLECTION, PREACTS, rows[1])
            lifted.add(keys)
        else:
            recorder.add(keys, *rows)
        return out

    lifted: set[tuple] = set()
    calls: list[list] = []  # the __call__s in progress: [module, an inner call recorded it]
    user_mutable = kwargs.pop("mutable", False)
    if user_mutable is True:
        mutable = True
    else:
        mutable = [*([user_mutable] if isinstance(user_mutable, str) else user_mutable or []),
                   LIFTED_COLLECTION]
    with nn.intercept_methods(interceptor):
        outer = [tracers.current_trace()]
        output, new_vars = model.apply(variables, *args, method=method, mutable=mutable,
                                       **kwargs)
    new_vars = dict(new_vars)
    _add_lifted(recorder, new_vars.pop(LIFTED_COLLECTION, {}), lifted)
    if user_mutable is False:
        return output, recorder.tree()
    return (output, new_vars), recorder.tree()


def _in_plain_jax_transform(module: Any, outer_trace: Any, keys: tuple, recorder: _Recorder,
                            skip_unsupported: bool) -> bool:
    """Whether a linen layer runs inside a plain JAX transform of the model's own code
    (``jax.lax.scan``, ``jax.vmap``, ``jax.checkpoint``, ...), from which its rows cannot
    leave; True means skip it (``skip_unsupported``), and the layer is left out of the
    recorder whole.

    Flax's lifted transforms (``nn.scan``, ``nn.vmap``, ``nn.remat``) give the module a scope
    made under the current trace; a plain transform leaves the scope's trace behind.

    Raises:
      ValueError: naming the layer and the two ways out, unless ``skip_unsupported``.
    """
    current = tracers.current_trace()
    if current == outer_trace or getattr(module.scope, "trace_level", current) == current:
        return False
    if skip_unsupported:
        recorder.dropped.add(keys)
        return True
    raise ValueError(
        f"capture_linen: layer {paths_lib.SEP.join(keys) or '<root>'!r} is called inside a "
        f"plain JAX transform in the model's code (jax.lax.scan, jax.vmap, jax.checkpoint, "
        f"...), whose values cannot leave it to be recorded. Use Flax's lifted version "
        f"(nn.scan, nn.vmap, nn.remat) with {LIFTED_COLLECTION!r} in its variable_axes, or "
        f"record the layer's inputs and outputs with rfim_jax.record and return them from "
        f"the transformed function."
    )


def _add_lifted(recorder: _Recorder, sown: Mapping, lifted: set[tuple]) -> None:
    """Moves the rows sown inside lifted transforms into ``recorder``.

    Raises:
      ValueError: for a layer whose rows the transform dropped (its ``variable_axes`` lack
        the collection), or that was called more than once inside it.
    """
    for keys in sorted(lifted):
        node = sown
        for k in keys:
            node = node.get(k, {}) if isinstance(node, Mapping) else {}
        name = paths_lib.SEP.join(keys)
        if not node or INPUTS not in node:
            raise ValueError(
                f"capture_linen: layer {name!r} runs inside a lifted transform (nn.scan, "
                f"nn.vmap, ...) that dropped its recorded rows. Add the collection "
                f"{LIFTED_COLLECTION!r} to the transform's variable_axes, e.g. "
                f"nn.scan(Block, variable_axes={{'params': 0, {LIFTED_COLLECTION!r}: 0}}, ...): "
                f"the rows then carry the layer axis, as the stacked params do. Or build the "
                f"activations yourself with rfim_jax.record()."
            )
        if len(node[INPUTS]) != 1:
            raise ValueError(
                f"capture_linen: layer {name!r} is called {len(node[INPUTS])} times inside a "
                f"lifted transform; only one use per step is supported there."
            )
        recorder.add(keys, node[INPUTS][0], node[PREACTS][0])


def apply_gradients(state: Any, grads: Any, **extra_args: Any) -> Any:
    """``TrainState.apply_gradients`` that forwards ``extra_args`` to ``tx.update``.

    flax's ``TrainState.apply_gradients(grads=...)`` calls ``tx.update(grads, opt_state,
    params)`` with no extra arguments, so RNGD's ``activations=`` cannot reach it. Use::

        state = rfim_jax.apply_gradients(state, grads, activations=acts)

    It calls ``state.tx.update(grads, state.opt_state, state.params, **extra_args)``, applies
    the updates and returns ``state.replace(step=step + 1, params=..., opt_state=...)``. Like
    flax, gradients holding an fp8 ``_overwrite_with_gradient`` collection update
    ``params["params"]`` through ``tx`` and overwrite that collection directly.
    """
    import optax
    from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT

    owg = isinstance(grads, Mapping) and OVERWRITE_WITH_GRADIENT in grads
    grads_opt = grads["params"] if owg else grads
    params_opt = state.params["params"] if owg else state.params
    updates, new_opt_state = state.tx.update(grads_opt, state.opt_state, params_opt, **extra_args)
    new_params = optax.apply_updates(params_opt, updates)
    if owg:
        new_params = {"params": new_params, OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
    return state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state)


# --------------------------------------------------------------------------------------------
# flax.nnx.

# nnx layers have no hook for their inputs, so the ``__call__`` of each recorded class is
# wrapped while any capture_nnx is running (reference-counted across threads). A wrapper only
# records when the *calling thread* has an active capture, so other threads are unaffected.
_PATCH_LOCK = threading.Lock()
_PATCH: dict[str, Any] = {"depth": 0, "originals": {}, "wrappers": {}}
_ACTIVE = threading.local()


def _nnx_classes() -> tuple[type, ...]:
    from flax import nnx

    return (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose, nnx.Embed,
            nnx.LayerNorm, nnx.RMSNorm)


def _nnx_methods() -> list[tuple[type, str]]:
    """Every (class, method) whose calls capture_nnx records."""
    from flax import nnx

    return [(cls, "__call__") for cls in _nnx_classes()] + [(nnx.Embed, "attend")]


def _active_stack() -> list:
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    return stack


def _wrap(original, method: str):
    def recording_call(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        stack = getattr(_ACTIVE, "stack", None)
        if stack:
            first = args[0] if args else next(iter(kwargs.values()), None)
            stack[-1](self, first, out, method)
        return out

    recording_call.__wrapped__ = original
    recording_call.__doc__ = original.__doc__
    return recording_call


@contextlib.contextmanager
def _nnx_patched() -> Iterator[None]:
    with _PATCH_LOCK:
        if _PATCH["depth"] == 0:
            for cls, method in _nnx_methods():
                original = cls.__dict__[method]
                wrapper = _wrap(original, method)
                _PATCH["originals"][cls, method] = original
                _PATCH["wrappers"][cls, method] = wrapper
                setattr(cls, method, wrapper)
        _PATCH["depth"] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH["depth"] -= 1
            if _PATCH["depth"] == 0:
                for (cls, method), original in _PATCH["originals"].items():
                    # Leave the class alone if someone else re-patched it meanwhile.
                    if cls.__dict__.get(method) is _PATCH["wrappers"][cls, method]:
                        setattr(cls, method, original)
                _PATCH["originals"].clear()
                _PATCH["wrappers"].clear()


def _nnx_rows(module: Any, inputs: Any, out: Any, name: str):
    """(inputs, preacts) of an nnx layer.

    Raises:
      Unsupported: for a layer type or configuration RNGD cannot precondition.
    """
    from flax import nnx

    src = "capture_nnx"
    if isinstance(module, nnx.LoRALinear):
        raise _unsupported(src, "an nnx.LoRALinear", name,
                           "its output adds a low-rank term x A B to x W + b, so the "
                           "kernel's product is not its pre-activation")
    if isinstance(module, nnx.Linear):
        return inputs, out
    if isinstance(module, nnx.LinearGeneral):
        features = _tuple(module.out_features)
        if module.bias is None and len(features) > 1:
            raise _unsupported(src, "a LinearGeneral without bias and with several output axes",
                               name, f"out_features={module.out_features}: a bias-free "
                               f"kernel's last axis is read as its only output axis")
        return general_rows(inputs, out, module.axis, len(features),
                            tuple(module.batch_axis), src, name)
    if isinstance(module, nnx.Einsum):
        return einsum_rows(inputs, out, module.einsum_str, module.bias is not None, src, name)
    if isinstance(module, nnx.Conv):
        return conv_rows(inputs, out, module, src, name)
    if isinstance(module, nnx.Embed):
        return inputs, out
    if isinstance(module, nnx.LayerNorm | nnx.RMSNorm):
        if module.scale is None:
            return None  # no scale: a bias alone is not a scale-and-shift layer
        return norm_rows(inputs, out, module, type(module).__name__, src, name)
    raise _unsupported(src, f"an nnx.{type(module).__name__}", name,
                       "a transposed convolution's kernel is not applied to windows of its "
                       "input")


def capture_nnx(
    model: Any,
    *args: Any,
    method: Callable[..., Any] | str | None = None,
    skip_unsupported: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``model(*args, **kwargs)``, also returning each layer's inputs and pre-activations.

    Records ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` (where it contracts input
    axes against a kernel) and ``nnx.Conv`` (and subclasses that reach their ``__call__``) in
    the format of :func:`capture_linen`: multi-axis inputs flattened, a convolution's inputs
    as its patches, every use of a layer called several times stacked as extra rows.
    ``nnx.ConvTranspose`` and unsupported einsums raise ``ValueError`` naming the layer, or are
    left out with ``skip_unsupported=True``.

    ``method`` calls ``getattr(model, method)(*args, **kwargs)`` for a name, or
    ``method(model, *args, **kwargs)`` for a callable. Each layer is keyed by its graph path,
    which is its key path in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``:
    ``self.layers = nnx.List([...])`` gives ``activations["layers"][0]`` (an int key, path
    ``"layers/0"``), ``self.linear1`` gives ``activations["linear1"]``. A module reachable by
    two paths is keyed, like its params, by the first one in graph order.

    Use it inside the loss, under ``nnx.jit`` and ``nnx.value_and_grad(..., has_aux=True)``::

        def loss_fn(model):
            logits, acts = capture_nnx(model, x)
            return cross_entropy(logits, y), acts

        (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads, activations=acts)  # forwarded to tx.update

    The layers' ``__call__`` are wrapped only while this function runs (at trace time, in
    Python) and restored afterwards; the wrappers record only for the thread running the
    capture, so concurrent threads are safe.

    **Lifted transforms** (``nnx.scan``, ``nnx.vmap``, ``nnx.remat``): a layer called inside
    one records its rows on the module copy the transform runs, as an ``nnx.Intermediate``
    attribute; the transform carries it out with the module's state (stacked along its axis
    for ``nnx.scan``/``nnx.vmap``, so the rows carry the layer axis like the stacked params),
    and it is moved into the activations and deleted before this function returns.  The
    modules must be arguments of the transform (``nnx.scan(f, in_axes=(nnx.Carry, 0))`` with
    ``f(x, block)``), and a layer may be called once per step there.

    Raises:
      TypeError: if ``model`` is not an ``nnx.Module``.
      ValueError: for an unsupported layer, a layer that is not part of ``model``, or, inside
        a lifted transform, a closed-over module, a second call per step or a tied head
        (each naming the layer type and the plain-JAX route).
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"capture_nnx: model must be an nnx.Module, got {type(model).__name__}.")
    classes = _nnx_classes()
    paths = {id(m): tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, classes)}
    recorder = _Recorder("capture_nnx")

    def on_call(module, inputs, out, method):
        keys = paths.get(id(module))
        if tracers.current_trace() != outer[0]:
            _sow_nnx_lifted(module, inputs, out, method, skip_unsupported)
            lifted[0] += 1
            return
        if keys is None:
            raise ValueError(
                f"capture_nnx: an nnx.{type(module).__name__} that is not a submodule of the "
                f"captured model was called; its params are not in the model's state, so it "
                f"cannot be keyed."
            )
        if method == "attend":
            recorder.add_attend(keys, inputs, out)
            return
        try:
            rows = _nnx_rows(module, inputs, out, paths_lib.display_path(keys))
        except Unsupported:
            if skip_unsupported:
                return
            raise
        if rows is not None:
            recorder.add(keys, *rows)

    if method is None:
        fn = model
    elif isinstance(method, str):
        fn = getattr(model, method)
    else:
        fn = lambda *a, **k: method(model, *a, **k)  # noqa: E731

    stack = _active_stack()
    outer = [tracers.current_trace()]
    lifted = [0]
    with _nnx_patched():
        stack.append(on_call)
        try:
            output = fn(*args, **kwargs)
        except Exception as err:
            own = isinstance(err, ValueError) and str(err).startswith("capture_nnx:")
            if not lifted[0] or own:
                raise
            # The rows recorded on a module inside nnx.scan/nnx.vmap change its state; a
            # module the transform broadcasts (in_axes=None) cannot carry that out, and Flax
            # fails with an error about leaves or axis specs that names no layer.
            raise ValueError(
                f"capture_nnx: the model failed after layers inside a lifted transform "
                f"(nnx.scan, nnx.vmap) recorded their rows ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). The usual cause is a module "
                f"broadcast into the transform (in_axes=None: an RNN cell stepped by nnx.scan, "
                f"a per-example nnx.vmap), which cannot carry rows out; skip_unsupported does "
                f"not help there. " + _NNX_PLAIN_ROUTE
            ) from err
        finally:
            stack.pop()
            found = _collect_nnx_lifted(model, recorder)
    if lifted[0] and not found:
        raise ValueError(
            "capture_nnx: layers ran inside a lifted transform (nnx.scan, nnx.vmap, nnx.remat) "
            "but none of the model's modules carried their rows out: the layers were not "
            "passed to the transform as arguments (a closed-over module's state does not "
            "leave it). " + _NNX_PLAIN_ROUTE
        )
    return output, recorder.tree()


_NNX_PLAIN_ROUTE = (
    "Pass the stacked modules to the transform (e.g. nnx.scan(f, in_axes=(nnx.Carry, 0)) "
    "with f(x, block)), or, the plain-JAX route, return each layer's (inputs, outputs) from "
    "the transformed function and pass {path: {'inputs': ..., 'preacts': ...}} (layer axis "
    "first) as the activations."
)


def _sow_nnx_lifted(module: Any, inputs: Any, out: Any, method: str,
                    skip_unsupported: bool) -> None:
    """Records a layer called inside an nnx lifted transform on the module itself.

    The rows are an ``nnx.Intermediate`` attribute (:data:`LIFTED_COLLECTION`) of the module
    copy the transform runs: the transform carries the module's state out, stacked along its
    axis for ``nnx.scan``/``nnx.vmap``, and :func:`_collect_nnx_lifted` moves it into the
    recorder and deletes it.

    Raises:
      ValueError: for a tied head (``attend``) or a second use inside one step, naming the
        layer type; or when the transform does not let the module be written.
    """
    from flax import nnx

    name = f"an nnx.{type(module).__name__} inside a lifted transform"
    if method == "attend":
        raise ValueError(f"capture_nnx: {name} is used as an output head (attend); only "
                         f"lookups and layer calls are recorded there. " + _NNX_PLAIN_ROUTE)
    try:
        rows = _nnx_rows(module, inputs, out, name)
    except Unsupported:
        if skip_unsupported:
            return
        raise
    if rows is None:
        return
    if LIFTED_COLLECTION in vars(module):
        raise ValueError(f"capture_nnx: {name} is called more than once per step; only one "
                         f"use per step is supported there. " + _NNX_PLAIN_ROUTE)
    try:
        setattr(module, LIFTED_COLLECTION, nnx.Intermediate(tuple(rows)))
    except Exception as err:  # noqa: BLE001 - nnx refuses writes it cannot carry out
        raise ValueError(f"capture_nnx: {name} could not record its rows ({err}). "
                         + _NNX_PLAIN_ROUTE) from err


def _collect_nnx_lifted(model: Any, recorder: _Recorder) -> int:
    """Moves the rows :func:`_sow_nnx_lifted` left on ``model``'s modules into ``recorder``
    (keyed by graph path, layer axis first) and deletes them; returns how many."""
    from flax import nnx

    found = 0
    for path, module in nnx.iter_modules(model):
        var = vars(module).get(LIFTED_COLLECTION)
        if var is None:
            continue
        delattr(module, LIFTED_COLLECTION)
        # Variable.get_value() replaced .value in recent flax; both name the same tuple.
        recorder.add(tuple(path), *(var.get_value() if hasattr(var, "get_value") else var.value))
        found += 1
    return found
