"""Scale and shift (LayerNorm, RMSNorm; SPEC §8): ``scale_shift_rfim`` and its adapter.

A normalisation layer's affine part is ``y_j = gamma_j u_j + beta_j`` per feature j, with
``u`` the normalised input.  Each feature is a neuron with its own input ``u_j``; with a
Gaussian response ``y_j + noise`` (sigma) the RFIM of ``(gamma_j, beta_j)`` is one 2 x 2 block

    G_j = mean_i [[u_ij^2, u_ij], [u_ij, 1]] / sigma^2,

(1 x 1, ``mean u_ij^2 / sigma^2``, without a shift).  In the library's terms this is a layer
with d_in = 1 whose m = D neurons each see their own input: grouped rows (N, D, 2), as a
depthwise convolution's, with the ``"linear"`` kind's coefficient ``1/sigma^2`` per neuron.
Params: ``{"scale": (D,), "bias": (D,)}`` (Flax's names), read by
``ParamLayout((D,), (D,), kernel_key="scale")``: neuron j's vector is ``[scale_j, bias_j]``.
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
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src.layers.base import LayerAdapter

SCALE = "scale"


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def check_gaussian_kind(kind: Any, what: str, where: str) -> act_lib.Linear:
    """The kind of a layer whose response is Gaussian: ``"linear"`` or ``Linear(sigma)``.

    Raises:
      ValueError: for any other kind, naming the layer and what fits.
    """
    if isinstance(kind, act_lib.Linear):
        return kind
    name = kind if isinstance(kind, str) else getattr(kind, "name", repr(kind))
    raise ValueError(
        f"{where}: kind {name!r} does not fit {what}: its response is Gaussian (SPEC §8), so "
        f"its kind is 'linear' (or rfim_jax.Linear(sigma=...))."
    )


def _unpack(params: Mapping, where: str) -> tuple[Any, Any]:
    if not isinstance(params, Mapping) or SCALE not in params:
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{where}: expected {{'scale': (D,), 'bias': (D,)}}, got {got}.")
    scale, bias = params[SCALE], params.get("bias")
    if len(scale.shape) != 1:
        hint = ""
        if len(scale.shape) == 2 and bias is None:
            hint = (f" If it is a stack of {scale.shape[0]} norms (nn.scan, nnx.scan), declare "
                    f"it in stacked_layers.")
        raise ValueError(
            f"{where}: scale must be 1-D (D,), got shape {_shape(scale)}.{hint}")
    if bias is not None and _shape(bias) != _shape(scale):
        raise ValueError(
            f"{where}: bias must have the scale's shape {_shape(scale)}, got {_shape(bias)}."
        )
    return scale, bias


def _layout(features: int, has_bias: bool) -> metrics_lib.ParamLayout:
    return metrics_lib.ParamLayout((features,), (features,) if has_bias else None,
                                   kernel_key=SCALE)


def _rows(u: jax.Array, has_bias: bool) -> jax.Array:
    """u (N, D) -> grouped rows x~ (N, D, 1 or 2): feature j's own input [u_j, 1]."""
    return rfim_lib.augment(u[..., None], has_bias)


def scale_shift_rfim(
    params: Mapping[str, jax.Array],
    u: jax.Array,
    *,
    sigma: float = 1.0,
    representation: str = "exact",
) -> metrics_lib.Metric:
    """RFIM of a LayerNorm/RMSNorm's scale and shift (SPEC §8).

        G_j = mean_i [[u_ij^2, u_ij], [u_ij, 1]] / sigma^2      per feature j

    for the response ``gamma_j u_j + beta_j + N(0, sigma^2)``; ``[u^2] / sigma^2`` (1 x 1)
    without a shift.  The per-sample Fisher of eq. (9) with one independent Gaussian response
    per feature is ``sum_j``-block-diagonal and equals this metric.

    Args:
      params: ``{"scale": (D,), "bias": (D,)}`` (bias optional), Flax's LayerNorm/RMSNorm.
      u: the *normalised* input, (n..., D): ``(x - mean) / sqrt(var + eps)`` for LayerNorm,
        ``x / sqrt(mean x^2 + eps)`` for RMSNorm.  Leading axes are samples.
      sigma: the response's noise scale.
      representation: ``"exact"`` (a :class:`BlockDiagonalMetric`, (D, 2, 2)) or
        ``"diagonal"`` (a :class:`DiagonalMetric`, (D, 2)).

    Returns:
      The metric over the ``2 D`` (or ``D``) parameters, neuron-major ``[scale_j, bias_j]``,
      with a layout that reads and writes ``{"scale", "bias"}``.

    Raises:
      ValueError: for params of the wrong form, ``u`` whose last axis is not D, an empty
        batch, or ``representation="eigen"`` (each feature has its own input, so there is no
        shared basis).

    References:
      SPEC §8 (Scale and shift); Sun & Nielsen, eq. (22) for the Gaussian response.
    """
    where = "scale_shift_rfim"
    rfim_lib.check_representation(representation, where=where)
    if representation == "eigen":
        raise ValueError(
            f"{where}: representation 'eigen' needs an input basis shared by the neurons, but "
            f"each feature sees its own normalised input; use 'exact' (2 x 2 blocks) or "
            f"'diagonal'."
        )
    scale, bias = _unpack(params, where)
    features = scale.shape[0]
    u = jnp.asarray(u)
    if u.ndim < 1 or u.shape[-1] != features:
        raise ValueError(
            f"{where}: u has shape {_shape(u)}, but the scale {_shape(scale)} needs (n..., "
            f"{features})."
        )
    u = u.reshape(-1, features)
    if u.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty (u shape {_shape(u)}).")
    dtype = rfim_lib.stats_dtype(u, scale)
    u = u.astype(dtype)
    z = u * scale.astype(dtype) + (0 if bias is None else bias.astype(dtype))
    return rfim_lib.rows_rfim(
        _rows(u, bias is not None), z, act_lib.Linear(sigma), representation=representation,
        has_bias=bias is not None, layout=_layout(features, bias is not None),
    )


@dataclasses.dataclass(frozen=True)
class ScaleShiftLayer(LayerAdapter):
    """A LayerNorm/RMSNorm's scale and shift under the optimiser: D neurons with d_in = 1.

    Activations: ``{"inputs": u (n..., D) normalised, "preacts": (n..., D)}``, what the capture
    helpers record.  Rows are grouped (each feature its own input), so the state is exact
    (D, 2, 2) blocks or diagonal; eigen is refused.
    """

    path: str
    kind: Any
    d_in: int
    m: int
    has_bias: bool

    representations = ("exact", "diagonal")
    is_linear = False  # one block per feature, not one shared block

    @classmethod
    def from_params(cls, path: str, kind: Any, node: Mapping) -> ScaleShiftLayer:
        where = f"layer {path!r}"
        kind = check_gaussian_kind(kind, "a LayerNorm/RMSNorm scale and shift", where)
        scale, bias = _unpack(node, where)
        for leaf in (scale, bias):
            if leaf is not None:
                dtypes_lib.reject_complex(leaf.dtype, where)
        return cls(path, kind, 1, int(scale.shape[0]), bias is not None)

    @property
    def layout(self) -> metrics_lib.ParamLayout:
        return _layout(self.m, self.has_bias)

    def rows(self, activations: Any) -> tuple[jax.Array, jax.Array]:
        """Grouped rows ``x~`` (N, D, 1 or 2) and pre-activations (N, D).

        Raises:
          ValueError: naming the layer and the shapes, for missing or mis-shaped activations.
        """
        where = f"layer {self.path!r}"
        expected = (f"expected activations[{self.path!r}] = {{'inputs': (n..., {self.m}) "
                    f"normalised, 'preacts': (n..., {self.m})}}")
        entry = paths_lib.activation_entry(
            activations, self.path, expected,
            " capture_linen and capture_nnx record LayerNorm and RMSNorm; BatchNorm and "
            "GroupNorm are not recorded: leave them out of `layers` (their params then get "
            "the plain gradient) or record them with rfim_jax.record.")
        u, z = jnp.asarray(entry["inputs"]), jnp.asarray(entry["preacts"])
        if u.shape != z.shape or u.ndim < 2 or u.shape[-1] != self.m:
            raise ValueError(
                f"{where}: inputs have shape {_shape(u)} and preacts {_shape(z)}; {expected}."
            )
        dtype = rfim_lib.stats_dtype(u, z)
        u = u.reshape(-1, self.m).astype(dtype)
        return _rows(u, self.has_bias), z.reshape(-1, self.m).astype(dtype)

    def check_rows(self, x_aug: jax.Array, representation: str) -> None:
        del x_aug, representation  # checked at plan time (representations)
