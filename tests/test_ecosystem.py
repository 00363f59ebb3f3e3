"""rfim_jax's optax transformations inside the JAX / optax / orbax ecosystem.

Every check compares against an independent computation: optax stages composed by hand in
numpy, a standalone optimiser on the same inputs, or the numpy reference of SPEC §4 in
tests/_driver.py (which shares no code with rfim_jax). The model is the small plain-JAX MLP
of tests/_driver.py: Dense_0 ("linear") -> relu -> LayerNorm_0 scale (not dense) ->
block/Dense_0 ("relu", a nested path) -> relu -> out ("softmax").
"""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _driver import (
    CKPT_STEP,
    CKPT_STEPS,
    LAYERS,
    ckpt_batch,
    ckpt_setup,
    grads_and_acts,
    init_mlp,
    make_batch,
    make_step,
    np_first_step,
)
from _reference import reference_blocks

import rfim_jax

DRIVER = Path(__file__).with_name("_driver.py")

# Compiling an RNGD update dominates these tests' run time, so the transformations are built
# once here and every update goes through one cached jit per transformation: the seeds then
# reuse the compiled program.
LR = 0.1
RNGD_KW = {"decay": 0.9, "inverse_every": 2}
SCALE = rfim_jax.scale_by_rngd(LAYERS, **RNGD_KW)
RNGD = rfim_jax.rngd(LR, LAYERS, **RNGD_KW)


_TRACES: dict[int, int] = {}


@functools.cache
def _update(tx):
    """jit(tx.update) with the activations keyword, compiled once per transformation.

    Every call also passes the extra keywords other optax stages receive (``value=`` and
    ``grad=``, as line searches pass them, and an unrelated one): they must be ignored.
    """

    def update(grads, state, params, acts):
        _TRACES[id(tx)] = _TRACES.get(id(tx), 0) + 1  # Python side effect: runs when tracing
        return tx.update(grads, state, params, activations=acts, value=jnp.zeros([]),
                         grad=grads, unrelated=jnp.ones(3))

    return jax.jit(update)


_grads_and_acts = jax.jit(grads_and_acts)


def _problem(seed, n=8):
    params = init_mlp(jax.random.PRNGKey(seed))
    x, y = make_batch(jax.random.PRNGKey(1000 + seed), n=n)
    grads, acts = _grads_and_acts(params, x, y)
    return params, grads, acts


def _stream(seed, steps):
    """(grads, acts) of ``steps`` different batches at fixed params."""
    params = init_mlp(jax.random.PRNGKey(seed))
    out = []
    for i in range(steps):
        x, y = make_batch(jax.random.PRNGKey(2000 + 10 * seed + i))
        out.append(_grads_and_acts(params, x, y))
    return params, out


def _node(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _close(a, b, rtol=1e-10, atol=1e-13):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(u), np.asarray(v))


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- optax.chain

CLIP, WD, MOMENTUM = 0.05, 1e-2, 0.9
CHAIN = optax.chain(
    rfim_jax.scale_by_rngd(LAYERS, **RNGD_KW),
    optax.clip_by_global_norm(CLIP),
    optax.add_decayed_weights(WD),
    optax.trace(decay=MOMENTUM),
    optax.scale(-LR),
)


def test_chain_with_clip_weight_decay_trace_equals_manual_composition(seed):
    params, stream = _stream(seed, 3)
    state, pre_state = CHAIN.init(params), SCALE.init(params)
    p_chain = p_hand = params
    trace = jax.tree.map(np.zeros_like, _np(params))
    clipped = []
    for grads, acts in stream:
        upd, state = _update(CHAIN)(grads, state, p_chain, acts)
        # By hand: scale_by_rngd alone, then clipping, weight decay, heavy ball and -lr in numpy.
        g, pre_state = _update(SCALE)(grads, pre_state, p_hand, acts)
        g = _np(g)
        norm = np.sqrt(sum(np.sum(a**2) for a in jax.tree.leaves(g)))
        clipped.append(norm > CLIP)
        factor = min(1.0, CLIP / norm)
        g = jax.tree.map(lambda a, p, f=factor: f * a + WD * p, g, _np(p_hand))
        trace = jax.tree.map(lambda a, t: a + MOMENTUM * t, g, trace)
        want = jax.tree.map(lambda t: -LR * t, trace)
        _close(upd, want)
        p_chain = optax.apply_updates(p_chain, upd)
        p_hand = jax.tree.map(lambda p, u: p + u, p_hand, want)
    assert any(clipped)  # the clip stage was exercised


# ------------------------------------------------------------------- inject_hyperparams

INJECT = optax.inject_hyperparams(rfim_jax.rngd)(
    learning_rate=LR, layers=LAYERS, damping=1e-2, decay=0.5
)


def _with_hyperparams(state, **hp):
    new = dict(state.hyperparams)
    for k, v in hp.items():
        new[k] = jnp.asarray(v, state.hyperparams[k].dtype)
    return state._replace(hyperparams=new)


def test_inject_hyperparams_learning_rate_and_damping_under_jit(seed):
    params, grads, acts = _problem(seed)
    state = INJECT.init(params)
    update = _update(INJECT)
    before = _TRACES.get(id(INJECT), 0)
    base, _ = update(grads, state, params, acts)
    half, _ = update(grads, _with_hyperparams(state, learning_rate=LR / 2), params, acts)
    _close(half, jax.tree.map(lambda u: u / 2, base), rtol=1e-14, atol=0)

    # The first step of rngd (trace of one gradient = the gradient) is -lr G^-1 g, with
    # G = decay I + (1 - decay) (G_hat + damping tr/d I): recompute it in numpy per damping.
    results = {}
    for damping in (1e-2, 0.5):
        upd, new_state = update(grads, _with_hyperparams(state, damping=damping), params, acts)
        _, want = np_first_step(LAYERS, params, grads, acts, decay=0.5, damping=damping)
        for path in LAYERS:
            _close(_node(upd, path), jax.tree.map(lambda a: -LR * a, want[path]))
        _close(upd["LayerNorm_0"], jax.tree.map(lambda a: -LR * a, grads["LayerNorm_0"]))
        results[damping] = np.asarray(upd["block"]["Dense_0"]["kernel"])
    assert np.abs(results[0.5] - results[1e-2]).max() > 1e-3 * np.abs(results[1e-2]).max()
    # Hyperparameters are arrays in the state: changing them does not retrace.  (Counted by
    # the traced function: the C++ executable cache stops taking new functions once a long
    # session has created 8192 jitted ones, so its size is no measure.)
    assert _TRACES[id(INJECT)] - before <= 1
    assert int(new_state.count) == 1


# ------------------------------------------------------------------------ apply_if_finite

IF_FINITE = optax.apply_if_finite(RNGD, max_consecutive_errors=3)


def test_apply_if_finite_skips_nan_step_and_keeps_rngd_state(seed):
    params, ((g1, a1), (g2, a2), (g3, a3)) = _stream(seed, 3)
    update = _update(IF_FINITE)
    _, s1 = update(g1, IF_FINITE.init(params), params, a1)
    g2 = jax.tree.map(lambda a: a, g2)
    g2["out"]["kernel"] = g2["out"]["kernel"].at[0, 0].set(jnp.nan)
    u2, s2 = update(g2, s1, params, a2)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(u2))
    _equal(s2.inner_state, s1.inner_state)  # RNGD statistics, inverses, count, momentum
    assert int(s2.notfinite_count) == 1 and int(s2.total_notfinite) == 1
    # The next finite step continues exactly as if the NaN step had never happened.
    u3, s3 = update(g3, s2, params, a3)
    want, want_state = _update(RNGD)(g3, s1.inner_state, params, a3)
    _close(u3, want, rtol=1e-14, atol=0)
    _close(s3.inner_state, want_state, rtol=1e-14, atol=0)
    assert int(s3.notfinite_count) == 0


# ------------------------------------------------------------------------ optax.partition


def _labeller(adam_paths):
    """param_labels as a callable: "adam" under the given layer paths, "rngd" elsewhere."""

    def labels(params):
        def label(path, _):
            name = "/".join(str(k.key) for k in path)
            return "adam" if any(name.startswith(p + "/") for p in adam_paths) else "rngd"

        return jax.tree.map_with_path(label, params)

    return labels


ADAM = optax.adam(1e-2)
# optax.multi_transform is the same function as optax.partition in optax 0.2.8.
PARTITION = optax.partition({"rngd": RNGD, "adam": ADAM}, _labeller(["LayerNorm_0"]))


def test_partition_rngd_on_dense_adam_on_the_rest(seed):
    params, stream = _stream(seed, 3)
    state, r_state = PARTITION.init(params), RNGD.init(params)
    a_state = ADAM.init(params["LayerNorm_0"])
    for grads, acts in stream:
        # The same activations dict, for every layer, goes to the partition as a whole.
        upd, state = _update(PARTITION)(grads, state, params, acts)
        r_upd, r_state = _update(RNGD)(grads, r_state, params, acts)
        a_upd, a_state = ADAM.update(grads["LayerNorm_0"], a_state, params["LayerNorm_0"])
        for path in LAYERS:
            _close(_node(upd, path), _node(r_upd, path))
        _close(upd["LayerNorm_0"], a_upd)


def test_partition_with_a_dense_layer_under_adam():
    # "out" goes to Adam: the RNGD branch sees MaskedNode leaves there. layers=None (every dense
    # layer it sees, kind "linear") skips it; naming it in `layers` is an error.
    params, stream = _stream(0, 2)
    labels = _labeller(["LayerNorm_0", "out"])
    tx = optax.partition({"rngd": rfim_jax.rngd(LR, None, **RNGD_KW), "adam": ADAM}, labels)
    mine = {"Dense_0": "linear", "block/Dense_0": "linear"}
    ref = rfim_jax.rngd(LR, mine, **RNGD_KW)
    state, r_state = tx.init(params), ref.init(params)
    assert set(state.inner_states["rngd"].inner_state[0].metrics) == set(mine)
    upd, r_upd = None, None
    for grads, acts in stream:
        upd, state = _update(tx)(grads, state, params, acts)
        r_upd, r_state = _update(ref)(grads, r_state, params, acts)
        for path in mine:
            _close(_node(upd, path), _node(r_upd, path))

    bad = optax.partition({"rngd": RNGD, "adam": ADAM}, labels)
    with pytest.raises(ValueError, match=r"layer 'out' is masked out of this transform.*"
                       r"remove it from `layers`.*\['Dense_0', 'block/Dense_0'\]"):
        bad.init(params)


def test_partition_giving_a_kernel_away_but_not_its_bias_is_refused():
    """The bias alone was silently passed through with layers=None, and naming the layer said
    it was masked out, though only its kernel was."""
    params = {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
              "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    labels = {"Dense_0": {"kernel": "adam", "bias": "rngd"},
              "Dense_1": {"kernel": "rngd", "bias": "rngd"}}
    for layers in (None, {"Dense_0": "relu", "Dense_1": "linear"}):
        tx = optax.partition({"rngd": rfim_jax.rngd(LR, layers), "adam": ADAM}, labels)
        with pytest.raises(ValueError, match=r"layer 'Dense_0': optax.partition .* gives its "
                                             r"kernel to another transform but its bias to "
                                             r"this one"):
            tx.init(params)
    # Not named in an explicit `layers`, the bias passes through as documented.
    tx = optax.partition({"rngd": rfim_jax.rngd(LR, {"Dense_1": "linear"}), "adam": ADAM},
                         labels)
    tx.init(params)


def test_partition_with_the_biases_under_adam_preconditions_the_kernels_alone():
    """Biases to Adam, kernels to RNGD (a common split): each kernel gets its own block of the
    RFIM, the layer read as bias-free, against the numpy reference."""
    from _reference import ReferenceRNGD

    params, stream = _stream(1, 3)
    labels = jax.tree.map_with_path(
        lambda path, _: "adam" if path[-1].key == "bias" else "rngd", params)
    tx = optax.partition({"rngd": RNGD, "adam": ADAM}, labels)
    state = tx.init(params)
    biases = {p: _node(params, p)["bias"] for p in LAYERS}
    a_state = ADAM.init(biases)
    sizes = {p: _node(params, p)["kernel"].shape for p in LAYERS}
    ref = ReferenceRNGD({p: (k, *sizes[p], False) for p, k in LAYERS.items()},
                        RNGD_KW["decay"], RNGD_KW["inverse_every"], 0.01)
    momentum = {p: 0.0 for p in LAYERS}
    for grads, acts in stream:
        upd, state = _update(tx)(grads, state, params, acts)
        want = ref.update({p: {"kernel": np.asarray(_node(grads, p)["kernel"])} for p in LAYERS},
                          {p: {k: np.asarray(v) for k, v in _node(acts, p).items()}
                           for p in LAYERS})
        a_upd, a_state = ADAM.update({p: _node(grads, p)["bias"] for p in LAYERS}, a_state)
        for p in LAYERS:
            momentum[p] = want[p][0] + 0.9 * momentum[p]
            np.testing.assert_allclose(_node(upd, p)["kernel"], -LR * momentum[p], rtol=1e-9,
                                       atol=1e-12)
            np.testing.assert_allclose(_node(upd, p)["bias"], a_upd[p], rtol=1e-12)
    assert sorted(rfim_jax.layer_metrics(state, params)) == sorted(LAYERS)
    norms = rfim_jax.relative_fisher_rao_norm(state, params)
    assert all(np.isfinite(v) and v > 0 for v in norms.values())
    # The step-to-gradient ratio covers what RNGD preconditioned: the kernel, not Adam's bias.
    grads, _ = stream[-1]
    figures = rfim_jax.diagnostics(state, params, grads=grads, updates=upd, spectrum=False)
    for p in LAYERS:
        want = np.linalg.norm(_node(upd, p)["kernel"]) / np.linalg.norm(_node(grads, p)["kernel"])
        np.testing.assert_allclose(figures[f"{p}/step_to_grad_norm"], want, rtol=1e-12)


# --------------------------------------------------------------------------- MultiSteps

K = 3
# MultiSteps accumulates in float32 unless told otherwise; keep float64 to compare tightly.
MULTI = optax.MultiSteps(RNGD, every_k_schedule=K, accumulator_dtype=jnp.float64)


def test_multisteps_uses_mean_gradient_and_last_micro_batch_statistics(seed):
    """optax 0.2.8 MultiSteps calls the inner update on *every* micro-step, with the running
    mean of the gradients so far and that micro-step's extra args, but keeps the inner state
    only on the k-th. So the RNGD statistics of micro-steps 1..k-1 are computed and thrown
    away: the emitted update is rngd(mean gradient, statistics of micro-batch k only)."""
    params, stream = _stream(seed, K)
    state = init_state = MULTI.init(params)
    for i, (grads, acts) in enumerate(stream):
        upd, state = _update(MULTI)(grads, state, params, acts)
        if i < K - 1:
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(upd))
            _equal(state.inner_opt_state, init_state.inner_opt_state)
    mean_grad = jax.tree.map(lambda *g: sum(g) / K, *[g for g, _ in stream])
    inner0 = RNGD.init(params)
    want, want_state = _update(RNGD)(mean_grad, inner0, params, stream[-1][1])
    _close(upd, want)
    _close(state.inner_opt_state, want_state)
    assert int(state.inner_opt_state[0].count) == 1
    # The numpy reference: the first step on the mean gradient with micro-batch k's statistics.
    _, ref = np_first_step(LAYERS, params, mean_grad, stream[-1][1], decay=RNGD_KW["decay"],
                           damping=1e-2)
    for path in LAYERS:
        _close(_node(upd, path), jax.tree.map(lambda u: -LR * u, ref[path]))


# --------------------------------------------------------------------------------- jit

def test_jit_traces_once_and_extra_kwargs_change_nothing(seed):
    params, stream = _stream(seed, 3)
    before = _TRACES.get(id(RNGD), 0)
    state = RNGD.init(params)
    for i, (grads, acts) in enumerate(stream):
        upd, state = _update(RNGD)(grads, state, params, acts)  # with value=, grad=, ...
        if i == 0:  # the first step against numpy: -lr G^-1 g with G = decay I + (1-decay) G_hat
            _, want = np_first_step(LAYERS, params, grads, acts, decay=RNGD_KW["decay"],
                                    damping=1e-2)
            for path in LAYERS:
                _close(_node(upd, path), jax.tree.map(lambda a: -LR * a, want[path]))
    # At most one trace (none if an earlier test compiled it) and one executable.
    assert _TRACES[id(RNGD)] - before <= 1


# ------------------------------------------------------------------------- state pytree


@jax.jit
def _scan_updates(state, params, grads, acts):
    def body(s, ga):
        upd, s = RNGD.update(ga[0], s, params, activations=ga[1])
        return s, upd

    return jax.lax.scan(body, state, (grads, acts))


def test_state_is_a_pytree_of_arrays_with_a_fixed_structure(seed):
    params, stream = _stream(seed, 3)
    state = RNGD.init(params)
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(a, jax.Array) for a in leaves)
    doubled = jax.tree.map(lambda a: 2 * a, state)
    assert isinstance(doubled[0], rfim_jax.ScaleByRNGDState)
    np.testing.assert_array_equal(doubled[0].metrics["out"], 2 * state[0].metrics["out"])
    # Same treedef and avals after an update, so the state can be a lax.scan carry.
    loop_state, loop_upds = state, []
    for g, a in stream:
        u, loop_state = _update(RNGD)(g, loop_state, params, a)
        loop_upds.append(u)
        assert jax.tree.structure(loop_state) == jax.tree.structure(state)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(loop_state)] == [
            (x.shape, x.dtype) for x in leaves
        ]
    gs = jax.tree.map(lambda *a: jnp.stack(a), *[g for g, _ in stream])
    acts = jax.tree.map(lambda *a: jnp.stack(a), *[a for _, a in stream])
    scanned_state, scanned_upds = _scan_updates(state, params, gs, acts)
    for i, u in enumerate(loop_upds):
        _close(jax.tree.map(lambda x, i=i: x[i], scanned_upds), u)
    _close(scanned_state, loop_state)


# ------------------------------------------------------------------------ orbax checkpoint


def test_orbax_checkpoint_resumes_bit_identically_in_a_fresh_process(tmp_path, child_env):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, tx = ckpt_setup()
    state = tx.init(params)
    step = jax.jit(make_step(tx))
    ckpt = tmp_path / "ckpt"
    for i in range(CKPT_STEPS):
        if i == CKPT_STEP:
            # The state's dicts are keyed by layer paths with "/" ("block/Dense_0").
            assert "block/Dense_0" in state[0].metrics
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(ckpt, {"params": params, "opt_state": state})
            checkpointer.wait_until_finished()
        params, state, _ = step(params, state, *ckpt_batch(i))

    out = tmp_path / "resumed.npz"
    # Bit-identical only on the backend that trained: the child resumes where the parent ran
    # (a GPU child must not preallocate the memory the parent holds).
    if jax.default_backend() == "cpu":
        env = child_env(JAX_PLATFORMS="cpu")
    else:
        env = child_env(JAX_PLATFORMS=None, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "resume", str(ckpt), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = np.load(out)
    want = jax.tree.leaves({"params": params, "opt_state": state})
    assert len(resumed.files) == len(want)
    for i, leaf in enumerate(want):
        got = resumed[f"arr_{i}"]
        assert got.dtype == np.asarray(leaf).dtype
        assert np.array_equal(got, np.asarray(leaf)), f"leaf {i} differs after the restore"


def test_orbax_without_ocdbt_round_trips_slash_keyed_state(tmp_path):
    # Without OCDBT each leaf is a directory named by its key path, so "block/Dense_0" becomes
    # a nested directory: the tree must still come back with its flat "block/Dense_0" keys.
    ocp = pytest.importorskip("orbax.checkpoint")
    params, tx = ckpt_setup()
    grads, acts = _grads_and_acts(params, *ckpt_batch(0))
    _, state = _update(tx)(grads, tx.init(params), params, acts)
    tree = {"params": params, "opt_state": state}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    checkpointer.save(tmp_path / "ckpt", args=ocp.args.PyTreeSave(tree))
    restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
    restored = checkpointer.restore(
        tmp_path / "ckpt", args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args)
    )
    assert set(restored["opt_state"][0].metrics) == set(LAYERS)
    _equal(restored, tree)


# ------------------------------------------------------------------------ pass-through

PASS_LAYERS = {"Dense_0": "linear", "block/Dense_0": None, "out": "softmax"}
PASS = rfim_jax.scale_by_rngd(PASS_LAYERS)


def test_non_dense_params_and_kind_none_layers_pass_through(seed):
    params, grads, acts = _problem(seed)
    acts = {k: v for k, v in acts.items() if k != "block"}  # kind None needs no activations
    state = PASS.init(params)
    assert set(state.metrics) == {"Dense_0", "out"}
    upd, _ = _update(PASS)(grads, state, params, acts)
    _equal(upd["LayerNorm_0"], grads["LayerNorm_0"])
    _equal(upd["block"], grads["block"])
    # The listed layers: the numpy reference's first step (defaults decay 0.995, damping 1e-2).
    _, ref = np_first_step({"Dense_0": "linear", "out": "softmax"}, params, grads, acts,
                           decay=0.995, damping=1e-2)
    _close(upd["Dense_0"], ref["Dense_0"])
    _close(upd["out"], ref["out"])


def test_non_finite_activations_skip_that_layers_statistics(seed):
    params, ((g1, a1), (g2, a2), (g3, a3)) = _stream(seed, 3)
    update = _update(SCALE)
    _, s = update(g1, SCALE.init(params), params, a1)
    _, s2 = update(g2, s, params, a2)
    a3 = jax.tree.map(lambda a: a, a3)
    a3["block"]["Dense_0"]["inputs"] = a3["block"]["Dense_0"]["inputs"].at[3, 1].set(jnp.inf)
    u3, s3 = update(g3, s2, params, a3)  # count 2: an inverse refresh (inverse_every=2)
    assert {p: int(v) for p, v in s3.skipped.items()} == {
        "Dense_0": 0, "block/Dense_0": 1, "out": 0
    }
    _equal(s3.metrics["block/Dense_0"], s2.metrics["block/Dense_0"])
    # The other layers took this batch's statistics: decay G + (1 - decay) G_hat (numpy).
    for path in ("Dense_0", "out"):
        a = _node(a3, path)
        fresh = np.stack(reference_blocks(LAYERS[path], a["inputs"], a["preacts"], True, 1e-2))
        decay = RNGD_KW["decay"]
        want = decay * np.asarray(s2.metrics[path]) + (1 - decay) * fresh
        np.testing.assert_allclose(s3.metrics[path], want, rtol=1e-10, atol=1e-13)
    assert _finite((u3, s3))
    # The skipped layer is preconditioned by the refreshed inverse of its old average.
    want = np.linalg.inv(np.asarray(s2.metrics["block/Dense_0"]))
    np.testing.assert_allclose(s3.inverses["block/Dense_0"], want, rtol=1e-8, atol=1e-10)


DEAD_CASES = {
    # soft relu (nu = s(z)^2 underflows to 0) with the default decay, and the hard relu
    # (nu exactly 0) with decay 0, where a dead neuron's average block is exactly 0.
    "soft_decay0.995": ("relu", 0.995),
    "hard_decay0": (rfim_jax.ReLU(omega=0.0), 0.0),
}
DEAD_TX = {
    name: rfim_jax.scale_by_rngd({**LAYERS, "block/Dense_0": kind}, decay=decay, inverse_every=1)
    for name, (kind, decay) in DEAD_CASES.items()
}


@pytest.mark.parametrize("case", list(DEAD_CASES))
def test_dead_relu_neurons_stay_finite(seed, case):
    activation, decay = DEAD_CASES[case]
    tx = DEAD_TX[case]
    params, grads, acts = _problem(seed)
    # Hidden neurons 0 and 1 are dead: pre-activations around -1e3, nu ~ 0.
    dead = np.array([True, True, False, False])
    hidden = acts["block"]["Dense_0"]
    z = jnp.where(dead, hidden["preacts"] - 1e3, hidden["preacts"])
    acts = {**acts, "block": {"Dense_0": {**hidden, "preacts": z}}}
    state = tx.init(params)
    for _ in range(3):
        upd, state = _update(tx)(grads, state, params, acts)
    assert _finite((upd, state))
    # Live neurons are untouched by their dead neighbours: after 3 steps of the same batch,
    # G_l = decay^3 I + (1 - decay^3) (G_hat_l + 1e-2 tr/d I).
    xa = np.concatenate([hidden["inputs"], np.ones((len(z), 1))], 1)
    g, u = grads["block"]["Dense_0"], upd["block"]["Dense_0"]
    for l in np.flatnonzero(~dead):
        zl = np.asarray(z[:, l])
        nu = (1 / (1 + np.exp(-zl))) ** 2 if activation == "relu" else (zl > 0).astype(float)
        block = (nu[:, None] * xa).T @ xa / len(xa)
        block = block + 1e-2 * np.trace(block) / len(block) * np.eye(len(block))
        G = decay**3 * np.eye(len(block)) + (1 - decay**3) * block
        want = np.linalg.solve(G, np.append(g["kernel"][:, l], g["bias"][l]))
        np.testing.assert_allclose(np.append(u["kernel"][:, l], u["bias"][l]), want,
                                   rtol=1e-8, atol=1e-12)


ZERO_TX = rfim_jax.scale_by_rngd(
    {"lin": "linear", "act": "tanh", "lin_nobias": "linear", "act_nobias": "tanh"},
    decay=0.0, inverse_every=1,
)


def test_relative_damping_with_all_zero_inputs_stays_finite():
    # Zero inputs: the second moment is e e^T (bias coordinate only) or exactly 0 (no bias), so
    # the relative damping tr/d is tiny or 0; decay 0 leaves no identity in the average.
    with_bias = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    no_bias = {"kernel": jnp.ones((3, 2))}
    params = {"lin": with_bias, "act": with_bias, "lin_nobias": no_bias, "act_nobias": no_bias}
    x = jnp.zeros((5, 3))
    z = jnp.zeros((5, 2))
    acts = {k: {"inputs": x, "preacts": z} for k in params}
    grads = jax.tree.map(jnp.ones_like, params)
    state = ZERO_TX.init(params)
    for _ in range(2):
        upd, state = _update(ZERO_TX)(grads, state, params, acts)
    assert _finite((upd, state))
    # With a bias only the bias coordinate is seen: G = e e^T + 1e-2 (1/d) I.
    d = 4
    G = np.zeros((d, d))
    G[-1, -1] = 1.0
    G += 1e-2 / d * np.eye(d)
    want = np.linalg.solve(G, np.ones((d, 2)))
    np.testing.assert_allclose(upd["lin"]["kernel"], want[:-1], rtol=1e-8)
    np.testing.assert_allclose(upd["lin"]["bias"], want[-1], rtol=1e-8)


# ----------------------------------------------------------------------------- errors


def _set(acts, path, name, fn):
    acts = jax.tree.map(lambda a: a, acts)
    node = _node(acts, path)
    node[name] = fn(node[name])
    return acts


UPDATE_ERRORS = {
    "missing": (
        lambda a: {k: v for k, v in a.items() if k != "out"},
        r"layer 'out': no activations passed; expected activations\['out'\] = "
        r"\{'inputs': \(n, 4\), 'preacts': \(n, 3\)\}",
    ),
    "inputs_width": (
        lambda a: _set(a, "out", "inputs", lambda x: jnp.zeros((8, 7))),
        r"layer 'out': inputs have shape \(8, 7\), but the kernel \(4, 3\) expects width d_in=4",
    ),
    "preacts_width": (
        lambda a: _set(a, "block/Dense_0", "preacts", lambda z: z[:, :2]),
        r"layer 'block/Dense_0': preacts have shape \(8, 2\), but the kernel \(4, 4\) "
        r"expects width m=4",
    ),
    "sample_count": (
        lambda a: _set(a, "out", "preacts", lambda z: z[:5]),
        r"layer 'out': inputs have 8 samples but preacts have 5 \(shapes \(8, 4\) and \(5, 3\)\)",
    ),
    "empty_batch": (
        lambda a: jax.tree.map(lambda x: x[:0], a),
        r"layer 'Dense_0': the batch is empty \(inputs \(0, 5\), preacts \(0, 4\)\)",
    ),
}


@pytest.mark.parametrize("case", list(UPDATE_ERRORS))
def test_update_errors_name_the_layer_and_shapes(case):
    corrupt, match = UPDATE_ERRORS[case]
    params, grads, acts = _problem(0)
    # Raised while tracing, so under jit too (and nothing is compiled).
    with pytest.raises(ValueError, match=match):
        _update(RNGD)(grads, RNGD.init(params), params, corrupt(acts))


def test_update_without_activations_names_the_layer():
    params, grads, _ = _problem(0)
    with pytest.raises(ValueError, match=r"layer 'Dense_0': no activations passed; expected "
                       r"activations\['Dense_0'\] = \{'inputs': \(n, 5\), 'preacts': \(n, 4\)\}"):
        SCALE.update(grads, SCALE.init(params), params)


@pytest.mark.parametrize(
    "layers, params_fn, match",
    [
        (
            {"nope/Dense_0": "relu"}, None,
            r"layer 'nope/Dense_0' is not a dense layer of the params.*"
            r"Dense layers found in the params: \['Dense_0', 'block/Dense_0', 'out'\]",
        ),
        (
            {"LayerNorm_0": "relu"}, None,
            r"layer 'LayerNorm_0': kind 'relu' does not fit a LayerNorm/RMSNorm scale and "
            r"shift.*'linear'",
        ),
        ({"out": "swish"}, None, r"layer 'out': unknown kind 'swish'. A kind is an activation"),
        (
            {"vec": "relu"},
            lambda p: {**p, "vec": {"kernel": jnp.zeros((4,)), "bias": jnp.zeros(4)}},
            r"layer 'vec': kernel must have an input and an output axis, e.g. \(d_in, m\), got "
            r"shape \(4,\)",
        ),
        (
            {"out": "relu"},
            lambda p: {**p, "out": {**p["out"], "bias": jnp.zeros(5)}},
            r"layer 'out': bias must have shape \(3,\) to match kernel \(\d+, 3\), got \(5,\)",
        ),
    ],
    ids=["missing_path", "norm_kind", "unknown_kind", "kernel_1d", "bias_shape"],
)
def test_init_errors_name_the_layer(layers, params_fn, match):
    params = init_mlp(jax.random.PRNGKey(0))
    if params_fn is not None:
        params = params_fn(params)
    with pytest.raises(ValueError, match=match):
        rfim_jax.rngd(LR, layers).init(params)
