"""Tests of experiments/fig4.py: eq. (30) against numpy, one training step, and a smoke run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fig4


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def _numpy_eq30_direction(theta: np.ndarray, x: np.ndarray, y: np.ndarray, eps0: float):
    """Eq. (30) by the book: (g + eps I)^-1 grad, g = mean nu z z^T, eps = eps0 tr(g)/D."""
    z = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    p = _sigmoid(z @ theta)
    grad = z.T @ (p - y) / len(x)  # the paper's gradient of eq. (29)
    g = np.zeros((z.shape[1], z.shape[1]))
    for zi, pi in zip(z, p, strict=True):
        g += pi * (1 - pi) * np.outer(zi, zi)
    g /= len(x)
    eps = eps0 * np.trace(g) / z.shape[1]
    return np.linalg.solve(g + eps * np.eye(z.shape[1]), grad), grad


@pytest.mark.parametrize("solver", ["dense", "woodbury"])
@pytest.mark.parametrize("batch,d_in", [(8, 20), (30, 5)])
def test_natural_gradient_matches_numpy_eq30(solver, batch, d_in):
    runs, grid = 2, 3
    grad_fn = jax.jit(jax.vmap(jax.vmap(jax.grad(fig4.cross_entropy), in_axes=(0, None, None))))
    ngd_fn = jax.jit(lambda p, g, x: fig4.natural_gradient(p, g, x, damping=1e-2, solver=solver))
    for seed in range(3):  # one compilation, several random problems
        rng = np.random.default_rng(seed)
        xb = rng.normal(size=(runs, batch, d_in)) * rng.uniform(0.2, 2.0, size=d_in)
        yb = (rng.uniform(size=(runs, batch)) < 0.5).astype(float)
        theta = rng.normal(size=(runs, grid, d_in + 1)) * rng.uniform(0.1, 1.0)
        params = {"kernel": jnp.asarray(theta[..., :-1]), "bias": jnp.asarray(theta[..., -1])}
        grads = grad_fn(params, jnp.asarray(xb), jnp.asarray(yb))
        got = ngd_fn(params, grads, jnp.asarray(xb))
        for s in range(runs):
            for g in range(grid):
                want, grad = _numpy_eq30_direction(theta[s, g], xb[s], yb[s], 1e-2)
                np.testing.assert_allclose(grads["kernel"][s, g], grad[:-1], rtol=1e-10,
                                           atol=1e-12)
                np.testing.assert_allclose(got["kernel"][s, g], want[:-1], rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(got["bias"][s, g], want[-1], rtol=1e-7, atol=1e-9)


def _train_inputs(seed, n, d_in):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d_in)))
    y = jnp.asarray((rng.uniform(size=n) < 0.5).astype(float))
    keys = jnp.stack([jax.random.PRNGKey(seed), jax.random.PRNGKey(seed + 10)])
    return x, y, keys


@pytest.mark.parametrize("solver", ["dense", "woodbury"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_ngd_step_and_momentum_match_numpy(seed, solver):
    """With n = batch size each epoch is one full-batch step: two steps of eq. (30) + momentum."""
    n, d_in, eps0, init_scale = 12, 4, 1e-2, 0.3
    x, y, keys = _train_inputs(seed, n, d_in)
    lrs, moms = jnp.asarray([0.5, 0.2]), jnp.asarray([0.0, 0.8])
    params, loss, error = fig4.train_grid(x, y, keys, lrs, moms, ngd=True, solver=solver,
                                          batch_size=n, epochs=2, damping=eps0,
                                          init_scale=init_scale)
    init_keys, _ = fig4.split_run_keys(keys)
    theta0 = np.asarray(fig4.init_theta(init_keys, d_in + 1, init_scale, jnp.float64))
    xn, yn = np.asarray(x), np.asarray(y)
    for s in range(2):
        for g in range(2):
            lr, mom = float(lrs[g]), float(moms[g])
            d0, _ = _numpy_eq30_direction(theta0[s], xn, yn, eps0)
            theta1 = theta0[s] - lr * d0  # eq. (30)
            d1, _ = _numpy_eq30_direction(theta1, xn, yn, eps0)
            theta2 = theta1 - lr * (d1 + mom * d0)  # heavy-ball momentum
            got = np.concatenate([params["kernel"][s, g], params["bias"][s, g][None]])
            np.testing.assert_allclose(got, theta2, rtol=1e-8, atol=1e-10)
            # The curve's entries are the full-training-set cross-entropy and error rate.
            for epoch, th in enumerate((theta0[s], theta1, theta2)):
                logit = xn @ th[:-1] + th[-1]
                ce = np.mean(np.logaddexp(0, logit) - yn * logit)
                np.testing.assert_allclose(loss[s, g, epoch], ce, rtol=1e-10)
                np.testing.assert_allclose(error[s, g, epoch], np.mean((logit > 0) != (yn > 0)))


@pytest.mark.parametrize("seed", [0])
def test_gd_steps_match_numpy(seed):
    n, d_in = 10, 3
    x, y, keys = _train_inputs(seed, n, d_in)
    lrs, moms = jnp.asarray([1.0]), jnp.asarray([0.8])
    params, _, _ = fig4.train_grid(x, y, keys[:1], lrs, moms, ngd=False, solver="dense",
                                   batch_size=n, epochs=3, init_scale=0.1)
    theta = np.asarray(fig4.init_theta(fig4.split_run_keys(keys[:1])[0], d_in + 1, 0.1,
                                       jnp.float64))[0]
    z = np.concatenate([np.asarray(x), np.ones((n, 1))], axis=1)
    velocity = np.zeros(d_in + 1)
    for _ in range(3):
        velocity = z.T @ (_sigmoid(z @ theta) - np.asarray(y)) / n + 0.8 * velocity
        theta = theta - velocity
    got = np.concatenate([params["kernel"][0, 0], params["bias"][0, 0][None]])
    np.testing.assert_allclose(got, theta, rtol=1e-10)


def test_minibatches_cover_epoch_and_differ_between_runs():
    """Cross-entropy after one epoch of tiny-lr GD differs across runs only via init/order."""
    x, y, keys = _train_inputs(0, 20, 2)
    _, loss, _ = fig4.train_grid(x, y, keys, jnp.asarray([0.0]), jnp.asarray([0.0]), ngd=False,
                                 solver="dense", batch_size=5, epochs=2)
    # lr = 0: nothing moves.
    np.testing.assert_allclose(loss[:, 0, 1:], loss[:, 0, :1].repeat(2, axis=1), rtol=1e-14)
    assert loss[0, 0, 0] != loss[1, 0, 0]  # different initialisations


def test_choose_solver_and_best_selection():
    assert fig4.choose_solver("auto", 65, 50) == "dense"
    assert fig4.choose_solver("auto", 785, 50) == "woodbury"
    assert fig4.choose_solver("auto", 785, 1000) == "dense"
    assert fig4.choose_solver("dense", 785, 50) == "dense"
    with pytest.raises(ValueError, match="solver must be 'auto', 'dense' or 'woodbury'"):
        fig4.choose_solver("qr", 3, 1)
    configs = [{"diverged": True, "final_train_loss": 1e-9},
               {"diverged": False, "final_train_loss": 0.5},
               {"diverged": False, "final_train_loss": 0.1}]
    assert fig4._select_best(configs) == 2
    assert fig4._select_best(configs[:1]) is None


def test_smoke_run_writes_json_and_png(tmp_path):
    cfg = fig4.Fig4Config(
        tasks=("digits_3v5",), train_sizes={"digits": (60,)}, epochs=2, num_runs=1,
        learning_rates=(1.0, float("inf")), momentums=(0.0,), batch_size=20, out=str(tmp_path),
        progress=False,
    )
    results = fig4.run(cfg)
    blob = json.loads((tmp_path / "fig4.json").read_text())
    assert (tmp_path / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    small = json.loads((tmp_path / "fig4_summary.json").read_text())
    assert small["summary"] == blob["summary"]
    assert len(small["grid_finals"]["digits_3v5/n=60/WhiteNGD"]) == 2
    assert blob["config"]["epochs"] == 2 and blob["config"]["tasks"] == ["digits_3v5"]
    assert [p["train_size"] for p in blob["panels"]] == [60]
    for panel in blob["panels"]:
        assert set(panel["methods"]) == set(fig4.METHODS)
        for res in panel["methods"].values():
            assert len(res["configs"]) == 2
            for c in res["configs"]:
                assert len(c["mean_loss"]) == 3 and len(c["run_loss"]) == 1
            assert res["best"] is not None
        assert panel["methods"]["WhiteGD"]["whitening"]["whitened_rank"] <= 59
        assert panel["methods"]["NGD"]["solver"] == "dense"
    assert len(results["summary"]) == 4
    assert {row["method"] for row in blob["summary"]} == set(fig4.METHODS)
    # lr = inf makes the runs non-finite: recorded as diverged (inf is null in JSON), never best.
    for res in blob["panels"][0]["methods"].values():
        assert res["best"]["learning_rate"] == 1.0
        assert res["diverged_configs"] == [[None, 0.0]]
        assert res["configs"][1]["diverged"] and res["configs"][1]["diverged_runs"] == 1


def test_run_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown methods"):
        fig4.run(fig4.Fig4Config(methods=("Adam",), out=str(tmp_path)))
    with pytest.raises(ValueError, match="train_sizes has no entry for the 'digits' data set"):
        fig4.run(fig4.Fig4Config(train_sizes={}, out=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="Unknown task 'x'"):
        fig4.run(fig4.Fig4Config(tasks=("x",), out=str(tmp_path), progress=False))


def test_parse_sizes():
    assert fig4.parse_sizes("fashion=1000,all;digits=100") == {
        "fashion": (1000, None), "digits": (100,)}
    with pytest.raises(ValueError, match="expected 'dataset=size,size;...', got 'digits'"):
        fig4.parse_sizes("digits")


def test_command_line_builds_the_config():
    args = fig4.make_parser().parse_args(
        ["--full", "--batch-size", "full", "--runs", "1", "--sizes", "fashion=all",
         "--tasks", "fashion_shirt_v_tshirt", "--methods", "NGD,WhiteNGD",
         "--learning-rates", "0.1,1", "--momentums", "0.8", "--damping", "1e-4"])
    cfg = fig4.config_from_args(args)
    assert cfg.batch_size is None and cfg.num_runs == 1
    assert cfg.train_sizes == {"fashion": (None,)}
    assert cfg.tasks == ("fashion_shirt_v_tshirt",)
    assert cfg.methods == ("NGD", "WhiteNGD")
    assert cfg.learning_rates == (0.1, 1.0) and cfg.momentums == (0.8,)
    assert cfg.damping == 1e-4
    # Unset options keep the defaults of the scale asked for.
    quick = fig4.config_from_args(fig4.make_parser().parse_args([]))
    assert quick == fig4.quick_config(out=quick.out, seed=0, data_dir=None, progress=True,
                                      solver="auto")
