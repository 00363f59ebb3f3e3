"""A transformer block end to end (SPEC §8): every parameter captured and preconditioned.

linen and nnx blocks with multi-axis attention projections (DenseGeneral / LinearGeneral), a
GELU MLP, LayerNorms, an embedding and a head.  The captured pre-activations are checked
against Flax's own intermediates, and one RNGD update of every layer against a numpy
reference of SPEC §4/§8 (tests/_reference.py: loops over samples and neurons) computed from
the recorded rows.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import ReferenceRNGD
from flax import nnx

import rfim_jax
from rfim_jax._src import paths

V, D, T, B, HEADS = 11, 8, 5, 3, 2


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="tok")(ids)
        h = nn.LayerNorm(name="ln1")(x)
        mask = nn.make_causal_mask(ids)
        x = x + nn.MultiHeadDotProductAttention(HEADS, name="attn")(h, mask=mask)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(D, name="mlp_out")(nn.gelu(nn.Dense(2 * D, name="mlp_in")(h),
                                                    approximate=False))
        return nn.Dense(V, name="head")(x)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(V, D, rngs=rngs)
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp_in = nnx.Linear(D, 2 * D, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * D, D, rngs=rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids)
        x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(ids))
        h = self.ln2(x)
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(h), approximate=False))
        return self.head(x)


def _kinds(params, attn):
    layers = {"tok": "linear", "ln1": "linear", "ln2": "linear", "mlp_in": "gelu",
              "mlp_out": "linear", "head": "linear"}
    for proj in params[attn]:
        layers[f"{attn}/{proj}"] = "linear"
    return layers


def _np_reference_update(kind, node, grad, entry, decay, eps0):
    """One SPEC §4 step from the identity (inverse_every=1) for any of the block's layers."""
    if "embedding" in node:
        ids = np.asarray(entry["inputs"]).reshape(-1)
        freq = np.bincount(ids, minlength=V) / ids.size
        s = decay + (1 - decay) * (freq + eps0 * freq)
        return {"embedding": np.asarray(grad["embedding"]) / s[:, None]}
    if "scale" in node:
        u = np.asarray(entry["inputs"]).reshape(-1, D)
        out = {"scale": np.zeros(D), "bias": np.zeros(D)}
        for j in range(D):
            ref = ReferenceRNGD({"f": ("linear", 1, 1, True)}, decay, 1, eps0)
            k, b = ref.update({"f": {"kernel": np.asarray(grad["scale"])[j:j + 1, None],
                                     "bias": np.asarray(grad["bias"])[j:j + 1]}},
                              {"f": {"inputs": u[:, j:j + 1], "preacts": u[:, j:j + 1]}})["f"]
            out["scale"][j], out["bias"][j] = k[0, 0], b[0]
        return out
    kernel, bias = np.asarray(node["kernel"]), np.asarray(node["bias"])
    m = bias.size
    d_in = kernel.size // m
    x = np.asarray(entry["inputs"]).reshape(-1, d_in)
    z = np.asarray(entry["preacts"]).reshape(-1, m)
    ref = ReferenceRNGD({"l": (kind, d_in, m, True)}, decay, 1, eps0)
    k, b = ref.update({"l": {"kernel": np.asarray(grad["kernel"]).reshape(d_in, m),
                             "bias": np.asarray(grad["bias"]).reshape(m)}},
                      {"l": {"inputs": x, "preacts": z}})["l"]
    return {"kernel": k.reshape(kernel.shape), "bias": b.reshape(bias.shape)}


def _check_update(params, grads, acts, layers, updates, decay, eps0, tol=1e-7):
    for path, kind in layers.items():
        node = paths.get_by_path(params, path)
        want = _np_reference_update(kind, node, paths.get_by_path(grads, path),
                                    paths.get_by_path(acts, path), decay, eps0)
        got = paths.get_by_path(updates, path)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=tol, atol=tol * 1e-2,
                                       err_msg=f"{path}/{name}")


@pytest.fixture
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, V, size=(B, T)))


def test_linen_block_every_layer(ids):
    model = LinenBlock()
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    (out, inter), acts = rfim_jax.capture_linen(
        model, {"params": params}, ids, capture_intermediates=True, mutable=["intermediates"])
    inter = inter["intermediates"]
    # The recorded pre-activations are the modules' own outputs, flattened per SPEC §8.
    for path in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp_in", "head", "ln1"):
        own = paths.get_by_path(inter, path)["__call__"][0]
        got = paths.get_by_path(acts, path)["preacts"]
        np.testing.assert_allclose(got, np.reshape(own, got.shape), rtol=1e-12, atol=1e-12)
    assert acts["attn"]["query"]["preacts"].shape == (B, T, D)  # (heads, head_dim) flattened
    assert acts["attn"]["out"]["inputs"].shape == (B, T, D)     # (heads, head_dim) contracted
    layers = _kinds(params, "attn")
    assert set(layers) == set(rfim_jax.activation_paths(acts)) - {"attn"}
    decay, eps0 = 0.5, 0.05
    tx = rfim_jax.scale_by_rngd(layers, decay=decay, damping=eps0, inverse_every=1)
    grads = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(1).normal(size=a.shape)),
                         params)
    updates, _ = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
        grads, tx.init(params), acts)
    _check_update(params, grads, acts, layers, updates, decay, eps0)


def test_nnx_block_every_layer(ids):
    model = NnxBlock(nnx.Rngs(0))
    _, acts = rfim_jax.capture_nnx(model, ids)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = _kinds(params, "attn")
    assert set(layers) <= set(rfim_jax.activation_paths(acts))
    # Each recorded pair is the module's own map: preacts = module(inputs).
    np.testing.assert_allclose(acts["mlp_in"]["preacts"], model.mlp_in(acts["mlp_in"]["inputs"]),
                               rtol=1e-6, atol=1e-6)
    q = acts["attn"]["query"]
    assert q["inputs"].shape == (B, T, D) and q["preacts"].shape == (B, T, D)
    np.testing.assert_allclose(np.reshape(model.attn.query(q["inputs"]), (B, T, D)),
                               q["preacts"], rtol=1e-6, atol=1e-6)
    decay, eps0 = 0.5, 0.05
    tx = rfim_jax.scale_by_rngd(layers, decay=decay, damping=eps0, inverse_every=1)
    grads = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(2).normal(size=a.shape),
                                               a.dtype), params)
    updates, _ = tx.update(grads, tx.init(params), activations=acts)
    _check_update(params, grads, acts, layers, updates, decay, eps0, tol=2e-5)  # float32
    # And through nnx.Optimizer, which forwards activations= to the transformation.
    optimizer = nnx.Optimizer(model, rfim_jax.rngd(0.1, layers), wrt=nnx.Param)
    optimizer.update(model, nnx.state(model, nnx.Param), activations=acts)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(nnx.to_pure_dict(
        nnx.state(model, nnx.Param))))
