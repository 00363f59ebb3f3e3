"""Embeddings and LayerNorm/RMSNorm scale-and-shift (SPEC §8): against eq. (9) by autodiff,
under RNGD against a numpy reference, and through the capture helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rfim_jax

TOL = dict(rtol=1e-10, atol=1e-12)


def _gaussian_fisher(mean_fn, theta, sigma):
    """eq. (9) for y = mean_fn(theta) + N(0, sigma^2) per output, averaged over the samples
    (mean_fn returns (n, k)): mean_i J_i^T J_i / sigma^2 by autodiff."""
    jac = jax.jacfwd(mean_fn)(theta)  # (n, k, P)
    return jnp.einsum("nka,nkb->ab", jac, jac) / (jac.shape[0] * sigma**2)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_scale_shift_rfim_is_definition(has_bias, sigma):
    rng = np.random.default_rng(int(has_bias) + 10 * int(sigma * 10))
    d = 5
    params = {"scale": jnp.asarray(rng.normal(size=d))}
    if has_bias:
        params["bias"] = jnp.asarray(rng.normal(size=d))
    u = jnp.asarray(rng.normal(size=(4, 3, d)))

    def mean_fn(theta):  # theta neuron-major: [scale_0, bias_0, scale_1, bias_1, ...]
        w = theta.reshape(d, 1 + has_bias)
        y = u.reshape(-1, d) * w[:, 0]
        return y + w[:, 1] if has_bias else y

    theta = jnp.stack([params[k] for k in ("scale", "bias") if k in params], 1).reshape(-1)
    want = _gaussian_fisher(mean_fn, theta, sigma)
    metric = rfim_jax.scale_shift_rfim(params, u, sigma=sigma)
    assert isinstance(metric, rfim_jax.BlockDiagonalMetric)
    assert metric.blocks.shape == (d, 1 + has_bias, 1 + has_bias)
    np.testing.assert_allclose(metric.to_dense(), want, **TOL)
    diag = rfim_jax.scale_shift_rfim(params, u, sigma=sigma, representation="diagonal")
    np.testing.assert_allclose(diag.to_dense(), np.diag(np.diag(want)), **TOL)
    # The layout reads and writes the norm's own entries.
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    out = metric.matvec(v)
    assert set(out) == set(params)
    flat = jnp.stack([v[k] for k in ("scale", "bias") if k in v], 1).reshape(-1)
    got = jnp.stack([out[k] for k in ("scale", "bias") if k in out], 1).reshape(-1)
    np.testing.assert_allclose(got, want @ flat, **TOL)


def test_scale_shift_rfim_errors():
    params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"scale_shift_rfim: u has shape \(4, 2\).*\(n\.\.\., 3\)"):
        rfim_jax.scale_shift_rfim(params, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"scale_shift_rfim: representation 'eigen'"):
        rfim_jax.scale_shift_rfim(params, jnp.ones((4, 3)), representation="eigen")
    with pytest.raises(ValueError, match=r"bias must have the scale's shape \(3,\), got \(2,\)"):
        rfim_jax.scale_shift_rfim({"scale": jnp.ones(3), "bias": jnp.ones(2)}, jnp.ones((4, 3)))


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_embedding_rfim_is_definition(sigma):
    rng = np.random.default_rng(int(sigma))
    num, d = 7, 3
    table = jnp.asarray(rng.normal(size=(num, d)))
    ids = jnp.asarray(rng.integers(0, num, size=(4, 5)))  # some rows never looked up

    def mean_fn(theta):  # theta = table.reshape(-1): row v is neuron v
        return theta.reshape(num, d)[ids.reshape(-1)]

    want = _gaussian_fisher(mean_fn, table.reshape(-1), sigma)
    for rep in ("exact", "eigen", "diagonal"):
        metric = rfim_jax.embedding_rfim({"embedding": table}, ids, sigma=sigma,
                                         representation=rep)
        assert isinstance(metric, rfim_jax.DiagonalMetric)
        np.testing.assert_allclose(metric.to_dense(), want, **TOL)
    v = {"embedding": jnp.asarray(rng.normal(size=(num, d)))}
    np.testing.assert_allclose(metric.matvec(v)["embedding"].reshape(-1),
                               want @ v["embedding"].reshape(-1), **TOL)


def test_tied_embedding_rfim_is_diagonal_of_definition():
    """Lookups (Gaussian, sigma) and head uses (categorical on h E^T) as samples of one
    model: the scales are the diagonal of eq. (9)'s Fisher of both, by autodiff."""
    rng = np.random.default_rng(3)
    num, d, sigma = 5, 3, 0.7
    table = jnp.asarray(rng.normal(size=(num, d)))
    ids = jnp.asarray(rng.integers(0, num, size=(2, 3)))
    h = jnp.asarray(rng.normal(size=(4, d)))
    theta = table.reshape(-1)
    lookup_jac = jax.jacfwd(lambda t: t.reshape(num, d)[ids.reshape(-1)])(theta)  # (6, d, P)
    lookup = jnp.einsum("nka,nkb->ab", lookup_jac, lookup_jac) / sigma**2
    head_jac = jax.jacfwd(lambda t: h @ t.reshape(num, d).T)(theta)  # (4, V, P)
    eta = jax.nn.softmax(h @ table.T)
    cov = jax.vmap(jnp.diag)(eta) - eta[:, :, None] * eta[:, None, :]
    head = jnp.einsum("nua,nuv,nvb->ab", head_jac, cov, head_jac)
    want = jnp.diag(lookup + head) / (ids.size + h.shape[0])
    logits = (h @ table.T).reshape(2, 2, num)  # leading axes are flattened into samples
    metric = rfim_jax.embedding_rfim({"embedding": table}, ids, sigma=sigma,
                                     attend_inputs=h.reshape(2, 2, d), attend_logits=logits)
    np.testing.assert_allclose(metric.diagonal(), want, **TOL)
    with pytest.raises(ValueError, match=r"embedding_rfim: give both attend_inputs and "):
        rfim_jax.embedding_rfim({"embedding": table}, ids, attend_inputs=h)
    with pytest.raises(ValueError, match=r"embedding_rfim: the head uses \(Embed.attend\) have "
                                         r"inputs of shape \(4, 3\) and logits \(4, 4\); "
                                         r"expected \(n\.\.\., 3\) and \(n\.\.\., 5\)"):
        rfim_jax.embedding_rfim({"embedding": table}, ids, attend_inputs=h,
                                attend_logits=jnp.ones((4, 4)))


def test_embedding_rfim_errors():
    params = {"embedding": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match=r"embedding_rfim: ids range over \[0, 4\].*\[0, 3\]"):
        rfim_jax.embedding_rfim(params, jnp.array([0, 4]))
    with pytest.raises(ValueError, match=r"embedding_rfim: the looked-up ids must be integers"):
        rfim_jax.embedding_rfim(params, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"embedding must be \(V, D\), got shape \(4,\)"):
        rfim_jax.embedding_rfim({"embedding": jnp.ones(4)}, jnp.array([0]))


# ------------------------------------------------------------------- RNGD: numpy reference


def _np_ln_blocks(u, has_bias, eps0):
    d = u.shape[-1]
    u = np.asarray(u).reshape(-1, d)
    out = []
    for j in range(d):
        rows = np.stack([u[:, j], np.ones(len(u))], 1) if has_bias else u[:, j:j + 1]
        b = rows.T @ rows / len(u)
        out.append(b + eps0 * np.trace(b) / b.shape[0] * np.eye(b.shape[0]))
    return out


def test_rngd_on_norm_and_embedding_matches_numpy():
    rng = np.random.default_rng(5)
    num, d = 6, 4
    params = {"emb": {"embedding": jnp.asarray(rng.normal(size=(num, d)))},
              "ln": {"scale": jnp.asarray(rng.normal(size=d)),
                     "bias": jnp.asarray(rng.normal(size=d))}}
    decay, every, eps0 = 0.8, 2, 0.05
    tx = rfim_jax.scale_by_rngd({"emb": "linear", "ln": rfim_jax.Linear(sigma=0.5)},
                                decay=decay, inverse_every=every, damping=eps0)
    state = tx.init(params)
    plan = rfim_jax.rngd_plan(params, {"emb": "linear", "ln": "linear"})
    assert (plan["emb"].representation, plan["ln"].representation) == ("diagonal", "exact")
    step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
    g_ln = [np.eye(2) for _ in range(d)]
    inv_ln = [np.eye(2) for _ in range(d)]
    s_emb = np.ones(num)
    for t in range(4):
        ids = rng.integers(0, num, size=(3, 5))
        u = rng.normal(size=(3, 5, d))
        acts = {"emb": {"inputs": jnp.asarray(ids),
                        "preacts": params["emb"]["embedding"][jnp.asarray(ids)]},
                "ln": {"inputs": jnp.asarray(u), "preacts": jnp.asarray(u * 2.0)}}
        grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
        updates, state = step(grads, state, acts)
        # numpy: LN blocks with sigma = 0.5 (1 / sigma^2 = 4), the embedding's frequencies.
        fresh = [4.0 * b for b in _np_ln_blocks(u, True, eps0)]
        g_ln = [decay * g + (1 - decay) * f for g, f in zip(g_ln, fresh, strict=True)]
        if t % every == 0:
            inv_ln = [np.linalg.inv(g) for g in g_ln]
        gcols = np.stack([np.asarray(grads["ln"]["scale"]), np.asarray(grads["ln"]["bias"])], 1)
        want_ln = np.stack([inv_ln[j] @ gcols[j] for j in range(d)])
        np.testing.assert_allclose(updates["ln"]["scale"], want_ln[:, 0], rtol=1e-9)
        np.testing.assert_allclose(updates["ln"]["bias"], want_ln[:, 1], rtol=1e-9)
        freq = np.bincount(ids.reshape(-1), minlength=num) / ids.size
        s_emb = decay * s_emb + (1 - decay) * (freq + eps0 * freq)
        np.testing.assert_allclose(updates["emb"]["embedding"],
                                   np.asarray(grads["emb"]["embedding"]) / s_emb[:, None],
                                   rtol=1e-9)


def test_rngd_refuses_what_does_not_fit():
    params = {"emb": {"embedding": jnp.ones((5, 3))},
              "ln": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
    for path, kind, match in (
        ("emb", "softmax", r"layer 'emb': kind 'softmax' does not fit an embedding"),
        ("ln", "relu", r"layer 'ln': kind 'relu' does not fit a LayerNorm"),
    ):
        with pytest.raises(ValueError, match=match):
            rfim_jax.scale_by_rngd({path: kind}).init(params)
    with pytest.raises(ValueError, match=r"layer 'ln'.*supports the representations "
                                         r"\('exact', 'diagonal'\), got 'eigen'"):
        rfim_jax.scale_by_rngd({"ln": "linear"}, representation={"ln": "eigen"}).init(params)
    tx = rfim_jax.scale_by_rngd({"emb": "linear"})
    state = tx.init(params)
    bad = {"emb": {"inputs": jnp.array([[0, 1]]), "preacts": jnp.ones((1, 2, 4))}}
    with pytest.raises(ValueError, match=r"layer 'emb': inputs \(ids\) have shape \(1, 2\) and "
                                         r"preacts \(1, 2, 4\)"):
        tx.update(jax.tree.map(jnp.zeros_like, params), state, activations=bad)


# ------------------------------------------------------------------------------ capture


class _Tiny(nn.Module):
    tied: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 6)
        h = nn.LayerNorm()(embed(ids))
        h = nn.RMSNorm()(nn.Dense(6)(h))
        return embed.attend(h) if self.tied else nn.Dense(11)(h)


@pytest.mark.parametrize("tied", [False, True])
def test_linen_capture_embed_and_norms(tied):
    model = _Tiny(tied=tied)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(2, 7)))
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    out, acts = rfim_jax.capture_linen(model, {"params": params}, ids)
    emb = acts["Embed_0"]
    np.testing.assert_array_equal(emb["inputs"], ids)
    np.testing.assert_allclose(emb["preacts"], params["Embed_0"]["embedding"][ids], **TOL)
    x = np.asarray(acts["Dense_0"]["preacts"], np.float64)
    u = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(acts["RMSNorm_0"]["inputs"], u, rtol=1e-5, atol=1e-6)
    layers = {"Embed_0": "linear", "LayerNorm_0": "linear", "RMSNorm_0": "linear",
              "Dense_0": "linear"}
    if not tied:
        layers["Dense_1"] = "linear"
    tx = rfim_jax.rngd(0.1, layers)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params, activations=acts)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(updates))
    if tied:
        # The head's recorded inputs are the RMSNorm's output, its logits h E^T (= the model's).
        table = np.asarray(params["Embed_0"]["embedding"], np.float64)
        h = np.asarray(emb["attend_inputs"], np.float64)
        np.testing.assert_allclose(h, acts["RMSNorm_0"]["preacts"], rtol=1e-6)
        np.testing.assert_allclose(emb["attend_preacts"], out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out, h @ table.T, rtol=1e-4, atol=1e-5)
        # One step of scale_by_rngd on the tied table against numpy: lookups and head rows
        # are samples of one diagonal moment (decay 0.995, relative damping 0.01).
        logits = np.asarray(emb["attend_preacts"], np.float64).reshape(-1, 11)
        eta = np.exp(logits - logits.max(1, keepdims=True))
        eta /= eta.sum(1, keepdims=True)
        hr = h.reshape(-1, 6)
        lookups = np.zeros((11, 6))
        for t in np.asarray(ids).reshape(-1):
            lookups[t] += 1.0
        fresh = (lookups + (eta * (1 - eta)).T @ hr**2) / (ids.size + len(hr))
        fresh = fresh + 0.01 * fresh.mean(1, keepdims=True)
        scales = 0.995 + 0.005 * fresh
        tx = rfim_jax.scale_by_rngd({"Embed_0": "linear"})
        g = jax.tree.map(lambda a: jnp.asarray(
            np.random.default_rng(1).normal(size=a.shape), jnp.float32), params)
        upd, _ = tx.update(g, tx.init(params), activations=acts)
        np.testing.assert_allclose(upd["Embed_0"]["embedding"],
                                   np.asarray(g["Embed_0"]["embedding"]) / scales, rtol=1e-5)


def test_nnx_capture_embed_and_norm():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(9, 4, rngs=rngs)
            self.norm = nnx.RMSNorm(4, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.norm(self.embed(ids)))

    model = Tiny(nnx.Rngs(0))
    ids = jnp.array([[1, 2, 8]])
    _, acts = rfim_jax.capture_nnx(model, ids)
    np.testing.assert_array_equal(acts["embed"]["inputs"], ids)
    assert acts["embed"]["attend_inputs"].shape == (1, 3, 4)
    assert acts["norm"]["preacts"].shape == (1, 3, 4)


def test_rngd_tied_head_rows_are_checked():
    params = {"emb": {"embedding": jnp.ones((5, 3))}}
    tx = rfim_jax.scale_by_rngd({"emb": "linear"})
    state = tx.init(params)
    ids = jnp.array([[0, 4]])
    base = {"inputs": ids, "preacts": jnp.ones((1, 2, 3))}
    for extra, match in (
        ({"attend_inputs": jnp.ones((1, 2, 3))},
         r"layer 'emb': only one of 'attend_inputs'/'attend_preacts' given"),
        ({"attend_inputs": jnp.ones((1, 2, 4)), "attend_preacts": jnp.ones((1, 2, 5))},
         r"layer 'emb': the head uses \(Embed.attend\) have inputs of shape \(1, 2, 4\) and "
         r"logits \(1, 2, 5\); expected \(n\.\.\., 3\) and \(n\.\.\., 5\)"),
    ):
        with pytest.raises(ValueError, match=match):
            tx.update(jax.tree.map(jnp.zeros_like, params), state,
                      activations={"emb": {**base, **extra}})


def test_embedding_ids_closed_over_by_a_jitted_step():
    """Concrete ids captured as a constant inside jit are range-checked on the host, not
    traced (this raised ConcretizationTypeError); the step equals the eager one."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(2)(nn.Embed(4, 3)(ids))

    ids = jnp.array([[0, 1, 3], [3, 3, 2]])
    model = Model()
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    tx = rfim_jax.rngd(0.1, {"Embed_0": "linear", "Dense_0": "linear"})

    def step(p, s):
        def loss(p):
            out, acts = rfim_jax.capture_linen(model, {"params": p}, ids)
            return out.sum(), acts

        (_, acts), g = jax.value_and_grad(loss, has_aux=True)(p)
        return tx.update(g, s, p, activations=acts)

    eager = step(params, tx.init(params))
    jitted = jax.jit(step)(params, tx.init(params))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    bad = jnp.array([[0, 4]])
    with pytest.raises(ValueError, match=r"ids range over \[0, 4\], outside the table's"):
        jax.jit(lambda p, s: tx.update(
            p, s, p, activations={"Embed_0": {"inputs": bad, "preacts": jnp.ones((1, 2, 3))},
                                  "Dense_0": {"inputs": jnp.ones((1, 2, 3)),
                                              "preacts": jnp.ones((1, 2, 2))}}))(
            params, tx.init(params))


def test_one_representation_for_all_layers_covers_norms_that_lack_it():
    """representation="eigen" for a model with a LayerNorm was refused; the norm keeps its
    small exact blocks (reported by rngd_plan), while a per-path request is still refused."""
    params = {"d": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
              "ln": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
              "tok": {"embedding": jnp.ones((5, 8))}}
    layers = {"d": "relu", "ln": "linear", "tok": "linear"}
    plan = rfim_jax.rngd_plan(params, layers, representation="eigen")
    assert {p: v.representation for p, v in plan.items()} == {
        "d": "eigen", "ln": "exact", "tok": "diagonal"}
    state = rfim_jax.rngd(0.1, layers, representation="eigen").init(params)
    assert set(state[0].metrics["d"]) == {"A", "S"}
    with pytest.raises(ValueError, match=r"layer 'ln' \(ScaleShiftLayer\) supports the "
                                         r"representations \('exact', 'diagonal'\), got 'eigen'"):
        rfim_jax.rngd(0.1, layers, representation={"ln": "eigen"}).init(params)
