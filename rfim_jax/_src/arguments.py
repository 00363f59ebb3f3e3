"""Reading a numeric argument whose value is known now, to check it where it is given.

Users pass hyperparameters as Python numbers, numpy scalars (from a config file) or 0-d arrays
(``optax.inject_hyperparams`` hands them to ``init`` as such).  A check written for Python
numbers alone lets the other two through unchecked, so every range check reads the value
through :func:`concrete_number`.  Traced values cannot be read; they are the caller's (a
schedule's) responsibility.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def concrete_number(value) -> float | None:
    """``value`` as a Python float when it is known now, else None.

    Known: Python and numpy numbers, and concrete 0-d arrays.  A bool is not a number here.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and not isinstance(
            value, jax.core.Tracer):
        if jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating):
            return float(value)
    return None


def check_at_least(name: str, value, low: float, *, where: str = "") -> None:
    """Raises a ValueError when ``value`` is known now and is below ``low`` or NaN.

    ``where`` prefixes the message (e.g. ``"whitening_map: "``).
    """
    number = concrete_number(value)
    if number is not None and not number >= low:
        raise ValueError(f"{where}{name} must be >= {low:g}, got {name}={shown(value, number)}.")


def check_positive(name: str, value, *, where: str = "") -> None:
    """Raises a ValueError when ``value`` is known now and is not > 0 (NaN included)."""
    number = concrete_number(value)
    if number is not None and not number > 0:
        raise ValueError(f"{where}{name} must be > 0, got {name}={shown(value, number)}.")


def shown(value, number: float):
    """A Python number as the user wrote it (0, not 0.0); anything else as its float."""
    return value if isinstance(value, (int, float)) else number
