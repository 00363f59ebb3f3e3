"""Shared fixtures.

Tests run with float64 enabled so that closed forms can be compared with the autodiff
definition (eq. 9) to tight tolerances; float32 behaviour is tested with explicit dtypes.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request) -> int:
    return request.param


@pytest.fixture
def key(seed) -> jax.Array:
    return jax.random.PRNGKey(seed)
