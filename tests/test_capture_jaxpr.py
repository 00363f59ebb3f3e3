"""Tests for rfim_jax.capture_jax: activations of an unmodified plain-JAX function.

Captured inputs and pre-activations are checked against an independent numpy recomputation
from the params (z = x @ kernel + bias, each layer's input the previous layer's output), the
output and gradients against the function itself, and an RNGD step against the same step fed by
hand-recorded activations (rfim_jax.record). The training test runs on the 8x8 digits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rfim_jax

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _params(key, sizes=(6, 5, 4, 3)):
    ks = jax.random.split(key, 2 * len(sizes))
    return {
        "Dense_0": {"kernel": jax.random.normal(ks[0], sizes[:2]) / 2,
                    "bias": jax.random.normal(ks[1], sizes[1:2])},
        "block": {"Dense_0": {"kernel": jax.random.normal(ks[2], (sizes[1], sizes[1])) / 2,
                              "bias": jax.random.normal(ks[3], sizes[1:2])}},
        "out": {"kernel": jax.random.normal(ks[4], (sizes[1], sizes[3]))},  # no bias
    }


def _mlp(params, x, *, repeat=1, weight_decay=0.0):
    """A plain-JAX model as users write it: @, einsum, a dtype cast, a tied block, an L2 term."""
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    for _ in range(repeat):
        kernel = params["block"]["Dense_0"]["kernel"].astype(jnp.float64)
        h = jnp.tanh(jnp.einsum("...i,ij->...j", h, kernel) + params["block"]["Dense_0"]["bias"])
    out = jnp.dot(h, params["out"]["kernel"])
    return out + weight_decay * sum(jnp.sum(p["kernel"] ** 2) for p in (params["Dense_0"],))


def _np_layers(params, x, repeat=1):
    """Each layer's (inputs, preacts), recomputed in numpy; uses of a tied layer stacked."""
    p = jax.tree.map(np.asarray, params)
    x = np.asarray(x).reshape(-1, np.shape(x)[-1])
    z0 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h, block = np.maximum(z0, 0), []
    for _ in range(repeat):
        z = h @ p["block"]["Dense_0"]["kernel"] + p["block"]["Dense_0"]["bias"]
        block.append((h, z))
        h = np.tanh(z)
    return {
        "Dense_0": (x, z0),
        "block/Dense_0": tuple(np.concatenate(a) for a in zip(*block, strict=True)),
        "out": (h, h @ p["out"]["kernel"]),
    }


def _check(acts, want):
    assert sorted(rfim_jax.activation_paths(acts)) == sorted(want)
    for path, (x, z) in want.items():
        node = acts
        for part in path.split("/"):
            node = node[part]
        got_x, got_z = np.asarray(node["inputs"]), np.asarray(node["preacts"])
        np.testing.assert_allclose(got_x.reshape(-1, got_x.shape[-1]), x, **TIGHT)
        np.testing.assert_allclose(got_z.reshape(-1, got_z.shape[-1]), z, **TIGHT)


@pytest.mark.parametrize("repeat,batch", [(1, (7,)), (2, (7,)), (1, (2, 3))])
def test_capture_jax_matches_numpy_output_and_gradients(key, repeat, batch):
    params = _params(key)
    x = jax.random.normal(jax.random.fold_in(key, 1), batch + (6,))

    def loss(p):
        out, acts = rfim_jax.capture_jax(_mlp, p, x, repeat=repeat, weight_decay=1e-3)
        return jnp.mean(out**2), acts

    (value, acts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    # The L2 term is not a use of Dense_0; the tied block's uses are stacked (SPEC §8).
    _check(acts, _np_layers(params, x, repeat))
    assert acts["Dense_0"]["inputs"].shape == batch + (6,)
    plain = lambda p: jnp.mean(_mlp(p, x, repeat=repeat, weight_decay=1e-3) ** 2)  # noqa: E731
    np.testing.assert_allclose(value, plain(params), **TIGHT)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TIGHT),
                 grads, jax.grad(plain)(params))


def test_capture_jax_reads_transposes_kernel_first_products_and_closed_over_inputs(key):
    params = _params(key)
    x = jax.random.normal(jax.random.fold_in(key, 2), (5, 6))

    def model(p, scale):
        # kernel.T.T, a product with the kernel as the first operand, and x closed over.
        z0 = (p["Dense_0"]["kernel"].T @ x.T).T + p["Dense_0"]["bias"]
        h = jax.nn.relu(z0) * scale
        h = jnp.tanh(jnp.einsum("ij,bi->bj", p["block"]["Dense_0"]["kernel"].T.T, h)
                     + p["block"]["Dense_0"]["bias"])
        return h @ p["out"]["kernel"]

    @jax.jit
    def run(p):
        return rfim_jax.capture_jax(model, p, jnp.float64(1.0))[1]

    acts = run(params)
    _check(acts, _np_layers(params, x))


def test_capture_jax_passes_python_arguments_as_values(key):
    params = _params(key)
    x = jax.random.normal(key, (4, 6))

    def model(p, x, train):
        h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        if train:  # Python control flow on a flag must see the flag, not a tracer
            h = 2.0 * h
        return h

    out, acts = rfim_jax.capture_jax(model, params, x, train=True)
    np.testing.assert_allclose(out, 2 * np.asarray(acts["Dense_0"]["preacts"]), **TIGHT)
    assert rfim_jax.activation_paths(acts) == ["Dense_0"]  # block and out are never used


def test_capture_jax_step_equals_the_step_with_recorded_activations_and_trains_on_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = jnp.asarray(digits.data / 16.0, jnp.float32)
    y_all = jnp.asarray(digits.target)
    sizes = (64, 32, 32, 10)
    key = jax.random.PRNGKey(0)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), _params(key, sizes))
    params["out"]["bias"] = jnp.zeros(10, jnp.float32)
    layers = {"Dense_0": "linear", "block/Dense_0": "tanh", "out": "softmax"}

    def apply(p, x):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        h = jnp.tanh(h @ p["block"]["Dense_0"]["kernel"] + p["block"]["Dense_0"]["bias"])
        return h @ p["out"]["kernel"] + p["out"]["bias"]

    def recorded(p, x):  # the same model, rewritten with rfim_jax.record
        z0 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        h = jax.nn.relu(z0)
        z1 = h @ p["block"]["Dense_0"]["kernel"] + p["block"]["Dense_0"]["bias"]
        h1 = jnp.tanh(z1)
        z2 = h1 @ p["out"]["kernel"] + p["out"]["bias"]
        acts = rfim_jax.record(rfim_jax.record(rfim_jax.record(
            {}, "Dense_0", x, z0), "block/Dense_0", h, z1), "out", h1, z2)
        return z2, acts

    def make_step(forward):
        def loss(p, x, y):
            logits, acts = forward(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

        @jax.jit
        def step(p, s, x, y):
            (value, acts), g = jax.value_and_grad(loss, has_aux=True)(p, x, y)
            u, s = tx.update(g, s, p, activations=acts)
            return optax.apply_updates(p, u), s, value

        return step

    tx = rfim_jax.rngd(0.05, layers, inverse_every=5)
    captured = make_step(lambda p, x: rfim_jax.capture_jax(apply, p, x))
    by_hand = make_step(recorded)
    p_a, s_a = params, tx.init(params)
    p_b, s_b = params, tx.init(params)
    losses = []
    rng = np.random.default_rng(0)
    for _ in range(60):
        idx = rng.choice(len(x_all), 64, replace=False)
        p_a, s_a, value = captured(p_a, s_a, x_all[idx], y_all[idx])
        p_b, s_b, _ = by_hand(p_b, s_b, x_all[idx], y_all[idx])
        losses.append(float(value))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_a, p_b)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


@pytest.mark.parametrize("model,why", [
    (lambda p, x: jax.jit(_dense)(p["Dense_0"], x), "nested jax.jit of `_dense`"),
    (lambda p, x: jax.lax.scan(lambda h, _: (jnp.tanh(_dense(p["block"]["Dense_0"], h)), None),
                               _dense(p["Dense_0"], x), None, length=2)[0], "nested `scan`"),
    (lambda p, x: jax.checkpoint(_dense)(p["Dense_0"], x), "nested `"),
    (lambda p, x: jax.jit(_dense)({"kernel": 2 * p["Dense_0"]["kernel"],
                                   "bias": p["Dense_0"]["bias"]}, x), "nested jax.jit"),
    (lambda p, x: jnp.matvec(p["Dense_0"]["kernel"].T, x[0]) + p["Dense_0"]["bias"],
     "jax.jit of `matvec`"),
    # The bias spread along another axis than the neurons' (the batch has m = 5 rows).
    (lambda p, x: x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][:, None], "along axis"),
    (lambda p, x: p["Dense_0"]["kernel"].T @ x.T + p["Dense_0"]["bias"], "along axis"),
    # Products the matcher cannot read as x @ kernel must not vanish from the activations.
    (lambda p, x: (x[:, :, None] * p["Dense_0"]["kernel"]).sum(1) + p["Dense_0"]["bias"],
     "elementwise"),
    (lambda p, x: jnp.kron(x, p["Dense_0"]["kernel"]), "jax.jit of `kron`"),
    (lambda p, x: x @ p["Dense_0"]["kernel"].astype(jnp.int32) + p["Dense_0"]["bias"],
     "transformed"),
    (lambda p, x: (x @ p["Dense_0"]["kernel"]).astype(jnp.int32) + p["Dense_0"]["bias"],
     "bias is not added"),
    (lambda p, x: x @ jax.lax.reduce_precision(p["Dense_0"]["kernel"], 2, 1)
     + p["Dense_0"]["bias"], "transformed"),
    (lambda p, x: jax.lax.ragged_dot(x, jnp.stack([p["Dense_0"]["kernel"]] * 2),
                                     jnp.array([1, 2])), "ragged_dot"),
    (lambda p, x: jax.pure_callback(lambda a, w: np.asarray(a) @ np.asarray(w),
                                    jax.ShapeDtypeStruct((5, 5), jnp.float64), x,
                                    p["Dense_0"]["kernel"]), "pure_callback"),
    (lambda p, x: x @ (p["Dense_0"]["kernel"] * 0.5) + p["Dense_0"]["bias"], "transformed"),
    (lambda p, x: x @ p["Dense_0"]["kernel"], "bias is not added"),
    (lambda p, x: (x @ p["Dense_0"]["kernel"] + x[:, :5]) + p["Dense_0"]["bias"],
     "bias is not added"),
    (lambda p, x: x[:, :5] @ p["block"]["Dense_0"]["kernel"][:, :3], "transformed"),
    (lambda p, x: x[:, :5] @ p["Dense_0"]["kernel"].T, "another axis"),
])
def test_capture_jax_refuses_what_it_cannot_read_naming_the_layer(model, why):
    key = jax.random.PRNGKey(3)
    params = _params(key)
    x = jax.random.normal(key, (5, 6))
    with pytest.raises(ValueError, match=why) as err:
        rfim_jax.capture_jax(model, params, x)
    assert "layer '" in str(err.value) and "skip_unsupported=True" in str(err.value)
    # Skipped on request: the layer is left out whole, the function's output is unchanged.
    out, acts = rfim_jax.capture_jax(model, params, x, skip_unsupported=True)
    np.testing.assert_allclose(out, model(params, x), **TIGHT)
    named = str(err.value).split("layer '")[1].split("'")[0]
    assert named not in rfim_jax.activation_paths(acts)


def test_capture_jax_inline_jit_and_a_jitted_regulariser_are_read(key):
    params = _params(key)
    x = jax.random.normal(key, (3, 6))
    dense = jax.jit(_dense, inline=True)
    l2 = jax.jit(lambda k: jnp.sum(k**2))  # a kernel in a nested jit, but in no product

    def model(p, x):
        return dense(p["Dense_0"], x) + l2(p["Dense_0"]["kernel"])

    out, acts = rfim_jax.capture_jax(model, params, x)
    want = _np_layers(params, x)["Dense_0"]
    _check(acts, {"Dense_0": want})


def test_capture_jax_names_a_convolution_and_a_multi_axis_kernel():
    conv = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)}}
    images = jnp.ones((2, 5, 5, 1))

    def cnn(p, x):
        y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["conv"]["bias"]

    with pytest.raises(ValueError, match=r"layer 'conv'.*convolution.*conv_patches"):
        rfim_jax.capture_jax(cnn, conv, images)
    heads = {"qkv": {"kernel": jnp.ones((4, 2, 3))}}

    def attn(p, x):
        return jnp.einsum("bd,dhk->bhk", x, p["qkv"]["kernel"])

    with pytest.raises(ValueError, match=r"layer 'qkv'.*rank 3, shape \(4, 2, 3\)"):
        rfim_jax.capture_jax(attn, heads, jnp.ones((2, 4)))


def test_capture_jax_looks_through_relabellings_transposes_and_dead_products():
    """Code the matcher once refused: the values are those of x @ kernel + bias all the same."""
    from jax.ad_checkpoint import checkpoint_name

    key = jax.random.PRNGKey(4)
    params = _params(key)
    x3 = jax.random.normal(key, (3, 2, 6))  # (S, B, D)
    p0 = params["Dense_0"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    models = {
        # vmap over axis 1 transposes the product's leading axes before the bias is added.
        "vmap": lambda p, x: jax.vmap(lambda xi: xi @ p["Dense_0"]["kernel"]
                                      + p["Dense_0"]["bias"], in_axes=1, out_axes=1)(x),
        "einsum_bfs": lambda p, x: jnp.einsum("bsd,df->bfs", x, p["Dense_0"]["kernel"])
        + p["Dense_0"]["bias"][:, None],
        "stop_gradient": lambda p, x: x @ jax.lax.stop_gradient(p["Dense_0"]["kernel"])
        + p["Dense_0"]["bias"],
        "barrier": lambda p, x: x @ jax.lax.optimization_barrier(p["Dense_0"]["kernel"])
        + p["Dense_0"]["bias"],
        "names": lambda p, x: checkpoint_name(x @ jax.lax.with_sharding_constraint(
            p["Dense_0"]["kernel"], device), "z") + p["Dense_0"]["bias"],
        # An orthogonality penalty multiplies the kernel by itself: not a layer use.
        "penalty": lambda p, x: x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        + jnp.sum((p["Dense_0"]["kernel"].T @ p["Dense_0"]["kernel"]) ** 2),
        # A product the output never sees is not a use.
        "dead": lambda p, x: (x @ p["Dense_0"]["kernel"], x @ p["Dense_0"]["kernel"]
                              + p["Dense_0"]["bias"])[1],
    }
    x_rows = np.asarray(x3).reshape(-1, 6)
    for name, model in models.items():
        out, acts = rfim_jax.capture_jax(model, params, x3)
        np.testing.assert_allclose(out, model(params, x3), **TIGHT, err_msg=name)
        assert rfim_jax.activation_paths(acts) == ["Dense_0"], name
        got_x, got_z = acts["Dense_0"]["inputs"], acts["Dense_0"]["preacts"]
        assert got_x.shape[-1] == 6 and got_z.shape[-1] == 5, name
        got_x, got_z = np.asarray(got_x).reshape(-1, 6), np.asarray(got_z).reshape(-1, 5)
        # Rows in any order the model's transposes give, but each x row with its own z row.
        np.testing.assert_allclose(got_z, got_x @ np.asarray(p0["kernel"])
                                   + np.asarray(p0["bias"]), **TIGHT, err_msg=name)
        order = np.lexsort(got_x.T)
        np.testing.assert_allclose(got_x[order], x_rows[np.lexsort(x_rows.T)], **TIGHT,
                                   err_msg=name)


def test_capture_jax_a_layer_it_cannot_read_does_not_hide_the_layers_after_it():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s))  # noqa: E731
    params = {"embed": {"kernel": f(7, 4)}, "a": {"kernel": f(4, 5)},
              "head": {"kernel": f(5, 3), "bias": f(3)}}
    tok = jnp.asarray([1, 3, 6, 0])
    p = jax.tree.map(np.asarray, params)

    def embedded(params, tok):  # a lookup in a "kernel" table, then dense layers
        x = params["embed"]["kernel"][tok]
        return jnp.tanh(x @ params["a"]["kernel"]) @ params["head"]["kernel"] \
            + params["head"]["bias"]

    def weight_normed(params, tok):  # (x @ W) / |W|: refused, the head is still read
        x, w = params["embed"]["kernel"][tok], params["a"]["kernel"]
        h = jnp.tanh((x @ w) / jnp.linalg.norm(w, axis=0))
        return h @ params["head"]["kernel"] + params["head"]["bias"]

    x = p["embed"]["kernel"][np.asarray(tok)]
    h = np.tanh(x @ p["a"]["kernel"])
    _, acts = rfim_jax.capture_jax(embedded, params, tok)
    _check(acts, {"a": (x, x @ p["a"]["kernel"]),
                  "head": (h, h @ p["head"]["kernel"] + p["head"]["bias"])})
    with pytest.raises(ValueError, match="layer 'a'.*weight norm"):
        rfim_jax.capture_jax(weight_normed, params, tok)
    _, acts = rfim_jax.capture_jax(weight_normed, params, tok, skip_unsupported=True)
    h = np.tanh((x @ p["a"]["kernel"]) / np.linalg.norm(p["a"]["kernel"], axis=0))
    _check(acts, {"head": (h, h @ p["head"]["kernel"] + p["head"]["bias"])})

    conv = {"conv": {"kernel": f(3, 3, 1, 2), "bias": f(2)}, "head": {"kernel": f(32, 3)}}
    images = f(2, 4, 4, 1)

    def features(params, images):
        y = jax.lax.conv_general_dilated(images, params["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + params["conv"]["bias"]).reshape(images.shape[0], -1)

    _, acts = rfim_jax.capture_jax(lambda q, i: features(q, i) @ q["head"]["kernel"], conv,
                                   images, skip_unsupported=True)
    h = np.asarray(features(conv, images))
    _check(acts, {"head": (h, h @ np.asarray(conv["head"]["kernel"]))})


def test_capture_jax_refuses_params_it_cannot_lay_out_and_odd_bias_sums():
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s))  # noqa: E731
    x = f(3, 4)
    nested = {"kernel": f(4, 4), "sub": {"kernel": f(4, 2)}}
    with pytest.raises(ValueError, match="layer '<root>' holds layer 'sub'"):
        rfim_jax.capture_jax(lambda p, x: (x @ p["kernel"]) @ p["sub"]["kernel"], nested, x)
    params = {"a": {"kernel": f(4, 5), "bias": f(5)}}
    with pytest.raises(ValueError, match="layer 'a'.*closure"):
        rfim_jax.capture_jax(lambda p, x: x @ params["a"]["kernel"] + params["a"]["bias"],
                             params, x)
    with pytest.raises(ValueError, match="layer 'a'.*twice"):
        rfim_jax.capture_jax(lambda p, x: x @ p["a"]["kernel"] + p["a"]["bias"]
                             + p["a"]["bias"], params, x)
    latents = {"a": {"kernel": f(4, 5)}, "latents": f(3, 4)}
    with pytest.raises(ValueError, match="layer 'a'.*elementwise"):
        rfim_jax.capture_jax(lambda p, x: (p["latents"][:, :, None] * p["a"]["kernel"]).sum(1),
                             latents, x)


def test_capture_jax_one_sample_numpy_scalars_and_dead_refusals():
    rng = np.random.default_rng(2)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((4, 5))),
                    "bias": jnp.asarray(rng.standard_normal(5))}}
    x = jnp.asarray(rng.standard_normal(4))

    def model(p, x, rows):
        unused = x @ (p["a"]["kernel"] * 2.0)  # a refused form the output never sees  # noqa: F841
        return (x @ p["a"]["kernel"] + p["a"]["bias"])[:rows]

    out, acts = rfim_jax.capture_jax(model, params, x, np.int64(3))  # rows stays static
    assert out.shape == (3,)
    z = np.asarray(x) @ np.asarray(params["a"]["kernel"]) + np.asarray(params["a"]["bias"])
    np.testing.assert_allclose(acts["a"]["inputs"], np.asarray(x)[None], **TIGHT)
    np.testing.assert_allclose(acts["a"]["preacts"], z[None], **TIGHT)
