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

import jax
import jax.numpy as jnp

from rfim_jax._src import activations as act_lib
from rfim_jax._src import metrics

Params = dict[str, jax.Array]


def stats_dtype(*arrays) -> jnp.dtype:
    """The accumulation dtype: the inputs' result type, promoted to at least float32."""
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.promote_types(dtype, jnp.float32)


def flatten_batch(x: jax.Array, *, name: str = "x") -> jax.Array:
    """Flattens every leading axis of ``x`` into one sample axis: (..., d) -> (n, d)."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected a batch of shape (n, d) or (..., n, d), got shape {tuple(x.shape)}."
        )
    return x.reshape((-1, x.shape[-1]))


def augment(x: jax.Array, has_bias: bool) -> jax.Array:
    """``x~ = [x, 1]`` row-wise when the layer has a bias, else ``x`` (Sec. 3)."""
    if not has_bias:
        return x
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _inputs(params: Params, x: jax.Array, name: str):
    """Returns (x~ (n, d) in stats dtype, z (n, m), has_bias), checking shapes."""
    kernel, bias = metrics.unpack_dense(params, name)
    x = flatten_batch(x, name=f"{name}: x")
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


def second_moment(x_aug: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``mean_i x~_i x~_i^T`` (d, d), or per column of ``weights`` (n, m): (m, d, d).

    This is the single einsum behind eqs. (21)-(23); with weights it computes
    ``G_l = mean_i w_il x~_i x~_i^T`` for every l in one pass, with no loop over neurons.
    """
    n = x_aug.shape[0]
    if weights is None:
        return (x_aug.T @ x_aug) / n
    return jnp.einsum("nl,ni,nj->lij", weights, x_aug, x_aug) / n


def softmax_coefficients(z: jax.Array) -> jax.Array:
    """Per-sample Fisher of the logits of a categorical response: ``diag(eta) - eta eta^T``."""
    eta = jax.nn.softmax(z, axis=-1)
    return jax.vmap(jnp.diag)(eta) - eta[:, :, None] * eta[:, None, :]


def coupled_rfim(x_aug: jax.Array, coeffs: jax.Array) -> jax.Array:
    """``[mean_i K_i[k, l] x~_i x~_i^T]_{k,l}`` as a dense (m d, m d) neuron-major matrix.

    ``coeffs`` is (n, m, m). This is the shared form of eqs. (25) and (26).
    """
    n, d = x_aug.shape
    m = coeffs.shape[-1]
    dense = jnp.einsum("nkl,ni,nj->kilj", coeffs, x_aug, x_aug) / n
    return dense.reshape(m * d, m * d)


def layer_rfim_from_activations(
    x_aug: jax.Array, z: jax.Array, kind, *, has_bias: bool = True
) -> metrics.Metric:
    """The RFIM of one dense layer from its augmented inputs and pre-activations.

    ``kind`` is ``"linear"`` (eq. 22, ``A = mean x~ x~^T / sigma^2`` with sigma=1, or a
    :class:`Linear` object for another sigma), ``"softmax"`` (eq. 25), or any other activation
    name or object (eq. 23).  This is what the optimiser calls on captured activations.
    """
    m = z.shape[-1]
    if isinstance(kind, str) and kind == "softmax":
        return metrics.DenseMetric(
            coupled_rfim(x_aug, softmax_coefficients(z)), num_neurons=m, has_bias=has_bias
        )
    activation = act_lib.get_activation(kind)
    if isinstance(activation, act_lib.Linear):
        block = second_moment(x_aug) / activation.sigma**2
        return metrics.SharedBlockMetric(block, num_neurons=m, has_bias=has_bias)
    return metrics.BlockDiagonalMetric(
        second_moment(x_aug, activation.nu(z)), has_bias=has_bias
    )


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
    return nonlinear_rfim(p, x, activation).blocks[0]


def linear_rfim(params: Params, x: jax.Array, sigma: float = 1.0) -> metrics.SharedBlockMetric:
    """RFIM of a linear layer ``y ~ N(W~^T x~, sigma^2 I)``, eq. (22).

        g^y(W | x) = diag(A, ..., A),   A = mean_i x~_i x~_i^T / sigma^2.

    Returns a :class:`SharedBlockMetric` that stores A once.
    """
    x_aug, z, has_bias = _inputs(params, x, "linear_rfim")
    return layer_rfim_from_activations(x_aug, z, act_lib.Linear(sigma=sigma), has_bias=has_bias)


def nonlinear_rfim(
    params: Params, x: jax.Array, activation: act_lib.ActivationLike
) -> metrics.BlockDiagonalMetric:
    """RFIM of a nonlinear layer ``y = f(W~^T x~)`` with stochastic output, eq. (23).

        g^y(W | x) = diag(G_1, ..., G_m),   G_l = mean_i nu_f(z_il) x~_i x~_i^T.

    Returns a :class:`BlockDiagonalMetric` holding the (m, d, d) stack.  A ``"linear"``
    activation gives the same numbers as :func:`linear_rfim`, stored per neuron.
    """
    x_aug, z, has_bias = _inputs(params, x, "nonlinear_rfim")
    activation = act_lib.get_activation(activation)
    return metrics.BlockDiagonalMetric(
        second_moment(x_aug, activation.nu(z)), has_bias=has_bias
    )


def softmax_rfim(params: Params, x: jax.Array) -> metrics.DenseMetric:
    """RFIM of a softmax layer ``p(y = k) = eta_k = softmax(W~^T x~)_k``, eq. (25).

        G_{kl} = mean_i (delta_kl eta_ik - eta_ik eta_il) x~_i x~_i^T.

    It equals the last-layer diagonal block of the network's FIM (Sec. 4).
    """
    x_aug, z, has_bias = _inputs(params, x, "softmax_rfim")
    return layer_rfim_from_activations(x_aug, z, "softmax", has_bias=has_bias)


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
    if isinstance(output_activation, str) and output_activation == "softmax":
        out_fisher = softmax_coefficients(u)
        coeffs = jnp.einsum("nil,nlk,njk->nij", fc, out_fisher, fc)
    else:
        nu_g = act_lib.get_activation(output_activation).nu(u)
        coeffs = jnp.einsum("nil,nl,njl->nij", fc, nu_g, fc)
    return metrics.DenseMetric(coupled_rfim(x_aug, coeffs), num_neurons=z.shape[-1],
                               has_bias=has_bias)
