"""How an RNGD state shards, given the params' shardings (SPEC §7, "Sharding").

The rule: state indexed by neuron shards like the kernel's output axis m; everything shared by
the neurons is replicated.

=====================  =========================================  ==========================
representation         per neuron (sharded like kernel axis m)    shared (replicated)
=====================  =========================================  ==========================
exact, activation      ``metrics`` and ``inverses`` (m, d, d)     --
exact, linear/softmax  --                                         (1, d, d), (1, m d, m d)
eigen                  ``S`` (m, d)                               ``A``, ``U`` (d, d); linear S
diagonal               ``S`` (m, d)                               linear ``S`` (1, d)
=====================  =========================================  ==========================

Counters are replicated.  :func:`state_shardings` applies the rule to a whole optax state (for
``jax.jit(..., out_shardings=...)``); under explicit sharding (``AxisType.Explicit``)
:func:`match_sharding` and :func:`shard_like_kernel` keep ``init`` and ``update`` in agreement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rfim_jax._src import paths as paths_lib


def _kernel_m_axis(spec) -> Any:
    """The mesh axis of a kernel spec's output (last) axis, or None."""
    spec = tuple(spec)
    return spec[-1] if spec else None


def _neuron_spec(leaf_shape, axis_name, key=None) -> P:
    """A state leaf's spec: per-neuron leaves (exact blocks, ``S``) shard their neuron axis.

    One layer's exact blocks have rank 3 and its ``S`` rank 2; a stack (SPEC §8) has one more
    leading axis, the layer axis, so its neuron axis is the second.
    """
    lead = 1 if len(leaf_shape) == (3 if key is None else 2) + 1 else 0
    per_neuron = (len(leaf_shape) > lead and leaf_shape[lead] > 1 and key in (None, "S"))
    if not per_neuron or axis_name is None:
        return P()
    return P(*([None] * lead), axis_name)


def state_shardings(opt_state: Any, param_shardings: Any) -> Any:
    """Shardings for an optax state that contains :class:`rfim_jax.ScaleByRNGDState` nodes.

    Per-neuron RNGD state follows its kernel's output axis (see the module table); any other
    node of ``opt_state`` with the params' structure (``optax.trace``, Adam moments) takes
    ``param_shardings``; everything else is replicated.

    Args:
      opt_state: the optimiser state, concrete or abstract (``jax.eval_shape(tx.init, ...)``).
      param_shardings: a pytree of ``NamedSharding`` with the params' structure.

    Returns:
      A pytree of ``NamedSharding`` with ``opt_state``'s structure.

    Raises:
      ValueError: if ``param_shardings`` holds no ``NamedSharding`` (no mesh to use).
    """
    from rfim_jax._src.transform import ScaleByRNGDState

    leaves = [s for s in jax.tree.leaves(param_shardings) if isinstance(s, NamedSharding)]
    if not leaves:
        raise ValueError("state_shardings: param_shardings holds no NamedSharding.")
    mesh = leaves[0].mesh
    replicated = NamedSharding(mesh, P())
    params_def = jax.tree.structure(param_shardings)

    def layer(path, tree):
        node = paths_lib.get_by_path(param_shardings, path)
        key = paths_lib.layer_key(node) if isinstance(node, Mapping) else None
        weights = node.get(key) if key is not None else None
        # Like shard_like_kernel at init: the weights' last axis is the neurons' (kernel m,
        # norm feature D); a weight that is not a NamedSharding leaves the layer replicated.
        axis = _kernel_m_axis(weights.spec) if isinstance(weights, NamedSharding) else None
        if isinstance(tree, Mapping):
            return {k: NamedSharding(mesh, _neuron_spec(v.shape, axis, k)) for k, v in tree.items()}
        return NamedSharding(mesh, _neuron_spec(tree.shape, axis))

    def shard(node):
        if isinstance(node, ScaleByRNGDState):
            return ScaleByRNGDState(
                count=replicated,
                metrics={p: layer(p, t) for p, t in node.metrics.items()},
                inverses={p: layer(p, t) for p, t in node.inverses.items()},
                skipped=jax.tree.map(lambda _: replicated, node.skipped),
                fallbacks=jax.tree.map(lambda _: replicated, node.fallbacks),
                rejected_updates=replicated,
            )
        if jax.tree.structure(node) == params_def:
            return param_shardings
        return jax.tree.map(lambda _: replicated, node)

    def is_leaf(node):
        return isinstance(node, ScaleByRNGDState) or jax.tree.structure(node) == params_def

    return jax.tree.map(shard, opt_state, is_leaf=is_leaf)


def _explicit_mesh(x) -> Any:
    """The mesh of ``x`` when it has explicit axes, else None.

    The concrete ``Mesh`` for a concrete array (an eager ``init`` reshards onto its devices),
    the ``AbstractMesh`` for a traced one.
    """
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or not getattr(mesh, "explicit_axes", ()):
        return None
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        concrete = getattr(x.sharding, "mesh", None)
        if isinstance(concrete, jax.sharding.Mesh):
            return concrete
    return mesh


def _explicit_spec(x) -> P | None:
    """``x``'s spec when it lives on a mesh with explicit axes, else None."""
    return None if _explicit_mesh(x) is None else jax.typeof(x).sharding.spec


def _reshard(x: jax.Array, like: Any, spec: P) -> jax.Array:
    """``x`` resharded to ``spec`` on ``like``'s mesh.

    A ``NamedSharding`` rather than a bare spec, so that no ``jax.set_mesh`` context is needed
    (``jax.make_mesh`` gives explicit axes by default, with or without one).
    """
    return jax.sharding.reshard(x, NamedSharding(_explicit_mesh(like), spec))


def match_sharding(new: Any, like: Any) -> Any:
    """Under explicit sharding, reshard each leaf of ``new`` to its ``like`` leaf's spec.

    Outside explicit sharding it returns ``new`` unchanged (XLA propagates shardings).
    """

    def one(n, l):
        spec = _explicit_spec(l)
        return n if spec is None else _reshard(n, l, spec)

    return jax.tree.map(one, new, like)


def shard_like_kernel(tree: Any, neuron_axes: Any, kernel: Any) -> Any:
    """Under explicit sharding, shard ``tree``'s per-neuron leaves like ``kernel``'s axis m.

    ``neuron_axes`` mirrors ``tree`` with, per leaf, the axis indexed by neuron or None.
    """
    spec = _explicit_spec(kernel)
    if spec is None:
        return tree
    axis_name = _kernel_m_axis(spec)
    # None marks a shared leaf; make it a leaf value so the two trees line up.
    neuron_axes = jax.tree.map(lambda a: -1 if a is None else a, neuron_axes,
                               is_leaf=lambda a: a is None)

    def one(leaf, axis):
        if axis < 0 or axis_name is None or leaf.shape[axis] == 1:
            return _reshard(leaf, kernel, P())
        return _reshard(leaf, kernel, P(*([None] * axis), axis_name))

    return jax.tree.map(one, tree, neuron_axes)


def global_statistics(fn: Any, stats: Any, *args: Any) -> tuple[Any, Any]:
    """``fn(stats, *args) -> (new_stats, counters)``, with the mesh's axes automatic.

    Statistics contract over the sample axes.  Under explicit sharding with the batch split
    over a data axis, jax refuses such a contraction without an output sharding ("Contracting
    dimensions are sharded ..."); here the contraction runs with the mesh's axes automatic, so
    XLA reduces the partial sums across devices as it does without explicit axes, and each
    output takes the sharding of the stored state it replaces (``counters``: one replicated
    scalar per key of ``stats``).  Without explicit axes ``fn`` runs as it is.
    """
    mesh = next((m for m in map(_explicit_mesh, jax.tree.leaves((stats, args)))
                 if m is not None), None)
    if mesh is None:
        return fn(stats, *args)
    specs = jax.tree.map(lambda a: _explicit_spec(a) or P(), stats)
    out = (specs, {key: P() for key in stats})
    with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
        return jax.sharding.auto_axes(fn, out_sharding=out)(stats, *args)


def replicate_last_axis(x: jax.Array) -> jax.Array:
    """Under explicit sharding, gather ``x``'s last (feature) axis; other axes keep theirs.

    A layer's statistics need whole input rows ``x~_i`` (with the appended 1).
    """
    spec = _explicit_spec(x)
    if spec is None:
        return x
    spec = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    return _reshard(x, x, P(*spec[:-1], None))
