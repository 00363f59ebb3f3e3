"""Tests for rfim_jax._src.capture with real Flax models.

Captured inputs and pre-activations are checked against an independent recomputation from the
params (z = x @ kernel + bias, each layer's input = the previous layer's post-activation), keys
against the params tree, and gradients against the plain forward pass's gradients.
"""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import rfim_jax
from rfim_jax._src import capture as cap
from rfim_jax._src import paths

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _dense(layer, x):
    z = np.asarray(x) @ np.asarray(layer["kernel"])
    if "bias" in layer:
        z = z + np.asarray(layer["bias"])
    return z


def _assert_layer(acts, path, inputs, preacts):
    got = paths.get_by_path(acts, path)
    assert set(got) == {"inputs", "preacts"}
    np.testing.assert_allclose(got["inputs"], inputs, **TIGHT)
    np.testing.assert_allclose(got["preacts"], preacts, **TIGHT)


def _paths(params):
    return sorted(paths.layer_paths(params))


def _captured(acts):
    return sorted(rfim_jax.activation_paths(acts))


def _recording_sgd(lr, log):
    """A GradientTransformationExtraArgs that records the extra kwargs it is given."""

    def update(grads, state, params=None, **extra):
        log.append(extra)
        return jax.tree.map(lambda g: -lr * g, grads), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------------------------
# Path utilities and plain JAX.


def test_record_nests_like_params_with_int_keys():
    params = {
        "head": {"kernel": jnp.ones((2, 3))},
        "layers": {0: {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}},
        "ln": {"scale": jnp.ones(4)},
    }
    acts = cap.record({"layers": {0: {}}}, "layers/0", jnp.ones((5, 4)), jnp.ones((5, 2)))
    acts = cap.record(acts, "head", jnp.ones((5, 2)), jnp.zeros((5, 3)))
    assert list(acts["layers"]) == [0]  # the existing int key is reused, not "0"
    assert _captured(acts) == _paths(params) == ["head", "layers/0"]
    np.testing.assert_array_equal(paths.get_by_path(acts, "head")["preacts"], np.zeros((5, 3)))
    fresh = cap.record(None, "a/b", jnp.ones((1, 2)), jnp.ones((1, 3)))
    assert fresh["a"]["b"]["inputs"].shape == (1, 2) and rfim_jax.activation_paths(fresh) == ["a/b"]
    root = cap.record({}, "", jnp.ones((1, 2)), jnp.ones((1, 3)))
    assert set(root) == {"inputs", "preacts"} and rfim_jax.activation_paths(root) == [""]


def test_paths_on_nnx_state():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    _, acts = cap.capture_nnx(model, jnp.ones((2, 3)))
    assert _paths(state) == _paths(nnx.to_pure_dict(state)) == _captured(acts)
    assert _captured(acts) == ["layers/0", "layers/1"]
    kernel = paths.get_by_path(state, "layers/1")["kernel"][...]  # "1" finds the int key 1
    assert acts["layers"][1]["inputs"].shape == (2, kernel.shape[0])
    assert acts["layers"][1]["preacts"].shape == (2, kernel.shape[1])


def test_plain_jax_record_and_grad(key):
    k0, k1, k2, kx = jax.random.split(key, 4)
    params = {
        "Dense_0": {"kernel": jax.random.normal(k0, (4, 5)), "bias": jax.random.normal(k1, (5,))},
        "out": {"kernel": jax.random.normal(k2, (5, 3))},  # no bias
    }
    x = jax.random.normal(kx, (7, 4))

    def forward(params, x):
        acts = {}
        z0 = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
        acts = cap.record(acts, "Dense_0", x, z0)
        h = jnp.tanh(z0)
        z1 = h @ params["out"]["kernel"]
        acts = cap.record(acts, "out", h, z1)
        return jnp.mean(z1**2), acts

    (loss, acts), grads = jax.jit(jax.value_and_grad(forward, has_aux=True))(params, x)
    assert _captured(acts) == _paths(params)
    z0 = _dense(params["Dense_0"], x)
    _assert_layer(acts, "Dense_0", x, z0)
    _assert_layer(acts, "out", np.tanh(z0), _dense(params["out"], np.tanh(z0)))
    plain = jax.grad(lambda p: forward(p, x)[0])(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), grads, plain)


def test_record_errors_and_repeated_uses():
    acts = cap.record({}, "a/b", jnp.ones((3, 2)), jnp.ones((3, 4)))
    # A second use of the layer adds its rows as extra samples (SPEC §8).
    x2, z2 = jnp.arange(10.0).reshape(5, 2), jnp.arange(20.0).reshape(5, 4)
    twice = cap.record(acts, "a/b", x2[None], z2[None])
    np.testing.assert_array_equal(twice["a"]["b"]["inputs"],
                                  np.concatenate([np.ones((3, 2)), np.asarray(x2)]))
    np.testing.assert_array_equal(twice["a"]["b"]["preacts"],
                                  np.concatenate([np.ones((3, 4)), np.asarray(z2)]))
    with pytest.raises(ValueError, match=r"'a/b'.*inputs of different widths"):
        cap.record(acts, "a/b", jnp.ones((3, 5)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"share their leading \(batch\) axes"):
        cap.record({}, "c", jnp.ones((3, 2)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="cannot record below 'x'"):
        cap.record({"x": 1}, "x/y", jnp.ones((3, 2)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="'a' already holds other entries"):
        cap.record(acts, "a", jnp.ones((3, 2)), jnp.ones((3, 4)))


# --------------------------------------------------------------------------------------------
# flax.linen.


class LinenMLP(nn.Module):
    features: tuple = (5, 4, 3)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(x)
        return jnp.tanh(nn.Dense(4, use_bias=False)(x))


class LinenNested(nn.Module):
    def setup(self):
        self.inp = nn.Dense(6)
        self.block = Block()
        self.layers = [nn.Dense(3), nn.Dense(2)]

    def __call__(self, x):
        x = nn.relu(self.inp(x))
        x = self.block(x)
        return self.layers[1](nn.sigmoid(self.layers[0](x)))


def _init_linen(model, key, x):
    return {"params": _f64(model.init(key, x)["params"])}


def test_linen_mlp_matches_manual(key):
    kx, ki = jax.random.split(key)
    x = jax.random.normal(kx, (6, 4))
    model = LinenMLP()
    variables = _init_linen(model, ki, x)
    out, acts = cap.capture_linen(model, variables, x)
    p = variables["params"]
    assert _captured(acts) == ["Dense_0", "Dense_1", "Dense_2"]
    assert _captured(acts) == _paths(p)
    h = np.asarray(x)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        z = _dense(p[name], h)
        _assert_layer(acts, name, h, z)
        h = np.maximum(z, 0.0)
    np.testing.assert_allclose(out, z, **TIGHT)
    np.testing.assert_allclose(out, model.apply(variables, x), **TIGHT)


def test_linen_nested_layernorm_and_sequence_axes(key):
    kx, ki = jax.random.split(key)
    x = jax.random.normal(kx, (2, 3, 5))  # (batch, seq, d): leading axes kept as captured
    model = LinenNested()
    variables = _init_linen(model, ki, x)
    p = variables["params"]
    out, acts = cap.capture_linen(model, variables, x)
    assert _paths(p) == ["block/Dense_0", "inp", "layers_0", "layers_1"]
    # The LayerNorm's scale and shift are recorded too (SPEC §8): its normalised input u.
    assert _captured(acts) == ["block/Dense_0", "block/LayerNorm_0", "inp", "layers_0",
                               "layers_1"]
    h0 = np.maximum(_dense(p["inp"], x), 0.0)
    _assert_layer(acts, "inp", x, _dense(p["inp"], x))
    ln = nn.LayerNorm().apply({"params": p["block"]["LayerNorm_0"]}, h0)
    centred = h0 - h0.mean(-1, keepdims=True)
    u = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(acts["block"]["LayerNorm_0"]["inputs"], u, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acts["block"]["LayerNorm_0"]["preacts"], ln, **TIGHT)
    _assert_layer(acts, "block/Dense_0", ln, _dense(p["block"]["Dense_0"], ln))
    h1 = np.tanh(_dense(p["block"]["Dense_0"], ln))
    z2 = _dense(p["layers_0"], h1)
    _assert_layer(acts, "layers_0", h1, z2)
    s = 1.0 / (1.0 + np.exp(-z2))
    _assert_layer(acts, "layers_1", s, _dense(p["layers_1"], s))
    assert acts["inp"]["inputs"].shape == (2, 3, 5)
    assert acts["layers_1"]["preacts"].shape == (2, 3, 2)
    np.testing.assert_allclose(out, model.apply(variables, x), **TIGHT)


def test_linen_jit_value_and_grad_identical():
    key = jax.random.PRNGKey(0)
    kx, ky, ki = jax.random.split(key, 3)
    x = jax.random.normal(kx, (8, 5))
    y = jax.random.randint(ky, (8,), 0, 2)
    model = LinenNested()
    params = _init_linen(model, ki, x)["params"]

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def loss(params):
        out, acts = cap.capture_linen(model, {"params": params}, x)
        return ce(out), acts

    (val, acts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    val_ref, grads_ref = jax.jit(jax.value_and_grad(lambda p: ce(model.apply({"params": p}, x))))(
        params
    )
    np.testing.assert_allclose(val, val_ref, **TIGHT)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), grads, grads_ref)
    _, acts_eager = cap.capture_linen(model, {"params": params}, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), acts, acts_eager)


def test_linen_dense_general():
    key = jax.random.PRNGKey(0)

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(3, axis=-1)(jnp.tanh(nn.DenseGeneral(4, name="dg")(x)))

    kx, ki = jax.random.split(key)
    x = jax.random.normal(kx, (5, 2, 6))
    model = M()
    variables = _init_linen(model, ki, x)
    p = variables["params"]
    assert p["dg"]["kernel"].shape == (6, 4)  # features=int, axis=-1: a (d_in, m) kernel
    _, acts = cap.capture_linen(model, variables, x)
    assert _captured(acts) == ["DenseGeneral_0", "dg"]
    _assert_layer(acts, "dg", x, _dense(p["dg"], x))
    h = np.tanh(_dense(p["dg"], x))
    _assert_layer(acts, "DenseGeneral_0", h, _dense(p["DenseGeneral_0"], h))


def test_linen_dense_general_multi_axis_is_flattened():
    key = jax.random.PRNGKey(0)

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((2, 3), name="query")(x)           # (4, 7, 2, 3)
            o = nn.DenseGeneral(5, axis=(-2, -1), name="out")(q)   # contracts (2, 3)
            mixed = nn.DenseGeneral(4, axis=(1,), name="mix")(x)   # contracts the 7 positions
            return o, mixed

    x = jax.random.normal(key, (4, 7, 5))
    model = Attn()
    variables = _init_linen(model, key, x)
    p = variables["params"]
    assert p["query"]["kernel"].shape == (5, 2, 3) and p["query"]["bias"].shape == (2, 3)
    (o, mixed), acts = cap.capture_linen(model, variables, x)
    q = np.einsum("ntd,dhk->nthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    _assert_layer(acts, "query", x, q.reshape(4, 7, 6))
    _assert_layer(acts, "out", q.reshape(4, 7, 6), o)
    # axis=(1,): the contracted axis goes last; rows are (sample, feature) pairs.
    _assert_layer(acts, "mix", np.swapaxes(np.asarray(x), 1, 2), mixed)


def test_linen_unsupported_layers_raise_or_skip():
    key = jax.random.PRNGKey(0)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.ConvTranspose(3, (2, 2), name="up")(x)
            x = nn.DenseGeneral((2, 3), use_bias=False, name="heads")(x)
            return nn.Dense(2)(x.reshape(x.shape[:-2] + (6,)))

    x = jax.random.normal(key, (2, 4, 4, 2))
    model = Net()
    variables = _init_linen(model, key, x)
    with pytest.raises(ValueError, match=r"'up' is an nn.ConvTranspose.*skip_unsupported=True"):
        cap.capture_linen(model, variables, x)
    heads = nn.DenseGeneral((2, 3), use_bias=False)
    with pytest.raises(ValueError, match=r"without bias.*features=\(2, 3\).*use_bias=True"):
        cap.capture_linen(heads, heads.init(key, x), x)
    out, acts = cap.capture_linen(model, variables, x, skip_unsupported=True)
    assert _captured(acts) == ["Dense_0"]
    np.testing.assert_allclose(out, model.apply(variables, x), **TIGHT)


def test_linen_mutable_batch_stats_passthrough():
    key = jax.random.PRNGKey(0)

    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(x)
            return nn.Dense(2)(nn.relu(x))

    x = jax.random.normal(key, (8, 3))
    model = BNNet()
    variables = _f64(model.init(key, x, train=False))
    (out, updates), acts = cap.capture_linen(
        model, variables, x, train=True, mutable=["batch_stats"]
    )
    out_ref, updates_ref = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, out_ref, **TIGHT)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), updates, updates_ref)
    assert _captured(acts) == ["Dense_0", "Dense_1"]
    assert "BatchNorm_0" not in acts
    _assert_layer(acts, "Dense_0", x, _dense(variables["params"]["Dense_0"], x))


def test_linen_called_twice_stacks_uses():
    key = jax.random.PRNGKey(0)

    class Repeat(nn.Module):
        def setup(self):
            self.proj = nn.Dense(3)

        def __call__(self, x):
            return self.proj(jnp.tanh(self.proj(x)))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Repeat(name="block")(x)

    class Tied(nn.Module):
        def setup(self):
            self.shared = nn.Dense(3)
            self.a = Wrap(self.shared)
            self.b = Wrap(self.shared)

        def __call__(self, x):
            return self.b(self.a(x))

    class Wrap(nn.Module):
        layer: nn.Module

        def __call__(self, x):
            return jnp.tanh(self.layer(x))

    x = jax.random.normal(key, (2, 5, 3))
    for model, path, inner in ((Outer(), "block/proj", jnp.tanh), (Tied(), "shared", jnp.tanh)):
        variables = model.init(key, x)
        assert path in _paths(variables["params"])
        layer = paths.get_by_path(variables["params"], path)
        z1 = _dense(layer, x)
        h = inner(z1)
        z2 = _dense(layer, h)
        for acts in (cap.capture_linen(model, variables, x)[1],
                     jax.jit(lambda v: cap.capture_linen(model, v, x)[1])(variables)):  # noqa: B023
            _assert_layer(acts, path, np.concatenate([np.reshape(x, (10, 3)),
                                                      np.reshape(h, (10, 3))]),
                          np.concatenate([np.reshape(z1, (10, 3)), np.reshape(z2, (10, 3))]))


def test_linen_model_is_one_dense():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (4, 3))
    model = nn.Dense(2)
    variables = _init_linen(model, key, x)
    _, acts = cap.capture_linen(model, variables, x)
    assert _paths(variables["params"]) == [""]
    _assert_layer(acts, "", x, _dense(variables["params"], x))


def test_linen_apply_gradients_forwards_kwargs():
    key = jax.random.PRNGKey(0)
    kx, ki = jax.random.split(key)
    x = jax.random.normal(kx, (6, 4))
    model = LinenMLP()
    params = _init_linen(model, ki, x)["params"]
    log = []
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=_recording_sgd(0.1, log)
    )

    @jax.jit
    def step(state):
        def loss(params):
            out, acts = cap.capture_linen(model, {"params": params}, x)
            return jnp.mean(out**2), acts

        (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        return cap.apply_gradients(state, grads, activations=acts), grads, acts

    new_state, grads, acts = step(state)
    assert len(log) == 1 and set(log[0]) == {"activations"}
    assert jax.tree.structure(log[0]["activations"]) == jax.tree.structure(acts)
    assert int(new_state.step) == 1
    jax.tree.map(
        lambda new, old, g: np.testing.assert_allclose(new, old - 0.1 * g, **TIGHT),
        new_state.params,
        params,
        grads,
    )
    # Eagerly, the transformation receives exactly the captured arrays.
    log.clear()
    _, acts_eager = cap.capture_linen(model, {"params": params}, x)
    cap.apply_gradients(state, grads, activations=acts_eager, extra=3)
    assert log[0]["extra"] == 3 and log[0]["activations"] is acts_eager
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), acts, acts_eager)


# --------------------------------------------------------------------------------------------
# flax.nnx.


class NnxMLP(nnx.Module):
    def __init__(self, sizes, rngs):
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nnx.List(
            [nnx.Linear(a, b, param_dtype=jnp.float64, rngs=rngs) for a, b in pairs]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class NnxNorm(nnx.Module):
    def __init__(self, rngs):
        kw = dict(param_dtype=jnp.float64, rngs=rngs)
        self.linear1 = nnx.Linear(4, 6, **kw)
        self.norm = nnx.LayerNorm(6, **kw)
        self.linear2 = nnx.Linear(6, 3, use_bias=False, **kw)

    def __call__(self, x):
        return self.linear2(jnp.tanh(self.norm(self.linear1(x))))


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_nnx_mlp_matches_manual(seed):
    model = NnxMLP((4, 5, 5, 3), nnx.Rngs(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 10), (7, 4))
    out, acts = cap.capture_nnx(model, x)
    p = _pure(model)
    assert _paths(p) == ["layers/0", "layers/1", "layers/2"]
    assert _captured(acts) == _paths(p)
    assert list(acts["layers"]) == list(p["layers"]) == [0, 1, 2]  # int keys, like the state
    h = np.asarray(x)
    for i in range(3):
        z = _dense(p["layers"][i], h)
        _assert_layer(acts, f"layers/{i}", h, z)
        h = np.maximum(z, 0.0)
    np.testing.assert_allclose(out, z, **TIGHT)
    assert nnx.Linear.__call__.__name__ == "__call__"  # the class is restored


def test_nnx_layernorm_captured_as_scale_and_shift():
    key = jax.random.PRNGKey(0)
    model = NnxNorm(nnx.Rngs(int(key[-1])))
    x = jax.random.normal(key, (3, 2, 4))
    out, acts = cap.capture_nnx(model, x)
    p = _pure(model)
    assert _paths(p) == ["linear1", "linear2"] and "norm" in p
    assert set(acts) == {"linear1", "linear2", "norm"}
    z1 = _dense(p["linear1"], x)
    _assert_layer(acts, "linear1", x, z1)
    centred = z1 - z1.mean(-1, keepdims=True)
    u = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(acts["norm"]["inputs"], u, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acts["norm"]["preacts"], model.norm(jnp.asarray(z1)), **TIGHT)
    h = np.tanh(np.asarray(model.norm(jnp.asarray(z1))))
    _assert_layer(acts, "linear2", h, _dense(p["linear2"], h))
    np.testing.assert_allclose(out, model(x), **TIGHT)


def test_nnx_jit_value_and_grad_identical():
    key = jax.random.PRNGKey(0)
    kx, ky = jax.random.split(key)
    model = NnxMLP((5, 6, 3), nnx.Rngs(int(key[-1])))
    x = jax.random.normal(kx, (8, 5))
    y = jax.random.randint(ky, (8,), 0, 3)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def with_capture(model):
        def loss(model):
            out, acts = cap.capture_nnx(model, x)
            return ce(out), acts

        return nnx.value_and_grad(loss, has_aux=True)(model)

    (val, acts), grads = with_capture(model)
    val_ref, grads_ref = nnx.jit(nnx.value_and_grad(lambda m: ce(m(x))))(model)
    np.testing.assert_allclose(val, val_ref, **TIGHT)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **TIGHT),
        nnx.to_pure_dict(grads),
        nnx.to_pure_dict(grads_ref),
    )
    _, acts_eager = cap.capture_nnx(model, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT), acts, acts_eager)
    assert _captured(acts) == _paths(grads)


def test_nnx_optimizer_forwards_activations():
    key = jax.random.PRNGKey(0)
    model = NnxNorm(nnx.Rngs(int(key[-1])))
    x = jax.random.normal(key, (6, 4))
    log = []
    optimizer = nnx.Optimizer(model, _recording_sgd(0.1, log), wrt=nnx.Param)
    before = _pure(model)

    def loss(model):
        out, acts = cap.capture_nnx(model, x)
        return jnp.mean(out**2), acts

    # Eager: tx.update receives the captured arrays under the `activations` keyword.
    (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    optimizer.update(model, grads, activations=acts)
    assert len(log) == 1 and set(log[0]) == {"activations"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), log[0]["activations"], acts)
    jax.tree.map(
        lambda new, old, g: np.testing.assert_allclose(new, old - 0.1 * g, **TIGHT),
        _pure(model),
        before,
        nnx.to_pure_dict(grads),
    )

    @nnx.jit
    def train_step(model, optimizer):
        (val, acts), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        optimizer.update(model, grads, activations=acts)
        return val, acts

    log.clear()
    _, acts_jit = train_step(model, optimizer)
    assert set(log[0]) == {"activations"}
    assert jax.tree.structure(log[0]["activations"]) == jax.tree.structure(acts_jit)
    assert _captured(log[0]["activations"]) == ["linear1", "linear2", "norm"]
    assert int(optimizer.step[...]) == 2


def test_nnx_called_twice_tied_stacks_and_foreign_raises():
    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.block = nnx.Dict(proj=nnx.Linear(3, 3, rngs=rngs))

        def __call__(self, x):
            return self.block["proj"](jnp.tanh(self.block["proj"](x)))

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 3, rngs=rngs)
            self.b = self.a

        def __call__(self, x):
            return self.b(self.a(x))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)))
    original = nnx.Linear.__call__
    for model, path, inner in ((Twice(nnx.Rngs(0)), "block/proj", jnp.tanh),
                               (Tied(nnx.Rngs(0)), "a", lambda z: z)):
        assert path in _paths(nnx.state(model, nnx.Param))
        layer = paths.get_by_path(_pure(model), path)
        z1 = _dense(layer, x)
        z2 = _dense(layer, inner(z1))
        _, acts = cap.capture_nnx(model, x)
        _assert_layer(acts, path, np.concatenate([x, inner(z1)]), np.concatenate([z1, z2]))
        assert nnx.Linear.__call__ is original  # restored
    # Tied but used once: keyed like its params (the first path in graph order).
    tied = Tied(nnx.Rngs(0))
    _, acts = cap.capture_nnx(tied, x, method=lambda m, x: m.a(x))
    assert _captured(acts) == _paths(_pure(tied)) == ["a"]

    foreign = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    model = NnxMLP((3, 3), nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a submodule of the captured model"):
        cap.capture_nnx(model, x, method=lambda m, x: foreign(m(x)))
    assert nnx.Linear.__call__ is original
    with pytest.raises(TypeError, match="must be an nnx.Module"):
        cap.capture_nnx(lambda x: x, x)


def test_nnx_other_threads_unaffected():
    model = NnxMLP((3, 4, 2), nnx.Rngs(0))
    other = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    x = jnp.ones((2, 3))
    seen = {}

    def run_other():
        seen["out"] = other(x)  # a Linear outside the model, from another thread: not recorded

    def forward(model, x):
        t = threading.Thread(target=run_other)
        t.start()
        t.join()
        return model(x)

    _, acts = cap.capture_nnx(model, x, method=forward)
    assert _captured(acts) == ["layers/0", "layers/1"]
    np.testing.assert_allclose(seen["out"], _dense(_pure(other), x), rtol=1e-6)
    # Nested captures record into the innermost one.
    inner_acts = {}

    def nested(model, x):
        out, inner_acts["acts"] = cap.capture_nnx(model.layers[1], nnx.relu(model.layers[0](x)))
        return out

    _, outer = cap.capture_nnx(model, x, method=nested)
    assert _captured(outer) == ["layers/0"]
    assert set(inner_acts["acts"]) == {"inputs", "preacts"}  # the inner model is one Linear


def test_nnx_multi_axis_layers_and_unsupported():
    rngs = nnx.Rngs(0)

    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.LinearGeneral(5, (2, 3), rngs=rngs)
            self.out = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)
            self.ein = nnx.Einsum("btd,dnh->btnh", (5, 2, 3), (2, 3), rngs=rngs)

        def __call__(self, x):
            return self.out(self.query(x)), self.ein(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 5)))
    model = Attn(rngs)
    (o, e), acts = cap.capture_nnx(model, x)
    p = _pure(model)
    q = np.einsum("ntd,dhk->nthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    _assert_layer(acts, "query", x, q.reshape(3, 7, 6))
    _assert_layer(acts, "out", q.reshape(3, 7, 6), o)
    _assert_layer(acts, "ein", x, np.reshape(e, (3, 7, 6)))
    np.testing.assert_allclose(
        e, np.einsum("btd,dnh->btnh", x, p["ein"]["kernel"]) + p["ein"]["bias"], **TIGHT)

    class Bad(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(2, 3, (2, 2), rngs=rngs)
            self.swap = nnx.Einsum("bd,nd->bn", (4, 3), rngs=rngs)  # kernel (out, in)
            self.head = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            h = self.up(x)
            return self.head(h.mean((1, 2))), self.swap(jnp.ones((2, 3)))

    bad = Bad(rngs)
    xi = jnp.ones((2, 4, 4, 2))
    with pytest.raises(ValueError, match=r"'up' is an nnx.ConvTranspose.*skip_unsupported"):
        cap.capture_nnx(bad, xi)
    with pytest.raises(ValueError, match=r"'swap'.*einsum 'bd,nd->bn'.*contracted ones"):
        cap.capture_nnx(bad, xi, method=lambda m, x: m.swap(jnp.ones((2, 3))))
    _, acts = cap.capture_nnx(bad, xi, skip_unsupported=True)
    assert _captured(acts) == ["head"]


def test_linen_einsum_is_captured_like_nnx_einsum():
    """nn.Einsum was silently left out of capture_linen (the optimiser then said only "no
    activations passed")."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            e = nn.Einsum((5, 2, 3), "btd,dnh->btnh")(x)
            f = nn.Einsum((5, 4), name="late")(x, "btd,dk->btk")  # equation given at call time
            g = nn.Einsum((4, 5), "bd,nd->bn", name="swap")(x[:, 0])  # kernel (out, in)
            return e, f, g

    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 5)))
    model = Model()
    variables = _init_linen(model, jax.random.PRNGKey(0), x)
    p = variables["params"]
    with pytest.raises(ValueError, match=r"'swap'.*einsum 'bd,nd->bn'.*contracted ones"):
        cap.capture_linen(model, variables, x)
    (e, f, _), acts = cap.capture_linen(model, variables, x, skip_unsupported=True)
    want_e = np.einsum("btd,dnh->btnh", x, p["Einsum_0"]["kernel"]) + p["Einsum_0"]["bias"]
    np.testing.assert_allclose(e, want_e, **TIGHT)
    _assert_layer(acts, "Einsum_0", x, want_e.reshape(3, 7, 6))
    _assert_layer(acts, "late", x, np.einsum("btd,dk->btk", x, p["late"]["kernel"])
                  + p["late"]["bias"])
    assert "swap" not in acts


def test_capture_linen_accepts_bound_apply():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (4, 3))
    model = nn.Dense(2)
    variables = _init_linen(model, key, x)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                          tx=optax.sgd(0.1))
    out, acts = cap.capture_linen(state.apply_fn, {"params": state.params}, x)
    _assert_layer(acts, "", x, _dense(variables["params"], x))
    np.testing.assert_allclose(out, model.apply(variables, x), **TIGHT)
    with pytest.raises(TypeError, match=r"linen Module or its bound `.apply`.*function"):
        cap.capture_linen(lambda v, x: x, variables, x)


def test_a_masked_conv_is_refused_not_captured_as_unmasked():
    """A masked conv's patches times its kernel do not give its outputs (they differed by
    1.5): RNGD would have preconditioned the masked coordinates too."""
    mask = jnp.asarray([[1.0], [0.0], [1.0]])[:, :, None] * jnp.ones((3, 1, 2))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Conv(2, (3,), mask=mask, name="masked")(x).mean(1))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 1)))
    model = Model()
    variables = _init_linen(model, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"'masked' is a masked convolution.*kernel \* mask"):
        cap.capture_linen(model, variables, x)
    _, acts = cap.capture_linen(model, variables, x, skip_unsupported=True)
    assert _captured(acts) == ["Dense_0"]
    rngs = nnx.Rngs(0)
    conv = nnx.Conv(1, 2, (3,), mask=mask, rngs=rngs)
    with pytest.raises(ValueError, match=r"masked convolution"):
        cap.capture_nnx(conv, x)


class _RawScanRNN(nn.Module):
    """An RNN cell stepped by jax.lax.scan inside the module (not nn.scan)."""

    @nn.compact
    def __call__(self, xs):
        cell = nn.Dense(4)
        h0 = jnp.zeros((xs.shape[0], 4))
        cell(jnp.concatenate([h0, xs[:, 0]], -1))  # builds the params outside the scan

        def step(h, xt):
            h = jnp.tanh(cell(jnp.concatenate([h, xt], -1)))
            return h, h

        return jax.lax.scan(step, h0, xs.swapaxes(0, 1))[0]


class _RawVmap(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.vmap(nn.Dense(3))(x)


class _RawCheckpoint(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3)
        dense(x)
        return jax.checkpoint(lambda y: dense(y))(x) + nn.Dense(3, name="outside")(x)


@pytest.mark.parametrize("model,x", [
    (_RawScanRNN(), jnp.ones((2, 5, 3))),
    (_RawVmap(), jnp.ones((5, 4))),
    (_RawCheckpoint(), jnp.ones((2, 4))),
], ids=["lax.scan", "vmap", "checkpoint"])
def test_capture_linen_refuses_layers_inside_plain_jax_transforms(model, x):
    """Their rows leaked out as tracers: a raw UnexpectedTracerError naming no layer (scan,
    checkpoint), or per-example BatchTracer rows that the update then misread (vmap)."""
    from rfim_jax import capture_linen

    params = model.init(jax.random.PRNGKey(0), x)
    def capture(p):
        return capture_linen(model, p, x)

    for run in (capture, jax.jit(capture)):
        with pytest.raises(ValueError, match=r"capture_linen: layer 'Dense_0' is called inside "
                                             r"a plain JAX transform.*nn.scan"):
            run(params)
    # skip_unsupported leaves the layer out, and records the others.
    _, acts = capture_linen(model, params, x, skip_unsupported=True)
    assert "Dense_0" not in acts
    if isinstance(model, _RawCheckpoint):
        assert set(acts) == {"outside"}


class _ScaledDense(nn.Dense):
    """A Dense subclass whose __call__ wraps the parent's: input halved, output tripled."""

    @nn.compact
    def __call__(self, x):
        return super().__call__(x / 2.0) * 3.0


def test_capture_linen_records_a_wrapping_subclass_once_with_the_layer_s_own_rows():
    """Both __call__s passed the interceptor: the rows were stacked twice, half of them
    (x, 3 z) not the layer's product."""
    from rfim_jax import capture_linen

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            shared = _ScaledDense(3)
            return shared(x) + shared(x + 1.0)  # two real uses: two blocks of rows

    model, x = Model(), jnp.arange(8.0).reshape(2, 4)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    _, acts = capture_linen(model, {"params": params}, x)
    rows = acts["_ScaledDense_0"]
    x_np = np.asarray(x)
    np.testing.assert_allclose(rows["inputs"], np.concatenate([x_np / 2, (x_np + 1) / 2]))
    layer = params["_ScaledDense_0"]
    np.testing.assert_allclose(rows["preacts"], rows["inputs"] @ layer["kernel"] + layer["bias"],
                               rtol=1e-6)


def test_capture_nnx_refuses_lora_linear():
    """Its recorded pre-activation was x W + b without the low-rank term (7.5 off here)."""
    from flax import nnx

    from rfim_jax import capture_nnx

    lora = nnx.LoRALinear(6, 8, lora_rank=2, rngs=nnx.Rngs(0))
    lora.lora.lora_b[...] = jax.random.normal(jax.random.PRNGKey(3), (2, 8), jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    with pytest.raises(ValueError, match=r"capture_nnx: layer '<root>' is an nnx.LoRALinear.*"
                                         r"low-rank term"):
        capture_nnx(lora, x)
    out, acts = capture_nnx(lora, x, skip_unsupported=True)
    assert acts == {}
    np.testing.assert_allclose(out, lora(x), rtol=1e-6)


def test_capture_nnx_names_a_module_broadcast_into_a_lifted_transform():
    """An RNN cell broadcast into nnx.scan (in_axes=None), or a per-example nnx.vmap, failed
    with Flax's raw 'Incorrect number of leaves' / axis-spec errors; the model must still run
    after the failed capture."""
    from flax import nnx

    from rfim_jax import capture_nnx

    class ScanTime(nnx.Module):
        def __init__(self, rngs):
            self.cell = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, xs):
            def step(cell, carry, x):
                h = jnp.tanh(cell(carry + x))
                return h, h

            scan = nnx.scan(step, in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            return scan(self.cell, jnp.zeros(xs.shape[1:]), xs)[1]

    class PerExample(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return nnx.vmap(lambda m, xi: m(xi), in_axes=(None, 0))(self.lin, x)

    for model, x in ((ScanTime(nnx.Rngs(0)), jnp.ones((2, 5, 4))),
                     (PerExample(nnx.Rngs(0)), jnp.ones((5, 4)))):
        want = model(x)
        with pytest.raises(ValueError, match=r"capture_nnx: the model failed after layers "
                                             r"inside a lifted transform.*broadcast"):
            capture_nnx(model, x)
        np.testing.assert_allclose(model(x), want)


def test_activation_paths_reads_lists_as_the_params_do():
    x = jnp.ones((4, 2))
    params = {"block": {"layers": [{"kernel": jnp.eye(2), "bias": jnp.zeros(2)}] * 2}}
    acts = {"block": {"layers": [{"inputs": x, "preacts": x}] * 2}}
    assert rfim_jax.activation_paths(acts) == rfim_jax.layer_paths(params) == [
        "block/layers/0", "block/layers/1"]
