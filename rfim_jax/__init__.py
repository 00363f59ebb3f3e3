"""rfim_jax: relative Fisher information metrics and relative natural gradient in JAX.

After Ke Sun and Frank Nielsen, "Relative Fisher Information and Natural Gradient for
Learning Large Modular Models" (ICML 2017; arXiv 1606.06069).
"""

from rfim_jax._src.activations import (
    ACTIVATION_NAMES,
    ELU,
    GELU,
    Activation,
    GELUTanh,
    Linear,
    ReLU,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
    get_activation,
)
from rfim_jax._src.alias import rngd, scale_by_whitening
from rfim_jax._src.capture import (
    apply_gradients,
    capture_linen,
    capture_nnx,
    record,
)
from rfim_jax._src.capture_jaxpr import capture_jax
from rfim_jax._src.diagnostics import diagnostics, layer_metrics, relative_fisher_rao_norm
from rfim_jax._src.fisher import (
    FullFisher,
    condition_number,
    fim_rank,
    full_fisher,
    ravel_neuron_major,
)
from rfim_jax._src.fisher_rao import fisher_rao_norm
from rfim_jax._src.layers.conv import conv_patches, conv_rfim
from rfim_jax._src.layers.embed import embedding_rfim
from rfim_jax._src.layers.norm import scale_shift_rfim
from rfim_jax._src.metrics import (
    AbstractMetric,
    BlockDiagonalMetric,
    DenseMetric,
    DiagonalMetric,
    EigenDiagonalMetric,
    ParamLayout,
    SharedBlockMetric,
)
from rfim_jax._src.paths import activation_paths, layer_paths
from rfim_jax._src.plan import LayerPlan, rngd_plan
from rfim_jax._src.rfim import (
    layer_rfim_from_activations,
    linear_rfim,
    neuron_rfim,
    nonlinear_rfim,
    softmax_rfim,
    two_layer_rfim,
)
from rfim_jax._src.sharding import state_shardings
from rfim_jax._src.solvers import METHODS as SOLVER_METHODS
from rfim_jax._src.solvers import (
    NewtonSchulzInfo,
    add_damping,
    newton_schulz_inverse,
    spd_inverse,
    spd_inverse_and_status,
    spd_max_eigenvalue,
    spd_solve,
)
from rfim_jax._src.transform import ScaleByRNGDState, scale_by_rngd
from rfim_jax._src.whitening import apply_whitening, whitening_map

__version__ = "0.2.0"

__all__ = [
    "ACTIVATION_NAMES",
    "AbstractMetric",
    "DiagonalMetric",
    "EigenDiagonalMetric",
    "LayerPlan",
    "ParamLayout",
    "rngd_plan",
    "diagnostics",
    "layer_metrics",
    "relative_fisher_rao_norm",
    "state_shardings",
    "Activation",
    "BlockDiagonalMetric",
    "DenseMetric",
    "ELU",
    "FullFisher",
    "GELU",
    "GELUTanh",
    "Linear",
    "ReLU",
    "SharedBlockMetric",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "activation_paths",
    "add_damping",
    "apply_whitening",
    "apply_gradients",
    "capture_jax",
    "capture_linen",
    "capture_nnx",
    "condition_number",
    "fim_rank",
    "fisher_rao_norm",
    "full_fisher",
    "get_activation",
    "NewtonSchulzInfo",
    "SOLVER_METHODS",
    "ScaleByRNGDState",
    "layer_paths",
    "conv_patches",
    "conv_rfim",
    "embedding_rfim",
    "scale_shift_rfim",
    "layer_rfim_from_activations",
    "linear_rfim",
    "neuron_rfim",
    "newton_schulz_inverse",
    "nonlinear_rfim",
    "softmax_rfim",
    "spd_inverse",
    "spd_inverse_and_status",
    "spd_max_eigenvalue",
    "spd_solve",
    "ravel_neuron_major",
    "record",
    "rngd",
    "scale_by_rngd",
    "scale_by_whitening",
    "two_layer_rfim",
    "whitening_map",
]
