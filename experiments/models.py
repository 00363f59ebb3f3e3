"""A plain-JAX ReLU MLP with optional batch normalisation, for the Fig. 5 and Sec. 4 experiments.

The network is ``sizes = (d_0, d_1, ..., d_L)``: dense layers ``Dense_0 .. Dense_{L-1}``, relu
between them and softmax logits at the end (paper Sec. 5.2: 784-64-64-64-10).  Params follow
Flax's layout so that RNGD's layer paths are ``"Dense_0"``, ``"Dense_1"``, ...::

    {"Dense_i": {"kernel": (d_i, d_{i+1}), "bias": (d_{i+1},)},
     "BatchNorm_j": {"scale": (d_{j+1},), "bias": (d_{j+1},)}}      # hidden layers, with BN

Batch normalisation (Ioffe & Szegedy 2015, with a learnt scale and shift, epsilon 1e-3 as in
the paper) sits on every hidden layer j:

- ``"before"`` (the paper's BNB): ``h = relu(BN(x W + b))`` -- normalises pre-activations;
- ``"after"`` (the paper's BNA):  ``h = BN(relu(x W + b))`` -- normalises post-activations;
- ``"none"`` (PLAIN).

``BN(u) = scale * (u - mean) / sqrt(var + eps) + bias`` with the batch's mean and (biased)
variance in training mode, or given statistics in inference mode.  There is no running average
in the params: :func:`population_stats` computes the inference statistics from the training
set once training is done (Ioffe & Szegedy, Alg. 2), which keeps the train step pure.

:func:`mlp_apply` also returns, for RNGD, each dense layer's inputs and pre-activations
``{"Dense_i": {"inputs": (n, d_i), "preacts": (n, d_{i+1})}}`` from the same forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

BN_MODES = ("none", "before", "after")
#: the paper's names of the three architectures.
BN_NAMES = {"none": "PLAIN", "before": "BNB", "after": "BNA"}
BN_EPSILON = 1e-3

Params = dict[str, dict[str, jax.Array]]


def dense_name(i: int) -> str:
    return f"Dense_{i}"


def bn_name(j: int) -> str:
    return f"BatchNorm_{j}"


def _check_mode(batch_norm: str) -> str:
    if batch_norm not in BN_MODES:
        raise ValueError(
            f"batch_norm must be one of {BN_MODES} (none = PLAIN, before = BNB, after = BNA), "
            f"got {batch_norm!r}."
        )
    return batch_norm


def init_mlp(
    key: jax.Array,
    sizes: Sequence[int],
    *,
    batch_norm: str = "none",
    dtype: Any = jnp.float32,
) -> Params:
    """He-normal kernels (``N(0, 2/d_in)``; ``N(0, 1/d_in)`` for the logits), zero biases.

    Batch-norm layers start at ``scale = 1, bias = 0``.  ``sizes`` needs at least two entries.
    """
    _check_mode(batch_norm)
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}.")
    num_layers = len(sizes) - 1
    keys = jax.random.split(key, num_layers)
    params: Params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        gain = 1.0 if i == num_layers - 1 else 2.0
        kernel = jax.random.normal(keys[i], (d_in, d_out), dtype) * jnp.sqrt(gain / d_in)
        params[dense_name(i)] = {"kernel": kernel.astype(dtype), "bias": jnp.zeros(d_out, dtype)}
    if batch_norm != "none":
        for j, width in enumerate(sizes[1:-1]):
            params[bn_name(j)] = {"scale": jnp.ones(width, dtype), "bias": jnp.zeros(width, dtype)}
    return params


def num_dense(params: Mapping) -> int:
    return sum(1 for k in params if k.startswith("Dense_"))


def batch_norm_apply(
    u: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    epsilon: float = BN_EPSILON,
    stats: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``scale (u - mean)/sqrt(var + eps) + bias``; batch statistics unless ``stats`` given.

    Returns the output and the ``{"mean", "var"}`` used.
    """
    if stats is None:
        mean = jnp.mean(u, axis=0)
        var = jnp.mean(jnp.square(u - mean), axis=0)
    else:
        mean, var = stats["mean"], stats["var"]
    out = scale * (u - mean) * jax.lax.rsqrt(var + epsilon) + bias
    return out, {"mean": mean, "var": var}


def mlp_apply(
    params: Params,
    x: jax.Array,
    *,
    batch_norm: str = "none",
    epsilon: float = BN_EPSILON,
    bn_stats: Mapping[str, Mapping[str, jax.Array]] | None = None,
) -> tuple[jax.Array, dict, dict]:
    """Forward pass: ``(logits, activations, bn_stats_used)``.

    Args:
      params: from :func:`init_mlp`.
      x: inputs of shape (n, d_0).
      batch_norm: ``"none"`` (PLAIN), ``"before"`` (BNB) or ``"after"`` (BNA).
      epsilon: batch-norm epsilon.
      bn_stats: ``{"BatchNorm_j": {"mean", "var"}}`` for inference mode; ``None`` uses the
        batch's statistics (training mode).

    Returns:
      ``logits`` (n, d_L); ``activations`` = ``{"Dense_i": {"inputs", "preacts"}}``, the dense
      layers' inputs and pre-activations ``x_i W_i + b_i`` (what :func:`rfim_jax.rngd` needs);
      and the batch-norm statistics used per ``BatchNorm_j`` (empty without batch norm).
    """
    _check_mode(batch_norm)
    num_layers = num_dense(params)
    h = x
    activations: dict[str, dict[str, jax.Array]] = {}
    used: dict[str, dict[str, jax.Array]] = {}
    for i in range(num_layers):
        layer = params[dense_name(i)]
        z = h @ layer["kernel"] + layer["bias"]
        activations[dense_name(i)] = {"inputs": h, "preacts": z}
        if i == num_layers - 1:
            return z, activations, used
        if batch_norm == "none":
            h = jax.nn.relu(z)
            continue
        name = bn_name(i)
        bn = params[name]
        stats = None if bn_stats is None else bn_stats[name]
        if batch_norm == "before":
            u, used[name] = batch_norm_apply(z, bn["scale"], bn["bias"], epsilon=epsilon,
                                             stats=stats)
            h = jax.nn.relu(u)
        else:
            h, used[name] = batch_norm_apply(jax.nn.relu(z), bn["scale"], bn["bias"],
                                             epsilon=epsilon, stats=stats)
    raise ValueError("params hold no dense layer ('Dense_0', ...).")


def logits_fn(params: Params, x: jax.Array, **kwargs) -> jax.Array:
    """Just the logits of :func:`mlp_apply` (e.g. for :func:`rfim_jax.full_fisher`)."""
    return mlp_apply(params, x, **kwargs)[0]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch (the paper's training cost)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def population_stats(
    params: Params, x: jax.Array, *, batch_norm: str = "none", epsilon: float = BN_EPSILON
) -> dict:
    """Inference statistics: each batch-norm layer's mean and variance over all of ``x``.

    One forward pass in training mode with the whole set as the batch, so every layer sees
    the earlier layers normalised by these same statistics (Ioffe & Szegedy, Alg. 2, with the
    biased variance).  Empty without batch norm.
    """
    if batch_norm == "none":
        return {}
    return mlp_apply(params, x, batch_norm=batch_norm, epsilon=epsilon)[2]


def accuracy(
    params: Params,
    x: jax.Array,
    labels: jax.Array,
    *,
    batch_norm: str = "none",
    bn_stats: Mapping | None = None,
) -> float:
    """Classification accuracy in inference mode (``bn_stats`` from :func:`population_stats`)."""
    logits = mlp_apply(params, x, batch_norm=batch_norm,
                       bn_stats=bn_stats if batch_norm != "none" else None)[0]
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))


def rngd_layers(num_layers: int, hidden_kind: Any = "relu") -> dict[str, Any]:
    """The paper's RNGD layer kinds (Sec. 5.2): linear RFIM on the input and softmax layers,
    the hidden activation's RFIM (``hidden_kind``) on the layers between."""
    kinds = {}
    for i in range(num_layers):
        kinds[dense_name(i)] = "linear" if i in (0, num_layers - 1) else hidden_kind
    return kinds
