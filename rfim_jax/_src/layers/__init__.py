"""Layer adapters: what a layer *is* (params <-> columns, activations -> rows, validation).

Each adapter is a static (hashable) description of one layer, built from its params, that
the optimiser and the estimators use without knowing the layer type:

* ``columns(node)`` reads a param-layout node (params or gradients) as the augmented
  columns ``W~`` (d, m), column l being neuron l's vector ``w~_l``;
* ``write_columns(node, cols)`` writes (d, m) columns back in the node's own shapes and dtypes;
* ``rows(activations)`` returns this batch's augmented inputs ``x~`` (N, d) and
  pre-activations (N, m), validated, with every sample axis flattened into N.

:mod:`.dense` holds the dense adapter (Flax ``nn.Dense``, ``nnx.Linear``, plain dicts);
:mod:`.conv` the convolution adapter (Flax ``nn.Conv``, ``nnx.Conv``) and ``conv_rfim``.
"""

from rfim_jax._src.layers.conv import ConvLayer
from rfim_jax._src.layers.dense import DenseLayer

__all__ = ["ConvLayer", "DenseLayer"]
