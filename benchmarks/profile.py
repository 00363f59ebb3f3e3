"""Where one method's step time goes, op by op: a ``jax.profiler`` trace of the compiled chunk.

Run from the repository root::

    python -m benchmarks.profile          # rngd, rngd_white_k10, rngd_white_eigen_k10 against adam
    python -m benchmarks.profile --methods rngd --top 30

For each method of the paper MLP (:func:`benchmarks.speed.default_methods`, random inputs of
Fashion-MNIST's shape: the cost of a step does not depend on the pixel values) the chunk of
:data:`benchmarks.harness.CHUNK` steps is compiled exactly as the speed benchmark compiles it,
run once untimed, then traced for ``--chunks`` chunks.  It prints, per executed XLA op, the
microseconds per training step and how often it runs per step, with the op's shape and source
(the ``op_name`` of the compiled HLO, e.g. ``.../cond/branch_1_fun/...`` for a refresh), and
counts the conditionals in the compiled step.  This is the profile that showed where RNGD's
overhead was (README, *Where the step time went*): per-layer ``lax.cond``\\ s, full passes
over the state for traces and finiteness checks, and a transposed copy in the per-neuron
statistics.

On a GPU the op names are kernel names; the trace is the same ``perfetto_trace.json.gz``
(``--keep DIR`` keeps it, for https://ui.perfetto.dev).  Writes ``profile.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, speed
from experiments import common
from experiments import models as mlp

#: Trace events that are the runtime's own bookkeeping, not ops of the program.
_RUNTIME = re.compile(r"^\$|ThunkExecutor|SlinkyThreadPool|PjitFunction|^while\.\d+$")


def _hlo_ops(text: str) -> dict[str, str]:
    """HLO instruction name -> ``"shape  op_name"`` of the compiled module's text."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+)", line)
        if not m:
            continue
        where = re.search(r'op_name="([^"]*)"', line)
        out[m.group(1)] = f"{m.group(2)}  {where.group(1) if where else ''}"
    return out


def _device_pids(events) -> set | None:
    """The trace's accelerator processes (``/device:GPU:0``...), None on a CPU-only trace.

    On an accelerator the host threads also record the launches and the runtime's waits;
    counting them with the kernels would count the step twice, so only device time is kept.
    """
    pids = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    return pids or None


def profile_method(method: harness.Method, *, chunks: int = 3, seed: int = 0,
                   keep: str | None = None) -> dict:
    """Per-op microseconds per step of ``method``'s compiled chunk on the paper MLP."""
    sizes = harness.PAPER_SIZES
    n = 60_000
    x = jax.random.uniform(jax.random.PRNGKey(seed), (n, sizes[0]))
    y = jax.random.randint(jax.random.PRNGKey(seed + 1), (n,), 0, sizes[-1])
    params = mlp.init_mlp(jax.random.PRNGKey(seed), sizes)
    idx = jnp.asarray(harness.epoch_indices(np.random.default_rng(seed), n, harness.BATCH)
                      [:harness.CHUNK])
    key = jax.random.PRNGKey(seed)
    compiled, _, state, _ = harness.compile_chunk(method, sizes, params, x, y, harness.CHUNK,
                                                  harness.BATCH)
    hlo = compiled.as_text()
    params, state, losses = compiled(jax.tree.map(jnp.copy, params), state, x, y, idx, key)
    jax.block_until_ready(losses)
    trace_dir = keep or tempfile.mkdtemp(prefix="rfim_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(chunks):
            params, state, losses = compiled(params, state, x, y, idx, key)
        jax.block_until_ready(losses)
    [trace] = sorted(Path(trace_dir).rglob("*perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    pids = _device_pids(events)
    kept = [e for e in events if e.get("ph") == "X" and not _RUNTIME.search(e["name"])
            and (pids is None or e.get("pid") in pids)]
    for e in kept:
        total[e["name"]] += e.get("dur", 0.0)
        count[e["name"]] += 1
    steps = chunks * harness.CHUNK
    ops = _hlo_ops(hlo)
    rows = [{"op": name, "us_per_step": t / steps, "runs_per_step": count[name] / steps,
             "hlo": ops.get(name, "")} for name, t in total.most_common()]
    out = {"method": method.name, "describe": method.describe(),
           "conditionals": len(re.findall(r"\bconditional\(", hlo)),
           "ops_us_per_step": sum(r["us_per_step"] for r in rows), "ops": rows}
    if pids is not None:
        out["device"] = device_timeline(kept, steps)
    return out


def device_timeline(kernels: Sequence[dict], steps: int) -> dict:
    """Per step on an accelerator: kernels (and copies) run, their busy time, the span from
    the first one's start to the last one's end, and the device-to-host copies among them.

    A small model's GPU step is bound by launches (a kernel costs 1.5-2 us however small) and
    by host round trips: a ``lax.cond`` outside a CUDA graph reads its predicate back
    (``MemcpyD2H``) and the stream waits for it.  ``span - busy`` is the device's idle time.
    """
    if not kernels:
        return {}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e.get("dur", 0.0) for e in kernels)
    reads = sum(1 for e in kernels if e.get("name") == "MemcpyD2H")
    return {"kernels_per_step": len(kernels) / steps,
            "busy_us_per_step": sum(e.get("dur", 0.0) for e in kernels) / steps,
            "span_us_per_step": (end - start) / steps,
            "host_reads_per_step": reads / steps}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="adam,rngd,rngd_white_k10,rngd_white_eigen_k10",
                        help="comma-separated names of benchmarks.speed's methods")
    parser.add_argument("--top", type=int, default=15, help="ops printed per method")
    parser.add_argument("--chunks", type=common.positive_int, default=3)
    parser.add_argument("--out", default="results")
    parser.add_argument("--keep", default=None, help="keep the traces under this folder")
    harness.add_blas_threads_arg(parser)
    args = parser.parse_args(argv)
    known = {m.name: m for m in speed.default_methods(quick=False) if harness.scannable(m)}
    names = [name.strip() for name in args.methods.split(",")]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown methods {unknown}; known (methods with a scanned chunk): "
                     f"{sorted(known)}")
    results = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
               "methods": {}}
    for name in names:
        keep = None if args.keep is None else str(Path(args.keep) / name)
        with harness.limit_blas_threads(args.blas_threads):
            r = profile_method(known[name], chunks=args.chunks, keep=keep)
        results["methods"][name] = r
        print(f"\n{name}: {r['describe']}\n  {r['ops_us_per_step']:.0f} us/step in ops, "
              f"{r['conditionals']} conditionals in the compiled chunk")
        if r.get("device"):
            d = r["device"]
            print(f"  device: {d['kernels_per_step']:.1f} kernels/step, busy "
                  f"{d['busy_us_per_step']:.1f} us of a {d['span_us_per_step']:.1f} us span, "
                  f"{d['host_reads_per_step']:.2f} host reads/step")
        for row in r["ops"][:args.top]:
            print(f"  {row['us_per_step']:8.1f} us/step  x{row['runs_per_step']:<5.2f} "
                  f"{row['op'][:28]:28s} {row['hlo'][:110]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'profile.json'}")
    return results


if __name__ == "__main__":
    main()
