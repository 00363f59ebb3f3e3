"""kfac-jax (DeepMind), the K-FAC peer, from the package registry's ``kfac-jax``.

It installs with its declared dependencies (``immutabledict`` among them; do not use
``--no-deps``).  The benchmark runs its optimiser with a fixed learning rate, heavy-ball
momentum and damping (the K-FAC reference's 0.01, 0.9 and 0.1: like for like), its default
curvature EMA (0.95) and inverse period (5 steps), ``l2_reg=0``, on one device.  Its fully
adaptive mode (learning rate, momentum and damping from the quadratic model, kfac-jax's
quickstart) diverged on the paper MLP with ``l2_reg=0``: the loss rose after about 300 steps
and was NaN by step 1000, with a damping floor of 1e-3 too, so it is not the default here
(``make_kfac_optimizer(adaptive=True)`` keeps it).

**Compatibility shim.**  kfac-jax 0.0.8's ``tag_graph_matcher.eval_jaxpr_eqn`` unpacks
``Primitive.get_bind_params(params)`` as ``(subfuns, params)``; from jax 0.9.2 on it returns
only the params dict, and kfac-jax's first step fails.  :func:`load` replaces that function
with one that accepts both forms (the module attribute, which kfac-jax's tracer looks up at
call time).  ``num_burnin_steps`` is 0: with ``batch=`` instead of a data iterator, the
default burn-in raises.

On jax >= 0.11 kfac-jax 0.0.8 cannot run (:func:`incompatibility` says why), and the benchmark
reports it unavailable with that reason.

**Timing.**  kfac-jax's ``step`` decides, in Python, which compiled variant to run (curvature
and damping updates are static arguments), so it cannot be ``lax.scan``ned like the optax
methods: :class:`KFACJaxTrainer` calls it once per step, a Python loop over its own jitted
step, as its users do.  The per-step dispatch is part of what it costs.  Before timing, every
compiled variant is built on throwaway copies (:data:`WARMUP_STEPS`).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, peers
from experiments import models as mlp

FAMILY = "kfac_jax"
DISTRIBUTION = "kfac-jax"
#: shims applied by :func:`load` in this process.
SHIMS_APPLIED: list[str] = []
#: untimed steps that compile every variant of kfac-jax's step: twice its default damping
#: adaptation interval (5), the longest period of its static arguments.
WARMUP_STEPS = 10
_SHIM_FLAG = "_rfim_bench_accepts_both_bind_param_forms"


def _patch_eval_jaxpr_eqn() -> bool:
    """Makes ``kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn`` accept both forms of
    ``Primitive.get_bind_params``; returns whether it is (now) patched.

    Does nothing when that module does not exist (another kfac-jax layout or a stand-in).
    """
    try:
        tgm = importlib.import_module("kfac_jax._src.tag_graph_matcher")
    except ImportError:
        return False
    original = getattr(tgm, "eval_jaxpr_eqn", None)
    if original is None:
        return False
    if getattr(original, _SHIM_FLAG, False):
        return True
    user_context = jax.extend.source_info_util.user_context

    def eval_jaxpr_eqn(eqn, in_values):
        """Computes the outputs of ``eqn`` (kfac-jax's function, both jax forms)."""
        bound = eqn.primitive.get_bind_params(eqn.params)
        # jax < 0.9.2: (subfuns, params); jax >= 0.9.2: params only.
        subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
        with user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
        return output if isinstance(output, list) else [output]

    setattr(eval_jaxpr_eqn, _SHIM_FLAG, True)
    eval_jaxpr_eqn.__wrapped__ = original
    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    SHIMS_APPLIED.append("tag_graph_matcher.eval_jaxpr_eqn accepts both get_bind_params forms")
    return True


#: the last kfac-jax release this benchmark knows; it runs on jax <= 0.10 only.
KNOWN_VERSION = (0, 0, 8)


def incompatibility() -> str | None:
    """Why the installed kfac-jax cannot run on this jax, None when nothing known stops it.

    jax 0.11 removed ``jax.core.Effects`` (and the other ``jax.core`` names deprecated in
    0.10), which kfac-jax 0.0.8 reads in a class body, and merged ``ClosedJaxpr`` into
    ``Jaxpr``: kfac-jax's graph matcher builds ``ClosedJaxpr(jaxpr=..., consts=...)``, which
    that jax rejects.  Putting the names back lets it import but not take a step, so no shim
    is attempted; a kfac-jax release newer than :data:`KNOWN_VERSION` is assumed to cope.
    """
    import jax.extend.core as jex_core

    version = peers.distribution_version(DISTRIBUTION)
    if version is None or getattr(jex_core, "ClosedJaxpr", None) is not jex_core.Jaxpr:
        return None
    try:
        release = tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return None
    if release > KNOWN_VERSION:
        return None
    return (f"kfac-jax {version} does not run on jax {jax.__version__}: jax 0.11 removed "
            f"jax.core.Effects and merged ClosedJaxpr into Jaxpr, both of which kfac-jax's "
            f"graph matcher uses (it runs on jax <= 0.10)")


def load():
    """Imports kfac-jax, applies the shim, and returns the module.

    Raises:
      ImportError: when kfac-jax (or a dependency) is not installed or does not import, or
        cannot run on this jax (:func:`incompatibility`).
    """
    reason = incompatibility()
    if reason is not None:
        raise ImportError(reason)
    kfac_jax = importlib.import_module("kfac_jax")
    _patch_eval_jaxpr_eqn()
    return kfac_jax


def describe(method) -> str:
    """One line of the configuration of ``method``."""
    return (f"kfac_jax.Optimizer (lr={method.learning_rate:g}, momentum={method.momentum:g}, "
            f"damping {method.damping:g}, inverses every {method.inverse_every} steps, "
            f"l2_reg 0, no burn-in; Python loop over its jitted step)")


def make_kfac_optimizer(kfac_jax, *, learning_rate: float = 0.01, momentum: float = 0.9,
                        damping: float = 0.1, inverse_update_period: int = 5,
                        adaptive: bool = False, logits_fn=None):
    """kfac-jax's optimiser, its loss registered as softmax cross-entropy.

    Args:
      kfac_jax: the imported module (:func:`load`).
      learning_rate, momentum, damping: constant schedules; ignored with ``adaptive``.
      inverse_update_period: steps between inverse refreshes (5 is kfac-jax's default).
      adaptive: kfac-jax's adaptive learning rate, momentum and damping (initial damping 1),
        as in its quickstart.
      logits_fn: ``(params, x) -> logits`` of the model; default the relu MLP of the paper.
        kfac-jax finds its dense and conv layers by graph matching.
    """
    if logits_fn is None:
        logits_fn = lambda params, x: mlp.mlp_apply(params, x)[0]  # noqa: E731

    def loss_fn(params, batch):
        x, y = batch
        logits = logits_fn(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return mlp.cross_entropy(logits, y)

    if adaptive:
        schedules = {"use_adaptive_learning_rate": True, "use_adaptive_momentum": True,
                     "use_adaptive_damping": True, "initial_damping": 1.0}
    else:
        schedules = {"learning_rate_schedule": lambda step: learning_rate,
                     "momentum_schedule": lambda step: momentum,
                     "damping_schedule": lambda step: damping}
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        inverse_update_period=inverse_update_period,
        multi_device=False,
        num_burnin_steps=0,
        **schedules,
    )


@jax.jit
def _gather(x_all, y_all, idx):
    return x_all[idx], y_all[idx]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


class KFACJaxTrainer:
    """A :class:`benchmarks.harness.Trainer` over kfac-jax's own step (a Python loop)."""

    def __init__(self, method, sizes: Sequence[int], params0, x_all: jax.Array,
                 y_all: jax.Array, *, chunk: int, batch: int, seed: int = 0):
        del sizes, chunk
        self.opt = make_kfac_optimizer(load(), learning_rate=method.learning_rate,
                                       momentum=method.momentum, damping=method.damping,
                                       inverse_update_period=method.inverse_every)
        self.x_all, self.y_all = x_all, y_all
        key = jax.random.PRNGKey(seed)
        rows = np.random.default_rng(seed + 999).integers(
            0, x_all.shape[0], (WARMUP_STEPS, min(batch, int(x_all.shape[0]))))
        xb, yb = _gather(x_all, y_all, jnp.asarray(rows, jnp.int32))
        t0 = time.perf_counter()
        params = _copy(params0)
        state = self.opt.init(_copy(params0), key, (xb[0], yb[0]))
        for i in range(WARMUP_STEPS):
            params, state, _ = self.opt.step(params, state, jax.random.fold_in(key, i),
                                             batch=(xb[i], yb[i]), global_step_int=i)
        jax.block_until_ready(params)
        self.compile_seconds = time.perf_counter() - t0
        self.params = _copy(params0)
        self.state = self.opt.init(_copy(params0), key, (xb[0], yb[0]))
        self.state_bytes = harness.tree_bytes(self.state)
        self.step_count = 0

    def run_chunk(self, idx: jax.Array, key: jax.Array) -> jax.Array:
        """Steps over the minibatches ``idx``; the losses stay on device until the end."""
        xb, yb = _gather(self.x_all, self.y_all, idx)
        keys = jax.random.split(key, idx.shape[0])
        losses = []
        for i in range(idx.shape[0]):
            self.params, self.state, stats = self.opt.step(
                self.params, self.state, keys[i], batch=(xb[i], yb[i]),
                global_step_int=self.step_count)
            self.step_count += 1
            losses.append(stats["loss"])
        return jnp.stack(losses)


def make_trainer(method, sizes, params0, x_all, y_all, *, chunk: int, batch: int,
                 seed: int = 0) -> KFACJaxTrainer:
    """The trainer of ``method`` (see :class:`KFACJaxTrainer`)."""
    return KFACJaxTrainer(method, sizes, params0, x_all, y_all, chunk=chunk, batch=batch,
                          seed=seed)


def logits_step(logits_fn, params, first_batch, *, seed: int = 0,
                learning_rate: float = 0.01, momentum: float = 0.9, damping: float = 0.1,
                inverse_update_period: int = 5):
    """kfac-jax on a model given by ``logits_fn(params, x) -> (N, classes)`` logits, as a
    ``(params, state, x, y) -> (params, state, loss)`` step (y: (N,) integer labels).

    kfac-jax finds the model's dense and conv layers by graph matching at ``init``, which
    runs here on ``first_batch`` ``(x, y)``.

    Returns:
      ``(step, state)``; ``state`` is kfac-jax's state with the step count.

    Raises:
      ImportError: when kfac-jax does not import.
    """
    kfac_jax = load()
    opt = make_kfac_optimizer(
        kfac_jax, learning_rate=learning_rate, momentum=momentum, damping=damping,
        inverse_update_period=inverse_update_period, logits_fn=logits_fn)
    key = jax.random.PRNGKey(seed)
    state0 = (opt.init(_copy(params), key, first_batch), 0)

    def step(p, state, x, y):
        opt_state, i = state
        p, opt_state, stats = opt.step(p, opt_state, jax.random.fold_in(key, i), batch=(x, y),
                                       global_step_int=i)
        return p, (opt_state, i + 1), stats["loss"]

    return step, state0


def run_standalone(data, *, sizes: Sequence[int] = harness.PAPER_SIZES, steps: int = 600,
                   batch: int = harness.BATCH, seed: int = 0) -> dict:
    """kfac-jax alone, fully adaptive, for ``steps`` steps, timed per step (a quick check
    that it runs; the benchmark itself uses :class:`KFACJaxTrainer`).

    Returns:
      ``{"available": True, "median_ms_per_step", "loss"}``, or
      ``{"available": False, "error": ...}`` when kfac-jax does not import
      (``"import kfac_jax: ..."``) or fails while running (``"kfac_jax run: ..."``); it never
      raises.
    """
    try:
        kfac_jax = load()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return {"available": False, "error": f"import kfac_jax: {type(e).__name__}: {e}"}
    try:
        opt = make_kfac_optimizer(kfac_jax, adaptive=True)
        params = mlp.init_mlp(jax.random.PRNGKey(seed), sizes)
        key = jax.random.PRNGKey(seed)
        idx = harness.epoch_indices(np.random.default_rng(seed), data.num_train, batch)
        state = opt.init(params, key, (data.x_train[idx[0]], data.y_train[idx[0]]))
        times, losses = [], []
        for i in range(min(steps, len(idx))):
            b = (data.x_train[idx[i]], data.y_train[idx[i]])
            key, sub = jax.random.split(key)
            t0 = time.perf_counter()
            params, state, stats = opt.step(params, state, sub, batch=b, global_step_int=i)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t0)
            losses.append(float(stats["loss"]))
        return {"available": True, "median_ms_per_step": float(np.median(times[5:]) * 1e3),
                "loss": losses}
    except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
        return {"available": False, "error": f"kfac_jax run: {type(e).__name__}: {e}"}
