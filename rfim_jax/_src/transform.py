"""Relative natural gradient descent as optax transformations (paper Sec. 5, eqs. 30-33).

For each dense layer the optimiser keeps a moving average of the layer's RFIM, refreshes its
inverse every T steps, and preconditions the layer's gradient neuron by neuron:

    G_hat   <- RFIM of this batch (eqs. 22, 23, 25) + damping * tr(G_hat_b)/d_b * I    per block b
    G       <- decay * G + (1 - decay) * G_hat                                           (eq. 32)
    G^-1    <- inverse(G)          if count % inverse_every == 0                        (Sec. 5.2)
    w~_l    <- G_l^-1 [dkernel[:, l], dbias[l]]                                          (eq. 33)

G starts at the identity.  The learning rate and momentum come from the stages chained after
:func:`scale_by_rngd`; :func:`rngd` is that chain.

The layer *kinds*: an activation (name or object: per-neuron blocks ``(m, d, d)``, eq. 23),
``"linear"`` (one shared ``(d, d)`` block, eq. 22), ``"softmax"`` (the full ``(m d, m d)``
matrix, eq. 25) or ``None`` (pass-through).  Parameters that are not named in ``layers``
pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rfim_jax._src import activations as act_lib
from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src import solvers

LayerKind = Any  # str | Activation | None


class ScaleByRNGDState(NamedTuple):
    """State of :func:`scale_by_rngd`. Every field is a pytree of arrays.

    Attributes:
      count: number of updates done so far (int32).
      metrics: layer path -> moving average of the layer's stored RFIM blocks, shape
        (m, d, d) for an activation kind, (1, d, d) for "linear", (1, m d, m d) for "softmax".
      inverses: layer path -> the inverses of ``metrics`` at the last refresh, same shapes.
      skipped: layer path -> number of steps whose statistics were not finite and were skipped.
      fallbacks: layer path -> number of blocks whose inverse fell back (see
        :mod:`rfim_jax._src.solvers`) at the last refresh.
    """

    count: jax.Array
    metrics: dict[str, jax.Array]
    inverses: dict[str, jax.Array]
    skipped: dict[str, jax.Array]
    fallbacks: dict[str, jax.Array]


class _Layer(NamedTuple):
    """Static description of one preconditioned layer."""

    path: str
    kind: Any  # "softmax" or an Activation (never None here; "linear" is a Linear object)
    d_in: int
    m: int
    has_bias: bool

    @property
    def d(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        if self.kind == "softmax":
            return (1, self.m * self.d, self.m * self.d)
        if isinstance(self.kind, act_lib.Linear):
            return (1, self.d, self.d)
        return (self.m, self.d, self.d)

    def metric(self, blocks: jax.Array) -> metrics_lib.Metric:
        """Wraps stored blocks (or their inverses) in the matching representation."""
        if self.kind == "softmax":
            return metrics_lib.DenseMetric(blocks[0], num_neurons=self.m, has_bias=self.has_bias)
        if isinstance(self.kind, act_lib.Linear):
            return metrics_lib.SharedBlockMetric(blocks[0], num_neurons=self.m,
                                                 has_bias=self.has_bias)
        return metrics_lib.BlockDiagonalMetric(blocks, has_bias=self.has_bias)


def _resolve_kind(path: str, kind: LayerKind) -> Any:
    if kind is None:
        return None
    if isinstance(kind, str) and kind.lower() == "softmax":
        return "softmax"
    try:
        return act_lib.get_activation(kind)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"layer {path!r}: unknown kind {kind!r}. A kind is an activation name "
            f"({', '.join(act_lib.ACTIVATION_NAMES)}), an rfim_jax.Activation object, 'linear', "
            f"'softmax', or None."
        ) from e


def _resolve_layers(layers: Mapping[str, LayerKind] | None, default_kind, params) -> list[_Layer]:
    """Checks ``layers`` against the params tree and returns the static layer descriptions."""
    # optax.partition / optax.masked hand this transform MaskedNode leaves for the layers that
    # belong to another transform; those are not ours to precondition.
    available = [
        p for p in paths_lib.layer_paths(params)
        if not isinstance(paths_lib.get_by_path(params, p)["kernel"], optax.MaskedNode)
    ]
    if layers is None:
        layers = {p: default_kind for p in available}
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must map layer paths to kinds, e.g. {{'Dense_0': 'relu'}}, got "
            f"{type(layers).__name__}."
        )
    out = []
    for path, kind in layers.items():
        kind = _resolve_kind(path, kind)
        node = paths_lib.get_by_path(params, path)
        if node is None or not paths_lib.is_dense_layer(node):
            raise ValueError(
                f"layer {path!r} is not a dense layer of the params: no mapping with a 'kernel' "
                f"at that path. Dense layers found: {available}."
            )
        if kind is None:
            continue
        kernel = node["kernel"]
        if isinstance(kernel, optax.MaskedNode):
            raise ValueError(
                f"layer {path!r} is masked out of this transform (optax.partition or "
                f"optax.masked gives its params to another one); remove it from `layers`. "
                f"Layers this transform sees: {available}."
            )
        kernel, bias = metrics_lib.unpack_dense(node, f"layer {path!r}")
        out.append(
            _Layer(path, kind, int(kernel.shape[0]), int(kernel.shape[1]), bias is not None)
        )
    return out


def _layer_activations(activations, layer: _Layer) -> tuple[jax.Array, jax.Array]:
    """Fetches and checks one layer's inputs (n, d_in) and pre-activations (n, m)."""
    expected = (
        f"expected activations[{layer.path!r}] = {{'inputs': (n, {layer.d_in}), "
        f"'preacts': (n, {layer.m})}}"
    )
    entry = None if activations is None else paths_lib.get_by_path(activations, layer.path)
    if not isinstance(entry, Mapping) or "inputs" not in entry or "preacts" not in entry:
        raise ValueError(f"layer {layer.path!r}: no activations passed; {expected}.")
    x, z = jnp.asarray(entry["inputs"]), jnp.asarray(entry["preacts"])
    if x.ndim < 2 or x.shape[-1] != layer.d_in:
        raise ValueError(
            f"layer {layer.path!r}: inputs have shape {tuple(x.shape)}, but the kernel "
            f"({layer.d_in}, {layer.m}) expects width d_in={layer.d_in}; {expected}."
        )
    if z.ndim < 2 or z.shape[-1] != layer.m:
        raise ValueError(
            f"layer {layer.path!r}: preacts have shape {tuple(z.shape)}, but the kernel "
            f"({layer.d_in}, {layer.m}) expects width m={layer.m}; {expected}."
        )
    x = rfim_lib.flatten_batch(x)
    z = rfim_lib.flatten_batch(z)
    if x.shape[0] != z.shape[0]:
        raise ValueError(
            f"layer {layer.path!r}: inputs have {x.shape[0]} samples but preacts have "
            f"{z.shape[0]} (shapes {tuple(entry['inputs'].shape)} and "
            f"{tuple(entry['preacts'].shape)})."
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"layer {layer.path!r}: the batch is empty (inputs {tuple(x.shape)}, preacts "
            f"{tuple(z.shape)})."
        )
    dtype = rfim_lib.stats_dtype(x, z)
    return x.astype(dtype), z.astype(dtype)


def _fresh_blocks(layer: _Layer, x, z, damping) -> jax.Array:
    """This batch's damped RFIM blocks (step 1): ``G_hat_b + damping tr(G_hat_b)/d_b I``."""
    metric = rfim_lib.layer_rfim_from_activations(
        rfim_lib.augment(x, layer.has_bias), z, layer.kind, has_bias=layer.has_bias
    )
    return solvers.add_damping(metric.stored_blocks(), damping, relative=True)


def scale_by_rngd(
    layers: Mapping[str, LayerKind] | None,
    *,
    decay: float = 0.995,
    inverse_every: int = 100,
    damping: float = 1e-2,
    update_every: int = 1,
    normalize_max_eigenvalue: bool = False,
    solver: str = "auto",
    default_kind: LayerKind = "linear",
) -> optax.GradientTransformationExtraArgs:
    """Preconditions each dense layer's gradient by its inverse RFIM (paper Sec. 5, eqs. 31-33).

    Each ``update`` call, for each layer in ``layers``:

    1. computes this batch's RFIM ``G_hat`` from the captured ``inputs`` and ``preacts`` and
       damps each stored block ``b``: ``G_hat_b + damping * tr(G_hat_b)/d_b * I`` (eq. 30);
    2. updates the moving average ``G <- decay G + (1 - decay) G_hat`` (eq. 32), starting
       from ``G = I``;
    3. if ``count % inverse_every == 0`` (``count`` = updates done before this one, so the
       first call refreshes), recomputes the inverses of the current ``G`` inside the jit
       with ``lax.cond``;
    4. returns ``G_l^-1 [dkernel[:, l], dbias[l]]`` per neuron l (eq. 33), in param layout.

    Args:
      layers: maps a layer's path (params keys down to the dict holding "kernel", joined by
        "/", e.g. ``"Dense_1"`` or ``"block/Dense_0"``) to its kind: an activation name or
        object (``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"elu"``, ``rfim_jax.ReLU(...)``, ...),
        ``"linear"``, ``"softmax"``, or ``None`` (pass-through).  ``None`` means every dense
        layer with ``default_kind``.
      decay: moving-average rate lambda of eq. (32).
      inverse_every: T, the number of steps between inverse refreshes.
      damping: relative damping eps0: each fresh block gets ``eps0 tr(G_hat_b)/d_b`` on its
        diagonal.
      update_every: compute statistics only every k-th step (``count % k == 0``), with the
        decay raised to ``decay**k`` so that the average spans the same number of steps.
        ``k = 1`` is exactly the algorithm above.
      normalize_max_eigenvalue: Sec. 4's balancing: scale each layer's metric so its
        largest eigenvalue is 1 before inverting (estimated by power iteration at refresh
        time, so it costs nothing between refreshes).
      solver: the block-inverse method of :func:`rfim_jax.spd_inverse` ("auto" picks a
        LAPACK-free method that is safe on the backend).
      default_kind: the kind of every dense layer when ``layers`` is None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update is
      ``update(grads, state, params=None, *, activations, **extra_args)``; ``activations``
      mirrors the params nesting down to each layer, each mapping to
      ``{"inputs": (n..., d_in), "preacts": (n..., m)}`` (a flat dict keyed by path works
      too).  Leading batch axes are flattened into samples.
    """
    # Under optax.inject_hyperparams numeric arguments arrive as arrays; only Python numbers
    # can be validated (and specialised on) here.
    for name, val in (("inverse_every", inverse_every), ("update_every", update_every)):
        if isinstance(val, (int, float)) and (val < 1 or int(val) != val):
            raise ValueError(f"{name} must be a positive integer, got {val}.")
    stats_every_step = isinstance(update_every, (int, float)) and update_every == 1

    def init_fn(params):
        specs = _resolve_layers(layers, default_kind, params)
        metrics, inverses, skipped, fallbacks = {}, {}, {}, {}
        for layer in specs:
            kernel = paths_lib.get_by_path(params, layer.path)["kernel"]
            dtype = rfim_lib.stats_dtype(kernel)
            k, n, _ = layer.block_shape
            eye = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (k, n, n))
            metrics[layer.path] = eye
            # A distinct buffer: a state built outside jit can then be donated (donate_argnums).
            inverses[layer.path] = jnp.copy(eye)
            skipped[layer.path] = jnp.zeros([], jnp.int32)
            fallbacks[layer.path] = jnp.zeros([], jnp.int32)
        return ScaleByRNGDState(jnp.zeros([], jnp.int32), metrics, inverses, skipped, fallbacks)

    def update_fn(updates, state, params=None, *, activations=None, **extra_args):
        del params, extra_args
        specs = _resolve_layers(layers, default_kind, updates)
        count = state.count
        rate = jnp.asarray(decay) ** update_every
        do_stats = (count % update_every) == 0
        do_refresh = (count % inverse_every) == 0

        new_metrics, new_inverses, new_skipped, new_fallbacks = {}, {}, {}, {}
        for layer in specs:
            x, z = _layer_activations(activations, layer)
            old = state.metrics[layer.path]

            def ema(old=old, x=x, z=z, layer=layer):
                fresh = _fresh_blocks(layer, x, z, damping).astype(old.dtype)
                finite = jnp.all(jnp.isfinite(fresh))
                # A non-finite batch must not poison the average: keep the old one, count it.
                avg = jnp.where(finite, rate * old + (1.0 - rate) * fresh, old)
                return avg, (~finite).astype(jnp.int32)

            if stats_every_step:
                g, bad = ema()
            else:
                g, bad = jax.lax.cond(
                    do_stats, ema, lambda old=old: (old, jnp.zeros([], jnp.int32))
                )

            def refresh(g=g, prev=state.inverses[layer.path]):
                scale = solvers.spd_max_eigenvalue(g).max() if normalize_max_eigenvalue else 1.0
                inv, ok = solvers.spd_inverse_and_status(g / scale, method=solver, previous=prev)
                return inv, jnp.sum(~ok).astype(jnp.int32)

            def keep(prev=state.inverses[layer.path], fb=state.fallbacks[layer.path]):
                return prev, fb

            inv, fb = jax.lax.cond(do_refresh, refresh, keep)
            new_metrics[layer.path] = g
            new_inverses[layer.path] = inv
            new_skipped[layer.path] = state.skipped[layer.path] + bad
            new_fallbacks[layer.path] = fb

        by_path = {layer.path: layer for layer in specs}

        def precondition(path, grad_layer):
            layer = by_path[path]
            inv = layer.metric(new_inverses[path])
            v = {"kernel": grad_layer["kernel"]}
            if layer.has_bias:
                v["bias"] = grad_layer["bias"]
            out = inv.matvec(jax.tree.map(lambda a: a.astype(new_inverses[path].dtype), v))
            new = dict(grad_layer)
            for name, val in out.items():
                new[name] = val.astype(grad_layer[name].dtype)
            return new

        new_updates = paths_lib.map_layers(precondition, updates, set(by_path))
        # map_layers may rebuild container types (e.g. nested nnx.State); keep the grads' own
        # tree structure so later stages (optax.trace, nnx.Optimizer) see identical trees.
        new_updates = jax.tree.unflatten(
            jax.tree.structure(updates), jax.tree.leaves(new_updates)
        )
        new_state = ScaleByRNGDState(
            count=count + 1,
            metrics=new_metrics,
            inverses=new_inverses,
            skipped=new_skipped,
            fallbacks=new_fallbacks,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rngd(
    learning_rate: optax.ScalarOrSchedule,
    layers: Mapping[str, LayerKind] | None,
    *,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    decay: float = 0.995,
    inverse_every: int = 100,
    damping: float = 1e-2,
    update_every: int = 1,
    normalize_max_eigenvalue: bool = False,
    solver: str = "auto",
    default_kind: LayerKind = "linear",
) -> optax.GradientTransformationExtraArgs:
    """Relative natural gradient descent: ``chain(scale_by_rngd, trace, -learning_rate)``.

    The update is ``-learning_rate * trace_momentum(G^-1 grad)`` (eqs. 32-33 with heavy-ball
    momentum).  ``learning_rate`` may be an optax schedule; ``momentum=None`` drops the trace.
    The remaining keyword arguments are those of :func:`scale_by_rngd`.  Every numeric
    argument can be an ``optax.inject_hyperparams`` hyperparameter.
    """
    stages = [
        scale_by_rngd(
            layers,
            decay=decay,
            inverse_every=inverse_every,
            damping=damping,
            update_every=update_every,
            normalize_max_eigenvalue=normalize_max_eigenvalue,
            solver=solver,
            default_kind=default_kind,
        )
    ]
    if momentum is not None:
        stages.append(optax.trace(decay=momentum, nesterov=nesterov))
    stages.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*stages)


def scale_by_whitening(
    layers: Mapping[str, Any] | list[str] | None = None,
    *,
    decay: float = 0.995,
    inverse_every: int = 100,
    damping: float = 1e-2,
    update_every: int = 1,
    solver: str = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Whitening stage: every dense layer preconditioned by its linear-layer RFIM (eq. 22).

    The metric is ``A = mean x~ x~^T``, the layer input's (uncentred) second moment, shared by
    all neurons, so the step is ``A^-1 [dkernel; dbias]`` - the natural gradient of a linear
    Gaussian layer, which is the update whitening the inputs would give (Sec. 4, 5.1).  Same
    moving average, damping and refresh as :func:`scale_by_rngd`.

    Args:
      layers: the layers to whiten: a list of paths, or None for every dense layer.  A mapping
        is accepted too; its values are ignored.
    """
    if layers is not None:
        # A list of paths or a mapping (its kinds are ignored): every listed layer is linear.
        layers = {p: "linear" for p in layers}
    return scale_by_rngd(
        layers,
        decay=decay,
        inverse_every=inverse_every,
        damping=damping,
        update_every=update_every,
        solver=solver,
        default_kind="linear",
    )
