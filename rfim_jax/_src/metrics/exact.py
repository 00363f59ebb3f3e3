"""The exact representations of layer RFIMs (paper Sec. 3.2, eqs. 22, 23, 25, 26).

Three structures occur (the algebra is documented once, in :mod:`.base`):

* :class:`SharedBlockMetric` - eq. (22), a linear layer: ``diag(A, ..., A)``; A is stored once.
* :class:`BlockDiagonalMetric` - eq. (23), a nonlinear layer: ``diag(G_1, ..., G_m)``,
  stored as an ``(m, d, d)`` stack.
* :class:`DenseMetric` - eqs. (25)-(26), softmax and two-layer metrics: a full ``(m d, m d)``
  matrix.

They are the ``representation="exact"`` of the constructors.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rfim_jax._src import solvers
from rfim_jax._src.metrics.base import (
    AbstractMetric,
    Arithmetic,
    ParamLayout,
    Params,
    sym_eigvalsh,
)


def _compiled(method):
    """Runs a solver-backed method as one compiled program.

    Called eagerly (in a notebook), an uncompiled block solve dispatches every op of its
    loops one by one: 0.27 s for a (4, 4, 4) metric against 0.1 ms compiled.  Inside an
    outer ``jit`` the inner one is inlined, so this costs nothing there.
    """
    jitted = jax.jit(method, static_argnames=("relative", "method"))
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        # Validated here: inside the jit a Python-number damping is already a tracer.
        solvers.check_damping(signature.bind(self, *args, **kwargs).arguments.get("damping"))
        return jitted(self, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------ representations


@struct.dataclass
class SharedBlockMetric(AbstractMetric, Arithmetic):
    """RFIM of a linear layer, eq. (22): ``diag(A, ..., A)`` with m equal (d, d) blocks.

    ``A = mean_i x~_i x~_i^T / sigma^2`` is stored once.
    """

    representation = "exact"

    block: jax.Array
    num_neurons: int = struct.field(pytree_node=False)
    has_bias: bool = struct.field(pytree_node=False, default=True)
    layout: ParamLayout | None = struct.field(pytree_node=False, default=None)
    # See AbstractMetric: a static tag per class keeps treedefs of the classes distinct.
    _tag: str = struct.field(pytree_node=False, default="shared_block", repr=False)

    @property
    def block_size(self) -> int:
        return self.block.shape[-1]

    def stored_blocks(self) -> jax.Array:
        """The stored (d, d) block with a leading axis of 1, (1, d, d)."""
        return self.block[None]

    def to_dense(self) -> jax.Array:
        return jnp.kron(jnp.eye(self.num_neurons, dtype=self.block.dtype), self.block)

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        return self.block @ cols

    def damped(self, damping, *, relative: bool = False) -> SharedBlockMetric:
        return self.replace(block=solvers.add_damping(self.block, damping, relative=relative))

    @_compiled
    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        inv = solvers.spd_inverse(self.damped(damping, relative=relative).block, method=method)
        return self.replace(block=inv)

    @_compiled
    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        cols = self._columns(v, "SharedBlockMetric.solve")
        b = self.damped(damping, relative=relative).block
        return self._params(solvers.spd_solve(b, cols, method=method))

    def trace(self) -> jax.Array:
        return self.num_neurons * jnp.trace(self.block)

    def diagonal(self) -> jax.Array:
        return jnp.tile(jnp.diagonal(self.block), self.num_neurons)

    def eigvalsh(self) -> jax.Array:
        return jnp.sort(jnp.tile(sym_eigvalsh(self.block), self.num_neurons))

    def max_eigenvalue(self) -> jax.Array:
        return sym_eigvalsh(self.block)[-1]


@struct.dataclass
class BlockDiagonalMetric(AbstractMetric, Arithmetic):
    """RFIM of a nonlinear layer, eq. (23): ``diag(G_1, ..., G_m)``, stored as (m, d, d).

    ``G_l = mean_i nu_f(z_il) x~_i x~_i^T``.
    """

    representation = "exact"

    blocks: jax.Array
    has_bias: bool = struct.field(pytree_node=False, default=True)
    layout: ParamLayout | None = struct.field(pytree_node=False, default=None)
    # See AbstractMetric.
    _tag: str = struct.field(pytree_node=False, default="block_diagonal", repr=False)

    @property
    def num_neurons(self) -> int:
        return self.blocks.shape[-3]

    @property
    def block_size(self) -> int:
        return self.blocks.shape[-1]

    def stored_blocks(self) -> jax.Array:
        return self.blocks

    def to_dense(self) -> jax.Array:
        m, d = self.num_neurons, self.block_size
        eye = jnp.eye(m, dtype=self.blocks.dtype)
        # out[l, i, k, j] = delta_lk G_l[i, j]
        dense = eye[:, None, :, None] * self.blocks[:, :, None, :]
        return dense.reshape(m * d, m * d)

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        return jnp.einsum("lij,jl->il", self.blocks, cols)

    def damped(self, damping, *, relative: bool = False) -> BlockDiagonalMetric:
        return self.replace(blocks=solvers.add_damping(self.blocks, damping, relative=relative))

    @_compiled
    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        b = self.damped(damping, relative=relative).blocks
        return self.replace(blocks=solvers.spd_inverse(b, method=method))

    @_compiled
    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        cols = self._columns(v, "BlockDiagonalMetric.solve")
        b = self.damped(damping, relative=relative).blocks
        x = solvers.spd_solve(b, cols.T, method=method)  # (m, d)
        return self._params(x.T)

    def trace(self) -> jax.Array:
        return jnp.sum(jnp.trace(self.blocks, axis1=-2, axis2=-1))

    def diagonal(self) -> jax.Array:
        return jnp.diagonal(self.blocks, axis1=-2, axis2=-1).reshape(-1)

    def eigvalsh(self) -> jax.Array:
        return jnp.sort(sym_eigvalsh(self.blocks).reshape(-1))

    def max_eigenvalue(self) -> jax.Array:
        return jnp.max(sym_eigvalsh(self.blocks)[..., -1])


@struct.dataclass
class DenseMetric(AbstractMetric, Arithmetic):
    """A full RFIM over a layer's ``m d`` parameters (softmax eq. 25, two-layer eq. 26).

    ``matrix`` is (m d, m d) in the neuron-major ordering of SPEC Sec. 2.
    """

    representation = "exact"

    matrix: jax.Array
    num_neurons: int = struct.field(pytree_node=False)
    has_bias: bool = struct.field(pytree_node=False, default=True)
    layout: ParamLayout | None = struct.field(pytree_node=False, default=None)
    # See AbstractMetric.
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
        return self._columns(v, where).T.reshape(-1)

    def _unflat(self, theta: jax.Array) -> Params:
        cols = theta.reshape(self.num_neurons, self.block_size).T
        return self._params(cols)

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        theta = self.matrix @ cols.T.reshape(-1)
        return theta.reshape(self.num_neurons, self.block_size).T

    def damped(self, damping, *, relative: bool = False) -> DenseMetric:
        return self.replace(matrix=solvers.add_damping(self.matrix, damping, relative=relative))

    @_compiled
    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        b = self.damped(damping, relative=relative).matrix
        return self.replace(matrix=solvers.spd_inverse(b, method=method))

    @_compiled
    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        theta = self._flat(v, "DenseMetric.solve")
        b = self.damped(damping, relative=relative).matrix
        return self._unflat(solvers.spd_solve(b, theta, method=method))

    def trace(self) -> jax.Array:
        return jnp.trace(self.matrix)

    def diagonal(self) -> jax.Array:
        return jnp.diagonal(self.matrix)

    def eigvalsh(self) -> jax.Array:
        return sym_eigvalsh(self.matrix)

    def max_eigenvalue(self) -> jax.Array:
        return sym_eigvalsh(self.matrix)[-1]


Metric = Any  # any AbstractMetric
