"""Representations of layer RFIMs as pytrees: the shared algebra and one module per form.

* :mod:`.base` - :class:`AbstractMetric` (the algebra, documented once) and the param layout.
* :mod:`.exact` - ``SharedBlockMetric`` (eq. 22), ``BlockDiagonalMetric`` (eq. 23),
  ``DenseMetric`` (eqs. 25, 26).
* :mod:`.eigen` - ``EigenDiagonalMetric`` (SPEC §7, eigenvalue-corrected).
* :mod:`.diagonal` - ``DiagonalMetric`` (SPEC §7).
"""

from rfim_jax._src.metrics.base import (
    AbstractMetric,
    Arithmetic,
    ParamLayout,
    Params,
    check_columns,
    columns_to_params,
    params_to_columns,
    unpack_dense,
)
from rfim_jax._src.metrics.diagonal import DiagonalMetric
from rfim_jax._src.metrics.eigen import EigenDiagonalMetric
from rfim_jax._src.metrics.exact import (
    BlockDiagonalMetric,
    DenseMetric,
    Metric,
    SharedBlockMetric,
)

REPRESENTATIONS: tuple[str, ...] = ("exact", "eigen", "diagonal")

__all__ = [
    "AbstractMetric",
    "Arithmetic",
    "BlockDiagonalMetric",
    "DenseMetric",
    "DiagonalMetric",
    "EigenDiagonalMetric",
    "Metric",
    "ParamLayout",
    "Params",
    "REPRESENTATIONS",
    "SharedBlockMetric",
    "check_columns",
    "columns_to_params",
    "params_to_columns",
    "unpack_dense",
]
