"""Memory of a convolution's RFIM statistics, as compiled by XLA (issue: conv statistics).

    python -m benchmarks.conv_memory            # the 3x3, 64-channel, 32x32, batch-128 case
    python -m benchmarks.conv_memory --quick    # a small case (what the tests run)

For one conv layer it compiles, with ``jax.jit(...).lower(...).compile()``, and reports XLA's
``memory_analysis()`` (argument, output and temporary bytes) of:

- ``patches``: :func:`rfim_jax.conv_patches` alone, the rows every statistic reads;
- ``naive_exact``: the per-channel blocks written as the single einsum
  ``einsum("nl,ni,nj->lij", nu, x~, x~) / N`` over all ``N = batch x positions`` rows (what the
  library did before the rows were chunked);
- ``exact``, ``eigen``, ``diagonal``: :func:`rfim_jax.conv_rfim` as shipped, in each
  representation (rows chunked so that no temporary exceeds about 2**25 numbers).

Prints one row per variant as it goes and writes ``conv_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rfim_jax


def _memory(fn, *args) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    out = {"available": stats is not None}
    if stats is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            out[name] = int(getattr(stats, name, -1))
    return out


def run(batch: int, size: int, c_in: int, c_out: int, window: int, out_dir: str) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, c_in)), jnp.float32)
    params = {"kernel": jnp.asarray(rng.normal(size=(window, window, c_in, c_out)) * 0.1,
                                    jnp.float32),
              "bias": jnp.zeros((c_out,), jnp.float32)}
    d = window * window * c_in + 1
    rows = batch * size * size
    case = dict(batch=batch, size=size, c_in=c_in, c_out=c_out, window=window, d=d, rows=rows,
                input_bytes=x.size * 4, patch_bytes=rows * (d - 1) * 4,
                naive_product_bytes=rows * c_out * d * 4, blocks_bytes=c_out * d * d * 4)
    print(json.dumps(case))
    relu = rfim_jax.ReLU()

    def patches(x):
        return rfim_jax.conv_patches(x, (window, window))

    def naive_exact(params, x):
        p = patches(x).reshape(rows, d - 1)
        xa = jnp.concatenate([p, jnp.ones((rows, 1), p.dtype)], axis=1)
        z = xa @ jnp.concatenate([params["kernel"].reshape(-1, c_out),
                                  params["bias"][None]], axis=0)
        return jnp.einsum("nl,ni,nj->lij", relu.nu(z), xa, xa) / rows

    variants = {"patches": (patches, (x,)), "naive_exact": (naive_exact, (params, x))}
    for rep in ("exact", "eigen", "diagonal"):
        def stats(params, x, rep=rep):
            metric = rfim_jax.conv_rfim(params, x, relu, representation=rep)
            return jax.tree.leaves(metric)
        variants[rep] = (stats, (params, x))
    results = {"case": case, "variants": {}}
    for name, (fn, args) in variants.items():
        t0 = time.perf_counter()
        mem = _memory(fn, *args)
        mem["compile_s"] = round(time.perf_counter() - t0, 2)
        results["variants"][name] = mem
        temp = mem.get("temp_size_in_bytes", -1)
        print(f"{name:<12} temp {temp / 2**20:10.1f} MiB   output "
              f"{mem.get('output_size_in_bytes', -1) / 2**20:8.1f} MiB", flush=True)
        path = Path(out_dir) / "conv_memory.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")  # partial results as we go
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small case")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    if args.quick:
        return run(batch=4, size=8, c_in=4, c_out=8, window=3, out_dir=args.out)
    return run(batch=128, size=32, c_in=64, c_out=64, window=3, out_dir=args.out)


if __name__ == "__main__":
    main()
