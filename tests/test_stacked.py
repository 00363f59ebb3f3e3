"""Stacked layers (SPEC §8): a leading layer axis is L independent layers, each with its own
metric; one RNGD step of every slice against the numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import ReferenceRNGD

import rfim_jax

L, D_IN, M, N = 3, 4, 5, 6


@pytest.mark.parametrize("kind, rep", [("relu", "exact"), ("linear", "exact"),
                                       ("tanh", "diagonal"), ("linear", "eigen")])
def test_stacked_dense_is_independent_layers(kind, rep):
    rng = np.random.default_rng(len(kind) + len(rep))
    params = {"scan": {"kernel": jnp.asarray(rng.normal(size=(L, D_IN, M))),
                       "bias": jnp.asarray(rng.normal(size=(L, M)))}}
    plan = rfim_jax.rngd_plan(params, {"scan": kind}, representation=rep)
    assert plan["scan"].shape == (D_IN + 1, M)
    assert plan["scan"].params_bytes == params["scan"]["kernel"].nbytes + params["scan"][
        "bias"].nbytes
    decay, eps0 = 0.7, 0.02
    tx = rfim_jax.scale_by_rngd({"scan": kind}, representation=rep, decay=decay,
                                damping=eps0, inverse_every=1)
    state = tx.init(params)
    refs = [ReferenceRNGD({"l": (kind, D_IN, M, True)}, decay, 1, eps0) for _ in range(L)]
    step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
    for _ in range(2):
        x = rng.normal(size=(L, N, D_IN))
        z = np.einsum("lnd,ldm->lnm", x, params["scan"]["kernel"]) + np.asarray(
            params["scan"]["bias"])[:, None]
        g = {"scan": {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params["scan"].items()}}
        updates, state = step(g, state, {"scan": {"inputs": jnp.asarray(x),
                                                  "preacts": jnp.asarray(z)}})
        if rep != "exact":
            continue  # the reference is SPEC §4's exact algorithm
        for k, ref in enumerate(refs):
            want_k, want_b = ref.update(
                {"l": {"kernel": np.asarray(g["scan"]["kernel"][k]),
                       "bias": np.asarray(g["scan"]["bias"][k])}},
                {"l": {"inputs": x[k], "preacts": z[k]}})["l"]
            np.testing.assert_allclose(updates["scan"]["kernel"][k], want_k, rtol=1e-9)
            np.testing.assert_allclose(updates["scan"]["bias"][k], want_b, rtol=1e-9)
    stats = jax.tree.leaves(state.metrics["scan"])
    assert all(a.shape[0] == L for a in stats)  # the state carries the layer axis


def test_stacked_layer_errors():
    params = {"scan": {"kernel": jnp.ones((L, D_IN, M)), "bias": jnp.zeros((L, M))}}
    tx = rfim_jax.scale_by_rngd({"scan": "relu"})
    state = tx.init(params)
    flat = {"scan": {"inputs": jnp.ones((N, D_IN)), "preacts": jnp.ones((N, M))}}
    with pytest.raises(ValueError, match=r"layer 'scan': inputs have shape \(6, 4\), but the "
                                         r"layer is a stack of 3.*leading layer axis"):
        tx.update(jax.tree.map(jnp.zeros_like, params), state, activations=flat)
