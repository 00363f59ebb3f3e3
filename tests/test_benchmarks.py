"""Smoke and correctness tests of benchmarks/speed.py and benchmarks/scaling.py at toy size.

No timing is asserted.  The pieces with a formula (the FLOP model, the sampled pre-activation
gradients of the K-FAC peer, its preconditioned update, the statistics kernels) are checked
against independent computations; the drivers are run end to end on a tiny synthetic task so
the scripts do not rot.
"""

import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness, peers, scaling, speed, wide
from benchmarks.peers import kfac_jax as kfac_jax_peer
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


def test_flop_model_counts_eigen_layers_by_hand():
    """The recommended fast configuration: whitened inputs, every other layer eigen."""
    kinds = speed.rngd_layer_kinds(speed.PAPER_SIZES, whiten=True)
    reps = {p: "eigen" for p, k in kinds.items() if k is not None}
    model = speed.flop_model(speed.PAPER_SIZES, 100, kinds, update_every=10,
                             representations=reps)["total"]
    n, d = 100, 65
    # hidden relu layers (64 rows of scales) and the linear output (one shared row of 10)
    stats = 2 * (3 * n * d**2 + 2 * n * 64 * d) + (3 * n * d**2 + 2 * n * 1 * d)
    apply = 2 * (4 * d**2 * 64) + 4 * d**2 * 10
    refresh = 2 * (11 * d**3 + 2 * 64 * d**2) + (11 * d**3 + 2 * 1 * d**2)
    assert model["statistics"] == pytest.approx(stats / 10)
    assert model["apply"] == pytest.approx(apply)
    assert model["refresh"] == pytest.approx(refresh / 100)
    with pytest.raises(ValueError, match="unknown representation"):
        speed.flop_model(speed.PAPER_SIZES, 100, kinds, representations={"Dense_1": "kfac"})


def test_limit_blas_threads_caps_and_restores_openblas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from benchmarks import harness

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"}

    jnp.linalg.eigh(jnp.eye(2))  # loads jax's LAPACK (scipy's OpenBLAS) before the snapshot
    before = blas_threads()
    with harness.limit_blas_threads(1):
        assert set(blas_threads().values()) == {1}
    assert blas_threads() == before
    with harness.limit_blas_threads(0):  # 0 leaves them alone
        assert blas_threads() == before


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
    # the ratios, recomputed from the raw chunk times
    sec = {k: np.asarray(runs[k]["chunk_seconds"]) for k in ("adam", "rngd_white_k3")}
    white = summary["rngd_white_k3"]
    assert white["ratio_to_adam"] == pytest.approx(
        np.median(sec["rngd_white_k3"]) / np.median(sec["adam"]), rel=1e-12)
    assert white["paired_ratio_to_adam"] == pytest.approx(
        np.median(sec["rngd_white_k3"] / sec["adam"]), rel=1e-12)
    assert white["median_ms_per_step"] == pytest.approx(
        np.median(sec["rngd_white_k3"]) / 10 * 1e3, rel=1e-12)
    assert summary["rngd_white_k3"]["median_ms_per_step"] > 0


def test_rngd_split_smoke():
    data = _toy_data()
    m = speed.Method("rngd", "rngd", 0.05, inverse_every=10)
    split = speed.rngd_split(m, data, sizes=(SIZES[0], SIZES[-1]), batch=10, chunk=10, reps=2)
    ms = split["variants_ms_per_step"]
    assert set(ms) == {"full", "no_refresh", "apply_only", "base"}
    assert split["total_ms"] == ms["full"]
    assert split["statistics_ms"] == pytest.approx(ms["no_refresh"] - ms["apply_only"])


def _fake_kfac_jax(fail_with=None):
    """A stand-in kfac_jax module: its Optimizer takes plain SGD steps (lr 0.1), or raises
    ``fail_with`` when built, so every branch of kfac_jax_run runs whatever is installed."""
    import types

    class Optimizer:
        def __init__(self, value_and_grad_func, **kwargs):
            if fail_with is not None:
                raise fail_with
            self.vg = value_and_grad_func
            assert kwargs["use_adaptive_learning_rate"] and kwargs["multi_device"] is False

        def init(self, params, key, batch):
            return 0

        def step(self, params, state, key, batch, global_step_int):
            loss, g = self.vg(params, batch)
            params = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
            return params, state + 1, {"loss": loss}

    fake = types.ModuleType("kfac_jax")
    fake.Optimizer = Optimizer
    fake.register_softmax_cross_entropy_loss = lambda logits, y: None
    return fake


def test_kfac_jax_run_reports_instead_of_raising(monkeypatch):
    data = _toy_data()
    # the fakes below stand for kfac-jax whatever jax is installed
    monkeypatch.setattr(kfac_jax_peer, "incompatibility", lambda: None)
    # not installed (or an import that fails): reported with the import error
    monkeypatch.setitem(sys.modules, "kfac_jax", None)
    res = speed.kfac_jax_run(data, sizes=SIZES, steps=3, batch=10)
    assert res["available"] is False and set(res) == {"available", "error"}
    assert res["error"] == ("import kfac_jax: ModuleNotFoundError: import of kfac_jax halted; "
                            "None in sys.modules")
    # installed but failing inside the run (kfac-jax 0.0.8 on jax 0.10): reported, not raised
    monkeypatch.setitem(sys.modules, "kfac_jax",
                        _fake_kfac_jax(RuntimeError("tag_graph_matcher failed")))
    res = speed.kfac_jax_run(data, sizes=SIZES, steps=3, batch=10)
    assert res == {"available": False,
                   "error": "kfac_jax run: RuntimeError: tag_graph_matcher failed"}
    # a working optimiser: its losses come back, the ones of plain SGD on the same batches
    monkeypatch.setitem(sys.modules, "kfac_jax", _fake_kfac_jax())
    res = speed.kfac_jax_run(data, sizes=SIZES, steps=8, batch=10, seed=0)
    assert res["available"] is True and res["median_ms_per_step"] > 0
    params = mlp.init_mlp(jax.random.PRNGKey(0), SIZES)
    idx = speed.epoch_indices(np.random.default_rng(0), data.num_train, 10)
    want = []
    for i in range(8):
        x, y = data.x_train[idx[i]], data.y_train[idx[i]]
        loss, g = jax.value_and_grad(
            lambda p, x=x, y=y: mlp.cross_entropy(mlp.mlp_apply(p, x)[0], y))(params)
        params = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
        want.append(float(loss))
    np.testing.assert_allclose(res["loss"], want, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax's own jax.core use
def test_kfac_jax_with_what_is_installed():
    data = _toy_data()
    res = speed.kfac_jax_run(data, sizes=SIZES, steps=8, batch=10)
    if importlib.util.find_spec("kfac_jax") is None:
        assert res == {"available": False, "error": "import kfac_jax: ModuleNotFoundError: "
                                                    "No module named 'kfac_jax'"}
    elif kfac_jax_peer.incompatibility() is not None:  # kfac-jax 0.0.8 on jax >= 0.11
        assert res == {"available": False,
                       "error": f"import kfac_jax: ImportError: "
                                f"{kfac_jax_peer.incompatibility()}"}
    elif res["available"]:
        assert len(res["loss"]) == 8 and np.all(np.isfinite(res["loss"]))
    else:
        assert res["error"].startswith("kfac_jax run: ")


def test_kfac_jax_incompatibility_names_both_versions(monkeypatch):
    import jax.extend.core as jex_core

    # jax >= 0.11 merged ClosedJaxpr into Jaxpr; kfac-jax <= 0.0.8 cannot run there
    monkeypatch.setattr(jex_core, "ClosedJaxpr", jex_core.Jaxpr)
    for version, expected in (("0.0.8", True), ("0.0.7", True), ("0.0.9", False),
                              ("0.1.0", False)):
        monkeypatch.setattr(peers, "distribution_version", lambda name, v=version: v)
        reason = kfac_jax_peer.incompatibility()
        assert (reason is not None) == expected, (version, reason)
        if expected:
            assert f"kfac-jax {version}" in reason and f"jax {jax.__version__}" in reason
            avail = peers.availability("kfac_jax")
            assert not avail.available and avail.reason.endswith(reason), avail
    monkeypatch.setattr(peers, "distribution_version", lambda name: None)
    assert kfac_jax_peer.incompatibility() is None  # not installed: the import says so


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


def test_wide_flop_model_matches_speed_for_exact_linear_output():
    kinds = speed.rngd_layer_kinds(speed.PAPER_SIZES)
    got = wide.flop_model(speed.PAPER_SIZES, 100, kinds, "exact")
    want = speed.flop_model(speed.PAPER_SIZES, 100, kinds)["total"]
    for k in ("forward_backward", "statistics", "apply", "refresh", "total"):
        assert got[k] == pytest.approx(want[k])
    # eigen at width 1024, batch 100: the apply (4 d^2 m per layer) dominates
    sizes = (784, 1024, 1024, 1024, 10)
    eigen = wide.flop_model(sizes, 100, wide.layer_kinds(sizes), "eigen")
    assert eigen["bound"] == "apply-bound"
    assert eigen["apply"] == pytest.approx(4 * (785**2 * 1024 + 2 * 1025**2 * 1024
                                                + 1025**2 * 10))
    assert wide.flop_model(sizes, 100, {}, None)["bound"] == "forward/backward-bound"


def test_wide_timing_methods_filter():
    names = [m.name for m in wide.timing_methods("diagonal,eigen")]
    assert names == ["adam", "diagonal", "eigen"]  # adam first: every ratio is to it
    assert [m.name for m in wide.timing_methods(None)] == list(wide.methods())
    assert [m.name for m in wide.timing_methods("eigen,adam")] == ["adam", "eigen"]
    with pytest.raises(ValueError, match=r"unknown timing methods \['eigne'\]; choose from"):
        wide.timing_methods("eigen,eigne")


def test_wide_main_smoke(tmp_path):
    import json

    out = wide.main(["--widths", "16", "--batches", "8", "--steps", "10", "--reps", "1",
                     "--train-width", "8", "--train-batch", "8", "--epochs", "0.1",
                     "--single-lr", "--train-methods", "adam,eigen", "--dataset", "digits",
                     "--no-progress",
                     "--max-state-gb", "1e-4", "--out", str(tmp_path)])
    assert (tmp_path / "wide.png").is_file()
    res = json.loads((tmp_path / "wide.json").read_text())
    assert res["dataset"]["name"] == "digits" and res["dataset"]["input_dim"] == 64
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"adam", "sgd", "exact", "eigen", "eigen_k10", "diagonal"}
    # the exact state (~0.2 MiB here) is over the 1e-4 GiB budget: reported, not run
    assert "skipped" in rows["exact"] and "ms_per_step" not in rows["exact"]
    assert rows["exact"]["rngd_state_bytes"] > 1e-4 * 2**30
    adam = rows["adam"]
    assert adam["ms_per_step"] == pytest.approx(np.median(adam["chunk_seconds"]) / 10 * 1e3,
                                                rel=1e-4)
    for name in ("sgd", "eigen", "eigen_k10", "diagonal"):
        r = rows[name]
        assert r["ratio_to_adam"] == pytest.approx(r["ms_per_step"] / adam["ms_per_step"],
                                                   rel=1e-4)
        refresh = (np.median(r.get("refresh_chunk_seconds", r["chunk_seconds"]))
                   - np.median(r["chunk_seconds"])) * 1e3
        # refresh_ms is written with 4 significant digits (the JSON's rounding).
        assert r["refresh_ms"] == pytest.approx(refresh, rel=1e-3, abs=1e-5)
        assert r["ms_per_step"] == pytest.approx(
            np.median(r["chunk_seconds"]) / 10 * 1e3 + max(refresh, 0) / 100, rel=1e-4)
    for name in ("exact", "eigen", "eigen_k10", "diagonal"):
        r = rows[name]
        assert r["plan_matches_init"] and r["rngd_state_bytes"] == r["rngd_state_bytes_plan"]
        assert r["state_to_params"] == pytest.approx(r["rngd_state_bytes"] / r["params_bytes"],
                                                     rel=1e-5)
        assert set(r["plan"]) == {"Dense_0", "Dense_1", "Dense_2", "Dense_3"}
        assert r["plan"]["Dense_3"]["kind"] == "softmax"
    assert rows["adam"]["state_to_params"] == pytest.approx(2.0, rel=1e-3)
    # eigen: (2 d^2 + rows d) per layer, d = 65 input (1 row), 17 hidden (16 rows), 17 out
    assert rows["eigen"]["rngd_state_bytes"] == 4 * ((2 * 65**2 + 65) + 2 * (2 * 17**2 + 16 * 17)
                                                      + (2 * 17**2 + 10 * 17))
    tr = res["training"]
    assert tr["sizes"] == [64, 8, 8, 8, 10]
    assert set(tr["best"]) == {"adam", "eigen"}
    assert set(tr["runs"]) == {f"adam@{wide.LR_GRIDS['adam'][1]:g}",  # --single-lr: middles
                               f"eigen@{wide.LR_GRIDS['rngd'][1]:g}"}
    for name, run in tr["best"].items():
        assert run.startswith(name + "@")
        c = tr["curves"][run]
        assert len(c["steps"]) == len(c["eval_loss"]) == len(c["chunk_seconds"]) + 1
        assert np.all(np.isfinite(c["eval_loss"]))
    assert set(out["goals"]) == {"eigen_reaches_target_before_adam"}


def test_profile_lists_ops_and_one_cond_per_phase(tmp_path):
    """benchmarks/profile.py end to end on the paper MLP (one chunk, no timing asserted).

    RNGD's compiled step holds one conditional for all layers' statistics and one for all
    refreshes (not one per layer, which on a GPU costs a host read of each predicate).
    """
    from benchmarks import profile

    out = profile.main(["--methods", "rngd_white_k10", "--chunks", "1", "--top", "3",
                        "--out", str(tmp_path)])
    r = out["methods"]["rngd_white_k10"]
    assert r["conditionals"] == 2
    assert r["ops"] and all(row["us_per_step"] >= 0 for row in r["ops"])
    assert any("dot" in row["op"] or "fusion" in row["op"] for row in r["ops"])
    assert (tmp_path / "profile.json").exists()


def test_profile_device_timeline_counts_kernels_busy_span_and_host_reads():
    """The accelerator summary of a trace: only the device's events count, not the host's."""
    from benchmarks import profile

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/host:CPU"}}]
    # two steps: kernels at 0-2 and 10-13 us, a predicate read at 3-4, a host event ignored
    kernels = [{"ph": "X", "pid": 1, "name": "fusion_1", "ts": 0.0, "dur": 2.0},
               {"ph": "X", "pid": 1, "name": "MemcpyD2H", "ts": 3.0, "dur": 1.0},
               {"ph": "X", "pid": 1, "name": "fusion_1", "ts": 10.0, "dur": 3.0}]
    host = [{"ph": "X", "pid": 7, "name": "MemcpyD2H", "ts": 3.0, "dur": 50.0}]
    events = meta + kernels + host
    assert profile._device_pids(events) == {1}
    assert profile._device_pids(meta[1:] + host) is None  # a CPU-only trace
    assert profile.device_timeline(kernels, 2) == {
        "kernels_per_step": 1.5, "busy_us_per_step": 3.0, "span_us_per_step": 6.5,
        "host_reads_per_step": 0.5}
    assert profile.device_timeline([], 2) == {}


def test_step_time_runs_solver_variants_and_refuses_bad_names(tmp_path):
    from benchmarks import step_time

    out = step_time.main(["--methods", "rngd_white_k10@gauss_jordan", "--reps", "1",
                          "--out", str(tmp_path)])
    assert list(out["methods"]) == ["adam", "rngd_white_k10@gauss_jordan"]  # adam added
    row = out["methods"]["rngd_white_k10@gauss_jordan"]
    assert "solver='gauss_jordan'" in row["describe"] and row["ms_per_step"] > 0
    assert out["methods"]["adam"]["x_adam"] == 1.0
    assert json.loads((tmp_path / "step_time.json").read_text())["methods"].keys() == \
        out["methods"].keys()
    known = {m.name: m for m in speed.default_methods()}
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        step_time.parse_methods("adam,nope", known)
    with pytest.raises(ValueError, match="'adam@cholesky': a solver applies to RNGD"):
        step_time.parse_methods("adam@cholesky", known)
    with pytest.raises(ValueError, match="'rngd@nope': unknown solver 'nope'; known: "
                                         "\\['auto', 'gauss_jordan'"):
        step_time.parse_methods("rngd@nope", known)
    with pytest.raises(ValueError, match="'rngd@': name a solver after '@'"):
        step_time.parse_methods("rngd@", known)
    # kfac-jax steps in its own Python loop: no scanned chunk to time or profile
    assert not harness.scannable(known["kfac_jax"])
    assert all(harness.scannable(known[n]) for n in ("adam", "rngd", "muon", "psgd_kron"))
    with pytest.raises(ValueError, match="'kfac_jax' runs its own Python loop of steps"):
        step_time.parse_methods("adam, kfac_jax", known)
    assert [m.name for m in step_time.parse_methods("adam, rngd@lapack", known)] == \
        ["adam", "rngd@lapack"]
    host = step_time.parse_methods("rngd_white_k10@lapack:host", known)[0]
    assert host.host_refresh and host.solver == "lapack" and "refresh decided" in host.describe()
    with pytest.raises(ValueError, match="'adam:host': ':host' applies to RNGD"):
        step_time.parse_methods("adam:host", known)
    with pytest.raises(ValueError, match="'rngd:fast': the only ':' variant is ':host'"):
        step_time.parse_methods("rngd:fast", known)
    with pytest.raises(SystemExit):  # argparse: a count of at least 1
        step_time.main(["--reps", "0"])


@pytest.mark.parametrize("update_every", [1, 2])
def test_host_refresh_chunk_has_no_refresh_conditional_and_the_same_updates(update_every):
    """Method.host_refresh: the chunk runs T-step segments, refresh=True on the first step;
    the updates are those of the update's own conditional, and the conditional is gone."""
    data = _toy_data()
    params = mlp.init_mlp(jax.random.PRNGKey(0), SIZES)
    idx = jnp.asarray(harness.epoch_indices(np.random.default_rng(0), data.num_train, 10)[:6])
    out, hlo = {}, {}
    for host in (False, True):
        m = harness.Method("rngd", "rngd", 0.05, inverse_every=3, update_every=update_every,
                           host_refresh=host)
        compiled, _, state, _ = harness.compile_chunk(m, SIZES, params, data.x_train,
                                                      data.y_train, 6, 10)
        hlo[host] = compiled.as_text()
        p, s = jax.tree.map(jnp.copy, params), state
        losses = []
        for _ in range(2):  # two chunks: the second starts at count 6
            p, s, loss = compiled(p, s, data.x_train, data.y_train, idx, jax.random.PRNGKey(1))
            losses.append(loss)
        out[host] = (p, s, jnp.concatenate(losses))
    for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # the statistics' conditional remains with update_every > 1; the refresh's is gone
    assert hlo[False].count("conditional(") == (1 if update_every == 1 else 2)
    assert hlo[True].count("conditional(") == (0 if update_every == 1 else 2)
    with pytest.raises(ValueError, match="refresh_every=4 must divide the chunk's 6 steps"):
        harness.make_chunk(lambda *a, **k: None, 4)(params, None, data.x_train,
                                                    data.y_train, idx, jax.random.PRNGKey(0))


def test_solvers_cli_arguments_are_checked_by_argparse():
    import argparse

    from benchmarks import solvers

    assert solvers.parse_shapes("64x65, 1X785") == [(64, 65), (1, 785)]
    for bad in ("foo", "4x", "0x5", "4x5x6", "-1x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="shapes are MxD"):
            solvers.parse_shapes(bad)
    assert solvers.parse_methods("lapack, cholesky") == ["lapack", "cholesky"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown methods \['nope'\]"):
        solvers.parse_methods("lapack,nope")


def test_rngd_weight_decay_is_added_after_the_preconditioning():
    """The regularised RNGD variants: ``-lr (G^-1 g + wd w)``, the decay not preconditioned."""
    from benchmarks import harness

    params = mlp.init_mlp(jax.random.PRNGKey(0), SIZES)
    x = jax.random.uniform(jax.random.PRNGKey(1), (20, SIZES[0]))
    _, acts, _ = mlp.mlp_apply(params, x)
    grads = jax.tree.map(lambda a: jnp.sin(a) + 0.1, params)
    lr, wd = 0.05, 0.01
    plain = harness.Method("p", "rngd", lr, momentum=0.0)
    decayed = harness.Method("d", "rngd", lr, momentum=0.0, weight_decay=wd)
    updates = {}
    for m in (plain, decayed):
        opt = harness.make_optimizer(m, SIZES)
        update = jax.jit(lambda g, s, p, a, opt=opt: opt.update(g, s, p, activations=a))
        updates[m.name], _ = update(grads, opt.init(params), params, acts)
    for path in params:
        for k in params[path]:
            np.testing.assert_allclose(updates["d"][path][k] - updates["p"][path][k],
                                       -lr * wd * params[path][k], rtol=1e-5, atol=1e-7)
    assert "weight decay 0.01 after the preconditioning" in decayed.describe()


def test_speed_cli_refuses_unknown_methods_and_workloads():
    """Unknown --methods were dropped silently (the run went on with Adam alone)."""
    with pytest.raises(SystemExit):
        speed.parse_args(["--methods", "bogus"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--workloads", "bogus"])
    args = speed.parse_args(["--methods", "adam,muon"])
    assert args.methods == "adam,muon"
