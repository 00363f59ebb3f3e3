"""The statistics kernels behind every RFIM: moments of a layer's augmented inputs.

Each kernel takes the augmented inputs ``x~`` (n, d) of a batch (SPEC §2) and, where the
metric is per neuron, per-sample weights ``nu`` (n, m) (the Fisher coefficients of eq. 21),
and returns a mean over the n rows.  Costs are given for n samples, m neurons, width d.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def softmax_unit_coefficients(z: jax.Array) -> jax.Array:
    """The unit-wise softmax coefficients ``nu_ik = eta_ik (1 - eta_ik)`` (n, m) (SPEC §7).

    The diagonal of :func:`softmax_coefficients`: class k treated as a neuron on its own, the
    cross-class blocks of eq. (25) dropped.  Used by the eigen and diagonal representations.
    """
    eta = jax.nn.softmax(z, axis=-1)
    return eta * (1.0 - eta)


def diagonal_moments(x_aug: jax.Array, weights: jax.Array) -> jax.Array:
    """``s_lj = mean_i w_il x~_ij^2``, (m, d): the diagonals of every ``G_l``, in ``2 n m d``."""
    return (weights.T @ (x_aug * x_aug)) / x_aug.shape[0]


def eigenbasis_moments(x_aug: jax.Array, weights: jax.Array, basis: jax.Array) -> jax.Array:
    """``s_l = mean_i w_il (U^T x~_i)^2`` (m, d): each ``diag(U^T G_l U)`` (SPEC §7).

    Rotating the rows costs ``2 n d^2`` and the weighted squares ``2 n m d``; the (m, d, d)
    blocks are never formed.
    """
    return diagonal_moments(x_aug @ basis, weights)


def weighted_traces(x_aug: jax.Array, weights: jax.Array) -> jax.Array:
    """``tr G_l = mean_i w_il |x~_i|^2`` for every l, (m,)."""
    return (weights.T @ jnp.sum(x_aug * x_aug, axis=-1)) / x_aug.shape[0]


def input_eigenbasis(second: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of a symmetric (d, d)."""
    evals, evecs = jnp.linalg.eigh(0.5 * (second + second.T))
    return evals, evecs
