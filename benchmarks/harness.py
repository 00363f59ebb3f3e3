"""The benchmark harness: methods, compiled training steps, interleaved timing, streaming output.

Everything the speed benchmarks share, independent of any one optimiser:

- :class:`Method`, one optimiser configuration, and :func:`make_optimizer`, which builds it
  (Adam, AdamW, SGD and RNGD here; every other family from its module in
  :mod:`benchmarks.peers`);
- compiled steps: :func:`make_step`, :func:`make_chunk` (a ``lax.scan`` over a chunk of steps,
  minibatches gathered on device) and :func:`compile_chunk` (ahead of time, never timed);
- :class:`ScanTrainer`, the trainer of every optax-style method, and the :class:`Trainer`
  protocol that a peer with its own step function (kfac-jax) implements instead;
- :func:`train_interleaved`: every method on the same minibatch sequence, one chunk each in
  turn, the order rotating every round, so a shared or throttled CPU slows all of them alike;
  a method that cannot be built or fails while running is reported with the reason;
- :func:`summarise_runs`, :func:`time_to_target`, :func:`time_chunks`;
- :class:`Recorder`: prints rows as they are measured and rewrites the partial JSON after
  every row, so a run cut off by a time limit still reports what it measured.

Only the public API of :mod:`rfim_jax` is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from threadpoolctl import threadpool_limits

import rfim_jax
from benchmarks import peers
from experiments import common
from experiments import data as data_lib
from experiments import models as mlp

PAPER_SIZES = (784, 64, 64, 64, 10)
BATCH = 100
#: steps per timed chunk; a multiple of RNGD's T = 100 so that each chunk holds one refresh.
CHUNK = 100
#: training losses whose first crossing is reported (reporting points, not acceptance tests).
TARGETS = (0.3, 0.2, 0.1)
EVAL_SUBSET = 10_000
#: WhiteNGD's whitening is damped like RNGD's metric: eps = damping * tr(C) / d.
WHITEN_DAMPING = 1e-2
#: rows the whitening map is fitted on: RNGD's own moving average (lambda = 0.995) spans
#: about 1 / (1 - lambda) = 200 batches of 100, i.e. 20k samples.
WHITEN_FIT_SAMPLES = 20_000
#: the families built in this module; every other one lives in :mod:`benchmarks.peers`.
CORE_FAMILIES = ("adam", "adamw", "sgd", "rngd")

Params = dict[str, dict[str, jax.Array]]


def limit_blas_threads(threads: int):
    """Caps the OpenBLAS threads behind jax's CPU LAPACK (``eigh``, the eigen refresh).

    XLA's CPU runtime already keeps every core busy, and a multithreaded LAPACK call inside a
    compiled step oversubscribes them.  On 2 quiet cores, a 65 x 65 ``eigh`` in the paper
    MLP's compiled chunk took 1.7-3.2 ms instead of its standalone 0.21 ms; one thread brings
    it back to about 0.2 ms (README, *Performance*).  On a loaded machine a 257 x 257
    ``syevd`` took 0.8 s instead of 3 ms.  Used as a context manager; 0 leaves the threads
    alone (a null context).
    """
    if threads <= 0:
        return contextlib.nullcontext()
    jax.block_until_ready(jnp.linalg.eigh(jnp.eye(2)))  # loads jax's LAPACK first
    return threadpool_limits(limits=threads, user_api="blas")


def add_blas_threads_arg(parser) -> None:
    """The ``--blas-threads`` flag of every timing CLI (:func:`limit_blas_threads`)."""
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="OpenBLAS threads for jax's CPU LAPACK (0: leave as is)")


# ----------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One optimiser configuration of a benchmark.

    Attributes:
      name: the name in tables and JSON.
      family: "adam", "adamw", "sgd", "rngd", or a peer family of :mod:`benchmarks.peers`
        ("kfac_ref", "kfac_jax", "psgd_kron", "muon").
      learning_rate: the step size.
      momentum: heavy-ball momentum (SGD, RNGD, K-FAC reference; Muon's beta).
      update_every: RNGD: statistics every k-th step.
      inverse_every: RNGD and the K-FAC reference: steps between inverse refreshes (T).
      decay: moving-average decay of the curvature statistics.
      damping: damping of the curvature (relative for RNGD).
      whiten: RNGD: whiten the inputs once and turn the input layer's RFIM off (WhiteNGD).
      representation: RNGD: "auto", "exact", "eigen" or "diagonal".
      output_kind: RNGD: the RFIM kind of the output layer ("linear" as in the paper's runs).
      weight_decay: decoupled weight decay (AdamW, Muon, PSGD; RNGD: added after the
        preconditioning, before the momentum).
      solver: RNGD: the block solver of the refreshes (:func:`rfim_jax.rngd`'s ``solver``).
      host_refresh: RNGD: decide each step's refresh in the program (``refresh=`` a Python
        bool on the steps whose count is a multiple of ``inverse_every``) instead of with the
        update's ``lax.cond``: the same updates, no conditional in the compiled chunk.
    """

    name: str
    family: str
    learning_rate: float | None = None
    momentum: float = 0.9
    update_every: int = 1
    inverse_every: int = 100
    decay: float = 0.995
    damping: float = 1e-2
    whiten: bool = False
    representation: str = "auto"
    output_kind: str = "linear"
    weight_decay: float = 0.0
    solver: str = "auto"
    host_refresh: bool = False

    def describe(self) -> str:
        """A one-line description of the configuration, for tables and JSON."""
        if self.family == "adam":
            return f"optax.adam(lr={self.learning_rate:g})"
        if self.family == "adamw":
            return f"optax.adamw(lr={self.learning_rate:g}, weight_decay={self.weight_decay:g})"
        if self.family == "sgd":
            return f"optax.sgd(lr={self.learning_rate:g}, momentum={self.momentum:g})"
        if self.family != "rngd":
            return peers.get(self.family).describe(self)
        extra = "whitened inputs, input layer kind None; " if self.whiten else ""
        if self.representation != "auto":
            extra += f"representation={self.representation!r}, "
        if self.output_kind != "linear":
            extra += f"output kind {self.output_kind!r}, "
        if self.weight_decay:
            extra += f"weight decay {self.weight_decay:g} after the preconditioning, "
        if self.solver != "auto":
            extra += f"solver={self.solver!r}, "
        if self.host_refresh:
            extra += "refresh decided outside the step (refresh=True/False), "
        return (f"rfim_jax.rngd(lr={self.learning_rate:g}, momentum={self.momentum:g}, "
                f"{extra}update_every={self.update_every}, T={self.inverse_every}, "
                f"decay={self.decay:g}, damping={self.damping:g})")


def rngd_layer_kinds(sizes: Sequence[int], whiten: bool = False,
                     output_kind: str = "linear") -> dict[str, Any]:
    """The paper's RNGD layers (Sec. 5.2) of the relu MLP ``sizes``.

    Args:
      sizes: layer widths, input first.
      whiten: pass the input layer through (kind None): its inputs are whitened instead.
      output_kind: replaces the output layer's "linear" (e.g. "softmax").

    Returns:
      Layer path -> RFIM kind, as :func:`rfim_jax.rngd` takes it.
    """
    kinds = mlp.rngd_layers(len(sizes) - 1, "relu")
    kinds[mlp.dense_name(len(sizes) - 2)] = output_kind
    if whiten:
        kinds[mlp.dense_name(0)] = None
    return kinds


def make_optimizer(method: Method, sizes: Sequence[int]) -> optax.GradientTransformation:
    """The optax transformation of ``method`` on the relu MLP ``sizes``.

    Raises:
      ValueError: for an unknown family.
      Exception: whatever a peer raises when it cannot be imported.
    """
    if method.family == "adam":
        return optax.adam(method.learning_rate)
    if method.family == "adamw":
        return optax.adamw(method.learning_rate, weight_decay=method.weight_decay)
    if method.family == "sgd":
        return optax.sgd(method.learning_rate, momentum=method.momentum or None)
    if method.family == "rngd":
        kw = dict(decay=method.decay, inverse_every=method.inverse_every,
                  damping=method.damping, update_every=method.update_every,
                  representation=method.representation, solver=method.solver)
        kinds = rngd_layer_kinds(sizes, method.whiten, method.output_kind)
        if not method.weight_decay:
            return rfim_jax.rngd(method.learning_rate, kinds, momentum=method.momentum or None,
                                 **kw)
        # Decoupled weight decay after the preconditioning, as AdamW adds it after Adam's.
        return optax.chain(
            rfim_jax.scale_by_rngd(kinds, **kw),
            optax.add_decayed_weights(method.weight_decay),
            *([optax.trace(method.momentum)] if method.momentum else []),
            optax.scale_by_learning_rate(method.learning_rate),
        )
    if method.family in peers.FAMILIES:
        return peers.get(method.family).make_optimizer(method, sizes)
    raise ValueError(f"unknown family {method.family!r}")


# -------------------------------------------------------------------------- training steps


def make_step(method: Method, opt: optax.GradientTransformation) -> Callable:
    """``step(params, state, x, y, key) -> (params, state, loss)`` for one minibatch.

    RNGD gets the layers' ``activations=``; a peer module may define
    ``extra_args(params, activations, logits, key)`` for what its update needs more.
    """
    extra = None
    if method.family in peers.FAMILIES:
        extra = getattr(peers.get(method.family), "extra_args", None)

    def step(params, state, x, y, key, refresh=None):
        def loss_fn(p):
            logits, acts, _ = mlp.mlp_apply(p, x)
            return mlp.cross_entropy(logits, y), (logits, acts)

        (loss, (logits, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if method.family == "rngd":
            kwargs = {"activations": acts}
            if refresh is not None:
                kwargs["refresh"] = refresh
        elif extra is not None:
            kwargs = extra(params, acts, logits, key)
        else:
            kwargs = {}
        updates, state = opt.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state, loss

    return step


def make_chunk(step: Callable, refresh_every: int | None = None) -> Callable:
    """``chunk(params, state, x_all, y_all, idx (S, batch), key) -> (params, state, losses)``.

    ``lax.scan`` over S steps; minibatches are gathered on device from the whole training
    set, which is an argument (not a constant baked into the program).  With
    ``refresh_every = T`` (dividing S; chunks start at multiples of S) the S steps run as
    S / T segments of one ``refresh=True`` step and T - 1 ``refresh=False`` steps, so no
    step holds the refresh's conditional.
    """

    def chunk(params, state, x_all, y_all, idx, key):
        def run(carry, idx, keys, **kwargs):
            def body(carry, inp):
                i, k = inp
                p, s, loss = step(*carry, x_all[i], y_all[i], k, **kwargs)
                return (p, s), loss

            return jax.lax.scan(body, carry, (idx, keys))

        keys = jax.random.split(key, idx.shape[0])
        if refresh_every is None:
            (params, state), losses = run((params, state), idx, keys)
            return params, state, losses
        t = refresh_every
        if idx.shape[0] % t:
            raise ValueError(f"make_chunk: refresh_every={t} must divide the chunk's "
                             f"{idx.shape[0]} steps")

        def segment(carry, inp):
            seg_idx, seg_keys = inp
            carry, first = run(carry, seg_idx[:1], seg_keys[:1], refresh=True)
            carry, rest = run(carry, seg_idx[1:], seg_keys[1:], refresh=False)
            return carry, jnp.concatenate([first, rest])

        segments = (idx.reshape(-1, t, idx.shape[-1]), keys.reshape(-1, t, *keys.shape[1:]))
        (params, state), losses = jax.lax.scan(segment, (params, state), segments)
        return params, state, losses.reshape(-1)

    return chunk


def compile_chunk(method: Method, sizes: Sequence[int], params, x_all, y_all, steps: int,
                  batch: int):
    """AOT-compiles the chunk of ``method`` (params and state donated).

    Returns:
      ``(compiled, optimizer, initial state, compile seconds)``.
    """
    opt = make_optimizer(method, sizes)
    state = jax.jit(opt.init)(params)
    refresh_every = method.inverse_every if method.host_refresh else None
    fn = jax.jit(make_chunk(make_step(method, opt), refresh_every), donate_argnums=(0, 1))
    idx = jax.ShapeDtypeStruct((steps, batch), jnp.int32)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = fn.lower(params, state, x_all, y_all, idx, key).compile()
    return compiled, opt, state, time.perf_counter() - t0


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


# ---------------------------------------------------------------------------------- trainers


class Trainer(Protocol):
    """What :func:`train_interleaved` needs of a method.

    Attributes:
      params: the current parameters.
      compile_seconds: untimed set-up (compilation, warm-up).
      state_bytes: bytes of the optimiser state.
    """

    params: Params
    compile_seconds: float
    state_bytes: int

    def run_chunk(self, idx: jax.Array, key: jax.Array) -> jax.Array:
        """Trains on the minibatches ``idx`` (steps, batch); returns the per-step losses."""


class ScanTrainer:
    """A method whose steps are one AOT-compiled ``lax.scan`` per chunk (every optax method)."""

    def __init__(self, method: Method, sizes: Sequence[int], params0: Params, x_all: jax.Array,
                 y_all: jax.Array, *, chunk: int, batch: int):
        self.x_all, self.y_all = x_all, y_all
        self.compiled, _, self.state, self.compile_seconds = compile_chunk(
            method, sizes, params0, x_all, y_all, chunk, batch)
        self.state_bytes = tree_bytes(self.state)
        self.params = jax.tree.map(jnp.copy, params0)

    def run_chunk(self, idx: jax.Array, key: jax.Array) -> jax.Array:
        self.params, self.state, losses = self.compiled(
            self.params, self.state, self.x_all, self.y_all, idx, key)
        return losses


def scannable(method: Method) -> bool:
    """Whether ``method``'s steps compile into one scanned chunk (:func:`compile_chunk`): every
    optax method, but not a peer with its own step loop (kfac-jax)."""
    return not (method.family in peers.FAMILIES
                and hasattr(peers.get(method.family), "make_trainer"))


def make_trainer(method: Method, sizes: Sequence[int], params0: Params, x_all: jax.Array,
                 y_all: jax.Array, *, chunk: int, batch: int, seed: int = 0) -> Trainer:
    """The trainer of ``method``: a peer's own (``make_trainer`` in its module), else a
    :class:`ScanTrainer`."""
    if not scannable(method):
        return peers.get(method.family).make_trainer(method, sizes, params0, x_all, y_all,
                                                     chunk=chunk, batch=batch, seed=seed)
    return ScanTrainer(method, sizes, params0, x_all, y_all, chunk=chunk, batch=batch)


# ------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """Training/test arrays on device, plus their whitened versions when a method needs them."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    eval_idx: jax.Array
    white: dict | None = None  # {"x_train", "x_test", "seconds"}

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    def inputs(self, whiten: bool) -> tuple[jax.Array, jax.Array]:
        """The (training, test) inputs, whitened or not."""
        if whiten:
            return self.white["x_train"], self.white["x_test"]
        return self.x_train, self.x_test


def whiten_inputs(x_train: jax.Array, x_test: jax.Array, *,
                  fit_samples: int | None = WHITEN_FIT_SAMPLES, seed: int = 0,
                  reps: int = 5) -> dict:
    """WhiteNGD's preprocessing, timed.

    The whitening map (:func:`rfim_jax.whitening_map`, damped: ``eps = WHITEN_DAMPING tr(C)/d``)
    is fitted on ``fit_samples`` random training rows and applied to the training and test
    sets.  The fit and the training-set transform count as training time: ``seconds`` is the
    median of ``reps`` runs (a one-off cost timed alone, so a median guards it against the
    load spikes that the interleaved chunks share out); the compilation is not timed, as for
    every method.
    """
    n = x_train.shape[0]
    rows = None
    if fit_samples is not None and fit_samples < n:
        rng = np.random.default_rng(seed + 777)
        rows = jnp.asarray(np.sort(rng.choice(n, fit_samples, replace=False)), jnp.int32)

    def fit_and_apply(x, rows):
        fit = x if rows is None else x[rows]
        eps = WHITEN_DAMPING * jnp.sum(jnp.var(fit, axis=0)) / fit.shape[-1]
        big_a, a = rfim_jax.whitening_map(fit, eps=eps)
        return rfim_jax.apply_whitening(x, big_a, a), big_a, a

    compiled = jax.jit(fit_and_apply).lower(x_train, rows).compile()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        xw, big_a, a = jax.block_until_ready(compiled(x_train, rows))
        runs.append(time.perf_counter() - t0)
    xw_test = rfim_jax.apply_whitening(x_test, big_a, a)
    return {"x_train": xw.astype(x_train.dtype), "x_test": xw_test.astype(x_test.dtype),
            "seconds": float(np.median(runs)), "seconds_runs": runs,
            "fit_samples": n if rows is None else int(fit_samples)}


def load_data(data_dir: str | None = None, *, seed: int = 0, whiten: bool = True,
              train_size: int | None = None, arrays=None) -> Data:
    """Fashion-MNIST (or ``arrays = (x_train, y_train, x_test, y_test)``) on device, float32."""
    if arrays is None:
        arrays = data_lib.load_idx_dataset(data_dir)
    x_tr, y_tr, x_te, y_te = arrays
    if train_size is not None:
        x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]
    rng = np.random.default_rng(seed + 12345)
    eval_idx = rng.choice(len(x_tr), size=min(EVAL_SUBSET, len(x_tr)), replace=False)
    out = Data(
        jnp.asarray(x_tr, jnp.float32), jnp.asarray(y_tr, jnp.int32),
        jnp.asarray(x_te, jnp.float32), jnp.asarray(y_te, jnp.int32),
        jnp.asarray(np.sort(eval_idx), jnp.int32),
    )
    if whiten:
        out.white = whiten_inputs(out.x_train, out.x_test)
    return out


@jax.jit
def _evaluate(params, x, y):
    logits = mlp.mlp_apply(params, x)[0]
    return mlp.cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def evaluate(params, x, y) -> tuple[float, float]:
    """(Mean cross-entropy, accuracy) of the MLP ``params`` on ``(x, y)``."""
    loss, acc = _evaluate(params, x, y)
    return float(loss), float(acc)


def epoch_indices(rng: np.random.Generator, num_train: int, batch: int) -> np.ndarray:
    """A shuffled epoch as (steps, batch) indices (the remainder is dropped)."""
    steps = num_train // batch
    return rng.permutation(num_train)[: steps * batch].reshape(steps, batch).astype(np.int32)


# ---------------------------------------------------------------------------------- training


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


def train_interleaved(
    methods: Sequence[Method],
    data: Data,
    *,
    sizes: Sequence[int] = PAPER_SIZES,
    epochs: float = 10,
    batch: int = BATCH,
    chunk: int = CHUNK,
    seed: int = 0,
    progress: bool = True,
    on_round: Callable[[int, int, Mapping[str, dict]], None] | None = None,
) -> dict[str, dict]:
    """Trains every method on the same minibatches, one chunk each in turn.

    Args:
      methods: the configurations.
      data: the dataset (:func:`load_data`).
      sizes: the MLP's layer widths.
      epochs: training length (rounded to whole chunks).
      batch: minibatch size.
      chunk: steps per timed chunk; must divide the steps of an epoch.
      seed: seed of the initial parameters (shared) and the minibatch order.
      progress: show a tqdm bar.
      on_round: called as ``on_round(round, rounds, runs)`` after every round (one chunk of
        every method): where a caller streams rows and partial JSON.

    Returns:
      Per method: per-chunk wall and process-CPU seconds, the steps done after each chunk,
      the mean minibatch loss of each chunk, the loss on the fixed training subset and the
      test accuracy after each chunk, the full training loss and test accuracy after each
      epoch, compile and preprocessing seconds, optimiser state bytes.  A method that could
      not be built has ``"unavailable"`` (the reason) and nothing else measured; one that
      failed while training keeps what it measured and has ``"failed"``.

    Raises:
      ValueError: when ``chunk`` does not divide the steps of an epoch.
    """
    steps_per_epoch = data.num_train // batch
    if steps_per_epoch % chunk:
        raise ValueError(f"steps per epoch {steps_per_epoch} must be a multiple of chunk {chunk}")
    chunks_per_epoch = steps_per_epoch // chunk
    total_chunks = max(1, round(epochs * chunks_per_epoch))
    params0 = mlp.init_mlp(jax.random.PRNGKey(seed), sizes)
    params_bytes = tree_bytes(params0)

    runs, trainers = {}, {}
    y_eval = data.y_train[data.eval_idx]
    for m in methods:
        x_train, x_test = data.inputs(m.whiten)
        try:
            trainer = make_trainer(m, sizes, params0, x_train, data.y_train, chunk=chunk,
                                   batch=batch, seed=seed)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            runs[m.name] = {"method": m, "unavailable": _error(e)}
            continue
        loss0, _ = evaluate(trainer.params, x_train[data.eval_idx], y_eval)
        trainers[m.name] = trainer
        runs[m.name] = {
            "method": m, "x_train": x_train, "x_test": x_test, "x_eval": x_train[data.eval_idx],
            "prep_seconds": data.white["seconds"] if m.whiten else 0.0,
            "compile_seconds": trainer.compile_seconds,
            "state_bytes": trainer.state_bytes, "params_bytes": params_bytes,
            "chunk_seconds": [], "chunk_cpu_seconds": [], "steps": [0], "batch_loss": [],
            "eval_loss": [loss0], "eval_test_accuracy": [evaluate(trainer.params, x_test,
                                                                   data.y_test)[1]],
            "epoch_train_loss": [], "epoch_test_accuracy": [],
        }

    rng = np.random.default_rng(seed)
    order = list(trainers)
    bar = common.progress(total=total_chunks * len(order), enabled=progress, desc="train")
    idx_epoch = None
    for c in range(total_chunks):
        if c % chunks_per_epoch == 0:
            idx_epoch = epoch_indices(rng, data.num_train, batch)
        j = c % chunks_per_epoch
        idx = jnp.asarray(idx_epoch[j * chunk:(j + 1) * chunk])
        key = jax.random.PRNGKey(seed * 100_003 + c)
        order = order[1:] + order[:1]  # rotate who goes first
        for name in order:
            r, trainer = runs[name], trainers[name]
            if "failed" in r:
                continue
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                losses = np.asarray(jax.block_until_ready(trainer.run_chunk(idx, key)))
                r["chunk_seconds"].append(time.perf_counter() - t0)
                r["chunk_cpu_seconds"].append(time.process_time() - c0)
            except Exception as e:  # noqa: BLE001 - keep what was measured, report the rest
                r["failed"] = f"chunk {c}: {_error(e)}"
                continue
            r["steps"].append((c + 1) * chunk)
            r["batch_loss"].append(float(np.mean(losses)))
            r["eval_loss"].append(evaluate(trainer.params, r["x_eval"], y_eval)[0])
            r["eval_test_accuracy"].append(evaluate(trainer.params, r["x_test"],
                                                    data.y_test)[1])
            if (c + 1) % chunks_per_epoch == 0:
                r["epoch_train_loss"].append(evaluate(trainer.params, r["x_train"],
                                                      data.y_train)[0])
                r["epoch_test_accuracy"].append(r["eval_test_accuracy"][-1])
            bar.update(1)
        bar.set_postfix({n: f"{runs[n]['eval_loss'][-1]:.3f}" for n in trainers})
        if on_round is not None:
            on_round(c + 1, total_chunks, runs)
    bar.close()
    for name, trainer in trainers.items():
        r = runs[name]
        r["final_test_accuracy"] = evaluate(trainer.params, r["x_test"], data.y_test)[1]
        r["final_train_loss"] = evaluate(trainer.params, r["x_train"], data.y_train)[0]
        for k in ("x_train", "x_test", "x_eval"):
            r.pop(k)
    return runs


def time_to_target(run: Mapping, target: float) -> dict | None:
    """Seconds (training time + preprocessing) and steps until the subset loss <= target.

    With per-chunk test accuracies in ``run`` the test accuracy at that point comes too.
    """
    elapsed = run["prep_seconds"] + np.concatenate([[0.0], np.cumsum(run["chunk_seconds"])])
    acc = run.get("eval_test_accuracy")
    for i, (steps, t, loss) in enumerate(zip(run["steps"], elapsed, run["eval_loss"],
                                             strict=True)):
        if loss <= target:
            out = {"seconds": float(t), "steps": int(steps)}
            if acc is not None:
                out["test_accuracy"] = float(acc[i])
            return out
    return None


def summarise_runs(runs: Mapping[str, Mapping], chunk: int, steps_per_epoch: int,
                   targets: Sequence[float] = TARGETS) -> dict:
    """Per-step medians, ratios to Adam, times to targets, losses at 3 epochs.

    ``ratio_to_adam`` is the ratio of the median wall times per chunk;
    ``paired_ratio_to_adam`` the median over rounds of the ratio of the chunks run back to back
    in the same round; ``cpu_ratio_to_adam`` the ratio of median process CPU times (every
    thread's), which other jobs on a shared machine disturb less.  A method that did not run
    is reported as ``{"available": False, "reason": ...}``.
    """
    out = {}
    adam = runs.get("adam", {})
    has_adam = bool(adam.get("chunk_seconds"))
    for name, r in runs.items():
        s = {"description": _describe(r["method"]), "family": r["method"].family}
        if "unavailable" in r:
            out[name] = s | {"available": False, "reason": r["unavailable"]}
            continue
        sec = np.asarray(r["chunk_seconds"])
        s["available"] = True
        if "failed" in r:
            s["failed"] = r["failed"]
        if not len(sec):
            out[name] = s
            continue
        s |= {
            "median_ms_per_step": float(np.median(sec) / chunk * 1e3),
            "min_ms_per_step": float(np.min(sec) / chunk * 1e3),
            "compile_seconds": r["compile_seconds"],
            "prep_seconds": r["prep_seconds"],
            "train_seconds": float(sec.sum()),
        }
        if "state_bytes" in r:
            s["state_bytes"] = r["state_bytes"]
            s["state_to_params"] = r["state_bytes"] / r["params_bytes"]
        if has_adam:
            a = np.asarray(adam["chunk_seconds"])
            k = min(len(a), len(sec))
            s["ratio_to_adam"] = s["median_ms_per_step"] / float(np.median(a) / chunk * 1e3)
            s["paired_ratio_to_adam"] = float(np.median(sec[:k] / a[:k]))
            s["cpu_ratio_to_adam"] = float(np.median(r["chunk_cpu_seconds"]) /
                                           np.median(adam["chunk_cpu_seconds"]))
        for target in targets:
            s[f"time_to_{target}"] = time_to_target(r, target)
        epochs_done = len(r["epoch_train_loss"])
        s["train_loss_by_epoch"] = r["epoch_train_loss"]
        s["test_accuracy_by_epoch"] = r["epoch_test_accuracy"]
        s["train_loss_3_epochs"] = r["epoch_train_loss"][2] if epochs_done >= 3 else None
        at3 = 3 * steps_per_epoch
        s["subset_loss_3_epochs"] = (r["eval_loss"][r["steps"].index(at3)]
                                     if at3 in r["steps"] else None)
        s["final_subset_loss"] = r["eval_loss"][-1]
        s["final_train_loss"] = r.get("final_train_loss")
        s["final_test_accuracy"] = r.get("final_test_accuracy")
        out[name] = s
    return out


def _describe(method: Method) -> str:
    try:
        return method.describe()
    except Exception as e:  # noqa: BLE001 - a broken peer still gets a row
        return f"{method.family} ({_error(e)})"


def time_chunks(entries: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Runs each zero-argument timed callable ``reps`` times, interleaved and rotated."""
    times = {k: [] for k in entries}
    order = list(entries)
    for _ in range(reps):
        order = order[1:] + order[:1]
        for k in order:
            t0 = time.perf_counter()
            jax.block_until_ready(entries[k]())
            times[k].append(time.perf_counter() - t0)
    return times


def tune_learning_rates(methods: Sequence[Method], grids: Mapping[str, Sequence[float]],
                        data: Data, *, epochs: float = 3, sizes: Sequence[int] = PAPER_SIZES,
                        seed: int = 0, progress: bool = True) -> dict:
    """Lowest training-subset loss after ``epochs``, per method, over its family's grid.

    Methods whose family has no grid (kfac-jax adapts its own) are left out.
    """
    chosen, table = {}, {}
    for m in methods:
        grid = grids.get(m.name, grids.get(m.family))
        if not grid:
            continue
        trials = [dataclasses.replace(m, name=f"{m.name}@{lr:g}", learning_rate=lr)
                  for lr in grid]
        runs = train_interleaved(trials, data, sizes=sizes, epochs=epochs, seed=seed,
                                 progress=progress)
        losses = {t.learning_rate: (runs[t.name]["eval_loss"][-1]
                                    if "eval_loss" in runs[t.name] else float("nan"))
                  for t in trials}
        table[m.name] = losses
        finite = {k: v for k, v in losses.items() if np.isfinite(v)}
        chosen[m.name] = min(finite, key=finite.get) if finite else m.learning_rate
    return {"chosen": chosen, "losses": table}


# ----------------------------------------------------------------------------------- output


def versions(distributions: Sequence[str] = ("jax", "jaxlib", "optax", "flax", "numpy")) -> dict:
    """Installed versions of ``distributions`` and every peer's ("not installed" if absent)."""
    out = {"rfim_jax": rfim_jax.__version__}
    for dist in (*distributions, *peers.DISTRIBUTIONS):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class Recorder:
    """Streams rows to stdout and rewrites a JSON file after every row.

    The file holds ``{"config", "environment", "complete", ...results}``; ``complete`` turns
    true only in :meth:`finish`, so a run cut off by a time limit leaves a valid file with
    everything measured so far.  Writes are atomic (a temporary file, then a rename).

    Args:
      path: the JSON file.
      config: what the run was asked to do.
      digits: significant digits of floats in the file.
      stream: where rows are printed (default stdout); None prints nothing.
    """

    def __init__(self, path: str | os.PathLike, config: Any = None, *, digits: int | None = 5,
                 stream=sys.stdout):
        self.path = Path(path)
        self.config = config
        self.digits = digits
        self.stream = stream
        self.results: dict[str, Any] = {}
        self.environment = common.environment() | {"loadavg_start": os.getloadavg()}
        self.write()

    def print(self, text: str) -> None:
        """Prints ``text`` (flushed) to the stream."""
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def row(self, section: str, row: Mapping, text: str | None = None) -> None:
        """Appends ``row`` to the list ``section``, prints ``text``, writes the file."""
        self.results.setdefault(section, []).append(dict(row))
        if text is not None:
            self.print(text)
        self.write()

    def set(self, key: str, value: Any, text: str | None = None) -> None:
        """Sets ``results[key] = value``, prints ``text``, writes the file."""
        self.results[key] = value
        if text is not None:
            self.print(text)
        self.write()

    def write(self, complete: bool = False) -> Path:
        """Writes the file now; returns its path."""
        payload = {"config": self.config, "environment": self.environment,
                   "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": complete,
                   **self.results}
        text = json.dumps(common.to_jsonable(payload, digits=self.digits), indent=1) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        return self.path

    def finish(self) -> Path:
        """Marks the results complete and writes them (with the load average at the end)."""
        self.environment["loadavg_end"] = os.getloadavg()
        return self.write(complete=True)
