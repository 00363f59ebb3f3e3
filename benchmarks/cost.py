"""Where RNGD's step time goes: the split, the statistics kernels, FLOP models, machine rate.

- :func:`rngd_split`: the step split into statistics, inverse refresh and apply, from variants
  of the same jitted chunk with parts switched off;
- :func:`refresh_seconds`: one inverse refresh of every layer's stored blocks, timed directly;
- :func:`statistics_kernels`: the per-neuron statistics as the library computes them against
  explicit batched matmuls;
- :func:`flop_model` (SPEC §6) and :func:`xla_step_flops` (XLA's own count);
- :func:`matmul_rate`: the machine's measured float32 matmul rate, the physical yardstick for
  the GFLOP/s each method reaches.

Only the public API of :mod:`rfim_jax` is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import rfim_jax
from benchmarks import harness
from benchmarks.harness import BATCH, CHUNK, PAPER_SIZES, Method
from experiments import models as mlp


def rngd_split(method: Method, data: harness.Data, *, sizes: Sequence[int] = PAPER_SIZES,
               batch: int = BATCH, chunk: int = CHUNK, reps: int = 7, seed: int = 0) -> dict:
    """The RNGD step split into statistics, inverse refresh and apply, in ms per step.

    Four variants of the same jitted chunk, timed interleaved (medians over ``reps``):
    ``full`` (the method), ``no_refresh`` (``inverse_every`` huge), ``apply_only`` (statistics
    and refresh switched off, ``update_every`` and ``inverse_every`` huge), and ``base``, SGD
    with the same momentum (forward, backward and the momentum/learning-rate stages).  Then
    statistics = no_refresh - apply_only, refresh = full - no_refresh (amortised over T),
    apply = apply_only - base.  The refresh, about 1% of a step, drowns in the noise of that
    difference, so ``refresh_direct_ms`` also times one refresh of every layer's blocks
    directly (:func:`refresh_seconds`) and divides it by T.  A first chunk (count 0 refreshes
    and computes statistics in every variant) is run untimed.
    """
    never = 10**9
    variants = {
        "full": method,
        "no_refresh": dataclasses.replace(method, inverse_every=never),
        "apply_only": dataclasses.replace(method, inverse_every=never, update_every=never),
        "base": Method("base", "sgd", method.learning_rate, momentum=method.momentum),
    }
    x_train, _ = data.inputs(method.whiten)
    params0 = mlp.init_mlp(jax.random.PRNGKey(seed), sizes)
    rng = np.random.default_rng(seed)
    idx = [jnp.asarray(harness.epoch_indices(rng, data.num_train, batch)[:chunk])
           for _ in range(4)]
    key = jax.random.PRNGKey(seed)
    live = {}
    for name, m in variants.items():
        compiled, _, state, _ = harness.compile_chunk(m, sizes, params0, x_train, data.y_train,
                                                      chunk, batch)
        params, state, _ = compiled(jax.tree.map(jnp.copy, params0), state, x_train,
                                    data.y_train, idx[0], key)
        live[name] = {"compiled": compiled, "params": params, "state": state, "i": 0}

    def runner(name):
        def run():
            v = live[name]
            v["i"] += 1
            v["params"], v["state"], losses = v["compiled"](
                v["params"], v["state"], x_train, data.y_train, idx[v["i"] % 4], key
            )
            return losses
        return run

    times = harness.time_chunks({k: runner(k) for k in live}, reps)
    ms = {k: float(np.median(v) / chunk * 1e3) for k, v in times.items()}
    direct = refresh_seconds(sizes, method.whiten, reps=reps)
    return {
        "method": method.name,
        "variants_ms_per_step": ms,
        "statistics_ms": ms["no_refresh"] - ms["apply_only"],
        "refresh_ms": ms["full"] - ms["no_refresh"],
        "refresh_direct_ms": sum(v["ms"] for v in direct.values()) / method.inverse_every,
        "refresh_direct_per_layer_ms": direct,
        "apply_ms": ms["apply_only"] - ms["base"],
        "base_ms": ms["base"],
        "total_ms": ms["full"],
    }


def refresh_seconds(sizes: Sequence[int], whiten: bool = False, reps: int = 5) -> dict:
    """Direct timing of one inverse refresh of each layer's stored exact blocks (the solver).

    Returns:
      Layer path -> ``{"shape", "ms"}``; layers whose state is not an array of blocks (eigen,
      diagonal) are left out.
    """
    out = {}
    dummy = mlp.init_mlp(jax.random.PRNGKey(0), sizes)
    state = rfim_jax.scale_by_rngd(harness.rngd_layer_kinds(sizes, whiten)).init(dummy)
    fn = jax.jit(lambda b: rfim_jax.spd_inverse_and_status(b)[0])
    for path, blocks in state.metrics.items():
        if not hasattr(blocks, "shape"):
            continue
        b = blocks * 2.0
        jax.block_until_ready(fn(b))
        t = harness.time_chunks({"r": lambda b=b: fn(b)}, reps)["r"]
        out[path] = {"shape": list(blocks.shape), "ms": float(np.median(t) * 1e3)}
    return out


@dataclasses.dataclass(frozen=True)
class _GivenWeights(rfim_jax.Activation):
    """An activation whose ``nu`` is its input: the library's statistics with given weights."""

    name = "given_weights"

    def nu(self, z):
        return z


def statistics_kernels(n: int = BATCH, m: int = 64, d: int = 65, d_input: int = 785,
                       reps: int = 20, seed: int = 0) -> dict:
    """Times the per-neuron statistics ``G_l = mean_i nu_il x~_i x~_i^T`` several ways.

    ``library``: the blocks as the library computes them
    (:func:`rfim_jax.layer_rfim_from_activations` with weights ``nu``);
    ``batched_matmul``: ``(x * nu_l)^T x`` as one ``jnp.matmul`` over an (m, d, n) tensor;
    ``single_gemm``: the (n, m d) weighted inputs times x; ``batched_matmul_bf16``: the batched
    matmul on bfloat16 operands with float32 accumulation (the dtype effect; its
    ``max_abs_diff`` is bfloat16 rounding).  The others give the same blocks up to float32
    rounding (``max_abs_diff``).  Also the input layer's shared ``x~^T x~``
    (``input_shared_block``, the "linear" kind).
    """
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (n, d))
    nu = jax.random.uniform(k2, (n, m))
    xin = jax.random.uniform(k3, (n, d_input))
    weights = _GivenWeights()
    fns = {
        "library": lambda nu, x: rfim_jax.layer_rfim_from_activations(
            x, nu, weights).stored_blocks(),
        "batched_matmul": lambda nu, x: jnp.matmul(nu.T[:, None, :] * x.T[None], x) / n,
        "single_gemm": lambda nu, x: (
            ((nu[:, :, None] * x[:, None, :]).reshape(n, m * d).T @ x).reshape(m, d, d) / n
        ),
        "batched_matmul_bf16": lambda nu, x: jnp.matmul(
            (nu.T[:, None, :] * x.T[None]).astype(jnp.bfloat16), x.astype(jnp.bfloat16),
            preferred_element_type=jnp.float32) / n,
    }
    jitted = {k: jax.jit(f) for k, f in fns.items()}
    ref = jitted["library"](nu, x)
    diffs = {k: float(jnp.max(jnp.abs(f(nu, x) - ref))) for k, f in jitted.items()}
    zeros = jnp.zeros((n, 1), xin.dtype)
    shared = jax.jit(lambda x: rfim_jax.layer_rfim_from_activations(
        x, zeros, "linear").stored_blocks())
    jax.block_until_ready(shared(xin))  # compile before timing
    entries = {k: (lambda f=f: f(nu, x)) for k, f in jitted.items()}
    entries["input_shared_block"] = lambda: shared(xin)
    times = harness.time_chunks(entries, reps)
    flops = 2 * n * m * d * d
    out = {"shape": {"n": n, "m": m, "d": d, "d_input": d_input}, "flops": flops}
    for k, v in times.items():
        ms = float(np.median(v) * 1e3)
        f = 2 * n * d_input**2 if k == "input_shared_block" else flops
        out[k] = {"ms": ms, "gflops_per_s": f / ms / 1e6, "max_abs_diff": diffs.get(k)}
    return out


def layer_flops(kind: Any, representation: str, *, n: int, m: int, d: int
                ) -> tuple[float, float, float]:
    """(statistics, apply, refresh) flops of one RNGD layer: width m, augmented input d, batch n.

    Exact: statistics 2 n m d^2 per-neuron blocks (2 n d^2 for a shared "linear" block,
    2 n (m d)^2 for the "softmax" block), apply 2 m d^2, refresh d^3 / 3 per block (SPEC's
    Cholesky count).  Eigen: statistics 2 n d^2 (rotation) + n d^2 (A) + 2 n r d (scales, r
    rows), apply 4 d^2 m, refresh 9 d^3 (eigh) + 2 d^3 (rotation) + 2 r d^2 (carry).
    Diagonal: statistics 2 n r d, apply m d.  Statistics per update, refresh per refresh.
    """
    rows = 1 if kind == "linear" else m  # blocks / rows of scales
    if representation == "exact" and kind == "softmax":
        return 2.0 * n * (m * d) ** 2, 2.0 * (m * d) ** 2, (m * d) ** 3 / 3
    if representation == "exact":
        return 2.0 * n * rows * d * d, 2.0 * m * d * d, rows * d**3 / 3
    if representation == "eigen":
        return (3.0 * n * d * d + 2.0 * n * rows * d, 4.0 * d * d * m,
                11.0 * d**3 + 2.0 * rows * d * d)
    if representation == "diagonal":
        return 2.0 * n * rows * d, float(m * d), 0.0
    raise ValueError(f"unknown representation {representation!r}")


def flop_model(sizes: Sequence[int], batch: int, kinds: Mapping[str, Any], *,
               update_every: int = 1, inverse_every: int = 100,
               representations: Mapping[str, str] | None = None) -> dict:
    """SPEC §6's cost model of RNGD, in flops per step (a multiply-add counts 2).

    Per dense layer (input width d_in, d = d_in + 1, width m, batch n): forward + backward
    6 n m d_in, and the RNGD terms of :func:`layer_flops` for the layer's representation
    (``representations``: path -> "exact" / "eigen" / "diagonal", as
    :func:`rfim_jax.rngd_plan` chose; exact where missing), statistics divided by
    k = update_every and the refresh by T.  ``refresh_gauss_jordan`` is the count of a
    Gauss-Jordan inverse of the exact blocks (2 d^3 per block), what the CPU solver computes.
    With ``kinds`` empty it is the forward and backward pass alone (Adam, SGD).
    """
    representations = dict(representations or {})
    total = {"forward_backward": 0.0, "statistics": 0.0, "apply": 0.0, "refresh": 0.0}
    refresh_gj = 0.0
    per_layer = {}
    for i, (d_in, m) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        name = mlp.dense_name(i)
        d = d_in + 1
        kind = kinds.get(name)
        row = {"forward_backward": 6.0 * batch * m * d_in, "statistics": 0.0, "apply": 0.0,
               "refresh": 0.0}
        if kind is not None:
            rep = representations.get(name, "exact")
            s, a, r = layer_flops(kind, rep, n=batch, m=m, d=d)
            row |= {"statistics": s / update_every, "apply": a, "refresh": r / inverse_every}
            if rep == "exact":
                blocks = 1 if kind == "linear" else m
                refresh_gj += blocks * 2.0 * d**3 / inverse_every
        per_layer[name] = row
        for k in total:
            total[k] += row[k]
    total["total"] = sum(total.values())
    return {"total": total, "per_layer": per_layer, "refresh_gauss_jordan": refresh_gj}


def xla_step_flops(method: Method, sizes: Sequence[int], batch: int) -> float | None:
    """XLA's own flop count of one compiled step (both branches of every cond counted), or
    None where the backend gives none."""
    opt = harness.make_optimizer(method, sizes)
    params = mlp.init_mlp(jax.random.PRNGKey(0), sizes)
    state = jax.eval_shape(opt.init, params)
    x = jax.ShapeDtypeStruct((batch, sizes[0]), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    try:
        cost = jax.jit(harness.make_step(method, opt)).lower(
            params, state, x, y, jax.random.PRNGKey(0)).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        return None


def matmul_rate(size: int = 1024, reps: int = 10, dtype=jnp.float32) -> dict:
    """The machine's measured matmul rate: a jitted (size x size) @ (size x size), median."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
    fn = jax.jit(jnp.matmul)
    jax.block_until_ready(fn(a, b))
    t = float(np.median(harness.time_chunks({"mm": lambda: fn(a, b)}, reps)["mm"]))
    return {"size": size, "dtype": jnp.dtype(dtype).name, "ms": t * 1e3,
            "gflops_per_s": 2.0 * size**3 / t / 1e9}
