"""Layer paths: naming the dense layers of a params pytree.

A dense layer is a mapping that holds a ``"kernel"`` entry (Flax's ``nn.Dense``,
``nnx.Linear``, or a plain dict).  Its *path* is the keys from the root down to that mapping,
each converted with ``str`` and joined by ``"/"``: ``"Dense_1"``, ``"block/Dense_0"``, or
``"layers/0"`` for an nnx list.  These are the keys of the ``layers`` argument of
:func:`rfim_jax.scale_by_rngd`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SEP = "/"


def is_mapping(node: Any) -> bool:
    # flax FrozenDict and nnx State are Mappings; plain dicts too.
    return isinstance(node, Mapping)


def is_dense_layer(node: Any) -> bool:
    return is_mapping(node) and "kernel" in node


def layer_paths(tree: Any) -> list[str]:
    """Paths of every dense layer (a mapping holding ``"kernel"``) in ``tree``, in tree order."""
    out: list[str] = []

    def walk(node, prefix):
        if is_dense_layer(node):
            out.append(prefix)
        elif is_mapping(node):
            for k in node:
                walk(node[k], f"{prefix}{SEP}{k}" if prefix else str(k))

    walk(tree, "")
    return out


def get_by_path(tree: Any, path: str, default: Any = None) -> Any:
    """The node at ``path`` (keys joined by "/"), or ``default`` if it does not exist.

    A flat mapping keyed by the whole path (``{"block/Dense_0": ...}``) is accepted too.
    Keys are compared by ``str``, so the int keys of nnx lists match.
    """
    if is_mapping(tree) and path in tree:
        return tree[path]
    node = tree
    for part in path.split(SEP) if path else []:
        if not is_mapping(node):
            return default
        match = [k for k in node if str(k) == part]
        if not match:
            return default
        node = node[match[0]]
    return node


def map_layers(fn: Callable[[str, Any], Any], tree: Any, paths: set[str]) -> Any:
    """Rebuilds ``tree`` with ``fn(path, node)`` substituted at each layer in ``paths``.

    Everything else, including mapping types, is kept as is.
    """

    def walk(node, prefix):
        if prefix in paths:
            return fn(prefix, node)
        if is_mapping(node):
            items = {k: walk(v, f"{prefix}{SEP}{k}" if prefix else str(k)) for k, v in node.items()}
            return _rebuild(node, items)
        return node

    return walk(tree, "")


def _rebuild(node: Mapping, items: dict) -> Mapping:
    if isinstance(node, dict):
        return items
    try:
        return type(node)(items)
    except Exception:  # noqa: BLE001 - exotic mappings: fall back to a plain dict.
        return items
