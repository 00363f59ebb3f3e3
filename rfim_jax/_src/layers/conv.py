"""Convolutional layers (SPEC §8): patches and the conv RFIM.

A Flax convolution (``nn.Conv``, ``nnx.Conv``) has params ``{"kernel": (*window, c_in / G,
c_out), "bias": (c_out,)}`` (G = ``feature_group_count``, the bias optional) and channels-last
inputs ``x`` of shape ``(n, *spatial, c_in)``.  Output channel l is a neuron.  At each output
position p it sees the *patch* ``x_p``: the input window under the kernel, restricted to the
input channels of l's group and flattened in the kernel's own (C) order, so that

    z_lp = kernel[..., l].reshape(-1) @ x_p + bias[l].

Every (sample, position) pair is a row, as for a Dense layer applied to a sequence, so the
layer's RFIM is eq. (23) over those rows:

    G_l = mean_{i,p} nu_f(z_ilp) x~_ip x~_ip^T,      d = prod(window) c_in / G (+ 1),

with ``x~ = [x_p, 1]`` when there is a bias.  Neuron l's vector is
``w~_l = [kernel[..., l].reshape(-1), bias[l]]``, i.e. column l of
``kernel.reshape(-1, c_out)`` with the bias appended; ``to_dense()`` is neuron-major (SPEC §2).
The per-image Fisher of eq. (9), with one independent response per (channel, position), is
this metric times the number of output positions P.

Under the optimiser a convolution is a :class:`~rfim_jax._src.layers.dense.DenseLayer` over
its patches: the capture helpers record ``conv_patches(x, ...)`` as the layer's inputs.

Patches are gathered with strided slices of the padded input (one per window offset),
concatenated directly in the kernel's order, so they are exact in every dtype (no identity
convolution whose precision a backend could lower).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from rfim_jax._src import metrics as metrics_lib
from rfim_jax._src import rfim as rfim_lib
from rfim_jax._src.layers import dense as dense_lib

Params = dict[str, jax.Array]

PADDING_STRINGS: tuple[str, ...] = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")

Padding = str | tuple[tuple[int, int], ...]


# ------------------------------------------------------------------------------ geometry


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_dim(value, rank: int, name: str, where: str) -> tuple[int, ...]:
    """Flax's ``maybe_broadcast``: None -> 1, an int -> (int,) * rank, else a rank-tuple."""
    if value is None:
        value = 1
    if _is_int(value):
        out = (value,) * rank
    elif isinstance(value, Sequence) and not isinstance(value, str) and all(
        _is_int(v) for v in value
    ):
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(
            f"{where}: {name} must be an int or a sequence of {rank} ints, got {value!r}."
        )
    if len(out) != rank:
        raise ValueError(
            f"{where}: {name}={value!r} has {len(out)} entries, but the kernel has {rank} "
            f"spatial dimension(s)."
        )
    if any(v < 1 for v in out):
        raise ValueError(f"{where}: {name} must be positive, got {value!r}.")
    return out


def _canonical_padding(padding, rank: int, where: str) -> Padding:
    """Flax's padding forms as an upper-case string or a tuple of ``rank`` (lo, hi) pairs."""
    if isinstance(padding, str):
        key = padding.upper()
        if key not in PADDING_STRINGS:
            raise ValueError(
                f"{where}: unsupported padding {padding!r}; use one of "
                f"{', '.join(repr(p) for p in PADDING_STRINGS)}, an int, or a sequence of "
                f"{rank} ints or (low, high) pairs."
            )
        if key == "CAUSAL" and rank != 1:
            raise ValueError(
                f"{where}: padding 'CAUSAL' is only defined for 1-D convolutions (as in Flax), "
                f"but the kernel has {rank} spatial dimensions."
            )
        return key
    if _is_int(padding):
        return ((int(padding), int(padding)),) * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs = []
        for p in padding:
            if _is_int(p):
                pairs.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2 and all(_is_int(q) for q in p):
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == rank:
            return tuple(pairs)
    raise ValueError(
        f"{where}: invalid padding {padding!r}; expected a string "
        f"({', '.join(repr(p) for p in PADDING_STRINGS)}), an int, or a sequence of {rank} "
        f"ints or (low, high) pairs (one per spatial dimension)."
    )


@dataclasses.dataclass(frozen=True)
class _Geometry:
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Padding
    kernel_dilation: tuple[int, ...]
    feature_group_count: int

    @property
    def rank(self) -> int:
        return len(self.window)


def _geometry(window, strides, padding, kernel_dilation, feature_group_count, where) -> _Geometry:
    if _is_int(window):
        window = (window,)
    window = tuple(int(k) for k in window)
    if not window or any(k < 1 for k in window):
        raise ValueError(f"{where}: window must be a non-empty tuple of positive ints, got "
                         f"{window!r}.")
    rank = len(window)
    if not _is_int(feature_group_count) or feature_group_count < 1:
        raise ValueError(
            f"{where}: feature_group_count must be a positive int, got {feature_group_count!r}."
        )
    return _Geometry(
        window=window,
        strides=_per_dim(strides, rank, "strides", where),
        padding=_canonical_padding(padding, rank, where),
        kernel_dilation=_per_dim(kernel_dilation, rank, "kernel_dilation", where),
        feature_group_count=int(feature_group_count),
    )


def _pads(geom: _Geometry, spatial: tuple[int, ...]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """(jnp.pad mode or "constant", (lo, hi) per spatial dim), exactly as Flax/lax pad."""
    dilated = tuple((k - 1) * r + 1 for k, r in zip(geom.window, geom.kernel_dilation, strict=True))
    p = geom.padding
    if p in ("CIRCULAR", "REFLECT"):
        mode = "wrap" if p == "CIRCULAR" else "reflect"
        return mode, tuple(((k - 1) // 2, k // 2) for k in dilated)
    if p == "CAUSAL":
        return "constant", ((dilated[0] - 1, 0),)
    if isinstance(p, str):  # SAME, SAME_LOWER, VALID
        pads = lax.padtype_to_pads(spatial, dilated, geom.strides, p)
        return "constant", tuple((int(lo), int(hi)) for lo, hi in pads)
    return "constant", p


def _out_spatial(geom: _Geometry, spatial: tuple[int, ...], where: str) -> tuple[int, ...]:
    _, pads = _pads(geom, spatial)
    out = []
    for size, (lo, hi), k, r, s in zip(
        spatial, pads, geom.window, geom.kernel_dilation, geom.strides, strict=True
    ):
        span = (k - 1) * r + 1
        padded = size + lo + hi
        if padded < span:
            raise ValueError(
                f"{where}: the (dilated) window {geom.window} (span {span}) is larger than the "
                f"padded input (spatial shape {spatial}, padding {pads})."
            )
        out.append((padded - span) // s + 1)
    return tuple(out)


def _patches(x: jax.Array, geom: _Geometry, *, ones: bool, where: str) -> jax.Array:
    """Patches (*batch, *out, G, prod(window) * c_in / G (+1)) of channels-last ``x``.

    The last axis is in the kernel's order (*window, c_in / G), with a trailing 1 when
    ``ones``; built by one concatenation of strided slices, so it is formed once.
    """
    rank = geom.rank
    if x.ndim < rank + 2:
        raise ValueError(
            f"{where}: x has shape {_shape(x)} (rank {x.ndim}), but a kernel with {rank} spatial "
            f"dimension(s) needs channels-last inputs of rank {rank + 2}, (n, *spatial, c_in)."
        )
    groups = geom.feature_group_count
    c_in = x.shape[-1]
    if c_in % groups:
        raise ValueError(
            f"{where}: feature_group_count={groups} does not divide the {c_in} input channels "
            f"(x shape {_shape(x)})."
        )
    batch = x.shape[: x.ndim - rank - 1]
    x = x.reshape((-1,) + x.shape[x.ndim - rank - 1 :])
    spatial = _shape(x)[1:-1]
    out = _out_spatial(geom, spatial, where)
    mode, pads = _pads(geom, spatial)
    if mode == "constant":
        config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
        xp = lax.pad(x, jnp.zeros((), x.dtype), config)
    else:
        xp = jnp.pad(x, [(0, 0)] + list(pads) + [(0, 0)], mode=mode)
    n = x.shape[0]
    grouped = (n, *out, groups, c_in // groups)
    pieces = []
    for offset in itertools.product(*(range(k) for k in geom.window)):
        start = tuple(o * r for o, r in zip(offset, geom.kernel_dilation, strict=True))
        limit = tuple(
            s + (o - 1) * st + 1 for s, o, st in zip(start, out, geom.strides, strict=True)
        )
        piece = lax.slice(xp, (0, *start, 0), (n, *limit, c_in), (1, *geom.strides, 1))
        pieces.append(piece.reshape(grouped))
    if ones:
        pieces.append(jnp.ones((n, *out, groups, 1), x.dtype))
    patches = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
    return patches.reshape(batch + patches.shape[1:])


def conv_patches(
    x: jax.Array,
    window,
    *,
    strides=1,
    padding="SAME",
    kernel_dilation=1,
    feature_group_count: int = 1,
) -> jax.Array:
    """The patches that a convolution's kernel sees, flattened in the kernel's own order.

    For a kernel of shape ``(*window, c_in / G, c_out)`` (Flax's layout, G =
    ``feature_group_count``) and bias b, the convolution's output is

        z[i, *p, l] = patches[i, *p, l // (c_out / G)] @ kernel[..., l].reshape(-1) + b[l],

    i.e. with ``cols = kernel.reshape(-1, c_out)`` and groups == 1,
    ``z = patches[..., 0, :] @ cols + b`` reproduces ``flax.linen.Conv`` and
    ``jax.lax.conv_general_dilated`` exactly.  Output channels are split into G contiguous
    groups, as in lax; group g's patch holds input channels ``[g c_in/G, (g + 1) c_in/G)``.

    Args:
      x: channels-last inputs ``(n, *spatial, c_in)``; extra leading batch axes are kept.
      window: the kernel's spatial shape, e.g. ``kernel.shape[:-2]`` (an int for 1-D).
      strides: an int or one int per spatial dimension (Flax's meaning).
      padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"``, ``"CIRCULAR"`` (periodic),
        ``"REFLECT"``, ``"CAUSAL"`` (1-D only), an int (that padding on both sides of every
        dimension), or a sequence of one int or ``(low, high)`` pair per spatial dimension;
        exactly as ``flax.linen.Conv`` interprets it.
      kernel_dilation: an int or one int per spatial dimension (the kernel's dilation).
      feature_group_count: G, which must divide c_in.

    Returns:
      ``(n, *out_spatial, G, prod(window) * c_in / G)`` in x's dtype; the last axis is in the
      order of ``kernel[..., l].reshape(-1)``, i.e. (*window, c_in / G) in C order.  It holds
      ``n * prod(out_spatial) * prod(window) * c_in`` numbers.

    Raises:
      ValueError: for x of the wrong rank, a padding or stride that Flax would not accept, a
        group count that does not divide c_in, or a window larger than the padded input; the
        message names the shapes.
    """
    geom = _geometry(window, strides, padding, kernel_dilation, feature_group_count,
                     "conv_patches")
    return _patches(jnp.asarray(x), geom, ones=False, where="conv_patches")


# ------------------------------------------------------------------------------- the RFIM


def _unpack_conv(params, where: str) -> tuple[jax.Array, jax.Array | None]:
    """(kernel, bias) of a conv params dict, checked: kernel rank >= 3, bias (c_out,)."""
    kernel, bias, bias_shape = dense_lib.unpack_layer(params, where)
    if len(kernel.shape) < 3:
        raise ValueError(
            f"{where}: a conv kernel has shape (*window, c_in / groups, c_out) with at least one "
            f"spatial dimension, got shape {_shape(kernel)}."
        )
    if bias is not None and len(bias_shape) != 1:
        raise ValueError(
            f"{where}: bias must have shape ({kernel.shape[-1]},) to match kernel "
            f"{_shape(kernel)}, got {bias_shape}."
        )
    return kernel, bias


def _check_groups(kernel_shape: tuple[int, ...], groups, where: str) -> None:
    c_out = kernel_shape[-1]
    if _is_int(groups) and groups >= 1 and c_out % groups:
        raise ValueError(
            f"{where}: feature_group_count={groups} does not divide the {c_out} output channels "
            f"(kernel shape {kernel_shape})."
        )


def _check_inputs(x_shape, kernel_shape, groups: int, where: str, what: str = "x") -> None:
    """The input's rank and channels against the kernel's, with a channels-first hint."""
    rank = len(kernel_shape) - 2
    if len(x_shape) < rank + 2:
        raise ValueError(
            f"{where}: {what} has shape {x_shape} (rank {len(x_shape)}), but the kernel "
            f"{kernel_shape} has {rank} spatial dimension(s), so {what} must be channels-last "
            f"of rank {rank + 2}: (n, *spatial, c_in)."
        )
    c_in = kernel_shape[-2] * groups
    if x_shape[-1] == c_in:
        return
    if x_shape[-1] % groups == 0 or groups == 1:
        hint = ""
        if x_shape[len(x_shape) - rank - 1] == c_in:
            hint = (
                f" It looks channels-first (n, c_in, *spatial); conv_rfim follows Flax and "
                f"expects channels-last (n, *spatial, c_in): use jnp.moveaxis({what}, "
                f"{len(x_shape) - rank - 1}, -1)."
            )
        verb = "have" if what.endswith("s") else "has"
        raise ValueError(
            f"{where}: {what} {verb} {x_shape[-1]} channels (shape {x_shape}), but the kernel "
            f"{kernel_shape} with feature_group_count={groups} expects c_in = "
            f"{kernel_shape[-2]} * {groups} = {c_in}.{hint}"
        )
    raise ValueError(
        f"{where}: feature_group_count={groups} does not divide the {x_shape[-1]} input "
        f"channels ({what} shape {x_shape}); the kernel {kernel_shape} expects c_in = {c_in}."
    )


def _layout(kernel_shape, has_bias: bool) -> metrics_lib.ParamLayout:
    kernel_shape = tuple(int(s) for s in kernel_shape)
    return metrics_lib.ParamLayout(kernel_shape, (kernel_shape[-1],) if has_bias else None)


def _check_grouped(kind, *, groups, d, per_group, representation, where) -> None:
    """conv_rfim's own words for what grouped rows cannot support."""
    if representation == "eigen":
        raise ValueError(
            f"{where}: representation='eigen' needs one input basis per layer, but with "
            f"feature_group_count={groups} each group of output channels sees different "
            f"inputs. Use representation='exact' (grouped and depthwise blocks are small: "
            f"d = {d}) or 'diagonal'."
        )
    if kind == "softmax":
        raise ValueError(
            f"{where}: kind 'softmax' couples all {groups * per_group} output channels, but "
            f"with feature_group_count={groups} each group sees different inputs; use "
            f"feature_group_count=1 or an activation kind."
        )


def conv_rfim(
    params: Params,
    x: jax.Array,
    activation,
    *,
    strides=1,
    padding="SAME",
    kernel_dilation=1,
    feature_group_count: int = 1,
    representation: str = "exact",
) -> metrics_lib.Metric:
    """RFIM of a convolutional layer: eq. (23) with every (sample, position) as a row (SPEC §8).

        G_l = mean_{i,p} nu_f(z_ilp) x~_ip x~_ip^T,    d = prod(window) c_in / G (+ 1),

    where output channel l is a neuron, ``x_ip`` the patch of image i under the kernel at
    output position p (only the input channels of l's group), flattened in the kernel's own
    order (:func:`conv_patches`), ``x~ = [x_ip, 1]`` with a bias, and ``z_ilp`` the conv's
    pre-activation.  Neuron l's vector is ``w~_l = [kernel[..., l].reshape(-1), bias[l]]`` and
    ``to_dense()`` is neuron-major.  With one independent response per (channel, position),
    the per-image Fisher of eq. (9), averaged over images, is this metric times the number of
    output positions P.

    The returned metric carries ``layout=ParamLayout(kernel.shape, bias.shape)``, so
    ``matvec``/``solve`` take and return ``{"kernel": (*window, c_in / G, c_out),
    "bias": (c_out,)}``, the conv's own shapes.

    Memory (under ``jit``; N = n P rows, m = c_out): the augmented patches are formed once,
    ``N d`` numbers (``prod(window)`` times the input), plus ``z`` and the coefficients nu,
    ``2 N m``.  On top of that the statistics need: ``"diagonal"`` ``N d`` (the squared
    patches); ``"eigen"`` ``N d`` (the rotated patches) and ``d^2``; ``"exact"`` with a linear
    kind ``d^2``; ``"exact"`` with an activation kind one weighted product of
    ``N (m / G) d`` numbers (the single einsum of eq. 23, as for a Dense layer), and softmax
    ``N m^2 d``.  No per-row (d, d) array is formed.  The results hold ``m d^2``
    (exact), ``d^2 + m d`` (eigen) or ``m d`` (diagonal) numbers.

    Args:
      params: ``{"kernel": (*window, c_in / G, c_out), "bias": (c_out,)}``, bias optional,
        1, 2 or 3 (or more) spatial dimensions (Flax's ``nn.Conv``/``nnx.Conv`` layout).
      x: channels-last inputs ``(n, *spatial, c_in)``; extra leading batch axes are
        flattened into n, as Flax does.
      activation: an activation name or object (SPEC §3, §8), ``"linear"`` (eq. 22) or
        ``"softmax"`` (eq. 25 at every position, over the channels; G = 1 only).
      strides, padding, kernel_dilation, feature_group_count: as in ``flax.linen.Conv``
        (see :func:`conv_patches` for the accepted forms).
      representation: ``"exact"``, ``"eigen"`` or ``"diagonal"`` (SPEC §7).  With G = 1 the
        result is that of :func:`rfim_jax.layer_rfim_from_activations` on the rows:
        ``SharedBlockMetric`` (linear), ``BlockDiagonalMetric`` (activations), ``DenseMetric``
        (softmax), ``EigenDiagonalMetric`` or ``DiagonalMetric``.  With G > 1, ``"exact"``
        gives a ``BlockDiagonalMetric`` (also for a linear kind: blocks differ between
        groups) and ``"diagonal"`` a ``DiagonalMetric``.

    Returns:
      The layer's metric over its ``c_out d`` parameters, in the stats dtype (at least
      float32).

    Raises:
      ValueError: naming ``conv_rfim`` and the shapes expected and got, for a kernel of rank
        < 3, x whose rank does not match the kernel's, x's channels not equal to
        ``kernel.shape[-2] * feature_group_count`` (with a hint when x looks channels-first),
        a group count that does not divide c_in or c_out, a bias not of shape (c_out,), an
        empty batch, an unknown activation or representation, padding or strides Flax would
        not accept, ``representation="eigen"`` or kind ``"softmax"`` with G > 1.

    References:
      SPEC §8 (Conv); Sun & Nielsen, eq. (23) (and eqs. 22, 25 for the linear and softmax
      kinds); SPEC §7 for the representations.
    """
    where = "conv_rfim"
    rfim_lib.check_representation(representation, where=where)
    kind = rfim_lib.resolve_kind(activation, where=where)
    kernel, bias = _unpack_conv(params, where)
    kernel_shape = _shape(kernel)
    geom = _geometry(kernel_shape[:-2], strides, padding, kernel_dilation,
                     feature_group_count, where)
    groups = geom.feature_group_count
    _check_groups(kernel_shape, groups, where)
    x = jnp.asarray(x)
    _check_inputs(_shape(x), kernel_shape, groups, where)
    if x.size == 0:
        raise ValueError(f"{where}: the batch is empty (x shape {_shape(x)}).")
    has_bias = bias is not None
    dtype = rfim_lib.stats_dtype(x, kernel)
    layout = _layout(kernel_shape, has_bias)
    v = {"kernel": kernel.astype(dtype)}
    if has_bias:
        v["bias"] = bias.astype(dtype)
    cols = metrics_lib.params_to_columns(v, has_bias, name=where, layout=layout)  # (d, m)
    patches = _patches(x.astype(dtype), geom, ones=has_bias, where=where)
    d, m = cols.shape
    static = {"has_bias": has_bias, "layout": layout}
    if groups == 1:
        x_aug = patches.reshape(-1, d)
        return rfim_lib.rows_rfim(
            x_aug, x_aug @ cols, kind, representation=representation, **static
        )
    _check_grouped(kind, groups=groups, d=d, per_group=m // groups,
                   representation=representation, where=where)
    x_aug = patches.reshape(-1, groups, d)
    z = jnp.einsum("ngi,igk->ngk", x_aug, cols.reshape(d, groups, m // groups)).reshape(-1, m)
    return rfim_lib.rows_rfim(
        x_aug, z, kind, representation=representation, **static
    )
