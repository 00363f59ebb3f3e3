"""Estimators: how a layer's metric is represented inside RNGD, one module per form.

The registry maps each ``representation`` name to its estimator.
"""

from rfim_jax._src.estimators.base import Estimator
from rfim_jax._src.estimators.diagonal import DiagonalEstimator
from rfim_jax._src.estimators.eigen import EigenEstimator
from rfim_jax._src.estimators.exact import ExactEstimator

ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (ExactEstimator(), EigenEstimator(), DiagonalEstimator())
}

__all__ = ["ESTIMATORS", "DiagonalEstimator", "EigenEstimator", "Estimator", "ExactEstimator"]
