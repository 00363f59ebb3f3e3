"""Layer discovery through every pytree container (issue 12, items 3 and 4).

``layers=None`` must find each dense layer wherever the params keep it (lists, tuples, dicts
holding lists, ``flax.struct`` dataclasses, ``FrozenDict``, ``nn.Partitioned`` boxes) and
precondition it; and it must never claim a layer it cannot precondition (a convolution).

Every expected update is computed here in numpy from SPEC §4: the first step starts from
``G = I``, refreshes, and returns ``-lr * G^-1 [dkernel; dbias]`` (momentum's trace is the
gradient itself on the first step) with
``G = decay I + (1 - decay) (G_hat + damping tr(G_hat)/d I)`` and, for the default kind
"linear", ``G_hat = mean x~ x~^T``.  Parameters that are not dense layers get momentum SGD.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from flax.core import FrozenDict

import rfim_jax
from rfim_jax._src import capture as cap
from rfim_jax._src import paths

LR = 0.1
DECAY = 0.995
DAMPING = 1e-2
TIGHT = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Independent numpy reference.


def np_first_update(kernel, bias, g_kernel, g_bias, x, lr=LR, decay=DECAY, damping=DAMPING):
    """-lr G^-1 [dkernel; dbias] for a "linear" layer on its first RNGD step (SPEC §4)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(kernel)[0])
    xt = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    g_hat = xt.T @ xt / x.shape[0]
    d = g_hat.shape[0]
    damped = g_hat + damping * np.trace(g_hat) / d * np.eye(d)
    g = decay * np.eye(d) + (1 - decay) * damped
    cols = np.concatenate([np.asarray(g_kernel), np.asarray(g_bias)[None, :]], axis=0)
    step = -lr * np.linalg.solve(g, cols)
    return step[:-1], step[-1]


def _layer(rng, d_in, m):
    return {"kernel": jnp.asarray(rng.normal(size=(d_in, m))),
            "bias": jnp.asarray(rng.normal(size=(m,)))}


@struct.dataclass
class TwoLayer:
    """A flax.struct dataclass holding dense layers (dicts) and a non-dense leaf."""

    hidden: dict
    out: dict
    temperature: jax.Array


@struct.dataclass
class DenseParams:
    """A dense layer that is itself a dataclass: fields ``kernel`` and ``bias``."""

    kernel: jax.Array
    bias: jax.Array


def _containers(rng):
    """(name, params, expected layer paths) for each container kind of issue 12, item 3."""
    a, b = _layer(rng, 3, 4), _layer(rng, 4, 2)
    scale = jnp.asarray(rng.normal(size=(4,)))
    return [
        ("list", [a, b], ["0", "1"]),
        ("dict_holding_list", {"layers": [a, b], "scale": scale}, ["layers/0", "layers/1"]),
        ("tuple", (a, b), ["0", "1"]),
        ("struct_dataclass", TwoLayer(hidden=a, out=b, temperature=scale), ["hidden", "out"]),
        ("dataclass_layers", {"enc": DenseParams(**a), "dec": [DenseParams(**b)]},
         ["dec/0", "enc"]),  # tree order: dict keys sorted
        ("frozendict_in_list", [FrozenDict({"Dense_0": a}), FrozenDict({"Dense_0": b})],
         ["0/Dense_0", "1/Dense_0"]),
    ]


def _inputs(rng, params, layer_path, n=7):
    kernel = paths.get_by_path(params, layer_path)["kernel"]
    return jnp.asarray(rng.normal(size=(n, kernel.shape[0])))


def _flat_acts(rng, params, layer_paths):
    acts = {}
    for p in layer_paths:
        node = paths.get_by_path(params, p)
        x = _inputs(rng, params, p)
        acts[p] = {"inputs": x, "preacts": x @ node["kernel"] + node["bias"]}
    return acts


def _check_first_step(params, grads, acts, updates, preconditioned):
    """Dense layers in ``preconditioned``: the numpy first step; every other leaf: -LR g."""
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    done = set()
    for p in preconditioned:
        node, g, u = (paths.get_by_path(t, p) for t in (params, grads, updates))
        want_k, want_b = np_first_update(node["kernel"], node["bias"], g["kernel"], g["bias"],
                                         acts[p]["inputs"])
        np.testing.assert_allclose(u["kernel"], want_k, **TIGHT)
        np.testing.assert_allclose(u["bias"], want_b, **TIGHT)
        done |= {id(u["kernel"]), id(u["bias"])}
    n_leaves = 0
    for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True):
        if id(u) not in done:
            np.testing.assert_allclose(u, -LR * np.asarray(g), **TIGHT)
            n_leaves += 1
    assert n_leaves == len(jax.tree.leaves(grads)) - 2 * len(preconditioned)


# --------------------------------------------------------------------------------------------
# Item 3: every container.


CONTAINER_IDS = [c[0] for c in _containers(np.random.default_rng(0))]


@pytest.mark.parametrize("case", range(6), ids=CONTAINER_IDS)
def test_layers_none_finds_and_preconditions_layers_in_any_container(case):
    rng = np.random.default_rng(case)
    _, params, expected = _containers(rng)[case]
    assert paths.layer_paths(params) == rfim_jax.layer_paths(params) == expected
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    acts = _flat_acts(rng, params, expected)
    tx = rfim_jax.rngd(LR, None)
    state = tx.init(params)
    assert sorted(state[0].metrics) == sorted(expected)
    updates, _ = tx.update(grads, state, params, activations=acts)
    _check_first_step(params, grads, acts, updates, expected)


@pytest.mark.parametrize(
    "case, path",
    [(0, "0"), (1, "layers/0"), (2, "1"), (3, "out"), (4, "dec/0"), (5, "1/Dense_0")],
)
def test_naming_a_layer_inside_any_container(case, path):
    rng = np.random.default_rng(10 + case)
    _, params, expected = _containers(rng)[case]
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    acts = _flat_acts(rng, params, [path])
    tx = rfim_jax.rngd(LR, {path: "linear"})
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    _check_first_step(params, grads, acts, updates, [path])


def test_activations_may_mirror_a_list_of_layers():
    rng = np.random.default_rng(3)
    params = [_layer(rng, 3, 4), _layer(rng, 4, 2)]
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    flat = _flat_acts(rng, params, ["0", "1"])
    nested = [flat["0"], flat["1"]]  # the activations in the params' own list
    tx = rfim_jax.rngd(LR, None)
    updates, _ = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))(
        grads, tx.init(params), params, nested)
    _check_first_step(params, grads, flat, updates, ["0", "1"])


def test_partitioned_boxes_are_walked_and_kept():
    """nn.Partitioned wraps the kernel: it is found, preconditioned and stays a box."""
    rng = np.random.default_rng(4)
    model = nn.Dense(3, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                         (None, "model")))
    x = jnp.asarray(rng.normal(size=(6, 5)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.PRNGKey(0), x)["params"])
    assert isinstance(params["kernel"], nn.Partitioned)
    assert paths.layer_paths({"head": params}) == ["head"]
    grads = {"head": jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)}
    node = paths.get_by_path({"head": params}, "head")
    acts = {"head": {"inputs": x, "preacts": x @ node["kernel"] + node["bias"]}}
    tx = rfim_jax.rngd(LR, None)
    updates, _ = tx.update(grads, tx.init({"head": params}), {"head": params}, activations=acts)
    assert isinstance(updates["head"]["kernel"], nn.Partitioned)
    assert updates["head"]["kernel"].names == (None, "model")
    _check_first_step({"head": params}, grads, acts, updates, ["head"])


def test_map_layers_keeps_every_container_and_wrapper():
    rng = np.random.default_rng(5)
    _, params, expected = _containers(rng)[3]
    out = paths.map_layers(lambda p, node: {k: v * 0 for k, v in node.items()}, params,
                           set(expected))
    assert isinstance(out, TwoLayer)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    np.testing.assert_array_equal(out.hidden["kernel"], 0.0)
    np.testing.assert_array_equal(out.temperature, params.temperature)


def test_layers_none_that_finds_nothing_raises():
    params = {"scale": jnp.ones(3), "emb": {"embedding": jnp.ones((5, 3))}}
    with pytest.raises(ValueError, match=r"layers=None found nothing to precondition.*'scale'"):
        rfim_jax.rngd(LR, None).init(params)
    with pytest.raises(ValueError, match=r"layers=None found nothing to precondition"):
        rfim_jax.scale_by_rngd(None).init([jnp.ones((3, 3, 2, 4))])
    # Every layer masked out for another transform: nothing left for this one.
    masked = {"Dense_0": {"kernel": optax.MaskedNode(), "bias": optax.MaskedNode()}}
    with pytest.raises(ValueError, match=r"masked out of this transform"):
        rfim_jax.scale_by_rngd(None).init(masked)
    # ... or whole layers, as optax.partition with one label per layer leaves them.
    params = {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
              "Dense_1": {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros(3)}}
    tx = optax.partition({"rngd": rfim_jax.rngd(LR, None), "adam": optax.adam(LR)},
                         {"Dense_0": "adam", "Dense_1": "adam"})
    with pytest.raises(ValueError, match=r"optax.masked gives \['Dense_0', 'Dense_1'\] to "
                                         r"another transform"):
        tx.init(params)


# --------------------------------------------------------------------------------------------
# Item 4: a linen CNN.


class CNN(nn.Module):
    """Conv -> relu -> flatten -> Dense -> relu -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), param_dtype=jnp.float64, dtype=jnp.float64)(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(8, param_dtype=jnp.float64, dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64, dtype=jnp.float64)(x)


def _cnn_grads(params, x, y):
    def loss(p):
        logits, acts = cap.capture_linen(CNN(), {"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts

    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, acts


def test_linen_cnn_unlisted_conv_passes_through():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(5, 6, 6, 2)))
    y = jnp.asarray(rng.integers(0, 3, size=5))
    params = CNN().init(jax.random.PRNGKey(0), x)["params"]
    assert params["Conv_0"]["kernel"].shape == (3, 3, 2, 4)
    # layers=None covers every layer with a kernel, the conv included (SPEC §8).
    assert paths.layer_paths(params) == ["Conv_0", "Dense_0", "Dense_1"]
    plan = rfim_jax.rngd_plan(jax.eval_shape(lambda: params), None)  # ShapeDtypeStruct leaves
    assert list(plan) == ["Conv_0", "Dense_0", "Dense_1"]
    assert plan["Conv_0"].shape == (3 * 3 * 2 + 1, 4)

    lr = 0.05
    tx = rfim_jax.rngd(lr, {"Dense_0": "linear", "Dense_1": "linear"})
    sgd = optax.sgd(lr, momentum=0.9)
    state, sgd_state = tx.init(params), sgd.init(params)
    assert sorted(state[0].metrics) == ["Dense_0", "Dense_1"]
    step = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))
    p = params
    for i in range(2):
        grads, acts = _cnn_grads(p, x, y)
        updates, state = step(grads, state, p, acts)
        sgd_updates, sgd_state = sgd.update(grads, sgd_state, p)
        # The conv passes through: RNGD's update for it is momentum SGD's, exactly.
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(updates["Conv_0"][name], sgd_updates["Conv_0"][name],
                                       **TIGHT)
        if i == 0:  # the dense layers: the numpy first step
            for path in ("Dense_0", "Dense_1"):
                want_k, want_b = np_first_update(
                    p[path]["kernel"], p[path]["bias"], grads[path]["kernel"],
                    grads[path]["bias"], acts[path]["inputs"], lr=lr)
                np.testing.assert_allclose(updates[path]["kernel"], want_k, **TIGHT)
                np.testing.assert_allclose(updates[path]["bias"], want_b, **TIGHT)
        p = optax.apply_updates(p, updates)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(p))


@pytest.mark.parametrize("make", [rfim_jax.rngd, rfim_jax.scale_by_rngd])
def test_a_conv_given_raw_inputs_is_told_about_patches(make):
    params = CNN().init(jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 2)))["params"]
    args = (0.05, {"Conv_0": "relu"}) if make is rfim_jax.rngd else ({"Conv_0": "relu"},)
    tx = make(*args)
    state = tx.init(params)
    raw = {"Conv_0": {"inputs": jnp.ones((1, 6, 6, 2)), "preacts": jnp.ones((1, 6, 6, 4))}}
    with pytest.raises(ValueError, match=r"layer 'Conv_0'.*\(1, 6, 6, 2\).*d_in=18.*patches"
                                         r".*conv_patches"):
        tx.update(jax.tree.map(jnp.zeros_like, params), state, params, activations=raw)
