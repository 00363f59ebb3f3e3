"""The speed benchmark's peers (benchmarks/peers/) and its streaming output, at toy size.

Each peer takes 3 steps on a tiny MLP through the harness and must leave a finite loss that
went down, or at least changed the params.  A peer package that is not installed skips its
test with the reason.  No timing is asserted.
"""

import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness, peers, report, speed
from benchmarks.peers import kfac_jax as kfac_jax_peer
from benchmarks.peers import psgd as psgd_peer
from experiments import models as mlp

SIZES = (12, 6, 5, 3)
BATCH = 10


def _toy_arrays(seed=0, n_train=200, n_test=50, d=SIZES[0], classes=SIZES[-1]):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y_tr = rng.integers(0, classes, n_train)
    y_te = rng.integers(0, classes, n_test)
    x_tr = np.clip(centres[y_tr] + 0.5 * rng.normal(size=(n_train, d)), 0, None)
    x_te = np.clip(centres[y_te] + 0.5 * rng.normal(size=(n_test, d)), 0, None)
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="module")
def toy_data():
    return harness.load_data(arrays=_toy_arrays(), whiten=True)


def _three_steps(method, data):
    """3 steps of ``method`` on the same minibatches through the harness; returns the losses
    of the three minibatches before and after, and whether the params changed."""
    params0 = mlp.init_mlp(jax.random.PRNGKey(0), SIZES)
    trainer = harness.make_trainer(method, SIZES, params0, data.x_train, data.y_train,
                                   chunk=3, batch=BATCH)
    idx = jnp.asarray(harness.epoch_indices(np.random.default_rng(0), data.num_train,
                                            BATCH)[:3])
    x, y = data.x_train[idx.reshape(-1)], data.y_train[idx.reshape(-1)]
    before = harness.evaluate(params0, x, y)[0]
    losses = np.asarray(trainer.run_chunk(idx, jax.random.PRNGKey(1)))
    after = harness.evaluate(trainer.params, x, y)[0]
    changed = any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(params0), jax.tree.leaves(trainer.params), strict=True))
    return losses, before, after, changed


def _check_trains(method, data):
    losses, before, after, changed = _three_steps(method, data)
    assert losses.shape == (3,) and np.all(np.isfinite(losses))
    assert np.isfinite(after)
    assert after < before or changed, (before, after)


def test_kfac_ref_trains(toy_data):
    _check_trains(speed.Method("kfac_ref", "kfac_ref", 0.05, decay=0.95, damping=0.1,
                               inverse_every=2), toy_data)


def test_muon_trains(toy_data):
    pytest.importorskip("optax.contrib", reason="optax without optax.contrib")
    if not peers.availability("muon").available:
        pytest.skip(f"optax.contrib.muon unavailable: {peers.availability('muon').reason}")
    _check_trains(speed.Method("muon", "muon", 0.02, momentum=0.95), toy_data)


def test_psgd_kron_trains(toy_data):
    psgd_peer._register_clipping_alias()  # the shim, before psgd-jax's own import
    pytest.importorskip("psgd_jax", reason="psgd-jax is not installed (pip install psgd-jax)")
    avail = peers.availability("psgd_kron")
    assert avail.available, avail.reason
    _check_trains(speed.Method("psgd_kron", "psgd_kron", 3e-3), toy_data)


def test_psgd_kron_update_takes_the_extra_args_of_a_training_step():
    # psgd-jax's chain forwarded activations= to a stage that refused it (a TypeError in the
    # CNN experiment's first step); the peer must drop what a shared step passes to everyone.
    psgd_peer._register_clipping_alias()
    pytest.importorskip("psgd_jax", reason="psgd-jax is not installed (pip install psgd-jax)")
    tx = psgd_peer.make_optimizer(speed.Method("psgd_kron", "psgd_kron", 1e-3), ())
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = jax.tree.map(lambda a: jnp.full_like(a, 0.5), params)
    plain, _ = tx.update(grads, tx.init(params), params)
    extra, _ = tx.update(grads, tx.init(params), params,
                         activations={"Dense_0": {"inputs": jnp.ones((2, 4))}})
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extra), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a)) and np.any(a != 0)


def test_muon_kernel_dimension_numbers_orthogonalise_a_conv_kernel_as_a_matrix():
    from benchmarks.peers import muon as muon_peer

    # A gradient whose (3 * 3 * 2, 4) matrix has singular values spread over 100x.
    q1, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(18, 4)))
    q2, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    matrix = (q1 * np.array([10.0, 3.0, 1.0, 0.1])) @ q2.T
    kernel = jnp.asarray(matrix.reshape(3, 3, 2, 4), jnp.float32)
    method = speed.Method("muon", "muon", 0.01, momentum=0.95)

    def first_update(params, **kw):
        tx = muon_peer.make_optimizer(method, (), **kw)
        return tx.update(params, tx.init(params), params)[0]

    conv = {"kernel": kernel, "bias": jnp.ones(4)}
    # optax's default: a 4-D kernel is not a matrix, so it takes the (Nesterov) AdamW
    # fallback, whose first step is sign(g) times one common magnitude (up to eps).
    default = np.abs(np.asarray(first_update(conv)["kernel"]))
    np.testing.assert_allclose(default, default.mean(), rtol=1e-4)
    # With the matrix view, the kernel's update is optax's own 2-D Muon update of the
    # (18, 4) matrix, reshaped; the bias keeps the AdamW fallback.
    update = first_update(conv, dimension_numbers=muon_peer.kernel_dimension_numbers(conv))
    as_matrix = first_update({"kernel": kernel.reshape(18, 4), "bias": jnp.ones(4)})
    np.testing.assert_allclose(np.asarray(update["kernel"]).reshape(18, 4),
                               np.asarray(as_matrix["kernel"]), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.abs(update["bias"]), default.mean(), rtol=1e-4)
    # And it is orthogonalised: Newton-Schulz pulls the 100x spread together.
    sv = np.linalg.svd(np.asarray(update["kernel"]).reshape(18, 4), compute_uv=False)
    assert sv.max() / sv.min() < 3.0, sv


def test_muon_kernel_dimension_numbers_view_attention_projections_as_matrices():
    # Flax's attention: query/key/value kernels (d, heads, head_dim) with (heads, head_dim)
    # biases, the output projection (heads, head_dim, d) with a (d,) bias.  optax's default
    # sent the 3-D kernels to AdamW and gave Muon the 2-D biases and embedding tables.
    from benchmarks.peers import muon as muon_peer

    rng = np.random.default_rng(2)

    def spread(rows, cols, seed):
        q1, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
        return (q1 * np.geomspace(10.0, 0.1, cols)) @ np.linalg.qr(rng.normal(size=(cols, cols)))[0]

    q = spread(8, 6, 3).reshape(8, 2, 3)  # (d, heads, head_dim)
    o = spread(8, 6, 5).T.reshape(2, 3, 8)  # (heads, head_dim, d)
    params = {
        "attn": {"query": {"kernel": jnp.asarray(q, jnp.float32), "bias": jnp.ones((2, 3))},
                 "out": {"kernel": jnp.asarray(o, jnp.float32), "bias": jnp.ones(8)}},
        "tok": {"embedding": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
                 "bias": jnp.ones(5)},
    }
    method = speed.Method("muon", "muon", 0.01, momentum=0.95)

    def first_update(p, dims):
        tx = muon_peer.make_optimizer(method, (), dimension_numbers=dims)
        return tx.update(p, tx.init(p), p)[0]

    dims = muon_peer.kernel_dimension_numbers(params, adamw=("head",))
    update = first_update(params, dims)
    # Each projection's update is optax's own 2-D Muon update of its matrix view.
    as_matrices = first_update(
        {"q": params["attn"]["query"]["kernel"].reshape(8, 6),
         "o": params["attn"]["out"]["kernel"].reshape(6, 8)}, None)
    np.testing.assert_allclose(np.asarray(update["attn"]["query"]["kernel"]).reshape(8, 6),
                               as_matrices["q"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(update["attn"]["out"]["kernel"]).reshape(6, 8),
                               as_matrices["o"], rtol=1e-4, atol=1e-7)
    # The biases, the embedding table and the head (named in adamw=) take the AdamW
    # fallback, whose first step is sign(g) times one common magnitude.
    fallback = [update["attn"]["query"]["bias"], update["attn"]["out"]["bias"],
                update["tok"]["embedding"], update["head"]["kernel"], update["head"]["bias"]]
    magnitude = float(np.abs(np.asarray(fallback[0])).mean())
    for leaf in fallback:
        np.testing.assert_allclose(np.abs(np.asarray(leaf)), magnitude, rtol=1e-4)
    # Muon's update differs from that: it is orthogonalised.
    sv = np.linalg.svd(np.asarray(update["attn"]["query"]["kernel"]).reshape(8, 6),
                       compute_uv=False)
    assert sv.max() / sv.min() < 3.0, sv


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax's own jax.core use
def test_kfac_jax_trains(toy_data, kfac_jax_runs):
    avail = peers.availability("kfac_jax")
    assert avail.available, avail.reason
    # kfac-jax 0.0.8 builds float64 factors under jax_enable_x64 (which the suite turns on)
    # next to float32 ones, and its lax.cond rejects the mix; the benchmark runs in float32.
    with jax.enable_x64(False):
        _check_trains(speed.Method("kfac_jax", "kfac_jax", 0.05, damping=0.1,
                                   inverse_every=2), toy_data)


def test_kfac_jax_shim_accepts_both_bind_param_forms(kfac_jax_runs):
    kfac_jax_peer.load()
    from kfac_jax._src import tag_graph_matcher as tgm

    assert getattr(tgm.eval_jaxpr_eqn, kfac_jax_peer._SHIM_FLAG)
    eqn = jax.make_jaxpr(lambda x: jnp.sin(x) * 2.0)(1.0).jaxpr.eqns[0]
    x = jnp.float32(0.3)
    assert tgm.eval_jaxpr_eqn(eqn, [x])[0] == pytest.approx(np.sin(0.3))

    class OldForm:  # jax < 0.9.2: get_bind_params returns (subfuns, params)
        name = eqn.primitive.name

        def get_bind_params(self, params):
            new = eqn.primitive.get_bind_params(params)
            return ([], new) if not isinstance(new, tuple) else new

        def bind(self, *args, **params):
            return eqn.primitive.bind(*args, **params)

    old = types.SimpleNamespace(primitive=OldForm(), params=eqn.params,
                                source_info=eqn.source_info)
    assert tgm.eval_jaxpr_eqn(old, [x])[0] == pytest.approx(np.sin(0.3))
    # applying it twice keeps one wrapper
    kfac_jax_peer.load()
    assert not getattr(tgm.eval_jaxpr_eqn.__wrapped__, kfac_jax_peer._SHIM_FLAG, False)


def test_missing_peer_is_reported_with_reason(monkeypatch, toy_data):
    monkeypatch.setitem(sys.modules, "kfac_jax", None)
    # the import's own error, whatever jax is installed (on jax >= 0.11 the known
    # incompatibility would be reported first: test_benchmarks tests that)
    monkeypatch.setattr(kfac_jax_peer, "incompatibility", lambda: None)
    avail = peers.availability("kfac_jax")
    assert not avail.available and "kfac_jax" in avail.reason
    methods = [speed.Method("adam", "adam", 1e-2, momentum=0.0),
               speed.Method("kfac_jax", "kfac_jax", 0.01, damping=0.1)]
    runs = harness.train_interleaved(methods, toy_data, sizes=SIZES, epochs=1, batch=BATCH,
                                     chunk=BATCH, progress=False)
    assert set(runs) == {"adam", "kfac_jax"}
    assert "kfac_jax" in runs["kfac_jax"]["unavailable"]
    summary = harness.summarise_runs(runs, BATCH, toy_data.num_train // BATCH)
    assert summary["kfac_jax"]["available"] is False
    assert summary["kfac_jax"]["reason"] == runs["kfac_jax"]["unavailable"]
    assert summary["adam"]["available"] and summary["adam"]["median_ms_per_step"] > 0
    row = report.table_row("kfac_jax", summary["kfac_jax"], harness.TARGETS)
    assert row.split()[1] == "unavailable:"
    table = report.markdown_table(summary, harness.TARGETS)
    assert "| kfac_jax | unavailable: " in table


def test_versions_name_every_peer_distribution():
    v = harness.versions()
    for dist in peers.DISTRIBUTIONS:
        assert dist in v
        if importlib.util.find_spec(dist.replace("-", "_")) is None:
            assert v[dist] == "not installed"
    assert v["rfim_jax"]


class _Snapshots(harness.Recorder):
    """A Recorder that keeps a copy of the file after every write."""

    def write(self, complete=False):
        path = super().write(complete)
        self.snapshots = [*getattr(self, "snapshots", []), json.loads(path.read_text())]
        return path


def test_workload_streams_partial_json(tmp_path, toy_data, capsys):
    w = speed.Workload("toy", SIZES, epochs=1.0, quick_epochs=1.0, batch=BATCH, chunk=BATCH)
    methods = [speed.Method("adam", "adam", 1e-2, momentum=0.0),
               speed.Method("rngd_white_k3", "rngd", 0.05, inverse_every=5, whiten=True,
                            update_every=3)]
    rec = _Snapshots(tmp_path / "speed.json", {"toy": True}, stream=sys.stdout)
    speed.run_workload(w, methods, toy_data, epochs=1.0, seed=0, quick=True, progress=False,
                       rec=rec)
    rounds = toy_data.num_train // BATCH // BATCH  # one epoch of chunks of BATCH steps
    assert rounds == 2
    partial = [s for s in rec.snapshots if not s["complete"]]
    # a file after the first round already holds one chunk of every method
    first = next(s for s in partial if "workloads" in s and "curves" in s["workloads"]["toy"])
    for name in ("adam", "rngd_white_k3"):
        assert first["workloads"]["toy"]["curves"][name]["steps"] == [0, BATCH]
        assert first["workloads"]["toy"]["methods"][name]["median_ms_per_step"] > 0
    assert first["config"] == {"toy": True} and first["environment"]["backend"]
    rec.finish()
    final = json.loads((tmp_path / "speed.json").read_text())
    assert final["complete"] is True
    assert final["workloads"]["toy"]["curves"]["adam"]["steps"] == [0, BATCH, 2 * BATCH]
    assert not (tmp_path / "speed.json.partial").exists()
    out = capsys.readouterr().out
    assert "[toy 1/2] subset loss:" in out and "[toy 2/2] subset loss:" in out
    assert "rngd_white_k3" in out.splitlines()[-1]  # the table rows come last
