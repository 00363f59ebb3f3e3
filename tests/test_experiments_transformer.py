"""``python -m experiments.transformer`` at tiny size, and full RNGD against AdamW on real text.

Needs Debian's ``fortunes`` (``apt-get install fortunes``); without it these tests are skipped
with that reason (nothing is downloaded).
"""

from pathlib import Path

import numpy as np
import pytest

from experiments import data, transformer

pytestmark = pytest.mark.skipif(
    not Path(data.DEFAULT_FORTUNES_DIR).exists(),
    reason="Debian's fortunes corpus is not installed (apt-get install fortunes)",
)

TINY = dict(d_model=32, num_layers=1, num_heads=2, seq_len=16, batch_size=8, warmup=5,
            timing_rounds=1, timing_steps=1, progress=False)


def test_transformer_experiment_smoke(tmp_path):
    cfg = transformer.TransformerConfig(steps=4, eval_every=2, eval_batches=1,
                                        out=str(tmp_path), **TINY)
    results = transformer.run(cfg)
    assert set(results["methods"]) == set(transformer.METHODS)
    plan = results["plan"]
    # Every parameter of the transformer has its RFIM: embeddings (diagonal), LayerNorms,
    # attention projections (DenseGeneral), the GELU MLP and the head.
    assert plan["tok"]["representation"] == plan["pos"]["representation"] == "diagonal"
    assert plan["block_0/MultiHeadDotProductAttention_0/query"]["shape"][1] == 32
    assert plan["block_0/mlp_in"]["kind"] == "gelu"
    assert plan["block_0/LayerNorm_0"]["representation"] == "exact"
    ran = {}
    for method, r in results["methods"].items():
        if not r["available"]:
            assert method in transformer.PEER_METHODS and r["reason"]  # said, with the reason
            continue
        assert r["step"] == [0, 2, 4] and np.all(np.isfinite(r["train_bits"]))
        ran[method] = r
    assert set(transformer.METHODS) - set(transformer.PEER_METHODS) <= set(ran)
    first = {r["train_bits"][0] for r in ran.values()}
    assert len(first) == 1  # same initial params, same batches
    transformer.plot(results, cfg, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_full_rngd_reaches_lower_training_loss_than_adamw_at_tiny_size(tmp_path):
    """Issue 11: at tiny size, RNGD on every parameter against AdamW, same batches and steps.

    Measured with this configuration (600 steps, the experiment's RNGD defaults: peak lr 0.3,
    decay 0.95, damping 0.03; AdamW at the better of 1e-2 and 2e-2 per seed), training bits per
    character on the fixed training batches: seeds 0-3 gave RNGD 3.334 / 3.358 / 3.292 / 3.477
    against AdamW's best 3.400 / 3.453 / 3.401 / 3.521, margins 0.066 / 0.095 / 0.109 / 0.044.
    The assertion asks for half of the smallest margin.  With the earlier defaults (decay 0.99,
    damping 0.1, lr 0.5) RNGD lost at this size (0.05-0.10 bits behind at 400 steps).
    """
    tiny = dict(TINY, seq_len=32, batch_size=16, warmup=60, eval_batches=16)
    final = {}
    for lr, methods in ((1e-2, ("rngd", "adamw")), (2e-2, ("adamw",))):
        cfg = transformer.TransformerConfig(
            steps=600, eval_every=600, out=str(tmp_path), methods=methods,
            learning_rates={**transformer.TransformerConfig().learning_rates, "adamw": lr},
            **tiny)
        for name, r in transformer.run(cfg)["methods"].items():
            final[name if name == "rngd" else f"adamw_{lr:g}"] = r["train_bits"][-1]
    best_adamw = min(v for k, v in final.items() if k.startswith("adamw"))
    assert final["rngd"] < best_adamw - 0.02, final


def test_summary_without_adamw_among_the_methods():
    """--methods without adamw trained, then crashed formatting a None ratio and wrote
    nothing."""
    from experiments import transformer

    cfg = transformer.TransformerConfig()
    row = {"available": True, "ms_per_step": 3.0, "ratio_to_adamw": None,
           "train_bits": [2.0, 1.5], "val_bits": [2.1, 1.7],
           "time_to_target": {str(t): None for t in cfg.target_bits}}
    text = transformer.summary({"methods": {"rngd": row}}, cfg)
    assert "rngd" in text and "3.0" in text
