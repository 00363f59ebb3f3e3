"""The full-network Fisher information matrix by autodiff: a reference (paper eq. 5, Sec. 4).

For a network whose last layer alone is stochastic, the FIM averaged over the inputs is (eq. 5)

    g(Theta) = 1/n sum_i E_{p(y | x_i, Theta)} [ dl_i/dTheta dl_i/dTheta^T ],
    l_i(Theta) = ln p(y | x_i, Theta).

Write ``o_i = model_fn(Theta, x)[i]`` for the k outputs of sample i and ``p(y | o)`` for the
output distribution.  By the chain rule ``dl_i/dTheta = J_i^T d ln p(y | o_i)/do`` with the
Jacobian ``J_i = do_i/dTheta`` of shape (k, D), so the expectation over y is exact:

    g(Theta) = 1/n sum_i J_i^T F_out(o_i) J_i,

where ``F_out`` is the Fisher information of the output distribution in its natural output
parametrisation:

=============  ====================================  =====================================
response       output o and model                    F_out(o)
=============  ====================================  =====================================
"bernoulli"    logits; y_a ~ Bernoulli(s(o_a)),      diag(s(o) (1 - s(o)))
               independent over the k outputs
"categorical"  logits; y ~ Categorical(softmax(o))    diag(eta) - eta eta^T, eta = softmax(o)
"gaussian"     mean; y ~ N(o, sigma^2 I)             I / sigma^2
=============  ====================================  =====================================

This is the reference that the layer RFIMs are compared with (Sec. 4): the last layer's
diagonal block of g equals its RFIM (e.g. :func:`rfim_jax.softmax_rfim`), hidden layers'
blocks differ, and rank(g) <= n * rank(F_out) (n (k - 1) for a categorical output) whereas a
nonlinear layer's RFIM has rank up to n * D_h.

**Parameter ordering.**  The flat vector Theta is laid out so that each dense layer's block is
directly comparable with a layer metric's ``to_dense()`` (SPEC Sec. 2):

1. every *dense layer* -- a mapping that holds a 2-D ``"kernel"`` (d_in, m) and optionally a
   ``"bias"`` (m,) -- in the order of its kernel in ``jax.tree_util`` flattening (sorted dict
   keys), each flattened neuron-major, ``theta_layer = concat_l [kernel[:, l], bias[l]]``;
2. then every other leaf (e.g. a LayerNorm ``scale``) in flattening order, raveled in C order.

Layers are named by their path: the params keys down to the dict holding ``"kernel"``, joined
by ``"/"`` (e.g. ``"Dense_1"`` or ``"block/Dense_0"``); other leaves by their full path
(e.g. ``"LayerNorm_0/scale"``).  The FIM is a dense (D, D) matrix: this module is meant for
small networks (tests, the Sec. 4 geometry experiment), not for training.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from rfim_jax._src import arguments
from rfim_jax._src.dtypes import at_least_float32
from rfim_jax._src.paths import SEP

Response = Literal["bernoulli", "categorical", "gaussian"]
RESPONSES: tuple[str, ...] = ("bernoulli", "categorical", "gaussian")


# ----------------------------------------------------------------------------- layout


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_str(path: tuple) -> str:
    # The same naming as rfim_jax.layer_paths: keys joined by "/".
    return SEP.join(_key_str(k) for k in path)


def _last_key_is(path: tuple, name: str) -> bool:
    return bool(path) and isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key == name


@dataclasses.dataclass(frozen=True)
class _Segment:
    path: str
    start: int
    stop: int
    leaves: tuple[int, ...]  # dense: (kernel,) or (kernel, bias); other: (leaf,)
    dense: bool


def _layout(params: Any, where: str = "full_fisher") -> tuple[list, Any, tuple[_Segment, ...]]:
    """Finds the dense layers and other leaves of ``params`` and their offsets in Theta."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [jnp.asarray(leaf) for _, leaf in with_path]
    kernels: dict[str, int] = {}
    for idx, (path, leaf) in enumerate(with_path):
        if _last_key_is(path, "kernel") and jnp.ndim(leaf) == 2:
            kernels[_path_str(path[:-1])] = idx
    biases: dict[str, int] = {}
    for idx, (path, leaf) in enumerate(with_path):
        layer = _path_str(path[:-1])
        if _last_key_is(path, "bias") and layer in kernels:
            m = leaves[kernels[layer]].shape[1]
            if jnp.shape(leaf) != (m,):
                raise ValueError(
                    f"{where}: layer {layer!r} has kernel shape "
                    f"{tuple(leaves[kernels[layer]].shape)} but bias shape "
                    f"{tuple(jnp.shape(leaf))}; expected ({m},)."
                )
            biases[layer] = idx
    in_dense = set(kernels.values()) | set(biases.values())
    segments: list[_Segment] = []
    start = 0
    for layer, k in kernels.items():
        d_in, m = leaves[k].shape
        d = d_in + (layer in biases)
        ids = (k, biases[layer]) if layer in biases else (k,)
        segments.append(_Segment(layer, start, start + m * d, ids, True))
        start += m * d
    for idx, (path, leaf) in enumerate(with_path):
        if idx not in in_dense:
            size = int(jnp.size(leaf))
            segments.append(_Segment(_path_str(path), start, start + size, (idx,), False))
            start += size
    return leaves, treedef, tuple(segments)


def _ravel(leaves: list, segments: tuple[_Segment, ...], dtype) -> jax.Array:
    pieces = []
    for seg in segments:
        if seg.dense:
            cols = leaves[seg.leaves[0]].astype(dtype)
            if len(seg.leaves) == 2:
                cols = jnp.concatenate([cols, leaves[seg.leaves[1]].astype(dtype)[None]], axis=0)
            # Rows of cols.T are the neurons' vectors w~_l (neuron-major, SPEC Sec. 2).
            pieces.append(cols.T.reshape(-1))
        else:
            pieces.append(leaves[seg.leaves[0]].astype(dtype).reshape(-1))
    if not pieces:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate(pieces)


def _unravel(theta: jax.Array, like: list, treedef, segments: tuple[_Segment, ...]) -> Any:
    out = list(like)
    for seg in segments:
        chunk = theta[seg.start : seg.stop]
        if seg.dense:
            kernel = like[seg.leaves[0]]
            d_in, m = kernel.shape
            cols = chunk.reshape(m, -1).T
            out[seg.leaves[0]] = cols[:d_in].astype(kernel.dtype)
            if len(seg.leaves) == 2:
                out[seg.leaves[1]] = cols[d_in].astype(like[seg.leaves[1]].dtype)
        else:
            leaf = like[seg.leaves[0]]
            out[seg.leaves[0]] = chunk.reshape(leaf.shape).astype(leaf.dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def _theta_dtype(leaves: list) -> jnp.dtype:
    if not leaves:
        return jnp.dtype(jnp.float32)
    return at_least_float32(*leaves)


def ravel_neuron_major(params: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """Flattens ``params`` into the FIM's ordering; like ``jax.flatten_util.ravel_pytree``.

    Dense layers come first, each neuron-major (``concat_l [kernel[:, l], bias[l]]``), then
    the other leaves; see the module docstring.  Returns ``(theta, unravel)`` where
    ``unravel(theta)`` rebuilds the pytree with the original leaf dtypes.  Theta has the
    leaves' result dtype, promoted to at least float32.
    """
    leaves, treedef, segments = _layout(params, "ravel_neuron_major")
    theta = _ravel(leaves, segments, _theta_dtype(leaves))
    return theta, lambda t: _unravel(t, leaves, treedef, segments)


# ------------------------------------------------------------------------------ the FIM


@struct.dataclass
class FullFisher:
    """The full-network FIM of eq. (5) and its per-layer diagonal blocks.

    Attributes:
      matrix: the (D, D) FIM in the ordering of :func:`ravel_neuron_major`.
      blocks: ``{layer path: (D_layer, D_layer)}`` diagonal block of every dense layer, with
        ``D_layer = m (d_in + 1)`` (or ``m d_in`` without a bias), neuron-major like the layer
        metrics' ``to_dense()``.
      offsets: ``((path, start, stop), ...)`` for every dense layer and then every other leaf,
        in matrix order: ``matrix[start:stop, start:stop]`` is that part's block.
      dense_paths: the dense layers' paths, in matrix order.
    """

    matrix: jax.Array
    blocks: dict[str, jax.Array]
    offsets: tuple[tuple[str, int, int], ...] = struct.field(pytree_node=False)
    dense_paths: tuple[str, ...] = struct.field(pytree_node=False)

    def block(self, path: str) -> jax.Array:
        """The diagonal block of a dense layer or another leaf, by its path."""
        for name, start, stop in self.offsets:
            if name == path:
                return self.matrix[..., start:stop, start:stop]
        raise KeyError(f"No parameter block {path!r}; known: {[o[0] for o in self.offsets]}.")


def _output_fisher_quadratic(jac: jax.Array, out: jax.Array, response: str, sigma) -> jax.Array:
    """``mean_i J_i^T F_out(o_i) J_i`` for J (N, k, D) and outputs o (N, k)."""
    n = jac.shape[0]
    if response == "gaussian":
        return jnp.einsum("nkd,nke->de", jac, jac) / (n * sigma**2)
    if response == "bernoulli":
        p = jax.nn.sigmoid(out)
        return jnp.einsum("nk,nkd,nke->de", p * (1.0 - p), jac, jac) / n
    # Categorical: J^T (diag(eta) - eta eta^T) J = sum_k eta_k J_k J_k^T - (J^T eta)(J^T eta)^T.
    eta = jax.nn.softmax(out, axis=-1)
    mean_jac = jnp.einsum("nk,nkd->nd", eta, jac)
    return (
        jnp.einsum("nk,nkd,nke->de", eta, jac, jac) - jnp.einsum("nd,ne->de", mean_jac, mean_jac)
    ) / n


def full_fisher(
    model_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    response: Response,
    *,
    sigma: float = 1.0,
) -> FullFisher:
    """The full-network FIM of eq. (5), exactly, by autodiff of the network's outputs.

        g(Theta) = 1/N sum_i J_i^T F_out(o_i) J_i,   J_i = d o_i / dTheta,

    which equals ``1/N sum_i E_y[ d ln p(y|x_i)/dTheta  d ln p(y|x_i)/dTheta^T ]`` for the
    response model named by ``response`` (module docstring): ``"bernoulli"`` (outputs are the
    pre-sigmoid logits, one independent Bernoulli per output), ``"categorical"`` (outputs are
    softmax logits) or ``"gaussian"`` (outputs are the mean, ``y ~ N(o, sigma^2 I)``).

    Args:
      model_fn: ``model_fn(params, x)`` -> outputs of shape (n, k), or (n,) for a single
        Bernoulli/Gaussian output; more leading axes are flattened into N samples.  It is a
        static (hashable) argument: the computation is jitted internally, once per model_fn.
      params: the parameter pytree; dense layers are ``{"kernel": (d_in, m), "bias": (m,)}``.
      x: the inputs, passed to ``model_fn`` unchanged.
      response: ``"bernoulli"``, ``"categorical"`` or ``"gaussian"``.  Static under jit.
      sigma: the Gaussian noise scale (ignored otherwise).

    Returns:
      A :class:`FullFisher` with the (D, D) ``matrix`` in the ordering of
      :func:`ravel_neuron_major` and the ``blocks`` of the dense layers.  Computed in the
      parameters' dtype promoted to at least float32.
    """
    if response not in RESPONSES:
        raise ValueError(
            f"full_fisher: unknown response {response!r}; valid responses are "
            f"{', '.join(repr(r) for r in RESPONSES)}."
        )
    arguments.check_positive("sigma", sigma, where="full_fisher: ")
    # One compiled program instead of hundreds of op-by-op dispatches when called eagerly;
    # inside an outer jit this is simply inlined.
    return _full_fisher_jit(model_fn, params, x, response, sigma)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _full_fisher_jit(model_fn, params, x, response, sigma) -> FullFisher:
    leaves, treedef, segments = _layout(params)
    dtype = _theta_dtype(leaves)
    theta = _ravel(leaves, segments, dtype)

    def outputs(t: jax.Array) -> jax.Array:
        return jnp.asarray(model_fn(_unravel(t, leaves, treedef, segments), x))

    out = jax.eval_shape(outputs, theta)
    if out.ndim == 0 or (response == "categorical" and out.ndim < 2):
        raise ValueError(
            f"full_fisher: model_fn must return outputs of shape (n, k)"
            f"{'' if response == 'categorical' else ' or (n,)'} for a {response!r} response, "
            f"got shape {tuple(out.shape)}."
        )
    if out.size == 0:  # a mean over no samples is NaN
        raise ValueError(f"full_fisher: the batch is empty (model_fn's outputs have shape "
                         f"{tuple(out.shape)}).")
    num_out = out.size
    # Reverse mode costs one pass per output, forward mode one per parameter.
    jac_fn = jax.jacrev(outputs) if num_out <= theta.size else jax.jacfwd(outputs)
    jac = jac_fn(theta)
    o = outputs(theta)
    k = 1 if o.ndim == 1 else o.shape[-1]
    o = o.reshape(-1, k).astype(dtype)
    jac = jac.reshape(o.shape[0], k, theta.size).astype(dtype)
    matrix = _output_fisher_quadratic(jac, o, response, sigma)
    matrix = 0.5 * (matrix + matrix.T)
    blocks = {s.path: matrix[s.start : s.stop, s.start : s.stop] for s in segments if s.dense}
    return FullFisher(
        matrix=matrix,
        blocks=blocks,
        offsets=tuple((s.path, s.start, s.stop) for s in segments),
        dense_paths=tuple(s.path for s in segments if s.dense),
    )


# ------------------------------------------------------------------- rank and conditioning


def _spectrum(matrix: Any) -> jax.Array:
    if hasattr(matrix, "to_dense"):
        matrix = matrix.to_dense()
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Expected a square (D, D) matrix, got shape {tuple(matrix.shape)}.")
    if matrix.shape[0] == 0:
        raise ValueError("Expected a square (D, D) matrix with D >= 1, got shape (0, 0).")
    return jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T))


def _threshold(eig: jax.Array, rtol: float | None) -> jax.Array:
    arguments.check_at_least("rtol", rtol, 0.0)
    if rtol is None:
        rtol = eig.shape[0] * jnp.finfo(eig.dtype).eps
    return rtol * jnp.max(jnp.abs(eig))


def fim_rank(matrix: Any, rtol: float | None = None) -> jax.Array:
    """Numerical rank of a symmetric PSD matrix: the number of eigenvalues > rtol * lambda_max.

    ``matrix`` is a (D, D) array or any metric with ``to_dense()``.  The default ``rtol`` is
    ``D * eps`` of the dtype, as in ``numpy.linalg.matrix_rank``.  Used for the Sec. 4
    comparison: rank(FIM) <= n rank(F_out) against rank(nonlinear-layer RFIM) <= n D_h.

    Returns:
      An int array: the rank, or -1 when the matrix has a NaN or infinite entry (its rank is
      undefined; a count over NaN eigenvalues would read 0).
    """
    eig = _spectrum(matrix)
    rank = jnp.sum(eig > _threshold(eig, rtol))
    return jnp.where(jnp.all(jnp.isfinite(eig)), rank, -1)


def condition_number(
    matrix: Any, rtol: float | None = None, *, nonzero_only: bool = True
) -> jax.Array:
    """Condition number ``lambda_max / lambda_min`` of a symmetric PSD matrix.

    With ``nonzero_only=True`` (default) lambda_min is the smallest eigenvalue above the
    rank threshold ``rtol * lambda_max`` (see :func:`fim_rank`), i.e. the conditioning of the
    matrix on its numerical range, which stays finite for the singular FIMs of Sec. 4; it is
    NaN for a zero matrix.  With ``nonzero_only=False`` it is the plain ratio over the whole
    spectrum and ``inf`` when the matrix is numerically singular.  NaN for a matrix with a
    NaN or infinite entry.
    """
    eig = _spectrum(matrix)
    thr = _threshold(eig, rtol)
    lam_max = eig[-1]
    if nonzero_only:
        lam_min = jnp.min(jnp.where(eig > thr, eig, jnp.inf))
        return jnp.where(lam_max > thr, lam_max / lam_min, jnp.nan)
    plain = jnp.where(eig[0] > thr, lam_max / eig[0], jnp.inf)
    # A NaN or infinite entry has no spectrum: NaN, not the inf of a singular matrix.
    return jnp.where(jnp.all(jnp.isfinite(eig)), plain, jnp.nan)
