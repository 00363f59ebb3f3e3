"""Layer paths: naming the dense layers of a params pytree.

Params are walked with JAX's own key paths (``jax.tree_util.tree_flatten_with_path``), so every
pytree container is seen: dicts, ``FrozenDict``, lists, tuples, ``flax.struct`` and other
registered dataclasses, nnx ``State``, and the wrappers a framework puts around a leaf
(``nnx.Variable``, ``nn.Partitioned``, ...).

A *layer* (called a dense layer throughout, as every one is a dense map of its inputs) is a
node with a ``"kernel"`` entry (a dict key or an attribute) whose array has at least two axes:
``(d_in, m)`` for Flax's ``nn.Dense``/``nnx.Linear``, a plain dict, or a dataclass with
``kernel`` and ``bias`` fields; ``(*in_axes, *out_axes)`` for ``DenseGeneral``,
``LinearGeneral`` and ``Einsum``; ``(*window, c_in / groups, c_out)`` for a convolution
(:mod:`rfim_jax._src.layers.dense` says how each is read).

A layer's *path* is the keys from the root down to that node, each written as ``str`` of the
dict key, the sequence index or the attribute name, and joined by ``"/"``: ``"Dense_1"``,
``"block/Dense_0"``, ``"layers/0"`` (an nnx list or a Python list), ``"0"`` (params that are a
list of layers).  These are the keys of the ``layers`` argument of
:func:`rfim_jax.scale_by_rngd`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

SEP = "/"
KERNEL = "kernel"

_Parts = tuple[str, ...]


def is_mapping(node: Any) -> bool:
    """Whether ``node`` is a mapping (dict, ``FrozenDict``, nnx ``State``)."""
    return isinstance(node, Mapping)


def _is_masked(node: Any) -> bool:
    # optax.MaskedNode is an empty NamedTuple: without this it would vanish from a flatten.
    return isinstance(node, optax.MaskedNode)


def raw_key(key: Any) -> Any:
    """One key-path entry as the key itself: the dict key, sequence index (an ``int`` stays an
    ``int``) or attribute name."""
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def key_name(key: Any) -> str:
    """One key-path entry as a path component: the dict key, sequence index or attribute."""
    return str(raw_key(key))


def display_path(keys: Sequence[Any]) -> str:
    """A layer's keys joined by "/" for messages; ``"<root>"`` for the params tree itself."""
    return SEP.join(map(str, keys)) or "<root>"


def _parts(keypath: tuple) -> _Parts:
    return tuple(key_name(k) for k in keypath)


def _flatten(tree: Any) -> list[tuple[_Parts, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    return [(_parts(kp), leaf) for kp, leaf in leaves]


def _children(node: Any) -> list[tuple[_Parts, Any]]:
    """The direct children of ``node`` with their keys; [] for a leaf or None."""
    if node is None or _is_masked(node):
        return []
    kids, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(kids) == 1 and kids[0][0] == ():  # ``node`` is itself a leaf
        return []
    return [(_parts(kp), child) for kp, child in kids]


def _unwrap(entry: Any) -> Any:
    """The array inside a framework wrapper (``nnx.Variable``, ``nn.Partitioned``), else as is."""
    if entry is None or _is_masked(entry) or (hasattr(entry, "shape") and not _children(entry)):
        return entry
    leaves = jax.tree_util.tree_leaves(entry, is_leaf=_is_masked)
    return leaves[0] if len(leaves) == 1 else entry


def _entries(node: Any) -> dict[str, Any] | None:
    """A node's named entries (one key each), or None for a leaf."""
    if node is None or _is_masked(node):
        return None
    if is_mapping(node):
        return {str(k): node[k] for k in node}
    kids = _children(node)
    if not kids:
        return None
    return {parts[0]: child for parts, child in kids if len(parts) == 1}


def kernel_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of ``node``'s ``"kernel"`` entry (through any wrapper), or None if it has none.

    A masked kernel (``optax.MaskedNode``) has the shape ``()`` of no array: callers check
    :func:`is_masked_layer` first.
    """
    entries = _entries(node)
    if not entries or KERNEL not in entries:
        return None
    kernel = _unwrap(entries[KERNEL])
    if _is_masked(kernel):
        return ()
    shape = getattr(kernel, "shape", None)
    return None if shape is None else tuple(shape)


def is_masked_layer(node: Any) -> bool:
    """Whether ``node``'s kernel is an ``optax.MaskedNode`` (owned by another transform)."""
    entries = _entries(node)
    return bool(entries) and KERNEL in entries and _is_masked(entries[KERNEL])


def is_dense_layer(node: Any) -> bool:
    """Whether ``node`` is a layer: a ``"kernel"`` entry holding an array of rank >= 2 (or masked).

    Arrays and ``jax.ShapeDtypeStruct`` leaves both count; the kernel may sit inside a wrapper.
    """
    if is_masked_layer(node):
        return True
    shape = kernel_shape(node)
    return shape is not None and len(shape) >= 2


#: The entries that make a node a layer of another type than a kernel layer: an embedding
#: table (``nn.Embed``) and a normalisation's scale (``LayerNorm``, ``RMSNorm``).  Such layers
#: are preconditioned only when named in ``layers`` (SPEC §8).
OTHER_LAYER_KEYS = ("embedding", "scale")


def layer_key(node: Any) -> str | None:
    """The entry that holds ``node``'s weights: ``"kernel"``, ``"embedding"``, ``"scale"``."""
    entries = _entries(node)
    if not entries:
        return None
    for key in (KERNEL, *OTHER_LAYER_KEYS):
        if key in entries:
            return key
    return None


def is_layer(node: Any) -> bool:
    """A kernel layer (:func:`is_dense_layer`), an embedding table or a normalisation scale."""
    if is_dense_layer(node):
        return True
    key = layer_key(node)
    if key not in OTHER_LAYER_KEYS:
        return False
    shape = getattr(_unwrap(_entries(node)[key]), "shape", None)
    # A scale may carry a leading layer axis (a stack of norms, rfim_jax._src.layers.stacked).
    return shape is not None and len(shape) in ((2,) if key == "embedding" else (1, 2))


def _layer_candidates(tree: Any) -> list[_Parts]:
    """Paths (as parts) of every node holding a "kernel" entry, in tree order."""
    seen: dict[_Parts, None] = {}
    for parts, _ in _flatten(tree):
        if KERNEL in parts:
            seen.setdefault(parts[: parts.index(KERNEL)], None)
    return list(seen)


def _node_at(tree: Any, parts: _Parts) -> Any:
    node = tree
    rest = parts
    while rest:
        for key, child in _children(node):
            if rest[: len(key)] == key:
                node, rest = child, rest[len(key):]
                break
        else:
            return None
    return node


def layer_paths(tree: Any) -> list[str]:
    """Paths of every layer (a node with a ``"kernel"`` of rank >= 2) in ``tree``, in tree order.

    Args:
      tree: a params (or gradients) pytree of any containers; leaves may be arrays,
        ``jax.ShapeDtypeStruct`` or wrapped in ``nnx.Variable`` / ``nn.Partitioned``.

    Returns:
      The paths, keys joined by ``"/"`` (``"Dense_0"``, ``"block/Dense_0"``, ``"layers/0"``).
    """
    return [
        SEP.join(parts) for parts in _layer_candidates(tree)
        if is_dense_layer(_node_at(tree, parts))
    ]


def activation_paths(activations: Any) -> list[str]:
    """Paths of the layers recorded in ``activations`` (mappings holding ``"inputs"``).

    Compare with ``layer_paths(params)`` to see which dense layers a capture found.
    """
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and "inputs" in node:
            out.append(prefix)
            return
        # Any container the params may use (dicts, lists, tuples, registered nodes), the
        # same reading get_by_path gives the optimiser.
        for k, child in (_entries(node) or {}).items():
            walk(child, f"{prefix}{SEP}{k}" if prefix else k)

    walk(activations, "")
    return out


def activation_entry(activations: Any, path: str, expected: str, hint: str = "") -> Mapping:
    """The activations' entry for the layer at ``path``, holding "inputs" and "preacts".

    Raises:
      ValueError: naming the layer, what it expects (``expected``) and what the activations
        hold instead: nothing (None), other recorded paths (an extra level of nesting, a
        different model), or an entry with other keys.
    """
    entry = None if activations is None else get_by_path(activations, path)
    if isinstance(entry, Mapping) and "inputs" in entry and "preacts" in entry:
        return entry
    if activations is None:
        got = " (activations=None)"
    elif entry is None:
        found = activation_paths(activations)
        got = (f" Nothing is at that path; the activations hold the layers {found}." if found
               else " Nothing is at that path, and no recorded layer (a mapping with 'inputs') "
               "is anywhere in the activations.")
    elif isinstance(entry, Mapping):
        got = f" The entry at that path has the keys {sorted(map(str, entry))}."
    else:
        got = f" The entry at that path is a {type(entry).__name__}."
    if activations is None:
        raise ValueError(f"layer {path!r}: no activations passed; {expected}{got}.{hint}")
    raise ValueError(f"layer {path!r}: no activations passed; {expected}.{got}{hint}")


def get_by_path(tree: Any, path: str, default: Any = None) -> Any:
    """The node at ``path`` (keys joined by "/"), or ``default`` if it does not exist.

    Every pytree container is walked (dicts, lists, tuples, dataclasses, nnx ``State``); keys
    are compared by ``str``, so the int keys of nnx lists and list indices match ``"0"``.  A
    flat mapping keyed by the whole path (``{"block/Dense_0": ...}``) is accepted too.

    A layer (:func:`is_layer`) comes back as a plain dict of its entries
    (``{"kernel": ..., "bias": ...}``) with each framework wrapper removed, whatever its
    container (an nnx ``State``, a dataclass, a ``FrozenDict``); any other node as it is.

    Args:
      tree: the pytree.
      path: the keys joined by ``"/"``; ``""`` is the root.
      default: what to return when there is no node at ``path``.

    Returns:
      The node, or ``default``.
    """
    if is_mapping(tree) and path in tree:
        node = tree[path]
    else:
        node = _node_at(tree, tuple(path.split(SEP)) if path else ())
        if node is None:
            return default
    if is_layer(node):
        return {name: _unwrap(child) for name, child in _entries(node).items()}
    return node


def map_layers(fn: Callable[[str, Any], Any], tree: Any, paths: set[str]) -> Any:
    """Rebuilds ``tree`` with ``fn(path, layer)`` substituted at each layer in ``paths``.

    The new leaves go back into ``tree``'s own structure (``jax.tree_util.tree_unflatten`` on
    the original treedef), so every container and wrapper, with its metadata, is kept:
    lists stay lists, dataclasses stay dataclasses, an ``nn.Partitioned`` keeps its names.

    Args:
      fn: called as ``fn(path, layer)`` with the layer as :func:`get_by_path` returns it (a
        dict of unwrapped entries); returns a mapping of new entries (entries it leaves out
        keep their old values).
      tree: the pytree (params, gradients or updates).
      paths: the layer paths to substitute.

    Returns:
      A pytree with ``tree``'s structure.

    Raises:
      ValueError: if a path is not in ``tree``, or ``fn`` returns an entry with a different
        number of leaves than the one it replaces.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    parts = [_parts(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]
    for path in paths:
        node = get_by_path(tree, path)
        if node is None:
            raise ValueError(f"map_layers: no node at path {path!r}.")
        new = fn(path, node)
        # Each leaf under the layer, grouped by the layer's entry it belongs to.
        owned: dict[str, list[int]] = {}
        for i, p in enumerate(parts):
            for k in range(len(p)):
                if SEP.join(p[:k]) == path:
                    owned.setdefault(p[k], []).append(i)
                    break
        for name, value in new.items():
            name = str(name)
            if name not in owned:
                continue
            repl = jax.tree_util.tree_leaves(value, is_leaf=_is_masked)
            if len(repl) != len(owned[name]):
                raise ValueError(
                    f"map_layers: layer {path!r} entry {name!r} has {len(owned[name])} leaves, "
                    f"its replacement {len(repl)}."
                )
            for i, leaf in zip(owned[name], repl, strict=True):
                leaves[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _leaf_paths(tree: Any, limit: int = 8) -> str:
    names = [SEP.join(p) for p, _ in _flatten(tree)]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def no_layers_error(tree: Any) -> ValueError:
    """The error for ``layers=None`` when ``tree`` holds no dense layer to precondition."""
    found = layer_paths(tree)
    # A whole layer given to another transform is a MaskedNode where its dict was.
    masked = [SEP.join(p) for p, leaf in _flatten(tree) if _is_masked(leaf)]
    if found:
        why = (f"every dense layer ({found}) is masked out of this transform by "
               f"optax.partition / optax.masked")
    elif masked:
        why = (f"no node holds a 'kernel' entry this transform sees; optax.partition / "
               f"optax.masked gives {masked} to another transform")
    else:
        why = ("no node holds a 'kernel' entry of rank >= 2 (a layer: {'kernel': (d_in, m), "
               "'bias': (m,)}, a convolution's or a DenseGeneral's kernel)")
    return ValueError(
        f"layers=None found nothing to precondition: {why}. The params' leaves are "
        f"[{_leaf_paths(tree)}]. Name the layers explicitly, e.g. layers={{'Dense_0': 'relu'}}, "
        f"or use a plain optax optimiser."
    )


def check_kernel_rank(path: str, node: Any) -> None:
    """Raises for a node at ``path`` whose kernel has fewer than two axes.

    Raises:
      ValueError: naming the layer and its kernel shape.
    """
    shape = kernel_shape(node)
    if shape is None or len(shape) >= 2 or is_masked_layer(node):
        return
    raise ValueError(
        f"layer {path!r}: kernel must have an input and an output axis, e.g. (d_in, m), got "
        f"shape {shape}, so it is not a layer RNGD can precondition. Leave it out of `layers`; "
        f"unlisted parameters pass through unchanged."
    )
