"""Shared fixtures.

Tests run with float64 enabled so that closed forms can be compared with the autodiff
definition (eq. 9) to tight tolerances; float32 behaviour is tested with explicit dtypes.
"""

import os
from pathlib import Path

# Why: the suite's time is mostly XLA compiling about 10 small programs per test (eager ops
# and jitted steps at tiny shapes), not running them.  LLVM's backend optimisation is most of
# each compile, and at these shapes the unoptimised code runs about as fast: level 0 cut
# tests/test_conv.py from 191 s to 157 s and the transformer and CNN smoke tests from 287 s
# to 225 s on 2 CPU cores.  It must be set before XLA's backend starts; child processes
# inherit it through os.environ (child_env).  A user's own level in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# Why: many tests compile the same programs (the same eager ops and jitted steps at the same
# tiny shapes, built afresh in each test, so jit's in-memory cache misses).  JAX's persistent
# compilation cache finds them by their HLO and skips XLA.  Each pytest process (each xdist
# worker) gets its own empty folder, removed at exit: nothing persists between runs, and no two
# processes write one folder at the same time (the cache writes its files unlocked).  Child
# processes, which their test waits for, inherit it through os.environ.  A user's own cache
# folder (or an empty value, no cache) wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="rfim_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

import rfim_jax  # noqa: E402

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


@pytest.fixture(scope="session")
def child_env():
    """Makes the environment for a test's child Python process: ``child_env(**changes)``.

    The child imports the same ``rfim_jax`` as this process (its folder goes first on
    PYTHONPATH), whatever the installed copy or the working directory: a child that silently
    ran another checkout's code would test the wrong library.  A change of ``None`` removes
    that variable.
    """
    root = str(Path(rfim_jax.__file__).resolve().parents[1])

    def make(**changes: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    return make
