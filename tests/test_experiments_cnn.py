"""Smoke test of ``python -m experiments.cnn`` and ``benchmarks.conv_memory`` at tiny size."""

import json
import sys

import jax
import numpy as np
import pytest

from benchmarks import conv_memory
from experiments import cnn


def test_cnn_experiment_smoke(tmp_path):
    cfg = cnn.CNNConfig(steps=6, eval_every=3, batch_size=16, timing_rounds=2,
                        timing_steps=2, channels=(4, 4), progress=False, out=str(tmp_path))
    results = cnn.run(cfg)
    assert set(results["methods"]) == set(cnn.METHODS)
    assert tuple(results["plan"]["Conv_1"]["shape"]) == (3 * 3 * 4 + 1, 4)
    for method, r in results["methods"].items():
        if not r["available"]:
            assert method in cnn.PEER_METHODS and r["reason"]  # said, with the reason
            continue
        assert r["iteration"] == [0, 3, 6]
        assert np.all(np.isfinite(r["train_loss"])) and r["ms_per_step"] > 0
        assert set(r["time_to_target"]) == {str(t) for t in cfg.target_losses}
    # Every method starts from the same params on the same data.
    first = {r["train_loss"][0] for r in results["methods"].values() if r["available"]}
    assert len(first) == 1
    assert results["methods"]["adam"]["ratio_to_adam"] == 1.0
    cnn.plot(results, cfg, tmp_path / "cnn.png")
    assert (tmp_path / "cnn.png").stat().st_size > 0


def test_cnn_reports_a_missing_peer_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psgd_jax", None)  # as if psgd-jax were not installed
    monkeypatch.setitem(sys.modules, "psgd_jax.kron", None)
    cfg = cnn.CNNConfig(steps=2, eval_every=2, batch_size=8, timing_rounds=1, timing_steps=1,
                        channels=(2, 2), progress=False, out=str(tmp_path),
                        methods=("adam", "psgd"))
    results = cnn.run(cfg)["methods"]
    assert results["psgd"]["available"] is False and "psgd_jax" in results["psgd"]["reason"]
    assert results["adam"]["available"] and results["adam"]["iteration"] == [0, 2]
    line = cnn.summary({"methods": results}, cfg).splitlines()[-1]
    assert line.split()[:3] == ["psgd", "unavailable:", "psgd:"], line


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax's own jax.core use
def test_cnn_runs_kfac_jax_when_it_is_installed(tmp_path, kfac_jax_runs):
    # An installed peer that runs must be run: a fault on our side once turned every
    # kfac-jax run into "unavailable" (its step count became an array, see
    # tests/test_experiments_common.py).
    cfg = cnn.CNNConfig(steps=2, eval_every=2, batch_size=8, timing_rounds=1, timing_steps=1,
                        channels=(2, 2), progress=False, out=str(tmp_path),
                        methods=("adam", "kfac"))
    with jax.enable_x64(False):  # kfac-jax 0.0.8 mixes float64 factors in under x64
        results = cnn.run(cfg)["methods"]
    assert results["kfac"]["available"], results["kfac"].get("reason")
    assert np.all(np.isfinite(results["kfac"]["train_loss"]))


def test_cnn_own_methods_are_never_reported_unavailable(monkeypatch, tmp_path):
    # A failure in this library's own optimiser must raise, not turn into "unavailable".
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in rngd")

    monkeypatch.setattr(cnn.rfim_jax, "rngd", broken)
    cfg = cnn.CNNConfig(steps=2, eval_every=2, batch_size=8, timing_rounds=1, timing_steps=1,
                        channels=(2, 2), progress=False, out=str(tmp_path), methods=("rngd",))
    with pytest.raises(RuntimeError, match="a bug in rngd"):
        cnn.run(cfg)


def test_conv_memory_benchmark_quick(tmp_path):
    results = conv_memory.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "conv_memory.json").read_text())
    assert set(saved["variants"]) == {"patches", "naive_exact", "exact", "eigen", "diagonal"}
    assert results["case"]["d"] == 3 * 3 * 4 + 1
