"""Smoke and correctness tests of benchmarks/speed.py and benchmarks/scaling.py at toy size.

No timing is asserted.  The pieces with a formula (the FLOP model, the sampled pre-activation
gradients of the K-FAC peer, its preconditioned update, the statistics kernels) are checked
against independent computations; the drivers are run end to end on a tiny synthetic task so
the scripts do not rot.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import scaling, speed
from experiments import models as mlp

SIZES = (12, 6, 5, 3)


def _toy_data(seed=0, n_train=200, n_test=50, d=SIZES[0], classes=SIZES[-1]):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y_tr = rng.integers(0, classes, n_train)
    y_te = rng.integers(0, classes, n_test)
    x_tr = np.clip(centres[y_tr] + 0.5 * rng.normal(size=(n_train, d)), 0, None)
    x_te = np.clip(centres[y_te] + 0.5 * rng.normal(size=(n_test, d)), 0, None)
    x_tr[:, 0] = 0.0  # a constant pixel: the whitening must cope with it
    x_te[:, 0] = 0.0
    return speed.load_data(arrays=(x_tr, y_tr, x_te, y_te), seed=seed)


def _toy_methods():
    return [
        speed.Method("adam", "adam", 1e-2, momentum=0.0),
        speed.Method("rngd_white_k3", "rngd", 0.05, inverse_every=5, whiten=True,
                     update_every=3),
        speed.Method("kfac_ref", "kfac_ref", 0.02, decay=0.95, damping=0.1, inverse_every=5),
    ]


def test_flop_model_matches_hand_count_for_paper_mlp():
    kinds = speed.rngd_layer_kinds(speed.PAPER_SIZES)
    assert kinds == {"Dense_0": "linear", "Dense_1": "relu", "Dense_2": "relu",
                     "Dense_3": "linear"}
    model = speed.flop_model(speed.PAPER_SIZES, 100, kinds)
    n = 100
    # the count: input block 2 n 785^2, each hidden layer 2 n 64 65^2, output 2 n 65^2
    stats = 2 * n * 785**2 + 2 * (2 * n * 64 * 65**2) + 2 * n * 65**2
    apply = 2 * 64 * 785**2 + 2 * (2 * 64 * 65**2) + 2 * 10 * 65**2
    fwd_bwd = 6 * n * (784 * 64 + 64 * 64 + 64 * 64 + 64 * 10)
    refresh = (785**3 + 2 * 64 * 65**3 + 65**3) / 3 / 100
    total = model["total"]
    assert total["statistics"] == pytest.approx(stats)
    assert total["apply"] == pytest.approx(apply)
    assert total["forward_backward"] == pytest.approx(fwd_bwd)
    assert total["refresh"] == pytest.approx(refresh)
    assert 120e6 < model["per_layer"]["Dense_0"]["statistics"] < 125e6
    # whitened inputs drop the input layer; update_every divides the statistics only
    fast = speed.flop_model(speed.PAPER_SIZES, 100, speed.rngd_layer_kinds(
        speed.PAPER_SIZES, whiten=True), update_every=10)["total"]
    assert fast["statistics"] == pytest.approx((stats - 2 * n * 785**2) / 10)
    assert fast["apply"] == pytest.approx(apply - 2 * 64 * 785**2)


def test_sampled_preact_grads_match_autodiff(key):
    params = mlp.init_mlp(key, SIZES, dtype=jnp.float64)
    x = jax.random.normal(jax.random.fold_in(key, 1), (7, SIZES[0]))
    labels = jax.random.randint(jax.random.fold_in(key, 2), (7,), 0, SIZES[-1])
    logits, acts, _ = mlp.mlp_apply(params, x)
    got = jax.jit(speed.sampled_preact_grads)(params, acts, logits, labels)

    def nll_sum(offsets):
        h = x
        for i in range(len(SIZES) - 1):
            layer = params[f"Dense_{i}"]
            z = h @ layer["kernel"] + layer["bias"] + offsets[i]
            h = jax.nn.relu(z) if i < len(SIZES) - 2 else z
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h), labels[:, None], 1))

    offsets = [jnp.zeros((7, m)) for m in SIZES[1:]]
    want = jax.jit(jax.grad(nll_sum))(offsets)
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"Dense_{i}"], w, atol=1e-12)


def test_kfac_ref_first_update_is_kronecker_solve():
    key = jax.random.PRNGKey(3)
    params = mlp.init_mlp(key, SIZES, dtype=jnp.float64)
    paths = [f"Dense_{i}" for i in range(len(SIZES) - 1)]
    decay, damping = 0.9, 0.05
    tx = speed.scale_by_kfac_ref(paths, decay=decay, damping=damping, inverse_every=3)
    state = tx.init(params)
    x = jax.random.normal(jax.random.fold_in(key, 1), (9, SIZES[0]))
    logits, acts, _ = mlp.mlp_apply(params, x)
    labels = jax.random.randint(jax.random.fold_in(key, 2), (9,), 0, SIZES[-1])
    pg = speed.sampled_preact_grads(params, acts, logits, labels)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, 3), p.shape),
                         params)
    out, state = jax.jit(tx.update)(grads, state, params, activations=acts, preact_grads=pg)
    for p in paths:
        xa = np.concatenate([np.asarray(acts[p]["inputs"]), np.ones((9, 1))], 1)
        g = np.asarray(pg[p])
        a = decay * np.eye(xa.shape[1]) + (1 - decay) * xa.T @ xa / 9
        s = decay * np.eye(g.shape[1]) + (1 - decay) * g.T @ g / 9
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(s) / s.shape[0]))
        a_d = a + pi * np.sqrt(damping) * np.eye(a.shape[0])
        s_d = s + np.sqrt(damping) / pi * np.eye(s.shape[0])
        cols = np.concatenate([grads[p]["kernel"], grads[p]["bias"][None]], 0)
        want = np.linalg.solve(a_d, cols) @ np.linalg.inv(s_d)
        np.testing.assert_allclose(out[p]["kernel"], want[:-1], atol=1e-10)
        np.testing.assert_allclose(out[p]["bias"], want[-1], atol=1e-10)
    assert int(state.count) == 1


def test_statistics_kernels_agree():
    res = speed.statistics_kernels(n=8, m=3, d=5, d_input=7, reps=2)
    for name in ("library", "batched_matmul", "single_gemm"):
        assert res[name]["max_abs_diff"] < 1e-5
        assert res[name]["ms"] > 0
    assert res["flops"] == 2 * 8 * 3 * 5 * 5


def test_time_to_target_counts_preprocessing():
    run = {"prep_seconds": 0.5, "chunk_seconds": [1.0, 2.0, 3.0], "steps": [0, 10, 20, 30],
           "eval_loss": [2.0, 0.4, 0.25, 0.1]}
    assert speed.time_to_target(run, 0.3) == {"seconds": 3.5, "steps": 20}
    assert speed.time_to_target(run, 2.0) == {"seconds": 0.5, "steps": 0}
    assert speed.time_to_target(run, 0.01) is None


def test_train_interleaved_and_summary_smoke():
    data = _toy_data()
    assert data.white is not None and np.all(np.isfinite(data.white["x_train"]))
    methods = _toy_methods()
    runs = speed.train_interleaved(methods, data, sizes=(SIZES[0], SIZES[1], SIZES[-1]),
                                   epochs=2, batch=10, chunk=10, progress=False)
    assert set(runs) == {m.name for m in methods}
    for r in runs.values():
        assert r["steps"] == [0, 10, 20, 30, 40]
        assert len(r["chunk_seconds"]) == 4 and len(r["epoch_train_loss"]) == 2
        assert np.all(np.isfinite(r["eval_loss"]))
    # every method started from the same parameters on the same data (whitened ones aside)
    assert runs["adam"]["eval_loss"][0] == pytest.approx(runs["kfac_ref"]["eval_loss"][0])
    assert runs["rngd_white_k3"]["prep_seconds"] > 0 and runs["adam"]["prep_seconds"] == 0
    summary = speed.summarise_runs(runs, chunk=10, steps_per_epoch=20)
    assert summary["adam"]["ratio_to_adam"] == pytest.approx(1.0)
    assert summary["rngd_white_k3"]["median_ms_per_step"] > 0
    g = speed.goals({"methods": summary})
    assert set(g["time_to_0.2_at_most_half_kfac"]) == {"rngd_white_k3"}


def test_rngd_split_smoke():
    data = _toy_data()
    m = speed.Method("rngd", "rngd", 0.05, inverse_every=10)
    split = speed.rngd_split(m, data, sizes=(SIZES[0], SIZES[-1]), batch=10, chunk=10, reps=2)
    ms = split["variants_ms_per_step"]
    assert set(ms) == {"full", "no_refresh", "apply_only", "base"}
    assert split["total_ms"] == ms["full"]
    assert split["statistics_ms"] == pytest.approx(ms["no_refresh"] - ms["apply_only"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax's own jax.core use
def test_kfac_jax_never_raises():
    data = _toy_data()
    res = speed.kfac_jax_run(data, sizes=SIZES, steps=3, batch=10)
    assert isinstance(res["available"], bool)
    if not res["available"]:
        assert "kfac" in res["error"]


def test_scaling_measure_smoke():
    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 12), dtype=jnp.float32)
    methods = [m for m in scaling.scaling_methods() if m.name == "rngd"]
    cfg = scaling.Config(8, 4, input_dim=12, hidden_layers=1)
    assert cfg.sizes == (12, 8, 10)
    assert scaling.Config(64, 100).sizes == speed.PAPER_SIZES
    rows = scaling.measure([cfg], methods, x, steps=2, reps=1, xla_flops=False,
                           progress=False)
    assert [r["method"] for r in rows] == ["rngd"]
    rngd = rows[0]
    assert rngd["ms_per_step"] > 0 and rngd["refresh_ms"] > 0
    # metrics and inverses, float32: (1, 13, 13) input block, (1, 9, 9) output block, plus
    # the momentum (params-sized) and counters
    assert rngd["state_bytes"] >= 2 * 4 * (13**2 + 9**2) + 4 * (12 * 8 + 8 + 8 * 10 + 10)
    skipped = scaling.measure([cfg], methods, x, steps=2, reps=1, max_state_gb=1e-6,
                              progress=False)
    assert "skipped" in skipped[0] and "ms_per_step" not in skipped[0]
