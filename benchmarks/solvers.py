"""Benchmark of the batched SPD block inverses of :func:`rfim_jax.spd_inverse`.

For each shape (default the MLP's hidden-layer stack (64, 65, 65) and a 784-pixel input
layer's shared block (1, 785, 785)) it builds damped RFIM-like blocks
``G_l = mean_i nu_il x~_i x~_i^T + 1e-2 tr(G_l)/d I`` and times the jitted inverse of every
method after compilation: the median over ``--repeats`` calls, over ``--rounds`` rounds
(the CPU may be shared: the spread of the round medians is reported).  Newton-Schulz is
timed cold and warm-started from ``inv(0.995 G + 0.005 G')`` (one EMA step away) and from
``inv(0.61 G + 0.39 G')`` (what T = 100 steps of a 0.995 EMA move a metric: 1 - 0.995^100).
Accuracy is ``max|X - X_np| / max|X_np|`` against numpy's float64 inverse.

The batched ``"lapack"`` method can deadlock on CPU (jaxlib 0.10.2); it runs in a child
process with a timeout and is reported as ``hang`` if it does not finish.

Usage::

    python -m benchmarks.solvers                       # table + results/solvers.json
    python -m benchmarks.solvers --shapes 16x17,1x100 --repeats 5 --rounds 1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import rfim_jax

METHODS = ("gauss_jordan", "cholesky", "newton_schulz", "lapack_map", "lapack")
EMA_T100 = 1.0 - 0.995**100  # weight of fresh statistics after T = 100 EMA steps


def make_blocks(m: int, d: int, seed: int, dtype) -> np.ndarray:
    """Damped RFIM-like blocks: sigmoid-weighted second moments of [x, 1], plus 1e-2 tr/d."""
    rng = np.random.default_rng(seed)
    n = 2 * d
    x = np.concatenate([rng.standard_normal((n, d - 1)), np.ones((n, 1))], axis=1)
    z = rng.standard_normal((n, m)) * 2.0
    s = 1.0 / (1.0 + np.exp(-z))
    nu = (s * (1.0 - s)).T  # (m, n), sigmoid's nu (eq. 14)
    g = np.einsum("mn,ni,nj->mij", nu, x, x) / n
    g += 1e-2 * np.trace(g, axis1=1, axis2=2)[:, None, None] / d * np.eye(d)
    return g.astype(dtype)


def auto_method(backend: str) -> str:
    """What ``method="auto"`` means on ``backend``, as the README's "Block solvers" documents
    it (the library's own resolver is not public API)."""
    return "lapack" if backend == "gpu" else "gauss_jordan"


def write_partial(path: str, result: dict) -> None:
    """Writes ``result`` to ``path`` atomically, so a run cut off still leaves valid JSON."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".partial", path)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(x.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def time_fn(fn, args, repeats: int, rounds: int) -> dict:
    out = jax.block_until_ready(fn(*args))  # compile
    round_medians, samples = [], []
    for _ in range(rounds):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append((time.perf_counter() - t0) * 1e3)
        round_medians.append(float(np.median(ts)))
        samples += ts
    return {
        "median_ms": float(np.median(samples)),
        "p10_ms": float(np.percentile(samples, 10)),
        "min_ms": float(np.min(samples)),
        "round_medians_ms": round_medians,
        "out": out,
    }


def bench_one(method: str, m: int, d: int, dtype, repeats: int, rounds: int, seed: int,
              warm_mix: float | None = None) -> dict:
    g = make_blocks(m, d, seed, dtype)
    ref = np.linalg.inv(g.astype(np.float64))
    row = {"method": method, "shape": [m, d, d], "dtype": np.dtype(dtype).name}
    if method == "newton_schulz":
        prev = None
        if warm_mix is not None:
            g2 = make_blocks(m, d, seed + 1000, dtype)
            near = (1.0 - warm_mix) * g.astype(np.float64) + warm_mix * g2
            prev = jnp.asarray(np.linalg.inv(near).astype(dtype))
            row["method"] = f"newton_schulz warm({warm_mix:.3g})"
        else:
            row["method"] = "newton_schulz cold"

        @jax.jit
        def fn(g, prev):
            inv, info = rfim_jax.newton_schulz_inverse(g, prev)
            ok = info.residual <= 0.5
            return inv, ok, info.num_iters, jnp.mean(info.warm.astype(jnp.float32))

        t = time_fn(fn, (jnp.asarray(g), prev), repeats, rounds)
        inv, ok, iters, warm = t.pop("out")
        row.update(iters=int(iters), warm_fraction=float(warm))
    else:
        fn = jax.jit(lambda g: rfim_jax.spd_inverse_and_status(g, method=method))
        t = time_fn(fn, (jnp.asarray(g),), repeats, rounds)
        inv, ok = t.pop("out")
    row.update(t)
    row.update(rel_err=rel_err(np.asarray(inv), ref), ok_fraction=float(np.mean(ok)))
    row["status"] = "ok"
    return row


def bench_in_child(method: str, m: int, d: int, args) -> dict:
    """Runs one method in a child process; a deadlock is reported as status 'hang'."""
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", method,
        "--shapes", f"{m}x{d}", "--dtype", args.dtype, "--repeats", str(args.repeats),
        "--rounds", str(args.rounds), "--seed", str(args.seed),
    ]
    row = {"method": method, "shape": [m, d, d], "dtype": args.dtype}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        row.update(status="hang", note=f"no result within {args.child_timeout} s")
        return row
    if proc.returncode != 0:
        row.update(status="error", note=proc.stderr.strip().splitlines()[-1:])
        return row
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_row(r: dict, m: int, d: int) -> None:
    """One measured row, flushed at once."""
    if r["status"] == "ok":
        extra = f"  iters={r['iters']}" if "iters" in r else ""
        spread = "/".join(f"{x:.1f}" for x in r["round_medians_ms"])
        print(f"{r['method']:<28} {m:>3}x{d:<4} {r['median_ms']:9.2f} ms  "
              f"(min {r['min_ms']:.2f}; rounds {spread})  rel_err={r['rel_err']:.1e}  "
              f"ok={r['ok_fraction']:.2f}{extra}", flush=True)
    else:
        print(f"{r['method']:<28} {m:>3}x{d:<4} {r['status']}: {r.get('note')}", flush=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64x65,1x785"`` -> ``[(64, 65), (1, 785)]`` (an argparse type: bad text is a usage
    error)."""
    shapes = []
    for item in text.split(","):
        try:
            m, d = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            m = d = 0
        if m < 1 or d < 1:
            raise argparse.ArgumentTypeError(
                f"shapes are MxD with positive integers (m blocks of d x d), got {item!r}")
        shapes.append((m, d))
    return shapes


def parse_methods(text: str) -> list[str]:
    """Comma-separated solver methods of :data:`METHODS` (an argparse type)."""
    methods = [name.strip() for name in text.split(",")]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; known: {list(METHODS)}")
    return methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default="64x65,1x785",
                    help="comma list of MxD (m blocks, d x d)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--methods", type=parse_methods, default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (spread = CPU noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, default=120.0,
                    help="seconds before the batched-LAPACK child counts as a hang")
    ap.add_argument("--out", default="results",
                    help="folder of solvers.json, like the other benchmarks ('' writes nothing)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        ap.error(f"--repeats and --rounds must be at least 1, got {args.repeats} and "
                 f"{args.rounds}")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = np.dtype(args.dtype).type
    shapes = args.shapes

    if args.child is not None:  # child process: one method, one shape, JSON on stdout
        (m, d), = shapes
        row = bench_one(args.child, m, d, dtype, args.repeats, args.rounds, args.seed)
        print(json.dumps(row))
        return

    methods = args.methods
    backend = jax.default_backend()
    load0 = os.getloadavg()
    rows = []
    result = {
        "config": vars(args),
        "env": {
            "jax": jax.__version__,
            "backend": backend,
            "devices": [str(dv) for dv in jax.devices()],
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_start": load0,
            "auto_method": auto_method(backend),
        },
        "complete": False,
        "results": rows,
    }
    path = os.path.join(args.out, "solvers.json") if args.out else ""
    write_partial(path, result)
    for m, d in shapes:
        for method in methods:
            if method == "lapack" and backend == "cpu":
                new_rows = [bench_in_child(method, m, d, args)]
            elif method == "newton_schulz":
                new_rows = [bench_one(method, m, d, dtype, args.repeats, args.rounds, args.seed,
                                      warm_mix=mix) for mix in (None, 0.005, EMA_T100)]
            else:
                new_rows = [bench_one(method, m, d, dtype, args.repeats, args.rounds, args.seed)]
            for r in new_rows:
                rows.append(r)
                print_row(r, m, d)
                write_partial(path, result)  # a run cut off still reports these rows

    # Table: methods x shapes.
    names = list(dict.fromkeys(r["method"] for r in rows))
    cols = [f"{m}x{d}x{d}" for m, d in shapes]
    print()
    print("median ms [min ms] (max relative error vs numpy) iN = Newton-Schulz iterations")
    print(f"{'method (' + args.dtype + ')':<28}" + "".join(f"{c:>30}" for c in cols))
    for name in names:
        cells = []
        for m, d in shapes:
            r = next(r for r in rows if r["method"] == name and r["shape"][0] == m
                     and r["shape"][1] == d)
            if r["status"] == "ok":
                it = f" i{r['iters']}" if "iters" in r else ""
                cells.append(
                    f"{r['median_ms']:.2f} [{r['min_ms']:.2f}] ({r['rel_err']:.0e}){it}"
                )
            else:
                cells.append(r["status"])
        print(f"{name:<28}" + "".join(f"{c:>30}" for c in cells))

    result["env"]["loadavg_end"] = os.getloadavg()
    result["complete"] = True
    if path:
        write_partial(path, result)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
