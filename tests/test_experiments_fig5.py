"""Tests of experiments/models.py (the MLP with batch norm) and experiments/fig5.py (smoke run)."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fig5
from experiments import models as mlp

EPS = 1e-3


def _np_bn(u, scale, bias):
    mean = u.mean(axis=0)
    var = ((u - mean) ** 2).mean(axis=0)
    return scale * (u - mean) / np.sqrt(var + EPS) + bias


def _np_forward(params, x, mode):
    """Direct numpy forward pass: returns logits and each dense layer's (input, pre-activation)."""
    p = jax.tree.map(np.asarray, params)
    num = sum(1 for k in p if k.startswith("Dense_"))
    h = np.asarray(x)
    layers = []
    for i in range(num):
        w, b = p[f"Dense_{i}"]["kernel"], p[f"Dense_{i}"]["bias"]
        z = h @ w + b
        layers.append((h, z))
        if i == num - 1:
            return z, layers
        if mode == "none":
            h = np.maximum(z, 0.0)
        elif mode == "before":  # BNB: normalise the pre-activations, then relu
            bn = p[f"BatchNorm_{i}"]
            h = np.maximum(_np_bn(z, bn["scale"], bn["bias"]), 0.0)
        else:  # BNA: relu, then normalise the post-activations
            bn = p[f"BatchNorm_{i}"]
            h = _np_bn(np.maximum(z, 0.0), bn["scale"], bn["bias"])
    raise AssertionError("unreachable")


def _random_params(key, sizes, mode):
    params = mlp.init_mlp(key, sizes, batch_norm=mode, dtype=jnp.float64)
    # Non-trivial BN scale/shift and biases so that every term of the formula matters.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 7), len(leaves))
    leaves = [leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype)
              for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("mode", mlp.BN_MODES)
@pytest.mark.parametrize("sizes", [(6, 4, 5, 4, 3)])
def test_mlp_matches_numpy_forward_and_activations(key, mode, sizes):
    params = _random_params(key, sizes, mode)
    x = jax.random.normal(jax.random.fold_in(key, 1), (11, sizes[0]), jnp.float64)
    logits, acts, _ = mlp.mlp_apply(params, x, batch_norm=mode)
    ref_logits, ref_layers = _np_forward(params, x, mode)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-10, atol=1e-12)
    assert sorted(acts) == [f"Dense_{i}" for i in range(len(sizes) - 1)]
    for i, (h, z) in enumerate(ref_layers):
        a = acts[f"Dense_{i}"]
        np.testing.assert_allclose(a["inputs"], h, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a["preacts"], z, rtol=1e-10, atol=1e-12)
        # The pre-activations are exactly this layer's dense map of its inputs.
        layer = params[f"Dense_{i}"]
        np.testing.assert_allclose(a["preacts"], a["inputs"] @ layer["kernel"] + layer["bias"],
                                   rtol=1e-10, atol=1e-12)


def test_bn_placement_properties(key):
    """BNB normalises pre-activations, BNA post-activations (scale 1, shift 0)."""
    sizes = (6, 9, 4)
    x = jax.random.normal(key, (40, 6), jnp.float64) + 2.0
    for mode in ("before", "after"):
        params = mlp.init_mlp(key, sizes, batch_norm=mode, dtype=jnp.float64)
        _, acts, used = mlp.mlp_apply(params, x, batch_norm=mode)
        z0 = np.asarray(acts["Dense_0"]["preacts"])
        h1 = np.asarray(acts["Dense_1"]["inputs"])
        if mode == "before":
            standard = (z0 - z0.mean(0)) / np.sqrt(z0.var(0) + EPS)
            np.testing.assert_allclose(h1, np.maximum(standard, 0.0), atol=1e-12)
            np.testing.assert_allclose(used["BatchNorm_0"]["mean"], z0.mean(0), atol=1e-12)
        else:
            r = np.maximum(z0, 0.0)
            np.testing.assert_allclose(h1.mean(0), 0.0, atol=1e-10)
            np.testing.assert_allclose(h1.var(0), r.var(0) / (r.var(0) + EPS), atol=1e-10)
            np.testing.assert_allclose(used["BatchNorm_0"]["var"], r.var(0), atol=1e-12)


def test_population_stats_reproduce_training_mode(key):
    sizes = (5, 8, 8, 3)
    x = jax.random.normal(key, (30, 5), jnp.float64)
    for mode in ("before", "after"):
        params = _random_params(key, sizes, mode)
        stats = mlp.population_stats(params, x, batch_norm=mode)
        train = mlp.mlp_apply(params, x, batch_norm=mode)[0]
        infer = mlp.mlp_apply(params, x, batch_norm=mode, bn_stats=stats)[0]
        np.testing.assert_allclose(infer, train, rtol=1e-10, atol=1e-12)
        # On one sample, inference mode uses the population statistics, not the sample's own.
        one = mlp.mlp_apply(params, x[:1], batch_norm=mode, bn_stats=stats)[0]
        np.testing.assert_allclose(one, train[:1], rtol=1e-10, atol=1e-12)
    assert mlp.population_stats(_random_params(key, sizes, "none"), x) == {}


def test_cross_entropy_and_accuracy(key):
    logits = jax.random.normal(key, (7, 4), jnp.float64)
    labels = jnp.array([0, 1, 2, 3, 0, 1, 2])
    lg = np.asarray(logits)
    logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    ref = -np.mean(logp[np.arange(7), np.asarray(labels)])
    np.testing.assert_allclose(mlp.cross_entropy(logits, labels), ref, rtol=1e-12)


def test_errors_and_layer_kinds(key):
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        mlp.init_mlp(key, (3, 2), batch_norm="middle")
    with pytest.raises(ValueError, match="at least two positive widths"):
        mlp.init_mlp(key, (3,))
    assert mlp.rngd_layers(4) == {"Dense_0": "linear", "Dense_1": "relu", "Dense_2": "relu",
                                  "Dense_3": "linear"}
    with pytest.raises(ValueError, match="unknown method"):
        fig5.method_parts("SGD-BNX")


@pytest.mark.parametrize("m,k", [(25, 10), (30, 10), (7, 3), (5, 1)])
def test_smooth_blocks_against_loop(m, k):
    costs = np.arange(m, dtype=np.float64) ** 1.5
    ends, means = fig5.smooth_blocks(costs, k)
    ref_ends, ref_means = [], []
    for start in range(0, m, k):
        block = costs[start:start + k]
        ref_ends.append(start + len(block))
        ref_means.append(block.mean())
    np.testing.assert_array_equal(ends, ref_ends)
    np.testing.assert_allclose(means, ref_means)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One tiny Fig. 5 run, shared by the tests that read its files."""
    tmp_path = tmp_path_factory.mktemp("fig5")
    cfg = fig5.quick_config(
        sizes=(64, 8, 8, 10), epochs=3, batch_size=50, train_size=300,
        methods=("SGD-BNA", "RNGD"),
        lrs={"SGD": (0.01, 0.05), "ADAM": (), "RNGD": (0.05,)},
        rngd_inverse_every=4, timing_rounds=2, out=str(tmp_path), progress=False,
    )
    return cfg, fig5.run(cfg), tmp_path


def test_fig5_smoke_run_writes_json_and_png(smoke_run):
    cfg, res, tmp_path = smoke_run
    png, js, npz = (tmp_path / "fig5.png"), (tmp_path / "fig5.json"), (tmp_path / "fig5_costs.npz")
    assert png.stat().st_size > 10_000 and js.exists() and npz.exists()
    payload = json.loads(js.read_text())
    small = json.loads((tmp_path / "fig5_summary.json").read_text())
    assert small["summary"]["taus"] == payload["summary"]["taus"]
    assert all("smoothed" not in e and "tau_sharp" in e
               for e in small["summary"]["methods"].values())
    assert payload["config"]["methods"] == ["SGD-BNA", "RNGD"]
    assert payload["seeds"]["init"] == 0
    raw = np.load(npz)
    iters = 3 * (300 // 50)
    assert payload["data"]["total_iterations"] == iters
    for method, entry in payload["summary"]["methods"].items():
        assert 0.0 <= entry["test_accuracy"] <= 1.0
        assert len(payload["runs"][method][0]["epoch_seconds"]) == 3
        costs = raw[f"{method}|{entry['best_lr']}|costs"]
        assert costs.shape == (iters,) and np.all(np.isfinite(costs))
        # The tau-sharp ratio: mean and std of the last ceil(tau M) costs, recomputed here.
        for tau in cfg.taus:
            window = costs[-max(1, math.ceil(tau * iters - 1e-9)):]
            got = entry["tau_sharp"][str(tau)]
            np.testing.assert_allclose(got["mean"], window.mean(), rtol=1e-5)
            np.testing.assert_allclose(got["std"], window.std(), rtol=1e-4, atol=1e-9)
        assert sorted(entry["time_to_cost"]) == sorted(map(str, cfg.cost_targets))
        # The best lr has the lowest selection score (mean cost of the last 10% iterations).
        scores = {float(k): v for k, v in entry["lr_scores"].items()}
        assert entry["best_lr"] == min(scores, key=scores.get)
    # RNGD's state was refreshed and no block fell back on this well-posed problem.
    assert all(v == 0 for v in payload["runs"]["RNGD"][0]["rngd_skipped"].values())
    assert "RNGD" in fig5.tau_table_markdown(res["summary"])
    timing = payload["interleaved_timing"]
    assert sorted(timing) == sorted(cfg.methods)
    assert all(len(t["epoch_seconds"]) == 2 and t["seconds_per_iteration"] > 0
               for t in timing.values())
    # --lr-from: each method's best rate, read back from the JSON, becomes its only rate.
    chosen = fig5.best_lrs(js)
    assert chosen == {m: (e["best_lr"],) for m, e in payload["summary"]["methods"].items()}
    again = dataclasses.replace(cfg, methods=tuple(chosen), lrs=chosen)
    assert all(fig5.lr_grid(again, m) == chosen[m] for m in chosen)


def test_time_to_cost_reads_the_first_epoch_at_or_below_each_target():
    cost = [0.9, 0.5, 0.3, 0.35, 0.1]
    secs = [1.0, 2.0, 3.0, 4.0, 5.0]
    got = fig5.time_to_cost(cost, secs, (0.5, 0.32, 0.1, 0.01))
    assert got["0.5"] == {"epoch": 2, "seconds": 3.0}
    assert got["0.32"] == {"epoch": 3, "seconds": 6.0}
    assert got["0.1"] == {"epoch": 5, "seconds": 15.0}
    assert got["0.01"] is None


def test_aggregate_seeds_matches_a_direct_computation(smoke_run, tmp_path):
    cfg, _, first = smoke_run
    # A second "seed": the same files with the costs scaled and other test accuracies.
    second = tmp_path / "seed1"
    shutil.copytree(first, second)
    payload = json.loads((second / "fig5.json").read_text())
    payload["seeds"]["init"] = 1
    for i, entry in enumerate(payload["summary"]["methods"].values()):
        entry["test_accuracy"] = 0.5 + 0.1 * i
    (second / "fig5.json").write_text(json.dumps(payload))
    with np.load(first / "fig5_costs.npz") as raw:
        arrays = {k: (2.0 + np.arange(v.size)) * v if k.endswith("costs") else v
                  for k, v in raw.items()}
    np.savez(second / "fig5_costs.npz", **arrays)

    agg = fig5.aggregate_seeds([first, second], tmp_path / "agg")
    assert agg["seeds"] == [0, 1]
    assert (tmp_path / "agg" / "fig5_seeds.json").exists()
    original = json.loads((first / "fig5.json").read_text())["summary"]["methods"]
    with np.load(first / "fig5_costs.npz") as raw:
        for method, entry in agg["methods"].items():
            lr = original[method]["best_lr"]
            a = raw[f"{method}|{lr}|costs"]
            b = arrays[f"{method}|{lr}|costs"]
            for tau in cfg.taus:
                k = max(1, math.ceil(tau * a.size - 1e-9))
                means = np.array([a[-k:].mean(), b[-k:].mean()])
                got = entry["tau_sharp"][str(tau)]
                np.testing.assert_allclose([got["mean"], got["std"]],
                                           [means.mean(), means.std()], rtol=1e-9)
            accs = [original[method]["test_accuracy"],
                    payload["summary"]["methods"][method]["test_accuracy"]]
            np.testing.assert_allclose(entry["test_accuracy"]["mean"], np.mean(accs))
    assert "2 seeds" in fig5.seeds_table_markdown(agg)
    # Seeds that ran different methods cannot be combined.
    del payload["summary"]["methods"]["RNGD"]
    (second / "fig5.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"ran methods \['SGD-BNA'\], expected"):
        fig5.aggregate_seeds([first, second], tmp_path / "agg")


def test_aggregate_seeds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fig5.json"):
        fig5.aggregate_seeds([tmp_path])
    with pytest.raises(ValueError, match="at least one directory"):
        fig5.aggregate_seeds([])


def test_lr_grid_prefers_the_method_over_its_family():
    cfg = fig5.quick_config(lrs={"SGD": (0.1, 0.3), "SGD-BNA": (0.01,), "RNGD": (1.0,)})
    assert fig5.lr_grid(cfg, "SGD-PLAIN") == (0.1, 0.3)
    assert fig5.lr_grid(cfg, "SGD-BNA") == (0.01,)
    assert fig5.lr_grid(cfg, "RNGD") == (1.0,)
    with pytest.raises(ValueError, match="unknown method"):
        fig5.lr_grid(cfg, "LBFGS")


def test_best_lrs_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results file"):
        fig5.best_lrs(tmp_path / "nope.json")


def test_progress_bar_says_a_grid_point_diverged(tmp_path, capsys):
    """Robustness item 8: a diverged grid point is announced, not left as cost=nan."""
    cfg = fig5.quick_config(
        sizes=(64, 8, 10), epochs=2, batch_size=50, train_size=200, methods=("SGD-PLAIN",),
        lrs={"SGD": (0.01, 1e30), "ADAM": (), "RNGD": ()}, timing_rounds=1,
        out=str(tmp_path), progress=True,
    )
    fig5.run(cfg)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "SGD-PLAIN at lr=1e+30 diverged in epoch" in text
    assert "excluded from the learning-rate choice" in text
    assert "lr=0.01 diverged" not in text
