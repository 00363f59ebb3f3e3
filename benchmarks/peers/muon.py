"""``optax.contrib.muon``: momentum orthogonalised by Newton-Schulz (Jordan et al. 2024).

It ships with optax, so it is available wherever optax has it.  Every 2-D parameter (each
dense kernel, the input and output layers' included: optax's default) takes the Muon step;
the biases take optax's built-in AdamW fallback at the same learning rate.  A convolution's
kernel ``(*window, c_in, c_out)`` is not 2-D, so optax would send it to AdamW;
:func:`kernel_dimension_numbers` gives Muon its matrix view instead, ``(prod(window) c_in,
c_out)``, the flattening Jordan et al. use for convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

FAMILY = "muon"
DISTRIBUTION = None
SHIMS_APPLIED: list[str] = []


def load():
    """Returns ``optax.contrib.muon``.

    Raises:
      AttributeError: when the installed optax has no ``optax.contrib.muon``.
    """
    import optax.contrib

    return optax.contrib.muon


def describe(method) -> str:
    """One line of the configuration of ``method``."""
    return (f"optax.contrib.muon(lr={method.learning_rate:g}, beta={method.momentum:g}, "
            f"weight_decay={method.weight_decay:g}; optax {optax.__version__})")


def kernel_dimension_numbers(params: Any) -> Any:
    """Muon's matrix view of every parameter of rank >= 2: all axes but the last reduce.

    A Dense kernel ``(d_in, m)`` keeps optax's default; a convolution's ``(*window, c_in,
    c_out)`` becomes ``(prod(window) c_in, c_out)``.  Vectors (biases) map to None, so they
    take Muon's AdamW fallback.  Only for kernels whose last axis is the only output axis
    (Dense, Conv), not for multi-axis ones such as attention's ``(d, heads, head_dim)``.

    Returns:
      A pytree like ``params`` of ``optax.contrib.MuonDimensionNumbers`` or None, for
      ``muon_weight_dimension_numbers``.
    """
    import optax.contrib

    def dims(p):
        if p.ndim < 2:
            return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(p.ndim - 1)),
                                                  output_axis=p.ndim - 1)

    return jax.tree.map(dims, params)


def make_optimizer(method, sizes: Sequence[int], *,
                   dimension_numbers: Any = None) -> optax.GradientTransformation:
    """Muon with the learning rate, beta (``method.momentum``) and weight decay of ``method``.

    ``dimension_numbers`` is passed on as ``muon_weight_dimension_numbers`` (a pytree or a
    function of the params, e.g. :func:`kernel_dimension_numbers`); None keeps optax's
    default, Muon on the 2-D parameters only.
    """
    del sizes
    return load()(method.learning_rate, beta=method.momentum,
                  weight_decay=method.weight_decay,
                  muon_weight_dimension_numbers=dimension_numbers)
