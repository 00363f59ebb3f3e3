"""Batched symmetric positive-definite solves and inverses for stacks of metric blocks.

PLACEHOLDER implementation (lax.map over LAPACK Cholesky); the interface is fixed:

- ``add_damping(blocks, damping, *, relative=False)``
- ``spd_inverse_and_status(blocks, *, method="auto", previous=None) -> (inv, ok)``
- ``spd_inverse(blocks, *, method="auto", previous=None) -> inv``
- ``spd_solve(blocks, rhs, *, method="auto") -> x``
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_damping(blocks: jax.Array, damping, *, relative: bool = False) -> jax.Array:
    """Returns ``G + eps I`` per block; ``eps = damping * tr(G)/d`` when ``relative`` (eq. 30)."""
    d = blocks.shape[-1]
    eye = jnp.eye(d, dtype=blocks.dtype)
    if relative:
        eps = damping * jnp.trace(blocks, axis1=-2, axis2=-1) / d
    else:
        eps = jnp.broadcast_to(jnp.asarray(damping, blocks.dtype), blocks.shape[:-2])
    return blocks + eps[..., None, None] * eye


def spd_inverse_and_status(blocks, *, method="auto", previous=None):
    d = blocks.shape[-1]
    flat = blocks.reshape((-1, d, d))

    def one(b):
        c = jnp.linalg.cholesky(b)
        eye = jnp.eye(d, dtype=b.dtype)
        return jax.scipy.linalg.cho_solve((c, True), eye)

    inv = jax.lax.map(one, flat).reshape(blocks.shape)
    ok = jnp.all(jnp.isfinite(inv), axis=(-2, -1))
    eye = jnp.eye(d, dtype=blocks.dtype)
    inv = jnp.where(ok[..., None, None], inv, eye)
    return inv, ok


def spd_inverse(blocks, *, method="auto", previous=None):
    return spd_inverse_and_status(blocks, method=method, previous=previous)[0]


def spd_solve(blocks, rhs, *, method="auto"):
    inv = spd_inverse(blocks, method=method)
    if rhs.ndim == blocks.ndim - 1:
        return jnp.einsum("...ij,...j->...i", inv, rhs)
    return inv @ rhs


def spd_max_eigenvalue(blocks, num_iters: int = 30):
    """Largest eigenvalue per block by power iteration (matmul-only)."""
    d = blocks.shape[-1]
    v0 = jnp.ones(blocks.shape[:-1], blocks.dtype) / jnp.sqrt(d)

    def body(_, v):
        w = jnp.einsum("...ij,...j->...i", blocks, v)
        return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-30)

    v = jax.lax.fori_loop(0, num_iters, body, v0)
    return jnp.einsum("...i,...ij,...j->...", v, blocks, v)
