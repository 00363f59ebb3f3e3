"""Embeddings (``nn.Embed``, ``nnx.Embed``; SPEC §8): ``embedding_rfim`` and its adapter.

Looking up token v returns the table's row ``e_v``; with the Gaussian response ``e_v + noise``
(sigma) the RFIM of row v is

    G_v = freq(v) / sigma^2 I_D,       freq(v) = (number of lookups of v) / N,

a diagonal metric: each row is a neuron with d = D (no bias), and the exact metric *is* its
diagonal, so it is stored as a :class:`DiagonalMetric` (V, D) in every representation.
Params: ``{"embedding": (V, D)}``, read by ``ParamLayout((V, D), None, kernel_key="embedding",
transposed=True)``: neuron v's vector is ``embedding[v]`` and ``to_dense()`` follows
``embedding.reshape(-1)``.

**Tied head.**  When the table is also the output head (``Embed.attend``: logits
``z = h E^T``), each use contributes rows as extra samples (SPEC §8).  The head reads row v as
the weights of logit v; its logits are the categorical response of the loss, taken unit-wise
(SPEC §7's diagonal softmax: ``nu_iv = eta_iv (1 - eta_iv)``), so a head row contributes
``nu_iv h_i h_i^T`` to ``G_v``, whose diagonal is kept.  Over the N lookups and the N' head
rows together:

    S[v, k] = (sum_lookups [t_i = v] / sigma^2 + sum_heads eta_iv (1 - eta_iv) h_ik^2) / (N + N').

Both uses are one weighted diagonal moment ``mean_i w_iv x_ik^2`` (statistics.diagonal_moments)
over stacked rows: ``x = 1``, ``w = onehot / sigma^2`` for a lookup; ``x = h``,
``w = eta (1 - eta)`` for a head row.

Under the optimiser the lookups are counted with a one-hot (N, V) matrix, N V numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src import statistics as stats_lib
from rfim_jax._src.layers.base import LayerAdapter
from rfim_jax._src.layers.norm import check_gaussian_kind

EMBEDDING = "embedding"
#: Extra entries the capture helpers add when the table is also used as an output head.
ATTEND_INPUTS, ATTEND_PREACTS = "attend_inputs", "attend_preacts"


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def _table(params: Mapping, where: str):
    if not isinstance(params, Mapping) or EMBEDDING not in params:
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{where}: expected {{'embedding': (V, D)}}, got {got}.")
    table = params[EMBEDDING]
    if len(table.shape) != 2:
        raise ValueError(f"{where}: embedding must be (V, D), got shape {_shape(table)}.")
    return table


def _layout(num: int, features: int) -> metrics_lib.ParamLayout:
    return metrics_lib.ParamLayout((num, features), None, kernel_key=EMBEDDING, transposed=True)


def _check_ids(ids: jax.Array, num: int, where: str) -> jax.Array:
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{where}: the looked-up ids must be integers, got dtype {ids.dtype} (shape "
            f"{_shape(ids)})."
        )
    if ids.size == 0:
        raise ValueError(f"{where}: the batch is empty (ids shape {_shape(ids)}).")
    if not isinstance(ids, jax.core.Tracer):
        # In numpy: concrete ids closed over by a jitted step would trace jnp.min.
        host = np.asarray(ids)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= num:
            raise ValueError(
                f"{where}: ids range over [{lo}, {hi}], outside the table's [0, {num - 1}]."
            )
    return ids


def _weighted_rows(ids: jax.Array, num: int, features: int, sigma: float, dtype,
                   attend: tuple[jax.Array, jax.Array] | None, where: str):
    """The rows and per-row weights of the module docstring: ``(x (N, D), w (N, V))``.

    ``attend`` is ``(h (n..., D), logits (n..., V))`` of the head uses, or None.
    """
    ids = ids.reshape(-1)
    x = jnp.ones((ids.shape[0], features), dtype)
    w = jax.nn.one_hot(ids, num, dtype=dtype) / sigma**2
    if attend is None:
        return x, w
    h, logits = (jnp.asarray(a) for a in attend)
    if (h.ndim < 1 or logits.ndim < 1 or h.shape[-1] != features or logits.shape[-1] != num
            or h.shape[:-1] != logits.shape[:-1]):
        raise ValueError(
            f"{where}: the head uses (Embed.attend) have inputs of shape {_shape(h)} and "
            f"logits {_shape(logits)}; expected (n..., {features}) and (n..., {num})."
        )
    h = h.reshape(-1, features).astype(dtype)
    nu = stats_lib.softmax_unit_coefficients(logits.reshape(-1, num).astype(dtype))
    return jnp.concatenate([x, h]), jnp.concatenate([w, nu])


def embedding_rfim(
    params: Mapping[str, jax.Array],
    ids: jax.Array,
    *,
    sigma: float = 1.0,
    representation: str = "exact",
    attend_inputs: jax.Array | None = None,
    attend_logits: jax.Array | None = None,
) -> metrics_lib.DiagonalMetric:
    """RFIM of an embedding table (SPEC §8): ``freq(v) / sigma^2 I`` per row v.

    With ``attend_inputs``/``attend_logits`` the table is also the output head (tied
    weights, ``Embed.attend``): the head rows are extra samples, each adding
    ``eta_v (1 - eta_v) h_k^2`` to entry (v, k), and the scales are the mean over all rows
    (module docstring).

    Args:
      params: ``{"embedding": (V, D)}`` (Flax's ``nn.Embed``/``nnx.Embed``).
      ids: the looked-up token ids, integers of any shape (every entry is a sample).
      sigma: the lookups' response noise scale.
      representation: ``"exact"``, ``"eigen"`` or ``"diagonal"``; the metric is stored
        diagonal, so every one gives the same :class:`DiagonalMetric`.
      attend_inputs: the head's inputs h, (n..., D), or None for an untied table.
      attend_logits: the head's logits ``h E^T``, (n..., V); given with ``attend_inputs``.

    Returns:
      A :class:`DiagonalMetric` with scales (V, D), ``scales[v] = freq(v) / sigma^2`` for an
      untied table, whose layout reads and writes ``{"embedding": (V, D)}``.

    Raises:
      ValueError: for params of the wrong form, non-integer ids, ids outside [0, V) (checked
        when the ids are concrete), an empty batch, an unknown representation, only one of
        ``attend_inputs``/``attend_logits``, or head uses of the wrong shapes.

    References:
      SPEC §8 (Embedding); Sun & Nielsen, eq. (22) for a Gaussian response and eq. (25)
      (unit-wise) for the head's categorical one.
    """
    where = "embedding_rfim"
    rfim_lib.check_representation(representation, where=where)
    table = _table(params, where)
    num, features = _shape(table)
    ids = _check_ids(ids, num, where)
    if (attend_inputs is None) != (attend_logits is None):
        raise ValueError(f"{where}: give both attend_inputs and attend_logits, or neither.")
    attend = None if attend_inputs is None else (attend_inputs, attend_logits)
    dtype = dtypes_lib.at_least_float32(table)
    x, w = _weighted_rows(ids, num, features, sigma, dtype, attend, where)
    scales = stats_lib.diagonal_moments(x, w)
    return metrics_lib.DiagonalMetric(scales, has_bias=False, layout=_layout(num, features))


@dataclasses.dataclass(frozen=True)
class EmbedLayer(LayerAdapter):
    """An embedding table under the optimiser: V neurons (rows) of d = D, diagonal state.

    Activations: ``{"inputs": ids (n...), "preacts": (n..., D)}``, what the capture helpers
    record, plus ``"attend_inputs"``/``"attend_preacts"`` for a tied head.  ``rows`` returns
    the stacked rows x (N, D) and, as the "pre-activations", their Fisher weights (N, V)
    (module docstring), which the diagonal estimator turns into
    ``S[v, k] = mean_i w_iv x_ik^2`` (``freq(v) / sigma^2`` untied), with relative damping
    ``damping mean_k S[v, k]`` (eq. 30).
    """

    path: str
    kind: Any
    d_in: int
    m: int
    has_bias: bool = False

    representations = ("diagonal",)
    is_linear = False  # one scale per row, not one shared block

    @classmethod
    def from_params(cls, path: str, kind: Any, node: Mapping) -> EmbedLayer:
        where = f"layer {path!r}"
        kind = check_gaussian_kind(kind, "an embedding", where)
        table = _table(node, where)
        dtypes_lib.reject_complex(table.dtype, where)
        num, features = _shape(table)
        return cls(path, kind, features, num)

    @property
    def layout(self) -> metrics_lib.ParamLayout:
        return _layout(self.m, self.d_in)

    def unit_weights(self, z: jax.Array) -> jax.Array:
        # rows() hands over the per-row Fisher weights themselves (module docstring).
        return z

    def rows(self, activations: Any) -> tuple[jax.Array, jax.Array]:
        """The stacked rows x (N, D) and their weights w (N, V) of the module docstring.

        Lookups give ones and ``onehot(ids) / sigma^2``; head uses (``attend_inputs`` and
        ``attend_preacts``, recorded by the capture helpers for a tied table) give h and
        ``eta (1 - eta)``.

        Raises:
          ValueError: naming the layer and the shapes, for missing or mis-shaped activations.
        """
        where = f"layer {self.path!r}"
        expected = (f"expected activations[{self.path!r}] = {{'inputs': ids (n...), "
                    f"'preacts': (n..., {self.d_in})}}, and for a tied head also "
                    f"'attend_inputs': (n..., {self.d_in}) and 'attend_preacts': (n..., {self.m})")
        entry = paths_lib.activation_entry(activations, self.path, expected)
        ids, out = jnp.asarray(entry["inputs"]), jnp.asarray(entry["preacts"])
        ids = _check_ids(ids, self.m, where)
        if _shape(out) != _shape(ids) + (self.d_in,):
            raise ValueError(
                f"{where}: inputs (ids) have shape {_shape(ids)} and preacts {_shape(out)}; "
                f"{expected}."
            )
        if (ATTEND_INPUTS in entry) != (ATTEND_PREACTS in entry):
            raise ValueError(f"{where}: only one of {ATTEND_INPUTS!r}/{ATTEND_PREACTS!r} "
                             f"given; {expected}.")
        attend = ((entry[ATTEND_INPUTS], entry[ATTEND_PREACTS])
                  if ATTEND_INPUTS in entry else None)
        dtype = rfim_lib.stats_dtype(out)
        return _weighted_rows(ids, self.m, self.d_in, self.kind.sigma, dtype, attend, where)

    def check_rows(self, x_aug: jax.Array, representation: str) -> None:
        del x_aug, representation  # checked at plan time (representations)

