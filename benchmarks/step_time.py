"""Per-step wall time of a few methods on the paper MLP, interleaved, with solver variants.

Run from the repository root::

    python -m benchmarks.step_time                       # adam, rngd, rngd_white_k10
    python -m benchmarks.step_time --methods adam,rngd,rngd@cholesky,rngd_white_k10@gauss_jordan
    python -m benchmarks.step_time --methods adam,rngd,rngd:host,rngd_white_k10:host

A method is a name of :func:`benchmarks.speed.default_methods`, optionally ``@solver`` (an RNGD
method refreshing with that block solver, :func:`rfim_jax.rngd`'s ``solver``) and optionally
``:host`` (an RNGD method whose refresh is decided outside the update's conditional,
``refresh=True/False``: :attr:`benchmarks.harness.Method.host_refresh`).  Each method's
chunk of :data:`benchmarks.harness.CHUNK` steps is compiled exactly as the speed benchmark
compiles it (random inputs of Fashion-MNIST's shape: a step's cost does not depend on the pixel
values), then the chunks are timed interleaved and rotated, ``--reps`` times; the table gives
the median ms per step and its ratio to Adam's.  No training curve: this is the quick check of
what one setting (a solver, an ``XLA_FLAGS`` value) does to the step time on a backend, e.g.
the host round trip that a ``lax.cond`` around a cuSOLVER call costs on a GPU (README,
*Performance on a GPU*).  Writes ``step_time.json`` to ``--out`` after every method compiles
and after the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rfim_jax
from benchmarks import harness, speed
from experiments import common
from experiments import models as mlp


def parse_methods(spec: str, known: dict[str, harness.Method]) -> list[harness.Method]:
    """``"adam,rngd@cholesky,rngd:host"`` -> methods; ``@solver`` and ``:host`` only on RNGD
    methods.

    Raises:
      ValueError: for an unknown name or solver, or a variant of a method that is not RNGD.
    """
    out = []
    for item in (part.strip() for part in spec.split(",")):
        base, colon, variant = item.partition(":")
        if colon and variant != "host":
            raise ValueError(f"{item!r}: the only ':' variant is ':host'")
        name, at, solver = base.partition("@")
        if name not in known:
            raise ValueError(f"unknown method {name!r}; known: {sorted(known)}")
        method = known[name]
        if not harness.scannable(method):
            raise ValueError(f"{name!r} runs its own Python loop of steps, not a scanned "
                             f"chunk; time it with benchmarks.speed")
        if at and not solver:
            raise ValueError(f"{item!r}: name a solver after '@'")
        if solver:
            if method.family != "rngd":
                raise ValueError(f"{item!r}: a solver applies to RNGD methods only")
            solvers = rfim_jax.SOLVER_METHODS
            if solver not in solvers:
                raise ValueError(f"{item!r}: unknown solver {solver!r}; known: {list(solvers)}")
            method = dataclasses.replace(method, name=item, solver=solver)
        if colon:
            if method.family != "rngd":
                raise ValueError(f"{item!r}: ':host' applies to RNGD methods only")
            method = dataclasses.replace(method, name=item, host_refresh=True)
        out.append(method)
    return out


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "step_time.json.partial"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "step_time.json")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="adam,rngd,rngd_white_k10",
                        help="comma-separated names of benchmarks.speed's methods, each "
                             "optionally @solver (adam is always kept as the reference)")
    parser.add_argument("--reps", type=common.positive_int, default=15,
                        help="timed chunks per method")
    parser.add_argument("--out", default="results")
    harness.add_blas_threads_arg(parser)
    args = parser.parse_args(argv)
    known = {m.name: m for m in speed.default_methods(quick=False)}
    try:
        methods = parse_methods(args.methods, known)
    except ValueError as e:
        parser.error(str(e))
    if "adam" not in [m.name for m in methods]:
        methods.insert(0, known["adam"])
    sizes, steps, batch = harness.PAPER_SIZES, harness.CHUNK, harness.BATCH
    n = 60_000
    x = jax.random.uniform(jax.random.PRNGKey(0), (n, sizes[0]))
    y = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, sizes[-1])
    params0 = mlp.init_mlp(jax.random.PRNGKey(0), sizes)
    idx = jnp.asarray(harness.epoch_indices(np.random.default_rng(0), n, batch)[:steps])
    key = jax.random.PRNGKey(0)
    result = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps_per_chunk": steps,
              "methods": {}}
    out = Path(args.out)
    runs = {}
    with harness.limit_blas_threads(args.blas_threads):
        for m in methods:
            try:
                compiled, _, state, seconds = harness.compile_chunk(m, sizes, params0, x, y,
                                                                    steps, batch)
            except Exception as e:  # noqa: BLE001 - a failing variant still gets a row
                result["methods"][m.name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{m.name:32s} failed: {result['methods'][m.name]['error']}", flush=True)
                _write(out, result)
                continue
            slot = {"params": jax.tree.map(jnp.copy, params0), "state": state}

            def run(compiled=compiled, slot=slot):
                slot["params"], slot["state"], losses = compiled(
                    slot["params"], slot["state"], x, y, idx, key)
                return losses

            jax.block_until_ready(run())  # warm-up, untimed
            runs[m.name] = run
            result["methods"][m.name] = {"describe": m.describe(), "compile_s": seconds}
            _write(out, result)
        times = harness.time_chunks(runs, args.reps)
    base = float(np.median(times["adam"]))
    print(f"{'method':32s} {'ms/step':>8s} {'x Adam':>7s}")
    for name, t in times.items():
        med = float(np.median(t))
        result["methods"][name].update(ms_per_step=1e3 * med / steps, x_adam=med / base)
        print(f"{name:32s} {1e3 * med / steps:8.3f} {med / base:7.2f}", flush=True)
    _write(out, result)
    print(f"wrote {out / 'step_time.json'}")
    return result


if __name__ == "__main__":
    main()
