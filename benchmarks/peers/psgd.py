"""PSGD Kron (Li 2018; psgd-jax by Evan Walters), from the package registry's ``psgd-jax``.

Compatibility shim: psgd-jax 0.2.9 imports ``optax._src.clipping``, which optax 0.2.8 moved to
``optax.transforms._clipping``.  :func:`load` registers the new module under the old name
(in ``sys.modules`` and as an attribute of ``optax._src``) before importing psgd-jax, and
only when the old name is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Sequence

import optax

FAMILY = "psgd_kron"
DISTRIBUTION = "psgd-jax"
#: shims applied by :func:`load` in this process.
SHIMS_APPLIED: list[str] = []
OLD_CLIPPING, NEW_CLIPPING = "optax._src.clipping", "optax.transforms._clipping"


def _register_clipping_alias() -> None:
    """Makes ``optax._src.clipping`` importable when optax only has the new module."""
    try:
        importlib.import_module(OLD_CLIPPING)
        return
    except ImportError:
        pass
    new = importlib.import_module(NEW_CLIPPING)
    sys.modules[OLD_CLIPPING] = new
    importlib.import_module("optax._src").clipping = new
    SHIMS_APPLIED.append(f"{OLD_CLIPPING} -> {NEW_CLIPPING}")


def load():
    """Imports psgd-jax's Kron (with the shim when needed) and returns ``psgd_jax.kron.kron``.

    Raises:
      ImportError: when psgd-jax is not installed or does not import even with the shim.
    """
    _register_clipping_alias()
    return importlib.import_module("psgd_jax.kron").kron


def describe(method) -> str:
    """One line of the configuration of ``method``."""
    return (f"psgd_jax.kron(lr={method.learning_rate:g}, b1={method.momentum:g}, "
            f"weight_decay={method.weight_decay:g}; default preconditioner-update schedule)")


def make_optimizer(method, sizes: Sequence[int]) -> optax.GradientTransformation:
    """PSGD Kron with the learning rate, momentum (b1) and weight decay of ``method``.

    Its ``init`` prints the preconditioner sizes; that print is silenced.  Its update takes
    no extra keyword arguments (psgd-jax's chain forwards them to a stage that refuses them),
    so the ones a training step passes to every optimiser, such as ``activations=``, are
    dropped here.
    """
    del sizes
    tx = load()(method.learning_rate, b1=method.momentum, weight_decay=method.weight_decay)

    def init(params):
        with contextlib.redirect_stdout(io.StringIO()):
            return tx.init(params)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        return tx.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init, update)
