"""scale_by_rngd / rngd / scale_by_whitening against a direct numpy computation of SPEC §4.

The reference (tests/_reference.py) re-derives every step from the paper with numpy loops
over neurons and samples; it shares no code with the library.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import ReferenceEigenRNGD, ReferenceRNGD, reference_blocks

import rfim_jax

# ------------------------------------------------------------------------------ fixtures

KINDS = ["relu", "tanh", "sigmoid", "elu", "linear", "softmax"]


def _make_problem(rng, kinds, has_bias=True, n=6, widths=None):
    widths = widths or [int(w) for w in rng.integers(2, 5, size=len(kinds) + 1)]
    params, specs = {}, {}
    for i, kind in enumerate(kinds):
        layer = {"kernel": jnp.asarray(rng.normal(size=(widths[i], widths[i + 1])))}
        if has_bias:
            layer["bias"] = jnp.asarray(rng.normal(size=widths[i + 1]))
        params[f"Dense_{i}"] = layer
        specs[f"Dense_{i}"] = (kind, widths[i], widths[i + 1], has_bias)
    return params, specs


def _random_acts(rng, specs, n, lead=()):
    acts = {}
    for path, (_, d_in, m, _) in specs.items():
        acts[path] = {
            "inputs": jnp.asarray(rng.normal(size=lead + (n, d_in))),
            "preacts": jnp.asarray(2 * rng.normal(size=lead + (n, m))),
        }
    return acts


def _random_grads(rng, params):
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)


def _flat_acts(acts):
    return {p: {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in a.items()}
            for p, a in acts.items()}


def _step_against_reference(rng, tx, update, ref, params, specs, sizes, has_bias):
    """Runs ``update`` and the numpy reference side by side on random batches of ``sizes``,
    asserting equal updates at every step; returns the final state."""
    state = tx.init(params)
    for n in sizes:
        acts = _random_acts(rng, specs, n=n)
        grads = _random_grads(rng, params)
        out, state = update(grads, state, params, activations=acts)
        expected = ref.update(grads, _flat_acts(acts))
        for path, (k, b) in expected.items():
            np.testing.assert_allclose(out[path]["kernel"], k, rtol=1e-7, atol=1e-9)
            if has_bias:
                np.testing.assert_allclose(out[path]["bias"], b, rtol=1e-7, atol=1e-9)
    return state


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "seed,has_bias,inverse_every", [(0, True, 1), (1, False, 3), (2, True, 3), (3, True, 2)]
)
def test_scale_by_rngd_matches_direct_computation(seed, has_bias, inverse_every):
    rng = np.random.default_rng(seed)
    params, specs = _make_problem(rng, KINDS, has_bias=has_bias)
    decay, eps0 = 0.8, 0.05
    tx = rfim_jax.scale_by_rngd({p: s[0] for p, s in specs.items()}, decay=decay,
                                inverse_every=inverse_every, damping=eps0)
    ref = ReferenceRNGD(specs, decay, inverse_every, eps0)
    traces = []

    def traced_update(*args, **kwargs):
        traces.append(kwargs["activations"][next(iter(specs))]["inputs"].shape)
        return tx.update(*args, **kwargs)

    update = jax.jit(traced_update)
    sizes = [int(n) for n in rng.integers(3, 6, size=5)]
    state = _step_against_reference(rng, tx, update, ref, params, specs, sizes, has_bias)
    assert int(state.count) == 5
    # One trace per batch size: repeated calls with the same shapes never retrace.  (Counted
    # by the traced function: the C++ executable cache stops taking new functions once a
    # long session has created 8192 jitted ones, so its size is no measure.)
    assert sorted(t[0] for t in traces) == sorted(set(sizes))


@pytest.mark.parametrize("has_bias", [True, False])
def test_an_outgrown_inverse_is_refreshed_early(has_bias):
    """A unit dead at a refresh (its block decayed to 1e-18 of its size) and alive again got
    that tiny block's inverse: steps up to 1e15x too long until the next refresh.  The
    numpy reference measures staleness on its own and refreshes on the step the unit fires
    again; without that rule its step is many orders of magnitude longer."""
    rng = np.random.default_rng(5)
    d_in, m, n = 3, 2, 8
    kernel = rng.normal(size=(d_in, m))
    params = {"Dense_0": {"kernel": jnp.asarray(kernel)}}
    if has_bias:
        params["Dense_0"]["bias"] = jnp.zeros(m)
    specs = {"Dense_0": ("relu", d_in, m, has_bias)}
    decay, every, eps0 = 0.5, 50, 1e-2
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, decay=decay, inverse_every=every,
                                damping=eps0)
    ref = ReferenceRNGD(specs, decay, every, eps0)
    unguarded = ReferenceRNGD(specs, decay, every, eps0, stale_factor=None)
    update = jax.jit(tx.update)
    state = tx.init(params)
    longest = {}
    for step in range(64):
        x = rng.normal(size=(n, d_in))
        z = x @ kernel
        if 5 <= step < 60:  # neuron 0 dead (nu = s(z)^2 ~ 1e-35), refreshed at 50 while dead
            z[:, 0] = -40.0
        acts = {"Dense_0": {"inputs": jnp.asarray(x), "preacts": jnp.asarray(z)}}
        grads = _random_grads(rng, params)
        out, state = update(grads, state, params, activations=acts)
        flat = {"Dense_0": {"inputs": x, "preacts": z}}
        want_k, want_b = ref.update(grads, flat)["Dense_0"]
        plain_k, _ = unguarded.update(grads, flat)["Dense_0"]
        np.testing.assert_allclose(out["Dense_0"]["kernel"], want_k, rtol=1e-6, atol=1e-9)
        if has_bias:
            np.testing.assert_allclose(out["Dense_0"]["bias"], want_b, rtol=1e-6, atol=1e-9)
        if step >= 60:
            longest[step] = (np.abs(want_k[:, 0]).max(), np.abs(plain_k[:, 0]).max())
        assert ref.early == (step >= 60), (step, ref.early)
    # One early refresh, on the step the unit fired again; the inverses then fit.
    np.testing.assert_allclose(state.inverses["Dense_0"], np.stack(ref.inv["Dense_0"]),
                               rtol=1e-6)
    for step, (guarded, plain) in longest.items():
        assert guarded < 1e3 and plain > 1e8 * guarded, (step, guarded, plain)


@pytest.mark.parametrize("stacked", [False, True])
def test_early_refresh_with_statistics_every_other_step_and_stacked_layers(stacked):
    """The early refresh also acts when the statistics run every k-th step (inside their
    conditional) and on a stacked layer: the same updates as the caller forcing
    ``refresh=`` on exactly the scheduled steps and the step the dead unit fires again."""
    rng = np.random.default_rng(6)
    d_in, m, n, num = 3, 2, 8, 2
    kernel = rng.normal(size=(num, d_in, m) if stacked else (d_in, m))
    params = {"l": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(kernel.shape[:-2] + (m,))}}
    kw = dict(decay=0.5, inverse_every=50, damping=1e-2, update_every=2)
    auto = rfim_jax.scale_by_rngd({"l": "relu"}, **kw)
    forced = rfim_jax.scale_by_rngd({"l": "relu"}, **kw)
    step_auto = jax.jit(auto.update)
    step_forced = jax.jit(lambda g, s, p, activations, r: forced.update(
        g, s, p, activations=activations, refresh=r))
    s_auto, s_forced = auto.init(params), forced.init(params)
    for step in range(66):
        x = rng.normal(size=(num, n, d_in) if stacked else (n, d_in))
        z = np.einsum("...ni,...im->...nm", x, kernel)
        if 5 <= step < 60:
            z[..., 0] = -40.0
        acts = {"l": {"inputs": jnp.asarray(x), "preacts": jnp.asarray(z)}}
        grads = jax.tree.map(lambda a: rng.normal(size=a.shape), params)
        if 5 <= step < 60:  # a dead relu unit's gradient is 0
            grads = jax.tree.map(lambda a: a * (np.arange(m) != 0), grads)
        u_auto, s_auto = step_auto(grads, s_auto, params, activations=acts)
        refresh = step % 50 == 0 or step == 60  # 60: statistics step, the unit fires again
        u_forced, s_forced = step_forced(grads, s_forced, params, acts, jnp.asarray(refresh))
        np.testing.assert_allclose(u_auto["l"]["kernel"], u_forced["l"]["kernel"], rtol=1e-9)
        assert np.abs(u_auto["l"]["kernel"]).max() < 1e3, step


@pytest.mark.parametrize("mode", ["static", "traced"])
def test_refresh_decided_by_the_caller_matches_numpy_reference(mode):
    """``refresh=`` a Python bool compiles two steps without a conditional; a boolean array
    is the conditional's predicate.  Either way, ``refresh = (count % T == 0)`` gives the
    numpy reference's updates (which refreshes on that schedule)."""
    rng = np.random.default_rng(11)
    params, specs = _make_problem(rng, KINDS, has_bias=True)
    tx = rfim_jax.scale_by_rngd({p: s[0] for p, s in specs.items()}, decay=0.8,
                                inverse_every=3, damping=0.05)
    ref = ReferenceRNGD(specs, 0.8, 3, 0.05)
    steps = {flag: jax.jit(lambda g, s, p, activations, flag=flag: tx.update(
        g, s, p, activations=activations, refresh=flag)) for flag in (True, False)}
    traced = jax.jit(lambda g, s, p, activations, flag: tx.update(
        g, s, p, activations=activations, refresh=flag))
    calls = []

    def update(grads, state, params, *, activations):
        flag = len(calls) % 3 == 0
        calls.append(flag)
        if mode == "static":
            return steps[flag](grads, state, params, activations)
        return traced(grads, state, params, activations, jnp.asarray(flag))

    state = _step_against_reference(rng, tx, update, ref, params, specs, [4] * 7, True)
    assert calls == [True, False, False] * 2 + [True] and int(state.count) == 7
    acts = _random_acts(rng, specs, n=4)
    grads = _random_grads(rng, params)
    for flag in (True, False):
        hlo = steps[flag].lower(grads, state, params, acts).compile().as_text()
        assert "conditional(" not in hlo, flag
    assert "conditional(" in traced.lower(grads, state, params, acts,
                                          jnp.asarray(True)).compile().as_text()


def test_refresh_must_be_a_bool_or_a_boolean_scalar():
    rng = np.random.default_rng(0)
    params, specs = _make_problem(rng, ["relu"], widths=[3, 2])
    tx = rfim_jax.rngd(0.1, {"Dense_0": "relu"})
    state = tx.init(params)
    acts = _random_acts(rng, specs, n=4)
    grads = _random_grads(rng, params)
    for bad, got in (("yes", "'yes'"), (1, "1"),
                     (jnp.ones(2, bool), "an array of dtype bool and shape (2,)"),
                     (jnp.asarray(1), "an array of dtype int")):
        with pytest.raises(TypeError, match=r"scale_by_rngd: refresh must be None, a Python "
                                            r"bool or a scalar boolean array, got "
                                            + re.escape(got)):
            tx.update(grads, state, params, activations=acts, refresh=bad)
    # through rngd's chain, a numpy bool is static too
    updates, _ = tx.update(grads, state, params, activations=acts, refresh=np.bool_(True))
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_first_update_refreshes_and_moving_average_starts_at_identity():
    rng = np.random.default_rng(0)
    params, specs = _make_problem(rng, ["relu"], widths=[3, 2])
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, decay=0.5, inverse_every=100, damping=0.0)
    state = tx.init(params)
    np.testing.assert_array_equal(state.metrics["Dense_0"], np.broadcast_to(np.eye(4), (2, 4, 4)))
    acts = _random_acts(rng, specs, n=5)
    _, state = tx.update(_random_grads(rng, params), state, activations=acts)
    fresh = reference_blocks("relu", *(_flat_acts(acts)["Dense_0"][k] for k in
                                       ("inputs", "preacts")), True, 0.0)
    expected = [0.5 * np.eye(4) + 0.5 * f for f in fresh]
    np.testing.assert_allclose(state.metrics["Dense_0"], expected, rtol=1e-10)
    np.testing.assert_allclose(state.inverses["Dense_0"], [np.linalg.inv(e) for e in expected],
                               rtol=1e-7, atol=1e-9)
    # Count 1 is not a refresh step: the inverse stays while the average moves on.
    inv_before = state.inverses["Dense_0"]
    _, state = tx.update(_random_grads(rng, params), state, activations=acts)
    np.testing.assert_array_equal(state.inverses["Dense_0"], inv_before)


def test_leading_batch_axes_are_flattened():
    rng = np.random.default_rng(1)
    params, specs = _make_problem(rng, ["tanh", "linear"])
    tx = rfim_jax.scale_by_rngd({p: s[0] for p, s in specs.items()}, inverse_every=1)
    acts3 = _random_acts(rng, specs, n=3, lead=(2,))
    acts2 = jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), acts3)
    grads = _random_grads(rng, params)
    out3, _ = tx.update(grads, tx.init(params), activations=acts3)
    out2, _ = tx.update(grads, tx.init(params), activations=acts2)
    jax.tree.map(np.testing.assert_allclose, out3, out2)


def test_nested_paths_pass_through_and_flat_activations():
    rng = np.random.default_rng(2)
    params = {
        "block": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4))),
                              "bias": jnp.zeros(4)}},
        "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2))), "bias": jnp.zeros(2)},
        "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    }
    x = jnp.asarray(rng.normal(size=(5, 3)))
    z = x @ params["block"]["Dense_0"]["kernel"]
    layers = {"block/Dense_0": "relu", "head": None}
    tx = rfim_jax.scale_by_rngd(layers, inverse_every=1)
    grads = _random_grads(rng, params)
    nested = {"block": {"Dense_0": {"inputs": x, "preacts": z}}}
    flat = {"block/Dense_0": {"inputs": x, "preacts": z}}
    out_nested, state = tx.update(grads, tx.init(params), activations=nested)
    out_flat, _ = tx.update(grads, tx.init(params), activations=flat)
    jax.tree.map(np.testing.assert_array_equal, out_nested, out_flat)
    # kind None and non-dense params are untouched; the state holds only the RNGD layer.
    jax.tree.map(np.testing.assert_array_equal, out_nested["head"], grads["head"])
    jax.tree.map(np.testing.assert_array_equal, out_nested["LayerNorm_0"], grads["LayerNorm_0"])
    assert set(state.metrics) == {"block/Dense_0"}
    # The named layer is preconditioned: the numpy reference's first step (relu, defaults).
    ref = ReferenceRNGD({"block/Dense_0": ("relu", 3, 4, True)}, 0.995, 1, 1e-2)
    want_k, want_b = ref.update({"block/Dense_0": grads["block"]["Dense_0"]},
                                _flat_acts(flat))["block/Dense_0"]
    np.testing.assert_allclose(out_nested["block"]["Dense_0"]["kernel"], want_k, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(out_nested["block"]["Dense_0"]["bias"], want_b, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_rngd_is_chain_of_scale_trace_and_learning_rate(momentum):
    rng = np.random.default_rng(7)
    params, specs = _make_problem(rng, ["relu", "softmax"])
    layers = {p: s[0] for p, s in specs.items()}
    lr = 0.3
    tx = rfim_jax.rngd(lr, layers, momentum=momentum, inverse_every=2)
    pre = rfim_jax.scale_by_rngd(layers, inverse_every=2)
    s_tx, s_pre = tx.init(params), pre.init(params)
    tx_update, pre_update = jax.jit(tx.update), jax.jit(pre.update)
    trace = jax.tree.map(jnp.zeros_like, params)
    for _ in range(4):
        acts = _random_acts(rng, specs, n=4)
        grads = _random_grads(rng, params)
        out, s_tx = tx_update(grads, s_tx, params, activations=acts)
        direction, s_pre = pre_update(grads, s_pre, params, activations=acts)
        if momentum is not None:
            trace = jax.tree.map(lambda t, g: momentum * t + g, trace, direction)
            direction = trace
        jax.tree.map(lambda o, d: np.testing.assert_allclose(o, -lr * d, rtol=1e-12), out,
                     direction)


def test_rngd_accepts_a_schedule():
    """linear_schedule(1, 0, 4) gives lr 1, 0.75, 0.5.  Same batch, no momentum and no refresh
    after the first step: the preconditioned direction is the same every step, so the updates
    are exactly lr_t times the first, which is the numpy reference's first step."""
    rng = np.random.default_rng(0)
    params, specs = _make_problem(rng, ["relu"])
    sched = optax.linear_schedule(1.0, 0.0, 4)
    tx = rfim_jax.rngd(sched, {"Dense_0": "relu"}, momentum=None)
    state = tx.init(params)
    acts = _random_acts(rng, specs, n=4)
    grads = _random_grads(rng, params)
    outs = []
    for _ in range(3):
        out, state = tx.update(grads, state, params, activations=acts)
        outs.append(out["Dense_0"])
    want_k, want_b = ReferenceRNGD(specs, 0.995, 100, 1e-2).update(grads, _flat_acts(acts))[
        "Dense_0"]
    np.testing.assert_allclose(outs[0]["kernel"], -want_k, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(outs[0]["bias"], -want_b, rtol=1e-9, atol=1e-12)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(outs[2][name], 0.5 * outs[0][name])
        np.testing.assert_allclose(outs[1][name], 0.75 * outs[0][name], rtol=1e-15, atol=0)
    norms = [float(jnp.linalg.norm(o["kernel"])) for o in outs]
    assert norms[2] / norms[0] == 0.5


def test_update_every_one_is_default_and_k_skips_statistics():
    rng = np.random.default_rng(3)
    params, specs = _make_problem(rng, ["relu"])
    decay, k = 0.9, 3
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, decay=decay, update_every=k,
                                inverse_every=1, damping=0.01)
    state = tx.init(params)
    update = jax.jit(tx.update)
    G = [np.eye(specs["Dense_0"][1] + 1)] * specs["Dense_0"][2]
    for step in range(5):
        acts = _random_acts(rng, specs, n=4)
        _, state = update(_random_grads(rng, params), state, activations=acts)
        if step % k == 0:
            a = _flat_acts(acts)["Dense_0"]
            fresh = reference_blocks("relu", a["inputs"], a["preacts"], True, 0.01)
            G = [decay**k * g + (1 - decay**k) * f for g, f in zip(G, fresh, strict=True)]
        np.testing.assert_allclose(state.metrics["Dense_0"], G, rtol=1e-10)


def test_normalize_max_eigenvalue_scales_by_largest_eigenvalue():
    rng = np.random.default_rng(4)
    params, specs = _make_problem(rng, ["relu"])
    acts = _random_acts(rng, specs, n=6)
    grads = _random_grads(rng, params)
    plain = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, inverse_every=1, decay=0.5)
    balanced = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, inverse_every=1, decay=0.5,
                                      normalize_max_eigenvalue=True)
    out_p, s_p = plain.update(grads, plain.init(params), activations=acts)
    out_b, _ = balanced.update(grads, balanced.init(params), activations=acts)
    lam = max(np.linalg.eigvalsh(b).max() for b in np.asarray(s_p.metrics["Dense_0"]))
    np.testing.assert_allclose(out_b["Dense_0"]["kernel"], lam * out_p["Dense_0"]["kernel"],
                               rtol=1e-6)


def test_scale_by_whitening_is_linear_rfim_on_every_layer(seed):
    rng = np.random.default_rng(seed)
    params, specs = _make_problem(rng, ["linear", "linear"])
    tx = rfim_jax.scale_by_whitening(decay=0.7, inverse_every=1)
    ref = ReferenceRNGD(specs, 0.7, 1, 1e-2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        acts = _random_acts(rng, specs, n=5)
        grads = _random_grads(rng, params)
        out, state = update(grads, state, activations=acts)
        for path, (k, b) in ref.update(grads, _flat_acts(acts)).items():
            np.testing.assert_allclose(out[path]["kernel"], k, rtol=1e-7)
            np.testing.assert_allclose(out[path]["bias"], b, rtol=1e-7)
    assert tuple(state.metrics["Dense_0"].shape) == (1, specs["Dense_0"][1] + 1,
                                                     specs["Dense_0"][1] + 1)


def test_float32_params_keep_float32_state_and_updates():
    rng = np.random.default_rng(5)
    params, specs = _make_problem(rng, ["relu", "linear"])
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    acts = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _random_acts(rng, specs, n=4))
    grads = jax.tree.map(lambda p: p.astype(jnp.float32), _random_grads(rng, params))
    tx = rfim_jax.scale_by_rngd({p: s[0] for p, s in specs.items()})
    out, state = jax.jit(tx.update)(grads, tx.init(params), activations=acts)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))
    assert all(v.dtype == jnp.float32 for v in state.metrics.values())
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))


def test_invalid_configuration_errors():
    with pytest.raises(ValueError, match="inverse_every must be a positive integer, got 0"):
        rfim_jax.scale_by_rngd({}, inverse_every=0)
    with pytest.raises(ValueError, match="update_every must be a positive integer, got 2.5"):
        rfim_jax.scale_by_rngd({}, update_every=2.5)


def test_layers_must_be_a_mapping():
    params, _ = _make_problem(np.random.default_rng(0), ["relu"], widths=[3, 2])
    with pytest.raises(TypeError, match=r"layers must map layer paths to kinds, .* got list"):
        rfim_jax.scale_by_rngd(["Dense_0"]).init(params)


def test_scale_by_whitening_accepts_a_list_of_paths():
    rng = np.random.default_rng(1)
    params, specs = _make_problem(rng, ["linear", "linear"])
    acts = _random_acts(rng, specs, n=4)
    grads = _random_grads(rng, params)
    tx = rfim_jax.scale_by_whitening(["Dense_1"], inverse_every=1)
    _assert_whitens_only_dense_1(tx, params, specs, acts, grads)


def _assert_whitens_only_dense_1(tx, params, specs, acts, grads):
    """One step of ``tx``: Dense_0 passes through, Dense_1 matches the numpy reference."""
    out, state = tx.update(grads, tx.init(params), activations={"Dense_1": acts["Dense_1"]})
    assert set(state.metrics) == {"Dense_1"}
    jax.tree.map(np.testing.assert_array_equal, out["Dense_0"], grads["Dense_0"])
    ref = ReferenceRNGD({"Dense_1": specs["Dense_1"]}, 0.995, 1, 1e-2)
    kernel, bias = ref.update(grads, _flat_acts(acts))["Dense_1"]
    np.testing.assert_allclose(out["Dense_1"]["kernel"], kernel, rtol=1e-7)
    np.testing.assert_allclose(out["Dense_1"]["bias"], bias, rtol=1e-7)


def test_scale_by_whitening_keeps_a_linear_sigma():
    """A mapping's Linear(sigma) is kept: A = mean x~ x~^T / sigma^2 (eq. 22), not sigma 1."""
    rng = np.random.default_rng(2)
    params, specs = _make_problem(rng, ["linear"])
    acts = _random_acts(rng, specs, n=5)
    grads = _random_grads(rng, params)
    tx = rfim_jax.scale_by_whitening({"Dense_0": rfim_jax.Linear(sigma=3.0)}, inverse_every=1)
    out, _ = tx.update(grads, tx.init(params), activations=acts)
    ref = ReferenceRNGD({"Dense_0": (("linear", 3.0),) + specs["Dense_0"][1:]}, 0.995, 1, 1e-2)
    kernel, bias = ref.update(grads, _flat_acts(acts))["Dense_0"]
    np.testing.assert_allclose(out["Dense_0"]["kernel"], kernel, rtol=1e-7)
    np.testing.assert_allclose(out["Dense_0"]["bias"], bias, rtol=1e-7)


def test_scale_by_whitening_mapping_none_passes_through():
    """A None in the mapping is a pass-through layer, as in scale_by_rngd (it was refused,
    by an error that listed None among the valid kinds)."""
    rng = np.random.default_rng(3)
    params, specs = _make_problem(rng, ["linear", "linear"])
    acts = _random_acts(rng, specs, n=4)
    grads = _random_grads(rng, params)
    tx = rfim_jax.scale_by_whitening({"Dense_0": None, "Dense_1": "linear"}, inverse_every=1)
    _assert_whitens_only_dense_1(tx, params, specs, acts, grads)


def test_scale_by_whitening_refuses_per_neuron_linear_and_a_bare_path():
    with pytest.raises(ValueError, match=r"scale_by_whitening: layer 'Dense_0'.*per_neuron"):
        rfim_jax.scale_by_whitening({"Dense_0": rfim_jax.Linear(per_neuron=True)})
    with pytest.raises(TypeError, match=r"scale_by_whitening: layers.*list.*\['Dense_0'\]"):
        rfim_jax.scale_by_whitening("Dense_0")


@pytest.mark.parametrize("representation", ["exact", "diagonal"])
def test_per_neuron_linear_is_the_shared_linear_metric(representation):
    """Linear(per_neuron=True) stores m copies of the shared block: the same updates, and the
    exact state is (m, d, d) instead of (1, d, d).  (Eigen differs by design: the shared
    kind's eigen form is exact, a per-neuron one keeps per-neuron scales in a basis.)"""
    rng = np.random.default_rng(3)
    params, specs = _make_problem(rng, ["linear"], widths=[4, 3])
    kinds = {"shared": "linear", "per_neuron": rfim_jax.Linear(sigma=0.7, per_neuron=True)}
    shared_sigma = rfim_jax.Linear(sigma=0.7)
    txs = {name: rfim_jax.scale_by_rngd({"Dense_0": kind}, decay=0.6, inverse_every=2,
                                         representation=representation)
           for name, kind in (("shared", shared_sigma), ("per_neuron", kinds["per_neuron"]))}
    states = {name: tx.init(params) for name, tx in txs.items()}
    for _ in range(4):
        acts, grads = _random_acts(rng, specs, n=6), _random_grads(rng, params)
        outs = {}
        for name, tx in txs.items():
            outs[name], states[name] = jax.jit(tx.update)(grads, states[name],
                                                          activations=acts)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
                     outs["per_neuron"], outs["shared"])
    if representation == "exact":
        assert states["shared"].metrics["Dense_0"].shape == (1, 5, 5)
        assert states["per_neuron"].metrics["Dense_0"].shape == (3, 5, 5)


# ------------------------------------------------------------------ representations (SPEC §7)


@pytest.mark.parametrize("representation", ["eigen", "diagonal"])
@pytest.mark.parametrize(
    "seed,has_bias,inverse_every", [(0, True, 1), (1, False, 3), (2, True, 2)]
)
def test_eigen_and_diagonal_match_numpy_reference(representation, seed, has_bias, inverse_every):
    rng = np.random.default_rng(seed)
    params, specs = _make_problem(rng, KINDS, has_bias=has_bias)
    decay, eps0 = 0.8, 0.05
    tx = rfim_jax.scale_by_rngd({p: s[0] for p, s in specs.items()}, decay=decay,
                                inverse_every=inverse_every, damping=eps0,
                                representation=representation)
    ref = ReferenceEigenRNGD(specs, decay, inverse_every, eps0,
                             diagonal=representation == "diagonal")
    # n > d: with fewer samples than inputs, A has a repeated eigenvalue (its null space), where
    # any basis is an eigenbasis and the carried S depends on which one eigh returns.
    sizes = [int(n) for n in rng.integers(7, 10, size=5)]
    state = _step_against_reference(rng, tx, jax.jit(tx.update), ref, params, specs, sizes,
                                    has_bias)
    # The state holds what SPEC §7 says, in its shapes.
    for path, (kind, d_in, m, _) in specs.items():
        d, rows = d_in + has_bias, 1 if kind == "linear" else m
        np.testing.assert_allclose(state.metrics[path]["S"], ref.S[path], rtol=1e-7, atol=1e-9)
        if representation == "eigen":
            assert state.metrics[path]["A"].shape == (d, d)
            assert state.inverses[path]["U"].shape == (d, d)
            np.testing.assert_allclose(state.metrics[path]["A"], ref.A[path], rtol=1e-9)
        assert state.metrics[path]["S"].shape == (rows, d)


@pytest.mark.parametrize("sigma", [1.0, 2.5])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_kind_eigen_equals_exact_with_refresh_every_step(has_bias, sigma):
    """SPEC §7, for any sigma: the identity start must not be rescaled by 1/sigma^2."""
    rng = np.random.default_rng(5)
    params, specs = _make_problem(rng, ["linear", "linear"], has_bias=has_bias)
    layers = {p: rfim_jax.Linear(sigma=sigma) for p in specs}
    runs = {}
    for rep in ("exact", "eigen"):
        tx = rfim_jax.scale_by_rngd(layers, decay=0.7, inverse_every=1, damping=0.03,
                                    representation=rep)
        state, outs = tx.init(params), []
        rng_data = np.random.default_rng(9)
        for _ in range(4):
            acts = _random_acts(rng_data, specs, n=5)
            grads = _random_grads(rng_data, params)
            out, state = jax.jit(tx.update)(grads, state, params, activations=acts)
            outs.append(out)
        runs[rep] = outs
    for a, b in zip(runs["exact"], runs["eigen"], strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-11)


def test_eigen_as_metric_diagonal_in_basis_is_exact_average():
    # After one step from the identity with a refresh, the eigen state's block l in basis U has
    # the exact moving average's diagonal: diag(U^T G_l U) with G_l from the exact estimator.
    rng = np.random.default_rng(11)
    params, specs = _make_problem(rng, ["tanh"], widths=[4, 3])
    acts = _random_acts(rng, specs, n=9)
    grads = _random_grads(rng, params)
    exact = rfim_jax.scale_by_rngd({"Dense_0": "tanh"}, decay=0.6, inverse_every=1,
                                   representation="exact")
    eigen = rfim_jax.scale_by_rngd({"Dense_0": "tanh"}, decay=0.6, inverse_every=1,
                                   representation="eigen")
    _, s_exact = exact.update(grads, exact.init(params), activations=acts)
    _, s_eigen = eigen.update(grads, eigen.init(params), activations=acts)
    u = np.asarray(s_eigen.inverses["Dense_0"]["U"])
    g = np.asarray(s_exact.metrics["Dense_0"])
    # The fresh S was computed in the basis before the refresh (the identity), then carried.
    # So compare in that first basis: diag(G_l) carried by P = U^T I.
    p = u.T
    for l in range(g.shape[0]):
        want = (p * p) @ np.diag(g[l])
        np.testing.assert_allclose(s_eigen.metrics["Dense_0"]["S"][l], want, rtol=1e-10)


def test_a_nan_batch_cannot_make_the_params_nan():
    """Robustness item 7: plain rngd's default zeroes a non-finite update and counts it."""
    rng = np.random.default_rng(3)
    params, specs = _make_problem(rng, ["relu", "linear"])
    params["other"] = jnp.ones(3)  # a pass-through param
    acts = _random_acts(rng, specs, n=5)
    for skip, expect_finite in ((True, True), (False, False)):
        tx = rfim_jax.rngd(0.1, {p: k for p, (k, *_) in specs.items()}, skip_nonfinite=skip)
        state = tx.init(params)
        p = params
        for t in range(4):
            g = _random_grads(rng, params)
            if t == 1:  # one NaN entry in a pass-through gradient
                g["other"] = g["other"].at[0].set(jnp.nan)
            u, state = tx.update(g, state, p, activations=acts)
            p = optax.apply_updates(p, u)
        finite = all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(p))
        assert finite is expect_finite
        assert int(state[0].rejected_updates) == (1 if skip else 0)
        assert int(state[0].count) == 4
        assert rfim_jax.diagnostics(state)["rejected_updates"] == (1 if skip else 0)


_SCANNED_LAPACK_TRAINING = """
import jax, jax.numpy as jnp
import rfim_jax
sizes = (784, 64, 64, 64, 10)
keys = jax.random.split(jax.random.PRNGKey(0), 4)
params = {f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / a**0.5, "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}
x = jax.random.normal(jax.random.PRNGKey(1), (100, 784))
y = jax.random.randint(jax.random.PRNGKey(2), (100,), 0, 10)
tx = rfim_jax.rngd(0.05, {"l1": "relu", "l2": "relu", "l3": "linear"},
                   solver="lapack", update_every=10)
def forward(p):
    h, acts = x, {}
    for i in range(4):
        z = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
        acts[f"l{i}"] = {"inputs": h, "preacts": z}
        h = jnp.tanh(z) if i < 3 else z
    return -jnp.mean(jax.nn.log_softmax(h)[jnp.arange(100), y]), acts
def step(carry, _):
    p, s = carry
    (loss, acts), g = jax.value_and_grad(forward, has_aux=True)(p)
    u, s = tx.update(g, s, p, activations=acts)
    return (jax.tree.map(jnp.add, p, u), s), loss
run = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=5))
(p, s), losses = run(params, tx.init(params))
print("ok", float(losses[0]), float(losses[-1]))
"""


def test_scanned_training_with_the_lapack_solver_runs(child_env):
    """A lax.scan over RNGD steps with solver="lapack" on the paper MLP's shapes completes.

    Two independent LAPACK inverses in one while-loop body deadlock XLA's CPU runtime (jax
    0.10.2), so scale_by_rngd chains the layers' refreshes there (solvers.needs_serial_calls);
    without the chain this program hangs.  Run in a subprocess with a time limit, so that a
    regression fails instead of hanging the suite.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SCANNED_LAPACK_TRAINING], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def _drifting_batches(steps, n, d, switch):
    """Inputs whose scale drops from 3 to 1 at step ``switch``: the averages must follow."""
    rng = np.random.default_rng(7)
    scale = np.where(np.arange(steps) < switch, 3.0, 1.0)[:, None, None]
    return (scale * rng.normal(size=(steps, n, d))).astype(np.float32)


def _run_steps(tx, params, xs, kernel):
    @jax.jit
    def run(xs):
        grads = jax.tree.map(jnp.ones_like, params)

        def body(state, x):
            acts = {"Dense_0": {"inputs": x, "preacts": x @ kernel}}
            _, state = tx.update(grads, state, params, activations=acts)
            return state, None

        return jax.lax.scan(body, tx.init(params), xs)[0]

    return run(jnp.asarray(xs))


def test_bfloat16_state_follows_a_slowly_drifting_average_like_float64_numpy():
    """At decay 0.995 a bfloat16 store rounded to nearest drops every step below 0.78x the
    average (measured: it stalled 46% above the float32 average); it must follow it."""
    steps, n, d, m, decay, damping = 1500, 32, 5, 3, 0.995, 1e-2
    xs = _drifting_batches(steps, n, d, switch=700)
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(d, m)), jnp.float32)
    params = {"Dense_0": {"kernel": kernel, "bias": jnp.zeros(m, jnp.float32)}}
    tx = rfim_jax.scale_by_rngd({"Dense_0": "linear"}, decay=decay, damping=damping,
                                state_dtype=jnp.bfloat16)
    stored = _run_steps(tx, params, xs, kernel).metrics["Dense_0"]
    assert stored.dtype == jnp.bfloat16
    # Independent float64 reference of SPEC §5 steps 1-2: damped batch moment, moving average.
    a = np.eye(d + 1)
    for x in xs.astype(np.float64):
        xa = np.concatenate([x, np.ones((n, 1))], axis=1)
        c = xa.T @ xa / n
        a = decay * a + (1 - decay) * (c + damping * np.trace(c) / (d + 1) * np.eye(d + 1))
    got = np.asarray(stored[0].astype(jnp.float32), np.float64)
    rel = np.linalg.norm(got - a) / np.linalg.norm(a)
    assert rel < 0.08, rel  # measured: 0.02 stochastic, 0.3 rounded to nearest


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_bfloat16_averages_track_the_float32_ones_in_every_representation(representation):
    steps, n, d, m = 1200, 32, 5, 3
    xs = _drifting_batches(steps, n, d, switch=500)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(d, m)), jnp.float32)
    params = {"Dense_0": {"kernel": kernel, "bias": jnp.zeros(m, jnp.float32)}}
    states = {}
    for dtype in (None, jnp.bfloat16):
        tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, representation=representation,
                                    state_dtype=dtype)
        states[dtype] = _run_steps(tx, params, xs, kernel).metrics["Dense_0"]
    for wide, narrow in zip(jax.tree.leaves(states[None]),
                            jax.tree.leaves(states[jnp.bfloat16]), strict=True):
        wide, narrow = np.asarray(wide, np.float64), np.asarray(narrow.astype(jnp.float32))
        rel = np.linalg.norm(narrow - wide) / np.linalg.norm(wide)
        # Measured: 0.019-0.031 stochastic; 0.32-0.65 rounded to nearest.
        assert rel < 0.08, (representation, rel)


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_an_eager_init_state_can_be_donated(representation):
    """No two leaves of a state from an eager ``init`` share a buffer, so ``donate_argnums``
    accepts it (it refused: "Attempt to donate the same buffer twice")."""
    params = {"Dense_0": {"kernel": jnp.full((3, 4), 0.1), "bias": jnp.zeros(4)},
              "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    layers = {"Dense_0": "tanh", "LayerNorm_0": "linear"}
    tx = rfim_jax.rngd(0.1, layers, representation={"Dense_0": representation})
    state = tx.init(params)
    leaves = [a for a in jax.tree.leaves(state) if isinstance(a, jax.Array)]
    assert len({a.unsafe_buffer_pointer() for a in leaves}) == len(leaves)
    x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)

    def step(p, s):
        z = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        u = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-6)
        acts = {"Dense_0": {"inputs": x, "preacts": z},
                "LayerNorm_0": {"inputs": u, "preacts": u * p["LayerNorm_0"]["scale"]}}
        upd, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p, activations=acts)
        return optax.apply_updates(p, upd), s

    step = jax.jit(step, donate_argnums=(0, 1))
    for _ in range(2):
        params, state = step(params, state)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(params))
