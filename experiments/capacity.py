"""Capacity during training: Fisher-Rao norms, relative norms per layer and the generalisation gap.

    python -m experiments.capacity            # --quick (default): 8x8 digits, 64-64-64-64-10
    python -m experiments.capacity --full     # Fashion-MNIST, 784-64-64-64-10

The paper's ReLU MLP (Sun & Nielsen, Sec. 5.2; softmax output, no batch norm) is trained with
SGD (heavy-ball momentum), Adam and RNGD (:func:`rfim_jax.rngd` with the Fig. 5 settings: the
linear RFIM on the input and softmax layers, the relu RFIM on the hidden layers, T = 100,
lambda = 0.995), one fixed learning rate each, batch 100.  At log-spaced iterations (0, then
``num_snapshots`` points geometrically spaced from 1 to ``iterations``) it records:

* training and test loss (mean cross-entropy over the *whole* training and test sets) and
  accuracy, and the generalisation gaps ``loss_gap = test loss - train loss`` and
  ``acc_gap = train accuracy - test accuracy``;
* the squared Fisher-Rao norm ``||theta||_fr^2 = theta^T F theta`` (Liang et al.),
  :func:`rfim_jax.fisher_rao_norm` on a fixed, seeded subset of ``subset_size`` training
  inputs: the model form (``fr_norm_sq``; categorical response, y drawn from the model, the
  paper's definition) and the empirical form with the true labels (``fr_norm_sq_empirical``);
* the squared relative Fisher-Rao norm per layer, ``w~_l^T G_l w~_l``
  (:func:`rfim_jax.relative_fisher_rao_norm`), from each layer's RFIM of the *current* params
  on the same subset: the relu RFIM (omega = 1, ``nu = sigmoid(z)^2``, eq. 23) for the layers
  followed by a relu and the softmax RFIM (eq. 25, the FIM's last block) for the output layer
  (``relative_fr_norm_sq``, and their sum ``relative_fr_norm_sq_total``).  For RNGD also from
  its optimiser state, i.e. in the moving-average metrics that RNGD preconditions with
  (``rngd_state_relative_fr_norm_sq``), plus :func:`rfim_jax.diagnostics`;
* the squared parameter L2 norm ``||theta||_2^2`` (``l2_norm_sq``), a baseline capacity measure.

All norms are squared, as the library returns them; the Fisher-Rao ones are means over the
subset, in nats.  The network has biases, so Lemma 2.1's ``(L + 1)^2`` identity does not apply;
the norms are computed exactly by the library, never through it.

**Analysis (declared before looking at the data).**

* Correlations: Spearman (rank; ties averaged) and Pearson between each norm and each gap,
  over every snapshot with iteration >= 1 (iteration 0 is the same for every optimiser), pooled
  across optimisers and per optimiser.  numpy only.
* Does the norm's rise precede the test-loss minimum?  ``t_test_min`` is the snapshot of the
  lowest test loss.  The norm's growth rate between consecutive snapshots (both >= 1) is
  ``d ln N / d ln t``, the slope on a log-log plot, credited to the later snapshot (the first
  moment it can be seen); ``t_growth_peak`` is where it is largest.  The norm "precedes" when
  ``t_growth_peak < t_test_min``.  A run "overfits" when its final test loss exceeds its
  minimum by more than 5%; without that, precedence is not meaningful and says so.

Outputs (``--out``, default ``results/``): ``{name}.json`` (configuration, every snapshot's
numbers per optimiser, the correlations, the timing criterion) and ``{name}.png``: test and
training loss, loss gap, Fisher-Rao norm, per-layer relative norms (one panel per optimiser),
parameter L2 norm, the Fisher-Rao norm against the gap, and the correlation table.
"""

from __future__ import annotations

import dataclasses
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

OPTIMIZERS = ("SGD", "ADAM", "RNGD")
#: the norms correlated with the gaps (per-layer relative norms are added per run).
NORMS = ("fr_norm_sq", "fr_norm_sq_empirical", "relative_fr_norm_sq_total", "l2_norm_sq")
GAPS = ("loss_gap", "acc_gap")
#: a run overfits when its final test loss exceeds its minimum by more than this fraction.
OVERFIT_RISE = 0.05


@dataclasses.dataclass
class CapacityConfig:
    """Everything that defines a capacity run (written to the JSON)."""

    dataset: str = "digits"  # "digits" (sklearn, embedded) or "idx" (Fashion-MNIST / MNIST)
    data_dir: str | None = None
    sizes: tuple[int, ...] = (64, 64, 64, 64, 10)
    iterations: int = 10000
    num_snapshots: int = 30  # geometric from 1 to ``iterations`` (deduplicated), plus 0
    batch_size: int = 100
    train_size: int | None = None  # subsample the training set (None: all of it)
    subset_size: int = 500  # training inputs on which the Fisher-Rao norms are measured
    seed: int = 0
    optimizers: tuple[str, ...] = OPTIMIZERS
    lrs: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"SGD": 0.03, "ADAM": 1e-3, "RNGD": 0.1})
    momentum: float = 0.9  # heavy-ball momentum of SGD and RNGD
    rngd_decay: float = 0.995
    rngd_inverse_every: int = 100
    rngd_damping: float = 1e-2
    dtype: str = "float32"
    progress: bool = True
    out: str = common.DEFAULT_OUT
    name: str = "capacity"


def quick_config(**overrides) -> CapacityConfig:
    """The embedded default: 8x8 digits (1347 training images), 10,000 iterations (~750
    epochs, long enough for SGD and Adam to overfit), about a minute on 2 CPU cores."""
    return dataclasses.replace(CapacityConfig(), **overrides)


def full_config(**overrides) -> CapacityConfig:
    """Fashion-MNIST, 784-64-64-64-10, each optimiser at its Fig. 5 paper-scale best rate
    (SGD 0.01, Adam 1e-3, RNGD 0.03), 30,000 iterations (50 epochs, half of Fig. 5's), the
    norms on 1000 training inputs.  11 minutes on 2 CPU cores shared with other jobs (RNGD's
    training 290 s; the 3 x 30 snapshots 320 s, mostly the relu RFIM of the 785-wide input
    layer)."""
    base = CapacityConfig(dataset="idx", sizes=(784, 64, 64, 64, 10), iterations=30000,
                          subset_size=1000, lrs={"SGD": 0.01, "ADAM": 1e-3, "RNGD": 0.03},
                          name="capacity_full")
    return dataclasses.replace(base, **overrides)


# ---------------------------------------------------------------------------- building blocks


def snapshot_iterations(iterations: int, num: int) -> list[int]:
    """0, then ``num`` geometrically spaced points from 1 to ``iterations`` (rounded, unique)."""
    if iterations < 1 or num < 1:
        raise ValueError(f"iterations and num_snapshots must be >= 1, got {iterations}, {num}.")
    pts = np.unique(np.round(np.geomspace(1, iterations, num)).astype(int))
    return [0] + [int(t) for t in pts]


def batch_stream(n: int, batch: int, total: int, seed: int) -> np.ndarray:
    """``total`` minibatch index rows (int32), epoch after epoch of seeded permutations."""
    rows: list[np.ndarray] = []
    epoch = 0
    while len(rows) < total:
        rows += data.minibatch_indices(n, batch, seed=seed, epoch=epoch)
        epoch += 1
    return np.stack(rows[:total]).astype(np.int32)


def make_optimizer(family: str, cfg: CapacityConfig) -> optax.GradientTransformation:
    if family not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {family!r}; known: {', '.join(OPTIMIZERS)}.")
    lr = float(cfg.lrs[family])
    if family == "SGD":
        return optax.sgd(lr, momentum=cfg.momentum or None)
    if family == "ADAM":
        return optax.adam(lr)
    return rfim_jax.rngd(lr, mlp.rngd_layers(len(cfg.sizes) - 1, "relu"),
                         momentum=cfg.momentum or None, decay=cfg.rngd_decay,
                         inverse_every=cfg.rngd_inverse_every, damping=cfg.rngd_damping)


def make_segment(opt, family: str):
    """``segment(carry, stream, start, count, x, y) -> carry``: ``count`` steps from row
    ``start`` of the minibatch stream; one compilation serves every segment length."""

    def step(i, carry, stream, x, y):
        params, state = carry
        bidx = stream[i]
        xb, yb = x[bidx], y[bidx]

        def loss_fn(p):
            logits, acts, _ = mlp.mlp_apply(p, xb)
            return mlp.cross_entropy(logits, yb), acts

        (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if family == "RNGD":
            updates, state = opt.update(grads, state, params, activations=acts)
        else:
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def segment(carry, stream, start, count, x, y):
        return jax.lax.fori_loop(start, start + count,
                                 lambda i, c: step(i, c, stream, x, y), carry)

    return jax.jit(segment)


def layer_relative_norms(params: mlp.Params, x: jax.Array) -> dict[str, jax.Array]:
    """``{Dense_i: w~^T G w~}`` with G the layer's RFIM of these params on the inputs ``x``:
    relu (omega = 1) for the layers a relu follows, softmax for the output layer."""
    _, acts, _ = mlp.mlp_apply(params, x)
    num = mlp.num_dense(params)
    out = {}
    for i in range(num):
        path = mlp.dense_name(i)
        p, h = params[path], acts[path]["inputs"]
        metric = (rfim_jax.softmax_rfim(p, h) if i == num - 1
                  else rfim_jax.nonlinear_rfim(p, h, rfim_jax.ReLU()))
        out[path] = rfim_jax.relative_fisher_rao_norm(metric, p)
    return out


def measure(params: mlp.Params, x_tr, y_tr, x_te, y_te, x_sub, y_sub) -> dict[str, Any]:
    """Every per-snapshot figure of the params (jit it)."""

    def loss_acc(x, y):
        logits = mlp.logits_fn(params, x)
        hits = (jnp.argmax(logits, -1) == y).astype(logits.dtype)
        return mlp.cross_entropy(logits, y), jnp.mean(hits)

    train_loss, train_acc = loss_acc(x_tr, y_tr)
    test_loss, test_acc = loss_acc(x_te, y_te)
    rel = layer_relative_norms(params, x_sub)
    return {
        "train_loss": train_loss, "test_loss": test_loss,
        "train_acc": train_acc, "test_acc": test_acc,
        "loss_gap": test_loss - train_loss, "acc_gap": train_acc - test_acc,
        "fr_norm_sq": rfim_jax.fisher_rao_norm(mlp.logits_fn, params, x_sub, "categorical"),
        "fr_norm_sq_empirical": rfim_jax.fisher_rao_norm(mlp.logits_fn, params, x_sub,
                                                         "categorical", labels=y_sub),
        "relative_fr_norm_sq": rel,
        "relative_fr_norm_sq_total": sum(rel.values()),
        "l2_norm_sq": sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(params)),
    }


def load_data(cfg: CapacityConfig):
    """``(x_train, y_train, x_test, y_test, subset_index)``; the subset is fixed by the seed."""
    if cfg.dataset == "digits":
        x_tr, y_tr, x_te, y_te = data.load_digits(seed=cfg.seed)
    elif cfg.dataset == "idx":
        x_tr, y_tr, x_te, y_te = data.load_idx_dataset(cfg.data_dir)
    else:
        raise ValueError(f"dataset must be 'digits' or 'idx', got {cfg.dataset!r}.")
    if cfg.train_size is not None:
        x_tr, y_tr = data.subsample(x_tr, y_tr, cfg.train_size, seed=cfg.seed)
    if x_tr.shape[1] != cfg.sizes[0]:
        raise ValueError(f"the data have {x_tr.shape[1]} features but sizes[0] = "
                         f"{cfg.sizes[0]}; use sizes=({x_tr.shape[1]}, ...).")
    if not 0 < cfg.subset_size <= len(x_tr):
        raise ValueError(f"subset_size must be in [1, {len(x_tr)}], got {cfg.subset_size}.")
    sub = np.sort(np.random.default_rng([cfg.seed, 1]).permutation(len(x_tr))[:cfg.subset_size])
    return x_tr, y_tr, x_te, y_te, sub


# ----------------------------------------------------------------------------------- analysis


def rankdata(a) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata's default)."""
    a = np.asarray(a, np.float64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inv.reshape(-1)]


def pearson(x, y) -> float | None:
    """Pearson's r; None for fewer than 3 points or a constant series."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    return None if den == 0 or not np.isfinite(den) else float(np.sum(xc * yc) / den)


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


def growth_peak(iterations, values) -> dict | None:
    """Where ``d ln N / d ln t`` between consecutive snapshots (t >= 1, N > 0) is largest.

    Returns ``{"iteration": t_k, "previous": t_{k-1}, "rate": slope}`` (the later snapshot of
    the steepest interval), or None with fewer than two usable snapshots.
    """
    t, v = np.asarray(iterations, np.float64), _arr(values)
    keep = (t >= 1) & (v > 0) & np.isfinite(v)
    t, v = t[keep], v[keep]
    if t.size < 2:
        return None
    rate = np.diff(np.log(v)) / np.diff(np.log(t))
    k = int(np.argmax(rate))
    return {"iteration": int(t[k + 1]), "previous": int(t[k]), "rate": float(rate[k])}


def _arr(values) -> np.ndarray:
    """A float64 array, None (JSON's non-finite) as NaN."""
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _series_table(series: dict, names: Sequence[str], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {n: _arr(series[n])[mask] for n in names}


def norm_names(series: dict) -> list[str]:
    """The scalar norms of a run's series, per-layer relative norms as ``relative/<path>``."""
    return list(NORMS) + [f"relative/{p}" for p in series["relative_fr_norm_sq"]]


def _flat(series: dict) -> dict[str, list]:
    flat = {k: v for k, v in series.items() if not isinstance(v, dict)}
    for p, v in series["relative_fr_norm_sq"].items():
        flat[f"relative/{p}"] = v
    for p, v in series.get("rngd_state_relative_fr_norm_sq", {}).items():
        flat[f"rngd_state/{p}"] = v
    return flat


def summarise(runs: dict[str, dict]) -> dict:
    """Correlations (pooled and per optimiser) and the declared timing criterion."""
    flats = {o: _flat(r["series"]) for o, r in runs.items()}
    first = next(iter(runs.values()))["series"]
    names = norm_names(first)
    per_opt: dict[str, dict] = {}
    pooled = {n: [] for n in names + list(GAPS)}
    for opt, flat in flats.items():
        it = np.asarray(flat["iteration"])
        mask = it >= 1
        cols = _series_table(flat, names + list(GAPS), mask)
        for k, v in cols.items():
            pooled[k].append(v)
        extra = [k for k in flat if k.startswith("rngd_state/")]
        ecols = _series_table(flat, extra, mask)
        corr = {g: {n: {"spearman": spearman(c, cols[g]), "pearson": pearson(c, cols[g])}
                    for n, c in {**cols, **ecols}.items() if n not in GAPS} for g in GAPS}
        test = _arr(flat["test_loss"])
        k_min = int(np.argmin(test))
        t_test_min = int(it[k_min])
        rise = float(test[-1] / test[k_min] - 1.0)
        overfits = rise > OVERFIT_RISE
        timing = {}
        for n in names + extra:
            peak = growth_peak(it, flat[n])
            vals = _arr(flat[n])
            timing[n] = {
                "growth_peak": peak,
                "argmax_iteration": int(it[int(np.nanargmax(vals))]),
                "precedes_test_min": (None if peak is None or not overfits
                                      else bool(peak["iteration"] < t_test_min)),
                "test_loss_at_growth_peak": (None if peak is None else
                                             float(test[list(it).index(peak["iteration"])])),
            }
        per_opt[opt] = {
            "correlations": corr,
            "t_test_min": t_test_min,
            "test_loss_min": float(test[k_min]),
            "final": {k: float(np.asarray(flat[k])[-1]) for k in
                      ("train_loss", "test_loss", "train_acc", "test_acc", "loss_gap",
                       "acc_gap", "fr_norm_sq", "relative_fr_norm_sq_total", "l2_norm_sq")},
            "test_loss_rise_after_min": rise,
            "overfits": overfits,
            "timing": timing,
        }
    cat = {k: np.concatenate(v) for k, v in pooled.items()}
    pooled_corr = {g: {n: {"spearman": spearman(cat[n], cat[g]),
                           "pearson": pearson(cat[n], cat[g])} for n in names} for g in GAPS}
    return {"norms": names, "gaps": list(GAPS), "points_pooled": int(cat[GAPS[0]].size),
            "pooled_correlations": pooled_corr, "optimizers": per_opt,
            "criterion": ("norm growth d ln N / d ln t peaks (credited to the later snapshot) "
                          "before the snapshot of the lowest test loss; only for runs whose "
                          f"final test loss is > {OVERFIT_RISE:.0%} above the minimum")}


# ------------------------------------------------------------------------------------ the run


def _np_tree(tree):
    return jax.tree.map(lambda v: float(np.asarray(v)), tree)


def train_one(family: str, cfg: CapacityConfig, arrays, stream: jax.Array, snaps: list[int],
              measure_fn, *, bar=None) -> dict:
    """Trains one optimiser, measuring at every snapshot; returns the series and final params."""
    x_tr, y_tr, x_te, y_te, x_sub, y_sub = arrays
    dtype = jnp.dtype(cfg.dtype)
    params = mlp.init_mlp(jax.random.PRNGKey(cfg.seed), cfg.sizes, dtype=dtype)
    opt = make_optimizer(family, cfg)
    carry = (params, opt.init(params))
    segment = make_segment(opt, family)
    rngd_diag = jax.jit(lambda s, p: rfim_jax.diagnostics(s, p)) if family == "RNGD" else None
    series: dict[str, Any] = {"iteration": []}
    diags = []
    done, t_train, t_measure = 0, 0.0, 0.0
    for t in snaps:
        if t > done:
            t0 = time.perf_counter()
            carry = segment(carry, stream, done, t - done, x_tr, y_tr)
            jax.block_until_ready(carry)
            t_train += time.perf_counter() - t0
            if bar is not None:
                bar.update(t - done)
            done = t
        t0 = time.perf_counter()
        m = _np_tree(measure_fn(carry[0], x_tr, y_tr, x_te, y_te, x_sub, y_sub))
        if rngd_diag is not None:
            d = _np_tree(rngd_diag(carry[1], carry[0]))
            diags.append(d)
            m["rngd_state_relative_fr_norm_sq"] = {
                k.rsplit("/", 1)[0]: (v if t > 0 else None) for k, v in d.items()
                if k.endswith("/relative_fisher_rao_norm")}
        t_measure += time.perf_counter() - t0
        series["iteration"].append(t)
        for k, v in m.items():
            if isinstance(v, dict):
                dst = series.setdefault(k, {})
                for p, x in v.items():
                    dst.setdefault(p, []).append(x)
            else:
                series.setdefault(k, []).append(v)
        if bar is not None:
            bar.set_postfix(opt=family, t=t, test=f"{m['test_loss']:.3g}",
                            fr=f"{m['fr_norm_sq']:.3g}")
        if not np.isfinite(m["train_loss"]):
            raise FloatingPointError(f"{family} diverged by iteration {t} (lr "
                                     f"{cfg.lrs[family]}); lower its rate.")
    out = {"lr": float(cfg.lrs[family]), "series": series, "params": carry[0],
           "train_seconds": t_train, "measure_seconds": t_measure}
    if diags:
        out["rngd_diagnostics"] = diags
    return out


def run(cfg: CapacityConfig) -> dict:
    """Trains every optimiser; writes ``{name}.json`` and ``{name}.png``; returns the results.

    The returned dict also holds, in memory only, each optimiser's final params
    (``runs[opt]["params"]``, the last snapshot's) and the metric subset (``"subset"``).
    """
    if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            return run(cfg)
    for o in cfg.optimizers:
        if o not in OPTIMIZERS or o not in cfg.lrs:
            raise ValueError(f"optimizer {o!r} needs to be one of {OPTIMIZERS} with a rate "
                             f"in lrs (got lrs={cfg.lrs}).")
    t_start = time.perf_counter()
    x_tr, y_tr, x_te, y_te, sub = load_data(cfg)
    dtype = jnp.dtype(cfg.dtype)
    x_tr_j, y_tr_j = jnp.asarray(x_tr, dtype), jnp.asarray(y_tr, jnp.int32)
    arrays = (x_tr_j, y_tr_j, jnp.asarray(x_te, dtype), jnp.asarray(y_te, jnp.int32),
              x_tr_j[sub], y_tr_j[sub])
    snaps = snapshot_iterations(cfg.iterations, cfg.num_snapshots)
    n = len(x_tr)
    if cfg.batch_size > n:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training samples.")
    stream = jnp.asarray(batch_stream(n, cfg.batch_size, cfg.iterations, cfg.seed))
    measure_fn = jax.jit(measure)
    runs = {}
    with common.progress(total=cfg.iterations * len(cfg.optimizers), enabled=cfg.progress,
                         desc="capacity iterations") as bar:
        for family in cfg.optimizers:
            runs[family] = train_one(family, cfg, arrays, stream, snaps, measure_fn, bar=bar)
    summary = summarise(runs)
    out_dir = Path(cfg.out)
    png = plot(summary, runs, cfg, out_dir / f"{cfg.name}.png")
    results = {
        "about": ("Fisher-Rao norm (Liang et al., arXiv 1711.01530), relative Fisher-Rao norm "
                  "per layer and generalisation gap during training; Sun & Nielsen's MLP"),
        "data": {"dataset": cfg.dataset, "n_train": n, "n_test": int(len(x_te)),
                 "subset_size": int(len(sub)),
                 "epochs": cfg.iterations * cfg.batch_size / n},
        "snapshots": snaps,
        "summary": summary,
        "runs": {o: {k: v for k, v in r.items() if k != "params"} for o, r in runs.items()},
        "seconds": time.perf_counter() - t_start,
    }
    path = common.write_json(out_dir / f"{cfg.name}.json", results,
                             config=dataclasses.asdict(cfg), digits=6)
    for o, r in runs.items():
        results["runs"][o]["params"] = r["params"]
    results["subset"] = sub
    results["files"] = {"json": str(path), "png": str(png)}
    return results


# ------------------------------------------------------------------------------------ figure

_COLORS = {"SGD": "tab:blue", "ADAM": "tab:green", "RNGD": "tab:red"}
_NORM_LABELS = {
    "fr_norm_sq": "FR norm² (model)", "fr_norm_sq_empirical": "FR norm² (empirical)",
    "relative_fr_norm_sq_total": "relative FR norm², sum", "l2_norm_sq": "L2 norm²",
}


def _fmt(v) -> str:
    return "  -  " if v is None else f"{v:+.2f}"


def plot(summary: dict, runs: dict, cfg: CapacityConfig, path: Path, *, dpi: int = 100) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(17, 13))
    net = "-".join(str(s) for s in cfg.sizes)
    data_name = "8x8 digits" if cfg.dataset == "digits" else "Fashion-MNIST"
    ax_loss, ax_gap, ax_fr = axes[0]
    ax_l2, ax_sc, ax_tab = axes[2]
    for opt, r in runs.items():
        s, c = r["series"], _COLORS.get(opt)
        it = np.asarray(s["iteration"], np.float64)
        label = f"{opt} (lr={r['lr']:g})"
        ax_loss.plot(it, s["test_loss"], color=c, lw=1.5, label=f"{label} test")
        ax_loss.plot(it, s["train_loss"], color=c, lw=1.0, ls="--", label=f"{label} train")
        ax_gap.plot(it, s["loss_gap"], color=c, lw=1.5, marker="o", ms=3, label=label)
        ax_fr.plot(it, s["fr_norm_sq"], color=c, lw=1.5, marker="o", ms=3,
                   label=f"{opt} model form")
        ax_fr.plot(it, s["fr_norm_sq_empirical"], color=c, lw=1.0, ls=":",
                   label=f"{opt} empirical form")
        ax_l2.plot(it, s["l2_norm_sq"], color=c, lw=1.5, label=label)
        e = summary["optimizers"][opt]
        for ax in (ax_loss, ax_gap, ax_fr):
            ax.axvline(e["t_test_min"], color=c, lw=0.8, ls="-.")
        peak = e["timing"]["fr_norm_sq"]["growth_peak"]
        if peak is not None:
            k = list(s["iteration"]).index(peak["iteration"])
            ax_fr.plot([peak["iteration"]], [s["fr_norm_sq"][k]], marker="^", ms=11, color=c,
                       mec="k", ls="none")
        keep = it >= 1
        ax_sc.scatter(np.asarray(s["fr_norm_sq"])[keep], np.asarray(s["loss_gap"])[keep],
                      c=c, s=12 + 40 * np.log10(it[keep]) / max(1, np.log10(it.max())),
                      alpha=0.8, label=opt)
    ax_loss.set_ylabel("cross-entropy (whole set)")
    ax_loss.set_yscale("log")
    ax_loss.set_title(f"{data_name}, ReLU MLP {net}, batch {cfg.batch_size}\n"
                      "test (solid) and train (dashed) loss; dash-dot: test-loss minimum",
                      fontsize=10)
    ax_gap.set_ylabel("generalisation gap: test loss - train loss")
    ax_gap.set_title("loss gap", fontsize=10)
    ax_fr.set_yscale("log")
    ax_fr.set_ylabel("θᵀFθ (nats, mean over the subset)")
    ax_fr.set_title(f"squared Fisher-Rao norm on {cfg.subset_size} training inputs\n"
                    "▲: steepest growth (d ln N / d ln t); dash-dot: test-loss minimum",
                    fontsize=10)
    ax_l2.set_yscale("log")
    ax_l2.set_ylabel("‖θ‖²")
    ax_l2.set_title("parameter L2 norm² (baseline)", fontsize=10)
    t_max = max(cfg.iterations, 1) * 1.15
    for ax in (ax_loss, ax_gap, ax_fr, ax_l2):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, t_max)
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax_sc.set_xscale("log")
    ax_sc.set_xlabel("squared Fisher-Rao norm (model form)")
    ax_sc.set_ylabel("test loss - train loss")
    rho = summary["pooled_correlations"]["loss_gap"]["fr_norm_sq"]
    ax_sc.set_title(f"FR norm vs gap, iterations ≥ 1 (larger dots later); pooled Spearman "
                    f"{_fmt(rho['spearman'])}, Pearson {_fmt(rho['pearson'])}", fontsize=10)
    ax_sc.grid(True, which="both", alpha=0.3)
    ax_sc.legend(fontsize=8)
    # Per-layer relative norms, one panel per optimiser (shared y).
    rel_axes = axes[1]
    lo, hi = np.inf, 0.0
    for j, (opt, r) in enumerate(runs.items()):
        if j >= len(rel_axes):
            break
        ax = rel_axes[j]
        s = r["series"]
        it = np.asarray(s["iteration"], np.float64)
        cmap = plt.get_cmap("viridis")
        layers = list(s["relative_fr_norm_sq"])
        for i, p in enumerate(layers):
            col = cmap(i / max(1, len(layers) - 1))
            v = np.asarray(s["relative_fr_norm_sq"][p], np.float64)
            ax.plot(it, v, color=col, lw=1.5, label=f"{p} (current-params RFIM)")
            lo, hi = min(lo, np.nanmin(v[v > 0], initial=np.inf)), max(hi, np.nanmax(v))
            st = s.get("rngd_state_relative_fr_norm_sq", {}).get(p)
            if st is not None:
                sv = np.asarray([np.nan if x is None else x for x in st], np.float64)
                ax.plot(it, sv, color=col, lw=1.0, ls="--", label=f"{p} (RNGD state metric)")
        ax.axvline(summary["optimizers"][opt]["t_test_min"], color="k", lw=0.8, ls="-.")
        ax.set_title(f"{opt}: relative FR norm² per layer, w̃ᵀGw̃", fontsize=10)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, t_max)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for j in range(len(runs), len(rel_axes)):
        rel_axes[j].axis("off")
    # Correlation table.
    ax_tab.axis("off")
    opts = list(runs)
    cols = ["pooled"] + opts
    rows, cells = [], []
    for n in NORMS:
        rows.append(_NORM_LABELS[n])
        row = []
        for scope in cols:
            cc = (summary["pooled_correlations"]["loss_gap"][n] if scope == "pooled"
                  else summary["optimizers"][scope]["correlations"]["loss_gap"][n])
            row.append(f"{_fmt(cc['spearman'])} / {_fmt(cc['pearson'])}")
        cells.append(row)
    rows.append("t(test min) / t(FR ▲)")
    cells.append([""] + [f"{summary['optimizers'][o]['t_test_min']} / "
                         f"{(summary['optimizers'][o]['timing']['fr_norm_sq']['growth_peak'] or {}).get('iteration', '-')}"  # noqa: E501
                         for o in opts])
    table = ax_tab.table(cellText=cells, rowLabels=rows, colLabels=cols, loc="center",
                         cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.6)
    ax_tab.set_title("Spearman / Pearson with the loss gap (iterations ≥ 1)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, path, dpi=dpi)


# -------------------------------------------------------------------------------------- CLI


def report(summary: dict) -> str:
    """The printed summary: per optimiser, the test-loss minimum and the norms' timing, then
    the correlation tables."""
    lines = []
    for opt, e in summary["optimizers"].items():
        f = e["final"]
        lines.append(
            f"{opt:5s} final train/test loss {f['train_loss']:.3g}/{f['test_loss']:.3g}, "
            f"test acc {f['test_acc']:.4f}, loss gap {f['loss_gap']:.3g}; test loss min "
            f"{e['test_loss_min']:.3g} at t={e['t_test_min']}, then +"
            f"{100 * e['test_loss_rise_after_min']:.0f}% (overfits: {e['overfits']})")
        for n in NORMS:
            tm = e["timing"][n]
            pk = tm["growth_peak"]
            pk_s = "-" if pk is None else (f"t={pk['iteration']} (from {pk['previous']}, "
                                           f"slope {pk['rate']:.2f})")
            lines.append(f"      {n:26s} steepest growth at {pk_s}; max at "
                         f"t={tm['argmax_iteration']}; precedes test min: "
                         f"{tm['precedes_test_min']}")
    for g in summary["gaps"]:
        lines.append(f"\ncorrelation with {g} (Spearman / Pearson; iterations >= 1; pooled "
                     f"over {summary['points_pooled']} points, then per optimiser)")
        opts = list(summary["optimizers"])
        lines.append(f"{'norm':28s} {'pooled':>15s} " + " ".join(f"{o:>15s}" for o in opts))
        extra = sorted({k for o in opts for k in summary["optimizers"][o]["correlations"][g]
                        if k.startswith("rngd_state/")})
        for n in summary["norms"] + extra:
            pc = summary["pooled_correlations"][g].get(n)
            cells = [("-" if pc is None else f"{_fmt(pc['spearman'])}/{_fmt(pc['pearson'])}")]
            for o in opts:
                cc = summary["optimizers"][o]["correlations"][g].get(n)
                cells.append("-" if cc is None else f"{_fmt(cc['spearman'])}/"
                                                    f"{_fmt(cc['pearson'])}")
            lines.append(f"{n:28s} " + " ".join(f"{c:>15s}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=common.positive_int, default=None,
                        help="override the iteration count")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"seed": args.seed, "out": args.out,
                                 "progress": not args.no_progress}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    cfg = full_config(**overrides) if args.full else quick_config(**overrides)
    common.check_data_dir(parser, args, cfg.dataset == "idx")
    results = run(cfg)
    print(report(results["summary"]))
    timing = ", ".join(f"{o} train {r['train_seconds']:.0f} s + measure "
                       f"{r['measure_seconds']:.0f} s" for o, r in results["runs"].items())
    print(f"{timing}\nwrote {results['files']['json']} and {results['files']['png']} "
          f"in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
