"""``experiments.common``: the helpers the method comparisons share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("module,argv,message", [
    ("fig4", ["--epochs", "-1"], "--epochs: must be a positive integer"),
    ("fig4", ["--runs", "0"], "--runs: must be a positive integer"),
    ("fig4", ["--batch-size", "0"], "--batch-size: must be a positive integer"),
    ("fig4", ["--tasks", "bogus"], "--tasks: unknown names ['bogus']"),
    ("fig4", ["--methods", "foo"], "--methods: unknown names ['foo']"),
    ("fig4", ["--sizes", "digits=-5"], "--sizes: sizes must be >= 1"),
    ("fig4", ["--damping", "-1"], "--damping: -1.0 is outside"),
    ("fig4", ["--momentums", "1.5"], "--momentums: 1.5 is outside [0.0, 1.0)"),
    ("fig4", ["--full", "--data-dir", "/nonexistent"], "/nonexistent: no such directory"),
    ("fig5", ["--full", "--data-dir", "/nonexistent"], "/nonexistent: no such directory"),
    ("fig5", ["--lr-from", "/nonexistent.json"], "--lr-from: /nonexistent.json: no such"),
    ("cnn", ["--methods", "bogus"], "--methods: unknown names ['bogus']"),
    ("cnn", ["--lr", "rngd=abc"], "the rate is not a number"),
    ("cnn", ["--lr", "rngd"], "'rngd' is not name=rate"),
    ("cnn", ["--lr", "foo=1"], "unknown method 'foo'"),
    ("cnn", ["--full", "--data-dir", "/nonexistent"], "/nonexistent: no such directory"),
    ("capacity", ["--full", "--data-dir", "/nonexistent"], "/nonexistent: no such directory"),
    ("transformer", ["--methods", "nope"], "--methods: unknown names ['nope']"),
    ("transformer", ["--text", "/nonexistent"], "--text: /nonexistent: no such file"),
])
def test_bad_command_lines_are_usage_errors(module, argv, message, capsys):
    """These gave tracebacks (KeyError, DataNotFoundError, float conversion) or, for an
    unknown --lr key or a momentum of 1.5, ran and ignored the mistake."""
    import importlib

    main = importlib.import_module(f"experiments.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", "/tmp/rfim_cli_check", "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
