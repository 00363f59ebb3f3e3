"""Stacked layers (SPEC §8): a leading layer axis is L independent layers, each with its own
metric; one RNGD step of every slice against the numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import ReferenceRNGD

import rfim_jax

L, D_IN, M, N = 3, 4, 5, 6


@pytest.mark.parametrize("kind, rep", [("relu", "exact"), ("linear", "exact"),
                                       ("tanh", "diagonal"), ("linear", "eigen")])
def test_stacked_dense_is_independent_layers(kind, rep):
    rng = np.random.default_rng(len(kind) + len(rep))
    params = {"scan": {"kernel": jnp.asarray(rng.normal(size=(L, D_IN, M))),
                       "bias": jnp.asarray(rng.normal(size=(L, M)))}}
    plan = rfim_jax.rngd_plan(params, {"scan": kind}, representation=rep)
    assert (plan["scan"].shape, plan["scan"].stack) == ((D_IN + 1, M), L)
    assert plan["scan"].params_bytes == params["scan"]["kernel"].nbytes + params["scan"][
        "bias"].nbytes
    decay, eps0 = 0.7, 0.02
    tx = rfim_jax.scale_by_rngd({"scan": kind}, representation=rep, decay=decay,
                                damping=eps0, inverse_every=1)
    state = tx.init(params)
    refs = [ReferenceRNGD({"l": (kind, D_IN, M, True)}, decay, 1, eps0) for _ in range(L)]
    step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
    for _ in range(2):
        x = rng.normal(size=(L, N, D_IN))
        z = np.einsum("lnd,ldm->lnm", x, params["scan"]["kernel"]) + np.asarray(
            params["scan"]["bias"])[:, None]
        g = {"scan": {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params["scan"].items()}}
        updates, state = step(g, state, {"scan": {"inputs": jnp.asarray(x),
                                                  "preacts": jnp.asarray(z)}})
        if rep != "exact":
            continue  # the reference is SPEC §4's exact algorithm
        for k, ref in enumerate(refs):
            want_k, want_b = ref.update(
                {"l": {"kernel": np.asarray(g["scan"]["kernel"][k]),
                       "bias": np.asarray(g["scan"]["bias"][k])}},
                {"l": {"inputs": x[k], "preacts": z[k]}})["l"]
            np.testing.assert_allclose(updates["scan"]["kernel"][k], want_k, rtol=1e-9)
            np.testing.assert_allclose(updates["scan"]["bias"][k], want_b, rtol=1e-9)
    stats = jax.tree.leaves(state.metrics["scan"])
    assert all(a.shape[0] == L for a in stats)  # the state carries the layer axis


def test_stacked_layer_errors():
    params = {"scan": {"kernel": jnp.ones((L, D_IN, M)), "bias": jnp.zeros((L, M))}}
    tx = rfim_jax.scale_by_rngd({"scan": "relu"})
    state = tx.init(params)
    flat = {"scan": {"inputs": jnp.ones((N, D_IN)), "preacts": jnp.ones((N, M))}}
    with pytest.raises(ValueError, match=r"layer 'scan': inputs have shape \(6, 4\), but the "
                                         r"layer is a stack of 3.*leading layer axis"):
        tx.update(jax.tree.map(jnp.zeros_like, params), state, activations=flat)


# --------------------------------------------------------------- capture inside lifted transforms


def test_linen_scan_capture_and_rngd_match_the_unrolled_layers():
    import flax.linen as nn

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(4)(nn.LayerNorm()(x))), None

    class Model(nn.Module):
        axes: tuple = (("params", 0), ("rfim_activations", 0))

        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Body, variable_axes=dict(self.axes), split_rngs={"params": True},
                           length=L)
            return scan()(x, None)[0]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(N, 4)))
    model = Model()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    (out, acts) = jax.jit(lambda p: rfim_jax.capture_linen(model, {"params": p}, x))(params)
    body = params["ScanBody_0"]
    assert acts["ScanBody_0"]["Dense_0"]["inputs"].shape == (L, N, 4)
    # Unrolled by hand: slice k's rows are layer k's own inputs and outputs.
    h = np.asarray(x)
    for k in range(L):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        u = (h - mu) / np.sqrt(var + 1e-6)
        ln = u * np.asarray(body["LayerNorm_0"]["scale"][k]) + np.asarray(
            body["LayerNorm_0"]["bias"][k])
        z = ln @ np.asarray(body["Dense_0"]["kernel"][k]) + np.asarray(body["Dense_0"]["bias"][k])
        np.testing.assert_allclose(acts["ScanBody_0"]["Dense_0"]["inputs"][k], ln, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(acts["ScanBody_0"]["Dense_0"]["preacts"][k], z, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(acts["ScanBody_0"]["LayerNorm_0"]["inputs"][k], u,
                                   rtol=1e-5, atol=1e-5)
        h = np.tanh(z)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-5)
    layers = {"ScanBody_0/Dense_0": "tanh", "ScanBody_0/LayerNorm_0": "linear"}
    tx = rfim_jax.rngd(0.1, layers)
    updates, _ = tx.update(params, tx.init(params), params, activations=acts)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match=r"'ScanBody_0/Dense_0' runs inside a lifted transform.*"
                                         r"variable_axes.*'rfim_activations': 0"):
        rfim_jax.capture_linen(Model(axes=(("params", 0),)), {"params": params}, x)


def test_linen_remat_capture():
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(nn.Dense)(3, name="dense")(x)

    x = jnp.ones((2, 4))
    model = Model()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    _, acts = jax.jit(lambda p: rfim_jax.capture_linen(model, {"params": p}, x))(params)
    np.testing.assert_allclose(acts["dense"]["preacts"],
                               x @ params["dense"]["kernel"] + params["dense"]["bias"], rtol=1e-6)


class _NnxBlock:
    """Built lazily (flax.nnx imported inside the tests): LayerNorm then a tanh Linear."""

    @staticmethod
    def make():
        from flax import nnx

        class Block(nnx.Module):
            def __init__(self, rngs):
                self.ln = nnx.LayerNorm(4, rngs=rngs)
                self.lin = nnx.Linear(4, 4, rngs=rngs)

            def __call__(self, x):
                return jnp.tanh(self.lin(self.ln(x)))

        class Model(nnx.Module):
            """L blocks under nnx.scan (created by nnx.vmap), then a head outside it."""

            def __init__(self, rngs):
                @nnx.split_rngs(splits=L)
                @nnx.vmap(in_axes=(0,), out_axes=0)
                def make(rngs):
                    return Block(rngs)

                self.blocks = make(rngs)
                self.head = nnx.Linear(4, 3, rngs=rngs)

            def __call__(self, x):
                @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
                def forward(x, block):
                    return block(x)

                return self.head(forward(x, self.blocks))

        return Block, Model


def test_nnx_scan_capture_and_rngd_match_the_unrolled_layers():
    from flax import nnx

    block_cls, model_cls = _NnxBlock.make()
    model = model_cls(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(N, 4)))
    y = jnp.asarray(np.random.default_rng(2).integers(0, 3, size=N))

    def loss_fn(model):
        logits, acts = rfim_jax.capture_nnx(model, x)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(N), y]), acts

    (_, acts), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    assert not nnx.state(model, nnx.Intermediate)  # nothing is left on the model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    blocks = params["blocks"]
    # Unrolled by hand: slice k's rows are block k's own inputs and outputs.
    h = np.asarray(x, np.float64)
    for k in range(L):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        u = (h - mu) / np.sqrt(var + 1e-6)
        ln = u * np.asarray(blocks["ln"]["scale"][k]) + np.asarray(blocks["ln"]["bias"][k])
        z = ln @ np.asarray(blocks["lin"]["kernel"][k]) + np.asarray(blocks["lin"]["bias"][k])
        for name, got, want in (("lin inputs", acts["blocks"]["lin"]["inputs"][k], ln),
                                ("lin preacts", acts["blocks"]["lin"]["preacts"][k], z),
                                ("ln inputs", acts["blocks"]["ln"]["inputs"][k], u)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
        h = np.tanh(z)
    np.testing.assert_allclose(acts["head"]["inputs"], h, rtol=1e-4, atol=1e-5)
    # One RNGD step: every slice of the stacked Linear against the numpy reference.
    layers = {"blocks/lin": "tanh", "blocks/ln": "linear", "head": "softmax"}
    decay, eps0 = 0.6, 0.05
    tx = rfim_jax.scale_by_rngd(layers, decay=decay, damping=eps0, inverse_every=1)
    g = nnx.to_pure_dict(grads)
    updates, _ = tx.update(g, tx.init(params), activations=acts)
    for k in range(L):
        ref = ReferenceRNGD({"l": ("tanh", 4, 4, True)}, decay, 1, eps0)
        want_k, want_b = ref.update(
            {"l": {n: np.asarray(g["blocks"]["lin"][n][k], np.float64)
                   for n in ("kernel", "bias")}},
            {"l": {n: np.asarray(acts["blocks"]["lin"][n][k], np.float64)
                   for n in ("inputs", "preacts")}})["l"]
        np.testing.assert_allclose(updates["blocks"]["lin"]["kernel"][k], want_k, rtol=2e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(updates["blocks"]["lin"]["bias"][k], want_b, rtol=2e-4,
                                   atol=1e-7)
    # And through nnx.Optimizer, which forwards activations= to the transformation.
    optimizer = nnx.Optimizer(model, rfim_jax.rngd(0.1, layers), wrt=nnx.Param)
    optimizer.update(model, grads, activations=acts)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_nnx_remat_capture_and_what_cannot_be_captured():
    from flax import nnx

    block_cls, _ = _NnxBlock.make()

    class Remat(nnx.Module):
        def __init__(self, rngs):
            self.block = block_cls(rngs)

        def __call__(self, x):
            return nnx.remat(lambda b, x: b(x))(self.block, x)

    class Closed(Remat):  # the block is closed over, not passed: its state cannot leave
        def __call__(self, x):
            return jax.lax.scan(lambda c, _: (self.block(c), None), x, None, length=2)[0]

    class Twice(Remat):
        def __call__(self, x):
            return nnx.remat(lambda b, x: b(b(x)))(self.block, x)

    class AttendInside(nnx.Module):  # a tied head inside a transform
        def __init__(self, rngs):
            self.embed = nnx.Embed(5, 4, rngs=rngs)

        def __call__(self, x):
            return nnx.remat(lambda e, x: e.attend(x))(self.embed, x)

    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"capture_nnx: an nnx.Embed inside a lifted transform is "
                                         r"used as an output head \(attend\).*plain-JAX route"):
        rfim_jax.capture_nnx(AttendInside(nnx.Rngs(0)), x)
    model = Remat(nnx.Rngs(0))
    _, acts = rfim_jax.capture_nnx(model, x)
    np.testing.assert_allclose(acts["block"]["lin"]["preacts"],
                               model.block.lin(acts["block"]["lin"]["inputs"]), rtol=1e-6)
    for cls, match in ((Closed, r"could not record its rows"),
                       (Twice, r"is called more than once per step")):
        with pytest.raises(ValueError, match=r"capture_nnx: an nnx.(Linear|LayerNorm) inside a "
                                             r"lifted transform .*" + match + r".*plain-JAX route"):
            rfim_jax.capture_nnx(cls(nnx.Rngs(0)), x)


# ------------------------------------------------ bias-free stacks, declared with stacked_layers


@pytest.mark.parametrize("kind, rep", [("relu", "exact"), ("linear", "exact"),
                                       ("tanh", "diagonal"), ("tanh", "eigen")])
def test_declared_bias_free_stack_is_independent_layers(kind, rep):
    rng = np.random.default_rng(3)
    params = {"scan": {"kernel": jnp.asarray(rng.normal(size=(L, D_IN, M)))}}
    # Undeclared, the kernel reads as one (L * D_IN) -> M layer; declared, as L layers.
    undeclared = rfim_jax.rngd_plan(params, {"scan": kind})["scan"]
    assert (undeclared.shape, undeclared.stack) == ((L * D_IN, M), 1)
    plan = rfim_jax.rngd_plan(params, {"scan": kind}, representation=rep,
                              stacked_layers=["scan"])
    assert (plan["scan"].shape, plan["scan"].stack) == ((D_IN, M), L)
    decay, eps0 = 0.7, 0.02
    tx = rfim_jax.scale_by_rngd({"scan": kind}, representation=rep, decay=decay, damping=eps0,
                                inverse_every=1, stacked_layers=["scan"])
    state = tx.init(params)
    assert all(a.shape[0] == L for a in jax.tree.leaves(state.metrics["scan"]))
    refs = [ReferenceRNGD({"l": (kind, D_IN, M, False)}, decay, 1, eps0) for _ in range(L)]
    step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
    for _ in range(2):
        x = rng.normal(size=(L, N, D_IN))
        z = np.einsum("lnd,ldm->lnm", x, params["scan"]["kernel"])
        g = {"scan": {"kernel": jnp.asarray(rng.normal(size=(L, D_IN, M)))}}
        updates, state = step(g, state, {"scan": {"inputs": jnp.asarray(x),
                                                  "preacts": jnp.asarray(z)}})
        assert np.isfinite(updates["scan"]["kernel"]).all()
        if rep != "exact":
            continue  # the reference is SPEC §4's exact algorithm
        for k, ref in enumerate(refs):
            want = ref.update({"l": {"kernel": np.asarray(g["scan"]["kernel"][k])}},
                              {"l": {"inputs": x[k], "preacts": z[k]}})["l"][0]
            np.testing.assert_allclose(updates["scan"]["kernel"][k], want, rtol=1e-9)
    # The diagnostics read the stack from the state: one metric per slice.
    metrics = rfim_jax.layer_metrics(state, params)
    assert sorted(metrics) == [f"scan/{k}" for k in range(L)]


def test_declared_stack_of_scale_only_norms_against_numpy():
    """RMSNorm scales (L, D) with no shift: feature j of slice k has the 1 x 1 RFIM
    mean(u_j^2) (SPEC §8), damped by eps0 times itself, averaged from 1."""
    rng = np.random.default_rng(4)
    decay, eps0 = 0.8, 0.1
    params = {"norm": {"scale": jnp.asarray(rng.normal(size=(L, M)))}}
    tx = rfim_jax.scale_by_rngd({"norm": "linear"}, decay=decay, damping=eps0,
                                inverse_every=1, stacked_layers=["norm"])
    u = rng.normal(size=(L, N, M))
    z = u * np.asarray(params["norm"]["scale"])[:, None, :]
    g = rng.normal(size=(L, M))
    updates, _ = tx.update({"norm": {"scale": jnp.asarray(g)}}, tx.init(params),
                           activations={"norm": {"inputs": jnp.asarray(u),
                                                 "preacts": jnp.asarray(z)}})
    fresh = (u ** 2).mean(axis=1) * (1 + eps0)
    np.testing.assert_allclose(updates["norm"]["scale"], g / (decay + (1 - decay) * fresh),
                               rtol=1e-9)


def test_linen_scan_of_bias_free_layers_trains_with_stacked_layers():
    import flax.linen as nn

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(4, use_bias=False)(nn.RMSNorm()(x))), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Body, variable_axes={"params": 0, "rfim_activations": 0},
                           split_rngs={"params": True}, length=L)
            return nn.Dense(3)(scan()(x, None)[0])

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(N, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=N))
    model = Model()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    assert params["ScanBody_0"]["Dense_0"]["kernel"].shape == (L, 4, 4)
    layers = {"ScanBody_0/Dense_0": "relu", "ScanBody_0/RMSNorm_0": "linear",
              "Dense_0": "softmax"}

    def loss_fn(p):
        logits, acts = rfim_jax.capture_linen(model, {"params": p}, x)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(N), y]), acts

    # Undeclared, the update says which layer to declare.
    tx = rfim_jax.rngd(0.05, layers)
    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    with pytest.raises(ValueError, match=r"RMSNorm_0.*stacked_layers"):
        tx.init(params)
    tx = rfim_jax.rngd(0.05, {"ScanBody_0/Dense_0": "relu"})
    with pytest.raises(ValueError, match=r"stacked_layers=\['ScanBody_0/Dense_0'\]"):
        tx.update(grads, tx.init(params), params, activations=acts)

    decay, eps0 = 0.9, 0.01
    stack = ["ScanBody_0/Dense_0", "ScanBody_0/RMSNorm_0"]
    inner = rfim_jax.scale_by_rngd(layers, decay=decay, damping=eps0, inverse_every=1,
                                   stacked_layers=stack)
    updates, _ = inner.update(grads, inner.init(params), params, activations=acts)
    dense_g, dense_a = grads["ScanBody_0"]["Dense_0"], acts["ScanBody_0"]["Dense_0"]
    for k in range(L):
        ref = ReferenceRNGD({"l": ("relu", 4, 4, False)}, decay, 1, eps0)
        want = ref.update({"l": {"kernel": np.asarray(dense_g["kernel"][k], np.float64)}},
                          {"l": {n: np.asarray(dense_a[n][k], np.float64)
                                 for n in ("inputs", "preacts")}})["l"][0]
        np.testing.assert_allclose(updates["ScanBody_0"]["Dense_0"]["kernel"][k], want,
                                   rtol=2e-4, atol=1e-7)

    tx = rfim_jax.rngd(0.05, layers, stacked_layers=stack)
    state = tx.init(params)

    @jax.jit
    def train_step(p, s):
        (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        upd, s = tx.update(grads, s, p, activations=acts)
        return jax.tree.map(jnp.add, p, upd), s, loss

    losses = []
    for _ in range(30):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_stacked_layers_as_any_iterable_or_none():
    """A generator was used up by the build-time check, and the stack was then not declared."""
    params = {"blk": {"kernel": jnp.ones((L, D_IN, M))}, "other": {"kernel": jnp.ones((D_IN, M))}}
    layers = {"blk": "relu", "other": "linear"}
    for declared in ((p for p in layers if p == "blk"), filter(lambda p: p == "blk", layers),
                     {"blk": 1}.keys()):
        state = rfim_jax.rngd(0.1, layers, stacked_layers=declared).init(params)
        assert state[0].metrics["blk"].shape == (L, M, D_IN, D_IN)
    state = rfim_jax.rngd(0.1, layers, stacked_layers=None).init(params)
    assert state[0].metrics["blk"].shape == (M, L * D_IN, L * D_IN)


def test_stacked_layers_errors():
    params = {"a": {"kernel": jnp.ones((D_IN, M))}, "b": {"kernel": jnp.ones((L, D_IN, M))}}
    with pytest.raises(TypeError, match="stacked_layers must be a list"):
        rfim_jax.scale_by_rngd({"b": "relu"}, stacked_layers="b")
    with pytest.raises(ValueError, match=r"stacked_layers names paths that are not among the "
                                         r"layers: \['c'\]"):
        rfim_jax.scale_by_rngd({"b": "relu"}, stacked_layers=["c"])  # refused when built
    with pytest.raises(ValueError, match=r"layer 'a' is declared in stacked_layers.*\(4, 5\)"):
        rfim_jax.scale_by_rngd({"a": "relu"}, stacked_layers=["a"]).init(params)


def test_a_stack_whose_input_width_is_its_length_is_named_in_the_error_and_declared():
    """nn.scan over Dense(4) with length 4: kernel (4, 4, 4) and bias (4, 4) are also one
    DenseGeneral's shapes.  The update error now says to declare the stack; declared, it is 4
    layers matching the numpy reference slice by slice."""
    import flax.linen as nn

    from rfim_jax import capture_linen

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(4)(x)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Body, variable_axes={"params": 0, "rfim_activations": 0},
                           split_rngs={"params": True}, length=4)
            return scan()(x, None)[0]

    model = Model()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    _, acts = capture_linen(model, {"params": params}, x)
    path = "ScanBody_0/Dense_0"
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    tx = rfim_jax.scale_by_rngd({path: "tanh"}, inverse_every=1)
    with pytest.raises(ValueError, match=r"'ScanBody_0/Dense_0'.*stack of 4 layers.*"
                                         r"stacked_layers=\['ScanBody_0/Dense_0'\]"):
        tx.update(grads, tx.init(params), activations=acts)
    tx = rfim_jax.scale_by_rngd({path: "tanh"}, inverse_every=1, stacked_layers=[path])
    out, _ = tx.update(grads, tx.init(params), activations=acts)
    node, rows, g = params["ScanBody_0"]["Dense_0"], acts["ScanBody_0"]["Dense_0"], grads
    for i in range(4):
        ref = ReferenceRNGD({"l": ("tanh", 4, 4, True)}, 0.995, 1, 1e-2)
        k, b = ref.update(
            {"l": {"kernel": g["ScanBody_0"]["Dense_0"]["kernel"][i],
                   "bias": g["ScanBody_0"]["Dense_0"]["bias"][i]}},
            {"l": {"inputs": np.asarray(rows["inputs"][i]),
                   "preacts": np.asarray(rows["preacts"][i])}})["l"]
        np.testing.assert_allclose(out["ScanBody_0"]["Dense_0"]["kernel"][i], k, rtol=1e-5)
        np.testing.assert_allclose(out["ScanBody_0"]["Dense_0"]["bias"][i], b, rtol=1e-5)
    assert node["kernel"].shape == (4, 4, 4)
