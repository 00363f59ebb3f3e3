"""Batched symmetric positive-definite (SPD) inverses and solves for stacks of metric blocks.

RNGD (paper Sec. 5, eqs. 30-33) inverts, every T steps, a stack of damped RFIM blocks
``G_l + eps_l I`` of shape ``(..., d, d)``: one block per neuron for a nonlinear layer
(eq. 23), one shared block for a linear layer (eq. 22), one big block for a softmax layer
(eq. 25).  This module computes ``G^-1`` and ``G^-1 b`` for such stacks inside ``jit``.

Why not just ``jnp.linalg``
---------------------------
With jax/jaxlib 0.10.2 on a 2-core CPU, *batched* LAPACK (``jnp.linalg.cholesky``,
``cho_solve`` or ``inv`` on an ``(m, d, d)`` stack) inside one jitted program together with
other blocks has been seen to deadlock after a few to about 150 calls; ``lax.map`` over the
blocks (batch-1 LAPACK calls) has not.  (In this module's own soak runs on a loaded 2-core
CPU, 1000 such refreshes of a (64, 65, 65) stack did not hang but slowed to about 0.5-0.8 s
per step, against about 0.045 s for the sweep below.)  So the default solvers here are
written in plain XLA ops (matmuls, elementwise ops, ``fori_loop``/``while_loop``) and
never call LAPACK on the CPU.

Methods (``method=``)
---------------------
``"gauss_jordan"`` (pure XLA)
    Blocked Gauss-Jordan sweep without pivoting, ``A <- A^-1`` in place.  An SPD matrix
    needs no pivoting: every Schur complement of an SPD matrix is SPD, and the pivots are
    the ``D`` of its ``L D L^T`` (Cholesky) factorisation, i.e. ``diag(L)^2``.  Per panel K of
    ``nb`` coordinates (``P = A_KK``, ``J`` the rest)::

        A_KK <- P^-1,  A_KJ <- P^-1 A_KJ,  A_JK <- -A_JK P^-1,  A_JJ <- A_JJ - A_JK P^-1 A_KJ

    which is one ``(d, nb) x (nb, d)`` matmul on the whole (padded) block per panel, so the
    loop carries a fixed shape (``lax.fori_loop`` over ``ceil(d / nb)`` panels) and the work is
    ``2 d^3`` flops, almost all of it matmul.  ``P^-1`` comes from the same sweep done
    column by column on the ``nb x nb`` panel.  A block larger than 256 is first split in
    two halves, ``[[A, B], [B^T, D]]``: ``A`` is inverted, then the Schur complement
    ``S = D - B^T A^-1 B`` (each recursively), and ``G^-1`` is assembled from ``A^-1``,
    ``S^-1`` and ``W = A^-1 B`` with three more matmuls.  That is the same elimination in the
    same order (the pivots of ``S`` are those the sweep meets after ``A``'s), in about
    ``4/3 d^3`` flops of large matmuls instead of the sweep's latency-bound panel loops.  On
    2 CPU cores, same process, alternating (median ms): 300 x 300 1.46 against the plain
    sweep's 1.99, 513 x 513 3.95 against 6.65, 785 x 785 10.7 against 16.2, 1025 x 1025 17.6
    against 31.2; below 256 the sweep is faster (``_SCHUR_ABOVE``).
``"cholesky"`` (pure XLA)
    Blocked left-looking Cholesky ``G = L L^T`` (fori_loop over panels, column loop inside a
    panel), then blocked forward and back substitution (``spd_solve``) or the solve against
    the identity (inverse).  About ``6 d^3`` flops with the fixed-shape loops, so it is
    slower than the Gauss-Jordan sweep for inverses.  For ``spd_solve`` with one
    right-hand side it costs the factorisation (``2 d^3``) plus substitutions: measured
    16 ms against the sweep's 25 ms on (1, 785, 785), but 6.8 ms against 3.5 ms on
    (64, 65, 65).
``"newton_schulz"`` (pure XLA, matmul only)
    ``X <- X (2 I - G X)``, i.e. ``R = I - G X``, ``X <- X + X R``, so ``R <- R^2``: quadratic
    convergence once the spectral radius of ``R`` is below 1.  Start ``X0 = c M`` with ``M``
    SPD, so that the eigenvalues of ``G M`` are real, positive and at most
    ``b = min(||G M||_1, ||G M||_inf, ||G M||_F)``: warm, ``M = previous`` (``c = 1`` while
    ``b < 1.9``, else ``1/b``); cold, ``M = diag(G)^-1`` (Jacobi) and ``c = 1/b``, so the
    residual's eigenvalues lie in ``[0, 1)``.  Cold needs about
    ``log2 cond(D^-1/2 G D^-1/2) + 5`` iterations, warm from the inverse of a nearby matrix
    2-4; a warm start that does not converge (e.g. a non-SPD ``previous``) is redone cold.
    A block stops at ``||R||_F <= tol`` (default ``d * eps``), at the rounding floor (below
    1/2 a step must square the residual; one that does not, or that fails to lower it, ends
    the block), or at ``max_iters``.  See :func:`newton_schulz_inverse`.
``"lapack"``
    ``jnp.linalg.cholesky`` + ``cho_solve`` on the whole stack: LAPACK on the CPU (the
    batched call that can deadlock, see above), cuSOLVER/cuBLAS on GPU, XLA's own
    decompositions on TPU.
``"lapack_map"``
    The same, one block at a time through ``lax.map`` (batch-1 LAPACK calls on the CPU,
    which do not deadlock).  Do not ``vmap`` it: vmap turns it back into a batched call.
``"auto"``
    Per ``jax.default_backend()`` (:data:`AUTO_METHODS`):

    * CPU: ``"gauss_jordan"``.  Never LAPACK (safe); its median beats every other method
      on both benchmark shapes below (the batched LAPACK call matches it only at its
      best), and it keeps its speed when the CPU is oversubscribed, where the LAPACK
      calls' medians degraded 10-50x in the same runs.
    * GPU: ``"lapack"`` (cuSOLVER potrf + cuBLAS triangular solves).  The deadlock is in
      jaxlib's CPU LAPACK path; on GPU the vendor solver is the well-trodden choice, while
      the sweep's column loop is a chain of small kernels.  Not measured here (no GPU was
      available when this was written); pass ``method="gauss_jordan"`` to compare.
    * TPU and anything else: ``"gauss_jordan"`` (matmul-only, at ``Precision.HIGHEST``).

Measured with ``benchmarks/solvers.py`` (float32, jitted, after compilation, median and
[min] over 5 rounds of 10 calls, in ms; 2-core Xeon shared with other jobs, load 3-5, so
medians carry tens of percent of noise; error = max|X - X_np| / max|X_np| against numpy's
float64 inverse; NS warm(w) starts from inv((1 - w) G + w G'), w = 0.005 one EMA step,
w = 0.394 = 1 - 0.995^100 the T = 100 refresh interval)::

    method                    (64, 65, 65)            (1, 785, 785)        error
    gauss_jordan  (auto CPU)    3.6 [3.1]              17.1 [15.8]          1e-6
    cholesky                   12.1 [11.0]             52.7 [35.2]          7e-7
    newton_schulz cold         19.3 [18.2]  11 it     263  [191]   12 it    3e-6
    newton_schulz warm(0.005)   6.7 [6.0]    3 it      53  [44]     2 it    5e-6
    newton_schulz warm(0.394)  16.1 [15.4]   9 it     167  [149]   10 it    3e-6
    lapack_map                  4.1 [3.5]              72  [26]             8e-7
    lapack (batched)            7.0 [3.0]              96  [17]             8e-7

(The gauss_jordan row predates the Schur split above 256; see ``"gauss_jordan"`` for the
785 x 785 time with it.)  Newton-Schulz costs 4 d^3 flops per iteration against the sweep's
2 d^3 in total, so on CPU it only pays when warm-started very close (and then still loses to
the sweep); it is the matmul-only option for accelerators.

Failure and fallback
--------------------
Only the symmetric part ``(G + G^T) / 2`` of each block is used.  A block is *ok* when its
elimination was well defined:

* factorisation methods (``gauss_jordan``, ``cholesky``, ``lapack``, ``lapack_map``): the
  block is finite and every pivot (Schur-complement diagonal, ``diag(L)^2``) satisfies
  ``pivot > eps * G_kk`` (relative to the block's own diagonal, ``eps`` the dtype's machine
  epsilon; so every block with ``cond(G) < 1/eps`` passes), and the computed inverse is
  finite;
* ``newton_schulz``: the block is finite and the final residual ``||I - G X||_F <= 1/2``
  (which happens, up to rounding, iff ``cond(G) * eps`` is small).

*ok* is not an accuracy guarantee: like any inverse in floating point, an ok block's inverse
has a relative error of about ``cond(G) * eps``, so in float32 a block with ``cond(G) = 1e8``
passes the pivot test with an inverse that is wrong by tens of percent.  Gauss-Jordan without
pivoting, and its Schur split above all, can do worse than that bound on damped low-rank
blocks: 4e-2 against LAPACK's 2.7e-4 for one 785 x 785 block of cond 1.9e4 (README, *Block
solvers*).  RNGD's relative
damping keeps its blocks' condition numbers near ``d / damping`` (1e4 for d = 100 at the
default 1e-2), where float32 inverses are accurate to about 1e-3.

A block that is not ok never contributes NaN/Inf.  Its inverse is replaced by, in order:

1. ``previous`` (the caller's last good inverse of that block), if given and finite;
2. else ``diag(1 / G_kk)``, with ``1`` for every diagonal entry that is not positive and
   finite (so a dead input coordinate, a zero row and column, gets a unit step), which
   is the identity for an all-zero or non-finite diagonal.

:func:`spd_inverse_and_status` returns ``(inverse, ok)`` with ``ok`` a boolean per block,
True where the exact inverse was used; :func:`spd_solve` applies the same rule.  Inside the
pure-XLA methods a failing pivot is replaced by 1 and a non-finite block by the identity
before the sweep, so the discarded values are finite too.  Inputs are computed in at least
float32 (bfloat16/float16 blocks give float32 results).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from rfim_jax._src.arguments import concrete_number, shown
from rfim_jax._src.dtypes import at_least_float32, reject_complex, result_type

ArrayLike = Any

METHODS = ("auto", "gauss_jordan", "cholesky", "newton_schulz", "lapack", "lapack_map")
"""The accepted values of ``method=``."""

AUTO_METHODS = {"cpu": "gauss_jordan", "gpu": "lapack", "tpu": "gauss_jordan"}
"""What ``method="auto"`` resolves to per ``jax.default_backend()`` (others: gauss_jordan)."""

_HIGHEST = lax.Precision.HIGHEST  # TF32/bf16 matmuls would wreck an inverse.


def _panel_target(d: int) -> int:
    """Target panel width of the blocked Gauss-Jordan sweep.

    A panel costs a column loop of nb latency-bound steps plus one rank-nb update of the
    whole block, so small blocks want narrow panels and big ones wide panels (measured on
    CPU: 32 is best for d = 65 and d = 300, 96 for d = 785).  The Cholesky panels stay at
    32: its panel loops are heavier, and 96 made d = 785 seven times slower.
    """
    return 32 if d < 512 else 96


_CHOLESKY_PANEL = 32

#: Gauss-Jordan splits blocks larger than this in two (:func:`_schur_inverse`).
_SCHUR_ABOVE = 256


# ----------------------------------------------------------------------------- helpers


def check_method(method: str) -> None:
    """Raises a ValueError unless ``method`` is one of :data:`METHODS`."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"Unknown solver method {method!r}; expected one of {METHODS}.")


def resolve_method(method: str, backend: str | None = None) -> str:
    """Returns the concrete method for ``method``; ``"auto"`` depends on the backend."""
    check_method(method)
    if method != "auto":
        return method
    backend = jax.default_backend() if backend is None else backend
    return AUTO_METHODS.get(backend, "gauss_jordan")


def needs_serial_calls(method: str, backend: str | None = None) -> bool:
    """Whether independent calls of ``method`` must not run concurrently inside a loop.

    True for the LAPACK methods on the CPU: two independent ``potrf``/``trsm`` custom calls
    in one while-loop body (a ``lax.scan`` over training steps) deadlock XLA's CPU runtime
    (measured on jax 0.10.2; one call per body, or calls chained by a data dependency, run).
    Callers that invert several stacks in one program chain them (``scale_by_rngd`` does).
    """
    backend = jax.default_backend() if backend is None else backend
    return backend == "cpu" and resolve_method(method, backend) in ("lapack", "lapack_map")


def _nonempty(blocks: jax.Array, where: str) -> jax.Array:
    """``blocks`` unless they are 0 x 0, which have no eigenvalues or iteration to run."""
    if blocks.shape[-1] == 0:
        raise ValueError(f"{where}: expected (..., d, d) blocks with d >= 1, got shape "
                         f"{tuple(blocks.shape)}.")
    return blocks


def _as_blocks(blocks: ArrayLike, name: str = "blocks", *, promote: bool = True) -> jax.Array:
    """Checks (..., d, d); ``promote``: computes in at least float32 (an inverse in bfloat16
    or float16 would be noise)."""
    blocks = jnp.asarray(blocks)
    reject_complex(blocks.dtype, name)
    if not jnp.issubdtype(blocks.dtype, jnp.floating):
        blocks = blocks.astype(jnp.result_type(float))
    if promote:
        blocks = blocks.astype(at_least_float32(blocks.dtype))
    if blocks.ndim < 2 or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(
            f"{name} must be a stack of square matrices (..., d, d), got shape "
            f"{tuple(blocks.shape)}."
        )
    return blocks


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _t(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def _eye_like(a: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _diag(a: jax.Array) -> jax.Array:
    return jnp.diagonal(a, axis1=-2, axis2=-1)


def _all_true(a: jax.Array) -> jax.Array:
    """A True flag per block of (..., n, n), sharded like the blocks (a loop carry must keep
    one sharding under explicit sharding)."""
    return jnp.ones_like(a[..., 0, 0], dtype=bool)


def _finite_block(a: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(a), axis=(-2, -1))


def _sanitise(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric part, with every non-finite block replaced by I; and the finite mask."""
    sym = 0.5 * (blocks + _t(blocks))
    finite = _finite_block(sym)
    return jnp.where(finite[..., None, None], sym, _eye_like(sym)), finite


def _pivot_floor(diag: jax.Array) -> jax.Array:
    """A pivot must exceed this: eps times the block's own diagonal entry, and be normal."""
    fi = jnp.finfo(diag.dtype)
    return jnp.maximum(fi.eps * diag, fi.tiny)


def _panels(d: int, target: int) -> tuple[int, int]:
    """(number of panels p, panel width nb) with p * nb >= d and p * nb - d < p."""
    p = -(-d // target)
    return p, -(-d // p)


def _pad_identity(a: jax.Array, dp: int) -> jax.Array:
    """blockdiag(a, I) of size dp; the inverse of that is blockdiag(a^-1, I)."""
    d = a.shape[-1]
    if dp == d:
        return a
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, dp - d), (0, dp - d)])
    return a + jnp.diag((jnp.arange(dp) >= d).astype(a.dtype))


def _slice(a: jax.Array, start, size: int, axis: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim + axis)


def _update(a: jax.Array, upd: jax.Array, start, axis: int) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(a, upd, start, axis=a.ndim + axis)


def _fallback(blocks: jax.Array, previous: jax.Array | None) -> jax.Array:
    """The documented fallback per block: previous if finite, else diag(1/G_kk) (1 if bad)."""
    fb = _jacobi(0.5 * (blocks + _t(blocks)))
    if previous is not None:
        fb = jnp.where(_finite_block(previous)[..., None, None], previous, fb)
    return fb


def _check_previous(previous, blocks: jax.Array) -> jax.Array | None:
    if previous is None:
        return None
    previous = jnp.asarray(previous, blocks.dtype)
    if previous.shape != blocks.shape:
        raise ValueError(
            f"previous must have the blocks' shape {tuple(blocks.shape)}, got "
            f"{tuple(previous.shape)}."
        )
    return previous


# -------------------------------------------------------------------------- Gauss-Jordan


def _sweep_panel(p: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Column-by-column Gauss-Jordan sweep of (..., nb, nb): returns (P^-1, all pivots ok)."""
    nb = p.shape[-1]
    idx = jnp.arange(nb)

    def body(k, carry):
        a, ok = carry
        e = (idx == k).astype(a.dtype)
        not_e = 1.0 - e
        piv = a[..., k, k]
        good = piv > floor[..., k]
        # A failed pivot is replaced by 1 so that nothing overflows; the block is flagged.
        inv_piv = 1.0 / jnp.where(good, piv, 1.0)
        row = a[..., k, :]
        col = a[..., :, k]
        u = col * not_e - e  # new column k = -u * inv_piv, with +inv_piv at (k, k)
        v = (row * not_e + e) * inv_piv[..., None]
        a = a * (not_e[:, None] * not_e[None, :]) - u[..., :, None] * v[..., None, :]
        return a, ok & good

    ok = _all_true(p)
    return lax.fori_loop(0, nb, body, (p, ok))


def _gauss_jordan(a: jax.Array, floor: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Inverse of SPD (..., d, d) by Gauss-Jordan elimination: (inverse, pivots ok).

    ``floor`` (..., d): the pivot floors (default :func:`_pivot_floor` of the diagonal).
    Blocks above :data:`_SCHUR_ABOVE` go through :func:`_schur_inverse`, the rest through
    the blocked sweep :func:`_gauss_jordan_sweep`; both eliminate in the same order, so
    they test the same pivots.
    """
    if floor is None:
        floor = _pivot_floor(_diag(a))
    if a.shape[-1] > _SCHUR_ABOVE:
        return _schur_inverse(a, floor)
    return _gauss_jordan_sweep(a, floor)


def _schur_inverse(a: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two-by-two block inverse through the Schur complement, each half by :func:`_gauss_jordan`.

    With ``a = [[A, B], [B^T, D]]``, ``W = A^-1 B`` and ``S = D - B^T W`` (SPD when ``a``
    is)::

        a^-1 = [[A^-1 + W S^-1 W^T, -W S^-1], [-S^-1 W^T, S^-1]]

    About ``4/3 d^3`` flops (the sweep does ``2 d^3``), and all but the halves' own
    inverses are large matmuls: on 2 CPU cores a 785 x 785 block took 10.7 ms against the
    sweep's 16.2 ms, whose panel loops are latency-bound.  The pivots of Gauss-Jordan on
    ``a`` are those of ``A`` followed by those of ``S``, so the pivot test is unchanged.
    """
    d = a.shape[-1]
    h = d // 2
    b = a[..., :h, h:]
    a_inv, ok_a = _gauss_jordan(a[..., :h, :h], floor[..., :h])
    w = _mm(a_inv, b)
    s = a[..., h:, h:] - _mm(_t(b), w)
    s_inv, ok_s = _gauss_jordan(0.5 * (s + _t(s)), floor[..., h:])
    ws = _mm(w, s_inv)
    top = jnp.concatenate([a_inv + _mm(ws, _t(w)), -ws], axis=-1)
    bottom = jnp.concatenate([-_t(ws), s_inv], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2), ok_a & ok_s


def _gauss_jordan_sweep(a: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blocked in-place Gauss-Jordan inverse of SPD (..., d, d): (inverse, pivots ok)."""
    d = a.shape[-1]
    p, nb = _panels(d, _panel_target(d))
    dp = p * nb
    a = _pad_identity(a, dp)
    # The padding's unit pivots get the floor of a unit diagonal.
    floor = jnp.pad(floor, [(0, 0)] * (floor.ndim - 1) + [(0, dp - d)],
                    constant_values=_pivot_floor(jnp.ones((), a.dtype)))
    idx = jnp.arange(dp)
    eye = jnp.eye(dp, dtype=a.dtype)

    def body(j, carry):
        a, ok = carry
        k = j * nb
        outside = ((idx < k) | (idx >= k + nb)).astype(a.dtype)
        row_k = _slice(a, k, nb, -2)  # (..., nb, dp)
        col_k = _slice(a, k, nb, -1)  # (..., dp, nb)
        p_inv, ok_k = _sweep_panel(_slice(row_k, k, nb, -1), _slice(floor, k, nb, -1))
        e_k = _slice(eye, k, nb, -1)  # (dp, nb)
        # A_new = A masked off rows/cols K  -  U P^-1 V, with U = [A_JK; -I], V = [I, A_KJ]:
        # this writes all four block updates of the sweep with one matmul.
        u = col_k * outside[:, None] - e_k
        v = _mm(p_inv, row_k * outside[None, :] + _t(e_k))
        a = a * (outside[:, None] * outside[None, :]) - _mm(u, v)
        return a, ok & ok_k

    ok = _all_true(a)
    a, ok = lax.fori_loop(0, p, body, (a, ok))
    return a[..., :d, :d], ok


# ------------------------------------------------------------------------------ Cholesky


def _chol_panel(s: jax.Array, floor: jax.Array):
    """Unblocked Cholesky of (..., nb, nb) and the inverse of its factor: (L, L^-1, ok)."""
    nb = s.shape[-1]
    idx = jnp.arange(nb)

    def factor(c, carry):
        l, ok = carry
        e = (idx == c).astype(s.dtype)
        # column c of the Schur complement: s[:, c] - L[:, :c] L[c, :c]^T (L is 0 for cols >= c)
        l_row = jnp.sum(l * e[:, None], axis=-2)
        v = jnp.sum(s * e, axis=-1) - jnp.einsum("...ij,...j->...i", l, l_row, precision=_HIGHEST)
        piv = jnp.sum(v * e, axis=-1)
        good = piv > jnp.sum(floor * e, axis=-1)
        inv_sqrt = lax.rsqrt(jnp.where(good, piv, 1.0))
        col = v * inv_sqrt[..., None] * (idx >= c).astype(s.dtype)
        return l + col[..., :, None] * e, ok & good

    l, ok = lax.fori_loop(0, nb, factor, (jnp.zeros_like(s), _all_true(s)))

    def invert(r, y):
        # forward substitution, row r: Y[r] = (e_r - L[r, :r] Y[:r]) / L[r, r]
        e = (idx == r).astype(s.dtype)
        l_row = jnp.sum(l * e[:, None], axis=-2)
        l_rr = jnp.sum(l_row * e, axis=-1)
        below = (idx < r).astype(s.dtype)
        y_r = e - jnp.einsum("...j,...jk->...k", l_row * below, y, precision=_HIGHEST)
        y_r = y_r / l_rr[..., None]
        return y + e[:, None] * y_r[..., None, :]

    return l, lax.fori_loop(0, nb, invert, jnp.zeros_like(s)), ok


def _cholesky(a: jax.Array):
    """Blocked left-looking Cholesky of SPD (..., d, d) -> (L padded, panel inverses, ok)."""
    d = a.shape[-1]
    p, nb = _panels(d, _CHOLESKY_PANEL)
    dp = p * nb
    a = _pad_identity(a, dp)
    floor = _pivot_floor(_diag(a))
    idx = jnp.arange(dp)

    def body(j, carry):
        l, l_inv, ok = carry
        k = j * nb
        # columns K of the Schur complement: A[:, K] - L L[K, :]^T (L is 0 beyond col k).
        c = _slice(a, k, nb, -1) - _mm(l, _t(_slice(l, k, nb, -2)))
        l11, l11_inv, ok_k = _chol_panel(_slice(c, k, nb, -2), _slice(floor, k, nb, -1))
        panel = _mm(c, _t(l11_inv)) * (idx >= k + nb).astype(a.dtype)[:, None]
        panel = _update(panel, l11, k, -2)
        l = _update(l, panel, k, -1)
        l_inv = l_inv.at[..., j, :, :].set(l11_inv)
        return l, l_inv, ok & ok_k

    l0 = jnp.zeros_like(a)
    l_inv0 = jnp.zeros(a.shape[:-2] + (p, nb, nb), a.dtype)
    return lax.fori_loop(0, p, body, (l0, l_inv0, _all_true(a)))


def _cholesky_solve_padded(l: jax.Array, l_inv: jax.Array, b: jax.Array) -> jax.Array:
    """Solves L L^T x = b with L padded (..., dp, dp), b (..., dp, k), by panels."""
    p, nb = l_inv.shape[-3], l_inv.shape[-1]

    def forward(j, y):
        k = j * nb
        r = _slice(b, k, nb, -2) - _mm(_slice(l, k, nb, -2), y)
        return _update(y, _mm(l_inv[..., j, :, :], r), k, -2)

    y = lax.fori_loop(0, p, forward, jnp.zeros_like(b))

    def backward(i, x):
        j = p - 1 - i
        k = j * nb
        r = _slice(y, k, nb, -2) - _mm(_t(_slice(l, k, nb, -1)), x)
        return _update(x, _mm(_t(l_inv[..., j, :, :]), r), k, -2)

    return lax.fori_loop(0, p, backward, jnp.zeros_like(b))


def _pad_rows(b: jax.Array, dp: int) -> jax.Array:
    return jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, dp - b.shape[-2]), (0, 0)])


# -------------------------------------------------------------------------- Newton-Schulz


@dataclasses.dataclass(frozen=True)
class NewtonSchulzInfo:
    """Diagnostics of :func:`newton_schulz_inverse`."""

    residual: jax.Array  # ||I - G X||_F per block, of the returned X
    num_iters: jax.Array  # iterations run, retries included (the loop runs for all blocks)
    warm: jax.Array  # per block: the returned X came from the warm start ``previous``


jax.tree_util.register_dataclass(
    NewtonSchulzInfo, data_fields=["residual", "num_iters", "warm"], meta_fields=[]
)

_NS_OK = 0.5  # ||I - G X||_F at most this counts as converged (``ok``)


def _norm_bound(a: jax.Array) -> jax.Array:
    """An upper bound of the spectral radius: min(||a||_1, ||a||_inf, ||a||_F)."""
    absa = jnp.abs(a)
    bound = jnp.minimum(
        jnp.max(jnp.sum(absa, axis=-2), axis=-1), jnp.max(jnp.sum(absa, axis=-1), axis=-1)
    )
    return jnp.minimum(bound, jnp.sqrt(jnp.sum(a * a, axis=(-2, -1))))


def _jacobi(g: jax.Array) -> jax.Array:
    """diag(1 / G_kk), with 1 where G_kk is not positive or its inverse not finite."""
    dg = _diag(g)
    # An infinite entry is not a usable scale: 1/inf = 0 would freeze that coordinate.
    usable = (dg > 0) & jnp.isfinite(dg)
    inv = 1.0 / jnp.where(usable, dg, 1.0)
    inv = jnp.where(usable & jnp.isfinite(inv), inv, 1.0)
    return inv[..., :, None] * jnp.eye(g.shape[-1], dtype=g.dtype)


def _newton_schulz_loop(g, m, warm, max_iters: int, tol):
    """NS from X0 = c M; returns (X, ||I - G X||_F, iterations).

    The eigenvalues mu of G M (M SPD) are real, positive and at most b = _norm_bound(G M).
    Cold, c = 1/b puts those of R_0 = I - c G M in [0, 1).  Warm (M ~ G^-1, so mu ~ 1),
    c = 1 keeps R_0 small and is safe while b < 1.9 (then 1 - mu lies in (-0.9, 1)).
    """
    eye = _eye_like(g)
    gm = _mm(g, m)
    bound = _norm_bound(gm)
    bound = jnp.where((bound > 0) & jnp.isfinite(bound), bound, 1.0)
    scale = jnp.where(warm & (bound < 1.9), 1.0, 1.0 / bound)[..., None, None]
    x = m * scale
    r = eye - gm * scale
    rn = jnp.sqrt(jnp.sum(r * r, axis=(-2, -1)))
    # The Frobenius norm of a non-normal R can grow for a while before R^(2^k) -> 0, so
    # steps are accepted unconditionally while ||R||_F >= 1; below 1, a step that does not
    # lower it means the rounding floor is reached (the earlier iterate is kept).  A
    # residual that explodes means X0 was no approximate inverse (e.g. indefinite).
    blowup = 1e4 * jnp.maximum(rn, 1.0)

    def cond(state):
        k, _, _, _, active = state
        return (k < max_iters) & jnp.any(active)

    def body(state):
        k, x, r, rn, active = state
        x_new = x + _mm(x, r)
        r_new = eye - _mm(g, x_new)
        rn_new = jnp.sqrt(jnp.sum(r_new * r_new, axis=(-2, -1)))
        diverged = ~(rn_new <= blowup)
        stalled = (rn_new >= rn) & (rn < 1.0)
        # Below 1/2 every eigenvalue of R is small and a step squares R; a step that falls far
        # short of that (rn_new > rn^1.5) has hit the rounding floor.
        floor = (rn < 0.5) & (rn_new > rn**1.5)
        accept = active & ~diverged & ~stalled
        keep = accept[..., None, None]
        x = jnp.where(keep, x_new, x)
        r = jnp.where(keep, r_new, r)
        rn = jnp.where(accept, rn_new, rn)
        return k + 1, x, r, rn, accept & ~floor & (rn > tol)

    # A non-positive diagonal entry proves G is not SPD: do not iterate on it (it would run
    # to max_iters); the caller sees its residual and falls back.
    active = jnp.isfinite(rn) & (rn > tol) & jnp.all(_diag(g) > 0, axis=-1)
    k, x, _, rn, _ = lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), x, r, rn, active))
    return x, rn, k


def newton_schulz_inverse(
    blocks: ArrayLike,
    previous: ArrayLike | None = None,
    *,
    max_iters: int = 64,
    tol: float | None = None,
) -> tuple[jax.Array, NewtonSchulzInfo]:
    """Newton-Schulz inverse of SPD blocks, ``X <- X (2I - G X)``; matmul-only.

    With ``R = I - G X`` the step is ``X <- X + X R``, after which ``R <- R^2``, so the
    iteration converges quadratically iff the spectral radius of ``R_0`` is below 1.  The
    start is ``X0 = c M`` with ``M`` SPD, whose ``G M`` has real positive eigenvalues at most
    ``b = min(||G M||_1, ||G M||_inf, ||G M||_F)``.  ``M`` is ``previous`` (warm start) for
    blocks where it is finite, with ``c = 1`` while ``b < 1.9``; else ``M = diag(G)^-1``
    (cold start; Jacobi scaling equalises the features' scales) with ``c = 1/b``, so the
    eigenvalues of ``R_0`` lie in [0, 1).  Cold, the iteration needs about
    ``log2 cond(D^-1/2 G D^-1/2) + 5`` steps; warm from the inverse of a nearby matrix,
    2-4.  A warm-started block that does not reach ``||R||_F <= 1/2`` (e.g. a non-SPD
    ``previous``) is redone cold.

    A block stops when ``||R||_F <= tol`` (default ``d * eps``); at the rounding floor,
    i.e. once ``||R||_F < 1`` a step fails to lower it, or below 1/2 fails to nearly square
    it (``> ||R||_F^1.5``), keeping the better iterate; when ``||R||_F`` blows up (a useless
    start); or for a non-positive diagonal entry (not SPD).  The loop stops when every block
    has stopped or after ``max_iters``.  Non-finite blocks are treated as the identity;
    :func:`spd_inverse_and_status` adds the checks and the fallback.

    Returns:
      ``(X, info)``: ``X`` symmetrised; ``info.residual`` the per-block ``||I - G X||_F`` (of X
      before symmetrisation), ``info.num_iters`` and ``info.warm`` (see
      :class:`NewtonSchulzInfo`).
    """
    g, _ = _sanitise(_nonempty(_as_blocks(blocks), "newton_schulz_inverse"))
    previous = _check_previous(previous, g)
    tol = g.shape[-1] * jnp.finfo(g.dtype).eps if tol is None else tol
    cold = _jacobi(g)
    if previous is None:
        warm = ~_all_true(g)
        x, rn, k = _newton_schulz_loop(g, cold, warm, max_iters, tol)
    else:
        warm = _finite_block(previous)
        m = jnp.where(warm[..., None, None], 0.5 * (previous + _t(previous)), cold)
        x, rn, k = _newton_schulz_loop(g, m, warm, max_iters, tol)
        retry = warm & ~(rn <= _NS_OK)

        def redo():
            return _newton_schulz_loop(g, cold, jnp.zeros_like(warm), max_iters, tol)

        def skip():
            return x, rn, jnp.zeros([], jnp.int32)

        x2, rn2, k2 = lax.cond(jnp.any(retry), redo, skip)
        x = jnp.where(retry[..., None, None], x2, x)
        rn = jnp.where(retry, rn2, rn)
        k = k + k2
        warm = warm & ~retry
    return 0.5 * (x + _t(x)), NewtonSchulzInfo(residual=rn, num_iters=k, warm=warm)


# ------------------------------------------------------------------------------- LAPACK


def _lapack_solve(a: jax.Array, rhs: jax.Array | None):
    """(G^-1 rhs or G^-1, pivots ok) by jnp.linalg.cholesky + cho_solve (LAPACK on CPU)."""
    c = jnp.linalg.cholesky(a)
    ok = jnp.all(_diag(c) ** 2 > _pivot_floor(_diag(a)), axis=-1)
    c = jnp.where(ok[..., None, None], c, _eye_like(a))
    b = _eye_like(a) if rhs is None else rhs
    return jax.scipy.linalg.cho_solve((c, True), b), ok


def _lapack(a: jax.Array, rhs: jax.Array | None, mapped: bool):
    if not mapped:
        return _lapack_solve(a, rhs)
    batch = a.shape[:-2]
    flat_a = a.reshape((-1,) + a.shape[-2:])
    if rhs is None:
        x, ok = lax.map(lambda m: _lapack_solve(m, None), flat_a)
    else:
        flat_b = rhs.reshape((-1,) + rhs.shape[-2:])
        x, ok = lax.map(lambda ab: _lapack_solve(*ab), (flat_a, flat_b))
    return x.reshape(batch + x.shape[-2:]), ok.reshape(batch)


# ------------------------------------------------------------------------------ public


def check_damping(damping) -> None:
    """Refuses a damping known now (a Python or numpy number, a concrete 0-d array) that is
    negative or NaN; traced and per-block arrays are left to the caller.

    Raises:
      ValueError: naming the value and the valid range.
    """
    number = concrete_number(damping)
    if number is not None and not number >= 0:
        raise ValueError(f"damping must be >= 0, got {shown(damping, number)}.")


def reciprocal_scales(scales: ArrayLike) -> jax.Array:
    """``1 / s`` per scale of a diagonal or eigen-diagonal metric, and 1 where ``s`` has none.

    A scale below the dtype's smallest normal number, or not finite, is read as carrying no
    information and gets 1, the rule the block solvers use for a non-positive diagonal entry
    (module docstring, "Failure and fallback"); above it ``1 / s`` stays finite (at most
    ``1 / tiny``).  Such scales arise where a unit sees no signal (a dead ReLU, a saturated
    unit, an embedding row never looked up): relative damping adds nothing there either, so a
    moving average decays to 0, and ``1 / 0`` times the unit's zero gradient would be NaN.
    """
    s = jnp.asarray(scales)
    ok = jnp.isfinite(s) & (s >= jnp.finfo(s.dtype).tiny)
    return jnp.where(ok, 1.0 / jnp.where(ok, s, 1.0), 1.0).astype(s.dtype)


def block_diagonals(blocks: ArrayLike) -> jax.Array:
    """The diagonal of each block of a (..., d, d) stack, (..., d).

    Reads the d diagonal entries of each block by a strided slice of its flattened form,
    ``d`` reads per block; ``jnp.diagonal`` and ``jnp.trace`` mask the whole block, a full
    pass over ``d^2`` entries, which costs as much as the moving average itself for the large
    blocks RNGD keeps.
    """
    blocks = jnp.asarray(blocks)
    d = blocks.shape[-1]
    flat = blocks.reshape(blocks.shape[:-2] + (d * d,))
    return flat[..., :: d + 1]


def block_traces(blocks: ArrayLike) -> jax.Array:
    """``tr(G)`` per block of a (..., d, d) stack, (...,), from :func:`block_diagonals`."""
    return jnp.sum(block_diagonals(blocks), axis=-1)


def add_damping(blocks: ArrayLike, damping: ArrayLike, *, relative: bool = False) -> jax.Array:
    """Damps each block: ``G + eps I``.

    Absolute: ``eps = damping``.  Relative (eq. 30): ``eps = damping * tr(G) / d`` per block,
    so that the damping scales with the block's mean eigenvalue.  ``damping`` may be a scalar
    or an array broadcastable to the batch shape ``blocks.shape[:-2]``.  Note the default is
    *absolute*, while :func:`rfim_jax.rngd`'s ``damping`` is relative.

    Raises:
      ValueError: for a ``damping`` known now (a number or 0-d array) that is negative or NaN (it
        would make the blocks indefinite), or an array that does not broadcast to the
        blocks' batch shape (naming both shapes).
    """
    blocks = _as_blocks(blocks, promote=False)
    eps = damping_shifts(blocks, damping, relative=relative)
    return blocks + eps[..., None, None] * jnp.eye(blocks.shape[-1], dtype=blocks.dtype)


def damping_shifts(blocks: jax.Array, damping: ArrayLike, *, relative: bool) -> jax.Array:
    """The ``eps`` per block that :func:`add_damping` adds to the diagonal, (...,).

    Raises:
      ValueError: as :func:`add_damping`.
    """
    check_damping(damping)
    d = blocks.shape[-1]
    damping = jnp.asarray(damping, blocks.dtype)
    batch = blocks.shape[:-2]
    try:
        fits = jnp.broadcast_shapes(damping.shape, batch) == batch
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"damping has shape {tuple(damping.shape)}, but the blocks {tuple(blocks.shape)} "
            f"have the batch shape {tuple(batch)}: give a scalar or one value per block (a "
            f"metric with one shared block, SharedBlockMetric or DenseMetric, takes a "
            f"scalar)."
        )
    if relative:
        return damping * block_traces(blocks) / d
    return jnp.broadcast_to(damping, batch)


def spd_inverse_and_status(
    blocks: ArrayLike,
    *,
    method: str = "auto",
    previous: ArrayLike | None = None,
    max_iters: int = 64,
    tol: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Inverts a stack of SPD blocks, ``G^-1`` per block, with a per-block success flag.

    Args:
      blocks: (..., d, d); only the symmetric part is used.
      method: one of ``rfim_jax.SOLVER_METHODS`` (see the module docstring).
      previous: optional (..., d, d), the last inverses: the Newton-Schulz warm start, and
        the first fallback for blocks that fail (module docstring, "Failure and fallback").
      max_iters, tol: Newton-Schulz only (see :func:`newton_schulz_inverse`).

    Returns:
      ``(inverse, ok)``: ``inverse`` (..., d, d) is finite and symmetric; ``ok`` (...,) is True
      where the exact inverse was used and False where the fallback was.
    """
    blocks = _as_blocks(blocks)
    previous = _check_previous(previous, blocks)
    method = resolve_method(method)
    if blocks.shape[-1] == 0:  # 0 x 0 blocks: their inverse is empty, and every method agrees
        return blocks, jnp.ones(blocks.shape[:-2], bool)
    g, finite = _sanitise(blocks)
    if method == "gauss_jordan":
        inv, ok = _gauss_jordan(g)
    elif method == "cholesky":
        l, l_inv, ok = _cholesky(g)
        d = g.shape[-1]
        inv = _cholesky_solve_padded(l, l_inv, _eye_like(l))[..., :d, :d]
    elif method == "newton_schulz":
        inv, info = newton_schulz_inverse(g, previous, max_iters=max_iters, tol=tol)
        ok = info.residual <= _NS_OK
    else:
        inv, ok = _lapack(g, None, mapped=method == "lapack_map")
    inv = 0.5 * (inv + _t(inv))
    ok = ok & finite & _finite_block(inv)
    return jnp.where(ok[..., None, None], inv, _fallback(blocks, previous)), ok


def spd_inverse(
    blocks: ArrayLike,
    *,
    method: str = "auto",
    previous: ArrayLike | None = None,
    max_iters: int = 64,
    tol: float | None = None,
) -> jax.Array:
    """``G^-1`` per block; :func:`spd_inverse_and_status` without the status."""
    return spd_inverse_and_status(
        blocks, method=method, previous=previous, max_iters=max_iters, tol=tol
    )[0]


def spd_solve(
    blocks: ArrayLike,
    rhs: ArrayLike,
    *,
    method: str = "auto",
    previous: ArrayLike | None = None,
) -> jax.Array:
    """Solves ``G x = b`` per block.

    Args:
      blocks: (..., d, d) SPD stack (symmetric part used).
      rhs: (..., d) for one right-hand side per block, or (..., d, k) for k of them, with
        as many batch axes as the blocks (the rank tells the two forms apart); batch axes of
        size 1 broadcast, e.g. blocks (1, d, d) with rhs (5, d).
      method: one of ``rfim_jax.SOLVER_METHODS``.  ``"cholesky"``, ``"lapack"`` and ``"lapack_map"``
        factor and substitute; the others multiply by the inverse.
      previous: optional last inverses, used as for :func:`spd_inverse_and_status`.

    Returns:
      ``x`` shaped like ``rhs``.  A block that fails uses the fallback inverse of the module
      docstring (``previous``, else the inverse diagonal), so ``x`` stays finite when ``b`` is.
    """
    blocks = _as_blocks(blocks)
    rhs = jnp.asarray(rhs)
    d = blocks.shape[-1]
    if rhs.ndim == blocks.ndim - 1:
        vector = True
    elif rhs.ndim == blocks.ndim:
        vector = False
    else:
        raise ValueError(
            f"rhs must have shape (..., d) or (..., d, k) matching blocks {tuple(blocks.shape)}, "
            f"got {tuple(rhs.shape)}."
        )
    b = rhs[..., None] if vector else rhs
    if b.shape[-2] != d:
        raise ValueError(
            f"rhs has {b.shape[-2]} rows but the blocks are {d} x {d} (rhs shape "
            f"{tuple(rhs.shape)}, blocks shape {tuple(blocks.shape)})."
        )
    dtype = result_type(blocks.dtype, b.dtype)
    blocks, b = blocks.astype(dtype), b.astype(dtype)
    previous = _check_previous(previous, blocks)
    method = resolve_method(method)
    batch = jnp.broadcast_shapes(blocks.shape[:-2], b.shape[:-2])
    blocks = jnp.broadcast_to(blocks, batch + blocks.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    if previous is not None:
        previous = jnp.broadcast_to(previous, blocks.shape)
    if d == 0:  # 0 x 0 blocks: the solution has no entries
        return b[..., 0] if vector else b

    g, finite = _sanitise(blocks)
    if method == "cholesky":
        l, l_inv, ok = _cholesky(g)
        x = _cholesky_solve_padded(l, l_inv, _pad_rows(b, l.shape[-1]))[..., :d, :]
    elif method in ("lapack", "lapack_map"):
        x, ok = _lapack(g, b, mapped=method == "lapack_map")
    else:
        inv, ok = spd_inverse_and_status(g, method=method, previous=previous)
        x = _mm(inv, b)
    ok = ok & finite & jnp.all(jnp.isfinite(x), axis=(-2, -1))
    x = jnp.where(ok[..., None, None], x, _mm(_fallback(blocks, previous), b))
    return x[..., 0] if vector else x


def spd_max_eigenvalue(blocks: ArrayLike, num_iters: int = 30) -> jax.Array:
    """Largest eigenvalue per block by power iteration (matmul-only), shape ``(...)``.

    Returns the Rayleigh quotient ``v^T G v`` of the final iterate, a lower bound that
    converges like ``(lambda_2 / lambda_1)^(2 num_iters)``.  The start vector has unequal
    positive entries, so it is not orthogonal to the top eigenvector of the usual
    structured blocks (e.g. ``[[1, -1], [-1, 1]]``, where all-ones fails).  Each block is
    iterated divided by its largest entry and the result scaled back, so that the norms
    cannot overflow (an eigenvalue of 5e19 in float32 read 0 before).  For PSD blocks only:
    on an indefinite one it finds the eigenvalue of largest magnitude.  The metrics'
    ``max_eigenvalue()`` is exact (``eigvalsh``); this is the cheap bound that
    ``normalize_max_eigenvalue`` uses inside the optimiser's step.
    """
    blocks = _nonempty(_as_blocks(blocks), "spd_max_eigenvalue")
    d = blocks.shape[-1]
    scale = jnp.max(jnp.abs(blocks), axis=(-2, -1))
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    blocks = blocks / scale[..., None, None]
    v0 = 1.0 + jnp.arange(d, dtype=blocks.dtype) / d
    v0 = jnp.broadcast_to(v0 / jnp.linalg.norm(v0), blocks.shape[:-1])

    def body(_, v):
        w = jnp.einsum("...ij,...j->...i", blocks, v, precision=_HIGHEST)
        return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), jnp.finfo(w.dtype).tiny)

    v = lax.fori_loop(0, num_iters, body, v0)
    return scale * jnp.einsum("...i,...ij,...j->...", v, blocks, v, precision=_HIGHEST)
