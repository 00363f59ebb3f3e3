"""Relative natural gradient descent as an optax transformation (paper Sec. 5, eqs. 30-33).

For each dense layer the optimiser keeps a moving average of the layer's RFIM, refreshes its
inverse every T steps, and preconditions the layer's gradient neuron by neuron:

    G_hat   <- RFIM of this batch (eqs. 22, 23, 25) + damping * tr(G_hat_b)/d_b * I    per block b
    G       <- decay * G + (1 - decay) * G_hat                                           (eq. 32)
    G^-1    <- inverse(G)          if count % inverse_every == 0                        (Sec. 5.2)
    w~_l    <- G_l^-1 [dkernel[:, l], dbias[l]]                                          (eq. 33)

G starts at the identity.  The learning rate and momentum come from the stages chained after
:func:`scale_by_rngd`; :func:`rngd` is that chain.

The layer *kinds*: an activation (name or object: per-neuron blocks, eq. 23), ``"linear"``
(one shared block, eq. 22), ``"softmax"`` (the full matrix, eq. 25) or ``None``
(pass-through).  Parameters that are not named in ``layers`` pass through unchanged.

Each layer's metric has a *representation* (SPEC §7), implemented by an estimator
(:mod:`rfim_jax._src.estimators`): ``"exact"`` (the blocks above), ``"eigen"`` (per-neuron
diagonals in the eigenbasis of the input second moment) or ``"diagonal"``.  This module only
resolves the layers and their estimators, counts, and runs the refresh ``lax.cond``;
:mod:`rfim_jax._src.alias` holds :func:`rngd` and :func:`scale_by_whitening`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import plan as plan_lib
from rfim_jax._src import sharding as sharding_lib
from rfim_jax._src import solvers as solvers_lib
from rfim_jax._src.arguments import concrete_number
from rfim_jax._src.estimators import for_layer

LayerKind = Any  # str | Activation | None


class ScaleByRNGDState(NamedTuple):
    """State of :func:`scale_by_rngd`. Every field is a pytree of arrays.

    Attributes:
      count: number of updates done so far (int32).
      metrics: layer path -> what is averaged every step.  Exact: the stored RFIM blocks,
        (m, d, d) for an activation kind, (1, d, d) for "linear", (1, m d, m d) for "softmax".
        Eigen: ``{"A": (d, d), "S": (m, d)}`` (S is (1, d) for "linear").  Diagonal:
        ``{"S": (m, d)}``.
        A stacked layer (a leading layer axis, SPEC §8) has the same with that axis first.
      inverses: layer path -> what is recomputed at a refresh.  Exact: the inverses of
        ``metrics``, same shapes.  Eigen: ``{"U": (d, d)}``.  Diagonal: ``{}``.
      skipped: layer path -> number of steps whose statistics were not finite, so the moving
        average kept its previous value.  The *update* of such a step is still computed from
        the gradient as given: guarding the params is the job of
        ``optax.apply_if_finite`` (README, "Guards").
      fallbacks: layer path -> number of blocks whose inverse (or eigendecomposition) fell
        back at the last refresh (see :mod:`rfim_jax._src.solvers`).
      rejected_updates: number of steps whose update (over all params) was not finite and
        was replaced by zeros (with ``skip_nonfinite=True``, the default), so that the params
        and the later stages (momentum) stay finite.
    """

    count: jax.Array
    metrics: dict[str, jax.Array]
    inverses: dict[str, jax.Array]
    skipped: dict[str, jax.Array]
    fallbacks: dict[str, jax.Array]
    rejected_updates: jax.Array


def _check_number(name: str, value, low, high, *, high_open=False) -> None:
    """Validates a hyperparameter whose value is known now (see :mod:`rfim_jax._src.arguments`).

    Raises:
      ValueError: if ``value`` lies outside ``[low, high]`` (``[low, high)`` with
        ``high_open``), or is NaN or infinite.
    """
    number = concrete_number(value)
    if number is None:
        return
    below = low is not None and number < low
    above = high is not None and (number >= high if high_open else number > high)
    if high is None and not below and not np.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}.")
    if below or above or not np.isfinite(number):
        if high is None:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
        raise ValueError(
            f"{name} must lie in [{low}, {high}{')' if high_open else ']'}, got {value}."
        )


def _check_count(name: str, value) -> None:
    """Validates a step count (``inverse_every``, ``update_every``) known now.

    Raises:
      ValueError: unless it is a positive integer.
    """
    number = concrete_number(value)
    if number is not None and (not np.isfinite(number) or number < 1 or int(number) != number):
        raise ValueError(f"{name} must be a positive integer, got {value}.")


def _check_state_dtype(state_dtype) -> None:
    """Raises TypeError unless ``state_dtype`` is None or a real floating dtype."""
    if state_dtype is None:
        return
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError as e:
        raise TypeError(f"state_dtype must be a floating dtype, got {state_dtype!r}.") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"state_dtype must be a real floating dtype (e.g. jnp.bfloat16), got {dtype.name}: "
            f"the moving averages would be truncated."
        )
    if jnp.finfo(dtype).bits < 16:
        raise TypeError(
            f"state_dtype {dtype.name} is not supported: the state is stored in float16, "
            f"bfloat16, float32 or float64 (an 8-bit float has a 2-3 bit mantissa, far below "
            f"what a moving average at decay 0.995 resolves)."
        )


def _check_hyper_dtype(name: str, value) -> None:
    """A float hyperparameter held in less than float32 has lost its meaning: refuse it."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        raise TypeError(
            f"{name} arrived as {jnp.dtype(dtype).name}, which holds about "
            f"{jnp.finfo(dtype).precision} significant digits: too few for a hyperparameter "
            f"(a decay of 0.9995 rounds to 1.0 in bfloat16). optax.inject_hyperparams stores "
            f"hyperparameters in the params' dtype; pass hyperparam_dtype=jnp.float32 to it."
        )


def _estimator_of(metrics, layer):
    """The estimator whose stats ``metrics[layer.path]`` are (see :class:`ScaleByRNGDState`)."""
    path = layer.path
    if path not in metrics:
        raise ValueError(
            f"layer {path!r} has no RNGD state; the state was initialised for "
            f"{sorted(metrics)}. Re-run init after changing `layers`."
        )
    stats = metrics[path]
    if not isinstance(stats, Mapping):
        return for_layer("exact", layer)
    return for_layer("eigen" if "A" in stats else "diagonal", layer)


def _check_refresh(refresh) -> bool | None:
    """The Python bool of a static ``refresh``, None for None or a boolean scalar array.

    Raises:
      TypeError: for anything else, naming what was given.
    """
    if refresh is None:
        return None
    if isinstance(refresh, (bool, np.bool_)):
        return bool(refresh)
    if (hasattr(refresh, "dtype") and jnp.dtype(refresh.dtype) == jnp.bool_
            and jnp.shape(refresh) == ()):
        return None
    got = (f"an array of dtype {refresh.dtype} and shape {tuple(jnp.shape(refresh))}"
           if hasattr(refresh, "dtype") else repr(refresh))
    raise TypeError(f"scale_by_rngd: refresh must be None, a Python bool or a scalar boolean "
                    f"array, got {got}.")


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
    representation: plan_lib.Representation = "auto",
    exact_budget_bytes: int | None = None,
    max_state_bytes: int | None = None,
    state_dtype: Any = None,
    axis_name: str | None = None,
    skip_nonfinite: bool = True,
    stacked_layers: Iterable[str] = (),
) -> optax.GradientTransformationExtraArgs:
    """Preconditions each layer's gradient by its inverse RFIM (paper Sec. 5, eqs. 31-33).

    Each ``update`` call, for each layer in ``layers``:

    1. computes this batch's RFIM ``G_hat`` from the captured ``inputs`` and ``preacts`` and
       damps each stored block ``b``: ``G_hat_b + damping * tr(G_hat_b)/d_b * I`` (eq. 30);
    2. updates the moving average ``G <- decay G + (1 - decay) G_hat`` (eq. 32), starting
       from ``G = I``;
    3. if ``count % inverse_every == 0`` (``count`` = updates done before this one, so the
       first call refreshes), recomputes the inverses of the current ``G`` inside the jit
       with ``lax.cond``; also, early, when a block of the exact representation has
       outgrown its stored inverse (``sum_i G_ii M_ii / n`` past 10 times its
       post-refresh bound ``(1 + damping) / damping``: a unit dead at the last refresh
       that fires again would otherwise get a step up to 1e15 times too long);
    4. returns ``G_l^-1 [dkernel[:, l], dbias[l]]`` per neuron l (eq. 33), in param layout.

    With ``representation="eigen"`` the same four steps run on ``A``, ``U`` and ``S``
    (SPEC §7, :mod:`rfim_jax._src.estimators.eigen`): fresh ``A_hat`` and
    ``S_hat_l = mean nu (U^T x~)^2`` (damped), their moving averages, at a refresh
    ``U <- eigenvectors(A)`` with S carried into the new basis, and the step
    ``U diag(1/s_l) U^T g_l``.  ``"diagonal"`` keeps ``diag(G_l)`` and divides by it.

    Args:
      layers: maps a layer's path (params keys down to the dict holding "kernel", joined by
        "/", e.g. ``"Dense_1"`` or ``"block/Dense_0"``) to its kind: an activation name or
        object (``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"elu"``, ``"gelu"``,
        ``rfim_jax.ReLU(...)``, ...), ``"linear"``, ``"softmax"``, or ``None``
        (pass-through).  Layers (SPEC §8): Dense, multi-axis dense (DenseGeneral, Einsum),
        convolutions (over their patches), and, when named with ``"linear"``, embeddings
        (``{"embedding"}``) and LayerNorm/RMSNorm (``{"scale", "bias"}``); any of them may be
        stacked along a leading layer axis.  ``None`` means every kernel layer with
        ``default_kind``.
      decay: moving-average rate lambda of eq. (32), in [0, 1).
      inverse_every: T >= 1, the number of steps between refreshes (inverses, or the eigenbasis).
      damping: relative damping eps0 >= 0: each fresh block gets ``eps0 tr(G_hat_b)/d_b`` on
        its diagonal.
      update_every: compute statistics only every k-th step (``count % k == 0``, k >= 1), with
        the decay raised to ``decay**k`` so that the average spans the same number of steps.
        ``k = 1`` is exactly the algorithm above.
      normalize_max_eigenvalue: Sec. 4's balancing: scale each layer's metric so its largest
        eigenvalue is 1 (exact: estimated by power iteration at refresh time; eigen and
        diagonal: the largest scale, every step).
      solver: the block-inverse method of :func:`rfim_jax.spd_inverse` ("auto" picks a
        LAPACK-free method that is safe on the backend); exact representation only.
      default_kind: the kind of every dense layer when ``layers`` is None.
      representation: ``"auto"`` (default), ``"exact"``, ``"eigen"``, ``"diagonal"``, or a
        mapping from path to one of these (unlisted layers are ``"auto"``).  ``"auto"`` keeps
        a layer exact while its exact state fits ``exact_budget_bytes``, else eigen.
        :func:`rfim_jax.rngd_plan` reports the choice before anything is allocated.
      exact_budget_bytes: the per-layer budget of ``"auto"``; None (the default) is 256 MiB.
        None rather than a number, so that ``optax.inject_hyperparams`` does not turn the
        default into a traced hyperparameter (a budget decides the state's layout, so it must
        be concrete; pass an explicit one with ``static_args=("exact_budget_bytes",)``).
      max_state_bytes: if set, ``init`` refuses any layer whose state needs more bytes,
        with an error naming the layer, its kind, representation and bytes, and the
        cheaper representations.
      state_dtype: the dtype the state is *stored* in (e.g. ``jnp.bfloat16``, like optax's
        ``mu_dtype``); statistics are always accumulated in at least float32.  In a float
        narrower than float32 the moving averages are stored by unbiased stochastic rounding
        (keyed by the step count and the layer), which keeps a ``(1 - decay)`` step that
        rounding to nearest would drop.  Default: the kernel's dtype promoted to at least
        float32.
      axis_name: for SPMD training where each program instance sees its own shard of the
        batch (``jax.pmap``, ``shard_map``): the mapped axis over which the fresh statistics
        are averaged (``lax.pmean``), as K-FAC implementations do, so that replicas stay
        identical and equal one device on the global batch.  Not needed under ``jax.jit``
        with shardings, where the statistics are already global.
      skip_nonfinite: if any entry of this step's update (over all params, the pass-through
        ones included) is not finite, return zeros instead and count the step in
        ``state.rejected_updates``, so that one NaN batch cannot make the params NaN.  The
        moving averages of that step are kept as computed (their own non-finite guard is
        ``state.skipped``).  ``optax.apply_if_finite`` around the whole chain additionally
        drops the momentum's step.
      stacked_layers: paths of layers whose params carry a leading layer axis L (``nn.scan``,
        ``nnx.scan``, a ``vmap`` over layers) that their shapes alone do not reveal: a
        bias-free kernel ``(L, d_in, m)`` otherwise reads as one multi-axis layer, and a
        bias-free norm scale ``(L, D)`` is refused.  A stack with a bias ``(L, m)`` is
        recognised without it.  Each slice is then an independent layer (SPEC §8).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update is
      ``update(grads, state, params=None, *, activations, refresh=None, **extra_args)``;
      ``activations`` mirrors the params nesting down to each layer, each mapping to
      ``{"inputs": (n..., d_in), "preacts": (n..., m)}`` (a flat dict keyed by path works
      too).  Leading batch axes are flattened into samples.  ``refresh`` decides this step's
      refresh of the inverses: ``None`` (default) when ``count % inverse_every == 0``, and
      also on a step whose updated statistics have outgrown a stored exact inverse (a
      unit dead at the last refresh that fires again; see "Stale inverses" in
      :mod:`rfim_jax._src.estimators.exact`); a Python bool decides it when the step is
      traced, so the compiled step holds no conditional (on a GPU the conditional around
      cuSOLVER reads its predicate back to the host every step; compile one step with
      ``refresh=True`` and one with ``False`` and pick in Python, as kfac-jax does); a
      scalar boolean array is the conditional's predicate.  A caller who decides the
      refresh decides it alone: no early refresh is added.  Passing
      ``refresh=(count % inverse_every == 0)`` gives the default's updates exactly while
      no inverse goes stale.

    Raises:
      ValueError: for a hyperparameter out of its range, an unknown kind or representation,
        a path that is not a dense layer, a state over ``max_state_bytes`` (at ``init``), or
        activations of the wrong shapes (at ``update``, naming the layer and the shapes).
      TypeError: for float hyperparameters held in less than float32 (see
        ``optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)``), or (at ``update``)
        a ``refresh`` that is not None, a bool or a scalar boolean array.

    References:
      Sun & Nielsen, "Relative Fisher Information and Natural Gradient for Learning Large
      Modular Models", ICML 2017, Sec. 5.  George et al., "Fast Approximate Natural Gradient
      Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018 (the eigen representation).
    """
    # Under optax.inject_hyperparams numeric arguments arrive as arrays: those known now
    # (concrete, at init) are validated, traced ones cannot be (see concrete_number).
    for name, val in (("inverse_every", inverse_every), ("update_every", update_every)):
        _check_count(name, val)
    for name, val in (("decay", decay), ("damping", damping)):
        _check_hyper_dtype(name, val)  # first: a bfloat16 0.9995 arrives as 1.0
    _check_number("decay", decay, 0.0, 1.0, high_open=True)
    _check_number("damping", damping, 0.0, None)
    _check_state_dtype(state_dtype)
    solvers_lib.check_method(solver)
    for name, val in (("exact_budget_bytes", exact_budget_bytes),
                      ("max_state_bytes", max_state_bytes)):
        if not isinstance(val, jax.core.Tracer):  # a traced one is refused at init
            plan_lib.concrete_bytes(name, val)
    # Read once: a generator would be used up by the first reading.
    stacked_layers = plan_lib.check_stacked_layers(stacked_layers)
    plan_lib.check_request(layers, default_kind, representation, stacked_layers)
    stats_every_step = concrete_number(update_every) == 1

    def init_fn(params):
        specs = plan_lib.resolve_layers(layers, default_kind, params, stacked_layers)
        plans = plan_lib.plan_layers(
            specs, params, representation, exact_budget_bytes, state_dtype
        )
        plan_lib.check_budget(plans, max_state_bytes)
        resolved = [(layer, for_layer(plans[layer.path].representation, layer))
                    for layer in specs]
        metrics, inverses, skipped, fallbacks = {}, {}, {}, {}
        for layer, est in resolved:
            kernel = paths_lib.get_by_path(params, layer.path)[layer.weights_key]
            dtype = plan_lib.storage_dtype(kernel, state_dtype)
            stats, factors = est.init(layer, dtype)
            stats_axes, factors_axes = est.neuron_axes(layer)
            metrics[layer.path] = sharding_lib.shard_like_kernel(stats, stats_axes, kernel)
            inverses[layer.path] = sharding_lib.shard_like_kernel(factors, factors_axes, kernel)
            skipped[layer.path] = jnp.zeros([], jnp.int32)
            fallbacks[layer.path] = jnp.zeros([], jnp.int32)
        zero = jnp.zeros([], jnp.int32)
        return _distinct_buffers(
            ScaleByRNGDState(zero, metrics, inverses, skipped, fallbacks, zero))

    def update_fn(updates, state, params=None, *, activations=None, refresh=None, **extra_args):
        del params, extra_args
        static_refresh = _check_refresh(refresh)
        for name, val in (("decay", decay), ("damping", damping)):
            _check_hyper_dtype(name, val)
        specs = plan_lib.resolve_layers(layers, default_kind, updates, stacked_layers,
                                        tree_name="grads")
        # The representation was decided at init; the state's own structure says which.
        resolved = [(layer, _estimator_of(state.metrics, layer)) for layer in specs]
        _check_state_fits(state, resolved)
        count = state.count
        rate = jnp.asarray(decay)
        # The decay acts in at least float32 (a bfloat16 0.9995 is 1.0).
        rate = rate.astype(dtypes_lib.at_least_float32(rate)) ** update_every
        do_stats = (count % update_every) == 0
        do_refresh = (count % inverse_every) == 0

        # Per layer: its rows, checked, and its state in the working dtype.
        work_stats, work_factors, rows, rates = {}, {}, {}, {}
        for layer, est in resolved:
            x_aug, z = layer.rows(activations)
            layer.check_rows(x_aug, est.name)
            stored_stats, stored_factors = state.metrics[layer.path], state.inverses[layer.path]
            # Accumulate in at least float32 whatever the storage dtype (state_dtype).
            work = dtypes_lib.at_least_float32(x_aug, *jax.tree.leaves(stored_stats))
            work_stats[layer.path] = jax.tree.map(lambda a, w=work: a.astype(w), stored_stats)
            work_factors[layer.path] = jax.tree.map(lambda a, w=work: a.astype(w),
                                                    stored_factors)
            rows[layer.path] = (x_aug, z)
            rates[layer.path] = rate.astype(work)

        # One lax.cond for the statistics of all layers and one for all refreshes, not one
        # per layer: on a GPU each conditional costs a device-to-host read of its predicate,
        # and on any backend each is a separate region XLA cannot fuse across.
        def layer_stats(stats, rows, factors, rates, damping):
            out, bad = {}, {}
            for layer, est in resolved:
                x_aug, z = rows[layer.path]
                out[layer.path], bad[layer.path] = est.update(
                    layer, stats[layer.path], factors[layer.path], x_aug, z, damping,
                    rates[layer.path], axis_name)
            return out, bad

        def all_stats(stats):
            # Under explicit sharding the sample axes may be split over devices.  Every array
            # goes in as an argument (a closed-over one, e.g. an injected damping, would keep
            # its explicit mesh inside the automatic region).
            new, bad = sharding_lib.global_statistics(
                layer_stats, stats, rows, work_factors, rates, damping)
            # A stored inverse that the updated blocks have outgrown makes this step a
            # refresh (estimators.exact, "Stale inverses"); only updated blocks can outgrow.
            stale = jnp.zeros([], bool)
            for layer, est in resolved:
                stale = stale | est.stale(layer, new[layer.path], work_factors[layer.path],
                                          damping=damping, normalize=normalize_max_eigenvalue)
            return new, bad, stale

        def no_stats(stats):
            return (stats, {layer.path: jnp.zeros([], jnp.int32) for layer, _ in resolved},
                    jnp.zeros([], bool))

        if stats_every_step:
            stats, bad, stale = all_stats(work_stats)
        else:
            stats, bad, stale = jax.lax.cond(do_stats, all_stats, no_stats, work_stats)

        serial = solvers_lib.needs_serial_calls(solver)
        # Stats that a refresh leaves unchanged stay out of the cond (refresh_keeps_stats).
        changed = [layer.path for layer, est in resolved if not est.refresh_keeps_stats]

        def all_refresh(changing, factors, fallbacks):
            new_stats, new_factors, new_fb = {}, {}, {}
            # With a solver whose calls must not run concurrently (LAPACK on the CPU, see
            # solvers.needs_serial_calls) the layers refresh one after another: each layer's
            # input depends on the last layer's fallback count (an exact float zero is added).
            after = jnp.zeros([], jnp.float32)
            for layer, est in resolved:
                path = layer.path
                s = changing[path] if path in changing else stats[path]
                if serial:
                    s = jax.tree.map(lambda a, t=after: a + (0.0 * t).astype(a.dtype), s)
                out = est.refresh(layer, s, factors[path], solver=solver,
                                  normalize=normalize_max_eigenvalue)
                after = out[2].astype(jnp.float32)
                new_s, new_factors[path] = sharding_lib.match_sharding(
                    out[:2], (s, factors[path]))
                if path in changing:
                    new_stats[path] = new_s
                new_fb[path] = out[2]
            return new_stats, new_factors, new_fb

        def keep(changing, factors, fallbacks):
            return changing, factors, fallbacks

        operands = ({p: stats[p] for p in changed}, work_factors, dict(state.fallbacks))
        if static_refresh is not None:  # decided in Python: no conditional in the step
            changing, factors, fallbacks = (all_refresh if static_refresh else keep)(*operands)
        else:
            predicate = (do_refresh | stale) if refresh is None else jnp.asarray(refresh)
            changing, factors, fallbacks = jax.lax.cond(predicate, all_refresh, keep,
                                                        *operands)
        stats = {**stats, **changing}

        new_metrics, new_inverses, new_skipped, new_fallbacks = {}, {}, {}, {}
        preconditioners = {}
        # Moving averages stored narrower than float32 are rounded stochastically, from a key
        # that depends only on the step count and the layer (see dtypes.stochastic_round).
        narrow = any(dtypes_lib.narrower_than_float32(a.dtype)
                     for a in jax.tree.leaves(state.metrics))
        store_key = jax.random.fold_in(jax.random.key(0), count) if narrow else None
        for index, (layer, est) in enumerate(resolved):
            path = layer.path
            preconditioners[path] = (layer, est.preconditioner(
                layer, stats[path], factors[path], normalize=normalize_max_eigenvalue))
            new_metrics[path] = _store_averages(
                stats[path], state.metrics[path],
                None if store_key is None else jax.random.fold_in(store_key, index))
            new_inverses[path] = jax.tree.map(
                lambda a, s: a.astype(s.dtype), factors[path], state.inverses[path])
            new_skipped[path] = state.skipped[path] + bad[path]
            new_fallbacks[path] = fallbacks[path]

        def precondition(path, grad_layer):
            layer, pre = preconditioners[path]
            dtype = jax.tree.leaves(pre)[0].dtype
            cols = layer.columns(grad_layer, dtype)
            new = layer.write_columns(grad_layer, pre.matvec_columns(cols))
            return sharding_lib.match_sharding(new, dict(grad_layer))

        new_updates = paths_lib.map_layers(precondition, updates, set(preconditioners))
        # map_layers may rebuild container types (e.g. nested nnx.State); keep the grads' own
        # tree structure so later stages (optax.trace, nnx.Optimizer) see identical trees.
        new_updates = jax.tree.unflatten(
            jax.tree.structure(updates), jax.tree.leaves(new_updates)
        )
        rejected = state.rejected_updates
        if skip_nonfinite:
            finite = jnp.all(jnp.stack(
                [jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(new_updates)]))
            new_updates = jax.tree.map(
                lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
            rejected = rejected + (~finite).astype(jnp.int32)
        new_state = ScaleByRNGDState(
            count=optax.safe_increment(count),
            metrics=new_metrics,
            inverses=new_inverses,
            skipped=new_skipped,
            fallbacks=new_fallbacks,
            rejected_updates=rejected,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_state_fits(state: ScaleByRNGDState, resolved) -> None:
    """Raises unless the state was built for exactly these layers, kinds and shapes.

    A state restored from a checkpoint after a layer's kind or width changed would otherwise
    fail deep inside the statistics with a bare broadcasting error, or silently change its own
    shapes between steps (which breaks a ``lax.scan`` carry).

    Raises:
      ValueError: naming the layer, the state's shapes and the shapes its layer needs.
    """
    extra = sorted(set(state.metrics) - {layer.path for layer, _ in resolved})
    if extra:
        raise ValueError(
            f"the RNGD state holds layers that this transform does not precondition: {extra}; "
            f"it was initialised for {sorted(state.metrics)}. Re-run init after changing "
            f"`layers`."
        )
    for layer, est in resolved:
        path = layer.path
        got = jax.tree.map(lambda a: tuple(a.shape), (state.metrics[path], state.inverses[path]))
        stored = jax.tree.leaves(state.metrics[path])[0].dtype
        want = jax.tree.map(lambda a: tuple(a.shape),
                            jax.eval_shape(lambda e=est, l=layer, t=stored: e.init(l, t)))
        if got != want:
            kind = plan_lib.kind_name(layer.kind)
            raise ValueError(
                f"layer {path!r}: the RNGD state has shapes {got} but the layer, read from "
                f"this update's grads ({est.name} representation, kind {kind!r}, d={layer.d}, "
                f"m={layer.m}), needs {want}. Re-run init after changing a layer's "
                f"kind or width; the grads must have the params' structure and shapes (bias "
                f"included)."
            )


def _distinct_buffers(tree: Any) -> Any:
    """``tree`` with no array object appearing twice (later uses are copied).

    ``jax.jit(..., donate_argnums=...)`` refuses a state in which two leaves share a buffer
    ("Attempt to donate the same buffer twice"), which an eager ``init`` could otherwise build
    by reusing one array (a zero counter, an identity start).  Under ``jit`` the copies are free.
    """
    seen: set[int] = set()

    def distinct(a):
        if id(a) in seen:
            return jnp.copy(a)
        seen.add(id(a))
        return a

    return jax.tree.map(distinct, tree)


def _store_averages(work: Any, stored: Any, key: jax.Array | None) -> Any:
    """Casts a layer's moving averages ``work`` back to the dtypes of ``stored``.

    A float narrower than float32 (bfloat16, float16) takes unbiased stochastic rounding; any
    other dtype the plain cast, one key per leaf, since rounding to nearest
    would drop the average's small steps (``(1 - decay) = 0.005`` of the value by default).
    """
    leaves, treedef = jax.tree.flatten(work)
    out = [
        dtypes_lib.stochastic_round(a, s.dtype, jax.random.fold_in(key, i))
        if dtypes_lib.narrower_than_float32(s.dtype) else a.astype(s.dtype)
        for i, (a, s) in enumerate(zip(leaves, jax.tree.leaves(stored), strict=True))
    ]
    return jax.tree.unflatten(treedef, out)
