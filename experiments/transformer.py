"""RNGD on a character-level transformer (SPEC §8) trained on Debian's ``fortunes``.

    python -m experiments.transformer            # --quick (default): 2 blocks, d_model 128
    python -m experiments.transformer --full     # 3 blocks, batch 32, 800 steps

A small pre-LN transformer (flax.linen): token and learned position embeddings
(``nn.Embed``), blocks of ``x + MHA(LN(x))`` (causal, ``nn.MultiHeadDotProductAttention``,
whose projections are ``DenseGeneral`` layers) and ``x + Dense(gelu(Dense(LN(x))))``, a final
LayerNorm and an untied ``Dense`` head, trained on next-character prediction with a linear
warm-up and cosine decay of the learning rate.  Methods, on the same batches:

- ``rngd``: :func:`rfim_jax.rngd` on every parameter: the embeddings, the LayerNorms and the
  attention projections with the ``"linear"`` kind (input whitening for a projection), the
  MLPs' first layer with ``"gelu"``, the MLPs' second layer and the head with ``"linear"``;
  ``representation="auto"`` with a 4 MiB exact budget, so that the GELU layers (per-neuron
  blocks, ``2 N m d^2`` flops per step) are eigen;
- ``rngd_mlp``: RNGD on the MLPs only, AdamW on the rest (``optax.partition``);
- ``adam``, ``adamw`` and ``sgd`` (momentum 0.9), the baselines;
- ``muon``: ``optax.contrib.muon`` on the hidden matrices, the attention projections viewed
  as matrices (``benchmarks.peers.muon.kernel_dimension_numbers``); its AdamW fallback for
  the embeddings, the head, the biases and the norms, as Muon's authors use it;
- ``psgd``: PSGD Kron from the registry's psgd-jax (``benchmarks.peers.psgd``), its default
  preconditioner-update schedule, under the same warm-up and cosine decay;
- ``kfac``: kfac-jax (``benchmarks.peers.kfac_jax``), fixed lr 0.01, momentum 0.9, damping
  0.1 as on the CNN, its layers found by its graph matcher.

A peer that does not import or run (psgd-jax and kfac-jax are the optional ``[peers]`` extra;
kfac-jax 0.0.8's first step fails on the attention projections) is reported as unavailable,
with the reason.

Recorded: training loss (on fixed training batches) and validation loss, both in bits per
character, against steps and against training seconds; the time to a target training loss;
and the per-step time relative to Adam and to AdamW from an interleaved timing loop.
Outputs (``--out``, default ``results/``): ``transformer.json`` and ``transformer.png``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rfim_jax
from experiments import common, data

METHODS = ("rngd", "rngd_mlp", "adam", "adamw", "sgd", "muon", "psgd", "kfac")
#: the methods from outside this library and optax: unavailable (with the reason) when they
#: do not load or run.
PEER_METHODS = ("psgd", "kfac")
BITS = 1.0 / math.log(2.0)


@dataclasses.dataclass
class TransformerConfig:
    """Everything that defines a run (written to the JSON)."""

    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 300
    warmup: int = 30
    eval_every: int = 25
    eval_batches: int = 4
    target_bits: tuple[float, ...] = (4.0, 3.7)
    methods: tuple[str, ...] = METHODS
    learning_rates: dict = dataclasses.field(default_factory=lambda: {
        "rngd": 0.3, "rngd_mlp": 3e-3, "adam": 3e-3, "adamw": 3e-3, "sgd": 0.1, "muon": 0.02,
        "psgd": 1e-3})
    rngd_mlp_rngd_lr: float = 0.5  # the RNGD part's rate in "rngd_mlp"
    weight_decay: float = 1e-4
    rngd_decay: float = 0.95
    rngd_damping: float = 0.03
    rngd_inverse_every: int = 10
    exact_budget_bytes: int = 4 * 2**20
    timing_rounds: int = 5
    timing_steps: int = 3
    seed: int = 0
    text_path: str | None = None
    progress: bool = True
    out: str = common.DEFAULT_OUT
    name: str = "transformer"


def full_config(**overrides) -> TransformerConfig:
    """The ``--full`` configuration."""
    cfg = dict(num_layers=3, batch_size=32, steps=800, warmup=60, eval_every=50,
               eval_batches=8, target_bits=(3.5, 3.0))
    cfg.update(overrides)
    return TransformerConfig(**cfg)


class Block(nn.Module):
    """A pre-LN transformer block: causal self-attention and a GELU MLP."""

    d_model: int
    num_heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.num_heads)(h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.gelu(nn.Dense(4 * self.d_model, name="mlp_in")(h), approximate=False)
        return x + nn.Dense(self.d_model, name="mlp_out")(h)


class CharTransformer(nn.Module):
    vocab: int
    seq_len: int
    d_model: int
    num_layers: int
    num_heads: int

    @nn.compact
    def __call__(self, ids):
        t = ids.shape[-1]
        x = nn.Embed(self.vocab, self.d_model, name="tok")(ids)
        x = x + nn.Embed(self.seq_len, self.d_model, name="pos")(jnp.arange(t))
        mask = nn.make_causal_mask(ids)
        for i in range(self.num_layers):
            x = Block(self.d_model, self.num_heads, name=f"block_{i}")(x, mask)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def rngd_layers(params) -> dict[str, Any]:
    """Every parameter's kind (see the module docstring)."""
    layers: dict[str, Any] = {"tok": "linear", "pos": "linear", "ln_f": "linear",
                              "head": "linear"}
    for block in (k for k in params if k.startswith("block_")):
        for name, node in params[block].items():
            if name == "mlp_in":
                layers[f"{block}/{name}"] = "gelu"
            elif name == "mlp_out" or name.startswith("LayerNorm"):
                layers[f"{block}/{name}"] = "linear"
            else:  # the attention module: query, key, value, out
                for proj in node:
                    layers[f"{block}/{name}/{proj}"] = "linear"
    return layers


def _schedule(peak: float, cfg: TransformerConfig):
    """Linear warm-up to ``peak``, then cosine decay to ``peak / 10`` at the last step."""
    warmup = min(cfg.warmup, cfg.steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.steps, warmup + 1),
                                              peak * 0.1)


def make_optimizer(method: str, cfg: TransformerConfig, params):
    lr = _schedule(cfg.learning_rates[method], cfg)
    kw = dict(decay=cfg.rngd_decay, damping=cfg.rngd_damping,
              inverse_every=cfg.rngd_inverse_every, exact_budget_bytes=cfg.exact_budget_bytes)
    if method == "rngd":
        return rfim_jax.rngd(lr, rngd_layers(params), **kw)
    if method == "rngd_mlp":
        mlp = {p: k for p, k in rngd_layers(params).items() if "/mlp_" in p}

        def label(path, _):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            return "rngd" if any(name.startswith(p + "/") for p in mlp) else "adamw"

        labels = jax.tree_util.tree_map_with_path(label, params)
        return optax.partition(
            {"rngd": rfim_jax.rngd(_schedule(cfg.rngd_mlp_rngd_lr, cfg), mlp, **kw),
             "adamw": optax.adamw(lr, weight_decay=cfg.weight_decay)}, labels)
    if method == "adamw":
        return optax.with_extra_args_support(optax.adamw(lr, weight_decay=cfg.weight_decay))
    if method == "adam":
        return optax.with_extra_args_support(optax.adam(lr))
    if method == "sgd":
        return optax.with_extra_args_support(optax.sgd(lr, momentum=0.9))
    if method in ("muon", "psgd"):
        from benchmarks import harness
        from benchmarks.peers import muon, psgd

        if method == "muon":
            # Muon as its authors use it on a transformer: the hidden matrices (attention
            # projections viewed as matrices, the MLPs) take the Muon step; the embeddings,
            # the head, the biases and the norms take its AdamW fallback.
            return optax.with_extra_args_support(muon.make_optimizer(
                harness.Method("muon", "muon", lr, momentum=0.95), (),
                dimension_numbers=muon.kernel_dimension_numbers(params, adamw=("head",))))
        return psgd.make_optimizer(harness.Method("psgd", "psgd_kron", lr), ())
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")


def _loss(model, params, ids):
    logits, acts = rfim_jax.capture_linen(model, {"params": params}, ids[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    return ce, acts


def make_step(model, tx):
    @jax.jit
    def step(params, state, ids):
        (loss, acts), grads = jax.value_and_grad(
            lambda p: _loss(model, p, ids), has_aux=True)(params)
        updates, state = tx.update(grads, state, params, activations=acts)
        return optax.apply_updates(params, updates), state, loss

    return step


def make_eval(model):
    @jax.jit
    def evaluate(params, ids):
        logits = model.apply({"params": params}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return evaluate


def _kfac_step(model, params, first_ids, vocab_size: int, seed: int):
    """kfac-jax's ``(params, state, ids) -> (params, state, loss)`` step (see the module doc).

    Raises:
      whatever kfac-jax raises: ImportError when it is not installed.
    """
    from benchmarks.peers import kfac_jax as peer

    def split(ids):
        return ids[:, :-1], ids[:, 1:].reshape(-1)

    inner, state = peer.logits_step(
        lambda p, x: model.apply({"params": p}, x).reshape(-1, vocab_size), params,
        split(first_ids), seed=seed)
    return (lambda p, s, ids: inner(p, s, *split(ids))), state


def _batches(ids: np.ndarray, n: int, cfg: TransformerConfig, rng) -> list[jnp.ndarray]:
    starts = rng.integers(0, len(ids) - cfg.seq_len - 1, size=(n, cfg.batch_size))
    return [jnp.asarray(np.stack([ids[s:s + cfg.seq_len + 1] for s in row])) for row in starts]


def run(cfg: TransformerConfig) -> dict[str, Any]:
    """Trains every method on the same batches; returns the results (see the module doc)."""
    text = data.load_text(cfg.text_path)
    ids, vocab = data.encode_text(text)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    rng = np.random.default_rng(cfg.seed)
    train_batches = _batches(train_ids, cfg.steps, cfg, rng)
    eval_train = _batches(train_ids, cfg.eval_batches, cfg, rng)
    eval_val = _batches(val_ids, cfg.eval_batches, cfg, rng)
    model = CharTransformer(len(vocab), cfg.seq_len, cfg.d_model, cfg.num_layers,
                            cfg.num_heads)
    params0 = model.init(jax.random.PRNGKey(cfg.seed), train_batches[0][:, :-1])["params"]
    layers = rngd_layers(params0)
    plan = rfim_jax.rngd_plan(params0, layers, exact_budget_bytes=cfg.exact_budget_bytes)
    evaluate = make_eval(model)

    def bits(params, batches):
        return float(np.mean([float(evaluate(params, b)) for b in batches])) * BITS

    steps, states, results = {}, {}, {}
    for method in cfg.methods:
        def build(method=method):
            if method == "kfac":
                return _kfac_step(model, params0, train_batches[0], len(vocab), cfg.seed)
            tx = make_optimizer(method, cfg, params0)
            return make_step(model, tx), tx.init(params0)

        # Only a peer may be unavailable; this library's own methods must run.
        step, state = (common.checked_step(method, build, params0, (train_batches[0],))
                       if method in PEER_METHODS else build())
        if step is None:
            results[method] = {"available": False, "reason": state}
            print(f"{method}: unavailable ({state})")
            continue
        steps[method], states[method] = step, state
        results[method] = {"available": True, "version": common.peer_version(method)}

    bar = common.progress(total=cfg.steps * len(steps), enabled=cfg.progress,
                          desc="transformer")

    def figures(params):
        return {"train_bits": bits(params, eval_train), "val_bits": bits(params, eval_val)}

    for method, step in steps.items():
        states[method], log = common.train_logged(
            step, jax.tree.map(jnp.copy, params0), states[method],
            lambda it: (train_batches[it],), steps=cfg.steps, eval_every=cfg.eval_every,
            evaluate=figures, targets=cfg.target_bits, method=method, bar=bar,
            index_key="step")
        results[method].update(log)
    bar.close()
    batches = [(b,) for b in train_batches[: cfg.timing_steps]]
    per_step = common.interleaved_timing(steps, states, params0, batches, cfg.timing_rounds)
    for method, ms in per_step.items():
        results[method]["ms_per_step"] = ms
        for base in ("adam", "adamw"):  # None when that baseline was not among the methods
            results[method][f"ratio_to_{base}"] = (ms / per_step[base] if base in per_step
                                                   else None)
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params0))
    return {"vocab": len(vocab), "num_params": num_params,
            "plan": {p: lp._asdict() for p, lp in plan.items()}, "methods": results}


def plot(results: dict, cfg: TransformerConfig, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, r in results["methods"].items():
        if not r.get("step"):
            continue
        label = method + (f" ({r['ratio_to_adamw']:.2f}x AdamW/step)"
                          if r.get("ratio_to_adamw") else "")
        axes[0].plot(r["step"], r["train_bits"], label=label)
        axes[1].plot(r["seconds"], r["train_bits"], label=method)
        axes[2].plot(r["step"], r["val_bits"], label=method)
    axes[0].set(xlabel="step", ylabel="training loss (bits/char)",
                title=f"char transformer, {cfg.num_layers} blocks, d={cfg.d_model}")
    axes[1].set(xlabel="training seconds (2 CPU cores unless stated)",
                ylabel="training loss (bits/char)")
    axes[2].set(xlabel="step", ylabel="validation loss (bits/char)")
    for ax in axes:
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


def summary(results: dict, cfg: TransformerConfig) -> str:
    head = (f"{'method':<9} {'ms/step':>8} {'x Adam':>8} {'x AdamW':>8} {'train':>7} {'val':>7} "
            + " ".join(f"{'t(' + str(t) + ')':>8}" for t in cfg.target_bits))
    lines = [head]
    for method, r in results["methods"].items():
        if not r["available"]:
            lines.append(f"{method:<9} unavailable: {r['reason']}")
            continue
        ttt = " ".join(f"{r['time_to_target'][str(t)]:8.1f}"
                       if r["time_to_target"][str(t)] is not None else f"{'-':>8}"
                       for t in cfg.target_bits)
        # None when that baseline was not among the methods
        ratios = " ".join(f"{r[key]:8.2f}" if r.get(key) is not None else f"{'-':>8}"
                          for key in ("ratio_to_adam", "ratio_to_adamw"))
        lines.append(f"{method:<9} {r['ms_per_step']:8.1f} {ratios} "
                     f"{r['train_bits'][-1]:7.3f} {r['val_bits'][-1]:7.3f} {ttt}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.make_parser(__doc__.splitlines()[0], data_dir=False)
    common.add_comparison_args(parser, METHODS)
    parser.add_argument("--text", type=common.existing_path, default=None,
                        help="a text file or directory (default: Debian's fortunes)")
    args = parser.parse_args(argv)
    overrides, lrs = common.comparison_overrides(args)
    overrides["text_path"] = args.text
    cfg = full_config(**overrides) if args.full else TransformerConfig(**overrides)
    cfg.learning_rates.update(lrs)
    results = run(cfg)
    common.finish_comparison(results, cfg, args.full, summary, plot)
    return results


if __name__ == "__main__":
    main()
