"""Sec. 4 of Sun & Nielsen: rank and conditioning of layer RFIMs against blocks of the full FIM.

    python -m experiments.geometry            # --quick (default): 64-16-16-10 on 8x8 digits
    python -m experiments.geometry --full     # n = 20 and 50, three seeds, 3000 iterations

A small ReLU MLP with a softmax output is trained on the 8x8 digits (Adam, batch 100).  At a
few iterations along training, on ``n`` fixed training samples (n small, so the bounds bite),
each dense layer's metric is computed three ways:

- the diagonal block of the full-network FIM (eq. 5), by autodiff
  (:func:`rfim_jax.full_fisher`, categorical response): for k classes,
  ``rank(block) <= rank(FIM) <= n (k - 1)``;
- the layer's RFIM from the library on the layer's own inputs: the relu RFIM (eq. 23,
  :func:`rfim_jax.nonlinear_rfim` with ``ReLU()``, smoothed omega = 1 as in RNGD) for hidden
  layers, ``rank <= n D_h``; the hard relu (omega = 0) and the linear RFIM
  (:func:`rfim_jax.linear_rfim`, eq. 22) as well; :func:`rfim_jax.softmax_rfim` (eq. 25) for
  the output layer, which must equal the FIM's last block;
- the rank is the number of eigenvalues above ``D eps lambda_max`` (numpy's matrix_rank rule,
  float64), the condition number ``lambda_max / lambda_min`` over the eigenvalues above that
  threshold ("on the range"; the plain one is infinite whenever the matrix is singular).

Outputs (``--out``, default ``results/``): ``geometry.json`` and ``geometry.png``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rfim_jax
from experiments import common, data
from experiments import models as mlp


@dataclasses.dataclass
class GeometryConfig:
    """Everything that defines a geometry run (written to the JSON)."""

    sizes: tuple[int, ...] = (64, 16, 16, 10)
    sample_sizes: tuple[int, ...] = (30,)
    snapshots: tuple[int, ...] = (0, 10, 30, 100, 300, 1000)
    seeds: tuple[int, ...] = (0,)
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    learning_rate: float = 3e-3
    batch_size: int = 100
    whole_fim: bool = True  # also the rank of the whole network's FIM (one D x D eigvalsh)
    progress: bool = True
    out: str = common.DEFAULT_OUT
    name: str = "geometry"


def quick_config(**overrides) -> GeometryConfig:
    return dataclasses.replace(GeometryConfig(), **overrides)


def full_config(**overrides) -> GeometryConfig:
    """Two sample sizes (n = 20: bounds bite everywhere; n = 50: n(k-1) = 450 exceeds the second
    layer's D = 272), three seeds, 3000 iterations.  The net stays 64-16-16-10: the FIM is a
    dense D x D eigenproblem (D = 1482) per snapshot, and a 64-32-32-10 net (D = 3466) takes
    minutes per snapshot on 2 CPU cores."""
    base = GeometryConfig(sample_sizes=(20, 50), snapshots=(0, 10, 30, 100, 300, 1000, 3000),
                          seeds=(0, 1, 2))
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------- spectra


def spectrum_summary(eig: np.ndarray, rtol: float | None = None) -> dict:
    """Rank and condition numbers from the eigenvalues of a symmetric PSD matrix.

    Same rule as :func:`rfim_jax.fim_rank` and ``condition_number``: the threshold
    is ``rtol * max|eig|`` with ``rtol = D eps`` by default.
    """
    eig = np.sort(np.asarray(eig, np.float64))
    dim = eig.shape[0]
    if rtol is None:
        rtol = dim * np.finfo(np.float64).eps
    lam_max = float(eig[-1])
    thr = rtol * float(np.max(np.abs(eig)))
    above = eig[eig > thr]
    rank = int(above.size)
    return {
        "dim": dim,
        "rank": rank,
        "nullity": dim - rank,
        "lambda_max": lam_max,
        "lambda_min_nonzero": float(above.min()) if rank else None,
        "cond_range": float(lam_max / above.min()) if rank else None,
        "cond": float(lam_max / eig[0]) if rank == dim else float("inf"),
    }


def _eigvalsh(matrix) -> np.ndarray:
    # numpy's LAPACK call: about 1.5x faster than jnp's on CPU for the (1000+)^2 FIM blocks.
    m = np.asarray(matrix, np.float64)
    return np.linalg.eigvalsh(0.5 * (m + m.T))


def layer_metrics(params: dict, x: jax.Array, sizes: Sequence[int]) -> dict:
    """Every dense layer's FIM block and RFIMs on the samples ``x``: spectra summaries.

    Returns ``{"layers": {path: {...}}, "fim": {...}}``.
    """
    num_layers = len(sizes) - 1
    k = sizes[-1]
    n = x.shape[0]
    fim = rfim_jax.full_fisher(mlp.logits_fn, params, x, "categorical")
    _, acts, _ = mlp.mlp_apply(params, x)
    layers = {}
    for i in range(num_layers):
        path = mlp.dense_name(i)
        p = params[path]
        h = acts[path]["inputs"]
        d = sizes[i] + 1
        m = sizes[i + 1]
        block = fim.blocks[path]
        entry = {
            "d": d,
            "m": m,
            "fim_block": spectrum_summary(_eigvalsh(block)),
            "bound_fim": n * (k - 1),
            "bound_rfim": n * m,
            "input_rank": int(np.linalg.matrix_rank(
                np.concatenate([np.asarray(h), np.ones((n, 1))], axis=1))),
        }
        if i == num_layers - 1:
            rfim = rfim_jax.softmax_rfim(p, h)
            entry["kind"] = "softmax"
            entry["rfim"] = spectrum_summary(np.asarray(rfim.eigvalsh()))
            entry["rfim_minus_fim_block_max_abs"] = float(jnp.max(jnp.abs(rfim.to_dense()
                                                                          - block)))
        else:
            entry["kind"] = "relu"
            entry["rfim"] = spectrum_summary(
                np.asarray(rfim_jax.nonlinear_rfim(p, h, rfim_jax.ReLU()).eigvalsh()))
            entry["rfim_hard_relu"] = spectrum_summary(
                np.asarray(rfim_jax.nonlinear_rfim(p, h, rfim_jax.ReLU(omega=0.0)).eigvalsh()))
            entry["rfim_linear"] = spectrum_summary(
                np.asarray(rfim_jax.linear_rfim(p, h).eigvalsh()))
        layers[path] = entry
    return {"layers": layers, "fim_matrix": fim.matrix}


# --------------------------------------------------------------------------------- training


def _make_segment(opt):
    def segment(carry, idx, x, y):
        def step(c, bidx):
            params, state = c
            loss, grads = jax.value_and_grad(
                lambda p: mlp.cross_entropy(mlp.logits_fn(p, x[bidx]), y[bidx]))(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(step, carry, idx)

    return jax.jit(segment)


def _batch_stream(n: int, batch: int, total: int, seed: int) -> np.ndarray:
    """``total`` minibatch index rows, epoch after epoch of seeded permutations."""
    rows, epoch = [], 0
    while len(rows) < total:
        rows += data.minibatch_indices(n, batch, seed=seed, epoch=epoch)
        epoch += 1
    return np.stack(rows[:total]).astype(np.int32)


def run_seed(cfg: GeometryConfig, seed: int, bar=None) -> dict:
    x_tr, y_tr, _, _ = data.load_digits(seed=seed)
    if x_tr.shape[1] != cfg.sizes[0]:
        raise ValueError(f"the digits have {x_tr.shape[1]} features, sizes[0] = {cfg.sizes[0]}.")
    x = jnp.asarray(x_tr, jnp.float64)
    y = jnp.asarray(y_tr, jnp.int32)
    # The metric samples: a fixed, seeded subset of the training set per n.
    perm = np.random.default_rng([seed, 1]).permutation(len(x_tr))
    samples = {n: x[perm[:n]] for n in cfg.sample_sizes}
    if cfg.optimizer == "adam":
        opt = optax.adam(cfg.learning_rate)
    elif cfg.optimizer == "sgd":
        opt = optax.sgd(cfg.learning_rate, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}.")
    params = mlp.init_mlp(jax.random.PRNGKey(seed), cfg.sizes, dtype=jnp.float64)
    carry = (params, opt.init(params))
    segment = _make_segment(opt)
    snaps = sorted(set(int(s) for s in cfg.snapshots))
    stream = _batch_stream(len(x_tr), cfg.batch_size, max(snaps), seed)
    out = {"snapshots": [], "train_cost": []}
    done = 0
    for t in snaps:
        if t > done:
            carry, costs = segment(carry, jnp.asarray(stream[done:t]), x, y)
            out["train_cost"].append(float(np.mean(np.asarray(costs)[-10:])))
            done = t
        else:
            out["train_cost"].append(None)
        per_n = {}
        for n, xs in samples.items():
            res = layer_metrics(carry[0], xs, cfg.sizes)
            matrix = res.pop("fim_matrix")
            if cfg.whole_fim:
                res["fim_whole"] = spectrum_summary(_eigvalsh(matrix))
                res["fim_whole"]["bound"] = n * (cfg.sizes[-1] - 1)
            per_n[n] = res
            if bar is not None:
                bar.update(1)
        out["snapshots"].append({"iteration": t, "metrics": per_n})
    return out


def run(cfg: GeometryConfig) -> dict:
    """Trains, measures and writes ``{name}.json`` and ``{name}.png``; returns the results."""
    t0 = time.perf_counter()
    with jax.enable_x64(True):
        total = len(cfg.seeds) * len(set(cfg.snapshots)) * len(cfg.sample_sizes)
        with common.progress(total=total, enabled=cfg.progress, desc="geometry") as bar:
            per_seed = {seed: run_seed(cfg, seed, bar) for seed in cfg.seeds}
    summary = summarise(per_seed, cfg)
    out_dir = Path(cfg.out)
    png = plot(summary, cfg, out_dir / f"{cfg.name}.png")
    results = {
        "paper": "Sun & Nielsen, arXiv 1606.06069, Sec. 4 (rank of RFIM vs FIM)",
        "seeds": list(cfg.seeds),
        "summary": summary,
        "per_seed": per_seed,
        "seconds": time.perf_counter() - t0,
    }
    path = common.write_json(out_dir / f"{cfg.name}.json", results,
                             config=dataclasses.asdict(cfg), digits=6)
    results["files"] = {"json": str(path), "png": str(png)}
    return results


_KINDS = ("fim_block", "rfim", "rfim_hard_relu", "rfim_linear")


def summarise(per_seed: dict, cfg: GeometryConfig) -> dict:
    """Per n, layer, kind and snapshot: mean/min/max over seeds of rank and range condition."""
    snaps = sorted(set(int(s) for s in cfg.snapshots))
    seeds = list(per_seed)
    out: dict[str, Any] = {"iterations": snaps, "by_n": {}}
    for n in cfg.sample_sizes:
        layers = {}
        for i in range(len(cfg.sizes) - 1):
            path = mlp.dense_name(i)
            first = per_seed[seeds[0]]["snapshots"][0]["metrics"][n]["layers"][path]
            entry = {"kind": first["kind"], "dim": first["fim_block"]["dim"],
                     "bound_fim": first["bound_fim"], "bound_rfim": first["bound_rfim"]}
            for kind in _KINDS:
                if kind not in first:
                    continue
                series = {}
                for stat in ("rank", "cond_range", "nullity"):
                    vals = np.array([[np.nan if (v := s["metrics"][n]["layers"][path][kind][stat])
                                      is None else v
                                      for s in per_seed[seed]["snapshots"]] for seed in seeds],
                                    dtype=np.float64)
                    series[stat] = {"mean": np.nanmean(vals, 0), "min": np.nanmin(vals, 0),
                                    "max": np.nanmax(vals, 0)}
                entry[kind] = series
            if first["kind"] == "softmax":
                entry["rfim_minus_fim_block_max_abs"] = max(
                    s["metrics"][n]["layers"][path]["rfim_minus_fim_block_max_abs"]
                    for seed in seeds for s in per_seed[seed]["snapshots"])
            layers[path] = entry
        whole = None
        if cfg.whole_fim:
            ranks = [[s["metrics"][n]["fim_whole"]["rank"] for s in per_seed[seed]["snapshots"]]
                     for seed in seeds]
            whole = {"rank_mean": np.mean(ranks, 0), "dim": per_seed[seeds[0]]["snapshots"][0][
                "metrics"][n]["fim_whole"]["dim"], "bound": n * (cfg.sizes[-1] - 1)}
        out["by_n"][n] = {"layers": layers, "fim_whole": whole}
    out["verdict"] = verdict(out)
    return out


def verdict(summary: dict) -> dict:
    """For each hidden layer and n: is the RFIM's rank above the FIM block's at every snapshot?"""
    res = {}
    for n, e in summary["by_n"].items():
        for path, layer in e["layers"].items():
            if layer["kind"] == "softmax":
                continue
            r_rfim = layer["rfim"]["rank"]["mean"]
            r_fim = layer["fim_block"]["rank"]["mean"]
            c_rfim = layer["rfim"]["cond_range"]["mean"]
            c_fim = layer["fim_block"]["cond_range"]["mean"]
            res[f"n={n} {path}"] = {
                "rfim_rank_higher_at_all_snapshots": bool(np.all(r_rfim > r_fim)),
                "rfim_rank": r_rfim, "fim_block_rank": r_fim, "dim": layer["dim"],
                "rfim_better_conditioned_at_all_snapshots": bool(np.all(c_rfim < c_fim)),
                "rfim_cond_range": c_rfim, "fim_block_cond_range": c_fim,
            }
    return res


# ------------------------------------------------------------------------------------ figure

_LINES = {
    "fim_block": ("tab:blue", "-", "full-FIM diagonal block (autodiff)"),
    "rfim": ("tab:red", "-", "RFIM (relu ω=1 / softmax)"),
    "rfim_hard_relu": ("tab:orange", "--", "RFIM hard relu (ω=0)"),
    "rfim_linear": ("tab:gray", ":", "linear RFIM (eq. 22)"),
}


def plot(summary: dict, cfg: GeometryConfig, path: Path, *, dpi: int = 100) -> Path:
    plt = common.pyplot()
    ns = list(summary["by_n"])
    num_layers = len(cfg.sizes) - 1
    fig, axes = plt.subplots(2 * len(ns), num_layers, figsize=(5 * num_layers, 3.6 * 2 * len(ns)),
                             squeeze=False)
    x = np.asarray(summary["iterations"], np.float64)
    for r, n in enumerate(ns):
        for i in range(num_layers):
            path_i = mlp.dense_name(i)
            layer = summary["by_n"][n]["layers"][path_i]
            ax_r, ax_c = axes[2 * r, i], axes[2 * r + 1, i]
            for kind, (color, ls, label) in _LINES.items():
                if kind not in layer:
                    continue
                for ax, stat in ((ax_r, "rank"), (ax_c, "cond_range")):
                    s = layer[kind][stat]
                    lo, hi = (s["min"], s["max"]) if len(cfg.seeds) > 1 else (None, None)
                    common.plot_band(ax, x, s["mean"], lo, hi, label=label, color=color, ls=ls,
                                     marker="o", ms=3)
            ax_r.axhline(layer["dim"], color="k", lw=0.8, label=f"dimension D = {layer['dim']}")
            ax_r.axhline(layer["bound_fim"], color="tab:blue", lw=0.8, ls="-.",
                         label=f"FIM bound n(k-1) = {layer['bound_fim']}")
            if layer["kind"] != "softmax":
                ax_r.axhline(min(layer["bound_rfim"], layer["dim"]), color="tab:red", lw=0.8,
                             ls="-.", label=f"RFIM bound min(nD_h, D) = "
                                            f"{min(layer['bound_rfim'], layer['dim'])}")
            kind_name = "softmax (output)" if layer["kind"] == "softmax" else "relu"
            net = "-".join(str(s) for s in cfg.sizes)
            ax_r.set_title(f"{path_i}: {cfg.sizes[i]}→{cfg.sizes[i + 1]} {kind_name}, n={n}\n"
                           f"(net {net})", fontsize=10)
            ax_r.set_ylabel("numerical rank")
            ax_c.set_ylabel("condition number on the range\n(λmax / smallest λ > D·eps·λmax)")
            ax_c.set_yscale("log")
            for ax in (ax_r, ax_c):
                ax.set_xscale("symlog", linthresh=10)
                ax.set_xlim(0, max(x.max(), 1) * 1.1)
                ax.set_xlabel("training iteration (Adam, batch 100)")
                ax.grid(True, which="both", alpha=0.3)
            ax_r.legend(fontsize=7, loc="best")
            if i == 0:
                ax_c.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return common.save_figure(fig, path, dpi=dpi)


# -------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.make_parser(__doc__.splitlines()[0], data_dir=False)
    args = parser.parse_args(argv)
    overrides = {"out": args.out, "progress": not args.no_progress}
    if args.full:
        cfg = full_config(seeds=tuple(args.seed + s for s in range(3)), **overrides)
    else:
        cfg = quick_config(seeds=(args.seed,), **overrides)
    results = run(cfg)
    for key, v in results["summary"]["verdict"].items():
        print(f"{key}: rank RFIM {np.round(v['rfim_rank'], 1).tolist()} vs FIM block "
              f"{np.round(v['fim_block_rank'], 1).tolist()} (D = {v['dim']}); "
              f"higher at all snapshots: {v['rfim_rank_higher_at_all_snapshots']}; "
              f"better conditioned at all: {v['rfim_better_conditioned_at_all_snapshots']}")
    for n, e in results["summary"]["by_n"].items():
        if e["fim_whole"] is not None:
            print(f"n={n}: whole FIM rank {np.round(e['fim_whole']['rank_mean'], 1).tolist()} "
                  f"of D = {e['fim_whole']['dim']}, bound n(k-1) = {e['fim_whole']['bound']}")
    print(f"wrote {results['files']['json']} and {results['files']['png']} "
          f"in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
