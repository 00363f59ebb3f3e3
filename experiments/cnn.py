"""RNGD on a small CNN (SPEC §8): every layer, the dense head only, Adam, SGD and the peers.

    python -m experiments.cnn            # --quick (default): 8x8 digits, about two minutes
    python -m experiments.cnn --full     # Fashion-MNIST 28x28

A small convolutional network, ``Conv(3x3) -> relu -> Conv(3x3, stride 2) -> relu [-> Conv(3x3,
stride 2) -> relu] -> flatten -> Dense(10)`` (flax.linen), is trained with softmax cross-entropy
on the same minibatches by:

- ``rngd``: :func:`rfim_jax.rngd` on every layer, the convolutions with the relu RFIM and the
  head with the linear one (as the paper's output layer), each layer exact or eigen as
  ``representation="auto"`` chooses (:func:`rfim_jax.rngd_plan` is printed);
- ``rngd_eigen``: the same with every layer eigen (SPEC §7) and statistics every
  ``eigen_update_every`` steps, the cheap configuration: an exact conv block costs
  ``2 N m d^2`` flops per step for N = batch x positions rows, the eigen one ``2 N d (d + m)``;
- ``rngd_head``: RNGD on the dense head only and Adam on the convolutions, through
  ``optax.partition`` (the only option before conv layers were supported);
- ``adam`` and ``sgd`` (momentum 0.9);
- ``kfac``: the real kfac-jax (Conv2D and dense blocks; fixed lr 0.01, momentum 0.9, damping
  0.1), through ``benchmarks.peers.kfac_jax.logits_step``;
- ``muon``: ``optax.contrib.muon`` (``benchmarks.peers.muon``) with every kernel as a matrix,
  a convolution's ``(3, 3, c_in, c_out)`` as ``(9 c_in, c_out)``, and its AdamW fallback on
  the biases;
- ``psgd``: PSGD Kron from the registry's psgd-jax (``benchmarks.peers.psgd``), its default
  preconditioner-update schedule.

A peer that does not import or run (kfac-jax and psgd-jax are the optional ``[peers]`` extra)
is reported as unavailable, with the reason.

Activations come from :func:`rfim_jax.capture_linen`, which records each convolution's patches.
Recorded: training loss (on a fixed training subset) and test loss/accuracy against iterations
and against training seconds (evaluation excluded), the time to a target training loss, and
the per-step time of each method relative to Adam from an interleaved timing loop on one batch.
Outputs (``--out``, default ``results/``): ``cnn.json`` and ``cnn.png``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rfim_jax
from experiments import common, data

LR_MUON, LR_PSGD = 0.02, 1e-3

METHODS = ("rngd", "rngd_eigen", "rngd_head", "adam", "sgd", "kfac", "muon", "psgd")
#: the methods from :mod:`benchmarks.peers`: unavailable (with the reason) when they do not load.
PEER_METHODS = ("kfac", "muon", "psgd")


@dataclasses.dataclass
class CNNConfig:
    """Everything that defines a CNN run (written to the JSON)."""

    dataset: str = "digits"  # "digits" (8x8) or "fashion" (28x28)
    channels: tuple[int, ...] = (16, 32)
    strides: tuple[int, ...] = (1, 2)
    steps: int = 600
    batch_size: int = 64
    eval_every: int = 25
    eval_size: int = 2000  # training rows the training loss is measured on
    target_losses: tuple[float, ...] = (0.3, 0.1)
    methods: tuple[str, ...] = METHODS
    learning_rates: dict = dataclasses.field(default_factory=lambda: {
        "rngd": 0.05, "rngd_eigen": 0.05, "rngd_head": 0.05, "adam": 3e-3, "sgd": 0.05,
        "kfac": 0.0, "muon": LR_MUON, "psgd": LR_PSGD})
    eigen_update_every: int = 5  # statistics every k steps in "rngd_eigen"
    head_adam_lr: float = 3e-3  # Adam's rate for the convolutions in "rngd_head"
    rngd_decay: float = 0.99
    rngd_inverse_every: int = 10
    rngd_damping: float = 0.1
    timing_rounds: int = 15
    timing_steps: int = 5
    seed: int = 0
    data_dir: str | None = None
    progress: bool = True
    out: str = common.DEFAULT_OUT
    name: str = "cnn"


def full_config(**overrides) -> CNNConfig:
    """The ``--full`` configuration: Fashion-MNIST, three conv layers."""
    # RNGD at 0.02: at 0.05 both every-layer variants diverged on Fashion-MNIST (README).
    lrs = CNNConfig().learning_rates | {"rngd": 0.02, "rngd_eigen": 0.02}
    cfg = dict(dataset="fashion", channels=(8, 16, 16), strides=(1, 2, 2), steps=800,
               batch_size=100, eval_every=50, target_losses=(0.6, 0.45), learning_rates=lrs)
    cfg.update(overrides)
    return CNNConfig(**cfg)


class CNN(nn.Module):
    """Conv(3x3, relu) layers with the given channels and strides, then a Dense head."""

    channels: Sequence[int]
    strides: Sequence[int]
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for c, s in zip(self.channels, self.strides, strict=True):
            x = nn.relu(nn.Conv(c, (3, 3), strides=s)(x))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


def load(cfg: CNNConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) with images (n, h, w, 1) in [0, 1]."""
    if cfg.dataset == "digits":
        xtr, ytr, xte, yte = data.load_digits(seed=cfg.seed)
        side = 8
    elif cfg.dataset == "fashion":
        xtr, ytr, xte, yte = data.load_idx_dataset(cfg.data_dir)
        side = 28
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; use 'digits' or 'fashion'.")
    shape = (-1, side, side, 1)
    return (xtr.reshape(shape).astype(np.float32), ytr, xte.reshape(shape).astype(np.float32),
            yte)


def rngd_layers(cfg: CNNConfig) -> dict[str, str]:
    """relu RFIM on every convolution, the linear RFIM on the head."""
    layers = {f"Conv_{i}": "relu" for i in range(len(cfg.channels))}
    layers["Dense_0"] = "linear"
    return layers


def make_optimizer(method: str, cfg: CNNConfig, params) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of ``method`` ("kfac" is kfac-jax's own step, see :func:`run`)."""
    lr = cfg.learning_rates[method]
    kw = dict(decay=cfg.rngd_decay, inverse_every=cfg.rngd_inverse_every,
              damping=cfg.rngd_damping)
    if method == "rngd":
        return rfim_jax.rngd(lr, rngd_layers(cfg), **kw)
    if method == "rngd_eigen":
        return rfim_jax.rngd(lr, rngd_layers(cfg), representation="eigen",
                             update_every=cfg.eigen_update_every, **kw)
    if method == "rngd_head":
        labels = {k: ("rngd" if k == "Dense_0" else "adam") for k in params}
        return optax.partition(
            {"rngd": rfim_jax.rngd(lr, {"Dense_0": "linear"}, **kw),
             "adam": optax.adam(cfg.head_adam_lr)}, labels)
    if method == "adam":
        return optax.with_extra_args_support(optax.adam(lr))
    if method == "sgd":
        return optax.with_extra_args_support(optax.sgd(lr, momentum=0.9))
    if method in ("muon", "psgd"):
        from benchmarks import harness
        from benchmarks.peers import muon, psgd

        if method == "muon":
            return muon.make_optimizer(harness.Method("muon", "muon", lr, momentum=0.95), (),
                                       dimension_numbers=muon.kernel_dimension_numbers(params))
        return psgd.make_optimizer(harness.Method("psgd", "psgd_kron", lr), ())
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")


def _loss_and_acts(model, params, x, y):
    logits, acts = rfim_jax.capture_linen(model, {"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts


def make_step(model, tx):
    """A jitted training step ``(params, state, x, y) -> (params, state, loss)``."""

    @jax.jit
    def step(params, state, x, y):
        (loss, acts), grads = jax.value_and_grad(
            lambda p: _loss_and_acts(model, p, x, y), has_aux=True)(params)
        updates, state = tx.update(grads, state, params, activations=acts)
        return optax.apply_updates(params, updates), state, loss

    return step


def make_eval(model):
    @jax.jit
    def evaluate(params, x, y):
        logits = model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    return evaluate


def run(cfg: CNNConfig) -> dict[str, Any]:
    """Trains every method on the same batches and returns the results (see the module doc)."""
    xtr, ytr, xte, yte = load(cfg)
    model = CNN(cfg.channels, cfg.strides)
    key = jax.random.PRNGKey(cfg.seed)
    params0 = model.init(key, jnp.asarray(xtr[:1]))["params"]
    plan = rfim_jax.rngd_plan(params0, rngd_layers(cfg))
    rng = np.random.default_rng(cfg.seed)
    order = [rng.choice(len(xtr), cfg.batch_size, replace=False) for _ in range(cfg.steps)]
    batches = [(jnp.asarray(xtr[i]), jnp.asarray(ytr[i])) for i in order[: cfg.timing_steps]]
    sub = rng.choice(len(xtr), min(cfg.eval_size, len(xtr)), replace=False)
    x_eval, y_eval = jnp.asarray(xtr[sub]), jnp.asarray(ytr[sub])
    x_test, y_test = jnp.asarray(xte), jnp.asarray(yte)
    evaluate = make_eval(model)

    steps, states, results = {}, {}, {}
    for method in cfg.methods:
        def build(method=method):
            if method == "kfac":
                from benchmarks.peers import kfac_jax

                return kfac_jax.logits_step(lambda p, x: model.apply({"params": p}, x),
                                            params0, batches[0], seed=cfg.seed)
            tx = make_optimizer(method, cfg, params0)
            return make_step(model, tx), tx.init(params0)

        # Only a peer may be unavailable; this library's own methods must run.
        step, state = (common.checked_step(method, build, params0, batches[0])
                       if method in PEER_METHODS else build())
        if step is None:
            results[method] = {"available": False, "reason": state}
            print(f"{method}: unavailable ({state})")
            continue
        results[method] = {"available": True, "version": common.peer_version(method)}
        steps[method], states[method] = step, state

    bar = common.progress(total=cfg.steps * len(steps), enabled=cfg.progress, desc="cnn")

    def figures(params):
        tr_loss, _ = evaluate(params, x_eval, y_eval)
        te_loss, te_acc = evaluate(params, x_test, y_test)
        return {"train_loss": tr_loss, "test_loss": te_loss, "test_acc": te_acc}

    def batch(it):
        return jnp.asarray(xtr[order[it]]), jnp.asarray(ytr[order[it]])

    for method, step in steps.items():
        # A copy: a peer's step may donate its params' buffers (kfac-jax does).
        states[method], log = common.train_logged(
            step, jax.tree.map(jnp.copy, params0), states[method], batch, steps=cfg.steps,
            eval_every=cfg.eval_every, evaluate=figures, targets=cfg.target_losses,
            method=method, bar=bar)
        log["final_test_acc"] = log["test_acc"][-1]
        results[method].update(log)
    bar.close()

    per_step = common.interleaved_timing(steps, states, params0, batches, cfg.timing_rounds)
    for method, ms in per_step.items():
        results[method]["ms_per_step"] = ms
        results[method]["ratio_to_adam"] = ms / per_step["adam"] if "adam" in per_step else None
    return {"plan": {p: lp._asdict() for p, lp in plan.items()}, "methods": results}


def plot(results: dict, cfg: CNNConfig, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, r in results["methods"].items():
        if not r.get("available") or not r.get("iteration"):
            continue
        label = method + (f" ({r['ratio_to_adam']:.2f}x Adam/step)"
                          if r.get("ratio_to_adam") else "")
        axes[0].semilogy(r["iteration"], r["train_loss"], label=label)
        axes[1].semilogy(r["seconds"], r["train_loss"], label=method)
        axes[2].plot(r["iteration"], r["test_acc"], label=method)
    for t in cfg.target_losses:
        for ax in axes[:2]:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
    axes[0].set(xlabel="iteration", ylabel="training loss", title=f"CNN on {cfg.dataset}")
    axes[1].set(xlabel="training seconds (2 CPU cores unless stated)", ylabel="training loss")
    axes[2].set(xlabel="iteration", ylabel="test accuracy")
    for ax in axes:
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


def summary(results: dict, cfg: CNNConfig) -> str:
    lines = [f"{'method':<10} {'ms/step':>8} {'x Adam':>7} {'final loss':>10} {'test acc':>8} "
             + " ".join(f"{'t(' + str(t) + ')':>8}" for t in cfg.target_losses)]
    for method, r in results["methods"].items():
        if not r.get("available"):
            lines.append(f"{method:<10} unavailable: {r.get('reason')}")
            continue
        ttt = " ".join(
            f"{r['time_to_target'][str(t)]:8.2f}" if r["time_to_target"][str(t)] is not None
            else f"{'-':>8}" for t in cfg.target_losses)
        lines.append(
            f"{method:<10} {r.get('ms_per_step', float('nan')):8.2f} "
            f"{r.get('ratio_to_adam') or float('nan'):7.2f} {r['train_loss'][-1]:10.4f} "
            f"{r['final_test_acc']:8.3f} {ttt}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.make_parser(__doc__.splitlines()[0])
    common.add_comparison_args(parser, METHODS)
    args = parser.parse_args(argv)
    overrides, lrs = common.comparison_overrides(args)
    overrides["data_dir"] = args.data_dir
    cfg = full_config(**overrides) if args.full else CNNConfig(**overrides)
    common.check_data_dir(parser, args, cfg.dataset == "fashion")
    cfg.learning_rates.update(lrs)
    results = run(cfg)
    common.finish_comparison(results, cfg, args.full, summary, plot)
    return results


if __name__ == "__main__":
    main()
