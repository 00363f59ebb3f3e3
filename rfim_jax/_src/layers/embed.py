"""Embeddings (``nn.Embed``, ``nnx.Embed``; SPEC §8): ``embedding_rfim`` and its adapter.

Looking up token v returns the table's row ``e_v``; with the Gaussian response ``e_v + noise``
(sigma) the RFIM of row v is

    G_v = freq(v) / sigma^2 I_D,       freq(v) = (number of lookups of v) / N,

a diagonal metric: each row is a neuron with d = D (no bias), and the exact metric *is* its
diagonal, so it is stored as a :class:`DiagonalMetric` (V, D) in every representation.
Params: ``{"embedding": (V, D)}``, read by ``ParamLayout((V, D), None, kernel_key="embedding",
transposed=True)``: neuron v's vector is ``embedding[v]`` and ``to_dense()`` follows
``embedding.reshape(-1)``.

Under the optimiser the lookups are counted with a one-hot (N, V) matrix, N V numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import paths as paths_lib
from rfim_jax._src import rfim as rfim_lib
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
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num:
            raise ValueError(
                f"{where}: ids range over [{lo}, {hi}], outside the table's [0, {num - 1}]."
            )
    return ids


def embedding_rfim(
    params: Mapping[str, jax.Array],
    ids: jax.Array,
    *,
    sigma: float = 1.0,
    representation: str = "exact",
) -> metrics_lib.DiagonalMetric:
    """RFIM of an embedding table (SPEC §8): ``freq(v) / sigma^2 I`` per row v.

    Args:
      params: ``{"embedding": (V, D)}`` (Flax's ``nn.Embed``/``nnx.Embed``).
      ids: the looked-up token ids, integers of any shape (every entry is a sample).
      sigma: the response's noise scale.
      representation: ``"exact"``, ``"eigen"`` or ``"diagonal"``; the exact metric is
        diagonal, so every one gives the same :class:`DiagonalMetric`.

    Returns:
      A :class:`DiagonalMetric` with scales (V, D), ``scales[v] = freq(v) / sigma^2``, whose
      layout reads and writes ``{"embedding": (V, D)}``.

    Raises:
      ValueError: for params of the wrong form, non-integer ids, ids outside [0, V) (checked
        when the ids are concrete), an empty batch, or an unknown representation.

    References:
      SPEC §8 (Embedding); Sun & Nielsen, eq. (22) for a Gaussian response.
    """
    where = "embedding_rfim"
    rfim_lib.check_representation(representation, where=where)
    table = _table(params, where)
    num, features = _shape(table)
    ids = _check_ids(ids, num, where).reshape(-1)
    dtype = dtypes_lib.at_least_float32(table)
    counts = jnp.zeros((num,), dtype).at[ids].add(1.0)
    scales = jnp.broadcast_to((counts / ids.shape[0] / sigma**2)[:, None], (num, features))
    return metrics_lib.DiagonalMetric(scales, has_bias=False, layout=_layout(num, features))


@dataclasses.dataclass(frozen=True)
class EmbedLayer(LayerAdapter):
    """An embedding table under the optimiser: V neurons (rows) of d = D, diagonal state.

    Activations: ``{"inputs": ids (n...), "preacts": (n..., D)}``, what the capture helpers
    record.  ``rows`` returns ones (N, D) as the inputs and the one-hot ids (N, V) as the
    "pre-activations", whose unit weights ``onehot / sigma^2`` give the diagonal estimator
    ``S_v = freq(v) / sigma^2`` in every column (and relative damping ``damping freq / sigma^2``,
    eq. 30).
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
        return z / self.kind.sigma**2

    def rows(self, activations: Any) -> tuple[jax.Array, jax.Array]:
        """Ones (N, D) and the one-hot ids (N, V) (see the class docstring).

        Raises:
          ValueError: naming the layer and the shapes, for missing or mis-shaped activations,
            or a table that is also used as an output head (tied weights).
        """
        where = f"layer {self.path!r}"
        expected = (f"expected activations[{self.path!r}] = {{'inputs': ids (n...), "
                    f"'preacts': (n..., {self.d_in})}}")
        entry = None if activations is None else paths_lib.get_by_path(activations, self.path)
        if not isinstance(entry, Mapping) or "inputs" not in entry or "preacts" not in entry:
            raise ValueError(f"{where}: no activations passed; {expected}.")
        if ATTEND_INPUTS in entry:
            raise ValueError(
                f"{where}: the embedding is also used as an output head (Embed.attend, tied "
                f"weights). Its lookups and its head read the table differently (a row per "
                f"token against a dot product per class), and RNGD does not combine the two "
                f"into one metric; untie the head, or leave {self.path!r} out of `layers`."
            )
        ids, out = jnp.asarray(entry["inputs"]), jnp.asarray(entry["preacts"])
        ids = _check_ids(ids, self.m, where)
        if _shape(out) != _shape(ids) + (self.d_in,):
            raise ValueError(
                f"{where}: inputs (ids) have shape {_shape(ids)} and preacts {_shape(out)}; "
                f"{expected}."
            )
        dtype = rfim_lib.stats_dtype(out)
        ids = ids.reshape(-1)
        onehot = jax.nn.one_hot(ids, self.m, dtype=dtype)
        return jnp.ones((ids.shape[0], self.d_in), dtype), onehot

    def check_rows(self, x_aug: jax.Array, representation: str) -> None:
        del x_aug, representation  # checked at plan time (representations)

