"""Capture of each dense layer's inputs and pre-activations (paper Sec. 5, eqs. 31-33).

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
* flax.linen: :func:`capture_linen`, built on ``nn.intercept_methods``; records ``nn.Dense`` and
  single-output-axis ``nn.DenseGeneral``, keyed by the module's scope path (which is its key path
  in ``variables["params"]``).
* flax.nnx: :func:`capture_nnx`, which wraps ``nnx.Linear.__call__`` for the duration of the call
  and keys each layer by its graph path (``nnx.iter_modules``).
* plain JAX: build the dict yourself with :func:`record`.

Both Flax helpers run in Python at trace time only: they add no operations to the compiled
program, and the recorded arrays are the very values the forward pass used, so gradients through
``jax.value_and_grad(..., has_aux=True)`` are unchanged. A dense layer applied more than once in
one pass (a tied or shared layer, a layer in a Python loop) has no single (inputs, preacts) pair
and raises ``ValueError`` naming its path. Dense layers inside lifted transforms of the model
(``nn.scan``/``nn.vmap``/``nn.remat``, ``nnx.scan``/``nnx.vmap``/``nnx.remat``) would be recorded
as tracers of the inner transform and leak; they are not supported.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rfim_jax._src import paths as paths_lib

LayerActivations = dict[str, jax.Array]

INPUTS = "inputs"
PREACTS = "preacts"


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
    """Returns ``activations`` with layer ``path`` set to ``{"inputs", "preacts"}`` (plain JAX).

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
    is ``z = x @ kernel + bias``, shape (n..., m). Raises ``ValueError`` if the layer is already
    recorded or the leading (batch) axes differ.
    """
    inputs = jnp.asarray(inputs)
    preacts = jnp.asarray(preacts)
    if inputs.ndim < 1 or preacts.ndim < 1 or inputs.shape[:-1] != preacts.shape[:-1]:
        raise ValueError(
            f"record: layer {path!r}: inputs {tuple(inputs.shape)} and preacts "
            f"{tuple(preacts.shape)} must share their leading (batch) axes."
        )
    existing = paths_lib.get_by_path(activations, path) if activations else None
    if isinstance(existing, Mapping) and INPUTS in existing:
        raise ValueError(f"record: layer {path!r} is already recorded.")
    if existing is not None and not (isinstance(existing, Mapping) and not existing):
        raise ValueError(f"record: {path!r} already holds other entries; it cannot be a layer.")
    parts = path.split(paths_lib.SEP) if path else []
    return _set(activations, parts, {INPUTS: inputs, PREACTS: preacts})


def activation_paths(activations: Any) -> list[str]:
    """Paths of the layers recorded in ``activations`` (mappings holding ``"inputs"``).

    Compare with ``layer_paths(params)`` to see which dense layers a capture found.
    """
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, Mapping):
            return
        if INPUTS in node:
            out.append(prefix)
            return
        for k in node:
            walk(node[k], f"{prefix}{paths_lib.SEP}{k}" if prefix else str(k))

    walk(activations, "")
    return out


# --------------------------------------------------------------------------------------------
# Recording shared by the Flax helpers.


class _Recorder:
    """Per-call bookkeeping: one (inputs, preacts) pair per layer path."""

    def __init__(self, source: str):
        self.source = source
        self.layers: dict[tuple, LayerActivations] = {}

    def add(self, keys: tuple, inputs: Any, preacts: Any) -> None:
        if keys in self.layers:
            name = paths_lib.SEP.join(map(str, keys)) or "<root>"
            raise ValueError(
                f"{self.source}: dense layer {name!r} was called more than once in one forward "
                "pass (a shared or tied layer, or a layer applied in a loop), so its inputs and "
                "pre-activations are ambiguous. Give each use its own layer, or build the "
                "activations yourself with rfim_jax.record()."
            )
        self.layers[keys] = {INPUTS: jnp.asarray(inputs), PREACTS: preacts}

    def tree(self) -> dict:
        out: dict = {}
        for keys, acts in self.layers.items():
            if not keys:
                return dict(acts)  # the model is itself one dense layer
            node = out
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = acts
        return out


# --------------------------------------------------------------------------------------------
# flax.linen.


def _dense_general_error(module: Any, name: str, ndim: int) -> str | None:
    """None if this DenseGeneral has a (d_in, m) kernel, else why not."""
    features = module.features
    features = tuple(features) if isinstance(features, Sequence) else (features,)
    axis = module.axis
    axis = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    batch_dims = (
        tuple(module.batch_dims)
        if isinstance(module.batch_dims, Sequence)
        else (module.batch_dims,)
    )
    if len(features) == 1 and axis in ((-1,), (ndim - 1,)) and batch_dims == ():
        return None
    return (
        f"capture_linen: DenseGeneral layer {name!r} has features={module.features}, "
        f"axis={module.axis}, batch_dims={module.batch_dims}; only a single output axis "
        "contracted over the last input axis (kernel (d_in, m)) is supported. Use nn.Dense, or "
        "pass skip_unsupported=True to leave this layer out of the activations."
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

    Records the inputs and outputs of every ``nn.Dense`` (and subclass) called during the
    apply; a Dense's output is its pre-activation ``z = x @ kernel + bias``. Each layer is keyed
    by its scope path, which is its key path in ``variables["params"]``: a ``Dense_0`` inside a
    submodule ``block`` lands at ``activations["block"]["Dense_0"]``. Non-dense modules
    (LayerNorm, BatchNorm, Conv, ...) are not recorded.

    ``nn.DenseGeneral`` is recorded when its kernel is (d_in, m): a single output feature axis,
    ``axis=-1`` and no ``batch_dims``. Other DenseGenerals (e.g. attention projections with
    ``features=(heads, head_dim)``) raise ``ValueError`` naming the layer, or are left out with
    ``skip_unsupported=True``.

    Every other keyword goes to ``model.apply`` (``rngs=``, ``mutable=``, ``train=``, ...).
    The first return value is exactly what ``apply`` returns: with ``mutable=["batch_stats"]``
    it is ``(output, mutated_variables)``, so the call reads
    ``(out, updates), acts = capture_linen(model, variables, x, mutable=["batch_stats"])``.

    Use it inside the loss, under ``jax.jit`` and ``jax.value_and_grad(..., has_aux=True)``::

        def loss_fn(params):
            logits, acts = capture_linen(model, {"params": params}, x)
            return cross_entropy(logits, y), acts

        (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    Recording happens at trace time in Python; the compiled program is unchanged. Raises
    ``ValueError`` naming the layer path if a dense layer is called twice in one apply.
    """
    import flax.linen as nn

    recorder = _Recorder("capture_linen")

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
            return next_fun(*call_args, **call_kwargs)
        keys = tuple(module.path)
        inputs = call_args[0] if call_args else call_kwargs["inputs"]
        if isinstance(module, nn.DenseGeneral):
            name = paths_lib.SEP.join(keys) or "<root>"
            error = _dense_general_error(module, name, jnp.ndim(inputs))
            if error is not None:
                if skip_unsupported:
                    return next_fun(*call_args, **call_kwargs)
                raise ValueError(error)
        out = next_fun(*call_args, **call_kwargs)
        recorder.add(keys, inputs, out)
        return out

    with nn.intercept_methods(interceptor):
        output = model.apply(variables, *args, method=method, **kwargs)
    return output, recorder.tree()


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

# nnx.Linear has no hook for its inputs, so its ``__call__`` is wrapped while any capture_nnx is
# running (reference-counted across threads). The wrapper only records when the *calling thread*
# has an active capture, so other threads calling nnx.Linear meanwhile are unaffected.
_PATCH_LOCK = threading.Lock()
_PATCH = {"depth": 0, "original": None, "wrapper": None}
_ACTIVE = threading.local()


def _active_stack() -> list:
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    return stack


@contextlib.contextmanager
def _linear_patched() -> Iterator[None]:
    from flax import nnx

    with _PATCH_LOCK:
        if _PATCH["depth"] == 0:
            original = nnx.Linear.__dict__["__call__"]

            def recording_call(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                stack = getattr(_ACTIVE, "stack", None)
                if stack:
                    stack[-1](self, args[0] if args else kwargs["inputs"], out)
                return out

            recording_call.__wrapped__ = original
            recording_call.__doc__ = original.__doc__
            _PATCH.update(original=original, wrapper=recording_call)
            nnx.Linear.__call__ = recording_call
        _PATCH["depth"] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH["depth"] -= 1
            if _PATCH["depth"] == 0:
                # Leave the class alone if someone else re-patched it meanwhile.
                if nnx.Linear.__dict__.get("__call__") is _PATCH["wrapper"]:
                    nnx.Linear.__call__ = _PATCH["original"]
                _PATCH.update(original=None, wrapper=None)


def capture_nnx(
    model: Any,
    *args: Any,
    method: Callable[..., Any] | str | None = None,
    **kwargs: Any,
) -> tuple[Any, dict]:
    """``model(*args, **kwargs)``, also returning each ``nnx.Linear``'s inputs and pre-activations.

    ``method`` calls ``getattr(model, method)(*args, **kwargs)`` for a name, or
    ``method(model, *args, **kwargs)`` for a callable. Each ``nnx.Linear`` (and subclasses that
    reach ``nnx.Linear.__call__``) is keyed by its graph path, which is its key path in
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``: ``self.layers = nnx.List([...])`` gives
    ``activations["layers"][0]`` (an int key, path ``"layers/0"``), ``self.linear1`` gives
    ``activations["linear1"]``. A module reachable by two paths is keyed, like its params, by the
    first one in graph order.

    Use it inside the loss, under ``nnx.jit`` and ``nnx.value_and_grad(..., has_aux=True)``::

        def loss_fn(model):
            logits, acts = capture_nnx(model, x)
            return cross_entropy(logits, y), acts

        (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads, activations=acts)  # forwarded to tx.update

    ``nnx.Linear.__call__`` is wrapped only while this function runs (at trace time, in Python)
    and restored afterwards; the wrapper records only for the thread running the capture, so
    concurrent threads are safe. Raises ``ValueError`` naming the layer path when a Linear is
    called twice, or when a Linear that is not part of ``model`` is called.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"capture_nnx: model must be an nnx.Module, got {type(model).__name__}.")
    paths = {id(m): tuple(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}
    recorder = _Recorder("capture_nnx")

    def on_call(module, inputs, out):
        keys = paths.get(id(module))
        if keys is None:
            raise ValueError(
                "capture_nnx: an nnx.Linear that is not a submodule of the captured model was "
                f"called (in_features={module.in_features}, out_features={module.out_features}); "
                "its params are not in the model's state, so it cannot be keyed."
            )
        recorder.add(keys, inputs, out)

    if method is None:
        fn = model
    elif isinstance(method, str):
        fn = getattr(model, method)
    else:
        fn = lambda *a, **k: method(model, *a, **k)  # noqa: E731

    stack = _active_stack()
    with _linear_patched():
        stack.append(on_call)
        try:
            output = fn(*args, **kwargs)
        finally:
            stack.pop()
    return output, recorder.tree()
