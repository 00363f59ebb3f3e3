"""rngd_plan, the "auto" representation, the state-byte budget and abstract initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfim_jax


def _mlp_shapes(widths, dtype=jnp.float32):
    params = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        params[f"Dense_{i}"] = {"kernel": jax.ShapeDtypeStruct((a, b), dtype),
                                "bias": jax.ShapeDtypeStruct((b,), dtype)}
    return params


PAPER = {"Dense_0": "linear", "Dense_1": "relu", "Dense_2": "relu", "Dense_3": "softmax"}


def test_plan_of_the_paper_mlp_is_exact_with_the_byte_counts():
    params = _mlp_shapes([784, 64, 64, 64, 10])
    plan = rfim_jax.rngd_plan(params, PAPER)
    assert [p.representation for p in plan.values()] == ["exact"] * 4
    # Exact bytes (float32, stats + inverses): linear 2 d^2, per neuron 2 m d^2, softmax
    # 2 (m d)^2.
    assert plan["Dense_0"].state_bytes == 2 * 785**2 * 4
    assert plan["Dense_1"].state_bytes == 2 * 64 * 65**2 * 4
    assert plan["Dense_3"].state_bytes == 2 * (10 * 65) ** 2 * 4
    assert plan["Dense_1"].params_bytes == 65 * 64 * 4
    assert plan["Dense_1"].shape == (65, 64) and plan["Dense_1"].kind == "relu"
    # Eigen: A and U (d^2 each) and S (m d; one row for linear).  Diagonal: S alone.
    by_rep = plan["Dense_1"].bytes_by_representation
    assert by_rep["eigen"] == (2 * 65**2 + 64 * 65) * 4
    assert by_rep["diagonal"] == 64 * 65 * 4
    assert plan["Dense_0"].bytes_by_representation["eigen"] == (2 * 785**2 + 785) * 4


def test_auto_switches_to_eigen_over_the_budget():
    params = _mlp_shapes([784, 1024, 1024, 10])
    layers = {"Dense_0": "relu", "Dense_1": "relu", "Dense_2": "softmax"}
    plan = rfim_jax.rngd_plan(params, layers)
    # 1024 * 785^2 * 8 B = 4.7 GiB > 256 MiB; softmax (10 * 1025)^2 * 8 B = 840 MB.
    assert [p.representation for p in plan.values()] == ["eigen", "eigen", "eigen"]
    small = rfim_jax.rngd_plan(params, layers, exact_budget_bytes=2**40)
    assert [p.representation for p in small.values()] == ["exact"] * 3
    mixed = rfim_jax.rngd_plan(params, layers, representation={"Dense_2": "diagonal"})
    assert mixed["Dense_2"].representation == "diagonal"
    assert mixed["Dense_0"].representation == "eigen"
    bf16 = rfim_jax.rngd_plan(params, layers, state_dtype=jnp.bfloat16)
    assert bf16["Dense_0"].state_bytes * 2 == plan["Dense_0"].state_bytes


def test_init_refuses_a_state_over_the_budget_with_a_useful_error():
    # The 512 -> 1000 softmax head of the issue: 2 (1000 * 513)^2 * 4 B = 1.9 TiB exact.
    params = _mlp_shapes([512, 1000])
    tx = rfim_jax.scale_by_rngd({"Dense_0": "softmax"}, representation="exact",
                                max_state_bytes=2**30)
    with pytest.raises(ValueError) as err:
        jax.eval_shape(tx.init, params)
    msg = str(err.value)
    assert "layer 'Dense_0'" in msg and "kind 'softmax'" in msg
    assert "representation 'exact'" in msg and "1.91 TiB" in msg
    assert "'eigen'" in msg and "'diagonal'" in msg and "max_state_bytes=1 GiB" in msg
    # It advises a representation that fits, the largest such one (eigen here, 4 MB).
    assert "Use representation={'Dense_0': 'eigen'}, which fits" in msg


def test_the_budget_error_advises_only_a_representation_that_fits():
    """A 64 -> 64 relu layer: exact 1.1 MB, eigen 33 KB, diagonal 17 KB; at 20 KB only the
    diagonal one fits, and at 1 KB none does."""
    params = _mlp_shapes([64, 64])
    plan = rfim_jax.rngd_plan(params, {"Dense_0": "relu"})["Dense_0"].bytes_by_representation
    between = (plan["diagonal"] + plan["eigen"]) // 2
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, max_state_bytes=between)
    with pytest.raises(ValueError, match=r"Use representation=\{'Dense_0': 'diagonal'\}, which "
                                         r"fits; the cheaper representations need 'eigen'"):
        jax.eval_shape(tx.init, params)
    tx = rfim_jax.scale_by_rngd({"Dense_0": "relu"}, max_state_bytes=plan["diagonal"] // 2)
    with pytest.raises(ValueError, match=r"No representation fits.*shard the layer"):
        jax.eval_shape(tx.init, params)


def test_abstract_init_matches_concrete_init():
    params = _mlp_shapes([6, 5, 3])
    layers = {"Dense_0": "tanh", "Dense_1": "softmax"}
    for rep in ("exact", "eigen", "diagonal"):
        tx = rfim_jax.scale_by_rngd(layers, representation=rep)
        abstract = jax.eval_shape(tx.init, params)
        concrete = tx.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params))
        assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
        for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
            assert a.shape == c.shape and a.dtype == c.dtype


def test_plan_errors():
    params = _mlp_shapes([4, 3])
    with pytest.raises(ValueError, match=r"layer 'Dense_0': unknown representation 'kfac'"):
        rfim_jax.rngd_plan(params, {"Dense_0": "relu"}, representation="kfac")
    with pytest.raises(ValueError, match=r"names layers that are not preconditioned: \['Nope'\]"):
        rfim_jax.rngd_plan(params, {"Dense_0": "relu"}, representation={"Nope": "eigen"})


@pytest.mark.parametrize("representation", ["exact", "eigen", "diagonal"])
def test_state_dtype_stores_bfloat16_and_accumulates_in_float32(representation):
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                          "bias": jnp.zeros(3, jnp.float32)}}
    acts = {"Dense_0": {"inputs": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
                        "preacts": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}}
    grads = jax.tree.map(jnp.ones_like, params)
    outs = {}
    for dtype in (None, jnp.bfloat16):
        tx = rfim_jax.scale_by_rngd({"Dense_0": "tanh"}, representation=representation,
                                    state_dtype=dtype, decay=0.9, inverse_every=1)
        state = tx.init(params)
        for _ in range(3):
            out, state = jax.jit(tx.update)(grads, state, params, activations=acts)
        stored = jax.tree.leaves((state.metrics, state.inverses))
        assert all(a.dtype == (dtype or jnp.float32) for a in stored)
        assert out["Dense_0"]["kernel"].dtype == jnp.float32
        outs[dtype] = out
    # bfloat16 storage: the step agrees to bfloat16's precision.
    np.testing.assert_allclose(outs[jnp.bfloat16]["Dense_0"]["kernel"],
                               outs[None]["Dense_0"]["kernel"], rtol=5e-2, atol=5e-2)
