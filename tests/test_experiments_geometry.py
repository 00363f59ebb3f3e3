"""Tests of experiments/geometry.py: the spectrum summary and a tiny smoke run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import geometry
from rfim_jax._src import fisher


@pytest.mark.parametrize("dim,rank", [(6, 6), (9, 4), (12, 1)])
def test_spectrum_summary_matches_fisher_helpers_and_numpy(seed, dim, rank):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, rank)) * rng.uniform(0.1, 3.0, size=rank)
    mat = a @ a.T
    s = geometry.spectrum_summary(np.linalg.eigvalsh(mat))
    assert s["rank"] == rank == np.linalg.matrix_rank(mat, hermitian=True)
    assert s["rank"] == int(fisher.fim_rank(jnp.asarray(mat)))
    assert s["nullity"] == dim - rank
    np.testing.assert_allclose(s["cond_range"], float(fisher.condition_number(jnp.asarray(mat))),
                               rtol=1e-6)
    eig = np.linalg.eigvalsh(mat)
    np.testing.assert_allclose(s["lambda_max"], eig[-1], rtol=1e-12)
    if rank == dim:
        np.testing.assert_allclose(s["cond"], eig[-1] / eig[0], rtol=1e-12)
    else:
        assert s["cond"] == float("inf")


def test_geometry_smoke_run_and_sec4_bounds(tmp_path):
    sizes = (64, 3, 10)
    cfg = geometry.quick_config(sizes=sizes, sample_sizes=(4,), snapshots=(0, 5), seeds=(0,),
                                out=str(tmp_path), progress=False)
    res = geometry.run(cfg)
    assert (tmp_path / "geometry.png").stat().st_size > 10_000
    payload = json.loads((tmp_path / "geometry.json").read_text())
    assert payload["config"]["sample_sizes"] == [4] and payload["seeds"] == [0]
    n, k = 4, sizes[-1]
    snaps = payload["per_seed"]["0"]["snapshots"]
    assert [s["iteration"] for s in snaps] == [0, 5]
    for snap in snaps:
        met = snap["metrics"]["4"]
        assert met["fim_whole"]["rank"] <= n * (k - 1)
        hidden, out = met["layers"]["Dense_0"], met["layers"]["Dense_1"]
        # Sec. 4: rank(FIM block) <= n (k - 1) while the relu RFIM (omega = 1, nu > 0 for
        # every sample) has rank m * rank([h, 1]) exactly, here the bound n D_h.
        assert hidden["fim_block"]["rank"] <= n * (k - 1)
        assert hidden["rfim"]["rank"] == hidden["m"] * hidden["input_rank"] == n * sizes[1]
        assert hidden["rfim_linear"]["rank"] == hidden["rfim"]["rank"]
        assert hidden["rfim_hard_relu"]["rank"] <= hidden["rfim"]["rank"]
        # The softmax RFIM is exactly the FIM's last diagonal block.
        assert out["rfim_minus_fim_block_max_abs"] < 1e-10
        assert out["rfim"]["rank"] == out["fim_block"]["rank"]
    verdict = res["summary"]["verdict"]["n=4 Dense_0"]
    assert verdict["rfim_rank_higher_at_all_snapshots"] == bool(
        np.all(np.asarray(verdict["rfim_rank"]) > np.asarray(verdict["fim_block_rank"])))


def test_geometry_rejects_unknown_optimizer(tmp_path):
    cfg = geometry.quick_config(sizes=(64, 2, 10), sample_sizes=(2,), snapshots=(0,),
                                optimizer="lbfgs", out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        with jax.enable_x64(True):
            geometry.run_seed(cfg, 0)
