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
