"""The library under ``jax.numpy_dtype_promotion("strict")`` (issue 12, item 9).

Users who run strict promotion (``jax_numpy_dtype_promotion="strict"``) must be able to use
every public entry point.  Each check here runs a representative call inside
``with jax.numpy_dtype_promotion("strict"):`` and compares its result with the same call
under standard promotion: strictness must change nothing but the absence of implicit casts.
The module sets strict promotion itself and uses no conftest fixture, so it also runs alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfim_jax

REPRESENTATIONS = ("exact", "eigen", "diagonal")
DTYPES = (jnp.float32, jnp.bfloat16)


def _strict(fn, *args, **kwargs):
    with jax.numpy_dtype_promotion("strict"):
        return fn(*args, **kwargs)


def _standard(fn, *args, **kwargs):
    with jax.numpy_dtype_promotion("standard"):
        return fn(*args, **kwargs)


def _same(a, b):
    """Strict and standard results agree in structure, dtypes and values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = jnp.asarray(x), jnp.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16
                                                 else x),
                                      np.asarray(y.astype(jnp.float32) if y.dtype == jnp.bfloat16
                                                 else y))


def _layer(dtype, d_in=4, m=3, n=9, seed=0):
    rng = np.random.default_rng(seed)
    params = {"kernel": jnp.asarray(rng.normal(size=(d_in, m)), dtype),
              "bias": jnp.asarray(rng.normal(size=(m,)), dtype)}
    x = jnp.asarray(rng.normal(size=(n, d_in)), dtype)
    v = {"kernel": jnp.asarray(rng.normal(size=(d_in, m)), dtype),
         "bias": jnp.asarray(rng.normal(size=(m,)), dtype)}
    return params, x, v


def _metric_calls(metric, v):
    return {
        "dense": metric.to_dense(),
        "matvec": metric.matvec(v),
        "solve": metric.solve(v, 1e-2),
        "solve_relative": metric.solve(v, 1e-2, relative=True),
        "inverse": metric.inverse(1e-2).to_dense(),
        "trace": metric.trace(),
        "diagonal": metric.diagonal(),
        "eigvalsh": metric.eigvalsh(),
        "ema": (metric * 0.9 + metric * 0.1).to_dense(),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("build", ["nonlinear", "linear", "softmax"])
def test_metrics_under_strict_promotion(build, representation, dtype):
    params, x, v = _layer(dtype)

    def run():
        if build == "nonlinear":
            metric = rfim_jax.nonlinear_rfim(params, x, "relu", representation=representation)
        elif build == "linear":
            metric = rfim_jax.linear_rfim(params, x, representation=representation)
        else:
            metric = rfim_jax.softmax_rfim(params, x, representation=representation)
        return _metric_calls(metric, v)

    _same(_strict(run), _standard(run))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("method", rfim_jax.SOLVER_METHODS)
def test_solvers_under_strict_promotion(method, dtype):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 5, 5))
    blocks = jnp.asarray(a @ np.swapaxes(a, -1, -2) + 5 * np.eye(5), dtype)
    rhs = jnp.asarray(rng.normal(size=(3, 5, 2)), dtype)

    def run():
        inv, ok = rfim_jax.spd_inverse_and_status(blocks, method=method)
        return {
            "inverse": rfim_jax.spd_inverse(blocks, method=method),
            "status": (inv, ok),
            "warm": rfim_jax.spd_inverse(blocks, method=method, previous=inv),
            "solve": rfim_jax.spd_solve(blocks, rhs, method=method),
            "damped": rfim_jax.add_damping(blocks, 1e-2, relative=True),
            "max_eig": rfim_jax.spd_max_eigenvalue(blocks),
        }

    _same(_strict(run), _standard(run))


def _mlp(dtype, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(5, 6), (6, 4), (4, 3)]
    params = {
        f"Dense_{i}": {"kernel": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), dtype),
                       "bias": jnp.asarray(rng.normal(size=(s[1],)) * 0.1, dtype)}
        for i, s in enumerate(sizes)
    }
    params["scale"] = jnp.ones((6,), dtype)
    return params, rng


def _batch(params, rng, dtype, n=8):
    x = jnp.asarray(rng.normal(size=(n, 5)), dtype)

    def loss(p):
        acts, h = {}, x
        for i in range(3):
            layer = p[f"Dense_{i}"]
            z = h @ layer["kernel"] + layer["bias"]
            acts[f"Dense_{i}"] = {"inputs": h, "preacts": z}
            h = jax.nn.relu(z) * (p["scale"][: z.shape[-1]] if i == 0 else 1)
        return jnp.sum(h.astype(jnp.float32) ** 2), acts

    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, acts


LAYERS = {"Dense_0": "relu", "Dense_1": "tanh", "Dense_2": "softmax"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_scale_by_rngd_under_strict_promotion(representation, dtype):
    params, rng = _mlp(dtype)
    batches = [_batch(params, rng, dtype) for _ in range(3)]

    def run():
        tx = rfim_jax.scale_by_rngd(LAYERS, representation=representation, inverse_every=2,
                                    decay=0.9)
        state = tx.init(params)
        step = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))
        out = []
        for grads, acts in batches:
            updates, state = step(grads, state, acts)
            out.append(updates)
        return out, state

    strict, standard = _strict(run), _standard(run)
    _same(strict, standard)
    updates, state = strict
    assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))
    assert all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in jax.tree.leaves(state))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_rngd_and_whitening_under_strict_promotion(dtype):
    params, rng = _mlp(dtype, seed=1)
    grads, acts = _batch(params, rng, dtype)

    def run():
        out = {}
        for name, tx in (("rngd", rfim_jax.rngd(0.1, None)),
                         ("whitening", rfim_jax.scale_by_whitening())):
            out[name] = tx.update(grads, tx.init(params), params, activations=acts)
        return out

    _same(_strict(run), _standard(run))
