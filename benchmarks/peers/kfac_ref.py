"""A plain-JAX K-FAC for dense layers, written here as an extra reference (not the peer).

Kronecker factors ``A = E[x~ x~^T]`` and ``S = E[g g^T]`` (``g`` the gradient of the
log-likelihood of a label sampled from the model with respect to the pre-activations), a
moving average, factored Tikhonov damping, inverses every ``inverse_every`` steps, then
heavy-ball momentum and the learning rate.  kfac-jax (:mod:`benchmarks.peers.kfac_jax`) is the
real peer; this one is kept because it shares RNGD's structure (T, moving averages, the same
step function), so the per-step costs of the two compare like for like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import rfim_jax
from experiments import models as mlp

FAMILY = "kfac_ref"
DISTRIBUTION = None
SHIMS_APPLIED: list[str] = []


def load():
    """Nothing to import: the reference ships with the benchmarks."""
    return None


def describe(method) -> str:
    """One line of the configuration of ``method``."""
    return (f"plain-JAX K-FAC reference (lr={method.learning_rate:g}, "
            f"momentum={method.momentum:g}, EMA {method.decay:g}, damping {method.damping:g}, "
            f"inverses every {method.inverse_every})")


class KFACRefState(NamedTuple):
    """State of :func:`scale_by_kfac_ref`: step count, factors and their inverses by path."""

    count: jax.Array
    a: dict[str, jax.Array]
    s: dict[str, jax.Array]
    a_inv: dict[str, jax.Array]
    s_inv: dict[str, jax.Array]


def _columns(layer: Mapping[str, jax.Array], has_bias: bool) -> jax.Array:
    """``[kernel; bias]``, (d_in (+1), m)."""
    if not has_bias:
        return layer["kernel"]
    return jnp.concatenate([layer["kernel"], layer["bias"][None]], axis=0)


def _from_columns(cols: jax.Array, has_bias: bool) -> dict[str, jax.Array]:
    if not has_bias:
        return {"kernel": cols}
    return {"kernel": cols[:-1], "bias": cols[-1]}


def scale_by_kfac_ref(
    paths: Sequence[str], *, decay: float = 0.95, damping: float = 1e-3, inverse_every: int = 20
) -> optax.GradientTransformationExtraArgs:
    """A plain K-FAC preconditioner for dense layers (Martens & Grosse 2015).

    Per layer: ``A <- decay A + (1 - decay) mean x~ x~^T``, ``S <- decay S + (1 - decay)
    mean g g^T``; every ``inverse_every`` steps ``A^-1, S^-1`` of the factored-Tikhonov-damped
    factors ``A + pi sqrt(lambda) I`` and ``S + sqrt(lambda)/pi I``,
    ``pi = sqrt((tr A / d) / (tr S / m))``; the update is ``A^-1 [dkernel; dbias] S^-1``.

    Args:
      paths: the dense layers' paths in the params dict.
      decay: moving-average decay of the factors.
      damping: lambda of the factored Tikhonov damping.
      inverse_every: steps between inverse refreshes (the first step refreshes).

    Returns:
      A transformation whose ``update`` takes ``activations`` (as RNGD's: path ->
      ``{"inputs": (n, d_in), ...}``) and ``preact_grads`` (path -> (n, m)).
    """

    def init_fn(params):
        a, s = {}, {}
        for p in paths:
            layer = params[p]
            d = layer["kernel"].shape[0] + int("bias" in layer)
            a[p] = jnp.eye(d, dtype=layer["kernel"].dtype)
            s[p] = jnp.eye(layer["kernel"].shape[1], dtype=layer["kernel"].dtype)
        copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 - distinct buffers for donation
        return KFACRefState(jnp.zeros([], jnp.int32), a, s, copy(a), copy(s))

    def update_fn(updates, state, params=None, *, activations, preact_grads, **extra):
        del params, extra
        do_refresh = state.count % inverse_every == 0
        new = KFACRefState(state.count + 1, {}, {}, {}, {})
        out = dict(updates)
        for p in paths:
            has_bias = "bias" in updates[p]
            x = activations[p]["inputs"]
            if has_bias:
                x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=-1)
            g = preact_grads[p]
            n = x.shape[0]
            a = decay * state.a[p] + (1 - decay) * (x.T @ x) / n
            s = decay * state.s[p] + (1 - decay) * (g.T @ g) / n

            def refresh(a=a, s=s):
                pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / (jnp.trace(s) / s.shape[0]))
                root = math.sqrt(damping)
                a_inv = rfim_jax.spd_inverse(rfim_jax.add_damping(a[None], pi * root))[0]
                s_inv = rfim_jax.spd_inverse(rfim_jax.add_damping(s[None], root / pi))[0]
                return a_inv, s_inv

            a_inv, s_inv = jax.lax.cond(
                do_refresh, refresh, lambda p=p: (state.a_inv[p], state.s_inv[p])
            )
            cols = _columns(updates[p], has_bias)
            out[p] = dict(updates[p]) | _from_columns(a_inv @ cols @ s_inv, has_bias)
            new.a[p], new.s[p], new.a_inv[p], new.s_inv[p] = a, s, a_inv, s_inv
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sampled_preact_grads(params, activations: Mapping, logits: jax.Array,
                         labels: jax.Array) -> dict[str, jax.Array]:
    """Per-sample ``d log p(labels | x) / dz`` of every dense layer of the relu MLP.

    Backpropagation written out (one extra backward pass, as in K-FAC): at the logits
    ``softmax - onehot``, then ``g_i = (g_{i+1} W_{i+1}^T) * relu'(z_i)``.
    """
    num = len(activations)
    g = jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    out = {mlp.dense_name(num - 1): g}
    for i in range(num - 2, -1, -1):
        g = (g @ params[mlp.dense_name(i + 1)]["kernel"].T) * (
            activations[mlp.dense_name(i)]["preacts"] > 0
        )
        out[mlp.dense_name(i)] = g
    return out


def make_optimizer(method, sizes: Sequence[int]) -> optax.GradientTransformation:
    """K-FAC reference, heavy-ball momentum, learning rate: the configuration of ``method``."""
    paths = [mlp.dense_name(i) for i in range(len(sizes) - 1)]
    return optax.chain(
        scale_by_kfac_ref(paths, decay=method.decay, damping=method.damping,
                          inverse_every=method.inverse_every),
        optax.trace(decay=method.momentum),
        optax.scale_by_learning_rate(method.learning_rate),
    )


def extra_args(params, activations, logits, key) -> dict:
    """The update's ``activations`` and ``preact_grads`` (labels sampled from the model)."""
    sampled = jax.random.categorical(key, jax.lax.stop_gradient(logits))
    return {"activations": activations,
            "preact_grads": sampled_preact_grads(params, activations, logits, sampled)}
