"""Smoke test of ``python -m experiments.cnn`` and ``benchmarks.conv_memory`` at tiny size."""

import json

import numpy as np

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
            assert method == "kfac" and r["reason"]  # unavailable is said, with the reason
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


def test_conv_memory_benchmark_quick(tmp_path):
    results = conv_memory.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "conv_memory.json").read_text())
    assert set(saved["variants"]) == {"patches", "naive_exact", "exact", "eigen", "diagonal"}
    assert results["case"]["d"] == 3 * 3 * 4 + 1
