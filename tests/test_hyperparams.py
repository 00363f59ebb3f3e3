"""Hyperparameters that lose their meaning (low precision, out of range) and non-real dtypes
raise instead of silently changing the algorithm (issue: robustness, items 1, 2 and 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import reference_blocks

import rfim_jax


def _problem(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), dtype),
                          "bias": jnp.zeros(4, dtype)}}
    x = rng.normal(size=(16, 3))
    z = x @ np.asarray(params["Dense_0"]["kernel"], np.float64)
    acts = {"Dense_0": {"inputs": jnp.asarray(x, dtype), "preacts": jnp.asarray(z, dtype)}}
    grads = jax.tree.map(jnp.ones_like, params)
    return params, acts, grads, x, z


def test_bfloat16_decay_under_inject_hyperparams_is_refused():
    # optax stores float hyperparameters in the params' dtype: 0.9995 becomes exactly 1.0.
    params, acts, grads, _, _ = _problem(jnp.bfloat16)
    tx = optax.inject_hyperparams(rfim_jax.rngd)(learning_rate=0.1, layers={"Dense_0": "relu"},
                                                 decay=0.9995)
    # Refused at init already, where inject_hyperparams first builds the transformation.
    with pytest.raises(TypeError,
                       match=r"decay arrived as bfloat16.*hyperparam_dtype=jnp\.float32"):
        tx.init(params)
    # And at update, for a state whose decay became bfloat16 later (e.g. a cast checkpoint).
    good = optax.inject_hyperparams(rfim_jax.rngd, hyperparam_dtype=jnp.float32)(
        learning_rate=0.1, layers={"Dense_0": "relu"}, decay=0.9995)
    state = good.init(params)
    hyper = {**state.hyperparams, "decay": state.hyperparams["decay"].astype(jnp.bfloat16)}
    assert float(hyper["decay"]) == 1.0
    with pytest.raises(TypeError,
                       match=r"decay arrived as bfloat16.*hyperparam_dtype=jnp\.float32"):
        tx.update(grads, state._replace(hyperparams=hyper), params, activations=acts)


def test_float32_hyperparams_keep_the_moving_average_of_eq_32():
    params, acts, grads, x, z = _problem(jnp.bfloat16)
    decay, steps = 0.9995, 50
    tx = optax.inject_hyperparams(rfim_jax.rngd, hyperparam_dtype=jnp.float32)(
        learning_rate=0.1, layers={"Dense_0": "relu"}, decay=decay)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        _, state = update(grads, state, params, activations=acts)
    got = np.asarray(state.inner_state[0].metrics["Dense_0"], np.float64)
    # Same batch every step: G_k = decay^k I + (1 - decay^k) F, F the damped fresh blocks (numpy).
    x32 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    z32 = np.asarray(jnp.asarray(z, jnp.bfloat16), np.float64)
    fresh = np.stack(reference_blocks("relu", x32, z32, True, 1e-2))
    want = decay**steps * np.eye(4) + (1 - decay**steps) * fresh
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(got - np.eye(4))) > 1e-3  # it moved away from the identity


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, r"decay must lie in \[0.0, 1.0\), got 1.0"),
        ({"decay": 1.5}, r"decay must lie in \[0.0, 1.0\), got 1.5"),
        ({"decay": -0.5}, r"decay must lie in \[0.0, 1.0\), got -0.5"),
        ({"damping": -2.0}, r"damping must be >= 0.0, got -2.0"),
        ({"inverse_every": 0}, r"inverse_every must be a positive integer, got 0"),
        ({"update_every": 2.5}, r"update_every must be a positive integer, got 2.5"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\), got 1.0"),
        # numpy scalars (from config files) are checked like Python numbers.
        ({"decay": np.float32(1.0)}, r"decay must lie in \[0.0, 1.0\), got 1.0"),
        ({"update_every": np.int64(0)}, r"update_every must be a positive integer, got 0"),
        ({"inverse_every": np.int32(-3)}, r"inverse_every must be a positive integer, got -3"),
        ({"momentum": np.float64(1.2)}, r"momentum must lie in \[0, 1\), got 1.2"),
        # An infinite damping made every batch non-finite: RNGD silently became momentum SGD.
        ({"damping": float("inf")}, r"damping must be finite, got inf"),
        ({"damping": np.nan}, r"damping must be finite, got nan"),
        # Checked when built, not at the first update inside a jitted step.
        ({"solver": "lu"}, r"Unknown solver method 'lu'; expected one of \('auto'"),
        ({"solver": None}, r"Unknown solver method None"),
        # A budget that is no number of bytes sent every layer to eigen without a word.
        ({"exact_budget_bytes": -1}, r"exact_budget_bytes must be a whole number of bytes "
                                     r">= 0, got -1"),
        ({"exact_budget_bytes": 1.5}, r"exact_budget_bytes must be a whole number of bytes"),
        ({"max_state_bytes": -(2**20)}, r"max_state_bytes must be a whole number of bytes"),
    ],
)
def test_out_of_range_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rfim_jax.rngd(0.1, {"Dense_0": "relu"}, **kwargs)


@pytest.mark.parametrize("budget", [True, "1MB", jnp.bool_(True)])
def test_a_budget_that_is_not_a_number_of_bytes_is_a_type_error(budget):
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(TypeError, match=r"exact_budget_bytes must be a number of bytes"):
        rfim_jax.rngd(0.1, {"Dense_0": "relu"}, exact_budget_bytes=budget)
    with pytest.raises(TypeError, match=r"exact_budget_bytes must be a number of bytes"):
        rfim_jax.rngd_plan(params, {"Dense_0": "relu"}, exact_budget_bytes=budget)


def test_a_zero_budget_is_a_budget_every_exact_layer_exceeds():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    plan = rfim_jax.rngd_plan(params, {"Dense_0": "relu"}, exact_budget_bytes=0)
    assert plan["Dense_0"].representation == "eigen"
    plan = rfim_jax.rngd_plan(params, {"Dense_0": "relu"}, exact_budget_bytes=np.int64(2**20))
    assert plan["Dense_0"].representation == "exact"


def test_inject_hyperparams_values_are_checked_at_init():
    """inject_hyperparams hands init concrete arrays; out-of-range ones must not pass."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    for kwargs, match in (({"decay": 1.5}, r"decay must lie in \[0.0, 1.0\)"),
                          ({"damping": -1.0}, r"damping must be >= 0.0")):
        tx = optax.inject_hyperparams(rfim_jax.rngd)(0.1, {"Dense_0": "relu"}, **kwargs)
        with pytest.raises(ValueError, match=match):
            tx.init(params)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, "not a dtype"])
def test_state_dtype_must_be_a_real_float(dtype):
    with pytest.raises(TypeError, match=r"state_dtype must be a (real )?floating dtype"):
        rfim_jax.scale_by_rngd({"Dense_0": "relu"}, state_dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_eight_bit_state_is_refused_when_built(dtype):
    with pytest.raises(TypeError, match=r"state_dtype float8_\w+ is not supported"):
        rfim_jax.scale_by_rngd({"Dense_0": "relu"}, state_dtype=dtype)


def test_an_injected_rngd_initialises_abstractly_and_under_jit():
    """inject_hyperparams injects every numeric default; a numeric exact_budget_bytes default
    was traced and refused by jax.eval_shape(tx.init) and jax.jit(tx.init)."""
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    tx = optax.inject_hyperparams(rfim_jax.rngd)(learning_rate=0.1, layers={"Dense_0": "relu"})
    abstract = jax.eval_shape(tx.init, params)
    concrete = jax.jit(tx.init)(params)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, concrete)
    assert "exact_budget_bytes" not in concrete.hyperparams
    budget = optax.inject_hyperparams(rfim_jax.rngd)(
        learning_rate=0.1, layers={"Dense_0": "relu"}, exact_budget_bytes=2**20)
    with pytest.raises(TypeError, match=r"static_args=\('exact_budget_bytes',\)"):
        jax.eval_shape(budget.init, params)


def test_complex_layers_are_refused_at_every_boundary():
    params, acts, grads, x, _ = _problem()
    cparams = jax.tree.map(lambda a: a.astype(jnp.complex64), params)
    cacts = jax.tree.map(lambda a: a.astype(jnp.complex64), acts)
    tx = rfim_jax.rngd(0.1, {"Dense_0": "relu"})
    match = r"layer 'Dense_0': complex dtype complex64 is not supported"
    with pytest.raises(TypeError, match=match):
        tx.init(cparams)
    state = tx.init(params)
    with pytest.raises(TypeError, match=match):
        tx.update(grads, state, params, activations=cacts)
    with pytest.raises(TypeError, match=match):
        tx.update(jax.tree.map(lambda a: a.astype(jnp.complex64), grads), state, params,
                  activations=acts)
    with pytest.raises(TypeError, match=r"nonlinear_rfim: complex dtype complex64"):
        rfim_jax.nonlinear_rfim(cparams["Dense_0"], jnp.asarray(x, jnp.complex64), "relu")
    with pytest.raises(TypeError, match=r"complex dtype complex64 is not supported"):
        rfim_jax.spd_inverse(jnp.eye(3, dtype=jnp.complex64)[None])
