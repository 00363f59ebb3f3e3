"""The eigenvalue-corrected RFIM: per-neuron diagonals in a shared eigenbasis (SPEC §7).

The RFIM analogue of EKFAC (George et al., 2018).  With ``A = mean_i x~_i x~_i^T`` the layer
input's second moment and ``U`` its eigenvectors, neuron l's block ``G_l`` (eq. 23) is
represented by

    G_l ~= U diag(s_l) U^T,     s_l = diag(U^T G_l U) = mean_i nu_f(z_il) (U^T x~_i)^2,

the exact diagonal of ``G_l`` in that basis, so ``sum_j s_lj = tr(G_l)``.  Storage is ``U``
(d, d) once per layer and ``S`` (m, d): ``d^2 + m d`` numbers instead of ``m d^2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rfim_jax._src import solvers
from rfim_jax._src.metrics.base import AbstractMetric, ParamLayout, Params, PerNeuronScales


def _same_static(a, b, where: str) -> None:
    if type(a) is not type(b) or a.has_bias != b.has_bias or a.layout != b.layout:
        raise TypeError(f"{where}: both operands must be {type(a).__name__}s of the same layer.")


@struct.dataclass
class EigenDiagonalMetric(PerNeuronScales, AbstractMetric):
    """A layer RFIM whose neuron blocks are diagonal in one shared orthonormal basis (SPEC §7).

    Block l is ``basis @ diag(scales[l]) @ basis.T``; the dense form is block diagonal and
    neuron-major (SPEC §2).

    Attributes:
      basis: ``U``, (d, d), orthonormal columns (the eigenvectors of the layer's input second
        moment ``A = mean x~ x~^T``, or a basis the caller chose).
      scales: ``S``, (m, d): row l is ``s_l = diag(U^T G_l U)``.
      has_bias: whether ``w~_l`` ends with the bias (static).
      layout: the kernel's :class:`ParamLayout`, or None for a 2-D dense kernel (static).

    Arithmetic: ``a * G``, ``G / a`` and ``-G`` scale ``S``; ``G + H`` and ``G - H`` combine the
    scales of two metrics **in the same basis** (the result is then exact).  Concrete bases
    that differ raise a ValueError.  Under ``jit`` (or ``vmap``, ``scan``) they cannot be
    compared before the program runs, so there a sum or difference of different bases has
    NaN scales: a loud result instead of a silently wrong metric.
    """

    representation = "eigen"

    basis: jax.Array
    scales: jax.Array
    has_bias: bool = struct.field(pytree_node=False, default=True)
    layout: ParamLayout | None = struct.field(pytree_node=False, default=None)
    _tag: str = struct.field(pytree_node=False, default="eigen_diagonal", repr=False)

    def blocks(self) -> jax.Array:
        """The (m, d, d) stack ``U diag(s_l) U^T`` (for tests and small layers only)."""
        u = self.basis
        return jnp.einsum("ij,lj,kj->lik", u, self.scales, u)

    def to_dense(self) -> jax.Array:
        m, d = self.num_neurons, self.block_size
        eye = jnp.eye(m, dtype=self.scales.dtype)
        return (eye[:, None, :, None] * self.blocks()[:, :, None, :]).reshape(m * d, m * d)

    def _apply(self, cols: jax.Array, scale: jax.Array) -> jax.Array:
        # U ((U^T V) * scale^T): two (d, d) x (d, m) matmuls, never an (m, d, d) array.
        return self.basis @ ((self.basis.T @ cols) * scale.T)

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        return self._apply(cols, self.scales)

    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        """``U ((U^T V) / (S^T + damping)) `` for V the (d, m) columns of ``v`` (SPEC §7).

        ``method`` is checked for protocol compatibility and not used (closed form).
        ``damping`` is absolute by default; with ``relative=True`` neuron l gets
        ``damping * mean(s_l)`` (eq. 30's ``tr(G_l)/d``), as in :func:`rfim_jax.rngd`.  A
        scale below the smallest normal number (a dead unit's) divides by 1.
        """
        solvers.resolve_method(method)
        cols = self._columns(v, "EigenDiagonalMetric.solve")
        metric = self._in_dtype(cols.dtype)
        s = metric.damped(damping, relative=relative).scales
        return self._params(metric._apply(cols, solvers.reciprocal_scales(s)))

    def diagonal(self) -> jax.Array:
        # diag(U diag(s) U^T)_i = sum_j U_ij^2 s_j.
        return (self.scales @ (self.basis * self.basis).T).reshape(-1)

    # ------------------------------------------------------------------ arithmetic
    def _combine(self, other, scales: jax.Array, where: str) -> EigenDiagonalMetric:
        """``self`` with ``scales``, the scales of ``self`` and ``other`` combined; their bases
        must agree (to ``np.allclose(atol=1e-6)``); the static fields are checked already."""
        if self.basis is other.basis:
            return self.replace(scales=scales)
        try:
            same = np.allclose(np.asarray(self.basis), np.asarray(other.basis), atol=1e-6)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            # Traced: the bases are compared when the program runs, and a mismatch makes the
            # result NaN rather than a metric that is silently wrong.
            a, b = self.basis, other.basis.astype(self.basis.dtype)
            same = jnp.all(jnp.abs(a - b) <= 1e-6 + 1e-5 * jnp.abs(b))
            return self.replace(scales=jnp.where(same, scales, jnp.nan))
        if not same:
            raise ValueError(
                f"{where}: the two EigenDiagonalMetrics have different bases, so their sum is "
                f"not diagonal in either; convert with to_dense() or re-estimate in one basis."
            )
        return self.replace(scales=scales)

    def __add__(self, other):
        _same_static(self, other, "EigenDiagonalMetric.__add__")
        return self._combine(other, self.scales + other.scales, "EigenDiagonalMetric.__add__")

    def __sub__(self, other):
        _same_static(self, other, "EigenDiagonalMetric.__sub__")
        return self._combine(other, self.scales - other.scales, "EigenDiagonalMetric.__sub__")

    def __mul__(self, scalar):
        return self.replace(scales=self.scales * scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self.replace(scales=self.scales / scalar)

    def __neg__(self):
        return self.replace(scales=-self.scales)

    def astype(self, dtype):
        return self.replace(basis=self.basis.astype(dtype), scales=self.scales.astype(dtype))
