"""A transformer block end to end (SPEC §8): every parameter captured and preconditioned.

linen and nnx blocks with multi-axis attention projections (DenseGeneral / LinearGeneral), a
GELU MLP, LayerNorms, an embedding and a head, untied or tied (``Embed.attend``), and in linen
two blocks under ``nn.scan`` (a leading layer axis, checked slice by slice).  The captured
pre-activations are checked against Flax's own intermediates, and one RNGD update of every
layer against a numpy reference of SPEC §4/§8 (tests/_reference.py: loops over samples and
neurons) computed from the recorded rows.
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
        fresh = np.zeros((V, D))
        for t in ids:
            fresh[t] += 1.0
        rows = ids.size
        if "attend_inputs" in entry:  # a tied head: its rows are extra samples (SPEC §8)
            h = np.asarray(entry["attend_inputs"]).reshape(-1, D)
            z = np.asarray(entry["attend_preacts"]).reshape(-1, V)
            eta = np.exp(z - z.max(1, keepdims=True))
            eta /= eta.sum(1, keepdims=True)
            for i in range(len(h)):
                fresh += np.outer(eta[i] * (1 - eta[i]), h[i] ** 2)
            rows += len(h)
        fresh /= rows
        s = decay + (1 - decay) * (fresh + eps0 * fresh.mean(1, keepdims=True))
        return {"embedding": np.asarray(grad["embedding"]) / s}
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


def _check_update(params, grads, acts, layers, updates, decay, eps0, tol=1e-7, stacked=()):
    """Every layer's update against the reference; ``stacked`` paths carry a leading layer
    axis (params, grads, rows and updates) and are checked slice by slice."""
    for path, kind in layers.items():
        node, grad = paths.get_by_path(params, path), paths.get_by_path(grads, path)
        entry, got = paths.get_by_path(acts, path), paths.get_by_path(updates, path)
        slices = range(len(node[next(iter(node))])) if path in stacked else [None]
        for k in slices:
            pick = (lambda t: t) if k is None else (lambda t, k=k: {n: a[k] for n, a in t.items()})
            want = _np_reference_update(kind, pick(node), pick(grad), pick(entry), decay, eps0)
            for name, value in want.items():
                np.testing.assert_allclose(pick(got)[name], value, rtol=tol, atol=tol * 1e-2,
                                           err_msg=f"{path}[{k}]/{name}")


def _update_and_check(params, acts, layers, seed, *, tol=1e-7, stacked=()):
    """One jitted scale_by_rngd update (decay 0.5, damping 0.05, refresh every step) of random
    gradients, every layer checked against the reference."""
    decay, eps0 = 0.5, 0.05
    tx = rfim_jax.scale_by_rngd(layers, decay=decay, damping=eps0, inverse_every=1)
    grads = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(seed).normal(size=a.shape),
                                               a.dtype), params)
    updates, _ = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
        grads, tx.init(params), acts)
    _check_update(params, grads, acts, layers, updates, decay, eps0, tol, stacked)


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
    _update_and_check(params, acts, layers, seed=1)


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


class _ScanBody(nn.Module):
    """A pre-LN block as an nn.scan body: (x, None) -> (x, None)."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln1")(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(HEADS, name="attn")(h, mask=mask)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(D, name="mlp_out")(nn.gelu(nn.Dense(2 * D, name="mlp_in")(h),
                                                    approximate=False))
        return x, None


class LinenScannedTied(nn.Module):
    """Two blocks under nn.scan between a tied embedding and head (Embed.attend)."""

    @nn.compact
    def __call__(self, ids):
        tok = nn.Embed(V, D, name="tok")
        blocks = nn.scan(_ScanBody, variable_axes={"params": 0, "rfim_activations": 0},
                         split_rngs={"params": True}, length=2)
        x, _ = blocks(name="blocks")(tok(ids), None)
        return tok.attend(nn.LayerNorm(name="ln_f")(x))


def test_linen_scanned_blocks_with_tied_embedding(ids):
    model = LinenScannedTied()
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    out, acts = rfim_jax.capture_linen(model, {"params": params}, ids)
    # The scanned layers' rows carry the layer axis; the tied head's rows sit with the table.
    assert acts["blocks"]["attn"]["query"]["inputs"].shape == (2, B, T, D)
    assert acts["blocks"]["mlp_in"]["preacts"].shape == (2, B, T, 2 * D)
    assert acts["tok"]["attend_inputs"].shape == (B, T, D)
    np.testing.assert_allclose(acts["tok"]["attend_preacts"], out, rtol=1e-12)
    np.testing.assert_allclose(out, np.asarray(acts["ln_f"]["preacts"])
                               @ np.asarray(params["tok"]["embedding"]).T, rtol=1e-10)
    layers = {"tok": "linear", "ln_f": "linear", "blocks/ln1": "linear", "blocks/ln2": "linear",
              "blocks/mlp_in": "gelu", "blocks/mlp_out": "linear"}
    for proj in params["blocks"]["attn"]:
        layers[f"blocks/attn/{proj}"] = "linear"
    stacked = {p for p in layers if p.startswith("blocks/")}
    _update_and_check(params, acts, layers, seed=3, stacked=stacked)


class NnxTied(NnxBlock):
    def __call__(self, ids):
        x = self.tok(ids)
        x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(ids))
        h = self.ln2(x)
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(h), approximate=False))
        return self.tok.attend(x)


def test_nnx_block_with_tied_embedding(ids):
    model = NnxTied(nnx.Rngs(0))
    out, acts = rfim_jax.capture_nnx(model, ids)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = {k: v for k, v in _kinds(params, "attn").items() if k != "head"}
    np.testing.assert_allclose(acts["tok"]["attend_preacts"], out, rtol=1e-6)
    _update_and_check(params, acts, layers, seed=4, tol=2e-5)  # float32
