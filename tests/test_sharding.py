"""RNGD under jax.sharding on 4 host CPU devices, against one device and a numpy reference.

The device count is fixed when jax starts, so the sharded runs happen in a fresh process
(tests/_driver.py sharding) with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``. It
runs 3 jitted steps (``inverse_every=2``, so two inverse refreshes) of the plain-JAX MLP with
``jax.jit(in_shardings=..., out_shardings=...)`` twice:

(a) data parallel: the batch (hence the activations and the loss) split over a "data" axis,
    params and optimiser state replicated;
(b) neuron axis: the kernels of ``Dense_0`` and ``block/Dense_0`` split over their output axis
    m on a "model" axis, and the hidden layer's per-neuron state (m, d, d) split with them;

and compares params and the full optimiser state after every step with the same steps on
one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _driver import LAYERS, SHARD_DIMS, grads_and_acts, init_mlp, make_batch, np_first_step

import rfim_jax

DRIVER = Path(__file__).with_name("_driver.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory, child_env):
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    env = child_env(
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                   ).strip(),
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "sharding", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_data_parallel_matches_one_device(report):
    r = report["data"]
    # Relative to max(1, |reference|); float64 reductions in another order differ by ~1e-16.
    assert r["params_err"] < 1e-12
    assert r["state_err"] < 1e-12


def test_data_parallel_statistics_are_global_batch_statistics(report):
    # The first step's moving average from G = I, recomputed in numpy on the whole batch of 16:
    # a per-shard (4-row) estimate would differ at O(1).
    dims = SHARD_DIMS
    params = init_mlp(jax.random.PRNGKey(0), dims["d_in"], dims["hidden"], dims["classes"])
    x, y = make_batch(jax.random.PRNGKey(10), dims["n"], dims["d_in"], dims["classes"])
    grads, acts = grads_and_acts(params, x, y)
    want, _ = np_first_step(LAYERS, params, grads, acts, decay=0.8, damping=1e-2)
    got = report["data"]["first_metrics"]
    for path in LAYERS:
        np.testing.assert_allclose(np.asarray(got[path]), want[path], rtol=1e-10, atol=1e-12)


def test_neuron_axis_sharding_matches_one_device(report):
    r = report["model"]
    assert r["params_err"] < 1e-12
    assert r["state_err"] < 1e-12


def test_neuron_axis_sharding_splits_per_neuron_state(report):
    r = report["model"]
    hidden, d = SHARD_DIMS["hidden"], SHARD_DIMS["hidden"] + 1
    # 8 neurons over 4 devices: 2 kernel columns and 2 (d, d) blocks per device.
    assert r["hidden_state_spec"] == "P('model',)"
    assert r["hidden_state_shard_shape"] == [hidden // 4, d, d]
    assert r["hidden_inverse_shard_shape"] == [hidden // 4, d, d]
    assert r["hidden_kernel_shard_shape"] == [hidden, hidden // 4]
    # The input layer's "linear" kind has one shared block: replicated.
    assert r["input_state_spec"] == "P()"


def test_eigen_state_shards_scales_like_the_kernel(report):
    # Eigen: S (m, d) follows the kernel's output axis; A and U (d, d) are replicated.
    for mode in ("data_eigen", "model_eigen"):
        assert report[mode]["params_err"] < 1e-12
        assert report[mode]["state_err"] < 1e-12
    r = report["model_eigen"]
    hidden, d = SHARD_DIMS["hidden"], SHARD_DIMS["hidden"] + 1
    assert r["hidden_state_spec"] == "P('model',)"
    assert r["hidden_state_shard_shape"] == [hidden // 4, d]
    assert r["hidden_inverse_shard_shape"] == [d, d]


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_explicit_sharding_init_and_update_agree(report, representation):
    r = report["explicit"][representation]
    assert r["specs_agree"]
    assert r["hidden_spec"] == "P('model', None, None)" if representation == "exact" else \
        r["hidden_spec"] == "P('model', None)"
    assert r["params_err"] < 1e-12
    assert r["state_err"] < 1e-12


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
@pytest.mark.parametrize("set_mesh", [False, True])
def test_explicit_data_parallel_matches_one_device(report, representation, set_mesh):
    """jax.make_mesh's default explicit axes with the batch split over "data" (this failed:
    a bare PartitionSpec outside jax.set_mesh, and a contraction over the sharded samples)."""
    r = report["explicit_data"][representation][str(set_mesh)]
    assert "Explicit" in r["axis_types"]
    assert r["err"] < 1e-12


def test_explicit_data_parallel_with_injected_hyperparameters(report):
    """inject_hyperparams's damping lives on the mesh after one step; it failed on step 2
    ("context mesh ... should match the aval mesh")."""
    assert report["explicit_data_inject"]["err"] < 1e-12


def test_pmap_with_axis_name_keeps_replicas_identical_and_equal_to_one_device(report):
    r = report["pmap"]["d"]
    assert r["replica_spread"] < 1e-12
    assert r["vs_one_device"] < 1e-12
    # Without axis_name each replica averages its own quarter of the batch: they drift.
    assert report["pmap"]["None"]["replica_spread"] > 1e-3


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_state_shardings_agrees_with_an_explicit_init(representation):
    """state_shardings (for jit's out_shardings) and init on explicit axes apply one rule, for
    every layer type: a stack's neuron axis is its second (not the layer axis), a norm's state
    follows its scale, and an embedding's has no kernel (these raised or differed)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    shapes = {
        "stk": {"kernel": (3, 8, 4)},  # bias-free stack, declared
        "stb": {"kernel": (3, 8, 4), "bias": (3, 4)},  # a stack by its bias
        "lin": {"kernel": (2, 8, 4)},  # linear stack: its one shared block is replicated
        "d": {"kernel": (8, 4), "bias": (4,)},
        "ln": {"scale": (8,), "bias": (8,)},
        "tok": {"embedding": (5, 8)},
    }
    params = jax.tree.map(lambda s: jax.numpy.ones(s), shapes, is_leaf=lambda s: isinstance(
        s, tuple))
    specs = {k: {n: P(*([None] * (len(s) - 1)), "model") for n, s in v.items()}
             for k, v in shapes.items()}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    layers = {"stk": "relu", "stb": "tanh", "lin": "linear", "d": "relu", "ln": "linear",
              "tok": "linear"}
    tx = rfim_jax.rngd(0.1, layers, stacked_layers=["stk", "lin"],
                       representation={"stk": representation, "d": representation})
    ruled = rfim_jax.state_shardings(jax.eval_shape(tx.init, params), shardings)

    def full(spec, ndim):
        return tuple(spec) + (None,) * (ndim - len(tuple(spec)))

    with jax.set_mesh(mesh):
        state = tx.init(jax.device_put(params, shardings))
    got = jax.tree.map(lambda a: full(a.sharding.spec, a.ndim), state)
    want = jax.tree.map(lambda s, a: full(s.spec, a.ndim), ruled, state)
    assert got == want
    inner = state[0]
    stk = inner.metrics["stk"] if representation == "exact" else inner.metrics["stk"]["S"]
    assert full(stk.sharding.spec, stk.ndim)[:2] == (None, "model")
