"""The reference full-network FIM (eq. 5) against its definition, and the Sec. 4 claims.

The definition is computed here independently: the log-likelihood of each response model is
written out, differentiated with ``jax.grad`` with respect to a flat parameter vector that is
built with explicit loops in the documented ordering (dense layers neuron-major, then the other
leaves), and the expectation over y is exact (a sum over the outcomes, or Gauss-Hermite
quadrature for the Gaussian, whose score is affine in y).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfim_jax
from rfim_jax import ReLU, Sigmoid, Tanh, linear_rfim, nonlinear_rfim, softmax_rfim, two_layer_rfim
from rfim_jax._src.fisher import (
    FullFisher,
    condition_number,
    fim_rank,
    full_fisher,
    ravel_neuron_major,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = dict(rtol=1e-10, atol=1e-12)


def _dense(rng, d_in, m, bias=True, scale=1.5):
    p = {"kernel": jnp.asarray(rng.normal(size=(d_in, m)) * scale / np.sqrt(d_in))}
    if bias:
        p["bias"] = jnp.asarray(rng.normal(size=(m,)) * 0.5)
    return p


def _mlp_params(seed, d_in, h, k, bias_out=True):
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": _dense(rng, d_in, h),
        "Dense_1": _dense(rng, h, k, bias_out),
        # A non-dense leaf: it sorts after the dense layers here, but see test_ordering.
        "LayerNorm_0": {"scale": jnp.asarray(1.0 + 0.3 * rng.normal(size=(h,)))},
    }
    return params, jnp.asarray(rng.normal(size=(6, d_in)))


def _mlp(params, x):
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    h = h * params["LayerNorm_0"]["scale"]
    out = h @ params["Dense_1"]["kernel"]
    return out + params["Dense_1"]["bias"] if "bias" in params["Dense_1"] else out


def _theta_of(params):
    """Dense_0 and Dense_1 neuron-major ([kernel[:, l], bias[l]] per neuron l), then scale."""
    parts = []
    for name in ("Dense_0", "Dense_1"):
        layer = params[name]
        for l in range(layer["kernel"].shape[1]):
            parts.append(layer["kernel"][:, l])
            if "bias" in layer:
                parts.append(layer["bias"][l : l + 1])
    parts.append(params["LayerNorm_0"]["scale"])
    return jnp.concatenate(parts)


def _params_of(theta, like):
    out, off = {}, 0
    for name in ("Dense_0", "Dense_1"):
        d_in, m = like[name]["kernel"].shape
        has_bias = "bias" in like[name]
        d = d_in + has_bias
        out[name] = {"kernel": jnp.stack([theta[off + l * d : off + l * d + d_in]
                                          for l in range(m)], axis=1)}
        if has_bias:
            out[name]["bias"] = jnp.stack([theta[off + l * d + d_in] for l in range(m)])
        off += m * d
    h = like["LayerNorm_0"]["scale"].shape[0]
    out["LayerNorm_0"] = {"scale": theta[off : off + h]}
    assert off + h == theta.shape[0]
    return out


def _log_lik(response, sigma, o, y):
    if response == "categorical":  # y one-hot
        return jnp.sum(y * (o - jnp.log(jnp.sum(jnp.exp(o)))))
    if response == "bernoulli":
        s = 1.0 / (1.0 + jnp.exp(-o))
        return jnp.sum(y * jnp.log(s) + (1 - y) * jnp.log(1 - s))
    return jnp.sum(-0.5 * ((y - o) / sigma) ** 2)


def _outcomes(response, sigma, o):
    """(ys (n, Q, k), ws (n, Q) or None for p(y)) covering the output distribution exactly."""
    n, k = o.shape
    if response == "categorical":
        return jnp.broadcast_to(np.eye(k), (n, k, k)), None
    if response == "bernoulli":
        ys = np.array(list(itertools.product((0.0, 1.0), repeat=k)))
        return jnp.broadcast_to(ys, (n,) + ys.shape), None
    t, w = np.polynomial.hermite_e.hermegauss(3)
    grid = np.array(list(itertools.product(range(3), repeat=k)))
    ws = np.prod(w[grid] / np.sqrt(2 * np.pi), axis=-1)
    return o[:, None, :] + sigma * jnp.asarray(t[grid])[None], jnp.broadcast_to(ws, (n, len(ws)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)
def _definition(model, to_params, response, theta, x, sigma=1.0):
    """1/n sum_i E_y[s s^T], s = d/dtheta ln p(y | model(to_params(theta), x_i)) (eq. 5)."""

    def log_lik(th, xi, y):
        return _log_lik(response, sigma, model(to_params(th), xi[None])[0], y)

    o = model(to_params(theta), x)
    ys, ws = _outcomes(response, sigma, o)
    score = jax.vmap(jax.vmap(jax.grad(log_lik), (None, None, 0)), (None, 0, 0))(theta, x, ys)
    if ws is None:
        ws = jnp.exp(jax.vmap(jax.vmap(log_lik, (None, None, 0)), (None, 0, 0))(theta, x, ys))
    return jnp.einsum("iq,iqa,iqb->ab", ws, score, score) / x.shape[0], jnp.sum(ws, axis=1)


def _mlp_definition(params, x, response, sigma=1.0):
    to_params = _to_params(_HashableParams(params))
    fim, mass = _definition(_mlp, to_params, response, _theta_of(params), x, sigma)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-12)
    return fim


@functools.cache
def _to_params(like):
    # Cached so that equal shapes give the same static argument (and one compilation).
    return functools.partial(_params_of, like=like)


class _HashableParams(dict):
    """Shapes-only stand-in so that ``to_params`` can be a static (hashable) jit argument."""

    def __init__(self, params):
        super().__init__({k: {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in v.items()}
                          for k, v in params.items()})
        self._key = tuple(sorted((k, n, a.shape) for k, v in self.items() for n, a in v.items()))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _HashableParams) and self._key == other._key


# ------------------------------------------------------------------- FIM vs definition


@pytest.mark.parametrize(
    "response, k, sigma, bias_out",
    [("categorical", 3, 1.0, True), ("bernoulli", 2, 1.0, False), ("gaussian", 2, 0.7, True),
     ("gaussian", 1, 1.0, False)],
)
def test_full_fisher_is_definition(response, k, sigma, bias_out, seed):
    params, x = _mlp_params(seed, 3, 4, k, bias_out)
    fisher = full_fisher(_mlp, params, x, response, sigma=sigma)
    assert isinstance(fisher, FullFisher)
    np.testing.assert_allclose(fisher.matrix, _mlp_definition(params, x, response, sigma), **TOL)


def test_ordering_offsets_and_blocks():
    params, x = _mlp_params(0, 3, 4, 3)
    fisher = full_fisher(_mlp, params, x, "categorical")
    d0, d1 = 4 * (3 + 1), 3 * (4 + 1)
    assert fisher.offsets == (("Dense_0", 0, d0), ("Dense_1", d0, d0 + d1),
                              ("LayerNorm_0/scale", d0 + d1, d0 + d1 + 4))
    assert fisher.dense_paths == ("Dense_0", "Dense_1")
    assert set(fisher.blocks) == {"Dense_0", "Dense_1"}
    np.testing.assert_array_equal(fisher.blocks["Dense_0"], fisher.matrix[:d0, :d0])
    np.testing.assert_array_equal(fisher.blocks["Dense_1"], fisher.matrix[d0:d0 + d1, d0:d0 + d1])
    np.testing.assert_array_equal(fisher.block("LayerNorm_0/scale"), fisher.matrix[d0 + d1:,
                                                                                   d0 + d1:])
    with pytest.raises(KeyError, match=r"No parameter block 'Dense_7'; known: \['Dense_0'"):
        fisher.block("Dense_7")
    theta, unravel = ravel_neuron_major(params)
    np.testing.assert_array_equal(theta, _theta_of(params))
    back = unravel(theta)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_dense_layers_come_before_other_leaves_and_nested_paths():
    rng = np.random.default_rng(0)
    params = {
        "a_norm": {"scale": jnp.asarray(rng.normal(size=(2,)))},  # sorts first, placed last
        "block": {"Dense_0": _dense(rng, 2, 2, bias=False)},
        "head": _dense(rng, 2, 3),
    }

    def model(p, x):
        h = jnp.tanh(x @ p["block"]["Dense_0"]["kernel"]) * p["a_norm"]["scale"]
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    x = jnp.asarray(rng.normal(size=(4, 2)))
    fisher = full_fisher(model, params, x, "categorical")
    assert fisher.offsets == (("block/Dense_0", 0, 4), ("head", 4, 13), ("a_norm/scale", 13, 15))
    theta, _ = ravel_neuron_major(params)
    k0, k1, b1 = (params["block"]["Dense_0"]["kernel"], params["head"]["kernel"],
                  params["head"]["bias"])
    want = [k0[0, 0], k0[1, 0], k0[0, 1], k0[1, 1]]
    for l in range(3):
        want += [k1[0, l], k1[1, l], b1[l]]
    want += list(params["a_norm"]["scale"])
    np.testing.assert_array_equal(theta, np.array(want))


# ------------------------------------------------------------- RFIM = FIM block (Sec. 4)


@functools.cache
def _two_layer_model(f):
    """x -> f(x W~) C~ as a plain-JAX model; cached so that full_fisher compiles it once."""

    def model(p, x):
        h = f(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    return model


def _smooth_relu(t):  # relu_omega with omega = 0.5, iota = 0.2 (eq. 17)
    return 0.5 * jnp.log(jnp.exp(0.2 * t / 0.5) + jnp.exp(t / 0.5))


def _one_layer(p, x):
    out = x @ p["Dense_0"]["kernel"]
    return out + p["Dense_0"]["bias"] if "bias" in p["Dense_0"] else out


@pytest.mark.parametrize("hidden", ["tanh", "relu"])
def test_softmax_rfim_is_last_layer_block_of_mlp_fim(hidden, seed):
    rng = np.random.default_rng(seed)
    params = {"Dense_0": _dense(rng, 3, 4), "Dense_1": _dense(rng, 4, 3)}
    x = jnp.asarray(rng.normal(size=(5, 3)))
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[hidden]
    fisher = full_fisher(_two_layer_model(act), params, x, "categorical")
    h = act(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    np.testing.assert_allclose(
        softmax_rfim(params["Dense_1"], h).to_dense(), fisher.blocks["Dense_1"], **TOL
    )
    # The hidden layer's FIM block is the two-layer RFIM with a softmax output (eq. 26).
    np.testing.assert_allclose(
        two_layer_rfim(params["Dense_0"], params["Dense_1"], x, ReLU(omega=0.0) if hidden ==
                       "relu" else "tanh", "softmax").to_dense(),
        fisher.blocks["Dense_0"], **TOL,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_one_layer_fims_are_the_layer_rfims(bias, seed):
    rng = np.random.default_rng(seed)
    params = {"Dense_0": _dense(rng, 3, 3, bias)}
    x = jnp.asarray(rng.normal(size=(5, 3)))
    model = _one_layer
    cat = full_fisher(model, params, x, "categorical")
    np.testing.assert_allclose(cat.matrix, softmax_rfim(params["Dense_0"], x).to_dense(), **TOL)
    ber = full_fisher(model, params, x, "bernoulli")
    np.testing.assert_allclose(ber.matrix, nonlinear_rfim(params["Dense_0"], x, "sigmoid")
                               .to_dense(), **TOL)
    gau = full_fisher(model, params, x, "gaussian", sigma=0.4)
    np.testing.assert_allclose(gau.matrix, linear_rfim(params["Dense_0"], x, 0.4).to_dense(),
                               **TOL)


@pytest.mark.parametrize("hidden", [Sigmoid(), Tanh(), ReLU(omega=0.5, iota=0.2)], ids=repr)
def test_two_layer_rfim_is_first_layer_block(hidden, seed):
    # With h deterministic, the two-layer RFIM of W (eq. 26) is W's block of the FIM.
    rng = np.random.default_rng(seed)
    params = {"Dense_0": _dense(rng, 2, 3), "Dense_1": _dense(rng, 3, 2)}
    x = jnp.asarray(rng.normal(size=(5, 2)))
    f = {"relu": _smooth_relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}[hidden.name]
    model = _two_layer_model(f)

    w, c = params["Dense_0"], params["Dense_1"]
    for response, out in [("bernoulli", "sigmoid"), ("gaussian", "linear"),
                          ("categorical", "softmax")]:
        fisher = full_fisher(model, params, x, response)
        np.testing.assert_allclose(two_layer_rfim(w, c, x, hidden, out).to_dense(),
                                   fisher.blocks["Dense_0"], **TOL, err_msg=response)


# ------------------------------------------------------------------- rank (Sec. 4)


@pytest.mark.parametrize("response, k", [("categorical", 4), ("bernoulli", 2), ("gaussian", 3)])
def test_fim_rank_bound(response, k, seed):
    n = 3
    params, x = _mlp_params(seed, 3, 4, k)
    x = x[:n]
    fisher = full_fisher(_mlp, params, x, response)
    per_sample = k - 1 if response == "categorical" else k
    dim = fisher.matrix.shape[0]
    assert n * per_sample < dim
    rank = int(fim_rank(fisher.matrix, rtol=1e-9))
    # rank <= n rank(F_out), attained for generic parameters.
    assert rank == n * per_sample
    assert rank == np.linalg.matrix_rank(np.asarray(fisher.matrix), tol=1e-9 * np.max(
        np.linalg.eigvalsh(fisher.matrix)))


def test_hidden_layer_rfim_has_higher_rank_than_fim_block(seed):
    n, d_in, h = 3, 5, 4  # n < d = d_in + 1
    rng = np.random.default_rng(seed)
    params = {"Dense_0": _dense(rng, d_in, h), "Dense_1": _dense(rng, h, 1)}
    x = jnp.asarray(rng.normal(size=(n, d_in)))
    fisher = full_fisher(_two_layer_model(jax.nn.sigmoid), params, x, "bernoulli")
    fim_block_rank = int(fim_rank(fisher.blocks["Dense_0"], rtol=1e-9))
    rfim = nonlinear_rfim(params["Dense_0"], x, "sigmoid")
    rfim_rank = int(fim_rank(rfim, rtol=1e-9))  # a metric object is accepted
    assert fim_block_rank <= n * 1 == 3
    assert int(fim_rank(fisher.matrix, rtol=1e-9)) <= n
    for block in rfim.blocks:
        assert int(fim_rank(block, rtol=1e-9)) == n  # rank(G_l) <= n, attained
    assert rfim_rank == n * h == 12  # rank <= n D_h, attained
    assert rfim_rank > fim_block_rank
    # Still singular (D = 24 > 12): the plain condition number is inf, the one over the
    # numerical range is finite.
    assert np.isinf(condition_number(rfim, rtol=1e-9, nonzero_only=False))
    assert np.isfinite(condition_number(rfim, rtol=1e-9))


# --------------------------------------------------------- rank / conditioning helpers


def test_rank_and_condition_number_against_numpy(seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    spectrum = np.array([5.0, 2.0, 0.5, 1e-3, 0.0, 0.0])
    a = (q * spectrum) @ q.T
    assert int(fim_rank(a)) == np.linalg.matrix_rank(a) == 4
    assert int(fim_rank(a, rtol=1e-2)) == 3
    np.testing.assert_allclose(condition_number(a), 5.0 / 1e-3, rtol=1e-6)
    np.testing.assert_allclose(condition_number(a, rtol=1e-2), 5.0 / 0.5, rtol=1e-9)
    assert np.isinf(condition_number(a, nonzero_only=False))
    b = (q * np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])) @ q.T
    np.testing.assert_allclose(condition_number(b, nonzero_only=False), 16.0, rtol=1e-9)
    np.testing.assert_allclose(condition_number(b), 16.0, rtol=1e-9)
    assert int(fim_rank(jnp.zeros((3, 3)))) == 0
    assert np.isnan(condition_number(jnp.zeros((3, 3))))
    # jit-compatible
    assert int(jax.jit(fim_rank)(a)) == 4
    with pytest.raises(ValueError, match=r"Expected a square \(D, D\) matrix, got shape \(2, 3\)"):
        fim_rank(jnp.zeros((2, 3)))


# --------------------------------------------------------------- jit, dtypes, errors


def test_jit_and_traced_sigma():
    params, x = _mlp_params(0, 3, 4, 2)
    eager = full_fisher(_mlp, params, x, "gaussian", sigma=0.5)
    jitted = jax.jit(full_fisher, static_argnums=(0, 3))(_mlp, params, x, "gaussian", sigma=0.5)
    assert isinstance(jitted, FullFisher) and jitted.offsets == eager.offsets
    np.testing.assert_allclose(jitted.matrix, eager.matrix, rtol=1e-12)
    np.testing.assert_allclose(jitted.blocks["Dense_1"], eager.blocks["Dense_1"], rtol=1e-12)
    # sigma may be traced: the Gaussian FIM scales as 1/sigma^2.
    scaled = jax.jit(lambda s: full_fisher(_mlp, params, x, "gaussian", sigma=s).matrix)(0.25)
    np.testing.assert_allclose(scaled, 4 * eager.matrix, rtol=1e-12)


def test_float32_and_leading_axes():
    params, x = _mlp_params(1, 3, 4, 3)
    ref = full_fisher(_mlp, params, x, "categorical")
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    f32 = full_fisher(_mlp, p32, x.astype(jnp.float32), "categorical")
    assert f32.matrix.dtype == jnp.float32
    np.testing.assert_allclose(f32.matrix, ref.matrix, atol=1e-5 * np.max(np.abs(ref.matrix)))
    # Outputs (b, s, k) are N = b s samples; a 1-D output is one Bernoulli per sample.
    batched = full_fisher(_mlp, params, x.reshape(2, 3, 3), "categorical")
    np.testing.assert_allclose(batched.matrix, ref.matrix, rtol=1e-12, atol=1e-14)
    one = full_fisher(_first_output, params, x, "bernoulli")
    two = full_fisher(lambda p, x: _mlp(p, x)[:, :1], params, x, "bernoulli")
    np.testing.assert_allclose(one.matrix, two.matrix, rtol=1e-12)


def _first_output(p, x):
    return _mlp(p, x)[:, 0]


def test_errors():
    params, x = _mlp_params(0, 3, 4, 2)
    with pytest.raises(ValueError, match=r"full_fisher: unknown response 'poisson'; valid "
                       r"responses are 'bernoulli', 'categorical', 'gaussian'\."):
        full_fisher(_mlp, params, x, "poisson")
    with pytest.raises(ValueError, match=r"full_fisher: sigma must be > 0, got sigma=0.0"):
        full_fisher(_mlp, params, x, "gaussian", sigma=0.0)
    with pytest.raises(ValueError, match=r"model_fn must return outputs of shape \(n, k\) for a "
                       r"'categorical' response, got shape \(6,\)"):
        full_fisher(_first_output, params, x, "categorical")
    bad = dict(params, Dense_1={"kernel": params["Dense_1"]["kernel"], "bias": jnp.zeros(5)})
    with pytest.raises(ValueError, match=r"layer 'Dense_1' has kernel shape \(4, 2\) but bias "
                       r"shape \(5,\); expected \(2,\)"):
        full_fisher(_mlp, bad, x, "bernoulli")
    with pytest.raises(ValueError, match=r"^ravel_neuron_major: layer 'Dense_1' has kernel"):
        rfim_jax.ravel_neuron_major(bad)


def test_fim_rank_of_a_non_finite_matrix_is_minus_one():
    """Eigenvalues of a NaN matrix are NaN and none is above the threshold, which read as
    rank 0; the rank is undefined, so the answer is -1, eagerly and under jit."""
    good = np.diag([3.0, 1.0, 0.0])  # rank 2 by construction
    assert int(rfim_jax.fim_rank(good)) == 2
    for bad in (np.full((3, 3), np.nan), np.where(np.eye(3) > 0, np.inf, 0.0)):
        assert int(rfim_jax.fim_rank(bad)) == -1
        assert int(jax.jit(rfim_jax.fim_rank)(bad)) == -1


def test_empty_batches_empty_matrices_and_negative_tolerances_are_refused():
    """Each once gave NaN or a bare numpy error instead of naming what was wrong."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}

    def model(p, x):
        return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    with pytest.raises(ValueError, match=r"full_fisher: the batch is empty \(model_fn's "
                                         r"outputs have shape \(0, 2\)\)"):
        rfim_jax.full_fisher(model, params, jnp.ones((0, 3)), "categorical")
    with pytest.raises(ValueError, match=r"full_fisher: sigma must be > 0, got sigma=0.0"):
        rfim_jax.full_fisher(model, params, jnp.ones((4, 3)), "gaussian", sigma=np.float32(0))
    for fn in (rfim_jax.fim_rank, rfim_jax.condition_number):
        with pytest.raises(ValueError, match=r"with D >= 1, got shape \(0, 0\)"):
            fn(np.zeros((0, 0)))
        with pytest.raises(ValueError, match=r"rtol must be >= 0, got rtol=-1.0"):
            fn(np.diag([4.0, 1.0, 0.0]), rtol=-1.0)
    assert int(rfim_jax.fim_rank(np.diag([4.0, 1.0, 0.0]), rtol=np.float32(0.1))) == 2
