"""What the preconditioner is doing, per layer, without reading the state's internals.

:func:`relative_fisher_rao_norm` measures a layer's own parameters in its own metric,
``sum_l w~_l^T G_l w~_l`` (the per-layer, relative form of the Fisher-Rao norm).
:func:`diagnostics` turns an RNGD state into a flat ``{"path/figure": scalar}`` dict for any
logger.  Both are pure and jit-compatible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rfim_jax._src import activations as act_lib
from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import plan as plan_lib
from rfim_jax._src.layers import DenseLayer
from rfim_jax._src.layers import stacked as stacked_lib
from rfim_jax._src.metrics.base import sym_eigvalsh
from rfim_jax._src.transform import ScaleByRNGDState, _estimator_of


def _find_state(state: Any) -> ScaleByRNGDState:
    """The :class:`ScaleByRNGDState` inside an optax state (a chain's tuple, nested states)."""
    found = [
        node for node in jax.tree.leaves(
            state, is_leaf=lambda n: isinstance(n, ScaleByRNGDState))
        if isinstance(node, ScaleByRNGDState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one ScaleByRNGDState in the optimiser state, found {len(found)}."
        )
    return found[0]


def _layer_for(path: str, stats: Any, node: Mapping):
    """A layer adapter whose structure flags match the state's layout for ``path``.

    The params give the layer type and its (d, m); the stats' shapes give the kind's structure
    (shared block, per-neuron blocks or the full softmax matrix), which is all the metric needs.
    """
    layer = plan_lib.adapter_for(node).from_params(path, act_lib.Linear(), node)
    if not isinstance(layer, DenseLayer):
        return layer  # embeddings and norms: their kind is always the Gaussian "linear"
    d, m = layer.d, layer.m
    if isinstance(stats, Mapping):
        shared = stats["S"].shape[0] == 1 and m > 1
        kind = act_lib.Linear() if shared else act_lib.ReLU()
    elif stats.shape[0] > 1 or m == 1:
        kind = act_lib.ReLU()
    else:
        kind = act_lib.Linear() if stats.shape[-1] == d else "softmax"
    return dataclasses.replace(layer, kind=kind)


def _matches(path: str, node: Mapping, stats: Any) -> Any:
    """The layer adapter reading ``node`` if its state has exactly ``stats``' shapes, else None."""
    try:
        layer = _layer_for(path, stats, node)
    except (ValueError, IndexError, KeyError):
        return None
    est = _estimator_of({path: stats}, layer)
    want = jax.eval_shape(lambda: est.init(layer, jnp.float32)[0])
    if [a.shape for a in jax.tree.leaves(want)] != [a.shape for a in jax.tree.leaves(stats)]:
        return None
    return layer


def _reading_of(path: str, node: Mapping, stats: Any) -> tuple[Any, bool]:
    """How the state read the layer's params: ``(layer adapter, stacked)``.

    The params alone do not always say: a bias-free stack was declared through
    ``stacked_layers`` (its state has one more leading axis than one layer's), and a bias owned
    by another transform (``optax.partition``) was left out (its state is one row narrower).
    The first reading whose state shapes equal the stored ones is the one the state was built
    with; the readings never share shapes.

    Raises:
      ValueError: naming the layer, when no reading fits its state.
    """
    without_bias = {k: v for k, v in node.items() if k != "bias"}
    first = jax.tree.map(lambda a: a[0] if a.ndim else a, stats)
    inner = stacked_lib.unstacked(node)
    candidates = [(node, stats, False), (without_bias, stats, False)]
    if inner is not None:
        candidates.insert(0, (inner, first, True))
    for candidate in (node, without_bias):
        try:
            candidates.append(
                (stacked_lib.unstacked(candidate, declared=True, path=path), first, True))
        except ValueError:
            pass
    for params_node, layer_stats, stacked in candidates:
        layer = _matches(path, params_node, layer_stats)
        if layer is not None:
            return layer, stacked
    shapes = jax.tree.map(lambda a: tuple(a.shape), stats)
    raise ValueError(
        f"layer {path!r}: its RNGD state has shapes {shapes}, which no reading of its params "
        f"{jax.tree.map(lambda a: tuple(a.shape), dict(node))} gives; pass the params the "
        f"state was initialised with."
    )


def _params_of(params: Any, key: str, paths) -> Mapping:
    """The params of ``key``: a layer's path, or ``"<path>/<k>"`` for slice k of a stack."""
    if key in paths:
        return paths_lib.get_by_path(params, key)
    path, k = key.rsplit(paths_lib.SEP, 1)
    return {name: v[int(k)] for name, v in paths_lib.get_by_path(params, path).items()}


def layer_metrics(state: Any, params: Any) -> dict[str, metrics_lib.AbstractMetric]:
    """The moving-average metric of every layer of an RNGD state, in its representation.

    Args:
      state: an optimiser state holding one :class:`rfim_jax.ScaleByRNGDState`.
      params: the params (only shapes are read), to know each layer's (d, m).

    Returns:
      ``{path: metric}``: ``SharedBlockMetric``, ``BlockDiagonalMetric``, ``DenseMetric``,
      ``EigenDiagonalMetric`` or ``DiagonalMetric``; slice k of a stacked layer (a leading
      layer axis) is ``"<path>/<k>"``.
    """
    state = _find_state(state)
    out = {}
    # In at least float32, the precision the statistics are computed in: a state stored in
    # bfloat16 (state_dtype) would otherwise give 3-digit traces.
    state = jax.tree.map(
        lambda a: a.astype(dtypes_lib.at_least_float32(a))
        if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    for path, stats in state.metrics.items():
        node = paths_lib.get_by_path(params, path)
        if not paths_lib.is_mapping(node):
            raise ValueError(
                f"layer {path!r} of the RNGD state is not a layer of the params given (found "
                f"{type(node).__name__} there; the params' layers are "
                f"{paths_lib.layer_paths(params)}); pass the params the state was initialised "
                f"with.")
        layer, stacked = _reading_of(path, node, stats)
        est = _estimator_of({path: stats}, layer)
        if not stacked:
            out[path] = est.as_metric(layer, stats, state.inverses[path])
            continue
        # A stack: one metric per slice, keyed "<path>/<k>".
        for k in range(jax.tree.leaves(stats)[0].shape[0]):
            out[f"{path}/{k}"] = est.as_metric(
                layer, jax.tree.map(lambda a, k=k: a[k], stats),
                jax.tree.map(lambda a, k=k: a[k], state.inverses[path]))
    return out


def relative_fisher_rao_norm(metric_or_state: Any, params: Any) -> Any:
    """The relative Fisher-Rao norm: a layer's params in its own RFIM, ``sum_l w~_l^T G_l w~_l``.

    With ``theta = concat_l w~_l`` (SPEC §2) this is ``theta^T G theta`` for the layer's
    metric G, the per-layer analogue of ``||theta||_fr^2 = theta^T I(theta) theta`` (Liang et
    al.).  Like the RFIM it is a mean over samples; its unit is that of the metric (nats per
    squared parameter times squared parameter: a squared norm).

    Args:
      metric_or_state: a layer metric (any representation), or an optimiser state holding a
        :class:`rfim_jax.ScaleByRNGDState`.
      params: with a metric, the layer's ``{"kernel", "bias"}``; with a state, the whole
        params pytree.

    Returns:
      A scalar for a metric; ``{path: scalar}`` for a state.

    Raises:
      ValueError: if the params do not match the metric's layer (shapes named).
    """
    if isinstance(metric_or_state, metrics_lib.AbstractMetric):
        metric = metric_or_state
        key = metric.layout.kernel_key if metric.layout is not None else "kernel"
        node = {k: v for k, v in params.items() if k in (key, "bias")}
        if not metric.has_bias:
            node.pop("bias", None)
        cols = metric._columns(node, "relative_fisher_rao_norm")
        cols = cols.astype(dtypes_lib.result_type(cols, *jax.tree.leaves(metric)))
        return jnp.vdot(cols, metric.matvec_columns(cols))
    paths = _find_state(metric_or_state).metrics
    return {
        key: relative_fisher_rao_norm(metric, _params_of(params, key, paths))
        for key, metric in layer_metrics(metric_or_state, params).items()
    }


def _extremes(metric) -> tuple[jax.Array, jax.Array]:
    """(smallest, largest) eigenvalue of a layer metric."""
    if isinstance(metric, (metrics_lib.EigenDiagonalMetric, metrics_lib.DiagonalMetric)):
        return jnp.min(metric.scales), jnp.max(metric.scales)
    blocks = metric.stored_blocks()
    # One block at a time (lax.map): batched LAPACK has deadlocked on 2-core CPUs.
    evals = jax.lax.map(sym_eigvalsh, blocks)
    return jnp.min(evals), jnp.max(evals)


def diagnostics(
    state: Any,
    params: Any = None,
    *,
    grads: Any = None,
    updates: Any = None,
    spectrum: bool = True,
) -> dict[str, jax.Array]:
    """Per-layer figures of an RNGD state as a flat dict of scalars, ready for any logger.

    Keys are ``"<path>/<figure>"``:

    * ``skipped``: steps whose statistics were not finite (the average kept its value);
    * ``fallbacks``: blocks whose inverse or eigenbasis fell back at the last refresh;
    * ``trace``: ``tr G`` of the moving average;
    * ``min_eigenvalue``, ``max_eigenvalue``, ``condition_number`` of the moving average (with
      ``spectrum=True``).  Eigen and diagonal: read from ``S``, free.  Exact: one ``eigvalsh``
      per stored block, ``m d^3`` flops (as much as one refresh), so call it every k steps;
    * ``relative_fisher_rao_norm`` (with ``params``): ``sum_l w~_l^T G_l w~_l``;
    * ``step_to_grad_norm`` (with ``grads`` and ``updates``): ``|update| / |grad|`` over the
      layer's kernel and bias, e.g. the output of ``scale_by_rngd`` against its input (with
      ``params``, the kernel alone for a layer whose bias another optimiser owns); 0 when
      both are zero (a frozen or dead layer), ``inf`` for a step without a gradient.

    Plus ``count``, the number of updates, and ``rejected_updates``, the steps whose update
    was not finite and was replaced by zeros.  Everything is a jnp scalar, so the function can run
    inside a jitted step; the dict's keys depend only on the state's structure, so calling it
    every step does not recompile.

    Args:
      state: an optimiser state holding one :class:`rfim_jax.ScaleByRNGDState`.
      params: the params (needed for the trace, spectrum and norm figures; only the counters
        are reported without them).
      grads: the raw gradients, with ``updates``.
      updates: the preconditioned step, with ``grads``.
      spectrum: whether to compute the eigenvalue figures.

    Returns:
      ``{key: scalar}``.

    Raises:
      ValueError: if the state holds no (or several) ``ScaleByRNGDState``.
    """
    rngd_state = _find_state(state)
    out: dict[str, jax.Array] = {"count": rngd_state.count,
                                 "rejected_updates": rngd_state.rejected_updates}
    metrics = layer_metrics(rngd_state, params) if params is not None else {}
    for key, metric in metrics.items():  # a stacked layer's slices are "<path>/<k>"
        out[f"{key}/trace"] = metric.trace()
        if spectrum:
            lo, hi = _extremes(metric)
            out[f"{key}/min_eigenvalue"] = lo
            out[f"{key}/max_eigenvalue"] = hi
            out[f"{key}/condition_number"] = hi / lo
        out[f"{key}/relative_fisher_rao_norm"] = relative_fisher_rao_norm(
            metric, _params_of(params, key, rngd_state.metrics))
    for path in rngd_state.metrics:
        out[f"{path}/skipped"] = rngd_state.skipped[path]
        out[f"{path}/fallbacks"] = rngd_state.fallbacks[path]
        if grads is not None and updates is not None:
            g = paths_lib.get_by_path(grads, path)
            u = paths_lib.get_by_path(updates, path)
            # Only what this state preconditions: a bias that optax.partition gave to another
            # optimiser (the layer read as bias-free) is not part of RNGD's step.
            first = metrics.get(path, metrics.get(f"{path}{paths_lib.SEP}0"))
            with_bias = getattr(first, "has_bias", True)
            keys = [k for k in ("kernel", "scale", "embedding", "bias")
                    if k in g and (k != "bias" or with_bias)]
            gn = jnp.sqrt(sum(jnp.sum(jnp.square(g[k])) for k in keys))
            un = jnp.sqrt(sum(jnp.sum(jnp.square(u[k])) for k in keys))
            # A zero gradient (a frozen or dead layer) with a zero step logs 0, not 0/0.
            out[f"{path}/step_to_grad_norm"] = jnp.where(
                gn > 0, un / jnp.where(gn > 0, gn, 1.0), jnp.where(un > 0, jnp.inf, 0.0))
    # An nnx.Optimizer's state holds its counters in nnx.OptArray wrappers: plain arrays out.
    return {k: jnp.asarray(v) for k, v in out.items()}
