"""Fig. 5 of Sun & Nielsen (Sec. 5.2): a ReLU MLP trained by SGD, Adam and RNGD.

    python -m experiments.fig5            # --quick (default): 8x8 digits, 64-64-64-64-10
    python -m experiments.fig5 --full     # Fashion-MNIST, 784-64-64-64-10

Methods: SGD and Adam, each on PLAIN, BNA (batch norm after the relu) and BNB (batch norm
before it; epsilon 1e-3, learnt scale and shift, batch statistics while training), against
RNGD (:func:`rfim_jax.rngd`, T = 100, lambda = 0.995) on the PLAIN net with the paper's layer
kinds: the linear RFIM (eq. 22) on the input and softmax layers and the per-neuron relu RFIM
(eq. 23, smoothed relu with omega = 1 so nu = sigmoid(z)^2) on the hidden layers.

For each method a small learning-rate grid is run; the best rate is the one with the lowest
mean training cost over the last ``select_tau`` of the iterations.  Batch 100; the training cost
of iteration t is the mean cross-entropy of minibatch t, measured in the forward pass that
gives the gradient.  The tau-sharp ratio is the mean and std of that cost over the last
``tau * M`` iterations (M = all iterations).  Each epoch is one compiled ``lax.scan`` over
pre-shuffled minibatch indices, timed with ``block_until_ready`` after ahead-of-time
compilation and one untimed warm-up epoch, so the wall-clock axis excludes compilation (reported
separately).  On a shared machine the load drifts between runs, so the per-iteration costs
quoted in the table come from a separate round-robin pass (:func:`interleaved_timing`): one
epoch of each method in turn, ``timing_rounds`` times, median wall and process-CPU seconds.

Outputs (``--out``, default ``results/``): ``fig5.json`` (configuration, seeds, every run's
per-epoch costs and seconds, the best runs' smoothed curves, tau-sharp tables, test accuracies,
time to reach each cost target), ``fig5_summary.json`` (the same without the curves),
``fig5_costs.npz`` (every run's per-iteration costs) and ``fig5.png`` (cost against iterations
and against seconds, log scale, plus the table).  ``--lr-from`` repeats an earlier run's best
rates on another seed; ``--aggregate`` combines such runs into ``fig5_seeds.json`` (mean and std
across seeds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rfim_jax
from experiments import common, data
from experiments import models as mlp

SGD_METHODS = ("SGD-PLAIN", "SGD-BNA", "SGD-BNB")
ADAM_METHODS = ("ADAM-PLAIN", "ADAM-BNA", "ADAM-BNB")
ALL_METHODS = SGD_METHODS + ADAM_METHODS + ("RNGD",)
_BN_OF = {"PLAIN": "none", "BNA": "after", "BNB": "before"}

DEFAULT_LRS = {
    "SGD": (0.01, 0.03, 0.1, 0.3),
    "ADAM": (3e-4, 1e-3, 3e-3, 1e-2),
    "RNGD": (0.01, 0.03, 0.1, 0.3),
}


@dataclasses.dataclass
class Fig5Config:
    """Everything that defines a Fig. 5 run (written to the JSON)."""

    dataset: str = "digits"  # "digits" (sklearn, embedded) or "idx" (Fashion-MNIST / MNIST)
    data_dir: str | None = None
    sizes: tuple[int, ...] = (64, 64, 64, 64, 10)
    epochs: int = 100
    batch_size: int = 100
    train_size: int | None = None  # subsample the training set (None: all of it)
    seed: int = 0
    methods: tuple[str, ...] = ALL_METHODS
    # Keyed by family ("SGD", "ADAM", "RNGD") or by method ("SGD-BNA"), which takes precedence.
    lrs: dict[str, tuple[float, ...]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_LRS)
    )
    momentum: float = 0.9  # heavy-ball momentum of SGD and RNGD (Adam has its own)
    rngd_decay: float = 0.995
    rngd_inverse_every: int = 100
    rngd_damping: float = 1e-2
    bn_epsilon: float = mlp.BN_EPSILON
    taus: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5)
    select_tau: float = 0.1
    # Wall-clock to the first epoch whose mean training cost is at most each target.
    cost_targets: tuple[float, ...] = (0.2, 0.1, 0.05)
    smooth: int = 10
    timing_rounds: int = 5  # round-robin epochs per method for the per-iteration timing
    dtype: str = "float32"
    progress: bool = True
    out: str = common.DEFAULT_OUT
    name: str = "fig5"


def quick_config(**overrides) -> Fig5Config:
    """The embedded default: 8x8 digits, 64-64-64-64-10, 100 epochs (a few minutes on 2 cores)."""
    return dataclasses.replace(Fig5Config(), **overrides)


def full_config(**overrides) -> Fig5Config:
    """Paper scale on Fashion-MNIST: 784-64-64-64-10, batch 100, 100 epochs (60,000 iterations).

    21 minutes on 2 quiet CPU cores, 14 of them RNGD's three rates.
    """
    lrs = dict(DEFAULT_LRS)
    # Fashion-MNIST's 785-wide input block has small eigenvalues, so RNGD needs a smaller rate
    # than on the digits.  On seed 0, 0.05, 0.07 and 0.1 each diverged in the second epoch,
    # so the paper-scale grid stops at 0.03.
    lrs["RNGD"] = (0.003, 0.01, 0.03)
    base = Fig5Config(dataset="idx", sizes=(784, 64, 64, 64, 10), epochs=100, lrs=lrs)
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------ building blocks


def method_parts(method: str) -> tuple[str, str]:
    """``"SGD-BNA"`` -> ``("SGD", "after")``; ``"RNGD"`` -> ``("RNGD", "none")``."""
    if method == "RNGD":
        return "RNGD", "none"
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}.")
    family, arch = method.split("-")
    return family, _BN_OF[arch]


def lr_grid(cfg: Fig5Config, method: str) -> tuple[float, ...]:
    """The learning rates tried for ``method``: ``cfg.lrs[method]`` if given, else its family's."""
    family, _ = method_parts(method)
    return tuple(cfg.lrs[method] if method in cfg.lrs else cfg.lrs[family])


def best_lrs(path: str | Path) -> dict[str, tuple[float]]:
    """``{method: (best_lr,)}`` from an earlier run's ``fig5.json``: repeat it on more seeds
    without re-running the grid (``--lr-from``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lr-from: no results file at {path}; run experiments.fig5 "
                                "first and pass its fig5.json.")
    methods = json.loads(path.read_text())["summary"]["methods"]
    return {m: (float(e["best_lr"]),) for m, e in methods.items()}


def make_optimizer(method: str, cfg: Fig5Config, learning_rate: float
                   ) -> optax.GradientTransformationExtraArgs:
    """The method's optimiser with the learning rate as an injected hyperparameter.

    Injecting it lets one compiled epoch serve every rate of the grid.  Every optimiser
    accepts (and, but for RNGD, ignores) ``activations=``.
    """
    family, _ = method_parts(method)
    layers = mlp.rngd_layers(len(cfg.sizes) - 1, "relu")

    def factory(learning_rate):
        if family == "SGD":
            return optax.sgd(learning_rate, momentum=cfg.momentum or None)
        if family == "ADAM":
            return optax.adam(learning_rate)
        return rfim_jax.rngd(
            learning_rate,
            layers,
            momentum=cfg.momentum or None,
            decay=cfg.rngd_decay,
            inverse_every=cfg.rngd_inverse_every,
            damping=cfg.rngd_damping,
        )

    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def set_learning_rate(state, learning_rate: float):
    hp = dict(state.hyperparams)
    hp["learning_rate"] = jnp.asarray(learning_rate, hp["learning_rate"].dtype)
    return state._replace(hyperparams=hp)


def make_epoch(opt, batch_norm: str, epsilon: float):
    """``epoch((params, opt_state), idx (B, batch), x, y) -> (carry, costs (B,))``: a scan."""

    def step(carry, bidx, x, y):
        params, state = carry
        xb, yb = x[bidx], y[bidx]

        def loss_fn(p):
            logits, acts, _ = mlp.mlp_apply(p, xb, batch_norm=batch_norm, epsilon=epsilon)
            return mlp.cross_entropy(logits, yb), acts

        (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(grads, state, params, activations=acts)
        return (optax.apply_updates(params, updates), state), loss

    def epoch(carry, idx, x, y):
        return jax.lax.scan(lambda c, b: step(c, b, x, y), carry, idx)

    return jax.jit(epoch)


def smooth_blocks(costs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Averages over consecutive blocks of ``k`` iterations (the paper's smoothing).

    Returns ``(iteration at each block's end, block means)``; a trailing partial block is kept.
    """
    costs = np.asarray(costs, np.float64)
    m = len(costs)
    k = max(1, int(k))
    starts = np.arange(0, m, k)
    ends = np.minimum(starts + k, m)
    means = np.array([costs[s:e].mean() for s, e in zip(starts, ends, strict=True)])
    return ends, means


def load_data(cfg: Fig5Config):
    if cfg.dataset == "digits":
        x_tr, y_tr, x_te, y_te = data.load_digits(seed=cfg.seed)
    elif cfg.dataset == "idx":
        x_tr, y_tr, x_te, y_te = data.load_idx_dataset(cfg.data_dir)
    else:
        raise ValueError(f"dataset must be 'digits' or 'idx', got {cfg.dataset!r}.")
    if cfg.train_size is not None:
        x_tr, y_tr = data.subsample(x_tr, y_tr, cfg.train_size, seed=cfg.seed)
    if x_tr.shape[1] != cfg.sizes[0]:
        raise ValueError(
            f"the data have {x_tr.shape[1]} features but sizes[0] = {cfg.sizes[0]}; use "
            f"sizes=({x_tr.shape[1]}, ...)."
        )
    return x_tr, y_tr, x_te, y_te


# ----------------------------------------------------------------------------------- one run


def train_one(method: str, lr: float, cfg: Fig5Config, compiled, opt, arrays, *, bar=None
              ) -> dict:
    """Trains one (method, lr) for ``cfg.epochs`` epochs; returns costs, seconds, accuracies."""
    _, batch_norm = method_parts(method)
    x_tr, y_tr, x_te, y_te = arrays
    dtype = jnp.dtype(cfg.dtype)
    params = mlp.init_mlp(jax.random.PRNGKey(cfg.seed), cfg.sizes, batch_norm=batch_norm,
                          dtype=dtype)
    carry = (params, set_learning_rate(opt.init(params), lr))
    n = x_tr.shape[0]
    costs, epoch_seconds, epoch_cpu = [], [], []
    diverged = False
    for e in range(cfg.epochs):
        idx = jnp.asarray(np.stack(data.minibatch_indices(n, cfg.batch_size, seed=cfg.seed,
                                                          epoch=e)), jnp.int32)
        idx.block_until_ready()
        t0, c0 = time.perf_counter(), time.process_time()
        carry, c = compiled(carry, idx, x_tr, y_tr)
        c = np.asarray(jax.block_until_ready(c))
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_cpu.append(time.process_time() - c0)
        costs.append(c)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=method, lr=lr, cost=f"{c.mean():.3g}")
        if not np.all(np.isfinite(c)):
            diverged = True
            if bar is not None:
                # Say it: a bar ending on cost=nan reads like a finished run.
                bar.set_postfix(method=method, lr=lr, cost="diverged")
                bar.write(f"{method} at lr={lr} diverged in epoch {e + 1} (non-finite cost); "
                          f"this grid point is excluded from the learning-rate choice.")
                bar.update(cfg.epochs - e - 1)
            break
    costs = np.concatenate(costs).astype(np.float64)
    params = carry[0]
    out = {
        "lr": lr,
        "diverged": diverged,
        "epochs_run": len(epoch_seconds),
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu,
        "epoch_mean_cost": costs.reshape(len(epoch_seconds), -1).mean(axis=1),
        "costs": costs,
    }
    m_total = cfg.epochs * (n // cfg.batch_size)
    window = max(1, math.ceil(cfg.select_tau * m_total - 1e-9))
    out["select_score"] = (float("inf") if diverged else float(costs[-window:].mean()))
    if not diverged:
        stats = mlp.population_stats(params, x_tr, batch_norm=batch_norm, epsilon=cfg.bn_epsilon)
        out["train_accuracy"] = mlp.accuracy(params, x_tr, y_tr, batch_norm=batch_norm,
                                             bn_stats=stats)
        out["test_accuracy"] = mlp.accuracy(params, x_te, y_te, batch_norm=batch_norm,
                                            bn_stats=stats)
        logits = mlp.mlp_apply(params, x_te, batch_norm=batch_norm, bn_stats=stats or None)[0]
        out["test_cost"] = float(mlp.cross_entropy(logits, y_te))
    if method == "RNGD":
        rngd_state = carry[1].inner_state[0]
        out["rngd_skipped"] = {k: int(v) for k, v in rngd_state.skipped.items()}
        out["rngd_fallbacks"] = {k: int(v) for k, v in rngd_state.fallbacks.items()}
    return out


# ------------------------------------------------------------------------------------ the run


def run(cfg: Fig5Config) -> dict:
    """Runs every method over its learning-rate grid; writes ``{name}.json`` and ``{name}.png``.

    Returns the results dict (as written, before JSON conversion) with the paths under
    ``"files"``.
    """
    for method in cfg.methods:
        method_parts(method)
    x_tr, y_tr, x_te, y_te = load_data(cfg)
    dtype = jnp.dtype(cfg.dtype)
    arrays = (jnp.asarray(x_tr, dtype), jnp.asarray(y_tr, jnp.int32),
              jnp.asarray(x_te, dtype), jnp.asarray(y_te, jnp.int32))
    n = x_tr.shape[0]
    batches = n // cfg.batch_size
    if batches < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training samples.")
    total_iters = cfg.epochs * batches

    runs: dict[str, list[dict]] = {}
    compile_seconds: dict[str, float] = {}
    executables: dict[str, tuple] = {}
    num_runs = sum(len(lr_grid(cfg, m)) for m in cfg.methods)
    with common.progress(total=num_runs * cfg.epochs, enabled=cfg.progress,
                         desc="fig5 epochs") as bar:
        for method in cfg.methods:
            family, batch_norm = method_parts(method)
            grid = lr_grid(cfg, method)
            opt = make_optimizer(method, cfg, grid[0])
            epoch_fn = make_epoch(opt, batch_norm, cfg.bn_epsilon)
            params0 = mlp.init_mlp(jax.random.PRNGKey(cfg.seed), cfg.sizes,
                                   batch_norm=batch_norm, dtype=dtype)
            idx0 = jnp.zeros((batches, cfg.batch_size), jnp.int32)
            t0 = time.perf_counter()
            compiled = epoch_fn.lower((params0, opt.init(params0)), idx0, arrays[0],
                                      arrays[1]).compile()
            compile_seconds[method] = time.perf_counter() - t0
            # One untimed epoch first: the first execution pays one-off costs (allocation,
            # thread pools) that would otherwise land on the first timed epoch.
            warm = compiled((params0, opt.init(params0)), idx0, arrays[0], arrays[1])
            jax.block_until_ready(warm)
            runs[method] = [train_one(method, lr, cfg, compiled, opt, arrays, bar=bar)
                            for lr in grid]
            executables[method] = (compiled, opt, params0, idx0)
    timing = interleaved_timing(executables, cfg, arrays)

    summary = summarise(runs, cfg, total_iters, compile_seconds, timing)
    out_dir = Path(cfg.out)
    png = plot(summary, runs, cfg, out_dir / f"{cfg.name}.png")
    results = {
        "paper": "Sun & Nielsen, arXiv 1606.06069, Fig. 5 (Sec. 5.2)",
        "data": {"dataset": cfg.dataset, "n_train": n, "n_test": int(x_te.shape[0]),
                 "iterations_per_epoch": batches, "total_iterations": total_iters},
        "seeds": {"init": cfg.seed, "shuffle": cfg.seed, "split": cfg.seed},
        "summary": summary,
        "interleaved_timing": timing,
        "runs": {m: [{k: v for k, v in r.items() if k != "costs"} for r in rs]
                 for m, rs in runs.items()},
        "best_costs_per_iteration": (
            {m: runs[m][summary["methods"][m]["best_index"]]["costs"] for m in runs}
            if total_iters <= 20000 else "omitted (> 20000 iterations); see smoothed curves"
        ),
    }
    path = common.write_json(out_dir / f"{cfg.name}.json", results,
                             config=dataclasses.asdict(cfg), digits=6)
    # Every run's raw per-iteration costs, to re-plot or re-analyse without re-training.
    npz = out_dir / f"{cfg.name}_costs.npz"
    np.savez_compressed(npz, **{f"{m}|{r['lr']}|costs": r["costs"] for m, rs in runs.items()
                                for r in rs},
                        **{f"{m}|{r['lr']}|epoch_seconds": np.asarray(r["epoch_seconds"])
                           for m, rs in runs.items() for r in rs})
    small = write_compact_summary(path, out_dir / f"{cfg.name}_summary.json")
    results["files"] = {"json": str(path), "png": str(png), "npz": str(npz),
                        "summary": str(small)}
    return results


def write_compact_summary(json_path: str | Path, out_path: str | Path) -> Path:
    """A small copy of ``fig5.json`` without the curves: the one to commit next to a figure.

    Keeps the configuration, environment, data, seeds, the per-method summary (tau-sharp,
    accuracies, timings, time to cost), the interleaved timing, and each run's scalars.
    """
    blob = json.loads(Path(json_path).read_text())
    small = {k: blob[k] for k in ("config", "environment", "written_at", "paper", "data", "seeds",
                                  "interleaved_timing") if k in blob}
    summary = dict(blob["summary"])
    summary["methods"] = {m: {k: v for k, v in e.items() if k != "smoothed"}
                          for m, e in summary["methods"].items()}
    small["summary"] = summary
    small["runs"] = {m: [{k: v for k, v in r.items()
                          if k not in ("epoch_seconds", "epoch_cpu_seconds", "epoch_mean_cost")}
                         for r in rs] for m, rs in blob["runs"].items()}
    out_path = Path(out_path)
    out_path.write_text(json.dumps(small, indent=1) + "\n")
    return out_path


def summarise(runs: dict, cfg: Fig5Config, total_iters: int, compile_seconds: dict,
              timing: dict) -> dict:
    """Best lr per method, its tau-sharp table, accuracies and timings."""
    methods = {}
    for method, rs in runs.items():
        scores = [r["select_score"] for r in rs]
        best = int(np.argmin(scores))
        r = rs[best]
        costs = r["costs"]
        it, smoothed = smooth_blocks(costs, cfg.smooth)
        secs = np.asarray(r["epoch_seconds"])
        iters_per_epoch = total_iters // cfg.epochs
        # Iteration j of epoch e ends at cumsum(seconds)[e-1] + (j + 1)/B * seconds[e].
        t_iter = (np.concatenate([[0.0], np.cumsum(secs)[:-1]])[:, None]
                  + secs[:, None] * (np.arange(1, iters_per_epoch + 1) / iters_per_epoch))
        t_iter = t_iter.reshape(-1)[: len(costs)]
        entry = {
            "best_lr": r["lr"],
            "best_index": best,
            "diverged": r["diverged"],
            "lr_scores": {str(x["lr"]): x["select_score"] for x in rs},
            "final_epoch_cost": float(r["epoch_mean_cost"][-1]),
            "train_accuracy": r.get("train_accuracy"),
            "test_accuracy": r.get("test_accuracy"),
            "test_cost": r.get("test_cost"),
            "seconds_per_epoch_median": float(np.median(secs)),
            "seconds_per_iteration_median": float(np.median(secs) / iters_per_epoch),
            "cpu_seconds_per_epoch_median": float(np.median(r["epoch_cpu_seconds"])),
            "interleaved_seconds_per_iteration": timing[method]["seconds_per_iteration"],
            "interleaved_cpu_seconds_per_iteration": timing[method]["cpu_seconds_per_iteration"],
            "total_train_seconds": float(secs.sum()),
            "time_to_cost": time_to_cost(r["epoch_mean_cost"], secs, cfg.cost_targets),
            "compile_seconds": compile_seconds[method],
            "smoothed": {"iteration": it, "cost": smoothed,
                         "seconds": t_iter[it - 1]},
        }
        if not r["diverged"]:
            entry["tau_sharp"] = common.tau_sharp_ratio(costs, cfg.taus)
        methods[method] = entry
    sgd_like = [m for m in methods if m != "RNGD"]
    ratios = None
    if "RNGD" in methods and sgd_like:
        rngd = timing["RNGD"]["seconds_per_iteration"]
        ratios = {m: rngd / timing[m]["seconds_per_iteration"] for m in sgd_like}
    return {"methods": methods, "rngd_time_per_iteration_ratio_interleaved": ratios,
            "timing_rounds": cfg.timing_rounds, "taus": list(cfg.taus),
            "select_tau": cfg.select_tau}


def time_to_cost(epoch_mean_cost: Sequence[float], epoch_seconds: Sequence[float],
                 targets: Sequence[float]) -> dict[str, dict | None]:
    """For each target: the first epoch whose mean training cost is ``<= target``, and the
    training seconds up to the end of it (``None`` if never reached).

    This is the wall-clock comparison the paper leaves out: RNGD needs fewer epochs, each
    costing more.
    """
    cost = np.asarray(epoch_mean_cost, dtype=np.float64)
    elapsed = np.cumsum(np.asarray(epoch_seconds, dtype=np.float64))
    out = {}
    for target in targets:
        hit = np.flatnonzero(cost <= target)
        out[str(target)] = (None if hit.size == 0 else
                            {"epoch": int(hit[0]) + 1, "seconds": float(elapsed[hit[0]])})
    return out


def aggregate_seeds(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict:
    """Combines runs of the same methods on different seeds (``--aggregate``).

    Each directory holds a ``fig5.json`` and ``fig5_costs.npz`` written by :func:`run`.  Per
    method, the best-rate cost curves of the R seeds are stacked to (R, M) and passed to
    :func:`common.tau_sharp_ratio`, so each tau's ``mean`` and ``std`` are across the seeds'
    window means; test accuracies get the same mean and std.  Writes ``fig5_seeds.json`` to
    ``out`` (default: the first directory) and returns its contents.
    """
    if not dirs:
        raise ValueError("--aggregate: give at least one directory holding a fig5.json.")
    payloads, costs = [], []
    for d in map(Path, dirs):
        if not (d / "fig5.json").is_file() or not (d / "fig5_costs.npz").is_file():
            raise FileNotFoundError(f"--aggregate: {d} has no fig5.json and fig5_costs.npz; "
                                    "run experiments.fig5 with --out there first.")
        payloads.append(json.loads((d / "fig5.json").read_text()))
        with np.load(d / "fig5_costs.npz") as raw:
            costs.append(dict(raw))
    methods = list(payloads[0]["summary"]["methods"])
    for d, p in zip(dirs, payloads, strict=True):
        if list(p["summary"]["methods"]) != methods:
            raise ValueError(f"--aggregate: {d} ran methods {list(p['summary']['methods'])}, "
                             f"expected {methods}.")
    taus = payloads[0]["summary"]["taus"]
    table = {}
    for m in methods:
        entries = [p["summary"]["methods"][m] for p in payloads]
        curves = np.stack([c[f"{m}|{e['best_lr']}|costs"]
                           for c, e in zip(costs, entries, strict=True)])
        acc = np.asarray([e["test_accuracy"] for e in entries], dtype=np.float64)
        table[m] = {
            "lrs": [e["best_lr"] for e in entries],
            "tau_sharp": {str(t): v for t, v in common.tau_sharp_ratio(curves, taus).items()},
            "test_accuracy": {"mean": float(acc.mean()), "std": float(acc.std()),
                              "per_seed": acc.tolist()},
        }
    result = {"dirs": [str(d) for d in dirs],
              "seeds": [p["seeds"]["init"] for p in payloads],
              "taus": taus, "methods": table}
    path = Path(out) if out is not None else Path(dirs[0])
    result["file"] = str(common.write_json(path / "fig5_seeds.json", result, digits=6))
    return result


def interleaved_timing(executables: dict, cfg: Fig5Config, arrays) -> dict:
    """Seconds per iteration of each method, timed round-robin (one epoch each per round).

    The training runs above are timed where they happen to fall; on a shared machine the
    load changes between them.  Alternating the methods exposes them to the same load, so
    these medians are the fair per-iteration cost comparison (wall and process CPU time).
    """
    wall = {m: [] for m in executables}
    cpu = {m: [] for m in executables}
    carries = {m: (p0, opt.init(p0)) for m, (_, opt, p0, _) in executables.items()}
    n = arrays[0].shape[0]
    for r in range(cfg.timing_rounds):
        idx = jnp.asarray(np.stack(data.minibatch_indices(n, cfg.batch_size, seed=cfg.seed,
                                                          epoch=r)), jnp.int32)
        for m, (compiled, _, _, _) in executables.items():
            t0, c0 = time.perf_counter(), time.process_time()
            carries[m], c = compiled(carries[m], idx, arrays[0], arrays[1])
            jax.block_until_ready(c)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    iters = n // cfg.batch_size
    return {m: {"seconds_per_iteration": float(np.median(wall[m]) / iters),
                "cpu_seconds_per_iteration": float(np.median(cpu[m]) / iters),
                "epoch_seconds": wall[m], "epoch_cpu_seconds": cpu[m]} for m in executables}


def tau_table_markdown(summary: dict) -> str:
    """The tau-sharp table as markdown: mean ± std of the training cost per tau."""
    taus = summary["taus"]
    head = "| method | lr | " + " | ".join(f"tau={t}" for t in taus) + " | test acc |"
    lines = [head, "|" + "---|" * (len(taus) + 3)]
    for m, e in summary["methods"].items():
        cells = []
        for t in taus:
            ts = e.get("tau_sharp", {}).get(t) or e.get("tau_sharp", {}).get(str(t))
            cells.append("diverged" if ts is None else f"{ts['mean']:.4g} ± {ts['std']:.2g}")
        acc = e.get("test_accuracy")
        acc_s = "-" if acc is None else f"{acc:.4f}"
        lines.append(f"| {m} | {e['best_lr']:g} | " + " | ".join(cells) + f" | {acc_s} |")
    return "\n".join(lines)


def seeds_table_markdown(agg: dict) -> str:
    """The :func:`aggregate_seeds` table as markdown: mean ± std across seeds."""
    taus = agg["taus"]
    lines = [f"| method ({len(agg['seeds'])} seeds) | lr | "
             + " | ".join(f"tau={t}" for t in taus) + " | test acc |",
             "|" + "---|" * (len(taus) + 3)]
    for m, e in agg["methods"].items():
        lrs = sorted(set(e["lrs"]))
        cells = [f"{e['tau_sharp'][str(t)]['mean']:.3g} ± {e['tau_sharp'][str(t)]['std']:.2g}"
                 for t in taus]
        acc = e["test_accuracy"]
        lines.append(f"| {m} | {', '.join(f'{x:g}' for x in lrs)} | " + " | ".join(cells)
                     + f" | {acc['mean']:.4f} ± {acc['std']:.4f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ figure

_STYLE = {
    "SGD-PLAIN": ("tab:blue", "-"), "SGD-BNA": ("tab:blue", "--"), "SGD-BNB": ("tab:blue", ":"),
    "ADAM-PLAIN": ("tab:green", "-"), "ADAM-BNA": ("tab:green", "--"),
    "ADAM-BNB": ("tab:green", ":"), "RNGD": ("tab:red", "-"),
}


def plot(summary: dict, runs: dict, cfg: Fig5Config, path: Path, *, dpi: int = 100) -> Path:
    """Cost against iterations and against seconds (best lr per method), and the tau table."""
    plt = common.pyplot()
    fig = plt.figure(figsize=(14, 9))
    gs = fig.add_gridspec(2, 2, height_ratios=[1.6, 1])
    ax_it, ax_t = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
    ax_tab = fig.add_subplot(gs[1, :])
    for m, e in summary["methods"].items():
        color, ls = _STYLE.get(m, (None, "-"))
        sm = e["smoothed"]
        label = f"{m} (lr={e['best_lr']:g})"
        ax_it.plot(sm["iteration"], sm["cost"], color=color, ls=ls, lw=1.2, label=label)
        ax_t.plot(sm["seconds"], sm["cost"], color=color, ls=ls, lw=1.2, label=label)
    net = "-".join(str(s) for s in cfg.sizes)
    data_name = "8x8 digits" if cfg.dataset == "digits" else Path(
        cfg.data_dir or data.DEFAULT_FASHION_DIR).name
    for ax, xl in ((ax_it, "iteration"),
                   (ax_t, "wall-clock seconds of training (log scale; compilation excluded)")):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(f"training cost (minibatch cross-entropy, mean over {cfg.smooth} iters)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    ax_t.set_xscale("log")
    ax_it.set_title(f"{data_name}, ReLU MLP {net}, batch {cfg.batch_size}, {cfg.epochs} epochs")
    ax_t.set_title("the same runs against training time")
    ax_tab.axis("off")
    taus = summary["taus"]
    rows, cells = [], []
    for m, e in summary["methods"].items():
        rows.append(f"{m} (lr={e['best_lr']:g})")
        row = []
        for t in taus:
            ts = e.get("tau_sharp", {}).get(t)
            row.append("diverged" if ts is None else f"{ts['mean']:.3g} ± {ts['std']:.2g}")
        acc = e.get("test_accuracy")
        row.append("-" if acc is None else f"{acc:.4f}")
        row.append(f"{e['interleaved_seconds_per_iteration'] * 1e3:.3g}")
        cells.append(row)
    table = ax_tab.table(cellText=cells, rowLabels=rows,
                         colLabels=[f"τ = {t}" for t in taus]
                         + ["test accuracy", "ms / iteration (interleaved)"],
                         loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.4)
    ax_tab.set_title("τ-sharp ratio: training cost over the last τM of M iterations "
                     "(mean ± std over those iterations)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path, dpi=dpi)


# -------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=common.positive_int, default=None,
                        help="override the epoch count")
    parser.add_argument("--aggregate", nargs="+", type=common.existing_path, default=None,
                        metavar="DIR",
                        help="combine earlier runs on different seeds (directories holding "
                             "fig5.json) into <--out>/fig5_seeds.json, and print the table")
    parser.add_argument("--lr-from", type=common.existing_path, default=None,
                        metavar="FIG5_JSON",
                        help="run only each method's best rate from an earlier fig5.json "
                             "(e.g. to repeat the best runs on other seeds)")
    args = parser.parse_args(argv)
    if args.aggregate is not None:
        agg = aggregate_seeds(args.aggregate, args.out)
        print(seeds_table_markdown(agg))
        print(f"wrote {agg['file']}")
        return agg
    overrides = {"seed": args.seed, "out": args.out, "progress": not args.no_progress}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.lr_from is not None:
        chosen = best_lrs(args.lr_from)
        overrides["methods"] = tuple(chosen)
        overrides["lrs"] = chosen
    cfg = full_config(**overrides) if args.full else quick_config(**overrides)
    common.check_data_dir(parser, args, cfg.dataset == "idx")
    t0 = time.perf_counter()
    results = run(cfg)
    print(tau_table_markdown(results["summary"]))
    for m, e in results["summary"]["methods"].items():
        print(f"{m:11s} lr={e['best_lr']:<7g} s/epoch={e['seconds_per_epoch_median']:.3f} "
              f"interleaved ms/iter={e['interleaved_seconds_per_iteration'] * 1e3:.3g} "
              f"(cpu {e['interleaved_cpu_seconds_per_iteration'] * 1e3:.3g}) "
              f"compile={e['compile_seconds']:.1f}s test_acc={e['test_accuracy']}")
    print(f"wrote {results['files']['json']} and {results['files']['png']} "
          f"in {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
