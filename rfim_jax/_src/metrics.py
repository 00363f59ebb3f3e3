"""Representations of layer RFIMs as pytrees (paper Sec. 3.2, eqs. 22, 23, 25, 26).

A dense layer with params ``{"kernel": (d_in, m), "bias": (m,)}`` has parameter vector
``theta = concat_l w~_l`` with ``w~_l = [kernel[:, l], bias[l]]`` (neuron-major; SPEC Sec. 2), so
its RFIM is an ``(m d, m d)`` matrix whose entry ``[l*d + i, k*d + j]`` couples neuron l's
coordinate i with neuron k's coordinate j.  Three structures occur:

* :class:`SharedBlockMetric` - eq. (22), a linear layer: ``diag(A, ..., A)``; A is stored once.
* :class:`BlockDiagonalMetric` - eq. (23), a nonlinear layer: ``diag(G_1, ..., G_m)``,
  stored as an ``(m, d, d)`` stack.
* :class:`DenseMetric` - eqs. (25)-(26), softmax and two-layer metrics: a full ``(m d, m d)``
  matrix.

All three are registered dataclasses, so they pass through ``jit``, ``vmap`` and
``jax.tree.map``, and support the arithmetic needed by moving averages (``a * G + b * H``).
Vectors ``v`` are in *param layout*, a ``{"kernel": (d_in, m), "bias": (m,)}`` dict, and the
results of ``matvec`` and ``solve`` come back in the same layout.

Damping in ``solve`` and ``inverse`` is absolute (``G + damping I``) unless
``relative=True``, in which case it is ``damping * tr(B)/d_B`` per stored block B (eq. 30).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rfim_jax._src import solvers

Params = dict[str, jax.Array]


# ----------------------------------------------------------------------------- layout


def unpack_dense(params: Params, name: str) -> tuple[jax.Array, jax.Array | None]:
    """Checks a dense layer's ``{"kernel": (d_in, m), "bias": (m,)}`` and returns (kernel, bias).

    ``bias`` is None when absent.  Every error names ``name`` and the shapes.
    """
    if not isinstance(params, Mapping) or "kernel" not in params:
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{name}: expected a dict with a 'kernel' entry, got {got}.")
    kernel = jnp.asarray(params["kernel"])
    if kernel.ndim != 2:
        raise ValueError(
            f"{name}: kernel must be 2-D (d_in, m), got shape {tuple(kernel.shape)}."
        )
    bias = params.get("bias")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (kernel.shape[1],):
            raise ValueError(
                f"{name}: bias must have shape ({kernel.shape[1]},) to match kernel "
                f"{tuple(kernel.shape)}, got {tuple(bias.shape)}."
            )
    return kernel, bias


def params_to_columns(v: Params, has_bias: bool, *, name: str = "layer") -> jax.Array:
    """Stacks a param-layout vector into the augmented kernel ``W~ = [kernel; bias]``, (d, m).

    Column l of the result is neuron l's vector ``w~_l``.
    """
    kernel, bias = unpack_dense(v, name)
    if has_bias != (bias is not None):
        raise ValueError(
            f"{name}: the metric was built {'with' if has_bias else 'without'} a bias, but the "
            f"vector {'lacks' if has_bias else 'has'} one."
        )
    if not has_bias:
        return kernel
    return jnp.concatenate([kernel, bias[None, :].astype(kernel.dtype)], axis=0)


def columns_to_params(cols: jax.Array, has_bias: bool) -> Params:
    """Inverse of :func:`params_to_columns`."""
    if has_bias:
        return {"kernel": cols[:-1], "bias": cols[-1]}
    return {"kernel": cols}


def _check_columns(cols: jax.Array, d: int, m: int, name: str) -> None:
    if cols.shape != (d, m):
        raise ValueError(
            f"{name}: vector has augmented shape {tuple(cols.shape)} (d, m), expected ({d}, {m})."
        )


def _sym_eigvalsh(a: jax.Array) -> jax.Array:
    return jnp.linalg.eigvalsh(0.5 * (a + jnp.swapaxes(a, -1, -2)))


class _Arithmetic:
    """Elementwise arithmetic on the data fields, for moving averages."""

    def _map(self, fn, *others):
        return jax.tree.map(fn, self, *others)

    def __add__(self, other):
        return self._map(lambda a, b: a + b, other)

    def __sub__(self, other):
        return self._map(lambda a, b: a - b, other)

    def __mul__(self, scalar):
        return self._map(lambda a: a * scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self._map(lambda a: a / scalar)

    def __neg__(self):
        return self._map(lambda a: -a)

    def astype(self, dtype):
        return self._map(lambda a: a.astype(dtype))


# ------------------------------------------------------------------------ representations


@struct.dataclass
class SharedBlockMetric(_Arithmetic):
    """RFIM of a linear layer, eq. (22): ``diag(A, ..., A)`` with m equal (d, d) blocks.

    ``A = mean_i x~_i x~_i^T / sigma^2`` is stored once.
    """

    block: jax.Array
    num_neurons: int = struct.field(pytree_node=False)
    has_bias: bool = struct.field(pytree_node=False, default=True)
    # A static tag per class: with jax 0.10.2, treedefs of register_dataclass nodes compare
    # equal across classes whose static values are equal, so a jit cache could return one
    # representation for another (seen: a DenseMetric coming back as a SharedBlockMetric).
    _tag: str = struct.field(pytree_node=False, default="shared_block", repr=False)

    @property
    def block_size(self) -> int:
        return self.block.shape[-1]

    @property
    def dim(self) -> int:
        return self.num_neurons * self.block_size

    def stored_blocks(self) -> jax.Array:
        """The stored (d, d) block with a leading axis of 1, (1, d, d)."""
        return self.block[None]

    def to_dense(self) -> jax.Array:
        return jnp.kron(jnp.eye(self.num_neurons, dtype=self.block.dtype), self.block)

    def matvec(self, v: Params) -> Params:
        cols = params_to_columns(v, self.has_bias)
        _check_columns(cols, self.block_size, self.num_neurons, "SharedBlockMetric.matvec")
        return columns_to_params(self.block @ cols, self.has_bias)

    def damped(self, damping, *, relative: bool = False) -> SharedBlockMetric:
        return self.replace(block=solvers.add_damping(self.block, damping, relative=relative))

    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        inv = solvers.spd_inverse(self.damped(damping, relative=relative).block, method=method)
        return self.replace(block=inv)

    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        cols = params_to_columns(v, self.has_bias)
        _check_columns(cols, self.block_size, self.num_neurons, "SharedBlockMetric.solve")
        b = self.damped(damping, relative=relative).block
        return columns_to_params(solvers.spd_solve(b, cols, method=method), self.has_bias)

    def trace(self) -> jax.Array:
        return self.num_neurons * jnp.trace(self.block)

    def diagonal(self) -> jax.Array:
        return jnp.tile(jnp.diagonal(self.block), self.num_neurons)

    def eigvalsh(self) -> jax.Array:
        return jnp.sort(jnp.tile(_sym_eigvalsh(self.block), self.num_neurons))

    def max_eigenvalue(self) -> jax.Array:
        return solvers.spd_max_eigenvalue(self.block)


@struct.dataclass
class BlockDiagonalMetric(_Arithmetic):
    """RFIM of a nonlinear layer, eq. (23): ``diag(G_1, ..., G_m)``, stored as (m, d, d).

    ``G_l = mean_i nu_f(z_il) x~_i x~_i^T``.
    """

    blocks: jax.Array
    has_bias: bool = struct.field(pytree_node=False, default=True)
    # See SharedBlockMetric._tag.
    _tag: str = struct.field(pytree_node=False, default="block_diagonal", repr=False)

    @property
    def num_neurons(self) -> int:
        return self.blocks.shape[-3]

    @property
    def block_size(self) -> int:
        return self.blocks.shape[-1]

    @property
    def dim(self) -> int:
        return self.num_neurons * self.block_size

    def stored_blocks(self) -> jax.Array:
        return self.blocks

    def to_dense(self) -> jax.Array:
        m, d = self.num_neurons, self.block_size
        eye = jnp.eye(m, dtype=self.blocks.dtype)
        # out[l, i, k, j] = delta_lk G_l[i, j]
        dense = eye[:, None, :, None] * self.blocks[:, :, None, :]
        return dense.reshape(m * d, m * d)

    def matvec(self, v: Params) -> Params:
        cols = params_to_columns(v, self.has_bias)
        _check_columns(cols, self.block_size, self.num_neurons, "BlockDiagonalMetric.matvec")
        return columns_to_params(jnp.einsum("lij,jl->il", self.blocks, cols), self.has_bias)

    def damped(self, damping, *, relative: bool = False) -> BlockDiagonalMetric:
        return self.replace(blocks=solvers.add_damping(self.blocks, damping, relative=relative))

    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        b = self.damped(damping, relative=relative).blocks
        return self.replace(blocks=solvers.spd_inverse(b, method=method))

    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        cols = params_to_columns(v, self.has_bias)
        _check_columns(cols, self.block_size, self.num_neurons, "BlockDiagonalMetric.solve")
        b = self.damped(damping, relative=relative).blocks
        x = solvers.spd_solve(b, cols.T, method=method)  # (m, d)
        return columns_to_params(x.T, self.has_bias)

    def trace(self) -> jax.Array:
        return jnp.sum(jnp.trace(self.blocks, axis1=-2, axis2=-1))

    def diagonal(self) -> jax.Array:
        return jnp.diagonal(self.blocks, axis1=-2, axis2=-1).reshape(-1)

    def eigvalsh(self) -> jax.Array:
        return jnp.sort(_sym_eigvalsh(self.blocks).reshape(-1))

    def max_eigenvalue(self) -> jax.Array:
        return jnp.max(solvers.spd_max_eigenvalue(self.blocks))


@struct.dataclass
class DenseMetric(_Arithmetic):
    """A full RFIM over a layer's ``m d`` parameters (softmax eq. 25, two-layer eq. 26).

    ``matrix`` is (m d, m d) in the neuron-major ordering of SPEC Sec. 2.
    """

    matrix: jax.Array
    num_neurons: int = struct.field(pytree_node=False)
    has_bias: bool = struct.field(pytree_node=False, default=True)
    # See SharedBlockMetric._tag.
    _tag: str = struct.field(pytree_node=False, default="dense", repr=False)

    @property
    def block_size(self) -> int:
        return self.matrix.shape[-1] // self.num_neurons

    @property
    def dim(self) -> int:
        return self.matrix.shape[-1]

    def stored_blocks(self) -> jax.Array:
        return self.matrix[None]

    def to_dense(self) -> jax.Array:
        return self.matrix

    def _flat(self, v: Params, where: str) -> jax.Array:
        cols = params_to_columns(v, self.has_bias)
        _check_columns(cols, self.block_size, self.num_neurons, where)
        return cols.T.reshape(-1)

    def _unflat(self, theta: jax.Array) -> Params:
        cols = theta.reshape(self.num_neurons, self.block_size).T
        return columns_to_params(cols, self.has_bias)

    def matvec(self, v: Params) -> Params:
        return self._unflat(self.matrix @ self._flat(v, "DenseMetric.matvec"))

    def damped(self, damping, *, relative: bool = False) -> DenseMetric:
        return self.replace(matrix=solvers.add_damping(self.matrix, damping, relative=relative))

    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        b = self.damped(damping, relative=relative).matrix
        return self.replace(matrix=solvers.spd_inverse(b, method=method))

    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        theta = self._flat(v, "DenseMetric.solve")
        b = self.damped(damping, relative=relative).matrix
        return self._unflat(solvers.spd_solve(b, theta, method=method))

    def trace(self) -> jax.Array:
        return jnp.trace(self.matrix)

    def diagonal(self) -> jax.Array:
        return jnp.diagonal(self.matrix)

    def eigvalsh(self) -> jax.Array:
        return _sym_eigvalsh(self.matrix)

    def max_eigenvalue(self) -> jax.Array:
        return solvers.spd_max_eigenvalue(self.matrix)


Metric = Any  # SharedBlockMetric | BlockDiagonalMetric | DenseMetric
