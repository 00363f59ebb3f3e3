"""Tables and figures of the speed benchmark: text rows, a markdown table, one PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments import common


def _num(value, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return f"{'-':>{width}s}"
    return f"{value:{width}{fmt}}"


def _time(hit: Mapping | None, width: int = 8) -> str:
    return f"{'-':>{width}s}" if not hit else f"{hit['seconds']:{width}.2f}"


def table_header(targets: Sequence[float]) -> str:
    """The header of :func:`table_row`."""
    times = "".join(f"{'t->' + format(t, 'g'):>8s}" for t in targets)
    return (f"{'method':16s} {'ms/step':>8s} {'x Adam':>7s} {'paired':>7s} {'cpu':>6s}"
            f"{times} {'final loss':>10s} {'test acc':>8s} {'state/p':>8s}")


def table_row(name: str, s: Mapping, targets: Sequence[float]) -> str:
    """One method's line: per-step time and ratios, times to targets, final loss and accuracy.

    A method that did not run shows why.
    """
    if not s.get("available", True):
        return f"{name:16s} unavailable: {s['reason']}"
    if "median_ms_per_step" not in s:
        return f"{name:16s} failed before its first chunk: {s.get('failed')}"
    times = "".join(_time(s.get(f"time_to_{t}")) for t in targets)
    line = (f"{name:16s} {s['median_ms_per_step']:8.3f} {_num(s.get('ratio_to_adam'), '.2f', 7)} "
            f"{_num(s.get('paired_ratio_to_adam'), '.2f', 7)} "
            f"{_num(s.get('cpu_ratio_to_adam'), '.2f', 6)}{times} "
            f"{_num(s.get('final_train_loss'), '.4f', 10)} "
            f"{_num(s.get('final_test_accuracy'), '.4f', 8)} "
            f"{_num(s.get('state_to_params'), '.2f', 8)}")
    if "failed" in s:
        line += f"  (failed later: {s['failed']})"
    return line


def markdown_table(methods: Mapping[str, Mapping], targets: Sequence[float]) -> str:
    """The side-by-side table in markdown: ratios to Adam, times to targets, test accuracy."""
    head = ["method", "x Adam per step", *[f"time to loss {t:g}" for t in targets],
            "test acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in methods.items():
        if not s.get("available", True) or "median_ms_per_step" not in s:
            why = s.get("reason") or s.get("failed")
            lines.append(f"| {name} | unavailable: {why} |" + " |" * (len(head) - 2))
            continue
        cells = [name, _num(s.get("ratio_to_adam"), ".2f", 0).strip()]
        for t in targets:
            hit = s.get(f"time_to_{t}")
            cells.append(f"{hit['seconds']:.2f} s (acc {hit['test_accuracy']:.3f})"
                         if hit and "test_accuracy" in hit else
                         f"{hit['seconds']:.2f} s" if hit else "not reached")
        cells.append(_num(s.get("final_test_accuracy"), ".3f", 0).strip())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_line(name: str, sp: Mapping) -> str:
    """One line of :func:`benchmarks.cost.rngd_split`'s result."""
    return (f"split {name}: stats {sp['statistics_ms']:.3f} ms, refresh {sp['refresh_ms']:.3f} "
            f"ms (direct {sp['refresh_direct_ms']:.3f}), apply {sp['apply_ms']:.3f} ms, "
            f"base {sp['base_ms']:.3f} ms (total {sp['total_ms']:.3f})")


def plot(workloads: Mapping[str, Mapping], path: Path, *, targets: Sequence[float],
         dpi: int = 100) -> Path:
    """Loss against iterations and against seconds, and per-step time, one row per workload.

    Args:
      workloads: name -> ``{"title", "methods" (summaries), "curves"}``.
      path: the PNG to write.
      targets: the loss targets, drawn as dotted lines.
      dpi: resolution.
    """
    plt = common.pyplot()
    rows = max(1, len(workloads))
    fig, axes = plt.subplots(rows, 3, figsize=(17, 4.6 * rows), squeeze=False)
    for ax_row, w in zip(axes, workloads.values(), strict=False):
        for name, c in w["curves"].items():
            style = "-" if name.startswith("rngd") else "--"
            elapsed = c["prep_seconds"] + np.concatenate([[0.0], np.cumsum(c["chunk_seconds"])])
            ax_row[0].plot(c["steps"], c["eval_loss"], style, label=name)
            ax_row[1].plot(elapsed, c["eval_loss"], style, label=name)
        for ax, xl in zip(ax_row[:2], ("iterations", "training seconds (incl. preprocessing)"),
                          strict=True):
            ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("training loss (10k-sample subset)")
            for t in targets:
                ax.axhline(t, color="gray", lw=0.6, ls=":")
            ax.grid(alpha=0.3, which="both")
        ax_row[0].legend(fontsize=7)
        ax_row[0].set_title(f"{w['title'].replace(' relu MLP', '')}: loss per iteration",
                            fontsize=10)
        ax_row[1].set_title("loss per second (one process, interleaved)", fontsize=10)
        ran = {n: s for n, s in w["methods"].items() if "median_ms_per_step" in s}
        names = list(ran)
        bars = ax_row[2].barh(names, [ran[n]["median_ms_per_step"] for n in names],
                              color="tab:gray")
        for b, n in zip(bars, names, strict=True):
            ratio = ran[n].get("ratio_to_adam")
            if ratio is not None:
                ax_row[2].text(b.get_width(), b.get_y() + b.get_height() / 2, f" {ratio:.1f}x",
                               va="center", fontsize=8)
        ax_row[2].set_xscale("log")
        ax_row[2].set_xlabel("median ms per step (ratio to Adam)")
        ax_row[2].invert_yaxis()
        ax_row[2].set_title("per-step time", fontsize=10)
    return common.save_figure(fig, path, dpi=dpi)
