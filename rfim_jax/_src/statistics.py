"""The statistics kernels behind every RFIM: moments of a layer's augmented inputs.

Each kernel takes the augmented inputs ``x~`` (n, d) of a batch (SPEC §2) and, where the
metric is per neuron, per-sample weights ``nu`` (n, m) (the Fisher coefficients of eq. 21),
and returns a mean over the n rows.  Costs are given for n samples, m neurons, width d.

**Grouped rows.**  The per-neuron kernels also take ``x~`` of shape (n, G, d) for a grouped
convolution (SPEC §8): neuron l (of m, split into G contiguous groups of m / G) sees only row
``x~[:, l // (m / G)]``.  G = 1 is the plain case.

**Bounded memory.**  The weighted moments contract three operands (``nu``, ``x~``, ``x~``),
which XLA lowers through an (n, m, d) product (or, on the symmetric path of
:func:`second_moment`, an (n, d (d + 1) / 2) one).  For the n = batch x positions rows of a
convolution that product is large (a 3x3 conv over 64 channels on 32x32 images at batch 128:
131072 rows, m = 64, d = 577, i.e. 19 GiB in float32).  So when ``n * m * d`` exceeds
:data:`ROW_BUDGET` numbers the rows are processed in chunks by ``lax.scan`` and the partial
sums added: the temporaries are then at most ``ROW_BUDGET`` numbers (128 MiB in float32),
whatever n.  The result is the same mean, to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Largest number of elements of a per-chunk (rows x m x d) temporary before the rows are
#: processed in chunks (2**25 = 128 MiB of float32).
ROW_BUDGET = 2**25


#: Up to this many rows, the per-neuron moments transpose the weights rather than the result
#: (:func:`second_moment`).  Measured on a 2-core CPU with the moving average after it, for
#: d = 65 and m = 64: 0.91 against 1.10 ms at 200 rows, 3.6 against 3.2 ms at 1000; for a
#: conv's 78400 rows of d = 10, 14.3 against 7.3 ms.
NEURONS_FIRST_ROWS = 256


def _chunked_mean(fn, rows: tuple[jax.Array, ...], per_row: int) -> jax.Array:
    """``fn(*rows) / n`` for ``fn`` a sum over the rows (axis 0) of its arguments.

    With ``n * per_row > ROW_BUDGET`` the rows are zero-padded to whole chunks and summed by a
    ``lax.scan``; ``fn`` must be a sum of per-row terms that vanish on zero rows.
    """
    n = rows[0].shape[0]
    chunk = max(1, ROW_BUDGET // max(per_row, 1))
    if n <= chunk:
        return fn(*rows) / n
    steps = -(-n // chunk)
    pad = steps * chunk - n

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((steps, chunk) + a.shape[1:])

    parts = tuple(split(a) for a in rows)
    out = jax.eval_shape(fn, *(p[0] for p in parts))
    total, _ = lax.scan(
        lambda acc, xs: (acc + fn(*xs), None), jnp.zeros(out.shape, out.dtype), parts
    )
    return total / n


def _grouped(x_aug: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x~`` as (n, G, d) and ``weights`` as (n, G, m / G)."""
    if x_aug.ndim == 2:
        x_aug = x_aug[:, None, :]
    n, groups, _ = x_aug.shape
    return x_aug, weights.reshape(n, groups, weights.shape[-1] // groups)


def _packed_pairs(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The index pairs (a, b) of the d (d + 1) / 2 distinct entries of a symmetric (d, d)
    matrix, in the packed order that :func:`_unpack_symmetric` reads.

    After LAPACK's rectangular full packed format.  With ``k1 = d // 2``, ``k2 = d - k1``,
    ``s = k2 - k1`` (0 or 1), the matrix is ``[[T1, S], [S^T, T2]]`` with T1 (k1, k1), S (k1,
    k2), T2 (k2, k2).  The packed vector is a (k1 + 1, k2) rectangle ``F`` followed by S, row
    major.  ``F[r, c]`` holds ``T1[r, c - s]`` where ``r + s <= c`` (T1's upper triangle) and
    ``T2[r - 1 + s, c]`` elsewhere (T2's lower triangle): the two triangles fill the rectangle
    exactly.
    """
    k1 = d // 2
    k2 = d - k1
    s = k2 - k1
    r = np.arange(k1 + 1)[:, None]
    c = np.arange(k2)[None, :]
    in_t1 = r + s <= c
    rows_f = np.where(in_t1, r, k1 + r - 1 + s)
    cols_f = np.where(in_t1, c - s, k1 + c)
    rows_s = np.repeat(np.arange(k1), k2)
    cols_s = np.tile(np.arange(k1, d), k1)
    return (np.concatenate([rows_f.ravel(), rows_s]).astype(np.int32),
            np.concatenate([cols_f.ravel(), cols_s]).astype(np.int32))


def _unpack_symmetric(packed: jax.Array, d: int) -> jax.Array:
    """(..., d (d + 1) / 2) packed as :func:`_packed_pairs` says -> the symmetric (..., d, d).

    Only static slices, per-block transposes and selects: each block's own (d (d + 1) / 2)
    entries are contiguous, so the transposed reads stay within one block (in cache).
    """
    k1 = d // 2
    k2 = d - k1
    s = k2 - k1
    lead = packed.shape[:-1]
    split = (k1 + 1) * k2
    rect = packed[..., :split].reshape(lead + (k1 + 1, k2))
    cross = packed[..., split:].reshape(lead + (k1, k2))
    t1 = rect[..., :k1, s:]
    t2 = rect[..., 1 - s:, :]
    i1, i2 = np.arange(k1), np.arange(k2)
    t1 = jnp.where(i1[:, None] <= i1[None, :], t1, jnp.swapaxes(t1, -1, -2))
    t2 = jnp.where(i2[:, None] >= i2[None, :], t2, jnp.swapaxes(t2, -1, -2))
    return jnp.concatenate([jnp.concatenate([t1, cross], -1),
                            jnp.concatenate([jnp.swapaxes(cross, -1, -2), t2], -1)], -2)


def _use_triangle(per_group: int, d: int) -> bool:
    """Whether the per-neuron moments go through the triangle of ``x~ x~^T`` (see below).

    Per group of ``per_group`` neurons, its temporary, the (n, d (d + 1) / 2) row products,
    must not be larger than the (n, per_group d) weighted rows of the plain contraction, so
    it is used when d < 2 per_group (never for a depthwise conv, one neuron per group).
    """
    return d < 2 * per_group


def second_moment(x_aug: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``mean_i x~_i x~_i^T`` (d, d), or per column of ``weights`` (n, m): (m, d, d).

    This is the single contraction behind eqs. (21)-(23); with weights it computes
    ``G_l = mean_i w_il x~_i x~_i^T`` for every l in one pass, with no loop over neurons.
    ``x_aug`` may be grouped, (n, G, d), with weights (see the module docstring).

    **Symmetry.**  Every ``G_l`` is symmetric, so with weights only its d (d + 1) / 2
    distinct entries are computed: the products ``x~_ia x~_ib`` of each row, one per pair
    {a, b}, form an (n, d (d + 1) / 2) matrix ``P`` (the row-wise Khatri-Rao product, one
    triangle), and ``w^T P`` is one matrix product of ``n m d (d + 1)`` flops, half of the
    ``2 n m d^2`` of the plain contraction.  The pairs are in a packed order
    (:func:`_packed_pairs`) that unpacks into the (m, d, d) blocks by static slices and
    per-block transposes.  This is used while ``P`` is no larger than the plain
    contraction's temporary (d < 2 m per group); wider layers (an input layer of 785 with 64
    neurons) use the plain contraction.
    """
    if weights is None:
        d = x_aug.shape[-1]
        return _chunked_mean(lambda x: x.T @ x, (x_aug,), d)
    x_aug, weights = _grouped(x_aug, weights)
    groups, d = x_aug.shape[1:]
    m = groups * weights.shape[-1]
    if not _use_triangle(m // groups, d):
        def moments(w, x):
            return jnp.einsum("ngl,ngi,ngj->glij", w, x, x).reshape(m, d, d)

        return _chunked_mean(moments, (weights, x_aug), m * d)

    rows, cols = _packed_pairs(d)

    def packed_moments(w, x):
        # Either way the packed moments come out neurons first, (G, m / G, T), so that each
        # block's entries are contiguous for the unpacking and the moving average after it.
        if x.shape[0] <= NEURONS_FIRST_ROWS:
            # Few rows (a minibatch of an MLP): the weights are transposed to (G, m / G, n)
            # before the product, and the products are gathers of whole rows of n, (G, T, n).
            x_t = jnp.moveaxis(x, 0, -1)
            products = x_t[:, rows] * x_t[:, cols]
            w_t = lax.optimization_barrier(jnp.moveaxis(w, 0, -1))
            return jnp.einsum("gln,gtn->glt", w_t, products)
        # Many rows (the patches of a convolution): the product in its natural (T, m / G)
        # layout, and the small result transposed.
        products = x[..., rows] * x[..., cols]  # (n, G, T)
        packed = jnp.einsum("ngt,ngl->gtl", products, w)
        return lax.optimization_barrier(jnp.swapaxes(packed, -1, -2))

    packed = _chunked_mean(packed_moments, (weights, x_aug), groups * rows.size)
    # Split m first: under explicit sharding the neuron axis may be sharded, and a single
    # reshape that splits one axis while merging others is ambiguous there.
    return _unpack_symmetric(packed.reshape((m,) + packed.shape[2:]), d)


def softmax_coefficients(z: jax.Array) -> jax.Array:
    """Per-sample Fisher of the logits of a categorical response: ``diag(eta) - eta eta^T``."""
    eta = jax.nn.softmax(z, axis=-1)
    return jax.vmap(jnp.diag)(eta) - eta[:, :, None] * eta[:, None, :]


def coupled_rfim(x_aug: jax.Array, coeffs: jax.Array) -> jax.Array:
    """``[mean_i K_i[k, l] x~_i x~_i^T]_{k,l}`` as a dense (m d, m d) neuron-major matrix.

    ``coeffs`` is (n, m, m), each ``K_i`` symmetric; only its upper triangle is read.  This is
    the shared form of eqs. (25) and (26), whose ``K_i`` (``diag(eta_i) - eta_i eta_i^T``, and
    ``F_i diag(...) F_i^T``) are symmetric.

    **Symmetry, twice.**  Block (k, l) is the weighted second moment with weights
    ``K_i[k, l]``: symmetric itself, and equal to block (l, k).  So the m (m + 1) / 2 distinct
    blocks are computed by :func:`second_moment` with one weight column per pair k <= l (its
    triangle path halves their flops again), and placed into the (m d, m d) matrix.  That is
    ``n m (m + 1) d (d + 1) / 2`` flops against the ``2 n m^2 d^2`` of the direct contraction:
    3.6x fewer for 10 classes.
    """
    d = x_aug.shape[-1]
    m = coeffs.shape[-1]
    first, second = np.triu_indices(m)
    blocks = second_moment(x_aug, coeffs[:, first, second])  # (m (m + 1) / 2, d, d)
    pair = np.zeros((m, m), np.int32)
    pair[first, second] = pair[second, first] = np.arange(first.size)
    # (k, l, a, b) -> (k, a, l, b): row k d + a, column l d + b.
    return jnp.swapaxes(blocks[pair], 1, 2).reshape(m * d, m * d)


def softmax_unit_coefficients(z: jax.Array) -> jax.Array:
    """The unit-wise softmax coefficients ``nu_ik = eta_ik (1 - eta_ik)`` (n, m) (SPEC §7).

    The diagonal of :func:`softmax_coefficients`: class k treated as a neuron on its own, the
    cross-class blocks of eq. (25) dropped.  Used by the eigen and diagonal representations.
    """
    eta = jax.nn.softmax(z, axis=-1)
    return eta * (1.0 - eta)


def diagonal_moments(x_aug: jax.Array, weights: jax.Array) -> jax.Array:
    """``s_lj = mean_i w_il x~_ij^2``, (m, d): the diagonals of every ``G_l``, in ``2 n m d``.

    ``x_aug`` may be grouped, (n, G, d) (see the module docstring).
    """
    x_aug, weights = _grouped(x_aug, weights)
    return jnp.einsum("ngl,ngi->gli", weights, x_aug * x_aug).reshape(
        -1, x_aug.shape[-1]) / x_aug.shape[0]


def eigenbasis_moments(x_aug: jax.Array, weights: jax.Array, basis: jax.Array) -> jax.Array:
    """``s_l = mean_i w_il (U^T x~_i)^2`` (m, d): each ``diag(U^T G_l U)`` (SPEC §7).

    Rotating the rows costs ``2 n d^2`` and the weighted squares ``2 n m d``; the (m, d, d)
    blocks are never formed.
    """
    return diagonal_moments(x_aug @ basis, weights)


def weighted_traces(x_aug: jax.Array, weights: jax.Array) -> jax.Array:
    """``tr G_l = mean_i w_il |x~_i|^2`` for every l, (m,); ``x_aug`` may be grouped."""
    x_aug, weights = _grouped(x_aug, weights)
    return jnp.einsum("ngl,ng->gl", weights, jnp.sum(x_aug * x_aug, axis=-1)).reshape(
        -1) / x_aug.shape[0]


def input_eigenbasis(second: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of a symmetric (d, d)."""
    evals, evecs = jnp.linalg.eigh(0.5 * (second + second.T))
    return evals, evecs
