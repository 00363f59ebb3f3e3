"""Tests of the batched SPD block solvers, against numpy.linalg and direct formulas."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfim_jax._src import solvers

METHODS = ("gauss_jordan", "cholesky", "newton_schulz", "lapack", "lapack_map", "auto")
PURE_METHODS = ("gauss_jordan", "cholesky", "newton_schulz")

_inverse = jax.jit(solvers.spd_inverse_and_status, static_argnames=("method",))
_solve = jax.jit(solvers.spd_solve, static_argnames=("method",))
_ns = jax.jit(solvers.newton_schulz_inverse)


def random_spd(rng, batch, d, conds, dtype):
    """Q diag(lam) Q^T per block, lam log-spaced from s to s/cond, random orthogonal Q and scale.

    ``conds`` broadcasts against ``batch``: each block gets its own condition number.
    """
    conds = np.broadcast_to(np.asarray(conds, np.float64), batch)
    out = np.empty(batch + (d, d))
    for idx in np.ndindex(*batch):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        lam = np.logspace(0.0, -np.log10(conds[idx]), d) * 10.0 ** rng.uniform(-2, 2)
        out[idx] = (q * lam) @ q.T
    out = 0.5 * (out + np.swapaxes(out, -1, -2))
    return out.astype(dtype), np.linalg.cond(out.astype(dtype).astype(np.float64))


def rel_err(x, ref):
    """Per-block ||x - ref||_F / ||ref||_F."""
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))


def error_bound(cond, d, dtype):
    """Forward error of a stable inversion, c d cond eps, with a generous c = 10."""
    return 10.0 * d * cond * np.finfo(dtype).eps


# (dtype, batch shape, d): every stack mixes well- and ill-conditioned blocks (cond from 1 to
# COND_MAX); d = 37 takes two padded panels in the blocked loops, d = 1 is the scalar edge.
CASES = [(np.float32, (6,), 7), (np.float64, (2, 3), 37), (np.float32, (), 1)]
COND_MAX = {np.float32: 1e3, np.float64: 1e7}


# The LAPACK methods are thin wrappers of jnp.linalg: one case each is enough.
INVERSE_PARAMS = [(m, *c) for m in PURE_METHODS for c in CASES] + [
    (m, *CASES[0]) for m in ("lapack", "lapack_map")
]


@pytest.mark.parametrize(
    "method,dtype,batch,d", INVERSE_PARAMS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_inverse_matches_numpy(method, dtype, batch, d, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(batch))
    conds = np.logspace(0, np.log10(COND_MAX[dtype]), n).reshape(batch)
    g, cond = random_spd(rng, batch, d, conds, dtype)
    inv, ok = _inverse(g, method=method)
    assert inv.dtype == dtype and inv.shape == g.shape and ok.shape == batch
    assert np.all(np.asarray(ok))
    ref = np.linalg.inv(g.astype(np.float64))
    assert np.all(rel_err(inv, ref) <= error_bound(cond, d, dtype))
    np.testing.assert_array_equal(np.asarray(inv), np.swapaxes(np.asarray(inv), -1, -2))


# The documented choice of "auto" per backend (module docstring of rfim_jax._src.solvers).
DOCUMENTED_AUTO = {"cpu": "gauss_jordan", "gpu": "lapack", "tpu": "gauss_jordan"}


@functools.partial(jax.jit, static_argnames=("method",))
def _auto_and_explicit(g, method):
    return solvers.spd_inverse(g), solvers.spd_inverse(g, method=method)


def test_auto_is_the_backend_default():
    """On whatever backend runs the test, "auto" is bit for bit the documented method."""
    backend = jax.default_backend()
    method = DOCUMENTED_AUTO.get(backend, "gauss_jordan")
    assert solvers.resolve_method("auto") == method
    g, _ = random_spd(np.random.default_rng(0), (3,), 7, 100.0, np.float32)
    auto, explicit = _auto_and_explicit(g, method)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(explicit))
    assert np.all(rel_err(auto, np.linalg.inv(g.astype(np.float64))) <= 1e-4)


@functools.partial(jax.jit, static_argnames=("method",))
def _three_solves(g, b_vec, b_mat, b_shared, method):
    return (
        solvers.spd_solve(g, b_vec, method=method),  # (m, d): one rhs per block
        solvers.spd_solve(g, b_mat, method=method),  # (m, d, k): k per block
        solvers.spd_solve(g[1], b_shared, method=method),  # (d, d) x (d, m): a shared block
    )


@pytest.mark.parametrize("method", METHODS[:-1])
def test_solve_matches_numpy(method, seed):
    # float64, so that the bound is tight enough to catch a wrong substitution order
    dtype = np.float64
    rng = np.random.default_rng(seed)
    g, cond = random_spd(rng, (4,), 9, np.array([1.0, 10.0, 100.0, 1000.0]), dtype)
    ref_inv = np.linalg.inv(g.astype(np.float64))
    bound = error_bound(cond, 9, dtype)
    b_vec = rng.standard_normal((4, 9)).astype(dtype)
    b_mat = rng.standard_normal((4, 9, 3)).astype(dtype)
    b_shared = rng.standard_normal((9, 5)).astype(dtype)
    x_vec, x_mat, x_shared = _three_solves(g, b_vec, b_mat, b_shared, method=method)

    assert x_vec.shape == b_vec.shape and x_vec.dtype == dtype
    ref = np.einsum("bij,bj->bi", ref_inv, b_vec)
    err = np.linalg.norm(np.asarray(x_vec, np.float64) - ref, axis=-1)
    assert np.all(err <= bound * np.linalg.norm(ref, axis=-1))
    assert x_mat.shape == b_mat.shape
    assert np.all(rel_err(x_mat, ref_inv @ b_mat) <= bound)
    assert x_shared.shape == (9, 5)
    assert rel_err(x_shared, ref_inv[1] @ b_shared) <= bound[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_add_damping_against_direct_formula(dtype, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((3, 4, 5, 5)).astype(dtype)
    damping = np.asarray(rng.uniform(0.01, 1.0, (3, 4)), dtype)
    absolute = np.asarray(solvers.add_damping(g, damping))
    relative = np.asarray(solvers.add_damping(g, damping, relative=True))
    scalar_rel = np.asarray(solvers.add_damping(g, 0.1, relative=True))
    for i, j in np.ndindex(3, 4):
        block = g[i, j].astype(np.float64)
        eps_rel = damping[i, j] * sum(block[k, k] for k in range(5)) / 5
        tol = dict(rtol=10 * np.finfo(dtype).eps, atol=10 * np.finfo(dtype).eps)
        np.testing.assert_allclose(absolute[i, j], block + damping[i, j] * np.eye(5), **tol)
        np.testing.assert_allclose(relative[i, j], block + eps_rel * np.eye(5), **tol)
        eps_s = 0.1 * np.trace(block) / 5
        np.testing.assert_allclose(scalar_rel[i, j], block + eps_s * np.eye(5), **tol)
    assert absolute.dtype == dtype and relative.dtype == dtype


def _bad_stack(dtype):
    """Blocks 0 and 7 are SPD; 1-6 are not invertible or not finite (see names)."""
    rng = np.random.default_rng(0)
    d = 6
    good, _ = random_spd(rng, (2,), d, 10.0, np.float64)
    blocks = np.stack([good[0]] * 8)
    blocks[1] = 0.0  # zero block
    blocks[2, 1, 3] = blocks[2, 3, 1] = np.nan  # NaN entry
    blocks[3, 0, 0] = np.inf  # Inf on the diagonal
    blocks[4, 2, :] = blocks[4, :, 2] = 0.0  # dead coordinate: zero row and column
    blocks[5] = -good[0]  # negative definite
    x = np.ones(d)
    y = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    blocks[6] = np.outer(x, x) + np.outer(y, y)  # rank 2, positive diagonal, exact in floats
    blocks[7] = good[1]
    names = ["good", "zero", "nan", "inf", "dead", "negdef", "rank2", "good"]
    return blocks.astype(dtype), names


def _expected_fallback(blocks, previous):
    """previous if finite, else diag(1/G_kk) with 1 for non-positive/non-finite G_kk."""
    out = []
    for b, p in zip(blocks.astype(np.float64), previous, strict=True):
        if p is not None and np.all(np.isfinite(p)):
            out.append(p)
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            dg = np.diag(0.5 * (b + b.T))
            inv = np.where((dg > 0) & np.isfinite(dg) & np.isfinite(1.0 / dg), 1.0 / dg, 1.0)
        out.append(np.diag(inv))
    return np.stack(out)


@functools.partial(jax.jit, static_argnames=("method",))
def _inverse_and_solve(g, b, previous, method):
    """(inverse, ok, solve) without and with ``previous``, in one program."""
    out = []
    for prev in (None, previous):
        inv, ok = solvers.spd_inverse_and_status(g, method=method, previous=prev)
        out.append((inv, ok, solvers.spd_solve(g, b, method=method, previous=prev)))
    return out


@pytest.mark.parametrize("method", METHODS[:-1])
def test_bad_blocks_fall_back_and_stay_finite(method):
    dtype = np.float32  # the dtype where overflow and rounding bite first
    blocks, names = _bad_stack(dtype)
    expect_ok = np.array([n == "good" for n in names])
    bad = [i for i, good in enumerate(expect_ok) if not good]
    rng = np.random.default_rng(1)
    prev_np, _ = random_spd(rng, (len(names),), 6, 5.0, np.float64)
    prev_np[2] = np.nan  # a non-finite previous is skipped too
    previous = prev_np.astype(dtype)
    b = np.ones((len(names), 6), dtype)
    ref = np.linalg.inv(blocks[expect_ok].astype(np.float64))
    tol = 4 * np.finfo(dtype).eps

    results = _inverse_and_solve(blocks, b, previous, method=method)
    for prev_list, (inv, ok, x) in zip(
        ([None] * len(names), list(previous.astype(np.float64))), results, strict=True
    ):
        inv, ok, x = np.asarray(inv), np.asarray(ok), np.asarray(x)
        assert np.all(np.isfinite(inv)) and np.all(np.isfinite(x))
        np.testing.assert_array_equal(ok, expect_ok, err_msg=str(names))
        assert np.all(rel_err(inv[expect_ok], ref) <= error_bound(100.0, 6, dtype))
        fallback = _expected_fallback(blocks[bad], [prev_list[i] for i in bad])
        np.testing.assert_allclose(inv[bad], fallback, rtol=tol)
        np.testing.assert_allclose(x[bad], fallback @ np.ones(6), rtol=6 * tol)
        np.testing.assert_allclose(
            x[expect_ok], np.einsum("bij,bj->bi", ref, b[expect_ok]), rtol=1e-4
        )


@pytest.mark.parametrize("d", [300, 520])  # one split in two; two levels of splits
def test_gauss_jordan_above_the_split_size_matches_numpy_and_flags_singular_blocks(d):
    # Blocks above 256 are inverted through the Schur complement of their first half.  A
    # singular direction inside either half must fail the pivot test as the sweep's would.
    dtype = np.float32
    rng = np.random.default_rng(d)
    good, cond = random_spd(rng, (2,), d, np.array([1.0, 1e3]), dtype)
    singular = []
    for dead in (3, d - 5):  # a zero row and column in the first half, then the second
        g = good[0].copy()
        g[dead, :] = 0.0
        g[:, dead] = 0.0
        singular.append(g)
    blocks = np.stack([*good, *singular])
    inv, ok = _inverse(blocks, method="gauss_jordan")
    inv, ok = np.asarray(inv), np.asarray(ok)
    np.testing.assert_array_equal(ok, [True, True, False, False])
    ref = np.linalg.inv(good.astype(np.float64))
    assert np.all(rel_err(inv[:2], ref) <= error_bound(cond, d, dtype)), rel_err(inv[:2], ref)
    np.testing.assert_array_equal(inv, np.swapaxes(inv, -1, -2))
    assert np.all(np.isfinite(inv))
    # The singular blocks get the documented fallback (no previous): diag(1 / G_kk).
    np.testing.assert_allclose(inv[2:], _expected_fallback(blocks[2:], [None] * 2),
                               rtol=4 * np.finfo(dtype).eps)


@jax.jit
def _ns_cases(g, previous):
    return (
        solvers.newton_schulz_inverse(g),
        solvers.newton_schulz_inverse(g, previous),
        solvers.newton_schulz_inverse(g, -previous),
        solvers.spd_inverse_and_status(g, method="newton_schulz", previous=previous),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_newton_schulz_warm_start_converges_faster(dtype, seed):
    rng = np.random.default_rng(seed)
    g, cond = random_spd(rng, (5,), 12, 20.0, np.float64)
    # one EMA step (weight 0.005) towards a rank-3 PSD matrix of the block's own scale
    e = rng.standard_normal((5, 12, 3))
    s = e @ np.swapaxes(e, -1, -2)
    s *= (np.linalg.norm(g, axis=(-2, -1)) / np.linalg.norm(s, axis=(-2, -1)))[:, None, None]
    previous = np.linalg.inv(0.995 * g + 0.005 * s).astype(dtype)
    g = g.astype(dtype)
    ref = np.linalg.inv(g.astype(np.float64))
    bound = error_bound(cond, 12, dtype)
    (x_cold, cold), (x_warm, warm), (x_bad, bad), (inv, ok) = _ns_cases(g, previous)

    assert not np.any(np.asarray(cold.warm)) and np.all(np.asarray(warm.warm))
    assert int(warm.num_iters) < int(cold.num_iters)
    assert int(warm.num_iters) <= 5
    for x, info in ((x_cold, cold), (x_warm, warm)):
        assert np.all(rel_err(x, ref) <= bound)
        # the reported residual is the true one (recomputed in float64)
        x64 = np.asarray(x, np.float64)
        resid = np.linalg.norm(np.eye(12) - g.astype(np.float64) @ x64, axis=(-2, -1))
        assert np.all(resid <= 100 * np.finfo(dtype).eps + 2 * np.asarray(info.residual))
    # A useless warm start (an indefinite matrix) is detected and the block is redone cold.
    assert not np.any(np.asarray(bad.warm))
    assert np.all(rel_err(x_bad, ref) <= bound)
    assert np.all(np.asarray(ok))
    assert np.all(rel_err(inv, ref) <= bound)


@functools.partial(jax.jit, static_argnames=("method",))
def _vmapped(g, b, method):
    one = functools.partial(solvers.spd_inverse_and_status, method=method)
    solve = functools.partial(solvers.spd_solve, method=method)
    return jax.vmap(one)(g), jax.vmap(solve)(g, b)


@pytest.mark.parametrize("method", PURE_METHODS)
def test_vmap_over_a_batch_axis(method):
    rng = np.random.default_rng(3)
    g, cond = random_spd(rng, (3, 4), 8, 30.0, np.float32)
    b = rng.standard_normal((3, 4, 8)).astype(np.float32)
    (inv, ok), x = _vmapped(g, b, method=method)
    assert inv.dtype == np.float32 and ok.dtype == np.bool_ and ok.shape == (3, 4)
    assert np.all(np.asarray(ok))
    ref = np.linalg.inv(g.astype(np.float64))
    assert np.all(rel_err(inv, ref) <= error_bound(cond, 8, np.float32))
    np.testing.assert_allclose(np.asarray(x), np.einsum("abij,abj->abi", ref, b), rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


# "auto" is pure XLA only where the documented choice for this backend is (cpu, tpu); on a
# GPU it is cuSOLVER by design, so the expectation follows the backend.
_AUTO_IS_PURE = DOCUMENTED_AUTO.get(jax.default_backend(), "gauss_jordan") in PURE_METHODS


@pytest.mark.parametrize("method", PURE_METHODS + (("auto",) if _AUTO_IS_PURE else ()))
def test_pure_methods_never_call_lapack_on_cpu(method):
    """The compiled program of a pure method has no LAPACK (or any other) custom call."""
    g = jnp.broadcast_to(jnp.eye(5, dtype=jnp.float32), (3, 5, 5))
    ok_text = jax.jit(lambda b: solvers.spd_inverse(b, method="lapack")).lower(g).as_text()
    assert "custom_call" in ok_text  # the check can see a LAPACK call
    for fn in (
        lambda b: solvers.spd_inverse(b, method=method, previous=b),
        lambda b: solvers.spd_solve(b, b[..., 0], method=method),
    ):
        text = jax.jit(fn).lower(g).as_text()
        assert "custom_call" not in text and "lapack" not in text.lower()


def test_auto_choice_per_backend():
    """Each backend's "auto" is the documented method, written out here, not read from the
    table under test; the CPU choice never reaches LAPACK (the deadlock of SPEC §4)."""
    for backend, method in DOCUMENTED_AUTO.items():
        assert solvers.resolve_method("auto", backend) == method
    assert solvers.resolve_method("auto", "something_new") == "gauss_jordan"
    for method in solvers.METHODS[1:]:  # explicit methods are kept on every backend
        assert solvers.resolve_method(method, "cpu") == method
        assert solvers.resolve_method(method, "gpu") == method
    with pytest.raises(ValueError, match=r"Unknown solver method 'qr'"):
        solvers.resolve_method("qr", "cpu")
    # The CPU choice compiles to matmul-only XLA: no LAPACK custom call.
    g = jnp.eye(5)[None] * 2.0
    text = jax.jit(lambda b: solvers.spd_inverse(b, method=DOCUMENTED_AUTO["cpu"])).lower(g)
    assert "lapack" not in text.as_text().lower()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_max_eigenvalue_against_numpy(dtype, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((4, 10, 10))
    g = g @ np.swapaxes(g, -1, -2)
    # force a spectral gap so that 100 power steps converge to rounding level
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    g[0] = (q * np.r_[5.0, np.linspace(1.0, 2.0, 9)]) @ q.T
    g = g.astype(dtype)
    ref = np.linalg.eigvalsh(g.astype(np.float64))[..., -1]
    lam = np.asarray(solvers.spd_max_eigenvalue(g, num_iters=300))
    np.testing.assert_allclose(lam, ref, rtol=1e-4 if dtype == np.float32 else 1e-9)
    assert lam.shape == (4,) and lam.dtype == dtype
    # all-ones is orthogonal to the top eigenvector here; the start vector must not be
    np.testing.assert_allclose(
        solvers.spd_max_eigenvalue(np.array([[1.0, -1.0], [-1.0, 1.0]], dtype)), 2.0, rtol=1e-5
    )


def test_low_precision_blocks_are_inverted_in_float32():
    g = jnp.asarray([[4.0, 1.0], [1.0, 2.0]], jnp.bfloat16)
    inv = solvers.spd_inverse(g, method="gauss_jordan")
    assert inv.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(inv), np.linalg.inv([[4.0, 1.0], [1.0, 2.0]]),
                               rtol=1e-6)
    assert solvers.add_damping(g, 0.5).dtype == jnp.bfloat16  # damping keeps the dtype


def test_errors_name_the_problem():
    g = np.eye(3)[None]
    with pytest.raises(ValueError, match="Unknown solver method 'qr'"):
        solvers.spd_inverse(g, method="qr")
    with pytest.raises(ValueError, match=r"square matrices \(\.\.\., d, d\), got shape \(2, 3\)"):
        solvers.spd_inverse(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"previous must have the blocks' shape \(1, 3, 3\)"):
        solvers.spd_inverse(g, previous=np.eye(3))
    with pytest.raises(ValueError, match=r"rhs has 4 rows but the blocks are 3 x 3"):
        solvers.spd_solve(g, np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"rhs must have shape \(\.\.\., d\) or \(\.\.\., d, k\)"):
        solvers.spd_solve(g, np.ones(3))


_SOAK = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from rfim_jax._src import solvers

    def fresh(key, m, d):
        x = jax.random.normal(key, (m, 2 * d, d))
        return solvers.add_damping(jnp.einsum("mni,mnj->mij", x, x) / (2 * d), 1e-2,
                                   relative=True)

    @jax.jit
    def soak(key):
        def body(_, carry):
            g1, g2, i1, i2, key = carry
            key, k1, k2 = jax.random.split(key, 3)
            g1 = 0.9 * g1 + 0.1 * fresh(k1, 16, 17)   # a nonlinear layer's block stack
            g2 = 0.9 * g2 + 0.1 * fresh(k2, 1, 9)     # another layer's block
            i1 = solvers.spd_inverse(g1, previous=i1)  # default method
            i2 = solvers.spd_inverse(g2, previous=i2)
            return g1, g2, i1, i2, key
        e1 = jnp.broadcast_to(jnp.eye(17), (16, 17, 17))
        e2 = jnp.eye(9)[None]
        return jax.lax.fori_loop(0, 1000, body, (e1, e2, e1, e2, key))

    g1, g2, i1, i2, _ = jax.block_until_ready(soak(jax.random.PRNGKey(0)))
    err = float(jnp.max(jnp.abs(g1 @ i1 - jnp.eye(17))))
    assert bool(jnp.all(jnp.isfinite(i1))) and bool(jnp.all(jnp.isfinite(i2))), "not finite"
    assert err < 1e-3, err
    print("SOAK-OK", err)
    """
)


def test_soak_default_method_does_not_deadlock(child_env):
    """1000 refreshes of a block stack plus another block in ONE jitted loop (the pattern that
    deadlocks batched LAPACK on a 2-core CPU); a hang fails here after the timeout."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SOAK], env=child_env(), capture_output=True, text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("1000 jitted refreshes with the default solver did not finish in 120 s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SOAK-OK" in proc.stdout


@pytest.mark.parametrize("method", METHODS)
def test_the_fallback_treats_an_infinite_diagonal_entry_as_unusable(method):
    """1 / inf = 0 passed the finiteness check: the fallback froze that coordinate (0 where the
    docs promise 1), and an all-inf block fell back to the zero matrix, not the identity."""
    blocks = jnp.stack([jnp.diag(jnp.array([jnp.inf, 2.0, 4.0])), jnp.full((3, 3), jnp.inf)])
    inv, ok = solvers.spd_inverse_and_status(blocks, method=method)
    assert not np.asarray(ok).any()
    np.testing.assert_array_equal(np.asarray(inv[0]), np.diag([1.0, 0.5, 0.25]))
    np.testing.assert_array_equal(np.asarray(inv[1]), np.eye(3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 0, 0), (0, 0)])
def test_zero_by_zero_blocks_are_their_own_inverse(method, shape):
    """A layer block of size 0 (nothing to precondition) inverts and solves to empty arrays,
    flagged ok, where the pure methods divided by zero or indexed out of bounds."""
    blocks = jnp.zeros(shape)
    inv, ok = solvers.spd_inverse_and_status(blocks, method=method)
    assert inv.shape == shape and ok.shape == shape[:-2] and bool(jnp.all(ok))
    x = solvers.spd_solve(blocks, jnp.zeros(shape[:-1]), method=method)
    assert x.shape == shape[:-1]
    x = solvers.spd_solve(blocks, jnp.zeros(shape[:-1] + (2,)), method=method)
    assert x.shape == shape[:-1] + (2,)


def test_empty_blocks_and_numpy_scalar_dampings_get_clear_errors():
    for fn, name in ((solvers.newton_schulz_inverse, "newton_schulz_inverse"),
                     (solvers.spd_max_eigenvalue, "spd_max_eigenvalue")):
        with pytest.raises(ValueError, match=rf"{name}: expected \(\.\.\., d, d\) blocks "
                                             rf"with d >= 1, got shape \(2, 0, 0\)"):
            fn(np.ones((2, 0, 0)))
    assert solvers.spd_inverse(np.ones((2, 0, 0))).shape == (2, 0, 0)
    for damping in (np.float32(-1.0), jnp.float32(-1.0), float("nan")):
        with pytest.raises(ValueError, match=r"damping must be >= 0"):
            solvers.add_damping(jnp.eye(2)[None], damping)
