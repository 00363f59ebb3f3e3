"""``experiments.common``: the helpers the method comparisons share."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common


def test_checked_step_keeps_python_scalars_of_a_state_and_does_not_touch_the_originals():
    # kfac-jax's step takes its step count as a static argument; the trial step once turned
    # that int of the state into an array, and every kfac-jax run was reported unavailable
    # ("Non-hashable static arguments are not supported").
    seen = []

    @jax.jit
    def inner(p, x):
        return {"w": p["w"] - 0.1 * x}

    def step(p, state, x):
        arrays, count = state
        assert isinstance(count, int), type(count)  # a static argument must stay hashable
        seen.append(count)
        return inner(p, x), (arrays + 1.0, count + 1), jnp.sum(p["w"])

    params = {"w": jnp.ones(3)}
    state = (jnp.zeros(2), 0)
    got, got_state = common.checked_step("peer", lambda: (step, state), params, (jnp.ones(3),))
    assert got is step and got_state is state
    assert seen == [0]
    np.testing.assert_array_equal(params["w"], np.ones(3))  # the trial ran on copies


def test_checked_step_reports_a_failing_peer_with_the_reason():
    def build():
        def step(p, s, x):
            raise ValueError("shapes do not match")
        return step, ()

    step, reason = common.checked_step("kfac", build, {"w": jnp.ones(2)}, (jnp.ones(2),))
    assert step is None
    assert reason == "kfac: ValueError: shapes do not match"
