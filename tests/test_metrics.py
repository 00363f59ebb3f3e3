"""Metric representations against numpy on hand-built dense matrices (SPEC Sec. 2 ordering).

One registry of makers (``_build``) gives every representation, exact, eigen and diagonal,
the same algebra contract: to_dense, matvec, solve, inverse, trace, diagonal, eigvalsh.

The reference dense matrix and the param-layout <-> neuron-major vector maps are written with
explicit Python loops over (neuron, coordinate), independently of the library's reshapes.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfim_jax
from rfim_jax import (
    BlockDiagonalMetric,
    DenseMetric,
    DiagonalMetric,
    EigenDiagonalMetric,
    SharedBlockMetric,
)
from rfim_jax._src import solvers
from rfim_jax._src.metrics import columns_to_params, params_to_columns

KINDS = ("shared", "blockdiag", "dense", "eigen", "diagonal")
# Per-neuron representations: relative damping is per neuron block.
PER_NEURON = ("blockdiag", "eigen", "diagonal")
# Data leaves of each representation (everything else is static).
NUM_LEAVES = {"shared": 1, "blockdiag": 1, "dense": 1, "eigen": 2, "diagonal": 1}
NAMES = {"shared": "SharedBlockMetric", "blockdiag": "BlockDiagonalMetric",
         "dense": "DenseMetric", "eigen": "EigenDiagonalMetric", "diagonal": "DiagonalMetric"}
# (num_neurons m, input width d_in, seed)
CASES = [(3, 2, 0), (3, 2, 1), (1, 4, 2)]


def _spd(rng, d, n=None):
    """A random SPD matrix with a dominant direction, like an RFIM block with an offset input."""
    n = n or 3 * d + 2
    x = rng.normal(size=(n, d)) + rng.normal(size=d)
    return x.T @ x / n + 0.05 * np.eye(d)


def _build(kind, m, d_in, has_bias, seed):
    """Returns (metric, reference dense matrix, list of the stored numpy blocks)."""
    rng = np.random.default_rng(seed)
    d = d_in + int(has_bias)
    dense = np.zeros((m * d, m * d))
    if kind == "shared":
        a = _spd(rng, d)
        for l in range(m):
            for i in range(d):
                for j in range(d):
                    dense[l * d + i, l * d + j] = a[i, j]
        return SharedBlockMetric(jnp.asarray(a), num_neurons=m, has_bias=has_bias), dense, [a]
    if kind == "blockdiag":
        blocks = [_spd(rng, d) for _ in range(m)]
        for l in range(m):
            for i in range(d):
                for j in range(d):
                    dense[l * d + i, l * d + j] = blocks[l][i, j]
        metric = BlockDiagonalMetric(jnp.asarray(np.stack(blocks)), has_bias=has_bias)
        return metric, dense, blocks
    if kind in ("eigen", "diagonal"):
        # Positive scales; for eigen an orthogonal basis from a fixed seed, so that metrics
        # built with different seeds share it (their sums are then representable).
        scales = rng.uniform(0.2, 3.0, size=(m, d))
        if kind == "eigen":
            u, _ = np.linalg.qr(np.random.default_rng(1234).normal(size=(d, d)))
            metric = EigenDiagonalMetric(jnp.asarray(u), jnp.asarray(scales), has_bias=has_bias)
        else:
            u = np.eye(d)
            metric = DiagonalMetric(jnp.asarray(scales), has_bias=has_bias)
        blocks = []
        for l in range(m):
            block = np.zeros((d, d))
            for j in range(d):
                block += scales[l, j] * np.outer(u[:, j], u[:, j])
            blocks.append(block)
            for i in range(d):
                for k in range(d):
                    dense[l * d + i, l * d + k] = block[i, k]
        return metric, dense, blocks
    dense = _spd(rng, m * d)
    return DenseMetric(jnp.asarray(dense), num_neurons=m, has_bias=has_bias), dense.copy(), [dense]


def _random_vector(rng, m, d_in, has_bias):
    v = {"kernel": jnp.asarray(rng.normal(size=(d_in, m)))}
    if has_bias:
        v["bias"] = jnp.asarray(rng.normal(size=(m,)))
    return v


def _to_theta(v, m, d_in, has_bias):
    """Neuron-major: theta[l*d + i] = kernel[i, l], theta[l*d + d_in] = bias[l]."""
    d = d_in + int(has_bias)
    theta = np.zeros(m * d)
    for l in range(m):
        for i in range(d_in):
            theta[l * d + i] = v["kernel"][i, l]
        if has_bias:
            theta[l * d + d_in] = v["bias"][l]
    return theta


def _assert_params_close(got, theta, m, d_in, has_bias, **tol):
    assert set(got) == ({"kernel", "bias"} if has_bias else {"kernel"})
    assert got["kernel"].shape == (d_in, m)
    if has_bias:
        assert got["bias"].shape == (m,)
    np.testing.assert_allclose(_to_theta(got, m, d_in, has_bias), theta, **tol)


def _damped_dense(kind, dense, blocks, m, d, damping, relative):
    if not relative:
        return dense + damping * np.eye(m * d)
    if kind == "shared":
        eps = np.full(m * d, damping * np.trace(blocks[0]) / d)
    elif kind in PER_NEURON:
        eps = np.repeat([damping * np.trace(b) / d for b in blocks], d)
    else:
        eps = np.full(m * d, damping * np.trace(dense) / (m * d))
    return dense + np.diag(eps)


params = pytest.mark.parametrize("kind", KINDS)
cases = pytest.mark.parametrize("m, d_in, seed", CASES)
biases = pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])


@params
@cases
@biases
def test_to_dense_and_properties(kind, m, d_in, seed, has_bias):
    metric, dense, blocks = _build(kind, m, d_in, has_bias, seed)
    d = d_in + int(has_bias)
    assert metric.num_neurons == m
    assert metric.block_size == d
    assert metric.dim == m * d
    assert metric.has_bias is has_bias
    if kind in ("eigen", "diagonal"):
        np.testing.assert_allclose(metric.to_dense(), dense, atol=1e-14)
    else:
        np.testing.assert_array_equal(metric.to_dense(), dense)
        np.testing.assert_array_equal(metric.stored_blocks(), np.stack(blocks))


# Compiled once per representation and shape, without XLA's backend optimisations, to keep
# the test fast; test_eager_methods_match_jitted covers the default path.
@functools.partial(
    jax.jit,
    compiler_options={"xla_backend_optimization_level": 0,
                      "xla_llvm_disable_expensive_passes": True},
)
def _all_ops(metric, v, damping, relative_damping):
    out = {
        "matvec": metric.matvec(v),
        "trace": metric.trace(),
        "diagonal": metric.diagonal(),
        "eigvalsh": metric.eigvalsh(),
        "max_eigenvalue": metric.max_eigenvalue(),
    }
    for relative, eps in [(False, damping), (True, relative_damping)]:
        out["relative" if relative else "absolute"] = {
            "damped": metric.damped(eps, relative=relative).to_dense(),
            "solve": metric.solve(v, eps, relative=relative),
            "inverse": metric.inverse(eps, relative=relative),
        }
    return out


@params
@cases
@biases
def test_linear_algebra_against_numpy(kind, m, d_in, seed, has_bias):
    metric, dense, blocks = _build(kind, m, d_in, has_bias, seed)
    d = d_in + int(has_bias)
    rng = np.random.default_rng(seed + 100)
    v = _random_vector(rng, m, d_in, has_bias)
    theta = _to_theta(v, m, d_in, has_bias)
    tol = dict(rtol=1e-9, atol=1e-11)

    # Absolute damping (0 and 0.3) and relative damping (0.05 and 2) of eq. (30).
    for damping, relative_damping in [(0.0, 0.05), (0.3, 2.0)]:
        got = _all_ops(metric, v, damping, relative_damping)
        _assert_params_close(got["matvec"], dense @ theta, m, d_in, has_bias, **tol)
        np.testing.assert_allclose(got["trace"], np.trace(dense), **tol)
        np.testing.assert_allclose(got["diagonal"], np.diag(dense), **tol)
        np.testing.assert_allclose(got["eigvalsh"], np.linalg.eigvalsh(dense), **tol)
        np.testing.assert_allclose(
            got["max_eigenvalue"], np.linalg.eigvalsh(dense)[-1], rtol=1e-6
        )
        for relative, eps in [(False, damping), (True, relative_damping)]:
            ref = _damped_dense(kind, dense, blocks, m, d, eps, relative)
            res = got["relative" if relative else "absolute"]
            np.testing.assert_allclose(res["damped"], ref, **tol)
            want = np.linalg.solve(ref, theta)
            _assert_params_close(res["solve"], want, m, d_in, has_bias, **tol)
            inverse = res["inverse"]
            assert type(inverse) is type(metric)
            np.testing.assert_allclose(inverse.to_dense(), np.linalg.inv(ref), rtol=1e-8,
                                       atol=1e-10)


def test_eager_methods_match_jitted():
    # The methods also work outside jit (the tests above run them compiled).
    metric, dense, _ = _build("blockdiag", 2, 2, True, 0)
    v = _random_vector(np.random.default_rng(0), 2, 2, True)
    theta = _to_theta(v, 2, 2, True)
    ref = dense + 0.1 * np.eye(6)
    _assert_params_close(metric.solve(v, 0.1), np.linalg.solve(ref, theta), 2, 2, True, rtol=1e-9)


@params
@cases
@biases
def test_arithmetic_matches_dense(kind, m, d_in, seed, has_bias):
    g, g_dense, _ = _build(kind, m, d_in, has_bias, seed)
    h, h_dense, _ = _build(kind, m, d_in, has_bias, seed + 7)
    a, b = 0.995, 0.005
    tol = dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose((a * g + b * h).to_dense(), a * g_dense + b * h_dense, **tol)
    np.testing.assert_allclose((g * a + h * b).to_dense(), a * g_dense + b * h_dense, **tol)
    np.testing.assert_allclose((g - h).to_dense(), g_dense - h_dense, **tol)
    np.testing.assert_allclose((g / 4.0).to_dense(), g_dense / 4.0, **tol)
    np.testing.assert_allclose((-g).to_dense(), -g_dense, **tol)
    assert type(a * g + b * h) is type(g)
    assert (g.astype(jnp.float32).to_dense()).dtype == jnp.float32


def test_arithmetic_across_representations_or_shapes_is_a_named_error():
    blocks, _, _ = _build("blockdiag", 2, 3, True, 0)
    shared, _, _ = _build("shared", 2, 3, True, 0)
    wider, _, _ = _build("blockdiag", 3, 3, True, 0)
    with pytest.raises(TypeError, match=r"BlockDiagonalMetric arithmetic needs another "
                                        r"BlockDiagonalMetric.*got SharedBlockMetric"):
        blocks + shared
    with pytest.raises(ValueError, match=r"needs equal shapes, got \[\(2, 4, 4\)\] and "
                                         r"\[\(3, 4, 4\)\]"):
        blocks - wider


@params
@biases
def test_pytree_jit_vmap_pass_through(kind, has_bias):
    m, d_in = 3, 2
    g, g_dense, _ = _build(kind, m, d_in, has_bias, 0)
    h, h_dense, _ = _build(kind, m, d_in, has_bias, 1)

    # tree.map maps every leaf: for eigen that would scale the basis too, so double S alone.
    doubled = jax.tree.map(lambda x: 2 * x, g) if kind != "eigen" else \
        g.replace(scales=jax.tree.map(lambda x: 2 * x, g.scales))
    assert type(doubled) is type(g) and doubled.has_bias is has_bias
    np.testing.assert_allclose(doubled.to_dense(), 2 * g_dense, rtol=1e-13, atol=1e-13)
    # Only the arrays are leaves; sizes and flags are static.
    assert len(jax.tree.leaves(g)) == NUM_LEAVES[kind]

    # Through jit as argument and as result.
    ema = jax.jit(lambda x, y: 0.9 * x + 0.1 * y)(g, h)
    assert type(ema) is type(g)
    np.testing.assert_allclose(ema.to_dense(), 0.9 * g_dense + 0.1 * h_dense, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda x: x.trace())(g), np.trace(g_dense), rtol=1e-12)

    # vmap over a stack of metrics.
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), g, h)
    dense = jax.vmap(lambda x: x.to_dense())(stacked)
    np.testing.assert_allclose(dense, np.stack([g_dense, h_dense]), atol=1e-13)
    traces = jax.vmap(lambda x: x.trace())(stacked)
    np.testing.assert_allclose(traces, [np.trace(g_dense), np.trace(h_dense)], rtol=1e-12)
    rng = np.random.default_rng(3)
    v = _random_vector(rng, m, d_in, has_bias)
    theta = _to_theta(v, m, d_in, has_bias)
    out = jax.jit(jax.vmap(lambda x: x.solve(v, 0.1)))(stacked)
    for i, ref in enumerate([g_dense, h_dense]):
        got = jax.tree.map(lambda a, i=i: a[i], out)
        want = np.linalg.solve(ref + 0.1 * np.eye(ref.shape[0]), theta)
        _assert_params_close(got, want, m, d_in, has_bias, rtol=1e-9, atol=1e-11)


def test_representations_have_distinct_tree_structures():
    # jax 0.10.2 compares register_dataclass treedefs without their class; equal static values
    # must still give unequal structures, or jit caches may hand back the wrong class.
    eye = jnp.eye(5)
    metrics = [SharedBlockMetric(eye, num_neurons=1), DenseMetric(eye, num_neurons=1),
               BlockDiagonalMetric(eye[None])]
    structures = [jax.tree.structure(m) for m in metrics]
    for i in range(3):
        for j in range(3):
            assert (structures[i] == structures[j]) == (i == j)
    same = jax.jit(lambda m, v: m)
    for shape in range(1, 8):
        for cls in (SharedBlockMetric, DenseMetric):
            assert type(same(cls(jnp.eye(shape), num_neurons=1), 1.0)) is cls


def test_columns_round_trip():
    rng = np.random.default_rng(0)
    v = _random_vector(rng, 3, 2, True)
    cols = params_to_columns(v, True)
    # Column l is neuron l's vector [kernel[:, l], bias[l]].
    for l in range(3):
        np.testing.assert_array_equal(cols[:, l], np.append(v["kernel"][:, l], v["bias"][l]))
    back = columns_to_params(cols, True)
    np.testing.assert_array_equal(back["kernel"], v["kernel"])
    np.testing.assert_array_equal(back["bias"], v["bias"])
    np.testing.assert_array_equal(params_to_columns({"kernel": v["kernel"]}, False), v["kernel"])


@params
def test_vector_errors(kind):
    m, d_in = 3, 2
    g, _, _ = _build(kind, m, d_in, True, 0)
    g_nb, _, _ = _build(kind, m, d_in, False, 0)
    rng = np.random.default_rng(0)
    good = _random_vector(rng, m, d_in, True)
    name = NAMES[kind]
    for op in ("matvec", "solve"):
        call = getattr(g, op)
        wide = _random_vector(rng, m + 1, d_in, True)
        with pytest.raises(
            ValueError,
            match=rf"{name}\.{op}: vector has augmented shape \(3, 4\) \(d, m\), expected "
            rf"\(3, 3\)\.",
        ):
            call(wide)
        tall = _random_vector(rng, m, d_in + 2, True)
        with pytest.raises(ValueError, match=r"augmented shape \(5, 3\) \(d, m\), expected"):
            call(tall)
        with pytest.raises(
            ValueError, match=r"bias must have shape \(3,\) to match kernel \(2, 3\), got \(4,\)"
        ):
            call({"kernel": good["kernel"], "bias": jnp.zeros(4)})
        with pytest.raises(ValueError, match=r"built with a bias, but the vector lacks one"):
            call({"kernel": good["kernel"]})
        with pytest.raises(ValueError, match=r"built without a bias, but the vector has one"):
            getattr(g_nb, op)(good)
        with pytest.raises(ValueError, match=r"expected a dict with a 'kernel' entry, got keys"):
            call({"bias": good["bias"]})
        with pytest.raises(ValueError, match=r"kernel must be 2-D \(d_in, m\), got shape \(6,\)"):
            call({"kernel": jnp.zeros(6), "bias": good["bias"]})


def test_eigen_sum_of_different_bases_is_refused():
    g, _, _ = _build("eigen", 2, 2, True, 0)
    other = g.replace(basis=jnp.eye(3))
    with pytest.raises(ValueError, match="different bases"):
        _ = g + other
    with pytest.raises(TypeError, match="same layer"):
        _ = g + g.replace(has_bias=False)
    # Under jit the bases are compared when the program runs: the same basis gives the exact
    # sum, different ones NaN scales (it silently gave a wrong metric: 0.11 off in max entry).
    np.testing.assert_allclose(jax.jit(lambda a, b: a + b)(g, g).scales, 2 * g.scales)
    mixed = jax.jit(lambda a, b: 0.9 * a - 0.1 * b)(g, other)
    assert np.all(np.isnan(np.asarray(mixed.scales)))
    assert np.all(np.isfinite(np.asarray(jax.jit(lambda a, b: a - b)(g, g).scales)))


def test_distinct_tree_structures_across_all_representations():
    d = 3
    metrics = [SharedBlockMetric(jnp.eye(d), num_neurons=1), DenseMetric(jnp.eye(d), num_neurons=1),
               BlockDiagonalMetric(jnp.eye(d)[None]), DiagonalMetric(jnp.ones((1, d))),
               EigenDiagonalMetric(jnp.eye(d), jnp.ones((1, d)))]
    structures = [jax.tree.structure(m) for m in metrics]
    for i, a in enumerate(structures):
        for j, b in enumerate(structures):
            assert (a == b) == (i == j)


# ---------------------------------------------------------------- edge cases of the algebra


@pytest.mark.parametrize("kind", PER_NEURON)
def test_damping_per_neuron_against_numpy(kind):
    """An (m,) damping is one value per neuron in every per-neuron representation; eigen and
    diagonal added it per coordinate (wrong when m == d) or raised a raw broadcasting error."""
    for m, d_in in ((3, 2), (4, 3)):  # m == d (bias) and m != d
        metric, dense, _ = _build(kind, m, d_in, True, 0)
        d = d_in + 1
        rng = np.random.default_rng(1)
        v = _random_vector(rng, m, d_in, True)
        damping = rng.uniform(0.1, 5.0, size=m)
        ref = dense + np.diag(np.repeat(damping, d))
        got = metric.solve(v, jnp.asarray(damping))
        _assert_params_close(got, np.linalg.solve(ref, _to_theta(v, m, d_in, True)), m, d_in,
                             True, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(metric.inverse(jnp.asarray(damping)).to_dense(),
                                   np.linalg.inv(ref), rtol=1e-8, atol=1e-10)
        with pytest.raises(ValueError, match=r"damping"):
            metric.solve(v, jnp.ones(m + 1))


@pytest.mark.parametrize("kind", ["shared", "dense"])
def test_one_block_metrics_refuse_per_neuron_damping_by_name(kind):
    metric, _, _ = _build(kind, 3, 2, True, 0)
    v = _random_vector(np.random.default_rng(0), 3, 2, True)
    with pytest.raises(ValueError, match=r"damping has shape \(3,\).*batch shape \(\).*scalar"):
        metric.solve(v, jnp.ones(3))


@pytest.mark.parametrize("rep", ["exact", "eigen", "diagonal"])
def test_a_dead_neuron_solves_to_the_identity_in_every_representation(rep):
    """A hard-ReLU neuron that never fires has a zero block: exact fell back to the identity,
    eigen and diagonal gave inf and NaN (relative damping adds nothing to a zero block)."""
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (6, 3)))
    params = {"kernel": jnp.array([[1.0, -1.0]] * 3), "bias": jnp.array([0.1, -0.1])}
    v = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    metric = rfim_jax.nonlinear_rfim(params, x, rfim_jax.ReLU(omega=0.0), representation=rep)
    got = metric.solve(v, 1e-2, relative=True)
    np.testing.assert_allclose(got["kernel"][:, 1], 1.0, rtol=1e-5)  # neuron 1: identity
    np.testing.assert_allclose(got["bias"][1], 1.0, rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(metric.inverse(1e-2, relative=True).to_dense())))


@pytest.mark.parametrize("rep", ["eigen", "diagonal"])
def test_closed_form_solves_check_the_method_name(rep):
    metric = rfim_jax.nonlinear_rfim({"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
                                     jnp.ones((4, 3)), "tanh", representation=rep)
    v = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    for call in (lambda: metric.solve(v, 0.1, method="bogus"),
                 lambda: metric.inverse(0.1, method="bogus")):
        with pytest.raises(ValueError, match=r"Unknown solver method 'bogus'"):
            call()


def test_max_eigenvalue_is_exact_in_every_representation():
    """Power iteration read 10% low on an ordinary 21-dimensional linear RFIM, and 0 for an
    eigenvalue above ~1.8e19 in float32 (its norms overflowed)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(k1, (200, 20)) * jnp.linspace(0.5, 1.5, 20)
    params = {"kernel": jax.random.normal(k2, (20, 10)) * 0.1, "bias": jnp.zeros(10)}
    for metric in (rfim_jax.linear_rfim(params, x),
                   rfim_jax.linear_rfim(params, x, representation="eigen"),
                   rfim_jax.nonlinear_rfim(params, x, "tanh"),
                   rfim_jax.softmax_rfim(params, x)):
        want = np.linalg.eigvalsh(np.asarray(metric.to_dense(), np.float64))[-1]
        np.testing.assert_allclose(metric.max_eigenvalue(), want, rtol=1e-6)
    big = rfim_jax.linear_rfim({"kernel": jnp.ones((2, 1), jnp.float32)},
                               jnp.full((3, 2), 5e9, jnp.float32))
    np.testing.assert_allclose(big.max_eigenvalue(), 5e19, rtol=1e-5)
    np.testing.assert_allclose(
        solvers.spd_max_eigenvalue(jnp.diag(jnp.array([1e19, 1.0], jnp.float32))),
        1e19, rtol=1e-5)


def test_metric_products_sums_and_softmax_names():
    """metric * metric raised a raw AttributeError, sum([g, h]) a TypeError (no __radd__),
    and two_layer_rfim refused 'Softmax' where every kind name is case-insensitive."""
    g, dense, _ = _build("blockdiag", 3, 2, True, 0)
    h, dense_h, _ = _build("blockdiag", 3, 2, True, 1)
    with pytest.raises(TypeError, match=r"BlockDiagonalMetric \* takes a scalar, got "
                                        r"BlockDiagonalMetric"):
        g * h  # noqa: B018
    with pytest.raises(TypeError, match=r"takes a scalar, got an array of shape \(3,\)"):
        g / jnp.ones(3)  # noqa: B018
    np.testing.assert_allclose(sum([g, h]).to_dense(), dense + dense_h, rtol=1e-12)
    np.testing.assert_allclose((2.0 * g).to_dense(), 2 * dense, rtol=1e-12)
    rng = np.random.default_rng(0)
    p1 = {"kernel": jnp.asarray(rng.normal(size=(3, 4))), "bias": jnp.zeros(4)}
    p2 = {"kernel": jnp.asarray(rng.normal(size=(4, 5))), "bias": jnp.zeros(5)}
    x = jnp.asarray(rng.normal(size=(7, 3)))
    want = rfim_jax.two_layer_rfim(p1, p2, x, "tanh", output_activation="softmax").to_dense()
    got = rfim_jax.two_layer_rfim(p1, p2, x, "tanh", output_activation="Softmax").to_dense()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_condition_number_of_a_non_finite_matrix_is_nan():
    bad = np.full((3, 3), np.nan)
    for nonzero_only in (True, False):
        assert np.isnan(float(rfim_jax.condition_number(bad, nonzero_only=nonzero_only)))
    np.testing.assert_allclose(
        rfim_jax.condition_number(np.diag([4.0, 2.0, 1.0]), nonzero_only=False), 4.0)


@pytest.mark.parametrize("rep", ["exact", "eigen", "diagonal"])
def test_every_metric_names_its_representation(rep):
    """SPEC §7: every layer metric has a ``representation``; it is the constructors' argument,
    for every kind, and survives jit (a class attribute, not a traced field)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 3)))
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 4))), "bias": jnp.zeros(4)}
    built = [rfim_jax.nonlinear_rfim(params, x, "tanh", representation=rep),
             rfim_jax.linear_rfim(params, x, representation=rep),
             rfim_jax.softmax_rfim(params, x, representation=rep)]
    for metric in built:
        assert metric.representation == rep, type(metric).__name__
        assert jax.jit(lambda g: g)(metric).representation == rep
        assert "representation" not in [f.name for f in dataclasses.fields(metric)]
