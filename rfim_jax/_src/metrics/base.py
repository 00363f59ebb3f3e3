"""The metric algebra shared by every representation of a layer RFIM (SPEC §3, §7).

A layer with ``m`` neurons, each with a parameter vector ``w~_l`` of length ``d`` (the
augmented kernel's column l: SPEC §2), has an RFIM over ``theta = concat_l w~_l``.  Every
representation is a pytree (a registered dataclass) implementing :class:`AbstractMetric`:

======================  ================================  ==========================
method                  returns                           shape
======================  ================================  ==========================
``to_dense()``          the metric, neuron-major           (m d, m d)
``matvec(v)``           ``G v``, in param layout           like ``v``
``solve(v, damping)``   ``(G + damping I)^-1 v``           like ``v``
``inverse(damping)``    ``(G + damping I)^-1``, same type  --
``trace()``             ``tr G``                           ()
``diagonal()``          ``diag G``, neuron-major           (m d,)
``eigvalsh()``          eigenvalues, ascending             (m d,)
``max_eigenvalue()``    the largest eigenvalue             ()
======================  ================================  ==========================

``v`` is in *param layout*: a ``{"kernel", "bias"}`` dict shaped like the layer's params
(``"bias"`` only when the metric was built with one).  A dense kernel is ``(d_in, m)``; a
kernel of another layout (a convolution's ``(*window, c_in / groups, c_out)``, a
``DenseGeneral``'s ``(*in_axes, *out_axes)``) is described by a :class:`ParamLayout` and read
as the ``(d_in, m)`` matrix ``kernel.reshape(-1, m)``: the output axes are trailing.

Damping in ``solve`` and ``inverse`` is absolute (``G + damping I``) unless
``relative=True``, in which case it is ``damping * tr(B)/d_B`` per stored block B (eq. 30).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from rfim_jax._src import dtypes as dtypes_lib
from rfim_jax._src import solvers

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How a layer's kernel and bias map to the augmented columns ``W~`` (d, m).

    Attributes:
      kernel_shape: the kernel's own shape; its trailing axes whose product is ``m`` are the
        output axes, the rest are read as ``d_in = prod(kernel_shape) / m`` input coordinates
        in the kernel's own (C) order.
      bias_shape: the bias's own shape (product ``m``), or None for a layer without bias.
      kernel_key: the params entry that holds the kernel: ``"kernel"``, ``"scale"`` for a
        LayerNorm/RMSNorm (d_in = 1), ``"embedding"`` for an embedding table.
      transposed: the kernel's *leading* axis indexes the neurons (an embedding table
        ``(V, D)``: row v is neuron v's vector), so it is read as ``kernel.reshape(m, d_in).T``.
    """

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    kernel_key: str = "kernel"
    transposed: bool = False

    @property
    def m(self) -> int:
        if self.transposed:
            return self.kernel_shape[0]
        if self.bias_shape is not None:
            return math.prod(self.bias_shape)
        return self.kernel_shape[-1]

    @property
    def d_in(self) -> int:
        return math.prod(self.kernel_shape) // self.m


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def unpack_dense(params: Params, name: str) -> tuple[jax.Array, jax.Array | None]:
    """Checks a dense layer's ``{"kernel": (d_in, m), "bias": (m,)}`` and returns (kernel, bias).

    ``bias`` is None when absent.  Arrays and ``jax.ShapeDtypeStruct`` leaves are both
    accepted (the latter for abstract initialisation); nothing is converted.

    Raises:
      ValueError: naming ``name`` and the shapes, if there is no kernel, the kernel is not
        2-D, or the bias does not have shape ``(m,)``.
    """
    if not isinstance(params, Mapping) or "kernel" not in params:
        got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{name}: expected a dict with a 'kernel' entry, got {got}.")
    kernel = params["kernel"]
    if not hasattr(kernel, "shape"):
        kernel = jnp.asarray(kernel)
    if len(kernel.shape) != 2:
        raise ValueError(
            f"{name}: kernel must be 2-D (d_in, m), got shape {_shape(kernel)}."
        )
    bias = params.get("bias")
    if bias is not None:
        if not hasattr(bias, "shape"):
            bias = jnp.asarray(bias)
        if _shape(bias) != (kernel.shape[1],):
            raise ValueError(
                f"{name}: bias must have shape ({kernel.shape[1]},) to match kernel "
                f"{_shape(kernel)}, got {_shape(bias)}."
            )
    return kernel, bias


def params_to_columns(
    v: Params, has_bias: bool, *, name: str = "layer", layout: ParamLayout | None = None
) -> jax.Array:
    """Stacks a param-layout vector into the augmented kernel ``W~ = [kernel; bias]``, (d, m).

    Column l of the result is neuron l's vector ``w~_l``.  Without a ``layout`` the kernel
    must be 2-D ``(d_in, m)``; with one, the kernel must have ``layout.kernel_shape`` and is
    read as ``kernel.reshape(d_in, m)``.

    Raises:
      ValueError: if the vector's shapes or its bias do not match, naming both shapes.
    """
    if layout is not None:
        key = layout.kernel_key
        if not isinstance(v, Mapping) or key not in v:
            raise ValueError(f"{name}: expected a dict with a {key!r} entry.")
        kernel = jnp.asarray(v[key])
        if _shape(kernel) != layout.kernel_shape:
            raise ValueError(
                f"{name}: {key} has shape {_shape(kernel)}, expected {layout.kernel_shape}."
            )
        if layout.transposed:
            kernel = kernel.reshape(layout.m, layout.d_in).T
        else:
            kernel = kernel.reshape(layout.d_in, layout.m)
        bias = v.get("bias")
        if bias is not None:
            bias = jnp.asarray(bias)
            if _shape(bias) != layout.bias_shape:
                raise ValueError(
                    f"{name}: bias has shape {_shape(bias)}, expected {layout.bias_shape}."
                )
            bias = bias.reshape(-1)
    else:
        kernel, bias = unpack_dense(v, name)
        kernel = jnp.asarray(kernel)
    if has_bias != (bias is not None):
        raise ValueError(
            f"{name}: the metric was built {'with' if has_bias else 'without'} a bias, but the "
            f"vector {'lacks' if has_bias else 'has'} one."
        )
    if not has_bias:
        return kernel
    return jnp.concatenate([kernel, jnp.asarray(bias)[None, :].astype(kernel.dtype)], axis=0)


def columns_to_params(
    cols: jax.Array, has_bias: bool, layout: ParamLayout | None = None
) -> Params:
    """Inverse of :func:`params_to_columns`: (d, m) columns back to param layout."""
    kernel, bias = (cols[:-1], cols[-1]) if has_bias else (cols, None)
    key = "kernel"
    if layout is not None:
        key = layout.kernel_key
        kernel = (kernel.T if layout.transposed else kernel).reshape(layout.kernel_shape)
        if bias is not None:
            bias = bias.reshape(layout.bias_shape)
    return {key: kernel, "bias": bias} if has_bias else {key: kernel}


def check_columns(cols: jax.Array, d: int, m: int, name: str) -> None:
    """Raises a ValueError naming ``name`` unless ``cols`` is (d, m)."""
    if cols.shape != (d, m):
        raise ValueError(
            f"{name}: vector has augmented shape {tuple(cols.shape)} (d, m), expected ({d}, {m})."
        )


def sym_eigvalsh(a: jax.Array) -> jax.Array:
    """Eigenvalues of the symmetric part of ``a`` (batched), ascending, in at least float32
    (LAPACK has no bfloat16 or float16 eigensolver; a state stored in one is upcast)."""
    a = a.astype(dtypes_lib.at_least_float32(a))
    return jnp.linalg.eigvalsh(0.5 * (a + jnp.swapaxes(a, -1, -2)))


class AbstractMetric:
    """The algebra every layer-RFIM representation implements (see the module docstring).

    Concrete representations are ``flax.struct`` dataclasses, so they are pytrees and pass
    through ``jit``, ``vmap`` and ``jax.tree.map``.  Each carries the static fields
    ``has_bias`` (whether ``w~_l`` ends with the bias) and ``layout`` (a :class:`ParamLayout`,
    or None for a 2-D dense kernel), and a class-specific ``_tag``: with jax 0.10.2, treedefs of
    registered dataclasses compare equal across classes whose static values are equal, so a
    jit cache could otherwise return one representation for another.

    Attributes (properties):
      representation: ``"exact"``, ``"eigen"`` or ``"diagonal"`` (SPEC §7), the
        ``representation=`` of the constructors that build this class.
      num_neurons: m.
      block_size: d, the length of one neuron's vector ``w~_l``.
      dim: ``m d``.
    """

    num_neurons: int
    block_size: int
    # A plain class attribute, not a dataclass field: it is the class's, not the instance's.
    representation = ""

    def __init_subclass__(cls, **kwargs):
        # A representation's methods are documented once, here: an override without a
        # docstring of its own gets this one, so help() and IDEs show it on every class.
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            member, base = getattr(cls, name, None), vars(AbstractMetric).get(name)
            if callable(member) and not getattr(member, "__doc__", None) and base is not None:
                try:
                    member.__doc__ = base.__doc__
                except AttributeError:  # a builtin or slot wrapper
                    pass

    @property
    def dim(self) -> int:
        return self.num_neurons * self.block_size

    # ------------------------------------------------------------------- param layout
    def _columns(self, v: Params, where: str) -> jax.Array:
        """``v``'s (d, m) columns in the common dtype of ``v`` and the metric's arrays.

        The cast is explicit, so the algebra also runs under strict dtype promotion.
        """
        if self.layout is None and isinstance(v, Mapping) and "kernel" in v:
            # A wrong kernel with a bias that does not fit it either (a transposed kernel)
            # would be reported as the bias's fault, never naming the kernel this metric needs.
            want = (self.block_size - int(self.has_bias), self.num_neurons)
            got = _shape(jnp.asarray(v["kernel"]))
            bias = v.get("bias")
            if (len(got) == 2 and got != want and bias is not None
                    and _shape(jnp.asarray(bias)) != (got[1],)):
                with_bias = f" and a bias of shape ({want[1]},)" if self.has_bias else ""
                raise ValueError(
                    f"{where}: kernel has shape {got}, but this metric is for a kernel of shape "
                    f"{want} (d_in, m){with_bias}."
                )
        cols = params_to_columns(v, self.has_bias, name=where, layout=self.layout)
        check_columns(cols, self.block_size, self.num_neurons, where)
        # A complex v would be cast to the metric's real dtype, dropping its imaginary part.
        dtypes_lib.reject_complex(cols.dtype, where)
        return cols.astype(dtypes_lib.result_type(cols, *jax.tree.leaves(self)))

    def _in_dtype(self, dtype):
        """The metric with every array cast to ``dtype`` (itself if they already are)."""
        if all(a.dtype == dtype for a in jax.tree.leaves(self)):
            return self
        return jax.tree.map(lambda a: a.astype(dtype), self)

    def _params(self, cols: jax.Array) -> Params:
        return columns_to_params(cols, self.has_bias, self.layout)

    # ---------------------------------------------------------------------- algebra
    def to_dense(self) -> jax.Array:
        """The metric as an (m d, m d) matrix in the neuron-major ordering of SPEC §2."""
        raise NotImplementedError

    def matvec_columns(self, cols: jax.Array) -> jax.Array:
        """``G v`` for ``v`` given as its (d, m) augmented columns; returns (d, m)."""
        raise NotImplementedError

    def matvec(self, v: Params) -> Params:
        """``G v`` for ``v`` in param layout; returns param layout."""
        where = f"{type(self).__name__}.matvec"
        cols = self._columns(v, where)
        return self._params(self._in_dtype(cols.dtype).matvec_columns(cols))

    def damped(self, damping, *, relative: bool = False) -> AbstractMetric:
        """The metric with ``damping`` added on the diagonal of every stored block.

        Absolute by default (``B + damping I``); with ``relative=True`` each block gets
        ``damping tr(B)/d I`` (eq. 30), which is what :func:`rfim_jax.rngd`'s ``damping``
        means.  ``solve`` and ``inverse`` take the same two arguments.

        Raises:
          ValueError: for a negative or non-finite ``damping`` known now (a number or 0-d array).
        """
        raise NotImplementedError

    def solve(self, v: Params, damping=0.0, *, relative: bool = False, method: str = "auto"):
        """``(G + damping I)^-1 v`` for ``v`` in param layout; returns param layout.

        Args:
          v: ``{"kernel", "bias"}`` shaped like the layer's params.
          damping: absolute, or relative (``damping tr(B)/d_B`` per block B) with
            ``relative=True``; a scalar, or one value per stored block (per neuron for the
            per-neuron representations).
          method: the block solver of :func:`rfim_jax.spd_solve` (exact representations);
            the eigen and diagonal ones solve in closed form and only check the name.
            A damped block or scale that cannot be inverted falls back as in
            :func:`rfim_jax.spd_solve` (a zero scale, a dead unit's, divides by 1).

        Raises:
          ValueError: if ``v``'s shapes do not match the metric's layer.
        """
        raise NotImplementedError

    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        """``(G + damping I)^-1`` in the same representation (damping as in :meth:`solve`)."""
        raise NotImplementedError

    def trace(self) -> jax.Array:
        """``tr G``, a scalar."""
        raise NotImplementedError

    def diagonal(self) -> jax.Array:
        """``diag G``, (m d,), neuron-major."""
        raise NotImplementedError

    def eigvalsh(self) -> jax.Array:
        """All m d eigenvalues, ascending; condition numbers follow from these."""
        raise NotImplementedError

    def max_eigenvalue(self) -> jax.Array:
        """The largest eigenvalue (Sec. 4's balancing), a scalar: ``eigvalsh()[-1]``.

        Exact in every representation (an exact metric pays one ``eigvalsh`` per stored
        block; :func:`rfim_jax.spd_max_eigenvalue` is the cheap power-iteration bound).
        """
        raise NotImplementedError


class PerNeuronScales:
    """The shared algebra of the representations that store per-neuron scales ``S`` (m, d).

    Their eigenvalues are the scales themselves (eigen: in the basis U; diagonal: in the
    standard basis), so trace, spectrum and size are read from ``S``.
    """

    scales: jax.Array

    @property
    def num_neurons(self) -> int:
        return self.scales.shape[-2]

    @property
    def block_size(self) -> int:
        return self.scales.shape[-1]

    def trace(self) -> jax.Array:
        return jnp.sum(self.scales)

    def eigvalsh(self) -> jax.Array:
        return jnp.sort(self.scales.reshape(-1))

    def max_eigenvalue(self) -> jax.Array:
        return jnp.max(self.scales)

    def damped(self, damping, *, relative: bool = False):
        """``G + damping I``, or ``+ damping tr(G_l)/d`` per neuron with ``relative=True``.

        Adding to every scale adds to each block ``U diag(s_l) U^T``'s eigenvalues, so the
        result stays in the same representation.
        """
        solvers.check_damping(damping)
        damping = jnp.asarray(damping).astype(self.scales.dtype)
        m = self.scales.shape[-2]
        if damping.ndim:
            # One value per neuron, like the exact metrics' one per stored block.
            if damping.shape not in ((m,), (1,)):
                raise ValueError(
                    f"{type(self).__name__}: damping must be a scalar or one value per "
                    f"neuron, shape ({m},); got shape {tuple(damping.shape)}."
                )
            damping = damping[:, None]
        if relative:
            damping = damping * jnp.mean(self.scales, axis=-1, keepdims=True)
        return self.replace(scales=self.scales + damping)

    def inverse(self, damping=0.0, *, relative: bool = False, method: str = "auto"):
        """``(G + damping I)^-1``: the reciprocal scales (``method`` is checked, not used).

        A scale with no signal (below the dtype's smallest normal number: a dead unit)
        inverts to 1, as a non-positive diagonal entry does in the block solvers.
        """
        solvers.resolve_method(method)
        scales = self.damped(damping, relative=relative).scales
        return self.replace(scales=solvers.reciprocal_scales(scales))


class Arithmetic:
    """Elementwise arithmetic on every data field, for moving averages (``a G + b H``)."""

    def _map(self, fn, *others):
        for other in others:
            if type(other) is not type(self) or (
                    jax.tree.structure(other) != jax.tree.structure(self)):
                raise TypeError(
                    f"{type(self).__name__} arithmetic needs another {type(self).__name__} of "
                    f"the same layout, got {type(other).__name__}; convert both with "
                    f".to_dense() to combine different representations."
                )
            mine = [a.shape for a in jax.tree.leaves(self)]
            theirs = [a.shape for a in jax.tree.leaves(other)]
            if mine != theirs:
                raise ValueError(
                    f"{type(self).__name__} arithmetic needs equal shapes, got {mine} and "
                    f"{theirs}."
                )
        return jax.tree.map(fn, self, *others)

    def __add__(self, other):
        return self._map(lambda a, b: a + b, other)

    def __radd__(self, other):
        # sum([g, h, ...]) starts from the integer 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return self._map(lambda a, b: b + a, other)

    def __sub__(self, other):
        return self._map(lambda a, b: a - b, other)

    def _check_scalar(self, scalar, op: str) -> None:
        if isinstance(scalar, Arithmetic):
            raise TypeError(
                f"{type(self).__name__} {op} takes a scalar, got {type(scalar).__name__}: a "
                f"product of two metrics is not a metric of this layer (use .to_dense() for "
                f"matrix algebra, or .matvec for G v)."
            )
        if jnp.ndim(scalar) != 0:
            raise TypeError(
                f"{type(self).__name__} {op} takes a scalar, got an array of shape "
                f"{tuple(jnp.shape(scalar))} (to damp each block differently, use "
                f".damped(array))."
            )

    def __mul__(self, scalar):
        self._check_scalar(scalar, "*")
        return self._map(lambda a: a * scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        self._check_scalar(scalar, "/")
        return self._map(lambda a: a / scalar)

    def __neg__(self):
        return self._map(lambda a: -a)

    def astype(self, dtype):
        return self._map(lambda a: a.astype(dtype))
