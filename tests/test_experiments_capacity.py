"""Tests of experiments/capacity.py: a tiny smoke run checked against independent references,
and the numpy correlation and timing helpers.

References, independent of the routes the experiment takes:

* Fisher-Rao norm (model form): ``theta^T F theta`` with F the dense FIM of
  ``rfim_jax.full_fisher`` and theta from ``ravel_neuron_major``;
* empirical form: ``mean_i <grad_theta log p(y_i | x_i), theta>^2`` by per-sample ``jax.grad``
  of a hand-written log-likelihood;
* relative norms: the softmax layer's against the FIM's own last diagonal block, the relu
  layers' against the closed form ``sum_l mean_i sigmoid(z_il)^2 z_il^2`` (eq. 23, omega = 1:
  ``w~_l^T G_l w~_l = mean_i nu(z_il) (w~_l^T x~_i)^2``).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import rfim_jax
from experiments import capacity
from experiments import models as mlp

SIZES = (64, 8, 8, 10)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("capacity")
    cfg = capacity.quick_config(
        sizes=SIZES, iterations=8, num_snapshots=4, batch_size=50, train_size=300,
        subset_size=40, rngd_inverse_every=4, dtype="float64", out=str(tmp_path),
        progress=False,
    )
    return cfg, capacity.run(cfg), tmp_path


def test_smoke_run_writes_json_and_png_with_finite_series(smoke):
    cfg, res, tmp_path = smoke
    assert (tmp_path / "capacity.png").stat().st_size > 10_000
    payload = json.loads((tmp_path / "capacity.json").read_text())
    assert {"config", "environment", "data", "snapshots", "summary", "runs"} <= set(payload)
    assert payload["snapshots"] == capacity.snapshot_iterations(8, 4) == [0, 1, 2, 4, 8]
    assert payload["data"] == {"dataset": "digits", "n_train": 300, "n_test": 450,
                               "subset_size": 40, "epochs": pytest.approx(8 * 50 / 300, 1e-5)}
    layers = [mlp.dense_name(i) for i in range(len(SIZES) - 1)]
    scalars = ("train_loss", "test_loss", "train_acc", "test_acc", "loss_gap", "acc_gap",
               "fr_norm_sq", "fr_norm_sq_empirical", "relative_fr_norm_sq_total", "l2_norm_sq")
    assert sorted(payload["runs"]) == sorted(capacity.OPTIMIZERS)
    for opt, run in payload["runs"].items():
        s = run["series"]
        assert s["iteration"] == payload["snapshots"]
        for k in scalars:
            v = np.asarray(s[k], np.float64)  # a None (non-finite) would fail here
            assert v.shape == (5,) and np.all(np.isfinite(v)), (opt, k)
        assert sorted(s["relative_fr_norm_sq"]) == layers
        for p in layers:
            assert np.all(np.asarray(s["relative_fr_norm_sq"][p]) > 0)
        mem = res["runs"][opt]["series"]  # unrounded (the JSON keeps 6 significant digits)
        np.testing.assert_allclose(mem["loss_gap"],
                                   np.subtract(mem["test_loss"], mem["train_loss"]), rtol=1e-12)
        np.testing.assert_allclose(mem["acc_gap"],
                                   np.subtract(mem["train_acc"], mem["test_acc"]), atol=1e-12)
        np.testing.assert_allclose(
            mem["relative_fr_norm_sq_total"],
            np.sum([mem["relative_fr_norm_sq"][p] for p in layers], axis=0), rtol=1e-12)
        np.testing.assert_allclose(s["fr_norm_sq"], mem["fr_norm_sq"], rtol=1e-5)
        # Every optimiser starts from the same init: the iteration-0 snapshot is shared.
        first = payload["runs"]["SGD"]["series"]
        assert all(s[k][0] == first[k][0] for k in scalars)
        # Training moved the params.
        assert s["l2_norm_sq"][-1] != s["l2_norm_sq"][0]
    rngd = payload["runs"]["RNGD"]
    state_norms = rngd["series"]["rngd_state_relative_fr_norm_sq"]
    assert sorted(state_norms) == layers
    assert all(v[0] is None and all(x is not None and x > 0 for x in v[1:])
               for v in state_norms.values())
    assert len(rngd["rngd_diagnostics"]) == 5
    assert all(rngd["rngd_diagnostics"][-1][f"{p}/fallbacks"] == 0 for p in layers)
    summ = payload["summary"]
    assert summ["points_pooled"] == 3 * 4
    for g in capacity.GAPS:
        for n in summ["norms"]:
            c = summ["pooled_correlations"][g][n]
            assert c["spearman"] is None or -1.0 <= c["spearman"] <= 1.0
    for e in summ["optimizers"].values():
        assert e["t_test_min"] in payload["snapshots"]
        assert e["overfits"] == (e["test_loss_rise_after_min"] > capacity.OVERFIT_RISE)
    assert "correlation with loss_gap" in capacity.report(res["summary"])


@pytest.mark.parametrize("opt", capacity.OPTIMIZERS)
def test_recorded_norms_match_independent_references(smoke, opt):
    """The last snapshot's norms, recomputed from that snapshot's params without the
    experiment's code paths: theta^T F theta from the dense FIM, per-sample gradients, the
    FIM's last block and the relu closed form."""
    cfg, res, tmp_path = smoke
    x_tr, y_tr, x_te, y_te, sub = capacity.load_data(cfg)
    np.testing.assert_array_equal(res["subset"], sub)
    xs, ys = jnp.asarray(x_tr[sub]), jnp.asarray(y_tr[sub])
    params = res["runs"][opt]["params"]
    series = res["runs"][opt]["series"]
    saved = json.loads((tmp_path / "capacity.json").read_text())["runs"][opt]["series"]
    assert series["iteration"][-1] == cfg.iterations

    fim = rfim_jax.full_fisher(mlp.logits_fn, params, xs, "categorical")
    theta, _ = rfim_jax.ravel_neuron_major(params)
    want = float(theta @ fim.matrix @ theta)
    np.testing.assert_allclose(series["fr_norm_sq"][-1], want, rtol=1e-9)
    np.testing.assert_allclose(saved["fr_norm_sq"][-1], want, rtol=1e-5)  # 6 digits in JSON

    flat, unravel = ravel_pytree(params)

    def log_lik(t, xi, yi):
        return jax.nn.log_softmax(mlp.logits_fn(unravel(t), xi[None])[0])[yi]

    grads = jax.vmap(jax.grad(log_lik), in_axes=(None, 0, 0))(flat, xs, ys)
    np.testing.assert_allclose(series["fr_norm_sq_empirical"][-1],
                               float(jnp.mean((grads @ flat) ** 2)), rtol=1e-9)

    last = mlp.dense_name(len(SIZES) - 2)
    w_last, _ = rfim_jax.ravel_neuron_major({last: params[last]})
    np.testing.assert_allclose(series["relative_fr_norm_sq"][last][-1],
                               float(w_last @ fim.blocks[last] @ w_last), rtol=1e-9)
    _, acts, _ = mlp.mlp_apply(params, xs)
    for i in range(len(SIZES) - 2):
        z = np.asarray(acts[mlp.dense_name(i)]["preacts"])
        sig = 1.0 / (1.0 + np.exp(-z))
        np.testing.assert_allclose(series["relative_fr_norm_sq"][mlp.dense_name(i)][-1],
                                   np.sum(np.mean(sig**2 * z**2, axis=0)), rtol=1e-9)

    np.testing.assert_allclose(series["l2_norm_sq"][-1], float(flat @ flat), rtol=1e-12)
    logp = jax.nn.log_softmax(mlp.logits_fn(params, jnp.asarray(x_te)))
    test_loss = -float(jnp.mean(logp[jnp.arange(len(y_te)), jnp.asarray(y_te)]))
    np.testing.assert_allclose(series["test_loss"][-1], test_loss, rtol=1e-10)


def test_rankdata_spearman_pearson_against_hand_values():
    np.testing.assert_array_equal(capacity.rankdata([3.0, 1.0, 4.0, 1.0, 5.0]),
                                  [3.0, 1.5, 4.0, 1.5, 5.0])
    np.testing.assert_array_equal(capacity.rankdata([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    np.testing.assert_allclose(capacity.pearson(x, y), np.corrcoef(x, y)[0, 1], rtol=1e-12)
    # Spearman is invariant to monotone maps and is +-1 for monotone relations.
    assert capacity.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert capacity.spearman(x, -x**3) == pytest.approx(-1.0)
    np.testing.assert_allclose(capacity.spearman(x, y), capacity.spearman(np.exp(x), y),
                               rtol=1e-12)
    # Hand value with ties: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4).
    r = np.array([1.5, 1.5, 3.0, 4.0]) - 2.5
    s = np.array([1.0, 2.0, 3.0, 4.0]) - 2.5
    np.testing.assert_allclose(capacity.spearman([1, 1, 2, 3], [10, 20, 30, 40]),
                               r @ s / np.sqrt((r @ r) * (s @ s)), rtol=1e-12)
    assert capacity.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert capacity.pearson([1.0, 2.0], [1.0, 2.0]) is None


def test_growth_peak_and_the_declared_criterion():
    t = [0, 1, 2, 4, 8, 16, 32]
    v = [5.0, 1.0, 1.1, 4.4, 8.8, 9.0, 9.0]  # slopes 0.14, 2.0, 1.0, 0.03, 0 (t=0 ignored)
    peak = capacity.growth_peak(t, v)
    assert peak["iteration"] == 4 and peak["previous"] == 2
    np.testing.assert_allclose(peak["rate"], np.log(4.0) / np.log(2.0))
    assert capacity.growth_peak([0, 1], [1.0, 2.0]) is None

    def fake(test_loss, norm):
        n = len(t)
        s = {"iteration": t, "train_loss": [1.0] * n, "test_loss": test_loss,
             "train_acc": [1.0] * n, "test_acc": [0.9] * n,
             "loss_gap": list(np.subtract(test_loss, 1.0)), "acc_gap": [0.1] * n}
        for k in capacity.NORMS:
            s[k] = norm
        s["relative_fr_norm_sq"] = {"Dense_0": norm}
        return {"series": s}

    overfit = [3.0, 2.5, 2.0, 1.5, 1.2, 1.4, 1.6]  # minimum at t=8, then +33%
    flat_ = [3.0, 2.5, 2.0, 1.5, 1.2, 1.19, 1.18]  # keeps falling
    summ = capacity.summarise({"A": fake(overfit, v), "B": fake(flat_, v)})
    a, b = summ["optimizers"]["A"], summ["optimizers"]["B"]
    assert a["t_test_min"] == 8 and a["overfits"]
    assert a["timing"]["fr_norm_sq"]["precedes_test_min"] is True
    assert a["timing"]["fr_norm_sq"]["test_loss_at_growth_peak"] == 1.5
    assert b["t_test_min"] == 32 and not b["overfits"]
    assert b["timing"]["fr_norm_sq"]["precedes_test_min"] is None
    assert summ["points_pooled"] == 12
