"""RNGD side by side with Adam, SGD and the real peers, in one process (SPEC §6, §9).

Run from the repository root::

    python -m benchmarks.speed              # paper MLP 10 epochs + wide MLP 2 epochs, all methods
    python -m benchmarks.speed --quick      # paper MLP 5 epochs + wide MLP 1/3 epoch, fewer
    python -m benchmarks.speed --workloads paper --methods adam,muon,rngd_white_k10

The quick run takes about 15 minutes on 2 CPU cores (4 for the paper MLP, the rest for the
wide one, where Muon, PSGD and kfac-jax take 0.3-1 s a step).

Workloads (:data:`WORKLOADS`): the paper's 784-64-64-64-10 relu MLP and the same MLP at width
1024, on Fashion-MNIST at batch 100.  Every method of a workload trains on the same minibatch
sequence, one ``lax.scan``ned chunk of 100 steps at a time, methods taking turns in rotating
order (:func:`benchmarks.harness.train_interleaved`); compilation is never timed.

Methods (:func:`default_methods`): ``adam``, ``adamw`` (full run), ``sgd`` (momentum 0.9);
``rngd`` (:func:`rfim_jax.rngd` with the paper's layers, statistics every step), ``rngd_k10``
(full run), ``rngd_white`` (full run), ``rngd_white_k10`` (inputs whitened once, the input
layer's kind None, statistics every 10th step), ``rngd_white_eigen_k10`` (the recommended fast
configuration: the same with ``representation="eigen"``), ``rngd_white_eigen`` and
``rngd_white_k20`` (full run); and the peers of :mod:`benchmarks.peers`: ``kfac_jax``
(kfac-jax, with its compatibility shim), ``psgd_kron`` (psgd-jax, with its shim), ``muon``
(``optax.contrib.muon``) and ``kfac_ref`` (a plain-JAX K-FAC kept as an extra reference).  A
peer that does not install, import or run is reported as unavailable with the reason.

Output (``--out``, default ``results/``): ``speed.json``, rewritten after every round and every
measurement (``"complete": false`` until the end), and ``speed.png``; rows stream to stdout.
Per method: median ms per step and its ratios to Adam (of medians, paired by round, of process
CPU time), time to each training-loss target with the test accuracy there, final training loss
and test accuracy, optimiser state bytes against params bytes.  For the paper MLP also the RNGD
split (statistics / refresh / apply), the statistics kernels, the FLOP model next to XLA's
count, and the GFLOP/s each RNGD variant reaches against the machine's matmul rate.  Versions
of jax, optax and every peer are recorded.  ``--blas-threads`` (default 1) caps the OpenBLAS
threads behind jax's CPU LAPACK for the whole run (:func:`benchmarks.harness.limit_blas_threads`:
the eigen refresh's ``eigh`` oversubscribes the cores otherwise).  No acceptance threshold is
checked here: the issues and the README state those, against these numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax

import rfim_jax
from benchmarks import cost, harness, peers, report
from benchmarks.cost import (  # noqa: F401 - re-exported for scripts and tests
    flop_model,
    refresh_seconds,
    rngd_split,
    statistics_kernels,
    xla_step_flops,
)
from benchmarks.harness import (  # noqa: F401 - re-exported for scripts and tests
    BATCH,
    CHUNK,
    EVAL_SUBSET,
    PAPER_SIZES,
    TARGETS,
    WHITEN_DAMPING,
    Data,
    Method,
    compile_chunk,
    epoch_indices,
    evaluate,
    load_data,
    make_chunk,
    make_optimizer,
    make_step,
    rngd_layer_kinds,
    summarise_runs,
    time_chunks,
    time_to_target,
    train_interleaved,
)
from benchmarks.peers.kfac_jax import run_standalone as kfac_jax_run  # noqa: F401
from benchmarks.peers.kfac_ref import (  # noqa: F401 - re-exported for scripts and tests
    KFACRefState,
    sampled_preact_grads,
    scale_by_kfac_ref,
)
from experiments import common
from experiments import models as mlp


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to train: its layer widths, training length (full and quick runs), batch.

    ``profile`` adds the RNGD split, the kernels and the FLOP model (exact RNGD, paper sizes).
    ``chunk`` (steps per timed chunk) must divide the steps of an epoch.
    """

    name: str
    sizes: tuple[int, ...]
    epochs: float
    quick_epochs: float
    profile: bool = False
    batch: int = BATCH
    chunk: int = CHUNK

    @property
    def title(self) -> str:
        return "-".join(map(str, self.sizes)) + f" relu MLP, batch {self.batch}"


WORKLOADS = {
    "paper": Workload("paper", PAPER_SIZES, 10, 5, profile=True),  # Fashion-MNIST
    # quick: 2 chunks of 100 steps; Muon, PSGD and kfac-jax take ~0.5 s a step here on 2 cores
    "wide": Workload("wide", (784, 1024, 1024, 1024, 10), 2, 1 / 3),
}

#: learning rates, from the grids of :data:`LR_GRIDS` (``--tune``: lowest training-subset loss
#: on the paper MLP, seed 0): Adam, SGD, RNGD and the K-FAC reference after 3 epochs, Muon and
#: PSGD after 2 (Muon: 0.25 at 0.005 against 0.27 at 0.01 and 0.30 at 0.002; PSGD: 0.22 at
#: 1e-3 against 0.23 at 3e-4 and 0.29 at 3e-3).  kfac-jax takes the K-FAC reference's rate,
#: momentum and damping (1 epoch: 0.30 at 0.01 against 0.34 at 0.03).  ``rngd_k10`` keeps
#: rngd's rate so that only k differs.
DEFAULT_LRS = {
    "adam": 1e-3,
    "adamw": 1e-3,
    "sgd": 0.02,
    "rngd": 0.01,
    "rngd_white": 0.02,
    "rngd_white_k10": 0.02,
    "rngd_white_k20": 0.02,
    "rngd_white_eigen": 0.02,
    "rngd_white_eigen_k10": 0.02,
    "kfac_ref": 0.01,
    "kfac_jax": 0.01,
    "muon": 0.005,
    "psgd_kron": 1e-3,
}
LR_GRIDS = {
    "adam": (3e-4, 1e-3, 3e-3),
    "adamw": (3e-4, 1e-3, 3e-3),
    "sgd": (0.01, 0.02, 0.05, 0.1),
    "rngd": (0.005, 0.01, 0.02, 0.05),
    "kfac_ref": (0.005, 0.01, 0.02, 0.05),
    "kfac_jax": (0.003, 0.01, 0.03),
    "muon": (0.002, 0.005, 0.01, 0.02),
    "psgd_kron": (3e-4, 1e-3, 3e-3),
}
#: methods of a full run only.
FULL_ONLY = ("adamw", "rngd_k10", "rngd_white", "rngd_white_k20", "rngd_white_k10_damp",
             "rngd_white_k10_wd", "rngd_white_eigen")


def default_methods(quick: bool = False, lrs: Mapping[str, float] | None = None) -> list[Method]:
    """The methods of a run; ``lrs`` maps a method name or family to its learning rate."""
    lrs = dict(DEFAULT_LRS) | dict(lrs or {})

    def lr(name, family):
        return lrs.get(name, lrs[family])

    methods = [
        Method("adam", "adam", lr("adam", "adam"), momentum=0.0),
        Method("adamw", "adamw", lr("adamw", "adamw"), momentum=0.0, weight_decay=1e-4),
        Method("sgd", "sgd", lr("sgd", "sgd")),
        Method("rngd", "rngd", lr("rngd", "rngd")),
        Method("rngd_k10", "rngd", lr("rngd_k10", "rngd"), update_every=10),
        Method("rngd_white", "rngd", lr("rngd_white", "rngd"), whiten=True),
        Method("rngd_white_k10", "rngd", lr("rngd_white_k10", "rngd"), whiten=True,
               update_every=10),
        Method("rngd_white_k20", "rngd", lr("rngd_white_k20", "rngd"), whiten=True,
               update_every=20),
        # Eigen (SPEC §7) in place of the exact per-neuron blocks: statistics and apply cost
        # O(n d^2 + n m d) and O(m d^2) dense matmuls instead of per-neuron blocks.
        Method("rngd_white_eigen", "rngd", lr("rngd_white_eigen", "rngd"), whiten=True,
               representation="eigen"),
        Method("rngd_white_eigen_k10", "rngd", lr("rngd_white_eigen_k10", "rngd"),
               whiten=True, update_every=10, representation="eigen"),
        # Regularised fast configurations: RNGD's generalisation gap (README).
        Method("rngd_white_k10_damp", "rngd", lr("rngd_white_k10", "rngd"), whiten=True,
               update_every=10, damping=0.1),
        Method("rngd_white_k10_wd", "rngd", lr("rngd_white_k10", "rngd"), whiten=True,
               update_every=10, weight_decay=1e-3),
        Method("kfac_ref", "kfac_ref", lr("kfac_ref", "kfac_ref"), decay=0.95, damping=0.1,
               inverse_every=100),
        Method("kfac_jax", "kfac_jax", lr("kfac_jax", "kfac_jax"), damping=0.1,
               inverse_every=5),
        Method("psgd_kron", "psgd_kron", lr("psgd_kron", "psgd_kron")),
        Method("muon", "muon", lr("muon", "muon"), momentum=0.95),
    ]
    if quick:
        methods = [m for m in methods if m.name not in FULL_ONLY]
    return methods


def _profile(methods: Sequence[Method], runs_summary: Mapping, data: Data, *, quick: bool,
             seed: int, rec: harness.Recorder, out: dict) -> None:
    """The paper MLP's split, kernels, FLOP model and GFLOP/s, each streamed as measured."""
    by_name = {m.name: m for m in methods}
    out["rngd_split"] = {}
    for name in ("rngd", "rngd_white_k10", "rngd_white_eigen_k10"):
        if name in by_name:
            sp = rngd_split(by_name[name], data, reps=5 if quick else 9, seed=seed)
            out["rngd_split"][name] = sp
            rec.set("workloads", rec.results["workloads"], text=report.split_line(name, sp))
    out["statistics_kernels"] = statistics_kernels(reps=10 if quick else 30)
    out["matmul_rate"] = cost.matmul_rate()
    rec.set("workloads", rec.results["workloads"],
            text=f"machine matmul rate (1024^2 float32): "
                 f"{out['matmul_rate']['gflops_per_s']:.1f} GFLOP/s")
    flops = {}
    for m in methods:
        if m.family not in ("rngd", "adam") or not runs_summary.get(m.name, {}).get(
                "median_ms_per_step"):
            continue
        kinds = rngd_layer_kinds(PAPER_SIZES, m.whiten) if m.family == "rngd" else {}
        model = flop_model(PAPER_SIZES, BATCH, kinds, update_every=m.update_every,
                           inverse_every=m.inverse_every,
                           representations=out["rngd_plans"].get(m.name))["total"]
        ms = runs_summary[m.name]["median_ms_per_step"]
        flops[m.name] = {"model": model, "xla_step_flops": xla_step_flops(m, PAPER_SIZES, BATCH),
                         "model_gflops_per_s": model["total"] / ms / 1e6,
                         "fraction_of_matmul_rate": model["total"] / ms / 1e6
                         / out["matmul_rate"]["gflops_per_s"]}
        rec.set("workloads", rec.results["workloads"],
                text=f"flops {m.name}: model {model['total'] / 1e6:.1f} MFLOP/step, "
                     f"{flops[m.name]['model_gflops_per_s']:.1f} GFLOP/s "
                     f"({100 * flops[m.name]['fraction_of_matmul_rate']:.0f}% of matmul rate)")
    out["flops"] = flops


def run_workload(w: Workload, methods: Sequence[Method], data: Data, *, epochs: float,
                 seed: int, quick: bool, progress: bool, rec: harness.Recorder) -> dict:
    """Trains ``methods`` on workload ``w`` interleaved, streaming a row per round."""
    out = rec.results.setdefault("workloads", {}).setdefault(w.name, {})
    out |= {"title": w.title, "sizes": w.sizes, "epochs": epochs}
    steps_per_epoch = data.num_train // w.batch
    out["rngd_plans"] = _rngd_plans(methods, w.sizes)
    rec.print(f"== {w.name}: {w.title}, {epochs:g} epochs; RNGD representations: "
              + "; ".join(f"{n}: {', '.join(f'{p} {r}' for p, r in plan.items())}"
                          for n, plan in out["rngd_plans"].items()))

    def on_round(c, total, runs):
        losses = "  ".join(f"{n} {r['eval_loss'][-1]:.3f}" for n, r in runs.items()
                           if "eval_loss" in r)
        out["methods"] = summarise_runs(runs, w.chunk, steps_per_epoch)
        out["curves"] = _curves(runs)
        rec.set("workloads", rec.results["workloads"],
                text=f"[{w.name} {c}/{total}] subset loss: {losses}")

    runs = train_interleaved(methods, data, sizes=w.sizes, epochs=epochs, batch=w.batch,
                             chunk=w.chunk, seed=seed, progress=progress, on_round=on_round)
    out["methods"] = summarise_runs(runs, w.chunk, steps_per_epoch)
    out["curves"] = _curves(runs)
    rec.print(report.table_header(TARGETS))
    for name, s in out["methods"].items():
        rec.set("workloads", rec.results["workloads"], text=report.table_row(name, s, TARGETS))
    if w.profile:
        _profile(methods, out["methods"], data, quick=quick, seed=seed, rec=rec, out=out)
    return out


def _rngd_plans(methods: Sequence[Method], sizes: Sequence[int]) -> dict:
    """Per RNGD method, the representation :func:`rfim_jax.rngd_plan` picks for each layer."""
    params = jax.eval_shape(lambda: mlp.init_mlp(jax.random.PRNGKey(0), sizes))
    plans = {}
    for m in methods:
        if m.family == "rngd":
            kinds = {p: k for p, k in rngd_layer_kinds(sizes, m.whiten, m.output_kind).items()
                     if k is not None}
            plan = rfim_jax.rngd_plan(params, kinds, representation=m.representation)
            plans[m.name] = {p: v.representation for p, v in plan.items()}
    return plans


def _curves(runs: Mapping) -> dict:
    keys = ("steps", "eval_loss", "eval_test_accuracy", "batch_loss", "chunk_seconds",
            "prep_seconds")
    return {n: {k: r[k] for k in keys} for n, r in runs.items() if "steps" in r}


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark of ``args`` (:func:`parse_args`); returns the results."""
    quick = not args.full
    workloads = [WORKLOADS[w] for w in args.workloads.split(",")]
    methods = default_methods(quick)
    if args.methods:
        keep = set(args.methods.split(","))
        methods = [m for m in methods if m.name in keep or m.name == "adam"]
    out = Path(args.out)
    config = {"workloads": [dataclasses.asdict(w) for w in workloads], "seed": args.seed,
              "quick": quick, "targets": TARGETS, "eval_subset": EVAL_SUBSET,
              "whiten_damping": WHITEN_DAMPING,
              "epochs_override": args.epochs,
              "blas_threads": getattr(args, "blas_threads", 1)}
    rec = harness.Recorder(out / "speed.json", config)
    versions = harness.versions()
    rec.set("versions", versions,
            text="versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    avail = {f: dataclasses.asdict(peers.availability(f)) for f in peers.FAMILIES}
    rec.set("peers", avail, text="\n".join(
        f"peer {f}: " + (f"available (version {a['version'] or 'built in'}"
                         + (f"; shims: {'; '.join(a['shims'])}" if a["shims"] else "") + ")"
                         if a["available"] else f"unavailable: {a['reason']}")
        for f, a in avail.items()))

    data = load_data(args.data_dir, seed=args.seed, train_size=args.train_size)
    if args.tune:
        tuned = harness.tune_learning_rates(methods, LR_GRIDS, data, epochs=args.tune_epochs,
                                            seed=args.seed, progress=not args.no_progress)
        rec.set("tuning", tuned, text=f"tuned learning rates: {tuned['chosen']}")
        methods = [dataclasses.replace(m, learning_rate=tuned["chosen"].get(m.name,
                                                                            m.learning_rate))
                   for m in methods]
    rec.set("methods", {m.name: dataclasses.asdict(m) | {"description": m.describe()}
                        for m in methods})
    for w in workloads:
        epochs = args.epochs if args.epochs is not None else (w.quick_epochs if quick
                                                              else w.epochs)
        run_workload(w, methods, data, epochs=epochs, seed=args.seed, quick=quick,
                     progress=not args.no_progress, rec=rec)
    rec.finish()
    results = rec.results
    png = report.plot(results["workloads"], out / "speed.png", targets=TARGETS)
    for name, wres in results["workloads"].items():
        rec.print(f"\n{name} ({wres['title']}):\n" + report.markdown_table(wres["methods"],
                                                                           TARGETS))
    if args.figures:
        figures = Path(__file__).parent / "figures"
        figures.mkdir(exist_ok=True)
        report.plot(results["workloads"], figures / "speed.png", targets=TARGETS, dpi=55)
        shutil.copy(out / "speed.json", figures / "speed.json")
    rec.print(f"wrote {out / 'speed.json'} and {png}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="full", action="store_false",
                       help="quick epochs of each workload, fewer methods")
    scale.add_argument("--full", dest="full", action="store_true",
                       help="full epochs, every method (default)")
    p.set_defaults(full=True)
    p.add_argument("--workloads", type=str, default="paper,wide",
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--epochs", type=float, default=None,
                   help="epochs of every workload (default: the workload's)")
    p.add_argument("--methods", type=str, default=None,
                   help="comma-separated method names (adam is always kept as the reference)")
    p.add_argument("--tune", action="store_true", help="sweep learning rates first")
    p.add_argument("--tune-epochs", type=float, default=3)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=common.DEFAULT_OUT)
    p.add_argument("--data-dir", type=str, default=None)
    p.add_argument("--no-progress", action="store_true")
    harness.add_blas_threads_arg(p)
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=None,
                   help="also write benchmarks/figures/speed.{json,png} (default: only for a "
                        "full run into the default --out)")
    args = p.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    if args.methods:
        known = [m.name for m in default_methods(not args.full)]
        unknown = set(args.methods.split(",")) - set(known)
        if unknown:
            full_only = sorted(unknown & {m.name for m in default_methods(False)})
            hint = f" ({full_only} run only with --full)" if full_only else ""
            p.error(f"unknown methods {sorted(unknown)}{hint}; choose from {known}")
    if args.figures is None:
        args.figures = args.full and args.out == common.DEFAULT_OUT
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point: ``python -m benchmarks.speed [flags]``."""
    args = parse_args(argv)
    with harness.limit_blas_threads(args.blas_threads):
        return run(args)


if __name__ == "__main__":
    main()
