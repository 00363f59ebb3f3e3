"""The Fisher-Rao norm of the parameters, ``theta^T F theta``, without the dense FIM.

After Liang, Poggio, Rakhlin and Stokes, "Fisher-Rao Metric, Geometry, and Complexity of
Neural Networks" (AISTATS 2019; arXiv 1711.01530), Definition of the Fisher-Rao norm and
Lemma 2.1.  F is the full-network FIM of :func:`rfim_jax.full_fisher` (paper eq. 5 of Sun &
Nielsen), the mean over the N samples:

    F = 1/N sum_i J_i^T F_out(o_i) J_i,    J_i = d o_i / dtheta,

so the squared norm is

    ||theta||_fr^2 = theta^T F theta = 1/N sum_i (J_i theta)^T F_out(o_i) (J_i theta).

``J_i theta`` for all samples at once is one Jacobian-vector product of the batched model
along the tangent theta itself (``jax.jvp(model_fn, (params,), (params,))``): the cost is
about one forward pass, and neither J nor F is ever formed.

**Lemma 2.1.**  For a bias-free network whose activations are positively homogeneous
(ReLU, leaky ReLU, linear), with L hidden layers and so L + 1 weight matrices, the output is
homogeneous of degree L + 1 in theta, and by Euler's theorem

    <grad_theta f(x), theta> = J theta = (L + 1) f(x),

hence ``||theta||_fr^2 = (L + 1)^2 E[<dl/df, f(x)>^2]``.  This is a property of such networks
only: with biases (a bias of layer t has degree L + 1 - t, not L + 1), or with tanh/sigmoid
hidden units, it fails; :func:`fisher_rao_norm` never uses it and stays exact for any model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rfim_jax._src import arguments
from rfim_jax._src.dtypes import at_least_float32, reject_complex
from rfim_jax._src.fisher import RESPONSES, Response, _output_fisher_quadratic


def _output_score(response: str, o: jax.Array, y: jax.Array, sigma) -> jax.Array:
    """``d ln p(y | o) / do`` per sample, for outputs o (N, k) and labels y (N, k)."""
    if response == "gaussian":
        return (y - o) / sigma**2
    if response == "bernoulli":
        return y - jax.nn.sigmoid(o)
    # Categorical, y one-hot (or any class weights): d/do sum_c y_c log softmax(o)_c.
    return y - jnp.sum(y, axis=-1, keepdims=True) * jax.nn.softmax(o, axis=-1)


def _labels_as_outputs(
    response: str, labels: Any, out_shape: tuple[int, ...], k: int, dtype
) -> jax.Array:
    """Checks ``labels`` against the outputs' shape; returns them as (N, k) in ``dtype``."""
    labels = jnp.asarray(labels)
    reject_complex(labels.dtype, "fisher_rao_norm: labels")
    shape = tuple(labels.shape)
    if response == "categorical":
        if shape == out_shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
            if not isinstance(labels, jax.core.Tracer) and labels.size:
                host = np.asarray(labels)
                lo, hi = int(host.min()), int(host.max())
                if lo < 0 or hi >= k:
                    raise ValueError(
                        f"fisher_rao_norm: class indices range over [{lo}, {hi}], outside the "
                        f"outputs' {k} classes [0, {k - 1}]."
                    )
            # A traced index outside [0, k) would be an all-zero one-hot row: make it NaN.
            bad = (labels.reshape(-1) < 0) | (labels.reshape(-1) >= k)
            onehot = jax.nn.one_hot(labels.reshape(-1), k, dtype=dtype)
            return jnp.where(bad[:, None], jnp.asarray(jnp.nan, dtype), onehot)
        if shape == out_shape:
            return labels.reshape(-1, k).astype(dtype)
        raise ValueError(
            f"fisher_rao_norm: for a 'categorical' response with outputs of shape {out_shape}, "
            f"labels must be integer class indices of shape {out_shape[:-1]} or one-hot rows of "
            f"shape {out_shape}; got labels of shape {shape} and dtype {labels.dtype}."
        )
    if shape != out_shape:
        raise ValueError(
            f"fisher_rao_norm: for a {response!r} response, labels must have the outputs' shape "
            f"{out_shape}; got labels of shape {shape}."
        )
    if response == "bernoulli" and not isinstance(labels, jax.core.Tracer) and labels.size:
        # Checked when known, as class indices are: a label of 3 is no Bernoulli outcome.
        host = np.asarray(labels, np.float64)
        if not (np.all(host >= 0) and np.all(host <= 1)):
            raise ValueError(
                f"fisher_rao_norm: 'bernoulli' labels must lie in [0, 1], got values in "
                f"[{np.nanmin(host):g}, {np.nanmax(host):g}]"
                f"{' and NaN' if np.isnan(host).any() else ''}."
            )
    return labels.reshape(-1, k).astype(dtype)


def fisher_rao_norm(
    model_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    response: Response,
    *,
    labels: jax.Array | None = None,
    sigma: float = 1.0,
) -> jax.Array:
    """The squared Fisher-Rao norm ``theta^T F theta`` by one JVP, never the dense FIM.

    With ``o_i = model_fn(params, x)[i]`` the k outputs of sample i and ``v_i = J_i theta``
    their directional derivative along the parameters themselves (one ``jax.jvp`` of the
    batched ``model_fn`` with tangent ``params``):

    * **model form** (``labels=None``): ``mean_i v_i^T F_out(o_i) v_i`` with the output
      Fisher of :func:`rfim_jax.full_fisher`, i.e. exactly ``theta^T F theta`` for
      ``F = full_fisher(model_fn, params, x, response, sigma=sigma).matrix``; the expectation
      over y ~ p(y | o_i) is taken in closed form.
    * **empirical form** (``labels`` given): y is the observed label instead, so F_out(o_i)
      becomes the outer product of the output score ``s_i = d ln p(y_i | o_i) / do`` and the
      result is ``mean_i <s_i, v_i>^2 = theta^T F_emp theta`` with the empirical FIM
      ``F_emp = mean_i grad_theta l_i grad_theta l_i^T``, ``l_i = ln p(y_i | x_i, theta)``.

    Liang et al. define the norm with the Fisher information of the model (the model form,
    y drawn from the model's own conditional distribution, x from the data); their
    experiments also report the empirical form with the true labels.  Their Lemma 2.1 and
    the identity ``||theta||_fr^2 = (L + 1)^2 E[<dl/df, f>^2]`` hold in either form, for
    bias-free networks with positively homogeneous (ReLU) activations only (module
    docstring).

    Units: the result is the *squared* norm, a mean over samples (not a sum), in nats:
    ``theta^T F theta = 2 lim_{t->0} KL(p_theta || p_{(1+t) theta}) / t^2`` per sample, the
    KL curvature along the ray that rescales every parameter, with natural logarithms.  It
    is invariant to how the parameters are ordered or shaped; for a Gaussian response it
    scales as ``1/sigma^2``.  Take ``jnp.sqrt`` for the norm itself.

    Args:
      model_fn: ``model_fn(params, x)`` -> outputs of shape (n, k), or (n,) for a single
        Bernoulli/Gaussian output; more leading axes are flattened into N samples, as in
        :func:`rfim_jax.full_fisher`.  Outputs are logits for ``"bernoulli"`` and
        ``"categorical"`` and the mean for ``"gaussian"``.  It must be differentiable
        (forward mode) in ``params``.
      params: any pytree of floating-point arrays; it is theta, and also the tangent of the
        JVP.
      x: the inputs, passed to ``model_fn`` unchanged.
      response: ``"bernoulli"``, ``"categorical"`` or ``"gaussian"``, as in
        :func:`rfim_jax.full_fisher`.  Static under jit.
      labels: ``None`` for the model form, or the observed labels for the empirical form:
        the outputs' shape for ``"bernoulli"`` (values in [0, 1]) and ``"gaussian"``; for
        ``"categorical"`` either integer class indices of the outputs' shape without the
        last axis, or one-hot rows of the outputs' shape.
      sigma: the Gaussian noise scale (ignored otherwise); may be traced.

    Returns:
      A scalar: ``theta^T F theta`` (model form) or ``theta^T F_emp theta`` (empirical form),
      in the parameters' dtype promoted to at least float32.  NaN when traced class indices
      fall outside ``[0, k)`` (concrete ones raise).

    Raises:
      TypeError: for a params leaf that is not floating point (integer, bool or complex),
        naming its path, dtype and shape.
      ValueError: for an unknown ``response``, a ``sigma <= 0`` known now, outputs of the wrong
        rank (a categorical response needs (n, k)), or ``labels`` whose shape (or, for a
        categorical response given class indices, dtype) does not match the outputs,
        concrete class indices outside ``[0, k)``, or concrete Bernoulli labels outside
        ``[0, 1]``; the message names the shapes or the values.

    References:
      T. Liang, T. Poggio, A. Rakhlin, J. Stokes, "Fisher-Rao Metric, Geometry, and
      Complexity of Neural Networks", AISTATS 2019 (arXiv 1711.01530): Definition of the
      Fisher-Rao norm, Lemma 2.1 and its corollary.  K. Sun, F. Nielsen, "Relative Fisher
      Information and Natural Gradient for Learning Large Modular Models", ICML 2017,
      eq. (5) for F.
    """
    if response not in RESPONSES:
        raise ValueError(
            f"fisher_rao_norm: unknown response {response!r}; valid responses are "
            f"{', '.join(repr(r) for r in RESPONSES)}."
        )
    arguments.check_positive("sigma", sigma, where="fisher_rao_norm: ")

    with_path = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in with_path:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"fisher_rao_norm: params must be floating point (they are the tangent of a "
                f"JVP), but the leaf at {jax.tree_util.keystr(path)!r} has dtype "
                f"{jnp.result_type(leaf)} and shape {tuple(jnp.shape(leaf))}."
            )
    leaves = [leaf for _, leaf in with_path]
    dtype = at_least_float32(*leaves) if leaves else jnp.float32
    out, v = jax.jvp(lambda p: jnp.asarray(model_fn(p, x)), (params,), (params,))
    out_shape = tuple(out.shape)
    if out.ndim == 0 or (response == "categorical" and out.ndim < 2):
        raise ValueError(
            f"fisher_rao_norm: model_fn must return outputs of shape (n, k)"
            f"{'' if response == 'categorical' else ' or (n,)'} for a {response!r} response, "
            f"got shape {out_shape}."
        )
    if out.size == 0:  # a mean over no samples is NaN
        raise ValueError(f"fisher_rao_norm: the batch is empty (model_fn's outputs have shape "
                         f"{out_shape}).")
    k = 1 if out.ndim == 1 else out_shape[-1]
    o = out.reshape(-1, k).astype(dtype)
    v = v.reshape(-1, k).astype(dtype)

    if labels is None:
        # mean_i v_i^T F_out(o_i) v_i: full_fisher's own output Fisher with a single direction.
        return _output_fisher_quadratic(v[..., None], o, response, sigma)[0, 0]
    y = _labels_as_outputs(response, labels, out_shape, k, dtype)
    score = _output_score(response, o, y, sigma)
    return jnp.mean(jnp.sum(score * v, axis=-1) ** 2)
