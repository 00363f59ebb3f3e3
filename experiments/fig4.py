"""Paper Fig. 4 (Sec. 5.1): one sigmoid neuron (logistic regression), GD v WhiteGD v NGD v WhiteNGD.

Model (eq. 28): ``p(y = 1) = s(theta^T z)``, ``z = [A (x - a), 1]``, trained on the mean
cross-entropy (eq. 29).  Methods:

- **GD**: ``A = I, a = 0``; the optimiser gets the gradient.
- **WhiteGD**: ``(A, a)`` from :func:`rfim_jax.whitening_map` on the training
  inputs (ZCA; singular directions such as constant pixels map to 0); gradient.
- **NGD**: ``A = I, a = 0``; the optimiser gets the relative natural gradient of eq. (30),
  ``(g + eps I)^-1 grad L`` with ``g = mean_i nu_sigmoid(theta^T z_i) z_i z_i^T`` on the
  minibatch and ``eps = 1e-2 tr(g) / D``, recomputed every step.
- **WhiteNGD**: both.

Every method uses ``optax.sgd(lr, momentum)`` (constant learning rate, heavy-ball momentum) on
top of its direction; the grid is lr in {1e-2, 1e-1, 1, 10, 100} x momentum in {0, 0.8}.
Momentum 0 runs as ``optax.trace`` with decay 0, which is exactly plain SGD, so the whole grid
shares one optimiser structure and is vmapped.

Choices the paper leaves open (recorded in the JSON config):

- **Batch size 50**, reshuffled every epoch; the last ``n mod 50`` rows of each epoch's
  permutation are skipped (they differ between epochs).  One epoch is ``n // 50`` steps.
  ``--batch-size full`` takes full-batch steps instead (one per epoch).  The paper does not
  say which it used, and the choice decides the outcome: with full batches eq. (30) is a
  damped Newton step on the training loss and NGD/WhiteNGD reach far deeper than GD/WhiteGD
  (as in the paper); with batches of 50 in D = 785 every minibatch is separable, its Newton
  step overshoots, NGD diverges for lr >= 0.1 and is no better than GD.  Full batches at
  n = 12,000 cost ~1.5e10 flops per step and grid point, beyond two CPU cores, so ``--full``
  keeps batches of 50 and the full-batch variant is run with ``--batch-size full --runs 3
  --sizes 'fashion=1000;digits=100,all'`` (see README).
- **Curves** are the training cross-entropy on the whole training set at the end of every
  epoch (epoch 0 = initialisation); the misclassification rate is recorded as well.  The best
  configuration per method is the one with the lowest *mean final training cross-entropy*
  over the runs.  A configuration with a non-finite loss in any run at any epoch is marked
  diverged and excluded from "best".
- **Runs** differ in the initialisation ``theta ~ N(0, 0.01^2)`` and in the minibatch order; the
  training subset and the test set are fixed by ``--seed``.  The whitening map is computed on
  the training subset.
- **Metric solve.** For ``D <= 256`` (the 8x8 digits, D = 65) the damped metric is built with
  :func:`rfim_jax.neuron_rfim`, damped with ``add_damping(..., relative=True)`` and solved
  with ``spd_solve``, as in eq. (30).  For Fashion-MNIST (D = 785) forming and factoring a
  (785, 785) matrix costs ~2e8 flops, for each of 24,000 steps (n = 12,000) times 100 runs
  and grid points: ~5e14 flops per method and size, hours on two CPU cores.  So there
  ``solver="woodbury"`` applies the *same* eq. (30) through the push-through identity: with
  ``U = [sqrt(nu_i / B) z_i]`` (D x B), ``g = U U^T`` and

      (g + eps I)^-1 v = (v - U (eps I_B + U^T U)^-1 U^T v) / eps,

  a (B, B) solve (again ``spd_solve``) whose Gram ``Z Z^T`` is shared by the grid: ~1e5
  flops per step and grid point besides the shared Gram.  Both solvers are tested against a
  direct numpy evaluation of eq. (30).
- float64 throughout (``jax_enable_x64``): eq. (30)'s damped metric has a condition number up
  to ``1 + 100 D``.

Run ``python -m experiments.fig4`` (``--quick``, the default: the digits tasks, fewer epochs,
runs and grid points, about a minute) or ``--full`` (all four tasks, 100 epochs, 10 runs,
full grid; measured: 25 minutes of CPU time, 53 minutes wall-clock on a 2-core machine
shared with other jobs).  Writes ``<out>/fig4.json`` (config, every run's curve, best
configuration per method), ``<out>/fig4_summary.json`` (the same without the curves) and
``<out>/fig4.png``; :func:`plot_from_json` redraws the figure from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common, data
from rfim_jax import Sigmoid, add_damping, apply_whitening, neuron_rfim, spd_solve, whitening_map

METHODS = ("GD", "WhiteGD", "NGD", "WhiteNGD")
METHOD_COLORS = {"GD": "C0", "WhiteGD": "C1", "NGD": "C2", "WhiteNGD": "C3"}
DENSE_MAX_DIM = 256


@dataclasses.dataclass
class Fig4Config:
    """Everything that defines a Fig. 4 run; written into the JSON."""

    tasks: tuple[str, ...] = ("digits_3v5", "digits_4v9")
    # Training-set sizes per data set; None means the whole training split of the pair.
    train_sizes: dict = dataclasses.field(
        default_factory=lambda: {"fashion": (1000, None), "digits": (100, None)}
    )
    epochs: int = 100
    num_runs: int = 10
    learning_rates: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0)
    momentums: tuple[float, ...] = (0.0, 0.8)
    methods: tuple[str, ...] = METHODS
    batch_size: int | None = 50  # None: full batch (one step per epoch)
    damping: float = 1e-2  # eps0 of eq. (30)
    init_scale: float = 1e-2
    whitening_rtol: float | None = None  # None: the library default d * machine epsilon
    solver: str = "auto"  # "auto", "dense" or "woodbury"
    seed: int = 0
    data_dir: str | None = None
    out: str = common.DEFAULT_OUT
    progress: bool = True
    save_runs: bool = True  # every run's curve in the JSON
    plot_dpi: int = 100


def quick_config(**overrides) -> Fig4Config:
    """Digits only, 50 epochs, 3 runs, lr in {0.1, 1, 10}: about a minute on 2 CPU cores."""
    cfg = dict(epochs=50, num_runs=3, learning_rates=(0.1, 1.0, 10.0))
    cfg.update(overrides)
    return Fig4Config(**cfg)


def full_config(**overrides) -> Fig4Config:
    """Paper scale: the two Fashion-MNIST pairs and the two digits pairs, 100 epochs, 10 runs."""
    cfg = dict(tasks=("fashion_shirt_v_tshirt", "fashion_pullover_v_coat",
                      "digits_3v5", "digits_4v9"))
    cfg.update(overrides)
    return Fig4Config(**cfg)


# ---------------------------------------------------------------------------- the model


def logits(params: dict, x: jax.Array) -> jax.Array:
    """``theta^T [x, 1]`` for params ``{"kernel": (d_in,), "bias": ()}``."""
    return x @ params["kernel"] + params["bias"]


def cross_entropy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of eq. (29), ``mean_i softplus(l_i) - y_i l_i`` (stable form)."""
    l = logits(params, x)
    return jnp.mean(jax.nn.softplus(l) - y * l)


def _to_vec(params: dict) -> jax.Array:
    return jnp.concatenate([params["kernel"], params["bias"][..., None]], axis=-1)


def _from_vec(vec: jax.Array) -> dict:
    return {"kernel": vec[..., :-1], "bias": vec[..., -1]}


def choose_solver(solver: str, dim: int, batch_size: int) -> str:
    """``"auto"`` -> ``"woodbury"`` when ``D > 256`` and the batch is smaller than D, else
    ``"dense"``."""
    if solver not in ("auto", "dense", "woodbury"):
        raise ValueError(f"solver must be 'auto', 'dense' or 'woodbury', got {solver!r}.")
    if solver == "auto":
        return "woodbury" if dim > DENSE_MAX_DIM and batch_size < dim else "dense"
    return solver


def natural_gradient(
    params: dict, grads: dict, xb: jax.Array, *, damping: float = 1e-2, solver: str = "dense"
) -> dict:
    """Eq. (30)'s direction ``(g + eps I)^-1 grad`` for a stack of sigmoid neurons.

    Args:
      params, grads: ``{"kernel": (S, G, d_in), "bias": (S, G)}``: S minibatches (runs), each
        shared by G neurons (grid points).
      xb: the minibatches, (S, B, d_in).
      damping: eps0; ``eps = eps0 tr(g) / D`` with ``D = d_in + 1``.
      solver: ``"dense"`` builds ``g`` with :func:`rfim_jax.neuron_rfim` (eq. 21) and solves
        with ``spd_solve``; ``"woodbury"`` solves the same system through a (B, B) capacitance
        matrix (see the module docstring).

    The (S G) solves are one stacked ``spd_solve`` call, outside any vmap, so that the solver
    library, not vmap, decides how they are batched.
    """
    s_dim, g_dim = params["bias"].shape
    v = _to_vec(grads)
    d = v.shape[-1]
    if solver == "dense":
        per_neuron = jax.vmap(lambda p, x: neuron_rfim(p, x, "sigmoid"), in_axes=(0, None))
        g = jax.vmap(per_neuron)(params, xb)  # (S, G, D, D)
        g = add_damping(g.reshape(-1, d, d), damping, relative=True)
        return _from_vec(spd_solve(g, v.reshape(-1, d)).reshape(s_dim, g_dim, d))
    if solver != "woodbury":
        raise ValueError(f"solver must be 'dense' or 'woodbury', got {solver!r}.")
    xt = jnp.concatenate([xb, jnp.ones(xb.shape[:-1] + (1,), xb.dtype)], -1)  # x~ (S, B, D)
    batch = xt.shape[1]
    nu = Sigmoid().nu(jnp.einsum("sbd,sgd->sgb", xt, _to_vec(params)))  # (S, G, B)
    gram = jnp.einsum("sbd,scd->sbc", xt, xt)  # shared by the G grid points
    trace_g = jnp.einsum("sgb,sb->sg", nu, jnp.diagonal(gram, axis1=-2, axis2=-1)) / batch
    eps = jnp.maximum(damping * trace_g / d, jnp.finfo(xt.dtype).tiny)
    scale = jnp.sqrt(nu / batch)  # U = Z^T diag(scale)
    capacitance = (scale[..., :, None] * gram[:, None] * scale[..., None, :]
                   + eps[..., None, None] * jnp.eye(batch, dtype=xt.dtype))
    ut_v = scale * jnp.einsum("sbd,sgd->sgb", xt, v)
    w = spd_solve(capacitance.reshape(-1, batch, batch), ut_v.reshape(-1, batch))
    u_w = jnp.einsum("sbd,sgb->sgd", xt, scale * w.reshape(s_dim, g_dim, batch))
    return _from_vec((v - u_w) / eps[..., None])


def split_run_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each run's key -> (initialisation key, minibatch-order key), each stacked (S, 2)."""
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def init_theta(init_keys: jax.Array, dim: int, init_scale: float, dtype) -> jax.Array:
    """``theta = [kernel, bias] ~ N(0, init_scale^2)`` per run: (S, dim)."""
    return init_scale * jax.vmap(lambda k: jax.random.normal(k, (dim,), dtype))(init_keys)


def _sgd_update(direction, state, lr, momentum):
    return optax.sgd(lr, momentum=momentum).update(direction, state)


@partial(jax.jit, static_argnames=("ngd", "solver", "batch_size", "epochs", "damping",
                                   "init_scale"))
def train_grid(
    x: jax.Array,
    y: jax.Array,
    keys: jax.Array,
    learning_rates: jax.Array,
    momentums: jax.Array,
    *,
    ngd: bool,
    solver: str,
    batch_size: int,
    epochs: int,
    damping: float = 1e-2,
    init_scale: float = 1e-2,
):
    """Trains S runs x G grid points of one method; returns final params and per-epoch curves.

    Args:
      x: training features (n, d_in) (already whitened for the White* methods); y: (n,) in {0,1}.
      keys: (S, 2) PRNG keys, one per run (initialisation and minibatch order).
      learning_rates, momentums: (G,) grid points.

    Returns:
      ``(params, loss, error)`` with params leaves (S, G, ...), and the training cross-entropy
      and misclassification rate of shape (S, G, epochs + 1) (entry 0: before training).
    """
    n, d_in = x.shape
    steps = n // batch_size
    num_runs, num_grid = keys.shape[0], learning_rates.shape[0]
    dtype = x.dtype
    init_keys, shuffle_keys = split_run_keys(keys)
    theta = init_theta(init_keys, d_in + 1, init_scale, dtype)
    theta = jnp.broadcast_to(theta[:, None], (num_runs, num_grid, d_in + 1))
    params = _from_vec(theta)
    opt_state = jax.vmap(jax.vmap(optax.sgd(1.0, momentum=0.0).init))(params)
    lrs = jnp.asarray(learning_rates, dtype)
    moms = jnp.asarray(momentums, dtype)

    grad_fn = jax.vmap(jax.vmap(jax.grad(cross_entropy), in_axes=(0, None, None)))
    update_fn = jax.vmap(jax.vmap(_sgd_update, in_axes=(0, 0, 0, 0)), in_axes=(0, 0, None, None))

    def evaluate(params):
        l = jnp.einsum("nd,sgd->sgn", x, params["kernel"]) + params["bias"][..., None]
        loss = jnp.mean(jax.nn.softplus(l) - y * l, axis=-1)
        error = jnp.mean((l > 0) != (y > 0.5), axis=-1)
        return loss, error

    def step(carry, idx):  # idx: (S, B)
        params, opt_state = carry
        xb, yb = x[idx], y[idx]
        grads = grad_fn(params, xb, yb)
        direction = (natural_gradient(params, grads, xb, damping=damping, solver=solver)
                     if ngd else grads)
        updates, opt_state = update_fn(direction, opt_state, lrs, moms)
        return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, epoch_index):
        perms = jax.vmap(
            lambda k: jax.random.permutation(jax.random.fold_in(k, epoch_index), n)
        )(shuffle_keys)
        idx = perms[:, : steps * batch_size].reshape(num_runs, steps, batch_size)
        carry, _ = jax.lax.scan(step, carry, idx.transpose(1, 0, 2))
        return carry, evaluate(carry[0])

    (params, _), (loss, error) = jax.lax.scan(epoch, (params, opt_state), jnp.arange(epochs))
    loss0, error0 = evaluate(params=_from_vec(theta))
    loss = jnp.concatenate([loss0[None], loss], axis=0).transpose(1, 2, 0)
    error = jnp.concatenate([error0[None], error], axis=0).transpose(1, 2, 0)
    return params, loss, error


# ----------------------------------------------------------------------------- the grid


def _features(method: str, x_train, x_test, rtol):
    if not method.startswith("White"):
        return jnp.asarray(x_train), jnp.asarray(x_test), None
    big_a, a = whitening_map(jnp.asarray(x_train), rtol=rtol)
    z_train = apply_whitening(jnp.asarray(x_train), big_a, a)
    # The whitened covariance is a projector: its trace is the number of kept directions.
    rank = int(round(float(jnp.sum(z_train**2)) / len(x_train)))
    return z_train, apply_whitening(jnp.asarray(x_test), big_a, a), {"whitened_rank": rank}


def _grid_entry(lr, mom, runs_loss, runs_err, test_loss, test_error, save_runs) -> dict:
    """Statistics over the runs of one grid point; curves have shape (runs, epochs + 1)."""
    bad = ~np.all(np.isfinite(runs_loss), axis=-1)
    blew_up = runs_loss[:, -1] > runs_loss[:, 0]
    entry = {
        "learning_rate": lr,
        "momentum": mom,
        "diverged": bool(bad.any()),
        "diverged_runs": int(bad.sum()),
        "blew_up_runs": int(np.sum(blew_up & ~bad)),
        "final_train_loss": float(runs_loss[:, -1].mean()),
        "final_train_error": float(runs_err[:, -1].mean()),
        "final_test_loss": float(test_loss.mean()),
        "final_test_error": float(test_error.mean()),
        "mean_loss": runs_loss.mean(0),
        "min_loss": runs_loss.min(0),
        "max_loss": runs_loss.max(0),
        "std_loss": runs_loss.std(0),
        "q25_loss": np.percentile(runs_loss, 25, axis=0),
        "q75_loss": np.percentile(runs_loss, 75, axis=0),
        "mean_error": runs_err.mean(0),
    }
    if save_runs:
        entry["run_loss"] = runs_loss
        entry["run_error"] = runs_err
    return entry


def _select_best(configs: list[dict]) -> int | None:
    finite = [i for i, c in enumerate(configs) if not c["diverged"]]
    if not finite:
        return None
    return min(finite, key=lambda i: configs[i]["final_train_loss"])


def run_method(method: str, x_train, y_train, x_test, y_test, cfg: Fig4Config) -> dict:
    """Runs one method's whole grid and all runs; returns a JSON-ready dict."""
    ngd = method.endswith("NGD")
    z_train, z_test, white_info = _features(method, x_train, x_test, cfg.whitening_rtol)
    dim = z_train.shape[1] + 1
    batch_size = len(z_train) if cfg.batch_size is None else cfg.batch_size
    solver = choose_solver(cfg.solver, dim, batch_size) if ngd else "none"
    grid = [(lr, m) for lr in cfg.learning_rates for m in cfg.momentums]
    lrs = jnp.asarray([g[0] for g in grid], z_train.dtype)
    moms = jnp.asarray([g[1] for g in grid], z_train.dtype)
    base = jax.random.PRNGKey(cfg.seed)
    keys = jnp.stack([jax.random.fold_in(base, r) for r in range(cfg.num_runs)])
    y = jnp.asarray(y_train, z_train.dtype)
    kwargs = dict(ngd=ngd, solver=solver if ngd else "dense", batch_size=batch_size,
                  epochs=cfg.epochs, damping=cfg.damping, init_scale=cfg.init_scale)
    t0 = time.perf_counter()
    compiled = train_grid.lower(z_train, y, keys, lrs, moms, **kwargs).compile()
    t1 = time.perf_counter()
    params, loss, error = jax.block_until_ready(compiled(z_train, y, keys, lrs, moms))
    t2 = time.perf_counter()
    loss, error = np.asarray(loss), np.asarray(error)

    # Test-set numbers of the final parameters (the figure itself is about training).
    yt = np.asarray(y_test, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # blown-up runs reach 1e300
        lt = (np.einsum("nd,sgd->sgn", np.asarray(z_test), np.asarray(params["kernel"]))
              + np.asarray(params["bias"])[..., None])
        test_loss = np.mean(np.logaddexp(0.0, lt) - yt * lt, axis=-1)
    test_error = np.mean((lt > 0) != (yt > 0.5), axis=-1)

    with np.errstate(over="ignore", invalid="ignore"):
        configs = [_grid_entry(lr, mom, loss[:, gi], error[:, gi], test_loss[:, gi],
                               test_error[:, gi], cfg.save_runs)
                   for gi, (lr, mom) in enumerate(grid)]
    best = _select_best(configs)
    num_steps = cfg.epochs * (len(z_train) // batch_size)
    return {
        "method": method,
        "solver": solver,
        "dim": dim,
        "batch_size": batch_size,
        "whitening": white_info,
        "best_index": best,
        "best": None if best is None else {
            k: configs[best][k] for k in ("learning_rate", "momentum", "final_train_loss",
                                          "final_train_error", "final_test_loss",
                                          "final_test_error")
        },
        "diverged_configs": [(c["learning_rate"], c["momentum"]) for c in configs
                             if c["diverged"]],
        "compile_seconds": t1 - t0,
        "run_seconds": t2 - t1,
        "steps_per_run": num_steps,
        "seconds_per_step_per_run": (t2 - t1) / max(1, num_steps * len(grid) * cfg.num_runs),
        "configs": configs,
    }


def _size_label(size) -> str:
    return "all" if size is None else str(size)


def run(config: Fig4Config) -> dict:
    """Runs ``config``'s experiment; writes ``fig4.json`` and ``fig4.png`` to ``config.out``."""
    if (config.batch_size is not None and config.batch_size <= 0) or config.epochs <= 0 \
            or config.num_runs <= 0:
        raise ValueError("batch_size (or None), epochs and num_runs must be positive.")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {METHODS}.")
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "experiments.fig4 needs float64: call jax.config.update('jax_enable_x64', True) "
            "first (main() does)."
        )
    out = Path(config.out)
    panels = []
    jobs = []
    for task_name in config.tasks:
        task = data.PAIR_TASKS.get(task_name)
        if task is None:
            raise ValueError(f"Unknown task {task_name!r}; known: {', '.join(data.PAIR_TASKS)}.")
        if task.dataset not in config.train_sizes:
            raise ValueError(f"train_sizes has no entry for the {task.dataset!r} data set "
                             f"(task {task_name!r}).")
        for size in config.train_sizes[task.dataset]:
            jobs.append((task_name, size))
    bar = common.progress(total=len(jobs) * len(config.methods), enabled=config.progress,
                          desc="fig4")
    loaded = {}
    for task_name, size in jobs:
        task = data.PAIR_TASKS[task_name]
        if task_name not in loaded:
            loaded[task_name] = data.load_pair_task(task_name, data_dir=config.data_dir,
                                                    seed=config.seed)
        x_tr, y_tr, x_te, y_te = loaded[task_name]
        x_sub, y_sub = data.subsample(x_tr, y_tr, None if size is None else min(size, len(x_tr)),
                                      seed=config.seed)
        if config.batch_size is not None and len(x_sub) < config.batch_size:
            raise ValueError(f"{task_name}: {len(x_sub)} training samples is fewer than the "
                             f"batch size {config.batch_size}.")
        panel = {
            "task": task_name,
            "title": task.title,
            "train_size": len(x_sub),
            "requested_size": _size_label(size),
            "test_size": len(x_te),
            "positive_fraction": float(np.mean(y_sub)),
            "methods": {},
        }
        for method in config.methods:
            bar.set_postfix_str(f"{task_name} n={len(x_sub)} {method}")
            panel["methods"][method] = run_method(
                method, x_sub.astype(np.float64), y_sub, x_te.astype(np.float64), y_te,
                config)
            bar.update()
        panels.append(panel)
    bar.close()

    results = {"panels": panels, "summary": summarize(panels)}
    path = common.write_json(out / "fig4.json", results, config=config, digits=7)
    write_compact_summary(path, out / "fig4_summary.json")
    plot(panels, out / "fig4.png", dpi=config.plot_dpi)
    return results


def write_compact_summary(json_path, out_path) -> Path:
    """A small JSON from ``fig4.json``: config, best configs, and every grid point's finals."""
    import json

    blob = json.loads(Path(json_path).read_text())
    keys = ("learning_rate", "momentum", "diverged_runs", "blew_up_runs", "final_train_loss",
            "final_train_error", "final_test_loss", "final_test_error")
    grid = {
        f"{p['task']}/n={p['train_size']}/{m}": [{k: c[k] for k in keys} for c in r["configs"]]
        for p in blob["panels"] for m, r in p["methods"].items()
    }
    small = {k: blob[k] for k in ("config", "environment", "written_at", "summary")}
    small["grid_finals"] = grid
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(small, indent=1) + "\n")
    return out_path


def summarize(panels: list[dict]) -> list[dict]:
    """Best configuration and final errors per (task, size, method): the small JSON summary."""
    rows = []
    for panel in panels:
        for method, res in panel["methods"].items():
            row = {"task": panel["task"], "train_size": panel["train_size"], "method": method,
                   "solver": res["solver"], "run_seconds": res["run_seconds"],
                   "seconds_per_step_per_run": res["seconds_per_step_per_run"],
                   "diverged_configs": res["diverged_configs"]}
            if res["best"] is not None:
                row.update(res["best"])
            rows.append(row)
    return rows


def plot_from_json(json_path, png_path, *, dpi: int = 100) -> Path:
    """Redraws the figure from a written ``fig4.json`` (JSON nulls become NaN)."""
    import json

    panels = json.loads(Path(json_path).read_text())["panels"]
    for panel in panels:
        for res in panel["methods"].values():
            for c in res["configs"]:
                for k in ("mean_loss", "min_loss", "max_loss", "q25_loss", "q75_loss"):
                    if k in c:
                        c[k] = np.array([np.nan if v is None else v for v in c[k]])
                if "q25_loss" not in c and "run_loss" in c:
                    runs = np.array([[np.nan if v is None else v for v in r]
                                     for r in c["run_loss"]])
                    c["q25_loss"], c["q75_loss"] = np.percentile(runs, [25, 75], axis=0)
    return plot(panels, png_path, dpi=dpi)


def plot(panels: list[dict], path, *, dpi: int = 100, floor: float = 1e-30) -> Path:
    """Fig. 4: per (task, size), training cross-entropy (log) v epoch, best curve per method.

    Losses below ``floor`` (separable data drive the cross-entropy to 0 in float64) are drawn
    at ``floor`` so that they stay on the log axis.
    """
    plt = common.pyplot()
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for method, res in panel["methods"].items():
            if res["best_index"] is None:
                continue
            c = res["configs"][res["best_index"]]
            epochs = np.arange(len(c["mean_loss"]))
            lr, mom = c["learning_rate"], c["momentum"]
            lo, hi = c.get("q25_loss", c["min_loss"]), c.get("q75_loss", c["max_loss"])
            common.plot_band(
                ax, epochs, np.maximum(c["mean_loss"], floor), np.maximum(lo, floor),
                np.maximum(hi, floor), color=METHOD_COLORS.get(method),
                label=f"{method} (lr={lr:g}, m={mom:g})",
            )
        ax.set_yscale("log")
        ax.set_title(f"{panel['title']}, n={panel['train_size']}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training cross-entropy")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("One sigmoid neuron (Fig. 4): best curve per method over the lr x momentum grid"
                 f" (line: mean of runs, band: 25-75% of runs; losses below {floor:g} drawn at "
                 f"{floor:g})",
                 fontsize=11)
    fig.tight_layout()
    return common.save_figure(fig, path, dpi=dpi)


def parse_sizes(text: str) -> dict:
    """``"fashion=1000,all;digits=100"`` -> ``{"fashion": (1000, None), "digits": (100,)}``."""
    sizes = {}
    for item in text.split(";"):
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--sizes: expected 'dataset=size,size;...', got {item!r}.")
        sizes[name.strip()] = tuple(None if v.strip() == "all" else int(v)
                                    for v in values.split(","))
    return sizes


def _batch_size(text: str) -> str:
    if text != "full":
        common.positive_int(text)
    return text


def _damping(text: str) -> float:
    values = common.floats_in(0.0, None)(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"one number, got {text!r}")
    return values[0]


def _sizes(text: str) -> dict:
    try:
        sizes = parse_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    unknown = sorted(set(sizes) - {t.dataset for t in data.PAIR_TASKS.values()})
    bad = [n for v in sizes.values() for n in v if n is not None and n < 1]
    if unknown or bad:
        raise argparse.ArgumentTypeError(
            f"unknown data sets {unknown}" if unknown else f"sizes must be >= 1, got {bad}")
    return sizes


def make_parser():
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=common.positive_int, default=None,
                        help="override the epochs")
    parser.add_argument("--runs", type=common.positive_int, default=None,
                        help="override the number of runs")
    parser.add_argument("--solver", default="auto", choices=("auto", "dense", "woodbury"))
    parser.add_argument("--batch-size", type=_batch_size, default=None,
                        help="minibatch size (default 50) or 'full' for full-batch steps")
    parser.add_argument("--tasks", type=common.method_list(tuple(data.PAIR_TASKS)),
                        default=None,
                        help=f"comma-separated subset of {', '.join(data.PAIR_TASKS)}")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="training sizes per data set, e.g. 'fashion=1000,all;digits=100'")
    parser.add_argument("--methods", type=common.method_list(METHODS), default=None,
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--learning-rates", type=common.floats_in(0.0, None), default=None,
                        help="comma-separated learning-rate grid, e.g. '0.1,1'")
    parser.add_argument("--momentums", type=common.floats_in(0.0, 1.0), default=None,
                        help="comma-separated momentum grid in [0, 1), e.g. '0,0.8'")
    parser.add_argument("--damping", type=_damping, default=None,
                        help="eps0 of eq. (30), eps = eps0 tr(g)/D (default 1e-2)")
    return parser


def config_from_args(args) -> Fig4Config:
    """The :class:`Fig4Config` that the command line asks for."""
    overrides = dict(seed=args.seed, out=args.out, data_dir=args.data_dir,
                     progress=not args.no_progress, solver=args.solver)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.runs is not None:
        overrides["num_runs"] = args.runs
    if args.batch_size is not None:
        overrides["batch_size"] = None if args.batch_size == "full" else int(args.batch_size)
    if args.tasks is not None:
        overrides["tasks"] = tuple(args.tasks)
    if args.sizes is not None:
        overrides["train_sizes"] = args.sizes
    if args.methods is not None:
        overrides["methods"] = tuple(args.methods)
    if args.learning_rates is not None:
        overrides["learning_rates"] = args.learning_rates
    if args.momentums is not None:
        overrides["momentums"] = args.momentums
    if args.damping is not None:
        overrides["damping"] = args.damping
    return full_config(**overrides) if args.full else quick_config(**overrides)


def main(argv=None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    config = config_from_args(args)
    common.check_data_dir(parser, args, any(
        data.PAIR_TASKS[t].dataset == "fashion" for t in config.tasks))
    t0 = time.perf_counter()
    results = run(config)
    print(f"fig4: wrote {Path(config.out) / 'fig4.json'} and {Path(config.out) / 'fig4.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    for row in results["summary"]:
        if "final_train_loss" in row:
            print(f"  {row['task']:<24} n={row['train_size']:<6} {row['method']:<9} "
                  f"lr={row['learning_rate']:<6g} m={row['momentum']:<4g} "
                  f"train CE={row['final_train_loss']:.3e} err={row['final_train_error']:.4f}")
        else:
            print(f"  {row['task']:<24} n={row['train_size']:<6} {row['method']:<9} all diverged")
    return results


if __name__ == "__main__":
    main()
