"""A soak of RNGD (issue 12, item 13): 10,000 steps in one jitted loop, with bad batches.

A small MLP (6 -> 8 tanh -> 3 softmax, float32, noisy labels) trains for 10,000 steps of
``optax.apply_if_finite(rfim_jax.rngd(..., inverse_every=10))`` inside ONE jitted
``lax.fori_loop`` (1,000 inverse refreshes, the pattern that deadlocks batched LAPACK on a
2-core CPU), in a subprocess with a timeout.  Two kinds of bad batch arrive on fixed schedules:

* every 997th step (i % 997 == 996) the input batch is NaN, so the gradients are NaN:
  ``apply_if_finite`` must reject exactly those 10 steps and leave the params and the inner
  state as they were;
* every 1009th step (i % 1009 == 1008) only the activations handed to RNGD carry an inf
  (the gradients are finite): RNGD must skip that batch's statistics for that layer (9 steps)
  and still return a finite update.

Afterwards the params and the whole optimiser state must be finite, the counters exact (the
schedule's arithmetic, and an independent count kept in the loop's carry), and the loss lower
than at the start.

The configuration is one where RNGD is stable for 10,000 steps (lr 0.02, batch 64, tanh).  With
relu hidden units and batch 16 the moving average's smallest eigenvalue drifts towards 0
(dead and saturated units; the relative damping scales with each block's own trace) and the
run diverges after 1,000-8,000 steps even at lr 0.01: a soak there would count divergence,
not the injected batches.
"""

import subprocess
import sys
import textwrap

import pytest

STEPS = 10_000
NAN_EVERY, ACTS_EVERY = 997, 1009

_SOAK = textwrap.dedent(
    f"""
    import json

    import jax
    import jax.numpy as jnp
    import optax

    import rfim_jax
    from rfim_jax._src.transform import ScaleByRNGDState

    STEPS, NAN_EVERY, ACTS_EVERY = {STEPS}, {NAN_EVERY}, {ACTS_EVERY}
    D_IN, HIDDEN, CLASSES, BATCH = 6, 8, 3, 64
    LAYERS = {{"Dense_0": "tanh", "Dense_1": "softmax"}}

    k0, k1, kt, kdata, keval = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {{
        "Dense_0": {{"kernel": jax.random.normal(k0, (D_IN, HIDDEN)) / D_IN**0.5,
                     "bias": jnp.zeros(HIDDEN)}},
        "Dense_1": {{"kernel": jax.random.normal(k1, (HIDDEN, CLASSES)) / HIDDEN**0.5,
                     "bias": jnp.zeros(CLASSES)}},
    }}
    teacher = jax.random.normal(kt, (D_IN, CLASSES))

    def batch(key, n=BATCH):
        x = jax.random.normal(key, (n, D_IN))
        return x, jax.random.categorical(jax.random.fold_in(key, 1), x @ teacher)

    def finite(tree):
        return jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))

    def loss_fn(p, x, y):
        z0 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        h = jnp.tanh(z0)
        z1 = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        acts = {{"Dense_0": {{"inputs": x, "preacts": z0}},
                 "Dense_1": {{"inputs": h, "preacts": z1}}}}
        return optax.softmax_cross_entropy_with_integer_labels(z1, y).mean(), acts

    tx = optax.apply_if_finite(rfim_jax.rngd(0.02, LAYERS, inverse_every=10),
                               max_consecutive_errors=5)

    @jax.jit
    def soak(params):
        def body(i, carry):
            p, s, bad_grads, bad_acts = carry
            x, y = batch(jax.random.fold_in(kdata, i))
            x = jnp.where(i % NAN_EVERY == NAN_EVERY - 1, jnp.nan, x)
            (_, acts), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y)
            bad = acts["Dense_0"]["inputs"].at[0, 0].set(jnp.inf)
            acts["Dense_0"]["inputs"] = jnp.where(i % ACTS_EVERY == ACTS_EVERY - 1, bad,
                                                  acts["Dense_0"]["inputs"])
            bad_grads += (~finite(g)).astype(jnp.int32)
            bad_acts += (finite(g) & ~finite(acts["Dense_0"])).astype(jnp.int32)
            u, s = tx.update(g, s, p, activations=acts)
            return optax.apply_updates(p, u), s, bad_grads, bad_acts
        zero = jnp.zeros([], jnp.int32)
        return jax.lax.fori_loop(0, STEPS, body, (params, tx.init(params), zero, zero))

    x_eval, y_eval = batch(keval, 4096)
    loss0 = float(loss_fn(params, x_eval, y_eval)[0])
    params, state, bad_grads, bad_acts = jax.block_until_ready(soak(params))
    loss1 = float(loss_fn(params, x_eval, y_eval)[0])

    def find(tree, cls):
        return [n for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, cls))
                if isinstance(n, cls)]

    (rngd_state,) = find(state, ScaleByRNGDState)
    out = {{
        "finite": all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((params, state))),
        "rejected": sum(int(g.total_notfinite) for g in find(state, optax.ApplyIfFiniteState)),
        "skipped": {{k: int(v) for k, v in rngd_state.skipped.items()}},
        "count": int(rngd_state.count),
        "bad_grads": int(bad_grads),
        "bad_acts": int(bad_acts),
        "loss0": loss0,
        "loss1": loss1,
    }}
    print("SOAK-RESULT " + json.dumps(out))
    """
)


def _expected(every: int) -> int:
    return sum(1 for i in range(STEPS) if i % every == every - 1)


def test_rngd_soak_10000_jitted_steps_with_bad_batches(child_env):
    """One jitted loop of 10,000 RNGD steps; a hang or a crash fails here."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SOAK], env=child_env(), capture_output=True, text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{STEPS} jitted RNGD steps (inverse_every=10) did not finish in 300 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SOAK-RESULT "))
    res = json.loads(line[len("SOAK-RESULT "):])
    rejected, acts_only = _expected(NAN_EVERY), _expected(ACTS_EVERY)
    assert (rejected, acts_only) == (10, 9)
    assert res["finite"], res
    # apply_if_finite rejected exactly the NaN batches, and kept the inner state then ...
    assert res["rejected"] == res["bad_grads"] == rejected, res
    assert res["count"] == STEPS - rejected, res
    # ... while RNGD skipped exactly the statistics that carried an inf, and only that layer's.
    assert res["skipped"] == {"Dense_0": res["bad_acts"], "Dense_1": 0}, res
    assert res["bad_acts"] == acts_only, res
    assert res["loss1"] < 0.5 * res["loss0"], res
