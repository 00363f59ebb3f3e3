"""Dtype decisions that hold under ``jax.numpy_dtype_promotion("strict")``.

Deciding which dtype to compute in is not an implicit promotion of data: it is done here under
standard promotion, and every array is then cast to the chosen dtype explicitly.  That keeps
the library usable when the caller runs ``jax_numpy_dtype_promotion="strict"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def result_type(*args) -> jnp.dtype:
    """``jnp.result_type(*args)`` under standard promotion, whatever the caller's setting."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.dtype(jnp.result_type(*args))


def at_least_float32(*args) -> jnp.dtype:
    """The args' result type (standard promotion), promoted to at least float32.

    A result that is not a real float (ints, bools) gives float32; bfloat16 and float16 give
    float32; float64 stays float64.

    Args:
      *args: arrays, dtypes or Python scalars.

    Returns:
      The dtype to accumulate in.
    """
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*args) if args else jnp.float32
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.dtype(jnp.float32)
        return jnp.dtype(jnp.promote_types(dtype, jnp.float32))
