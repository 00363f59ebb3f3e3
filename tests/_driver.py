"""A small plain-JAX MLP for the ecosystem tests, and the entry points their subprocesses run.

Used two ways:

* imported by tests/test_ecosystem.py and tests/test_sharding.py for the model;
* run as a script in a fresh process (so that a restore, or a forced device count, starts
  from nothing)::

      python tests/_driver.py resume CKPT_DIR OUT.npz   # orbax restore, continue, dump leaves
      python tests/_driver.py sharding OUT.json         # needs 4 host devices (XLA_FLAGS)

The model: ``Dense_0`` (input layer, kind "linear") -> relu -> ``LayerNorm_0`` (a scale only,
a non-dense param) -> ``block/Dense_0`` (hidden, kind "relu", a nested path) -> relu -> ``out``
(kind "softmax"), with mean softmax cross-entropy. The loss returns the activations as aux, in
the format of SPEC §4: the params nesting down to each dense layer, each mapping to
``{"inputs": (n, d_in), "preacts": (n, m)}``.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _reference import reference_blocks, reference_precondition

import rfim_jax

LAYERS = {"Dense_0": "linear", "block/Dense_0": "relu", "out": "softmax"}


def init_mlp(key, d_in=5, hidden=4, classes=3, dtype=jnp.float64):
    ks = jax.random.split(key, 5)

    def dense(k, a, b):
        kw, kb = jax.random.split(k)
        return {
            "kernel": (jax.random.normal(kw, (a, b)) / np.sqrt(a)).astype(dtype),
            "bias": (0.1 * jax.random.normal(kb, (b,))).astype(dtype),
        }

    return {
        "Dense_0": dense(ks[0], d_in, hidden),
        "LayerNorm_0": {"scale": (1.0 + 0.1 * jax.random.normal(ks[1], (hidden,))).astype(dtype)},
        "block": {"Dense_0": dense(ks[2], hidden, hidden)},
        "out": dense(ks[3], hidden, classes),
    }


def mlp_loss(params, x, y):
    """Mean softmax cross-entropy, with each dense layer's (inputs, preacts) as aux."""
    acts = {}

    def dense(path_params, h):
        return h @ path_params["kernel"] + path_params["bias"]

    z0 = dense(params["Dense_0"], x)
    acts["Dense_0"] = {"inputs": x, "preacts": z0}
    h = jax.nn.relu(z0) * params["LayerNorm_0"]["scale"]
    z1 = dense(params["block"]["Dense_0"], h)
    acts["block"] = {"Dense_0": {"inputs": h, "preacts": z1}}
    h = jax.nn.relu(z1)
    z2 = dense(params["out"], h)
    acts["out"] = {"inputs": h, "preacts": z2}
    # One-hot rather than optax's integer-label gather: on jax >= 0.11 the gather's transpose
    # (a scatter into the batch-sharded logits) needs an explicit out_sharding under explicit
    # sharding; the loss is the same.
    loss = optax.softmax_cross_entropy(z2, jax.nn.one_hot(y, z2.shape[-1], dtype=z2.dtype)).mean()
    return loss, acts


def make_batch(key, n=8, d_in=5, classes=3, dtype=jnp.float64):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in)).astype(dtype)
    return x, jax.random.randint(ky, (n,), 0, classes)


def grads_and_acts(params, x, y):
    (_, acts), grads = jax.value_and_grad(mlp_loss, has_aux=True)(params, x, y)
    return grads, acts


def _node(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def make_step(tx):
    """One jitted training step: forward with capture, backward, tx.update, apply."""

    def step(params, opt_state, x, y):
        (loss, acts), grads = jax.value_and_grad(mlp_loss, has_aux=True)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# ------------------------------------------------------------------------------ numpy reference
# SPEC §4's first step, from the shared numpy reference (tests/_reference.py).


def np_first_step(layers, params, grads, acts, *, decay, damping):
    """scale_by_rngd's first update from G = I: metrics, and the preconditioned grads."""
    metrics, updates = {}, {}
    for path, kind in layers.items():
        a = _node(acts, path)
        fresh = np.stack(reference_blocks(kind, a["inputs"], a["preacts"], True, damping))
        g = decay * np.eye(fresh.shape[-1]) + (1.0 - decay) * fresh
        metrics[path] = g
        grad = _node(grads, path)
        kernel, bias = reference_precondition(kind, np.linalg.inv(g), grad["kernel"], grad["bias"])
        updates[path] = {"kernel": kernel, "bias": bias}
    return metrics, updates


# ------------------------------------------------------------------------------ checkpoint

# The run the checkpoint test interrupts: 6 steps, saved after CKPT_STEP. inverse_every=2 so
# that an inverse refresh happens after the restore.
CKPT_STEPS, CKPT_STEP = 6, 3


def ckpt_setup():
    params = init_mlp(jax.random.PRNGKey(0))
    tx = rfim_jax.rngd(0.05, LAYERS, inverse_every=2, decay=0.9)
    return params, tx


def ckpt_batch(i):
    return make_batch(jax.random.PRNGKey(100 + i))


def resume(ckpt_dir: str, out: str) -> None:
    """Restores {params, opt_state} with orbax into a fresh process and finishes the run."""
    import orbax.checkpoint as ocp

    params, tx = ckpt_setup()
    template = {"params": params, "opt_state": tx.init(params)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = ocp.StandardCheckpointer().restore(ckpt_dir, abstract)
    if jax.tree.structure(restored) != jax.tree.structure(template):
        raise AssertionError(
            f"restored tree {jax.tree.structure(restored)} != {jax.tree.structure(template)}"
        )
    params, opt_state = restored["params"], restored["opt_state"]
    step = jax.jit(make_step(tx))
    for i in range(CKPT_STEP, CKPT_STEPS):
        params, opt_state, _ = step(params, opt_state, *ckpt_batch(i))
    leaves = jax.tree.leaves({"params": params, "opt_state": opt_state})
    np.savez(out, *[np.asarray(a) for a in leaves])


# ------------------------------------------------------------------------------ sharding


SHARD_DIMS = {"d_in": 6, "hidden": 8, "classes": 4, "n": 16}


def _max_err(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / (1.0 + np.max(np.abs(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def sharding(out: str) -> None:
    """Data-parallel and neuron-sharded RNGD on 4 devices against one device; writes JSON."""
    report = {}
    for rep in ("exact", "eigen"):
        for name, result in _sharding_runs(rep).items():
            report[name if rep == "exact" else f"{name}_{rep}"] = result
    report["explicit"] = {rep: _explicit_run(rep) for rep in ("exact", "eigen", "diagonal")}
    report["explicit_data"] = {
        rep: {str(ctx): _explicit_data_run(rep, ctx) for ctx in (False, True)}
        for rep in ("exact", "eigen", "diagonal")
    }
    report["explicit_data_inject"] = _explicit_data_run("exact", False, inject=True)
    report["pmap"] = {str(name): _pmap_run(name) for name in ("d", None)}
    with open(out, "w") as f:
        json.dump(report, f)


def _pmap_run(axis_name) -> dict:
    """jax.pmap with lax.pmean on the gradients, 4 replicas each with a quarter of the batch:
    with ``axis_name`` the replicas stay identical and equal one device on the global batch."""
    dims = SHARD_DIMS
    params0 = init_mlp(jax.random.PRNGKey(0), dims["d_in"], dims["hidden"], dims["classes"])
    tx = rfim_jax.rngd(0.1, LAYERS, inverse_every=2, decay=0.8, axis_name=axis_name)
    batches = [
        make_batch(jax.random.PRNGKey(10 + i), dims["n"], dims["d_in"], dims["classes"])
        for i in range(5)
    ]
    ref_tx = rfim_jax.rngd(0.1, LAYERS, inverse_every=2, decay=0.8)
    step = jax.jit(make_step(ref_tx))
    params, state = params0, ref_tx.init(params0)
    for x, y in batches:
        params, state, _ = step(params, state, x, y)
    ref = params

    def replica_step(params, opt_state, x, y):
        (_, acts), grads = jax.value_and_grad(mlp_loss, has_aux=True)(params, x, y)
        grads = jax.lax.pmean(grads, "d")
        updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
        return optax.apply_updates(params, updates), opt_state

    pstep = jax.pmap(replica_step, axis_name="d")
    rep = jax.tree.map(lambda a: jnp.stack([a] * 4), (params0, tx.init(params0)))
    params, state = rep
    for x, y in batches:
        split = (x.reshape(4, -1, x.shape[-1]), y.reshape(4, -1, *y.shape[1:]))
        params, state = pstep(params, state, *split)
    spread = max(float(np.max(np.abs(a - a[:1]))) for a in jax.tree.leaves(params))
    return {"replica_spread": spread,
            "vs_one_device": _max_err(jax.tree.map(lambda a: a[0], params), ref)}


@functools.cache  # ten runs share three references: each would be another compile
def _one_device_run(rep: str):
    """The sharding runs' reference: 3 jitted steps of the MLP on one device.

    Returns (initial params, the transformation, the batches, the jitted step, (params,
    state) after the steps).
    """
    dims = SHARD_DIMS
    params0 = init_mlp(jax.random.PRNGKey(0), dims["d_in"], dims["hidden"], dims["classes"])
    tx = rfim_jax.rngd(0.1, LAYERS, inverse_every=2, decay=0.8, representation=rep)
    batches = [
        make_batch(jax.random.PRNGKey(10 + i), dims["n"], dims["d_in"], dims["classes"])
        for i in range(3)
    ]
    step = jax.jit(make_step(tx))
    params, state = params0, tx.init(params0)
    for x, y in batches:
        params, state, _ = step(params, state, x, y)
    return params0, tx, batches, step, (params, state)


def _explicit_run(rep: str) -> dict:
    """Under AxisType.Explicit, init and update agree on the state's shardings, and match one
    device."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    params0, tx, batches, step, ref = _one_device_run(rep)

    mesh = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        specs = jax.tree.map(lambda _: P(), params0)
        for path in ("Dense_0", "block/Dense_0"):
            layer = _node(specs, path)
            layer["kernel"], layer["bias"] = P(None, "model"), P("model")
        params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                              params0, specs)
        state = tx.init(params)
        def spec(a):  # P('model') and P('model', None, None) are the same sharding.
            s = tuple(a.sharding.spec)
            return str(s + (None,) * (a.ndim - len(s)))

        init_specs = jax.tree.map(spec, state)
        for x, y in batches:
            params, state, _ = step(params, state, x, y)
        update_specs = jax.tree.map(spec, state)
    diff = [k for k, (a, b) in enumerate(zip(jax.tree.leaves(init_specs),
                                             jax.tree.leaves(update_specs), strict=True))
            if a != b]
    hidden = state[0].metrics["block/Dense_0"]
    hidden = hidden if not isinstance(hidden, dict) else hidden["S"]
    return {
        "specs_agree": init_specs == update_specs,
        "specs_differ_at": [str(jax.tree.leaves(init_specs)[k]) + " -> "
                            + str(jax.tree.leaves(update_specs)[k]) for k in diff],
        "hidden_spec": str(hidden.sharding.spec),
        "params_err": _max_err(params, ref[0]),
        "state_err": _max_err(state, ref[1]),
    }


def _explicit_data_run(rep: str, set_mesh: bool, inject: bool = False) -> dict:
    """Data parallel on ``jax.make_mesh``'s default (explicit) axes: the batch split over
    "data", params and state replicated, with or without ``jax.set_mesh``; against one device.
    ``inject``: the same steps through ``optax.inject_hyperparams(rfim_jax.rngd)``, whose
    hyperparameters (damping, decay) then live on the mesh too.
    """
    import contextlib

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    params0, tx, batches, step, ref = _one_device_run(rep)
    ref = (ref[0], ref[1][0].metrics)
    if inject:
        tx = optax.inject_hyperparams(rfim_jax.rngd)(
            learning_rate=0.1, layers=LAYERS, inverse_every=2, decay=0.8, representation=rep)
        step = jax.jit(make_step(tx))

    mesh = jax.make_mesh((4,), ("data",))
    data = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
        params = jax.device_put(params0, NamedSharding(mesh, P()))
        state = tx.init(params)
        for x, y in batches:
            params, state, _ = step(params, state, *jax.device_put((x, y), data))
    inner = state.inner_state if inject else state
    return {"axis_types": str(mesh.axis_types),
            "err": _max_err((params, inner[0].metrics), ref)}


def _sharding_runs(rep: str) -> dict:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    if len(devices) < 4:
        raise SystemExit(f"need 4 devices, got {devices}; set XLA_FLAGS")
    dims = SHARD_DIMS
    params0 = init_mlp(jax.random.PRNGKey(0), dims["d_in"], dims["hidden"], dims["classes"])
    tx = rfim_jax.rngd(0.1, LAYERS, inverse_every=2, decay=0.8, representation=rep)
    batches = [
        make_batch(jax.random.PRNGKey(10 + i), dims["n"], dims["d_in"], dims["classes"])
        for i in range(3)
    ]
    step = make_step(tx)

    # Reference: every array on one device, global batch.
    one = jax.devices()[0]
    ref_step = jax.jit(step)
    ref_params = jax.device_put(params0, one)
    ref_state = jax.device_put(tx.init(params0), one)
    refs = []
    for x, y in batches:
        ref_params, ref_state, _ = ref_step(ref_params, ref_state, *jax.device_put((x, y), one))
        refs.append((ref_params, ref_state))

    def run(mesh, param_specs, batch_spec):
        param_sh = jax.tree.map(
            lambda s: NamedSharding(mesh, s), param_specs, is_leaf=lambda s: isinstance(s, P)
        )
        state0 = tx.init(params0)
        state_sh = rfim_jax.state_shardings(state0, param_sh)
        batch_sh = NamedSharding(mesh, batch_spec)
        jitted = jax.jit(
            step,
            in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
            out_shardings=(param_sh, state_sh, NamedSharding(mesh, P())),
        )
        params = jax.device_put(params0, param_sh)
        state = jax.device_put(state0, state_sh)
        outs = []
        for x, y in batches:
            params, state, _ = jitted(params, state, x, y)
            outs.append((params, state))
        return outs

    report = {}

    # (a) Data parallel: batch over "data", params and state replicated.
    mesh = Mesh(np.array(devices[:4]), ("data",))
    rep_specs = jax.tree.map(lambda _: P(), params0)
    outs = run(mesh, rep_specs, P("data"))
    last_state = outs[-1][1][0]
    report["data"] = {
        "params_err": max(_max_err(o[0], r[0]) for o, r in zip(outs, refs, strict=True)),
        "state_err": max(_max_err(o[1], r[1]) for o, r in zip(outs, refs, strict=True)),
        "first_metrics": {
            p: jax.tree.map(lambda a: np.asarray(a).tolist(), a)
            for p, a in outs[0][1][0].metrics.items()
        },
    }

    # (b) Neuron axis: Dense_0 and block/Dense_0 kernels split over their m axis, the hidden
    # layer's per-neuron (m, d, d) state with them; the batch is replicated.
    mesh = Mesh(np.array(devices[:4]), ("model",))
    specs = jax.tree.map(lambda _: P(), params0)
    for path in ("Dense_0", "block/Dense_0"):
        layer = _node(specs, path)
        layer["kernel"], layer["bias"] = P(None, "model"), P("model")
    outs = run(mesh, specs, P())
    last_params, last_state = outs[-1][0], outs[-1][1][0]
    hidden_metric = last_state.metrics["block/Dense_0"]
    hidden_inverse = last_state.inverses["block/Dense_0"]
    if rep == "eigen":
        hidden_metric, hidden_inverse = hidden_metric["S"], hidden_inverse["U"]
    report["model"] = {
        "params_err": max(_max_err(o[0], r[0]) for o, r in zip(outs, refs, strict=True)),
        "state_err": max(_max_err(o[1], r[1]) for o, r in zip(outs, refs, strict=True)),
        "hidden_state_spec": str(hidden_metric.sharding.spec),
        "hidden_state_shard_shape": list(hidden_metric.addressable_shards[0].data.shape),
        "hidden_inverse_shard_shape": list(hidden_inverse.addressable_shards[0].data.shape),
        "hidden_kernel_shard_shape": list(
            last_params["block"]["Dense_0"]["kernel"].addressable_shards[0].data.shape
        ),
        "input_state_spec": str(jax.tree.leaves(last_state.metrics["Dense_0"])[0].sharding.spec),
    }
    return report


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    command, *args = sys.argv[1:]
    {"resume": resume, "sharding": sharding}[command](*args)
    sys.stdout.flush()
    os._exit(0)  # orbax leaves background threads; do not wait for them
