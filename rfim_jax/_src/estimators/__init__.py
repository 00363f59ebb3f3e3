"""Estimators: how a layer's metric is represented inside RNGD, one module per form.

The registry maps each ``representation`` name to its estimator.
"""

from rfim_jax._src.estimators.base import Estimator
from rfim_jax._src.estimators.diagonal import DiagonalEstimator
from rfim_jax._src.estimators.eigen import EigenEstimator
from rfim_jax._src.estimators.exact import ExactEstimator
from rfim_jax._src.estimators.stacked import StackedEstimator

ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (ExactEstimator(), EigenEstimator(), DiagonalEstimator())
}


def for_layer(name: str, layer) -> Estimator:
    """The estimator ``name`` for ``layer``: run slice by slice for a stacked layer."""
    from rfim_jax._src.layers.stacked import StackedLayer

    est = ESTIMATORS[name]
    return StackedEstimator(est) if isinstance(layer, StackedLayer) else est

__all__ = ["ESTIMATORS", "DiagonalEstimator", "EigenEstimator", "Estimator", "ExactEstimator",
           "StackedEstimator", "for_layer"]
