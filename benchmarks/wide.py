"""Wide layers: exact, eigen and diagonal RNGD against Adam and SGD, per step and in training.

Run from the repository root::

    python -m benchmarks.wide          # widths 64, 256, 1024 x batches 100, 1024; train 1024/1024
    python -m benchmarks.wide --quick  # widths 64, 256 x batch 100; train 256/100, 300 steps

On 2 CPU cores the quick run takes about 3 minutes; the full one about 10 minutes of per-step
timing and 40-50 of training (10 epochs, 15 runs), estimated from the quick run.  Eigen against
exact at width 64 (the issue's 3-epoch goal)::

    python -m benchmarks.wide --no-timing --train-width 64 --train-batch 100 --epochs 3 \\
        --train-methods exact,eigen --out results/wide64

Timing only some methods at one size (Adam is always timed, every ratio is to it)::

    python -m benchmarks.wide --no-train --widths 4096 --batches 100 --methods eigen,diagonal

The network is the paper's 784-h-h-h-10 relu MLP with the RFIM kinds "linear" (input layer),
"relu" (hidden layers) and "softmax" (output layer; ``--output-kind linear`` gives the paper's
Fig. 5 choice), preconditioned by
``rfim_jax.rngd(lr, layers, representation=...)`` with T = ``inverse_every`` = 100.  Everything
runs in one process; the methods of one (width, batch) configuration are timed interleaved.

**Per step** (:func:`measure`): Adam, SGD (momentum 0.9) and RNGD "exact", "eigen", "eigen"
with ``update_every=10`` ("eigen_k10") and "diagonal".  Each is AOT-compiled as a jitted
``lax.scan`` chunk of ``--steps`` steps (a multiple of 10, so every chunk holds the same share
of statistics steps as training); one chunk is run untimed, then ``--reps`` chunks of every
method are timed in rotating order and the median is taken.  The refresh is amortised as in
``benchmarks.scaling``, but measured through the public API only: each RNGD method is compiled
twice, never refreshing (``inverse_every`` huge) and refreshing once per chunk
(``inverse_every = --steps``); one refresh costs the difference of the two medians, and
``ms_per_step = no_refresh_ms_per_step + max(refresh_ms, 0) / 100``.  An exact state over
``--max-state-gb`` (from :func:`rfim_jax.rngd_plan`, width 1024: 17 GiB) is not run, but its
bytes are reported.  State bytes are the RNGD stage's (``rngd_plan``, checked against
``jax.eval_shape(tx.init, params)``), against the params' bytes.

**FLOP model** (:func:`flop_model`), per layer of width m, input d (d + 1 with the bias),
batch n, per step: forward + backward 6 n d m; exact statistics 2 n m d^2, apply 2 m d^2,
refresh m d^3 / 3 per T (a shared "linear" block counts once, the "softmax" block is one
(md) x (md) matrix); eigen statistics 2 n d^2 (rotation) + 2 n m d (scales) + n d^2 (A),
apply 4 d^2 m, refresh (9 d^3 eigh + 2 d^3 rotation + 2 m d^2 carry) per T; diagonal
statistics 2 n m d, apply m d.  Statistics are divided by ``update_every``.  The largest term
names the row's bound: an "apply-bound" step costs the same at any batch size, so a larger
batch (or fewer, larger steps) amortises it; "statistics-bound" is what ``update_every`` cuts.

**Training** (:func:`train`): Adam, SGD, eigen, eigen_k10 and diagonal on Fashion-MNIST
(:func:`benchmarks.harness.train_interleaved`: same minibatches, chunks interleaved), each over a
3-value learning-rate grid (:data:`LR_GRIDS`; ``--single-lr`` keeps the middle value; a best
rate at the edge of its grid is flagged ``best_at_grid_edge``).  The
training loss is that of a fixed 10k training subset after every chunk.  Per method the best
rate is the one reaching ``--target`` soonest in training seconds, else the lowest final loss.
Without Fashion-MNIST (``--dataset digits``, or ``auto`` when its files are missing) sklearn's
8x8 digits are used with a 64-input MLP, and the JSON says so.

Writes ``wide.json`` and ``wide.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rfim_jax
from benchmarks import cost, harness, scaling
from experiments import common
from experiments import data as data_lib
from experiments import models as mlp

WIDTHS, QUICK_WIDTHS = (64, 256, 1024), (64, 256)
BATCHES, QUICK_BATCHES = (100, 1024), (100,)
INVERSE_EVERY = 100
NEVER = 10**9
TRAIN_METHODS = ("adam", "sgd", "eigen", "eigen_k10", "diagonal")
#: learning-rate grids of the training part, per family (RNGD: every representation).
#: A quick run (width 256, batch 100, 300 steps) picked the top of (3e-4, 1e-3, 3e-3) for Adam
#: and of (0.003, 0.01, 0.03) for eigen, and the batch of the full run is 10x larger, hence these.
LR_GRIDS = {"adam": (1e-3, 3e-3, 1e-2), "sgd": (0.03, 0.1, 0.3), "rngd": (0.01, 0.03, 0.1)}
MAX_CHUNK = 50
BOUNDS = {"forward_backward": "forward/backward", "statistics": "statistics", "apply": "apply",
          "refresh": "refresh"}


def methods(lr: Mapping[str, float] | None = None,
            output_kind: str = "softmax") -> dict[str, harness.Method]:
    lr = {"adam": 1e-3, "sgd": 0.03, "rngd": 0.01} | dict(lr or {})
    rngd = dict(family="rngd", learning_rate=lr["rngd"], output_kind=output_kind,
                inverse_every=INVERSE_EVERY)
    return {m.name: m for m in (
        harness.Method("adam", "adam", lr["adam"], momentum=0.0),
        harness.Method("sgd", "sgd", lr["sgd"], momentum=0.9),
        harness.Method("exact", representation="exact", **rngd),
        harness.Method("eigen", representation="eigen", **rngd),
        harness.Method("eigen_k10", representation="eigen", update_every=10, **rngd),
        harness.Method("diagonal", representation="diagonal", **rngd),
    )}


def timing_methods(names: str | None, output_kind: str = "softmax") -> list[harness.Method]:
    """The timed methods named in ``names`` (comma-separated; None: all), Adam always first,
    since every ratio is to it.

    Raises:
      ValueError: for a name that is not one of :func:`methods`, listing them.
    """
    table = methods(output_kind=output_kind)
    if names is None:
        return list(table.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise ValueError(f"unknown timing methods {unknown}; choose from {sorted(table)}.")
    return [table[n] for n in ["adam", *[n for n in wanted if n != "adam"]]]


def layer_kinds(sizes: Sequence[int], output_kind: str = "softmax") -> dict[str, str]:
    return harness.rngd_layer_kinds(sizes, output_kind=output_kind)


def flop_model(sizes: Sequence[int], batch: int, kinds: Mapping[str, str],
               representation: str | None, *, update_every: int = 1,
               inverse_every: int = INVERSE_EVERY) -> dict:
    """The module docstring's FLOP model per step (:func:`benchmarks.cost.flop_model` with one
    representation for every layer); ``representation=None`` for Adam and SGD."""
    if representation is None:
        kinds = {}
    total = cost.flop_model(sizes, batch, kinds, update_every=update_every,
                            inverse_every=inverse_every,
                            representations=dict.fromkeys(kinds, representation))["total"]
    t = {k: total[k] for k in BOUNDS}
    bound = BOUNDS[max(t, key=t.get)] + "-bound"
    return {**t, "total": sum(t.values()), "bound": bound}


def state_report(m: harness.Method, sizes: Sequence[int]) -> dict:
    """Params and state bytes from shapes only (nothing allocated)."""
    params = jax.eval_shape(lambda: mlp.init_mlp(jax.random.PRNGKey(0), sizes))
    state = jax.eval_shape(harness.make_optimizer(m, sizes).init, params)
    out = {"params_bytes": scaling.state_bytes(params),
           "optimizer_state_bytes": scaling.state_bytes(state)}
    if m.family != "rngd":
        out["state_to_params"] = out["optimizer_state_bytes"] / out["params_bytes"]
        return out
    plan = rfim_jax.rngd_plan(params, layer_kinds(sizes, m.output_kind),
                              representation=m.representation)
    stage = next(s for s in state if isinstance(s, rfim_jax.ScaleByRNGDState))
    out["plan"] = {p: {"kind": v.kind, "representation": v.representation, "shape": v.shape,
                       "state_bytes": v.state_bytes} for p, v in plan.items()}
    out["rngd_state_bytes_plan"] = sum(v.state_bytes for v in plan.values())
    out["rngd_state_bytes"] = scaling.state_bytes((stage.metrics, stage.inverses))
    out["plan_matches_init"] = out["rngd_state_bytes"] == out["rngd_state_bytes_plan"]
    out["state_to_params"] = out["rngd_state_bytes"] / out["params_bytes"]
    return out


def fmt_row(r: Mapping) -> str:
    ms = r.get("ms_per_step")
    timing = (f"skipped ({r['skipped']})" if ms is None else
              f"{ms:9.3f} ms  x{r['ratio_to_adam']:6.2f} Adam  refresh {r['refresh_ms']:8.2f} ms")
    f = r["model_flops"]
    return (f"{r['method']:10s} h={r['width']:5d} n={r['batch']:5d}  {timing}  "
            f"state/params {r['state_to_params']:7.2f}  model {f['total'] / 1e6:9.1f} MFLOP "
            f"(fb {f['forward_backward'] / 1e6:.1f}, stats {f['statistics'] / 1e6:.1f}, apply "
            f"{f['apply'] / 1e6:.1f}, refresh {f['refresh'] / 1e6:.1f}) {f['bound']}")


def measure(configs: Sequence[scaling.Config], meths: Sequence[harness.Method], x_pool, y_pool,
            *, steps: int = 10, reps: int = 5, max_state_gb: float = 4.0) -> list[dict]:
    """Per-step time, state bytes and FLOP model of every (config, method); rows print as the
    timing of each config completes."""
    rows, rng = [], np.random.default_rng(0)
    key = jax.random.PRNGKey(0)
    for cfg in configs:
        idx = jnp.asarray(rng.integers(0, x_pool.shape[0], (steps, cfg.batch)), jnp.int32)
        params0 = mlp.init_mlp(jax.random.PRNGKey(0), cfg.sizes)
        live, meta = {}, {}
        for m in meths:
            rngd = m.family == "rngd"
            row = {"method": m.name, "width": cfg.width, "batch": cfg.batch,
                   "representation": m.representation if rngd else None,
                   "update_every": m.update_every if rngd else None,
                   **state_report(m, cfg.sizes)}
            row["model_flops"] = flop_model(
                cfg.sizes, cfg.batch, layer_kinds(cfg.sizes, m.output_kind), row["representation"],
                update_every=m.update_every, inverse_every=m.inverse_every)
            if rngd and row["rngd_state_bytes_plan"] > max_state_gb * 2**30:
                row["skipped"] = (f"state {row['rngd_state_bytes_plan'] / 2**30:.1f} GiB > "
                                  f"--max-state-gb {max_state_gb:g}")
                rows.append(row)
                print(fmt_row(row), flush=True)
                continue
            variants = {m.name: NEVER} | ({f"{m.name}+refresh": steps} if rngd else {})
            row["compile_seconds"] = 0.0
            for name, every in variants.items():
                v = dataclasses.replace(m, inverse_every=every)
                compiled, _, state, secs = harness.compile_chunk(
                    v, cfg.sizes, params0, x_pool, y_pool, steps, cfg.batch)
                row["compile_seconds"] += secs
                params, state, _ = compiled(jax.tree.map(jnp.copy, params0), state, x_pool,
                                            y_pool, idx, key)  # untimed: count 0 refreshes
                live[name] = [compiled, params, state]
            meta[m.name] = row

        def runner(name, idx=idx, live=live):
            def run():
                v = live[name]
                v[1], v[2], losses = v[0](v[1], v[2], x_pool, y_pool, idx, key)
                return losses
            return run

        times = harness.time_chunks({n: runner(n) for n in live}, reps) if live else {}
        live.clear()
        for name, row in meta.items():
            row["chunk_seconds"] = times[name]
            row["no_refresh_ms_per_step"] = float(np.median(times[name]) / steps * 1e3)
            row["refresh_ms"] = 0.0
            if f"{name}+refresh" in times:
                row["refresh_chunk_seconds"] = times[f"{name}+refresh"]
                row["refresh_ms"] = float(np.median(times[f"{name}+refresh"]) * 1e3 -
                                          np.median(times[name]) * 1e3)
            row["ms_per_step"] = (row["no_refresh_ms_per_step"] +
                                  max(row["refresh_ms"], 0.0) / INVERSE_EVERY)
        adam = meta.get("adam", {}).get("ms_per_step")
        for row in meta.values():
            row["ratio_to_adam"] = row["ms_per_step"] / adam if adam else float("nan")
            row["model_gflop_per_s"] = row["model_flops"]["total"] / row["ms_per_step"] / 1e6
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


def load(dataset: str, data_dir: str | None, seed: int) -> tuple[harness.Data, str]:
    if dataset in ("auto", "fashion"):
        try:
            return harness.load_data(data_dir, seed=seed, whiten=False), "fashion-mnist"
        except data_lib.DataNotFoundError:
            if dataset == "fashion":
                raise
    arrays = data_lib.load_digits(seed=seed)
    return harness.load_data(arrays=arrays, seed=seed, whiten=False), "digits"


def train(data: harness.Data, *, width: int, batch: int, epochs: float, names: Sequence[str],
          target: float, single_lr: bool = False, seed: int = 0, progress: bool = True,
          output_kind: str = "softmax") -> dict:
    """Training curves and time to ``target`` over the learning-rate grids (module docstring)."""
    sizes = (int(data.x_train.shape[1]),) + (width,) * 3 + (10,)
    base = methods(output_kind=output_kind)
    trials = []
    for name in names:
        grid = LR_GRIDS[base[name].family]
        for lr in grid[1:2] if single_lr else grid:
            trials.append(dataclasses.replace(base[name], name=f"{name}@{lr:g}",
                                              learning_rate=lr))
    steps_per_epoch = data.num_train // batch
    chunk = max(c for c in range(1, MAX_CHUNK + 1) if steps_per_epoch % c == 0)
    runs = harness.train_interleaved(trials, data, sizes=sizes, epochs=epochs, batch=batch,
                                   chunk=chunk, seed=seed, progress=progress)
    summary = harness.summarise_runs(runs, chunk, steps_per_epoch)
    for name, s in summary.items():
        s["time_to_target"] = harness.time_to_target(runs[name], target)
        s["final_subset_loss"] = runs[name]["eval_loss"][-1]
    best = {}
    for name in names:
        cand = [t.name for t in trials if t.name.split("@")[0] == name]
        hit = [c for c in cand if summary[c]["time_to_target"]]
        best[name] = (min(hit, key=lambda c: summary[c]["time_to_target"]["seconds"]) if hit
                      else min(cand, key=lambda c: summary[c]["final_subset_loss"]))
        summary[best[name]]["best_at_grid_edge"] = len(cand) > 1 and best[name] in (cand[0],
                                                                                     cand[-1])
    curves = {n: {k: r[k] for k in ("steps", "eval_loss", "batch_loss", "chunk_seconds")}
              for n, r in runs.items()}
    return {"sizes": sizes, "batch": batch, "epochs": epochs, "chunk": chunk, "target": target,
            "steps_per_epoch": steps_per_epoch, "runs": summary, "best": best, "curves": curves}


def goals(rows: Sequence[Mapping], training: Mapping | None) -> dict:
    out = {}
    for r in rows:
        if r["method"].startswith("eigen") and r["width"] == 1024 and r["batch"] == 1024:
            out[f"{r['method']}_at_most_2.5x_adam_w1024_n1024"] = r.get("ratio_to_adam", 99) <= 2.5
            out[f"{r['method']}_state_at_most_4x_params_w1024"] = r["state_to_params"] <= 4
    if training and {"adam", "eigen"} <= set(training["best"]):
        t = {n: training["runs"][training["best"][n]]["time_to_target"] for n in training["best"]}
        out["eigen_reaches_target_before_adam"] = bool(t["eigen"]) and (
            not t["adam"] or t["eigen"]["seconds"] < t["adam"]["seconds"])
    return out


def plot(rows: Sequence[Mapping], training: Mapping | None, path: Path) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    for name in dict.fromkeys(r["method"] for r in rows):
        for batch in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["method"] == name and r["batch"] == batch
                   and "ms_per_step" in r]
            if sel:
                axes[0].plot([r["width"] for r in sel], [r["ratio_to_adam"] for r in sel], "o-",
                             label=f"{name}, n={batch}")
    axes[0].set(yscale="log", xlabel="hidden width h", ylabel="time per step / Adam",
                title="per-step time relative to Adam")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(sorted({r["width"] for r in rows}) or [1], minor=False)
    if training:
        for run in training["best"].values():
            c = training["curves"][run]
            elapsed = np.concatenate([[0.0], np.cumsum(c["chunk_seconds"])])
            axes[1].plot(c["steps"], c["eval_loss"], label=run)
            axes[2].plot(elapsed, c["eval_loss"], label=run)
        for ax, xl in zip(axes[1:], ("iterations", "training seconds"), strict=True):
            ax.axhline(training["target"], color="gray", ls=":", lw=0.8)
            ax.set(yscale="log", xlabel=xl, ylabel="training loss (subset)")
        s = training["sizes"]
        axes[1].set_title(f"loss per iteration ({s[0]}-{s[1]}x3-10, batch {training['batch']})")
        axes[2].set_title("loss per second (interleaved)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return common.save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
    with harness.limit_blas_threads(args.blas_threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    quick = not args.full
    widths = args.widths or (QUICK_WIDTHS if quick else WIDTHS)
    batches = args.batches or (QUICK_BATCHES if quick else BATCHES)
    data, source = load(args.dataset, args.data_dir, args.seed)
    d_in = int(data.x_train.shape[1])
    dataset = {"name": source, "input_dim": d_in, "num_train": data.num_train}
    if source == "digits":
        dataset["note"] = "Fashion-MNIST not used: sklearn 8x8 digits with a 64-input MLP"
    print(f"data: {dataset}", flush=True)
    out = {"dataset": dataset, "rows": [], "training": None}
    if not args.no_timing:
        configs = [scaling.Config(w, b, input_dim=d_in) for b in batches for w in widths]
        meths = timing_methods(args.methods, args.output_kind)
        out["rows"] = measure(configs, meths, data.x_train[:20_000],
                              data.y_train[:20_000], steps=args.steps,
                              reps=args.reps or (3 if quick else 5),
                              max_state_gb=args.max_state_gb)
    if not args.no_train:
        epochs = args.epochs or (300 * (args.train_batch or 100) / data.num_train if quick
                                 else 10)
        out["training"] = train(
            data, width=args.train_width or (256 if quick else 1024),
            batch=args.train_batch or (100 if quick else 1024), epochs=epochs,
            names=args.train_methods.split(","), target=args.target, single_lr=args.single_lr,
            seed=args.seed, progress=not args.no_progress, output_kind=args.output_kind)
        tr = out["training"]
        for name, run_name in tr["best"].items():
            s, t = tr["runs"][run_name], tr["runs"][run_name]["time_to_target"]
            reached = "not reached" if not t else f"{t['seconds']:.1f} s, {t['steps']} steps"
            print(f"train {name:10s} best {run_name:18s} {s['median_ms_per_step']:9.3f} ms/step"
                  f"  final loss {s['final_subset_loss']:.4f}  to {args.target:g}: {reached}",
                  flush=True)
    out["goals"] = goals(out["rows"], out["training"])
    print("goals:", out["goals"], flush=True)
    config = {k: v for k, v in vars(args).items()} | {
        "widths": widths, "batches": batches, "inverse_every": INVERSE_EVERY,
        "lr_grids": LR_GRIDS, "methods": {n: dataclasses.asdict(m)
                    for n, m in methods(output_kind=args.output_kind).items()}}
    path = common.write_json(Path(args.out) / "wide.json", out, config=config, digits=6)
    png = plot(out["rows"], out["training"], Path(args.out) / "wide.png")
    print(f"wrote {path} and {png}", flush=True)
    return out


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="full", action="store_false")
    scale.add_argument("--full", dest="full", action="store_true", help="(default)")
    p.set_defaults(full=True)
    p.add_argument("--widths", type=_ints, default=None, help="e.g. 64,256,1024")
    p.add_argument("--batches", type=_ints, default=None, help="e.g. 100,1024")
    p.add_argument("--steps", type=int, default=10, help="steps per timed chunk (multiple of 10)")
    p.add_argument("--reps", type=int, default=None, help="timed chunks (default 5; quick 3)")
    p.add_argument("--max-state-gb", type=float, default=4.0)
    p.add_argument("--epochs", type=float, default=None,
                   help="training epochs (default 10; quick: 300 steps)")
    p.add_argument("--target", type=float, default=0.2, help="target training loss")
    p.add_argument("--train-width", type=int, default=None, help="default 1024 (quick 256)")
    p.add_argument("--train-batch", type=int, default=None, help="default 1024 (quick 100)")
    p.add_argument("--methods", type=str, default=None,
                   help="timed methods, comma-separated (default all: "
                        + ",".join(methods()) + "); adam is always timed, for the ratios")
    p.add_argument("--train-methods", type=str, default=",".join(TRAIN_METHODS))
    p.add_argument("--single-lr", action="store_true", help="only the middle rate of each grid")
    p.add_argument("--output-kind", choices=("softmax", "linear"), default="softmax",
                   help="the output layer's RFIM kind ('linear' is the paper's Fig. 5 choice)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--dataset", choices=("auto", "fashion", "digits"), default="auto")
    p.add_argument("--data-dir", type=str, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=common.DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true")
    harness.add_blas_threads_arg(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
