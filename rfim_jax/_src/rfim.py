"""Pure constructors of relative Fisher information metrics (paper Sec. 3, eqs. 9-26).

The RFIM of parameters theta with response h given reference x is (Definition 1, eq. 9)

    g^h(theta | x) = E_{p(h | x,theta)} [d_theta ln p(h | theta,x) d_theta^T ln p(h | theta,x)].

Every function here computes the *observed* RFIM: the mean over the rows of a batch ``x`` of
shape ``(..., d_in)``; all leading axes are flattened into samples (eqs. 30-32).  Statistics are
accumulated in at least float32 even for bfloat16/float16 inputs.

Dense params follow Flax, ``{"kernel": (d_in, m), "bias": (m,)}``, the bias optional, and the
pre-activation is ``z = x @ kernel + bias``.  With ``x~ = [x, 1]`` (or ``x`` without a bias) and
``d = len(x~)``, neuron l's vector is ``w~_l = [kernel[:, l], bias[l]]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rfim_jax._src import activations as act_lib
from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import metrics
from rfim_jax._src import statistics as stats

Params = dict[str, jax.Array]


def stats_dtype(*arrays) -> jnp.dtype:
    """The accumulation dtype: the inputs' result type, promoted to at least float32.

    Decided under standard promotion, so it also works under strict dtype promotion.
    """
    return dtypes_lib.at_least_float32(*arrays)


def flatten_batch(x: jax.Array, *, name: str = "x") -> jax.Array:
    """Flattens every leading axis of ``x`` into one sample axis: (..., d) -> (n, d)."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected a batch of shape (n, d) or (..., n, d), got shape {tuple(x.shape)}."
        )
    # The row count spelled out: reshape((-1, 0)) cannot infer it for zero features.
    return x.reshape((math.prod(x.shape[:-1]), x.shape[-1]))


def augment(x: jax.Array, has_bias: bool) -> jax.Array:
    """``x~ = [x, 1]`` row-wise when the layer has a bias, else ``x`` (Sec. 3)."""
    if not has_bias:
        return x
    # ones_like of a slice of x, not jnp.ones: it keeps x's sharding of the sample axes, which
    # explicit sharding requires of both operands of the concatenation.
    return jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)


def _inputs(params: Params, x: jax.Array, name: str):
    """Returns (x~ (n, d) in stats dtype, z (n, m), has_bias), checking shapes."""
    kernel, bias = metrics.unpack_dense(params, name)
    x = flatten_batch(x, name=f"{name}: x")
    for arr in (x, kernel, bias):
        if arr is not None:
            dtypes_lib.reject_complex(jnp.result_type(arr), name)
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"{name}: x has {x.shape[-1]} features but kernel expects d_in={kernel.shape[0]} "
            f"(kernel shape {tuple(kernel.shape)}, x shape {tuple(x.shape)})."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (x shape {tuple(x.shape)}).")
    dtype = stats_dtype(x, kernel)
    x = x.astype(dtype)
    z = x @ kernel.astype(dtype)
    if bias is not None:
        z = z + bias.astype(dtype)
    return augment(x, bias is not None), z, bias is not None


# --------------------------------------------------------------- statistics from activations


def resolve_kind(kind, *, where: str = "layer_rfim_from_activations",
                 pass_through: bool = False):
    """A layer kind as ``"softmax"`` or an :class:`Activation` (``"linear"`` -> ``Linear()``).

    Names are case-insensitive.  ``pass_through``: the caller (an optimiser's ``layers``)
    also takes None, which the error's list of valid kinds then includes.

    Raises:
      ValueError: for an unknown kind, naming ``where`` and listing the valid kinds.
    """
    if isinstance(kind, str) and kind.lower() == "softmax":
        return "softmax"
    if kind is None:
        # None is a kind only in an optimiser's ``layers`` (the gradient passes through); a
        # metric always needs one.
        raise ValueError(
            f"{where}: kind None (pass-through) has no RFIM. A kind is an activation name "
            f"({', '.join(act_lib.ACTIVATION_NAMES)}), an rfim_jax.Activation object or "
            f"'softmax'; None is accepted only in scale_by_rngd's layers, where it leaves "
            f"the layer's gradient unchanged."
        )
    try:
        return act_lib.get_activation(kind)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{where}: unknown kind {kind!r}. A kind is an activation name "
            f"({', '.join(act_lib.ACTIVATION_NAMES)}), an rfim_jax.Activation object"
            + (", 'softmax', or None (pass-through)." if pass_through else " or 'softmax'.")
        ) from e


def check_representation(representation: str, *, where: str) -> str:
    """Validates a representation name ("exact", "eigen" or "diagonal")."""
    if representation not in metrics.REPRESENTATIONS:
        raise ValueError(
            f"{where}: unknown representation {representation!r}; valid ones are "
            f"{', '.join(repr(r) for r in metrics.REPRESENTATIONS)}."
        )
    return representation


def _check_rows(x_aug, z) -> tuple[jax.Array, jax.Array]:
    """``(x_aug, z)`` checked and in the statistics dtype (at least float32)."""
    x_aug, z = jnp.asarray(x_aug), jnp.asarray(z)
    where = "layer_rfim_from_activations"
    shapes = f"x_aug {tuple(x_aug.shape)}, z {tuple(z.shape)}"
    if z.ndim != 2 or x_aug.ndim not in (2, 3):
        raise ValueError(
            f"{where}: expected x_aug (n, d) (or (n, G, d), a grouped conv's rows) and z "
            f"(n, m), got {shapes}; flatten leading batch axes (e.g. (batch, seq, d)) into n."
        )
    if x_aug.shape[0] != z.shape[0]:
        raise ValueError(f"{where}: x_aug and z have different sample counts: {shapes}.")
    if x_aug.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty ({shapes}).")
    dtype = stats_dtype(x_aug, z)
    return x_aug.astype(dtype), z.astype(dtype)


def _check_augmented(x_aug) -> None:
    """Refuses concrete rows whose last column is not the bias's 1 (x~ = [x, 1]).

    Captured inputs come without it, and a last input column read as the bias's would give
    a metric of the wrong size with no error.  Traced rows (inside the optimiser's jit) are
    left unchecked.
    """
    if isinstance(x_aug, jax.core.Tracer) or jnp.ndim(x_aug) < 2 or not jnp.size(x_aug):
        return
    last = np.asarray(x_aug)[..., -1]
    if not np.all(last == 1):
        shape = tuple(jnp.shape(x_aug))
        raise ValueError(
            f"layer_rfim_from_activations: has_bias=True takes the augmented inputs x~ = "
            f"[x, 1], but the last column of x_aug {shape} is not all ones (captured "
            f"inputs come without it). Append it, jnp.concatenate([x, jnp.ones_like(x[..., "
            f":1])], -1), or pass has_bias=False for a layer without a bias."
        )


def softmax_classes_error(where: str, m: int) -> ValueError:
    """The error for kind ``"softmax"`` on fewer than two outputs (eq. 25 is then 0)."""
    return ValueError(
        f"{where}: kind 'softmax' needs at least 2 outputs (classes), got {m}: a softmax over "
        f"one logit is the constant distribution, so its RFIM (eq. 25) is identically 0. A "
        f"single logit of a binary response is the Bernoulli kind 'sigmoid' (eq. 15)."
    )


def _check_orthonormal(basis, dtype) -> None:
    """Refuses a concrete ``basis`` whose columns are not orthonormal.

    Every eigen formula (``G_l ~= U diag(s_l) U^T``, the solve ``U (U^T V / s)``) assumes
    ``U^T U = I``; another basis gives wrong metrics with no error.  The tolerance,
    ``max(sqrt(eps), 10 d eps)`` with the eps of the less precise of the basis's dtype and
    the rows' ``dtype``, admits the rounding of an ``eigh`` in either (a float32 basis used
    with float64 rows is accepted).  Traced bases (under ``jit``) are the caller's
    responsibility.
    """
    if isinstance(basis, jax.core.Tracer):
        return
    basis = jnp.asarray(basis)
    d = basis.shape[-1]
    eps = max(float(jnp.finfo(t).eps) for t in (basis.dtype, dtype)
              if jnp.issubdtype(t, jnp.inexact))
    tol = max(eps**0.5, 10 * d * eps)
    b = basis.astype(dtypes_lib.at_least_float32(basis))
    err = float(jnp.max(jnp.abs(b.T @ b - jnp.eye(d, dtype=b.dtype))))
    if not err <= tol:  # also refuses NaN
        raise ValueError(
            f"layer_rfim_from_activations: basis ({d}, {d}) must have orthonormal columns "
            f"(U^T U = I, SPEC §7), but max |U^T U - I| = {err:.3g} exceeds {tol:.3g} for "
            f"{basis.dtype}. Use the eigenvectors of a symmetric matrix (jnp.linalg.eigh) or "
            f"the Q of a QR factorisation."
        )


def layer_rfim_from_activations(
    x_aug: jax.Array,
    z: jax.Array,
    kind,
    *,
    has_bias: bool = True,
    representation: str = "exact",
    basis: jax.Array | None = None,
    layout: metrics.ParamLayout | None = None,
) -> metrics.Metric:
    """The RFIM of one layer from its augmented inputs (n, d) and pre-activations (n, m).

    Inputs of shape (n, G, d) are the rows of a grouped convolution (SPEC §8): neuron l sees
    group ``l // (m / G)`` only; ``"exact"`` (a :class:`BlockDiagonalMetric`, also for a
    linear kind, whose blocks then differ between groups) and ``"diagonal"`` support them.

    ``kind`` is ``"linear"`` (eq. 22, ``A = mean x~ x~^T / sigma^2`` with sigma=1, or a
    :class:`Linear` object for another sigma), ``"softmax"`` (eq. 25), or any other activation
    name or object (eq. 23).  This is what the optimiser and the layer adapters call.

    ``representation`` (SPEC §7):

    * ``"exact"``: :class:`SharedBlockMetric` (linear), :class:`BlockDiagonalMetric`
      (activations) or :class:`DenseMetric` (softmax).
    * ``"eigen"``: :class:`EigenDiagonalMetric` in the eigenbasis ``U`` of
      ``A = mean x~ x~^T`` (or ``basis``): ``s_l = mean_i nu_il (U^T x~_i)^2``.  For a linear
      kind the scales are the eigenvalues of ``A / sigma^2`` (so it equals the exact metric
      when no ``basis`` is given).  For softmax it is *unit-wise*: class k is a neuron with
      ``nu = eta_k (1 - eta_k)``, the cross-class blocks of eq. (25) are dropped.
    * ``"diagonal"``: :class:`DiagonalMetric`, ``diag(G_l)`` (softmax unit-wise as above).

    The statistics are computed in at least float32, also for bfloat16 rows.

    Raises:
      ValueError: with ``has_bias=True``, for concrete rows whose last column is not all
        ones (the inputs not augmented); for an unknown kind or representation, a ``basis``
        that is not (d, d), a concrete one whose columns are not orthonormal, or one given
        with a representation other than ``"eigen"``, kind ``"softmax"`` on one output,
        grouped rows with ``"eigen"`` or ``"softmax"``, rows that are not ``(n, d)`` /
        ``(n, G, d)`` and ``(n, m)`` with the same n, or an empty batch (the shapes named).
    """
    if has_bias:
        _check_augmented(x_aug)
    return rows_rfim(x_aug, z, kind, has_bias=has_bias, representation=representation,
                     basis=basis, layout=layout)


def rows_rfim(
    x_aug: jax.Array,
    z: jax.Array,
    kind,
    *,
    has_bias: bool = True,
    representation: str = "exact",
    basis: jax.Array | None = None,
    layout: metrics.ParamLayout | None = None,
) -> metrics.Metric:
    """:func:`layer_rfim_from_activations` for rows the library built augmented itself (the
    optimiser, the constructors, the conv and norm adapters): no check of the bias column,
    which would cost a device-to-host copy per call outside jit."""
    check_representation(representation, where="layer_rfim_from_activations")
    kind = resolve_kind(kind)
    x_aug, z = _check_rows(x_aug, z)
    d, m = x_aug.shape[-1], z.shape[-1]
    if basis is not None:
        if representation != "eigen":
            raise ValueError(
                f"layer_rfim_from_activations: basis is only used by representation='eigen', "
                f"got representation={representation!r}."
            )
        if tuple(basis.shape) != (d, d):
            raise ValueError(
                f"layer_rfim_from_activations: basis must be ({d}, {d}) for inputs of width "
                f"d={d}, got {tuple(basis.shape)}."
            )
        _check_orthonormal(basis, x_aug.dtype)
        basis = jnp.asarray(basis, x_aug.dtype)
    if isinstance(kind, str) and kind == "softmax" and m < 2:
        raise softmax_classes_error("layer_rfim_from_activations", m)
    static = {"has_bias": has_bias, "layout": layout}
    linear = act_lib.is_shared_linear(kind)
    if x_aug.ndim == 3:
        return _grouped_rfim(x_aug, z, kind, representation, static)
    if representation == "exact":
        if kind == "softmax":
            return metrics.DenseMetric(
                stats.coupled_rfim(x_aug, stats.softmax_coefficients(z)), num_neurons=m, **static
            )
        if linear:
            block = stats.second_moment(x_aug) / kind.sigma**2
            return metrics.SharedBlockMetric(block, num_neurons=m, **static)
        return metrics.BlockDiagonalMetric(stats.second_moment(x_aug, kind.nu(z)), **static)
    if kind == "softmax":
        weights = stats.softmax_unit_coefficients(z)
    else:
        weights = kind.nu(z)
    if representation == "diagonal":
        return metrics.DiagonalMetric(stats.diagonal_moments(x_aug, weights), **static)
    if linear and basis is None:
        evals, basis = stats.input_eigenbasis(stats.second_moment(x_aug))
        scales = jnp.broadcast_to(evals / kind.sigma**2, (m, d))
        return metrics.EigenDiagonalMetric(basis, scales, **static)
    if basis is None:
        _, basis = stats.input_eigenbasis(stats.second_moment(x_aug))
    return metrics.EigenDiagonalMetric(
        basis, stats.eigenbasis_moments(x_aug, weights, basis), **static
    )


def _grouped_rfim(x_aug, z, kind, representation, static) -> metrics.Metric:
    """Grouped rows x~ (n, G, d), z (n, m): per-neuron blocks, each from its group's rows."""
    n, groups, d = x_aug.shape
    if representation == "eigen" or kind == "softmax":
        raise ValueError(
            f"layer_rfim_from_activations: grouped rows {tuple(x_aug.shape)} (each group of "
            f"output channels sees its own inputs) support representation 'exact' or "
            f"'diagonal' with an activation or 'linear' kind, got representation="
            f"{representation!r} and kind {kind if isinstance(kind, str) else kind.name!r}."
        )
    weights = kind.nu(z)
    if representation == "diagonal":
        return metrics.DiagonalMetric(stats.diagonal_moments(x_aug, weights), **static)
    if isinstance(kind, act_lib.Linear):
        # Eq. (22) within each group: one block per group, repeated for its channels.
        shared = jnp.einsum("ngi,ngj->gij", x_aug, x_aug) / (n * kind.sigma**2)
        blocks = jnp.repeat(shared, z.shape[-1] // groups, axis=0)
        return metrics.BlockDiagonalMetric(blocks, **static)
    return metrics.BlockDiagonalMetric(stats.second_moment(x_aug, weights), **static)


# ------------------------------------------------------------------------ public metrics


def neuron_rfim(params: Params, x: jax.Array, activation: act_lib.ActivationLike) -> jax.Array:
    """RFIM of a single neuron, eq. (21): ``g = mean_i nu_f(z_i) x~_i x~_i^T``, shape (d, d).

    Args:
      params: ``{"kernel": (d_in,) or (d_in, 1), "bias": () or (1,)}``, bias optional.
      x: inputs, (..., d_in).
      activation: an activation name or object.
    """
    kernel = jnp.asarray(params["kernel"])
    p = {"kernel": kernel.reshape(-1, 1) if kernel.ndim == 1 else kernel}
    if params.get("bias") is not None:
        p["bias"] = jnp.asarray(params["bias"]).reshape(-1)
    if p["kernel"].shape[1] != 1:
        raise ValueError(
            f"neuron_rfim: expected one neuron, kernel shape (d_in,) or (d_in, 1), got "
            f"{tuple(kernel.shape)}."
        )
    x_aug, z, _ = _inputs(p, x, "neuron_rfim")
    return stats.second_moment(x_aug, act_lib.get_activation(activation).nu(z))[0]


def linear_rfim(
    params: Params, x: jax.Array, sigma: float = 1.0, *, representation: str = "exact"
) -> metrics.Metric:
    """RFIM of a linear layer ``y ~ N(W~^T x~, sigma^2 I)``, eq. (22).

        g^y(W | x) = diag(A, ..., A),   A = mean_i x~_i x~_i^T / sigma^2.

    Args:
      params: ``{"kernel": (d_in, m), "bias": (m,)}``, bias optional.
      x: inputs (..., d_in); leading axes are flattened into samples.
      sigma: the response noise's standard deviation (> 0).
      representation: ``"exact"`` (a :class:`SharedBlockMetric` that stores A once),
        ``"eigen"`` (an :class:`EigenDiagonalMetric` with U the eigenvectors of A and every
        row of S its eigenvalues over sigma^2: the same metric) or ``"diagonal"``
        (a :class:`DiagonalMetric`, ``diag(A) / sigma^2`` per neuron).

    Returns:
      The metric over the layer's ``m d`` parameters.

    Raises:
      ValueError: for mismatched shapes, an empty batch or an unknown representation.
    """
    x_aug, z, has_bias = _inputs(params, x, "linear_rfim")
    return rows_rfim(
        x_aug, z, act_lib.Linear(sigma=sigma), has_bias=has_bias, representation=representation
    )


def nonlinear_rfim(
    params: Params,
    x: jax.Array,
    activation: act_lib.ActivationLike,
    *,
    representation: str = "exact",
    basis: jax.Array | None = None,
) -> metrics.Metric:
    """RFIM of a nonlinear layer ``y = f(W~^T x~)`` with stochastic output, eq. (23).

        g^y(W | x) = diag(G_1, ..., G_m),   G_l = mean_i nu_f(z_il) x~_i x~_i^T.

    Args:
      params: ``{"kernel": (d_in, m), "bias": (m,)}``, bias optional.
      x: inputs (..., d_in); leading axes are flattened into samples.
      activation: an activation name or object (``"linear"`` gives the numbers of
        :func:`linear_rfim`, stored per neuron).
      representation: ``"exact"`` (a :class:`BlockDiagonalMetric`, the (m, d, d) stack),
        ``"eigen"`` (an :class:`EigenDiagonalMetric`: ``G_l ~= U diag(s_l) U^T`` with
        ``s_l = mean_i nu_f(z_il) (U^T x~_i)^2``, U the eigenvectors of ``mean x~ x~^T``;
        SPEC §7) or ``"diagonal"`` (a :class:`DiagonalMetric`, ``diag(G_l)``).
      basis: for ``"eigen"`` only, a (d, d) orthogonal matrix used instead of U.

    Returns:
      The metric over the layer's ``m d`` parameters.

    Raises:
      ValueError: for mismatched shapes, an unknown activation or representation, or a
        ``basis`` of the wrong shape, with columns that are not orthonormal (checked when
        concrete), or with another representation.
    """
    x_aug, z, has_bias = _inputs(params, x, "nonlinear_rfim")
    activation = act_lib.get_activation(activation)
    if representation == "exact" and basis is None:
        # Per neuron even for a linear activation (eq. 23's stack, not eq. 22's shared block).
        return metrics.BlockDiagonalMetric(
            stats.second_moment(x_aug, activation.nu(z)), has_bias=has_bias
        )
    return rows_rfim(
        x_aug, z, activation, has_bias=has_bias, representation=representation, basis=basis
    )


def softmax_rfim(params: Params, x: jax.Array, *, representation: str = "exact") -> metrics.Metric:
    """RFIM of a softmax layer ``p(y = k) = eta_k = softmax(W~^T x~)_k``, eq. (25).

        G_{kl} = mean_i (delta_kl eta_ik - eta_ik eta_il) x~_i x~_i^T.

    The exact form equals the last-layer diagonal block of the network's FIM (Sec. 4).

    Args:
      params: ``{"kernel": (d_in, m), "bias": (m,)}``, bias optional.
      x: inputs (..., d_in).
      representation: ``"exact"`` (a :class:`DenseMetric`, (m d, m d)); ``"eigen"`` or
        ``"diagonal"`` are *unit-wise*: class k is a neuron with ``nu = eta_k (1 - eta_k)``
        and the cross-class blocks (k != l) are dropped (SPEC §7).

    Returns:
      The metric over the layer's ``m d`` parameters.

    Raises:
      ValueError: for mismatched shapes, an unknown representation, or one output (a
        softmax over one class is constant, its metric 0: use ``"sigmoid"``).
    """
    x_aug, z, has_bias = _inputs(params, x, "softmax_rfim")
    return rows_rfim(
        x_aug, z, "softmax", has_bias=has_bias, representation=representation
    )


def two_layer_rfim(
    params: Params,
    params_out: Params,
    x: jax.Array,
    activation: act_lib.ActivationLike,
    output_activation: act_lib.ActivationLike | str = "sigmoid",
) -> metrics.DenseMetric:
    """RFIM of the first layer W of a two-layer block, with x and C as references (eq. 26).

    The model is ``h = f(W~^T x~)``, ``y ~ p(y | g(C~^T h~))``.  Writing ``u = C~^T h~`` and
    ``c_i`` for row i of C's kernel, the chain rule gives ``dy-logit/dw_i = c_i f'(z_i) x~``, so

        G_ij = mean_n sum_l c_il c_jl nu_g(u_nl) f'(z_ni) f'(z_nj) x~_n x~_n^T.

    The paper's eq. (26) writes nu_f where the chain rule gives f'; the two agree only for
    tanh and sigmoid (where nu_f = f'), so we use f'.  As in the stochastic model, f is the
    mean function its nu describes: relu_omega for ``ReLU(omega > 0)``, the hard PReLU for
    ``omega = 0``.  ``output_activation`` may be Bernoulli (``"sigmoid"``, ``"tanh"``),
    Gaussian (``"relu"``, ``"linear"``, ``"elu"``), or ``"softmax"``, for which the per-output
    coefficient becomes the categorical Fisher ``diag(eta) - eta eta^T``.

    Returns a :class:`DenseMetric` of size (D_h d, D_h d).
    """
    x_aug, z, has_bias = _inputs(params, x, "two_layer_rfim")
    activation = act_lib.get_activation(activation)
    # Names are case-insensitive, "softmax" included, as for a layer's kind.
    if isinstance(output_activation, str) and output_activation.lower() == "softmax":
        output = "softmax"
    else:
        try:
            output = act_lib.get_activation(output_activation)
        except ValueError as e:
            raise ValueError(f"{e} two_layer_rfim's output_activation may also be "
                             f"'softmax'.") from e
    kernel_out, bias_out = metrics.unpack_dense(params_out, "two_layer_rfim (params_out)")
    if kernel_out.shape[0] != z.shape[-1]:
        raise ValueError(
            f"two_layer_rfim: params_out kernel expects {kernel_out.shape[0]} hidden units, "
            f"but params has {z.shape[-1]} (params_out kernel shape {tuple(kernel_out.shape)})."
        )
    dtype = z.dtype
    kernel_out = kernel_out.astype(dtype)
    h = activation.f(z)
    u = h @ kernel_out
    if bias_out is not None:
        u = u + bias_out.astype(dtype)
    # fc[n, i, l] = f'(z_ni) c_il: derivative of output logit l wrt neuron i's pre-activation.
    fc = activation.df(z)[:, :, None] * kernel_out[None]
    if output == "softmax":
        out_fisher = stats.softmax_coefficients(u)
        coeffs = jnp.einsum("nil,nlk,njk->nij", fc, out_fisher, fc)
    else:
        nu_g = output.nu(u)
        coeffs = jnp.einsum("nil,nl,njl->nij", fc, nu_g, fc)
    return metrics.DenseMetric(stats.coupled_rfim(x_aug, coeffs), num_neurons=z.shape[-1],
                               has_bias=has_bias)
