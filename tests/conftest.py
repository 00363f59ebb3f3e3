"""Shared fixtures.

Tests run with float64 enabled so that closed forms can be compared with the autodiff
definition (eq. 9) to tight tolerances; float32 behaviour is tested with explicit dtypes.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
# On GPUs (TF32) and TPUs (bfloat16 passes) JAX's default float32 matmul precision is lower
# than float32; the float32 tests compare with float64 definitions at float32 tolerances, so
# the suite asks for full precision.  The library itself follows the user's setting (README,
# "On a GPU"); on the CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request) -> int:
    return request.param


@pytest.fixture
def key(seed) -> jax.Array:
    return jax.random.PRNGKey(seed)


@pytest.fixture
def kfac_jax_runs() -> None:
    """Skips unless kfac-jax is installed and can run on this jax.  It only looks for the
    package: importing it directly fails on jax >= 0.11, where the benchmark reports why
    (benchmarks.peers.kfac_jax.incompatibility, tested on its own)."""
    import importlib.util

    from benchmarks.peers import kfac_jax as peer

    if importlib.util.find_spec("kfac_jax") is None:
        pytest.skip("kfac-jax is not installed (pip install kfac-jax)")
    reason = peer.incompatibility()
    if reason is not None:
        pytest.skip(reason)
