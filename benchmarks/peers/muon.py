"""``optax.contrib.muon``: momentum orthogonalised by Newton-Schulz (Jordan et al. 2024).

It ships with optax, so it is available wherever optax has it.  Every 2-D parameter (each
dense kernel, the input and output layers' included: optax's default) takes the Muon step;
the biases take optax's built-in AdamW fallback at the same learning rate.  A convolution's
kernel ``(*window, c_in, c_out)`` is not 2-D, so optax would send it to AdamW;
:func:`kernel_dimension_numbers` gives Muon its matrix view instead, ``(prod(window) c_in,
c_out)``, the flattening Jordan et al. use for convolutions, and an attention projection
its ``(d, heads head_dim)`` or ``(heads head_dim, d)`` view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def kernel_dimension_numbers(params: Any, *, adamw: Sequence[str] = ()) -> Any:
    """Muon's matrix view of every layer kernel; everything else takes the AdamW fallback.

    A layer is a mapping with a ``"kernel"`` (Flax's Dense, DenseGeneral and Conv).  Its
    output axes are its trailing axes, as many as its bias has (the last axis alone when it
    has no bias, so a multi-axis kernel without a bias is viewed wrongly); the others reduce:

    * Dense ``(d_in, m)``: optax's default, ``(d_in, m)``;
    * Conv ``(*window, c_in, c_out)``: ``(prod(window) c_in, c_out)``, the flattening
      Jordan et al. use for convolutions;
    * attention's query/key/value ``(d, heads, head_dim)`` (bias ``(heads, head_dim)``):
      ``(d, heads head_dim)``; its output projection ``(heads, head_dim, d)`` (bias
      ``(d,)``): ``(heads head_dim, d)``.

    Every other leaf (biases, norm scales, embedding tables) maps to None, so it takes
    Muon's AdamW fallback, and so do the layers under the paths in ``adamw``, e.g. a
    language model's head, which Muon's authors leave to AdamW like the embeddings.  (optax's
    default instead gives Muon every 2-D leaf: embedding tables and attention's 2-D biases
    too, and sends the 3-D attention kernels to AdamW.)

    Pass the result, computed from the real params, rather than this function: optax calls
    a function of the params on its masked Muon subtree, where the biases that tell the
    output axes are masked out.

    Args:
      params: the params pytree (nested mappings, as Flax builds them).
      adamw: layer paths ("/"-joined keys, e.g. ``"head"``) left to the AdamW fallback.

    Returns:
      A pytree like ``params`` of ``optax.contrib.MuonDimensionNumbers`` or None, for
      ``muon_weight_dimension_numbers``.
    """
    import optax.contrib

    def walk(node, path):
        if not isinstance(node, Mapping):
            return jax.tree.map(lambda _: None, node)  # a masked leaf stays masked
        out = {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        kernel = node.get("kernel")
        if not hasattr(kernel, "ndim") or path in adamw:
            return out
        n_out = getattr(node.get("bias"), "ndim", 1)
        out["kernel"] = optax.contrib.MuonDimensionNumbers(
            reduction_axis=tuple(range(kernel.ndim - n_out)),
            output_axis=tuple(range(kernel.ndim - n_out, kernel.ndim)))
        return out

    return walk(params, "")


def make_optimizer(method, sizes: Sequence[int], *,
                   dimension_numbers: Any = None) -> optax.GradientTransformation:
    """Muon with the learning rate, beta (``method.momentum``) and weight decay of ``method``.

    ``dimension_numbers`` is passed on as ``muon_weight_dimension_numbers`` (a pytree like
    the params, e.g. ``kernel_dimension_numbers(params)``); None keeps optax's default, Muon
    on every 2-D parameter.
    """
    del sizes
    return load()(method.learning_rate, beta=method.momentum,
                  weight_decay=method.weight_decay,
                  muon_weight_dimension_numbers=dimension_numbers)
