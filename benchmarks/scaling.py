"""Scaling of the RNGD step with layer width and batch size, against Adam and the FLOP model.

Run from the repository root::

    python -m benchmarks.scaling            # widths 64..1024, batches 32..1024
    python -m benchmarks.scaling --quick    # widths 64..256, batches 32..256

The network is the paper's 784-h-h-h-10 relu MLP.  Width sweep: h in 64..1024 at batch 100.
Batch sweep: batch 32..1024 at h = 64.  Methods: Adam, default RNGD (the paper's layers,
statistics every step) and the fast variant of :mod:`benchmarks.speed` (input layer passed
through as with whitened inputs, statistics every 10 steps).

Per configuration it measures, in one process and interleaved across methods:

- the time per step: a jitted ``lax.scan`` chunk of steps with the inverse refresh switched off,
  plus one directly timed refresh divided by T = 100 (so the refresh is amortised as in
  training without running 100 steps of the largest models);
- memory: the optimiser state's bytes (exact, from the arrays) and XLA's temporary buffer
  bytes for the compiled chunk (``compiled.memory_analysis()``);
- the FLOP model of SPEC §6 (:func:`benchmarks.cost.flop_model`) and XLA's own flop count.

A configuration whose RNGD state would exceed ``--max-state-gb`` (width 1024: ~17 GB of
per-neuron blocks) is not run; its memory and model flops are still reported.  The timings do
not depend on the data's values, so inputs are Fashion-MNIST rows when available and uniform
noise otherwise.  Writes ``results/scaling.json`` and ``results/scaling.png``.  The full sweep
takes about 8 minutes on 2 quiet CPU cores (mostly width 512).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rfim_jax
from benchmarks import cost, harness
from experiments import common
from experiments import models as mlp

WIDTHS = (64, 128, 256, 512, 1024)
BATCHES = (32, 64, 128, 256, 512, 1024)
QUICK_WIDTHS = (64, 128, 256)
QUICK_BATCHES = (32, 64, 128, 256)


def scaling_methods() -> list[harness.Method]:
    return [
        harness.Method("adam", "adam", 1e-3, momentum=0.0),
        harness.Method("rngd", "rngd", 1e-3),
        harness.Method("rngd_white_k10", "rngd", 1e-3, whiten=True, update_every=10),
    ]


def state_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def optimizer_state_bytes(method: harness.Method, sizes: Sequence[int]) -> int:
    """Bytes of the method's whole optimiser state, from shapes only (nothing allocated)."""
    params = jax.eval_shape(lambda: mlp.init_mlp(jax.random.PRNGKey(0), sizes))
    return state_bytes(jax.eval_shape(harness.make_optimizer(method, sizes).init, params))


def _refresh_ms(method: harness.Method, sizes: Sequence[int], reps: int) -> float:
    """One inverse refresh of every preconditioned layer, timed directly (ms)."""
    if method.family != "rngd":
        return 0.0
    params = jax.eval_shape(lambda: mlp.init_mlp(jax.random.PRNGKey(0), sizes))
    state = jax.eval_shape(
        rfim_jax.scale_by_rngd(harness.rngd_layer_kinds(sizes, method.whiten)).init, params)
    blocks = {p: jnp.broadcast_to(2.0 * jnp.eye(s.shape[-1], dtype=s.dtype), s.shape) + 0.0
              for p, s in state.metrics.items()}
    fn = jax.jit(lambda b: {p: rfim_jax.spd_inverse_and_status(v)[0] for p, v in b.items()})
    jax.block_until_ready(fn(blocks))
    times = harness.time_chunks({"r": lambda: fn(blocks)}, reps)["r"]
    return float(np.median(times) * 1e3)


@dataclasses.dataclass
class Config:
    """One point of the sweep: ``input_dim``-h-...-h-10 with ``hidden_layers`` layers of h."""

    width: int
    batch: int
    input_dim: int = 784
    hidden_layers: int = 3

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.input_dim,) + (self.width,) * self.hidden_layers + (10,)


def measure(configs: Sequence[Config], methods: Sequence[harness.Method], x_pool: jax.Array,
            *, steps: int = 10, reps: int = 5, max_state_gb: float = 3.0,
            xla_flops: bool = True, progress: bool = True) -> list[dict]:
    """Times every (config, method) pair; methods of one config are interleaved.

    ``steps`` should be a multiple of the methods' ``update_every`` so that each chunk holds
    the same share of statistics steps as training does.  Configurations above 5 GFLOP per
    step get at most 3 repetitions.
    """
    rows = []
    y_pool = jnp.asarray(np.arange(x_pool.shape[0]) % 10, jnp.int32)
    rng = np.random.default_rng(0)
    bar = common.progress(total=len(configs) * len(methods), enabled=progress, desc="scaling")
    for cfg in configs:
        live, meta = {}, {}
        idx = jnp.asarray(rng.integers(0, x_pool.shape[0], (steps, cfg.batch)), jnp.int32)
        key = jax.random.PRNGKey(0)
        for m in methods:
            row = {"method": m.name, "width": cfg.width, "batch": cfg.batch}
            kinds = harness.rngd_layer_kinds(cfg.sizes, m.whiten) if m.family == "rngd" else {}
            model = cost.flop_model(cfg.sizes, cfg.batch, kinds, update_every=m.update_every,
                                     inverse_every=m.inverse_every)["total"]
            row["model_flops"] = model
            params = mlp.init_mlp(jax.random.PRNGKey(0), cfg.sizes)
            sb = optimizer_state_bytes(m, cfg.sizes)
            row["state_bytes"] = sb
            if sb > max_state_gb * 2**30:
                row["skipped"] = f"optimizer state {sb / 2**30:.1f} GB > --max-state-gb"
                rows.append(row)
                bar.update(1)
                continue
            no_refresh = dataclasses.replace(m, inverse_every=10**9)
            compiled, _, state, compile_s = harness.compile_chunk(
                no_refresh, cfg.sizes, params, x_pool, y_pool, steps, cfg.batch)
            mem = compiled.memory_analysis()
            row["xla_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0) or 0)
            row["compile_seconds"] = compile_s
            if xla_flops:
                row["xla_step_flops"] = cost.xla_step_flops(m, cfg.sizes, cfg.batch)
            row["refresh_ms"] = _refresh_ms(m, cfg.sizes, max(2, reps // 2))
            # first chunk untimed: count 0 refreshes and computes statistics in every variant
            params, state, _ = compiled(params, state, x_pool, y_pool, idx, key)
            live[m.name] = {"compiled": compiled, "params": params, "state": state}
            meta[m.name] = row

        def runner(name, idx=idx, key=key, live=live):
            def run():
                v = live[name]
                v["params"], v["state"], losses = v["compiled"](
                    v["params"], v["state"], x_pool, y_pool, idx, key)
                return losses
            return run

        if live:
            heavy = max(meta[n]["model_flops"]["total"] for n in live) > 5e9
            times = harness.time_chunks({n: runner(n) for n in live}, min(reps, 3) if heavy
                                      else reps)
            for name, t in times.items():
                row = meta[name]
                row["no_refresh_ms_per_step"] = float(np.median(t) / steps * 1e3)
                row["ms_per_step"] = row["no_refresh_ms_per_step"] + row["refresh_ms"] / 100.0
                rows.append(row)
                bar.update(1)
        live.clear()
    bar.close()
    for row in rows:
        ref = [r for r in rows if r["method"] == "adam" and r["width"] == row["width"]
               and r["batch"] == row["batch"] and "ms_per_step" in r]
        if ref and "ms_per_step" in row:
            row["ratio_to_adam"] = row["ms_per_step"] / ref[0]["ms_per_step"]
    return rows


def plot(rows: Sequence[Mapping], path: Path, *, dpi: int = 100) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.6))
    methods = sorted({r["method"] for r in rows})
    for name in methods:
        for ax_t, ax_m, key, fixed in ((axes[0], axes[1], "width", ("batch", 100)),
                                       (axes[2], axes[3], "batch", ("width", 64))):
            sel = sorted((r for r in rows if r["method"] == name and r[fixed[0]] == fixed[1]),
                         key=lambda r: r[key])
            run = [r for r in sel if "ms_per_step" in r]
            if run:
                ax_t.plot([r[key] for r in run], [r["ms_per_step"] for r in run], "o-",
                          label=name)
            ax_m.plot([r[key] for r in sel], [r["state_bytes"] / 2**20 for r in sel], "o-",
                      label=f"{name} state")
            tmp = [r for r in sel if "xla_temp_bytes" in r]
            if tmp:
                ax_m.plot([r[key] for r in tmp], [r["xla_temp_bytes"] / 2**20 for r in tmp],
                          "x:", label=f"{name} XLA temp")
        run = [r for r in rows if r["method"] == name and "ms_per_step" in r]
        axes[4].plot([r["model_flops"]["total"] for r in run], [r["ms_per_step"] for r in run],
                     "o", label=name)
    run = [r for r in rows if "ms_per_step" in r]
    if run:
        f = np.array([r["model_flops"]["total"] for r in run])
        t = np.array([r["ms_per_step"] for r in run])
        big = f >= np.median(f)
        rate = float(np.median(f[big] / (t[big] * 1e-3)))
        grid = np.geomspace(f.min(), f.max(), 50)
        axes[4].plot(grid, grid / rate * 1e3, "k--", lw=0.8,
                     label=f"model at {rate / 1e9:.0f} GFLOP/s")
    titles = ("ms per step vs width (batch 100)", "memory (MiB) vs width",
              "ms per step vs batch (width 64)", "memory (MiB) vs batch",
              "FLOP model (SPEC §6) vs measured")
    xlabels = ("hidden width h", "hidden width h", "batch size", "batch size",
               "model flops per step")
    for ax, title, xl in zip(axes, titles, xlabels, strict=True):
        ax.set_xscale("log", base=2 if ax is not axes[4] else 10)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[4].set_ylabel("ms per step")
    fig.suptitle("784-h-h-h-10 relu MLP: RNGD vs Adam")
    return common.save_figure(fig, path, dpi=dpi)


def run(args: argparse.Namespace) -> dict:
    quick = not args.full
    widths = QUICK_WIDTHS if quick else WIDTHS
    batches = QUICK_BATCHES if quick else BATCHES
    try:
        x_pool = harness.load_data(args.data_dir, whiten=False).x_train[:20_000]
        source = "Fashion-MNIST"
    except FileNotFoundError:
        x_pool = jax.random.uniform(jax.random.PRNGKey(0), (20_000, 784))
        source = "uniform noise"
    configs = [Config(w, 100) for w in widths] + [Config(64, b) for b in batches if b != 100]
    rows = measure(configs, scaling_methods(), x_pool, steps=args.steps, reps=args.reps,
                   max_state_gb=args.max_state_gb, progress=not args.no_progress)
    out = Path(args.out)
    config = {"widths": widths, "batches": batches, "steps": args.steps, "reps": args.reps,
              "max_state_gb": args.max_state_gb, "inputs": source,
              "methods": {m.name: dataclasses.asdict(m) for m in scaling_methods()}}
    common.write_json(out / "scaling.json", {"rows": rows}, config=config, digits=5)
    png = plot(rows, out / "scaling.png")
    if args.full and args.out == common.DEFAULT_OUT:
        figures = Path(__file__).parent / "figures"
        figures.mkdir(exist_ok=True)
        plot(rows, figures / "scaling.png", dpi=45)
        shutil.copy(out / "scaling.json", figures / "scaling.json")
    for r in rows:
        ms = r.get("ms_per_step")
        print(f"{r['method']:16s} h={r['width']:5d} n={r['batch']:5d} "
              f"{'skipped' if ms is None else f'{ms:9.3f} ms'} "
              f"x{r.get('ratio_to_adam', float('nan')):6.2f} "
              f"state {r['state_bytes'] / 2**20:9.1f} MiB "
              f"model {r['model_flops']['total'] / 1e6:10.1f} MFLOP")
    print(f"wrote {out / 'scaling.json'} and {png}")
    return {"rows": rows}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="full", action="store_false",
                       help=f"widths {QUICK_WIDTHS}, batches {QUICK_BATCHES}")
    scale.add_argument("--full", dest="full", action="store_true",
                       help=f"widths {WIDTHS}, batches {BATCHES} (default)")
    p.set_defaults(full=True)
    p.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    p.add_argument("--reps", type=int, default=5, help="timed chunks per configuration")
    p.add_argument("--max-state-gb", type=float, default=3.0)
    p.add_argument("--out", type=str, default=common.DEFAULT_OUT)
    p.add_argument("--data-dir", type=str, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
