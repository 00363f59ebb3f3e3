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
    for r in results["methods"].values():
        assert r["step"] == [0, 2, 4] and np.all(np.isfinite(r["train_bits"]))
    first = {r["train_bits"][0] for r in results["methods"].values()}
    assert len(first) == 1  # same initial params, same batches
    transformer.plot(results, cfg, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
