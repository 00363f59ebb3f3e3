"""Shared experiment utilities: command line, JSON output, progress bars, tau-sharp ratio, plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = "results"


# ------------------------------------------------------------------------------ command line


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of epochs, steps, iterations)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_data_dir(parser: argparse.ArgumentParser, args, reads_idx: bool) -> None:
    """Refuses ``--data-dir`` for a run that would not read it (a quick run on the digits).

    Raises:
      SystemExit: through ``parser.error``, saying which runs read it.
    """
    if args.data_dir is not None and not reads_idx:
        parser.error("--data-dir is read only by the runs on Fashion-MNIST (--full); the quick "
                     "run trains on the embedded 8x8 digits and would ignore it.")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir}: no such directory (it should hold the "
                     f"Fashion-MNIST IDX files).")


def existing_path(text: str) -> str:
    """An argparse type: a path that exists (a file or a directory)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


def floats_in(low: float, high: float | None, *, closed_high: bool = False):
    """An argparse type: comma-separated floats in ``[low, high)`` (``]`` with
    ``closed_high``; no upper bound for ``high=None``), as a tuple."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
        for v in values:
            above = high is not None and (v > high if closed_high else v >= high)
            if not math.isfinite(v) or v < low or above:
                bound = "inf" if high is None else high
                raise argparse.ArgumentTypeError(
                    f"{v} is outside [{low}, {bound}{']' if closed_high else ')'}")
        return values
    return parse


def make_parser(description: str, *, data_dir: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment shares.

    ``--quick`` (the default) and ``--full`` select the scale, ``--seed`` the base seed,
    ``--out`` the output directory (default ``results/``) and, with ``data_dir``,
    ``--data-dir`` an IDX directory (default: Debian's Fashion-MNIST location).
    """
    parser = argparse.ArgumentParser(description=description)
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="full", action="store_false",
                       help="small, fast run on the embedded 8x8 digits (default)" if data_dir
                       else "small, fast run (default)")
    scale.add_argument("--full", dest="full", action="store_true",
                       help="paper-scale run on all tasks")
    parser.set_defaults(full=False)
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--out", type=str, default=DEFAULT_OUT,
                        help=f"output directory for JSON and PNG (default {DEFAULT_OUT}/)")
    if data_dir:
        parser.add_argument("--data-dir", type=str, default=None,
                            help="directory of MNIST-format IDX files "
                                 "(default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


# ------------------------------------------------------------------------------ JSON output


def to_jsonable(obj: Any, *, digits: int | None = None) -> Any:
    """Converts numpy/JAX values, dataclasses, tuples and paths to JSON types.

    Non-finite floats become ``None`` (JSON has no NaN); ``digits`` rounds floats to that many
    significant digits to keep large result files small.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, digits=digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, digits=digits) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # numpy and JAX arrays, scalars
        arr = np.asarray(obj)
        if arr.ndim > 0:
            return to_jsonable(arr.tolist(), digits=digits)
        obj = arr.item()
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.{digits}g}") if digits else obj
    return str(obj)


def environment() -> dict:
    """Versions and machine facts worth recording next to results."""
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def write_json(path: str | os.PathLike, results: dict, *, config: Any = None,
               digits: int | None = None) -> Path:
    """Writes ``{"config": config, "environment": ..., **results}`` as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {}
    if config is not None:
        payload["config"] = config
    payload["environment"] = environment()
    payload["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    payload.update(results)
    path.write_text(json.dumps(to_jsonable(payload, digits=digits), indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------- progress


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar (``disable=not enabled``); kwargs go to tqdm."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------- tau-sharp ratio


def tau_sharp_ratio(costs: Sequence[float] | np.ndarray, taus: Sequence[float]) -> dict:
    """The tau-sharp ratio: the training cost over the last ``tau * M`` of ``M`` iterations.

    For ``costs`` of shape (M,), entry ``tau`` of the result is ``{"mean", "std", "window"}``:
    mean and (population) standard deviation of ``costs[M - k:]`` with ``k = ceil(tau * M)``
    (at least 1).  For ``costs`` of shape (R, M) (R runs), each run's window mean is taken
    first; ``"mean"`` and ``"std"`` are then across the R window means, and ``"per_run"``
    lists them.  Keys are the taus as given.  Each tau must be in (0, 1].
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim not in (1, 2) or costs.shape[-1] == 0:
        raise ValueError(
            f"tau_sharp_ratio: costs must have shape (M,) or (runs, M) with M >= 1, got "
            f"{costs.shape}."
        )
    m = costs.shape[-1]
    out = {}
    for tau in taus:
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau_sharp_ratio: every tau must be in (0, 1], got {tau}.")
        k = max(1, math.ceil(tau * m - 1e-9))
        window = costs[..., m - k:]
        if costs.ndim == 1:
            out[tau] = {"mean": float(window.mean()), "std": float(window.std()), "window": k}
        else:
            per_run = window.mean(axis=-1)
            out[tau] = {"mean": float(per_run.mean()), "std": float(per_run.std()),
                        "window": k, "per_run": per_run.tolist()}
    return out


# ---------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_band(ax, x, mean, lo=None, hi=None, *, label=None, color=None, alpha=0.2, **kwargs):
    """A mean line with a shaded band between ``lo`` and ``hi`` (e.g. min-max or +-std)."""
    (line,) = ax.plot(x, mean, label=label, color=color, **kwargs)
    if lo is not None and hi is not None:
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=alpha, linewidth=0)
    return line


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Saves ``fig`` as PNG (creating the directory) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


# ------------------------------------------------------------------- training-curve timing


def time_to_target(times: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The first ``times[i]`` with ``losses[i] <= target``, or None if never reached."""
    for t, loss in zip(times, losses, strict=True):
        if loss <= target:
            return float(t)
    return None


def interleaved_timing(steps: dict, states: dict, params0: Any, batches: Sequence[tuple],
                       rounds: int) -> dict[str, float]:
    """Median milliseconds per step of each method, the methods interleaved round by round.

    ``steps[m](params, state, *batch) -> (params, state, loss)`` are compiled steps; every
    round runs each method once over ``batches`` (the same batches for all), so slow drifts of
    the machine hit every method alike.
    """
    import jax

    times: dict[str, list[float]] = {m: [] for m in steps}
    # Each method gets its own copy: a step may donate its params' buffers.
    carry = {m: (jax.tree.map(lambda a: a.copy(), params0), states[m]) for m in steps}
    for _ in range(rounds):
        for method, step in steps.items():
            params, state = carry[method]
            t0 = time.perf_counter()
            for batch in batches:
                params, state, loss = step(params, state, *batch)
            jax.block_until_ready(loss)
            times[method].append((time.perf_counter() - t0) / len(batches) * 1e3)
            carry[method] = (params, state)
    return {m: float(np.median(t)) for m, t in times.items()}


# ------------------------------------------------------------------- training-comparison CLIs


def checked_step(method: str, build, params: Any, trial_args: Sequence) -> tuple[Any, Any]:
    """``(step, state)`` of an optimiser that may not run here (a peer), after a trial step.

    ``build()`` returns ``(step, state)`` with ``step(params, state, *trial_args) -> (params,
    state, loss)``.  The trial step runs on copies of ``params`` and ``state`` (a step may
    donate its buffers, as kfac-jax's does) and its result is dropped; it also compiles the
    step.

    Returns:
      ``(step, state)``, or ``(None, reason)`` when building or the trial step raises: the
      caller reports the method as unavailable with that reason instead of skipping it.
    """
    import jax
    import jax.numpy as jnp

    try:
        step, state = build()
        # Only the arrays: a Python scalar in a state (kfac-jax's step count, a static
        # argument of its step) must stay one.
        copies = jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a,
                              (params, state))
        jax.block_until_ready(step(*copies, *trial_args))
    except Exception as e:  # noqa: BLE001 - any failure is reported, not hidden
        return None, f"{method}: {type(e).__name__}: {e}"
    return step, state


def peer_version(method: str) -> str | None:
    """The package and version behind an experiment's peer method ("psgd": psgd-jax, "muon":
    optax, "kfac": kfac-jax), None for any other method."""
    import optax

    from benchmarks.peers import distribution_version

    if method == "muon":
        return f"optax {optax.__version__}"
    dist = {"psgd": "psgd-jax", "kfac": "kfac-jax"}.get(method)
    return f"{dist} {distribution_version(dist)}" if dist else None


def method_list(methods: Sequence[str]):
    """An argparse ``type``: a comma-separated subset of ``methods``, as a tuple."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(",") if n)
        unknown = [n for n in names if n not in methods]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown names {unknown or [text]}; choose from {','.join(methods)}")
        return names
    return parse


def learning_rate_overrides(methods: Sequence[str]):
    """An argparse ``type``: ``name=rate,...`` for names in ``methods`` and rates > 0."""
    def parse(text: str) -> dict[str, float]:
        out = {}
        for item in text.split(","):
            name, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"{item!r} is not name=rate, e.g. rngd=0.02")
            if name not in methods:
                raise argparse.ArgumentTypeError(
                    f"unknown method {name!r}; choose from {','.join(methods)}")
            try:
                rate = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name}={value!r}: the rate is not a number") from None
            if not (math.isfinite(rate) and rate > 0):
                raise argparse.ArgumentTypeError(f"{name}={value}: the rate must be > 0")
            out[name] = rate
        return out
    return parse


def add_comparison_args(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """``--steps``, ``--lr`` and ``--methods``, shared by the method-comparison experiments."""
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per method")
    parser.add_argument("--lr", type=learning_rate_overrides(methods), default=None,
                        help="learning rates to override, e.g. rngd=0.02,adam=1e-3")
    parser.add_argument("--methods", type=method_list(methods), default=None,
                        help=f"comma-separated subset of {','.join(methods)}")


def comparison_overrides(args: argparse.Namespace) -> tuple[dict, dict[str, float]]:
    """(config overrides, learning-rate overrides) from :func:`add_comparison_args`' flags."""
    overrides: dict[str, Any] = dict(seed=args.seed, out=args.out, progress=not args.no_progress)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    return overrides, dict(args.lr or {})


def finish_comparison(results: dict, cfg: Any, full: bool, summary, plot) -> None:
    """Prints the summary and writes ``<out>/<name>[_full].json`` and ``.png``."""
    print(summary(results, cfg))
    name = cfg.name + ("_full" if full else "")
    path = write_json(f"{cfg.out}/{name}.json", results, config=cfg, digits=6)
    plot(results, cfg, f"{cfg.out}/{name}.png")
    print(f"wrote {path} and {cfg.out}/{name}.png")


def train_logged(step, params, state, batch_fn, *, steps: int, eval_every: int, evaluate,
                 targets: Sequence[float], method: str, bar, index_key: str = "iteration"
                 ) -> tuple[Any, dict]:
    """One method's training run with evaluations, shared by the method comparisons.

    Runs ``params, state, loss = step(params, state, *batch_fn(it))`` for ``steps`` steps,
    timing each step (the first, which compiles, excluded) and calling ``evaluate(params)``
    (a dict of figures whose first entry is the training loss) at every ``eval_every`` steps
    and at the end.  A non-finite training loss ends the run, and the bar says so.

    Returns:
      ``(state, log)``; ``log`` holds ``index_key``, ``"seconds"`` and each figure as lists,
      ``"diverged"``, ``"time_to_target"`` and ``"<index_key>s_to_target"`` (per target, of the
      training loss).
    """
    import jax

    log: dict[str, Any] = {index_key: [], "seconds": []}
    elapsed, diverged, first = 0.0, False, None
    for it in range(steps + 1):
        if it % eval_every == 0 or it == steps:
            figures = evaluate(params)
            first = first or next(iter(figures))
            log[index_key].append(it)
            log["seconds"].append(elapsed)
            for key, value in figures.items():
                log.setdefault(key, []).append(float(value))
            loss = log[first][-1]
            bar.set_postfix(method=method, loss=f"{loss:.3f}")
            if not math.isfinite(loss):
                diverged = True
                bar.write(f"{method}: diverged (loss {loss}) at {index_key} {it}; its curve "
                          f"stops there.")
                bar.update(steps - it)
                break
        if it == steps:
            break
        t0 = time.perf_counter()
        params, state, loss = step(params, state, *batch_fn(it))
        jax.block_until_ready(loss)
        if it > 0:  # the first step compiles
            elapsed += time.perf_counter() - t0
        bar.update(1)
    log["diverged"] = diverged
    log["time_to_target"] = {str(t): time_to_target(log["seconds"], log[first], t)
                             for t in targets}
    log[f"{index_key}s_to_target"] = {str(t): time_to_target(log[index_key], log[first], t)
                                      for t in targets}
    return state, log
