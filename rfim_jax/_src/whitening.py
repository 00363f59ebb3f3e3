"""Feature whitening maps for the paper's WhiteGD and WhiteNGD (Sec. 5.1, eq. 28).

The single-neuron experiment feeds the neuron with transformed samples

    z = ( (x - a)^T A^T, 1 )^T,   i.e.   z = A (x - a)  augmented with a constant 1,   (eq. 28)

where the whitening map ``(A, a)`` is precomputed from the data and fixed during learning, so
that the transformed samples ``{A (x_i - a)}`` have zero mean and unit covariance *except on
singular directions*.  In the row-sample layout used everywhere in this library (``x`` of
shape (n, d)) eq. (28) reads ``Z = (X - a) @ A.T``; that is :func:`apply_whitening`.

With a population covariance (divided by n) the whitened inputs satisfy
``mean_i z_i z_i^T = I`` on the non-singular subspace: the linear-layer RFIM of eq. (22) on
the whitened features is the identity there, which is why whitening conditions gradient
descent.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rfim_jax._src import arguments
from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import rfim as rfim_lib

WhiteningMethod = Literal["zca", "pca"]


def _check_finite(x: jax.Array) -> None:
    """Raises for concrete samples holding NaN or inf: one of them makes the mean, the
    covariance and so all of ``A`` NaN.  Traced samples (under ``jit``, ``vmap``, ``grad``)
    cannot be checked."""
    # One scalar read on the device; the data come to the host only to say where.
    if isinstance(x, jax.core.Tracer) or bool(jnp.all(jnp.isfinite(x))):
        return
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"whitening_map: x (samples x features {tuple(x.shape)}, as {x.dtype}) has "
            f"{int(bad.sum())} non-finite entries (NaN or inf), the first at sample {i}, "
            f"feature {j}; the map would be all NaN. Drop or impute those samples first (or "
            f"rescale them, if the conversion to {x.dtype} overflowed).")


def whitening_map(
    x: jax.Array,
    *,
    eps: float = 0.0,
    rtol: float | None = None,
    method: WhiteningMethod = "zca",
) -> tuple[jax.Array, jax.Array]:
    """Computes the feature-whitening map ``(A, a)`` of eq. (28) from samples ``x``.

    With ``a = mean_i x_i`` and ``C = mean_i (x_i - a)(x_i - a)^T = V diag(lambda) V^T``,

        A = V diag(m_k / sqrt(lambda_k + eps)) V^T        (method="zca", symmetric), or
        A = diag(m_k / sqrt(lambda_k + eps)) V^T          (method="pca", rows = principal axes,
                                                           largest variance first),

    where ``m_k = 1`` if ``lambda_k > rtol * max_k lambda_k`` and 0 otherwise.  Directions with
    a (numerically) zero variance -- constant pixels, duplicated or linearly dependent
    features -- are *singular*: ``A`` maps them to 0 instead of dividing by ~0, so the result
    is finite for any finite input (the covariance is formed from ``(x - a) / max|x - a|``,
    so data at 1e18 or 1e-19 in float32 whiten as well as data at 1).  Then
    ``z = A (x - a)`` (row layout: ``(x - a) @ A.T``, see :func:`apply_whitening`) has zero
    mean and covariance ``A C A^T``, which is the identity
    on the non-singular subspace and 0 on the singular one: the orthogonal projector
    ``V diag(m) V^T`` for "zca", ``diag(m)`` for "pca" (when ``eps = 0``).

    Args:
      x: samples, shape (n, d) or (..., n, d); all leading axes are flattened into samples.
      eps: optional regulariser added to every eigenvalue before the inverse square root
        (``eps > 0`` gives a damped whitening whose covariance is ``lambda / (lambda + eps)``).
      rtol: eigenvalues at or below ``rtol * lambda_max`` are treated as singular.  Defaults
        to ``d * finfo(dtype).eps``, the accuracy of eigenvalues of a covariance matrix in
        floating point (the convention of ``numpy.linalg.matrix_rank``).  Eigenvalues at the
        level of the data's own rounding, ``d sum_j v_jk^2 (eps max_i |x_ij|)^2`` for
        eigenvector ``v_k`` (feature by feature, after a two-pass centring), are singular too,
        so that constant data give ``A = 0`` while a feature with a large offset does not
        silence the others.
      method: ``"zca"`` (default; ``A`` symmetric, features stay aligned with the input
        coordinates) or ``"pca"``.

    Returns:
      ``(A, a)``: ``A`` of shape (d, d) and ``a`` of shape (d,), in the statistics dtype
      (the input dtype promoted to at least float32).

    Near-singular directions (e.g. pixels that are non-zero in only a few samples) are kept
    by the default ``rtol`` and scaled by up to ``1/sqrt(rtol lambda_max)``: a handful of
    samples then get very large features.  Pass a larger ``rtol`` (e.g. ``1e-6``) or ``eps``
    to treat them as singular or to damp them.

    This calls a single (d, d) ``eigh``; it is meant to run once per data set, and it is
    jit-compatible (``method`` is static).

    Raises:
      ValueError: for an unknown ``method``, a negative ``eps`` or ``rtol``, no samples, or
        concrete samples holding NaN or inf, naming how many and the first's place.  Traced
        samples (under ``jit``, ``vmap``, ``grad``) cannot be checked: non-finite ones give a
        non-finite ``A``.
    """
    if method not in ("zca", "pca"):
        raise ValueError(f"whitening_map: method must be 'zca' or 'pca', got {method!r}.")
    arguments.check_at_least("eps", eps, 0.0, where="whitening_map: ")
    arguments.check_at_least("rtol", rtol, 0.0, where="whitening_map: ")
    x = rfim_lib.flatten_batch(x, name="whitening_map: x")
    n, d = x.shape
    if d == 0:
        raise ValueError(f"whitening_map: x has no features (shape {tuple(x.shape)}).")
    if n == 0:
        raise ValueError(f"whitening_map: x has no samples (shape {tuple(x.shape)}).")
    _check_finite(x)
    dtype = rfim_lib.stats_dtype(x)
    x = x.astype(dtype)
    if rtol is None:
        rtol = d * float(jnp.finfo(dtype).eps)

    # Two-pass centring: the second pass removes the first mean's rounding error, which for a
    # feature with a large offset (1e4 + N(0, 1e-4)) is as large as its spread.
    a = jnp.mean(x, axis=0)
    xc = x - a
    shift = jnp.mean(xc, axis=0)
    a, xc = a + shift, xc - shift
    # The covariance of c^-1 (x - a), c = max |x - a|: its entries are at most 1, so neither
    # x^T x nor eigh overflows (data at 1e18 gave NaN in float32) or goes subnormal (at
    # 1e-19 the whitened variances came out 0.8-0.9); C = c^2 cov, eigenvalues c^2 lam.
    c = jnp.max(jnp.abs(xc))
    c = jnp.where((c > 0) & jnp.isfinite(c), c, 1.0)
    xs = xc / c
    cov = (xs.T @ xs) / n
    # Symmetrise so that eigh sees an exactly symmetric matrix regardless of matmul rounding.
    cov = 0.5 * (cov + cov.T)
    lam, v = jnp.linalg.eigh(cov)
    lam_max = jnp.maximum(jnp.max(lam), 0.0)
    # What is left is each entry's own rounding, eps |x_ij|: a direction whose variance is at
    # or below that noise, projected on it (feature by feature, so that one feature's large
    # offset does not silence another), is singular; constant data map to 0.
    noise_j = (jnp.finfo(dtype).eps * jnp.max(jnp.abs(x), axis=0) / c) ** 2
    noise = d * (noise_j @ (v * v))
    keep = (lam > rtol * lam_max) & (lam > noise)
    # 1 / sqrt(c^2 lam + eps) = c^-1 / sqrt(lam + eps / c^2), unless eps / c^2 overflows
    # (tiny data, damped), where c^2 lam is negligible next to eps.  The inner wheres keep
    # the discarded branches finite so gradients through them are too.
    eps = jnp.asarray(eps, dtype)
    rel_eps = eps / c**2
    safe = jnp.where(keep, lam + jnp.where(jnp.isfinite(rel_eps), rel_eps, 0.0), 1.0)
    scale = jnp.where(jnp.isfinite(rel_eps), jax.lax.rsqrt(safe) / c,
                      jax.lax.rsqrt(jnp.where(keep, c**2 * lam + eps, 1.0)))
    scale = jnp.where(keep, scale, 0.0)
    if method == "zca":
        big_a = (v * scale) @ v.T
    else:
        # eigh sorts eigenvalues ascending; put the largest-variance axis first.
        big_a = (scale[:, None] * v.T)[::-1]
    return big_a, a


#: Elements of x per row chunk of :func:`apply_whitening` (2**20 float32 = 4 MiB: at most
#: 1337 rows of 784 pixels).
APPLY_CHUNK_ELEMENTS = 2**20


def _row_chunk(n: int, target: int) -> int:
    """A divisor of ``n`` in [target / 4, target] if there is one (no remainder to
    concatenate: that copy cost as much as the chunking saved), else ``target``."""
    for c in range(min(target, n), max(target // 4, 1) - 1, -1):
        if n % c == 0:
            return c
    return target


def apply_whitening(x: jax.Array, big_a: jax.Array, a: jax.Array) -> jax.Array:
    """Applies eq. (28) row-wise: ``z_i = A (x_i - a)``, i.e. ``Z = (X - a) @ A.T``.

    Args:
      x: samples of shape (..., d).
      big_a: the matrix ``A`` of shape (k, d) (k = d for :func:`whitening_map`).
      a: the centre ``a`` of shape (d,).

    Returns:
      The whitened samples, shape (..., k).  The constant 1 of eq. (28) is the neuron's bias
      and is not appended here.

    On the CPU a large ``x`` (at least two chunks of :data:`APPLY_CHUNK_ELEMENTS` elements)
    is transformed in row chunks by ``lax.map``: the same products, in cache-sized pieces.
    Other backends take one matmul (the chunking was measured on the CPU only).
    """
    x = jnp.asarray(x)
    for name, arr in (("x", x), ("A", big_a), ("a", a)):
        dtypes_lib.reject_complex(jnp.result_type(arr), f"apply_whitening: {name}")
    if big_a.ndim != 2 or a.shape != (big_a.shape[1],) or x.shape[-1] != big_a.shape[1]:
        raise ValueError(
            f"apply_whitening: expected x (..., d), A (k, d) and a (d,), got x "
            f"{tuple(x.shape)}, A {tuple(big_a.shape)}, a {tuple(a.shape)}."
        )
    dtype = dtypes_lib.result_type(x, big_a, a)
    a, big_a_t = a.astype(dtype), big_a.astype(dtype).T
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d).astype(dtype)
    n = rows.shape[0]
    chunk = _row_chunk(n, max(1, APPLY_CHUNK_ELEMENTS // max(d, 1)))
    steps = n // chunk
    if steps < 2 or jax.default_backend() != "cpu":
        out = (rows - a) @ big_a_t
    else:
        # A whole data set in one matmul ran at half the matmul rate on CPU (60000 x 784 by
        # 784 x 784: 0.58-0.60 s on 2 cores); in row chunks of 1250 it took 0.36 s.
        body = jax.lax.map(lambda c: (c - a) @ big_a_t,
                           rows[:steps * chunk].reshape(steps, chunk, d))
        out = body.reshape(steps * chunk, -1)
        if steps * chunk < n:
            out = jnp.concatenate([out, (rows[steps * chunk:] - a) @ big_a_t])
    return out.reshape(lead + (big_a_t.shape[1],))
