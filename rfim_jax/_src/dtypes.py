"""Dtype decisions that hold under ``jax.numpy_dtype_promotion("strict")``.

Deciding which dtype to compute in is not an implicit promotion of data: it is done here under
standard promotion, and every array is then cast to the chosen dtype explicitly.  That keeps
the library usable when the caller runs ``jax_numpy_dtype_promotion="strict"``.  The casts
back to a narrow storage dtype live here too (:func:`stochastic_round`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def result_type(*args) -> jnp.dtype:
    """``jnp.result_type(*args)`` under standard promotion, whatever the caller's setting."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.dtype(jnp.result_type(*args))


def reject_complex(dtype, where: str = "rfim_jax") -> None:
    """Raises for complex dtypes, which the library does not support.

    The RFIMs here are for real parameters with real responses (eqs. 9-26); a complex layer
    would otherwise be silently reduced to its real part.

    Raises:
      TypeError: naming ``where`` and the dtype, for a complex dtype.
    """
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{where}: complex dtype {jnp.dtype(dtype).name} is not supported; the RFIMs and "
            f"RNGD here are for real parameters and real activations. Represent a complex "
            f"layer by its real and imaginary parts as separate real parameters."
        )


def at_least_float32(*args) -> jnp.dtype:
    """The args' result type (standard promotion), promoted to at least float32.

    A result that is not a real float (ints, bools) gives float32; bfloat16 and float16 give
    float32; float64 stays float64.

    Args:
      *args: arrays, dtypes or Python scalars.

    Returns:
      The dtype to accumulate in.

    Raises:
      TypeError: for complex inputs (see :func:`reject_complex`).
    """
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*args) if args else jnp.float32
        reject_complex(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.dtype(jnp.float32)
        return jnp.dtype(jnp.promote_types(dtype, jnp.float32))


def narrower_than_float32(dtype) -> bool:
    """Whether ``dtype`` is a float with fewer mantissa bits than float32 (bfloat16, float16)."""
    dtype = jnp.dtype(dtype)
    return bool(jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).nmant < 23)


def adjacent(v: jax.Array, *, up: bool) -> jax.Array:
    """The neighbour of each finite ``v`` in its own dtype, toward +inf (``up``) or -inf.

    The same as ``jnp.nextafter(v, +-inf)``, computed on the bit pattern.  Why not nextafter:
    on an H200 the bfloat16 states built with it behaved as if rounded to nearest (their
    averages stalled: 0.46-0.81 relative error against float32, 0.02 on the CPU).  The likely
    cause is XLA's GPU float normalization, which computes bfloat16 elementwise ops it has no
    bfloat16 kernel for in float32 and rounds back; a float32 neighbour rounds back to ``v``.
    The bit pattern does not depend on how a backend lowers ``nextafter``.  IEEE floats are
    sign-magnitude, so a neighbour is the magnitude's bit pattern plus or minus one; zeros
    step to the smallest subnormal of the step's sign.

    Args:
      v: a float array (finite entries; inf and NaN give unspecified values).
      up: the direction.

    Returns:
      ``v``'s neighbours, same shape and dtype.
    """
    v = jnp.asarray(v)
    itype = jnp.dtype(f"int{8 * v.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(v, itype)
    negative = bits < 0  # the sign bit (set for -0.0 too)
    # Away from zero the magnitude grows by one; toward zero it shrinks by one.
    away = negative != up
    stepped = jnp.where(away, bits + 1, bits - 1).astype(itype)
    tiny = jnp.asarray(1 if up else jnp.iinfo(itype).min + 1, itype)  # +-smallest subnormal
    # Zero by its bits: a float comparison may flush subnormals to zero.
    zero = (bits == 0) | (bits == jnp.iinfo(itype).min)
    return jax.lax.bitcast_convert_type(jnp.where(zero, tiny, stepped), v.dtype)


def stochastic_round(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
    """Casts ``x`` to the narrower float ``dtype`` by unbiased stochastic rounding.

    ``x`` goes to one of its two neighbours ``lo <= x < hi`` in ``dtype``, to ``hi`` with
    probability ``(x - lo) / (hi - lo)``, so the cast is exact in expectation. A value that
    ``dtype`` represents exactly is returned unchanged, and inf and NaN pass through. A finite
    value beyond ``dtype``'s range saturates at its largest finite value rather than becoming
    inf (float16 ends at 65504; bfloat16 has float32's range).

    Why: a moving average ``a <- decay a + (1 - decay) b`` stored in bfloat16 (8-bit
    mantissa, relative spacing 2^-7) and cast by rounding to nearest loses every step smaller
    than half a spacing. At ``decay=0.995`` that is any ``|b - a| < 0.78 |a|``, so the average
    stalls wherever the statistics drift slowly. Stochastic rounding keeps it unbiased.

    Args:
      x: a float array, wider than ``dtype`` (e.g. float32).
      dtype: the floating dtype to store in (e.g. ``jnp.bfloat16``).
      key: a ``jax.random`` key; the same key gives the same rounding.

    Returns:
      ``x`` in ``dtype``, same shape.

    References:
      Gupta et al., *Deep Learning with Limited Numerical Precision*, ICML 2015 (Sec. 3).
    """
    dtype = jnp.dtype(dtype)
    big = jnp.asarray(jnp.finfo(dtype).max, x.dtype)
    x = jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x)
    nearest = x.astype(dtype)
    below = nearest.astype(x.dtype) <= x
    lo = jnp.where(below, nearest, adjacent(nearest, up=False))
    hi = adjacent(lo, up=True)
    lo_w, hi_w = lo.astype(x.dtype), hi.astype(x.dtype)
    # Adjacent values of the narrow dtype differ exactly in the wide one (Sterbenz), so the
    # probability is exact up to one rounding.
    up = jax.random.uniform(key, x.shape, x.dtype) * (hi_w - lo_w) < (x - lo_w)
    return jnp.where(up & jnp.isfinite(x), hi, jnp.where(jnp.isfinite(x), lo, nearest))
