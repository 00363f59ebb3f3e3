"""Which representation each layer gets, and what its state costs, before anything is allocated.

:func:`rngd_plan` resolves ``layers`` against the params (arrays or ``jax.ShapeDtypeStruct``),
picks each layer's representation (``"auto"``: exact while the exact state fits
``exact_budget_bytes``, else eigen) and reports the state bytes of every layer.
:func:`scale_by_rngd` uses the same plan, so what the plan says is what ``init`` allocates.

State bytes per layer (stats and factors together; b bytes per number, d = d_in + 1 with a
bias, m neurons):

=============  ===========================  ==========================  ==============
kind           exact                        eigen                       diagonal
=============  ===========================  ==========================  ==============
activation     ``2 m d^2 b``                ``(2 d^2 + m d) b``         ``m d b``
linear         ``2 d^2 b``                  ``(2 d^2 + d) b``           ``d b``
softmax        ``2 (m d)^2 b``              ``(2 d^2 + m d) b``         ``m d b``
=============  ===========================  ==========================  ==============
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rfim_jax._src import arguments
from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src.estimators import ESTIMATORS, for_layer
from rfim_jax._src.layers import DenseLayer, EmbedLayer, ScaleShiftLayer
from rfim_jax._src.layers import stacked as stacked_lib
from rfim_jax._src.layers.dense import kind_name
from rfim_jax._src.layers.stacked import StackedLayer

#: ``exact_budget_bytes`` default of ``representation="auto"``: 256 MiB of exact state per layer
#: keeps the paper's MLP (and any layer up to about m = d = 256) exact.
DEFAULT_EXACT_BUDGET = 256 * 2**20

Representation = str | Mapping[str, str]


class LayerPlan(NamedTuple):
    """One layer's plan.

    Attributes:
      path: the layer's path.
      kind: the kind's name ("relu", "linear", "linear (per neuron)", "softmax", ...).
      representation: "exact", "eigen" or "diagonal".
      state_bytes: bytes of the layer's RNGD state (stats and factors).
      exact_bytes: what the exact representation would need.
      params_bytes: bytes of the layer's kernel and bias.
      shape: (d, m): the length of one neuron's vector and the number of neurons (of one
        slice, for a stacked layer).
      bytes_by_representation: state bytes under each representation.
      stack: the number of slices of a stacked layer (its leading layer axis), 1 otherwise;
        the bytes count every slice.
    """

    path: str
    kind: str
    representation: str
    state_bytes: int
    exact_bytes: int
    params_bytes: int
    shape: tuple[int, int]
    bytes_by_representation: dict[str, int]
    stack: int = 1


def storage_dtype(kernel, state_dtype=None) -> jnp.dtype:
    """The dtype a layer's state is stored in: ``state_dtype``, else the kernel's dtype promoted
    to at least float32."""
    return jnp.dtype(state_dtype or dtypes_lib.at_least_float32(kernel.dtype))


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def resolve_layers(layers, default_kind, params, stacked_layers=(), tree_name="params") -> list:
    """Checks ``layers`` against the params tree and returns the layer adapters.

    ``stacked_layers`` lists the paths whose params carry a leading layer axis that their
    shapes alone do not reveal (bias-free stacks, see :mod:`rfim_jax._src.layers.stacked`).
    ``tree_name`` names ``params`` in the errors (the update checks the grads).

    Raises:
      TypeError: if ``layers`` is neither None nor a mapping, or ``stacked_layers`` is a
        string.
      ValueError: for an unknown kind, a path that is not a layer (a kernel of rank < 2 is
        named with its shape), kind ``"softmax"`` on a layer with one output, a masked
        layer, ``layers=None`` with no layer to precondition, or a ``stacked_layers`` path
        that is not among the layers or has no common leading axis.
    """
    declared = check_stacked_layers(stacked_layers)
    # optax.partition / optax.masked hand this transform MaskedNode leaves for the layers that
    # belong to another transform; those are not ours to precondition.
    available = [
        p for p in paths_lib.layer_paths(params)
        if not isinstance(paths_lib.get_by_path(params, p)["kernel"], optax.MaskedNode)
    ]
    _refuse_bias_without_kernel(params, layers)
    if layers is None:
        if not available:
            raise paths_lib.no_layers_error(params)
        layers = {p: default_kind for p in available}
    _check_layers_type(layers)
    unknown = sorted(declared - set(layers))
    if unknown:
        raise ValueError(
            f"stacked_layers names paths that are not among the layers: {unknown}; "
            f"layers: {list(layers)}."
        )
    out = []
    for path, kind in layers.items():
        if kind is not None:
            kind = rfim_lib.resolve_kind(kind, where=f"layer {path!r}", pass_through=True)
        node = paths_lib.get_by_path(params, path)
        if _masked_at_or_above(params, path) or (
                paths_lib.is_layer(node)
                and isinstance(node[paths_lib.layer_key(node)], optax.MaskedNode)):
            if kind is None:
                continue
            raise ValueError(
                f"layer {path!r} is masked out of this transform (optax.partition or "
                f"optax.masked gives its params to another one); remove it from `layers`. "
                f"Layers this transform sees: {available}."
            )
        if node is None or not paths_lib.is_layer(node):
            paths_lib.check_kernel_rank(path, node)
            raise ValueError(
                f"layer {path!r} is not a dense layer of the {tree_name}: no mapping with a "
                f"'kernel' at that path{_bias_only_hint(node)}. Dense layers found in the "
                f"{tree_name}: {available}."
            )
        if kind is None:
            continue
        # A bias owned by another transform (optax.partition sending biases to, say, Adam):
        # this one preconditions the kernel alone, by its own block of the RFIM (the layer
        # read as bias-free), and leaves the masked entry as it is.
        node = {k: v for k, v in node.items() if not isinstance(v, optax.MaskedNode)}
        inner = stacked_lib.unstacked(node, path in declared, path)
        own = node if inner is None else inner
        layer = adapter_for(own).from_params(path, kind, own)
        if layer.is_softmax and layer.m < 2:
            raise rfim_lib.softmax_classes_error(f"layer {path!r}", layer.m)
        if inner is not None:
            layer = StackedLayer(layer, int(node[paths_lib.layer_key(node)].shape[0]))
        out.append(layer)
    return out


def _masked_at_or_above(params, path: str) -> bool:
    """Whether ``path`` or a parent of it is an ``optax.MaskedNode`` (a whole subtree that
    optax.partition or optax.masked gives to another transform)."""
    keys = path.split(paths_lib.SEP)
    return any(isinstance(paths_lib.get_by_path(params, paths_lib.SEP.join(keys[:i])),
                          optax.MaskedNode) for i in range(1, len(keys) + 1))


def _bias_only_hint(node) -> str:
    """A clause for a node that holds a bias but no weights (a norm with use_scale=False)."""
    if paths_lib.is_mapping(node) and "bias" in node:
        return (f" (it holds only {sorted(node)}: a layer with a bias and no kernel, scale or "
                f"embedding, e.g. LayerNorm(use_scale=False), has no RFIM here; leave it out "
                f"of `layers`, its bias then passes through unchanged)")
    return ""


def _refuse_bias_without_kernel(params, layers) -> None:
    """Refuses a layer whose kernel another transform owns while this one gets its bias.

    RNGD preconditions a kernel, with or without its bias; a bias alone would pass through
    with no word (``layers=None``), so the split is refused, naming the layer.
    """
    for path in paths_lib.layer_paths(params):
        node = paths_lib.get_by_path(params, path)
        bias = node.get("bias")
        if (isinstance(node.get("kernel"), optax.MaskedNode) and bias is not None
                and not isinstance(bias, optax.MaskedNode)
                and (layers is None or path in layers)):
            raise ValueError(
                f"layer {path!r}: optax.partition (or optax.masked) gives its kernel to "
                f"another transform but its bias to this one. RNGD preconditions a kernel, "
                f"with or without its bias (the other split, bias elsewhere, is supported), "
                f"not a bias alone; give this layer's bias to the transform that has its "
                f"kernel."
            )


def check_request(layers, default_kind, representation, stacked_layers=()) -> None:
    """The checks of a transform's arguments that need no params, run when it is built.

    Raises:
      TypeError: if ``layers`` is neither None nor a mapping, or for a bare-string
        ``stacked_layers``.
      ValueError: for an unknown kind or representation, naming the layer.
    """
    check_stacked_layers(stacked_layers)
    if isinstance(layers, Mapping) and not layers:
        raise ValueError(
            "layers is empty, so nothing would be preconditioned (the transform would be "
            "plain momentum SGD); name the layers, e.g. {'Dense_0': 'relu'}, or pass None for "
            "every dense layer."
        )
    if layers is None:
        kinds = {"default_kind": default_kind}
    else:
        _check_layers_type(layers)
        kinds = {f"layer {path!r}": kind for path, kind in layers.items()}
        named = {"stacked_layers": check_stacked_layers(stacked_layers),
                 "representation": set(representation) if isinstance(
                     representation, Mapping) else set()}
        for arg, paths in named.items():
            unknown = sorted(paths - set(layers))
            if unknown:
                raise ValueError(
                    f"{arg} names paths that are not among the layers: {unknown}; layers: "
                    f"{list(layers)}."
                )
    for where, kind in kinds.items():
        if kind is not None:
            rfim_lib.resolve_kind(kind, where=where, pass_through=True)
    reps = representation.items() if isinstance(representation, Mapping) else [
        ("", representation)]
    for path, rep in reps:
        if rep != "auto":
            rfim_lib.check_representation(rep, where=f"layer {path!r}" if path else
                                          "representation")


def _check_layers_type(layers) -> None:
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must map layer paths to kinds, e.g. {{'Dense_0': 'relu'}}, got "
            f"{type(layers).__name__}."
        )


def check_stacked_layers(stacked_layers) -> frozenset[str]:
    """``stacked_layers`` as a set of paths (None: none).

    Raises:
      TypeError: for a bare string (a path must come in a list) or a non-iterable.
    """
    if stacked_layers is None:
        return frozenset()
    if isinstance(stacked_layers, str) or not isinstance(stacked_layers, Iterable):
        raise TypeError(
            f"stacked_layers must be a list of layer paths, e.g. ['blocks/Dense_0'], got "
            f"{stacked_layers!r}."
        )
    return frozenset(stacked_layers)


def adapter_for(node) -> type:
    """The layer adapter of a layer node: by the entry that holds its weights (SPEC §8)."""
    return {"kernel": DenseLayer, "embedding": EmbedLayer, "scale": ScaleShiftLayer}[
        paths_lib.layer_key(node)]


def _requested(representation: Representation, path: str) -> str:
    if isinstance(representation, Mapping):
        rep = representation.get(path, "auto")
    else:
        rep = representation
    if rep != "auto":
        rfim_lib.check_representation(rep, where=f"layer {path!r}")
    return rep


def concrete_bytes(name: str, value) -> int | None:
    """A byte budget as a Python int (None stays None).

    ``optax.inject_hyperparams`` hands numeric arguments over as arrays; concrete ones are
    read (:func:`rfim_jax._src.arguments.concrete_number`), traced ones cannot decide a
    state's layout.

    Raises:
      TypeError: for a traced budget (with the way out), or one that is not a number
        (a string such as ``"1MB"``, a bool).
      ValueError: for a negative or non-integral number of bytes.
    """
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} decides the state's layout, so it must be a concrete number, not a traced "
            f"value; with optax.inject_hyperparams pass static_args=('{name}',)."
        )
    number = arguments.concrete_number(value)
    if number is None:
        raise TypeError(
            f"{name} must be a number of bytes (an int, e.g. 2**28 for 256 MiB) or None, "
            f"got {value!r}."
        )
    if not np.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{name} must be a whole number of bytes >= 0, got {value!r}.")
    return int(number)


def plan_layers(
    specs: list,
    params,
    representation: Representation,
    exact_budget_bytes: int | None,
    state_dtype=None,
) -> dict[str, LayerPlan]:
    """The plan for already-resolved layers (see :func:`rngd_plan`)."""
    exact_budget_bytes = concrete_bytes("exact_budget_bytes", exact_budget_bytes)
    if exact_budget_bytes is None:
        exact_budget_bytes = DEFAULT_EXACT_BUDGET
    if isinstance(representation, Mapping):
        unknown = sorted(set(representation) - {s.path for s in specs})
        if unknown:
            raise ValueError(
                f"representation names layers that are not preconditioned: {unknown}; "
                f"layers: {[s.path for s in specs]}."
            )
    plans = {}
    for layer in specs:
        kernel = paths_lib.get_by_path(params, layer.path)[layer.weights_key]
        size = _itemsize(storage_dtype(kernel, state_dtype))
        by_rep = {name: for_layer(name, layer).state_bytes(layer, size) for name in ESTIMATORS}
        requested = _requested(representation, layer.path)
        if not isinstance(representation, Mapping) and requested not in (
                "auto", *layer.representations):
            # One name for every layer covers the layers that have it; a norm (exact or
            # diagonal, a few bytes per feature) keeps "auto"'s choice, as rngd_plan reports.
            # A per-path request for what a layer cannot hold is refused by choose().
            requested = "auto"
        rep = layer.choose(requested, by_rep, exact_budget_bytes)
        params_bytes = layer.num_params * _itemsize(kernel.dtype)
        plans[layer.path] = LayerPlan(
            layer.path, kind_name(layer.kind), rep, by_rep[rep], by_rep["exact"], params_bytes,
            (layer.d, layer.m), by_rep, layer.num if isinstance(layer, StackedLayer) else 1,
        )
    return plans


def rngd_plan(
    params: Any,
    layers: Mapping[str, Any] | None,
    *,
    representation: Representation = "auto",
    exact_budget_bytes: int | None = None,
    state_dtype: Any = None,
    default_kind: Any = "linear",
    stacked_layers: Iterable[str] = (),
) -> dict[str, LayerPlan]:
    """Reports, per layer, the representation RNGD will use and its state bytes (SPEC §7).

    Nothing is allocated: ``params`` may be arrays or ``jax.ShapeDtypeStruct`` leaves
    (``jax.eval_shape(model.init, ...)``).

    Args:
      params: the params pytree.
      layers: as in :func:`rfim_jax.scale_by_rngd` (path -> kind, or None for every dense layer
        with ``default_kind``).
      representation: ``"auto"``, ``"exact"``, ``"eigen"``, ``"diagonal"``, or a mapping from
        path to one of these (layers not in the mapping are ``"auto"``).  ``"auto"`` picks
        ``"exact"`` when the exact state fits ``exact_budget_bytes``, else ``"eigen"``.
      exact_budget_bytes: the per-layer byte budget of ``"auto"``; None (the default) is
        256 MiB.
      state_dtype: the dtype the state is stored in (default: the kernel's dtype promoted to at
        least float32).
      default_kind: the kind of every dense layer when ``layers`` is None.
      stacked_layers: as in :func:`rfim_jax.scale_by_rngd`.

    Returns:
      ``{path: LayerPlan}`` in the order of ``layers``.

    Raises:
      ValueError: for an unknown representation or kind, or paths that are not layers.
    """
    specs = resolve_layers(layers, default_kind, params, stacked_layers)
    return plan_layers(specs, params, representation, exact_budget_bytes, state_dtype)


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. '1.96 TiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


def check_budget(plans: Mapping[str, LayerPlan], max_state_bytes: int | None) -> None:
    """Raises a ValueError for the first layer whose state exceeds ``max_state_bytes``."""
    max_state_bytes = concrete_bytes("max_state_bytes", max_state_bytes)
    if max_state_bytes is None:
        return
    for plan in plans.values():
        if plan.state_bytes <= max_state_bytes:
            continue
        cheaper = sorted(
            ((n, rep) for rep, n in plan.bytes_by_representation.items()
             if n < plan.state_bytes), reverse=True)
        fitting = [rep for n, rep in cheaper if n <= max_state_bytes]
        listed = ", ".join(f"{rep!r} ({format_bytes(n)})" for n, rep in cheaper)
        advice = (
            f"Use representation={{{plan.path!r}: {fitting[0]!r}}}, which fits; the cheaper "
            f"representations need {listed}." if fitting else
            f"No representation fits (the cheaper ones need {listed or 'no less'}); shard the "
            f"layer or raise max_state_bytes."
        )
        raise ValueError(
            f"layer {plan.path!r} (kind {plan.kind!r}, representation {plan.representation!r}, "
            f"(d, m) = {plan.shape}) needs {format_bytes(plan.state_bytes)} of RNGD state, over "
            f"max_state_bytes={format_bytes(max_state_bytes)}. {advice}"
        )
