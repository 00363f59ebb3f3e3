"""Aliases built on :func:`scale_by_rngd`: :func:`rngd` and :func:`scale_by_whitening`.

Like optax's ``_src/alias.py``, the aliases live apart from the transformation they chain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import optax

from rfim_jax._src import activations as act_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src.arguments import concrete_number
from rfim_jax._src.plan import Representation
from rfim_jax._src.transform import LayerKind, scale_by_rngd


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
    representation: Representation = "auto",
    exact_budget_bytes: int | None = None,
    max_state_bytes: int | None = None,
    state_dtype: Any = None,
    axis_name: str | None = None,
    skip_nonfinite: bool = True,
    stacked_layers: Iterable[str] = (),
) -> optax.GradientTransformationExtraArgs:
    """Relative natural gradient descent: ``chain(scale_by_rngd, trace, -learning_rate)``.

    The update is ``-learning_rate * trace_momentum(G^-1 grad)`` (eqs. 32-33 with heavy-ball
    momentum).  Every numeric argument except ``exact_budget_bytes`` and ``max_state_bytes``
    can be an ``optax.inject_hyperparams`` hyperparameter (give it
    ``hyperparam_dtype=jnp.float32`` when the params are bfloat16); those two size the state
    when it is built, so they must stay static (``static_args``).

    Args:
      learning_rate: a float or an optax schedule.
      layers: path -> kind, as in :func:`scale_by_rngd`; None for every dense layer.
      momentum: heavy-ball momentum in [0, 1) (``optax.trace``); None drops the trace.
      nesterov: Nesterov momentum.
      decay, inverse_every, damping, update_every, normalize_max_eigenvalue, solver,
        default_kind, representation, exact_budget_bytes, max_state_bytes, state_dtype,
        axis_name, skip_nonfinite, stacked_layers:
        those of :func:`scale_by_rngd`.  ``damping`` is *relative* here (``eps0 tr(G)/d``),
        whereas the metrics' ``solve`` and :func:`rfim_jax.add_damping` take absolute
        damping unless told ``relative=True``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its update needs ``activations=`` and
      takes ``refresh=`` (None, a Python bool decided at trace time, or a boolean scalar:
      see :func:`scale_by_rngd`).

    Raises:
      ValueError: as :func:`scale_by_rngd`, and for a momentum outside [0, 1).

    References:
      Sun & Nielsen, ICML 2017, Sec. 5 (eqs. 31-33).
    """
    known = concrete_number(momentum)
    if known is not None and not 0.0 <= known < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}.")
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
            representation=representation,
            exact_budget_bytes=exact_budget_bytes,
            max_state_bytes=max_state_bytes,
            state_dtype=state_dtype,
            axis_name=axis_name,
            skip_nonfinite=skip_nonfinite,
            stacked_layers=stacked_layers,
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
    stacked_layers: Iterable[str] = (),
) -> optax.GradientTransformationExtraArgs:
    """Whitening stage: every dense layer preconditioned by its linear-layer RFIM (eq. 22).

    The metric is ``A = mean x~ x~^T``, the layer input's (uncentred) second moment, shared by
    all neurons, so the step is ``A^-1 [dkernel; dbias]`` - the natural gradient of a linear
    Gaussian layer, which is the update whitening the inputs would give (Sec. 4, 5.1).  Same
    moving average, damping and refresh as :func:`scale_by_rngd`.

    Args:
      layers: the layers to whiten: a list of paths, or None for every dense layer.  A mapping
        is accepted too; its values must be ``"linear"``, a ``Linear(sigma)`` (one shared
        block: ``per_neuron=False``; a sigma is kept) or None (the layer's gradient passes
        through unchanged, as in :func:`scale_by_rngd`).
      decay, inverse_every, damping, update_every, solver, stacked_layers: as in
        :func:`scale_by_rngd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its update needs ``activations=``.

    Raises:
      TypeError: for a bare string (a single layer comes as a list, ``["Dense_0"]``).
      ValueError: for a mapping whose kind is not the shared linear kind (whitening is the
        linear kind; use :func:`scale_by_rngd` for other kinds), and as :func:`scale_by_rngd`.
    """
    if isinstance(layers, str):
        raise TypeError(
            f"scale_by_whitening: layers must be a list of paths, a mapping or None, got the "
            f"string {layers!r}; a single layer is [{layers!r}]."
        )
    if isinstance(layers, Mapping):
        for path, kind in layers.items():
            if kind is None:  # pass-through, as in scale_by_rngd
                continue
            if not act_lib.is_shared_linear(rfim_lib.resolve_kind(kind,
                                                                   where=f"layer {path!r}")):
                raise ValueError(
                    f"scale_by_whitening: layer {path!r} was given kind {kind!r}, but whitening "
                    f"is the 'linear' kind with one shared block (per_neuron=False); use "
                    f"rfim_jax.scale_by_rngd for other kinds."
                )
    if isinstance(layers, Mapping):
        layers = dict(layers)  # its kinds, a Linear(sigma)'s sigma included
    elif layers is not None:
        # A list of paths: every listed layer is linear.
        layers = {p: "linear" for p in layers}
    return scale_by_rngd(
        layers,
        decay=decay,
        inverse_every=inverse_every,
        damping=damping,
        update_every=update_every,
        solver=solver,
        default_kind="linear",
        stacked_layers=stacked_layers,
    )
