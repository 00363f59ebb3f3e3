"""Layer adapters: what a layer *is* (params <-> columns, activations -> rows, validation).

Each adapter is a static (hashable) description of one layer, built from its params, that
the optimiser and the estimators use without knowing the layer type:

* ``columns(node)`` reads a param-layout node (params or gradients) as the augmented
  columns ``W~`` (d, m), column l being neuron l's vector ``w~_l``;
* ``write_columns(node, cols)`` writes (d, m) columns back in the node's own shapes and dtypes;
* ``rows(activations)`` returns this batch's augmented inputs ``x~`` (N, d) (or (N, G, d) for
  a grouped convolution) and pre-activations (N, m), validated, with every sample axis
  flattened into N.

:mod:`.dense` holds the adapter of every kernel layer: Flax ``nn.Dense``/``nnx.Linear``,
multi-axis dense (``DenseGeneral``, ``LinearGeneral``, ``Einsum``) and convolutions, which are
dense layers over their patches.  :mod:`.conv` holds the patches and ``conv_rfim``;
:mod:`.embed` the embedding tables and :mod:`.norm` LayerNorm/RMSNorm scales and shifts,
each with its public RFIM function.
"""

from rfim_jax._src.layers.dense import DenseLayer
from rfim_jax._src.layers.embed import EmbedLayer
from rfim_jax._src.layers.norm import ScaleShiftLayer

__all__ = ["DenseLayer", "EmbedLayer", "ScaleShiftLayer"]
