"""relative_fisher_rao_norm and diagnostics against explicit computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfim_jax


def _theta(params, has_bias=True):
    """Neuron-major theta = concat_l [kernel[:, l], bias[l]], built with loops."""
    k = np.asarray(params["kernel"])
    out = []
    for l in range(k.shape[1]):
        out.extend(k[:, l])
        if has_bias:
            out.append(float(params["bias"][l]))
    return np.asarray(out)


def _layer(seed, d_in=4, m=3):
    rng = np.random.default_rng(seed)
    params = {"kernel": jnp.asarray(rng.normal(size=(d_in, m))),
              "bias": jnp.asarray(rng.normal(size=m))}
    return params, jnp.asarray(rng.normal(size=(20, d_in)))


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
@pytest.mark.parametrize("constructor", ["linear", "tanh", "softmax"])
def test_relative_fisher_rao_norm_is_theta_g_theta(representation, constructor):
    params, x = _layer(0)
    if constructor == "linear":
        metric = rfim_jax.linear_rfim(params, x, representation=representation)
    elif constructor == "softmax":
        metric = rfim_jax.softmax_rfim(params, x, representation=representation)
    else:
        metric = rfim_jax.nonlinear_rfim(params, x, "tanh", representation=representation)
    theta = _theta(params)
    want = theta @ np.asarray(metric.to_dense()) @ theta
    np.testing.assert_allclose(rfim_jax.relative_fisher_rao_norm(metric, params), want,
                               rtol=1e-12)


def _state_and_params(representation):
    params = {"a": _layer(1)[0], "b": _layer(2, d_in=3, m=2)[0]}
    tx = rfim_jax.rngd(0.1, {"a": "tanh", "b": "softmax"}, representation=representation,
                       inverse_every=1)
    return tx, params


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_diagnostics_on_a_known_spectrum(representation):
    tx, params = _state_and_params(representation)
    state = tx.init(params)
    inner = state[0]
    # Plant a known spectrum in layer "a" (d = 5, m = 3): eigenvalues 0.5 .. 4.
    scales = jnp.asarray(np.linspace(0.5, 4.0, 15).reshape(3, 5))
    if representation == "exact":
        planted = jax.vmap(jnp.diag)(scales)
    elif representation == "eigen":
        planted = {"A": inner.metrics["a"]["A"], "S": scales}
    else:
        planted = {"S": scales}
    inner = inner._replace(metrics={**inner.metrics, "a": planted})
    state = (inner,) + tuple(state[1:])
    diag = jax.jit(rfim_jax.diagnostics)(state, params)
    np.testing.assert_allclose(diag["a/min_eigenvalue"], 0.5, rtol=1e-12)
    np.testing.assert_allclose(diag["a/max_eigenvalue"], 4.0, rtol=1e-12)
    np.testing.assert_allclose(diag["a/condition_number"], 8.0, rtol=1e-12)
    np.testing.assert_allclose(diag["a/trace"], float(np.sum(scales)), rtol=1e-12)
    # The identity start of layer "b".
    np.testing.assert_allclose(diag["b/condition_number"], 1.0, rtol=1e-12)
    theta = _theta(params["a"])
    np.testing.assert_allclose(diag["a/relative_fisher_rao_norm"],
                               np.sum(np.asarray(scales).reshape(-1) * theta**2), rtol=1e-12)
    assert int(diag["count"]) == 0


def test_diagnostics_counts_skipped_steps_and_does_not_recompile():
    tx, params = _state_and_params("eigen")
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)

    def acts(bad):
        a = {"a": {"inputs": jnp.asarray(rng.normal(size=(8, 4))),
                   "preacts": jnp.asarray(rng.normal(size=(8, 3)))},
             "b": {"inputs": jnp.asarray(rng.normal(size=(8, 3))),
                   "preacts": jnp.asarray(rng.normal(size=(8, 2)))}}
        if bad:
            a["a"]["inputs"] = a["a"]["inputs"].at[0, 0].set(jnp.nan)
        return a

    update = jax.jit(tx.update)
    traces = []

    def diagnostics(*a, **k):
        traces.append(1)  # a Python side effect: runs when tracing only
        return rfim_jax.diagnostics(*a, **k)

    diag_fn = jax.jit(diagnostics)
    for bad in (False, True, False, True):
        upd, state = update(grads, state, params, activations=acts(bad))
        diag = diag_fn(state, params, grads=grads, updates=upd)
    assert int(diag["a/skipped"]) == 2 and int(diag["b/skipped"]) == 0
    assert int(diag["a/fallbacks"]) == 0
    assert len(traces) == 1  # called every step, traced once
    # |update| / |grad| from the trees given, computed here directly.
    g = np.concatenate([np.ravel(grads["b"]["kernel"]), np.ravel(grads["b"]["bias"])])
    u = np.concatenate([np.ravel(upd["b"]["kernel"]), np.ravel(upd["b"]["bias"])])
    np.testing.assert_allclose(diag["b/step_to_grad_norm"],
                               np.linalg.norm(u) / np.linalg.norm(g), rtol=1e-12)


def test_relative_norm_from_a_state_matches_layer_metrics():
    tx, params = _state_and_params("exact")
    state = tx.init(params)
    norms = rfim_jax.relative_fisher_rao_norm(state, params)
    # From the identity: sum of squares of theta.
    for path in ("a", "b"):
        np.testing.assert_allclose(norms[path], np.sum(_theta(params[path]) ** 2), rtol=1e-12)


def test_diagnostics_errors():
    with pytest.raises(ValueError, match="exactly one ScaleByRNGDState"):
        rfim_jax.diagnostics({"not": jnp.zeros(2)})


def test_diagnostics_cover_every_layer_type():
    """At init every metric is the identity, so each layer's relative Fisher-Rao norm is its
    params' squared L2 norm: conv, multi-axis dense, LayerNorm and embedding alike."""
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4))),
                       "bias": jnp.asarray(rng.normal(size=4))},
              "ln": {"scale": jnp.asarray(rng.normal(size=4)), "bias": jnp.ones(4)},
              "emb": {"embedding": jnp.asarray(rng.normal(size=(5, 4)))},
              "dg": {"kernel": jnp.asarray(rng.normal(size=(4, 2, 3))),
                     "bias": jnp.asarray(rng.normal(size=(2, 3)))}}
    layers = {"conv": "relu", "ln": "linear", "emb": "linear", "dg": "linear"}
    for rep in ("auto", "diagonal"):
        tx = rfim_jax.scale_by_rngd(layers, representation=rep)
        out = rfim_jax.diagnostics(tx.init(params), params, grads=params, updates=params)
        for path in layers:
            want = sum(float(np.sum(np.square(a))) for a in jax.tree.leaves(params[path]))
            np.testing.assert_allclose(out[f"{path}/relative_fisher_rao_norm"], want, rtol=1e-10)
            assert float(out[f"{path}/step_to_grad_norm"]) == 1.0
            np.testing.assert_allclose(out[f"{path}/min_eigenvalue"], 1.0)


def test_diagnostics_of_a_stacked_layer_are_per_slice():
    rng = np.random.default_rng(1)
    params = {"blk": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 2))),
                      "bias": jnp.asarray(rng.normal(size=(3, 2)))}}
    tx = rfim_jax.scale_by_rngd({"blk": "relu"})
    out = rfim_jax.diagnostics(tx.init(params), params)
    for k in range(3):
        want = float(np.sum(np.square(params["blk"]["kernel"][k]))
                     + np.sum(np.square(params["blk"]["bias"][k])))
        np.testing.assert_allclose(out[f"blk/{k}/relative_fisher_rao_norm"], want, rtol=1e-10)
        assert float(out[f"blk/{k}/trace"]) == 2 * 5  # identity blocks, m = 2, d = 5
    assert int(out["blk/skipped"]) == 0


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_diagnostics_of_a_bfloat16_state_are_float32(representation):
    """LAPACK has no bfloat16 eigensolver (diagnostics raised NotImplementedError), and a
    bfloat16 trace has 3 digits: the figures are computed in float32."""
    f32 = jnp.float32
    params = {"Dense_0": {"kernel": jnp.full((3, 4), 0.3, f32), "bias": jnp.zeros(4, f32)},
              "Dense_1": {"kernel": jnp.full((4, 2), 0.3, f32), "bias": jnp.zeros(2, f32)}}
    layers = {"Dense_0": "relu", "Dense_1": "softmax"}
    x = jnp.linspace(-1.0, 1.0, 24, dtype=f32).reshape(8, 3)
    z0 = x @ params["Dense_0"]["kernel"]
    acts = {"Dense_0": {"inputs": x, "preacts": z0},
            "Dense_1": {"inputs": jax.nn.relu(z0), "preacts": jax.nn.relu(z0) @ params[
                "Dense_1"]["kernel"]}}
    figures = {}
    for dtype in (None, jnp.bfloat16):
        tx = rfim_jax.scale_by_rngd(layers, state_dtype=dtype, representation=representation)
        # Jitted: run eagerly, the update compiled each of its ops alone (about 10 s here).
        update = jax.jit(lambda s, a, tx=tx: tx.update(params, s, params, activations=a))
        _, state = update(tx.init(params), acts)
        figures[dtype] = rfim_jax.diagnostics(state, params)
    for key, value in figures[jnp.bfloat16].items():
        if jnp.issubdtype(value.dtype, jnp.floating):
            assert value.dtype == jnp.float32, key
            np.testing.assert_allclose(value, figures[None][key], rtol=2e-2, err_msg=key)


def test_diagnostics_of_an_nnx_optimizer_state_are_plain_arrays():
    """The counters came back as nnx.OptArray wrappers; the docstring promises jnp scalars."""
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rfim_jax.rngd(0.1, None), wrt=nnx.Param)
    out = rfim_jax.diagnostics(optimizer.opt_state, nnx.state(model, nnx.Param))
    assert out and all(type(v) is type(jnp.zeros(())) for v in out.values()), {
        k: type(v).__name__ for k, v in out.items()}


def test_a_frozen_layer_logs_zero_and_missing_params_name_the_layer():
    rng = np.random.default_rng(8)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 2))), "bias": jnp.zeros(2)},
              "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(2, 2))), "bias": jnp.zeros(2)}}
    x = jnp.asarray(rng.normal(size=(5, 3)))
    z0 = x @ params["Dense_0"]["kernel"]
    z1 = z0 @ params["Dense_1"]["kernel"]
    acts = {"Dense_0": {"inputs": x, "preacts": z0}, "Dense_1": {"inputs": z0, "preacts": z1}}
    tx = rfim_jax.scale_by_rngd({"Dense_0": "tanh", "Dense_1": "softmax"})
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, tx.init(params), params, activations=acts)
    zeros = jax.tree.map(jnp.zeros_like, params)
    half = {"Dense_0": zeros["Dense_0"], "Dense_1": grads["Dense_1"]}
    out = rfim_jax.diagnostics(state, params, grads=half, updates=half)
    assert float(out["Dense_0/step_to_grad_norm"]) == 0.0  # 0 / 0 read as no step, not NaN
    assert float(out["Dense_1/step_to_grad_norm"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"layer 'Dense_0' of the RNGD state is not a layer of "
                                         r"the params given .*\['Dense_1'\]"):
        rfim_jax.diagnostics(state, {"Dense_1": params["Dense_1"]})
    metric = rfim_jax.layer_metrics(state, params)["Dense_0"]
    with pytest.raises(TypeError, match=r"relative_fisher_rao_norm: complex dtype"):
        rfim_jax.relative_fisher_rao_norm(
            metric, jax.tree.map(lambda a: a.astype(jnp.complex64), params["Dense_0"]))
