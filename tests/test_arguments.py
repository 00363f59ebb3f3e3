"""Reading numeric arguments known now: Python, numpy and concrete 0-d array scalars alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfim_jax._src import arguments


@pytest.mark.parametrize("value", [2, 2.0, np.float32(2.0), np.int64(2), jnp.float32(2.0),
                                   np.asarray(2.0), jnp.asarray(2, jnp.int32)])
def test_every_kind_of_known_number_is_read(value):
    assert arguments.concrete_number(value) == 2.0


@pytest.mark.parametrize("value", [None, True, np.bool_(False), "2", jnp.ones(2),
                                   jnp.asarray(1 + 1j)])
def test_what_is_not_a_known_real_number_reads_as_none(value):
    assert arguments.concrete_number(value) is None


def test_traced_values_are_not_read_and_not_checked():
    @jax.jit
    def f(x):
        assert arguments.concrete_number(x) is None
        arguments.check_at_least("eps", x, 0.0)  # cannot be checked: the caller's business
        arguments.check_positive("sigma", x)
        return x

    assert float(f(-1.0)) == -1.0


def test_checks_name_the_argument_and_the_value():
    with pytest.raises(ValueError, match=r"^f: eps must be >= 0, got eps=-1.0\.$"):
        arguments.check_at_least("eps", np.float32(-1.0), 0.0, where="f: ")
    with pytest.raises(ValueError, match=r"sigma must be > 0, got sigma=nan"):
        arguments.check_positive("sigma", float("nan"))
    arguments.check_at_least("eps", None, 0.0)
    arguments.check_positive("sigma", jnp.float32(0.5))
