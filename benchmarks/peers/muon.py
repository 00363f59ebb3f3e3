"""``optax.contrib.muon``: momentum orthogonalised by Newton-Schulz (Jordan et al. 2024).

It ships with optax, so it is available wherever optax has it.  Every 2-D parameter (each
dense kernel, the input and output layers' included: optax's default) takes the Muon step;
the biases take optax's built-in AdamW fallback at the same learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def make_optimizer(method, sizes: Sequence[int]) -> optax.GradientTransformation:
    """Muon with the learning rate, beta (``method.momentum``) and weight decay of ``method``."""
    del sizes
    return load()(method.learning_rate, beta=method.momentum,
                  weight_decay=method.weight_decay)
