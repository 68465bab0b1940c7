"""``digits-baseline``: non-private training of the MLP 64-128-10 (tanh) on sklearn digits.

The non-private reference that the privacy experiments (``dp-filters``) compare against: the same
data (stratified 80/20 split, ``random_state=0``, standardised), the same model, batch size and
number of steps, trained with plain SGD and with Adam over a learning-rate grid and several seeds.
Reports test accuracy (mean ± s.e. over seeds) for each learning rate, the best learning rate per
optimizer, learning curves and the time per training step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optfm.data import load_digits_split
from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se
from optfm.models import mlp
from optfm.training import accuracy, make_generator, minibatch_indices, resolve_device

__all__ = ["DigitsBaseline", "DigitsBaselineConfig", "make_optimizer", "train_mlp"]

OPTIMIZERS = ("sgd", "adam")


@dataclass
class DigitsBaselineConfig(ExperimentConfig):
    optimizers: tuple[str, ...] = OPTIMIZERS
    sgd_lrs: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
    adam_lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
    n_seeds: int = 5
    steps: int = 600
    batch_size: int = 64
    hidden: int = 128
    activation: str = "tanh"
    eval_every: int = 50
    split_seed: int = 0

    def validate(self) -> None:
        super().validate()
        for o in self.optimizers:
            if o not in OPTIMIZERS:
                raise ConfigError(f"optimizers: {o!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.optimizers:
            raise ConfigError("optimizers must name at least one optimizer")
        for key in ("sgd_lrs", "adam_lrs"):
            lrs = getattr(self, key)
            if key[:-4] in self.optimizers and not lrs:
                raise ConfigError(f"{key} must not be empty")
            if any(lr <= 0 for lr in lrs):
                raise ConfigError(f"{key} must be > 0, got {lrs}")
        for key in ("n_seeds", "steps", "batch_size", "hidden", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.activation not in ("tanh", "relu", "gelu", "silu"):
            raise ConfigError(f"activation must be tanh, relu, gelu or silu, got {self.activation!r}")

    def lrs(self, optimizer: str) -> tuple[float, ...]:
        return self.sgd_lrs if optimizer == "sgd" else self.adam_lrs


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """Plain SGD (no momentum, as DP-SGD) or Adam with PyTorch defaults."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def train_mlp(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              *, steps: int, batch_size: int, generator: torch.Generator,
              on_eval: Any = None, eval_every: int = 0) -> float:
    """Minibatch training for ``steps`` steps over reshuffled epochs; returns the last batch loss.

    ``on_eval(step)`` is called after step ``eval_every``, ``2 * eval_every``, ... and after the last
    step.
    """
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    loss = torch.tensor(float("nan"))
    while step < steps:
        for idx in minibatch_indices(len(x), batch_size, generator=generator, drop_last=True):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            step += 1
            if on_eval is not None and (step == steps or (eval_every and step % eval_every == 0)):
                on_eval(step)
            if step == steps:
                break
    return float(loss.detach())


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


@register
class DigitsBaseline(Experiment):
    name = "digits-baseline"
    description = ("Non-private MLP 64-128-10 on sklearn digits with SGD and Adam over an lr grid: "
                   "the reference accuracy for the DP experiments.")
    config_cls = DigitsBaselineConfig
    minutes = {"smoke": 0.05, "quick": 0.25, "full": 0.8}

    @classmethod
    def profiles(cls) -> dict[str, DigitsBaselineConfig]:
        sqrt2 = 2**0.5
        return {
            "smoke": DigitsBaselineConfig(sgd_lrs=(0.1,), adam_lrs=(4e-3,), n_seeds=2, steps=60,
                                          eval_every=20),
            "quick": DigitsBaselineConfig(),
            # x sqrt(2) over two decades, as in the dp-filters protocol.
            "full": DigitsBaselineConfig(
                sgd_lrs=tuple(round(0.02 * sqrt2**i, 6) for i in range(13)),
                adam_lrs=tuple(round(5e-4 * sqrt2**i, 8) for i in range(13)),
                n_seeds=10,
            ),
        }

    def arms(self, config: DigitsBaselineConfig) -> list[Arm]:
        return [
            Arm(f"{opt}-lr{_lr_key(lr)}-s{config.seed + i}",
                {"optimizer": opt, "lr": lr, "seed": config.seed + i})
            for opt in config.optimizers
            for lr in config.lrs(opt)
            for i in range(config.n_seeds)
        ]

    def run_arm(self, config: DigitsBaselineConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        p = arm.params
        device = resolve_device(config.device)
        data = load_digits_split(random_state=config.split_seed)
        x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
        x_te, y_te = data.x_test.to(device), data.y_test.to(device)
        model = mlp(64, config.hidden, 10, activation=config.activation,
                    generator=make_generator(p["seed"])).to(device)
        opt = make_optimizer(p["optimizer"], model.parameters(), p["lr"])
        curve: list[dict[str, float]] = []
        loss_fn = nn.CrossEntropyLoss()
        eval_time = 0.0

        def on_eval(step: int) -> None:
            nonlocal eval_time
            t = time.perf_counter()
            with torch.no_grad():
                train_loss = float(loss_fn(model(x_tr), y_tr))
            curve.append({"step": step, "train_loss": train_loss,
                          "test_acc": accuracy(model, x_te, y_te)})
            eval_time += time.perf_counter() - t

        t0 = time.perf_counter()
        train_mlp(model, opt, x_tr, y_tr, steps=config.steps, batch_size=config.batch_size,
                  generator=make_generator(10_000 + p["seed"]), on_eval=on_eval,
                  eval_every=config.eval_every)
        train_time = time.perf_counter() - t0 - eval_time
        return {
            "test_acc": curve[-1]["test_acc"],
            "train_acc": accuracy(model, x_tr, y_tr),
            "train_loss": curve[-1]["train_loss"],
            "step_time_s": train_time / config.steps,
            "curve": curve,
        }

    def finalize(self, config: DigitsBaselineConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        plt = pyplot()
        by: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for arm in self.arms(config):
            by[(arm.params["optimizer"], arm.params["lr"])].append(results[arm.key])

        metrics: dict[str, float] = {}
        lines = ["## Test accuracy (%) by learning rate, mean ± s.e. over "
                 f"{config.n_seeds} seeds ({config.steps} steps, batch {config.batch_size})", "",
                 "| optimizer | lr | test acc (%) | train loss |", "|---|---|---|---|"]
        best: dict[str, float] = {}
        for opt in config.optimizers:
            scores = []
            for lr in config.lrs(opt):
                rs = by[(opt, lr)]
                m, s = mean_se([r["test_acc"] for r in rs])
                lm, ls = mean_se([r["train_loss"] for r in rs])
                scores.append((m, lr))
                metrics[f"test_acc_{opt}_lr{_lr_key(lr)}"] = m
                metrics[f"test_acc_{opt}_lr{_lr_key(lr)}_se"] = s
                lines.append(f"| {opt} | {lr:g} | {100 * m:.2f} ± {100 * s:.2f} | {lm:.4f} ± {ls:.4f} |")
            best[opt] = max(scores)[1]
            rs = by[(opt, best[opt])]
            m, s = mean_se([r["test_acc"] for r in rs])
            metrics[f"test_acc_{opt}_best"] = m
            metrics[f"test_acc_{opt}_best_se"] = s
            metrics[f"best_lr_{opt}"] = best[opt]
            metrics[f"step_time_ms_{opt}"] = 1e3 * mean_se(
                [r["step_time_s"] for lr in config.lrs(opt) for r in by[(opt, lr)]])[0]

        # Learning curves at the best lr of each optimizer.
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for opt in config.optimizers:
            rs = by[(opt, best[opt])]
            steps = [pt["step"] for pt in rs[0]["curve"]]
            for j, key in enumerate(("test_acc", "train_loss")):
                vals = [mean_se([r["curve"][i][key] for r in rs]) for i in range(len(steps))]
                mean = [v[0] for v in vals]
                se = [v[1] for v in vals]
                ax[j].plot(steps, mean, label=f"{opt} (lr {best[opt]:g})")
                ax[j].fill_between(steps, [a - b for a, b in zip(mean, se)],
                                   [a + b for a, b in zip(mean, se)], alpha=0.25)
        ax[0].set(xlabel="step", ylabel="test accuracy", title="Test accuracy (mean ± s.e.)")
        ax[1].set(xlabel="step", ylabel="train loss (full train set)", yscale="log",
                  title="Training loss")
        for a in ax:
            a.legend()
            a.grid(alpha=0.3)
        curves = ctx.savefig(fig, "learning_curves.png")

        fig, a = plt.subplots(figsize=(5, 3.6))
        for opt in config.optimizers:
            lrs = list(config.lrs(opt))
            ms = [mean_se([r["test_acc"] for r in by[(opt, lr)]]) for lr in lrs]
            a.errorbar(lrs, [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="o",
                       capsize=3, label=opt)
        a.set(xscale="log", xlabel="learning rate", ylabel="test accuracy (%)",
              title="Final test accuracy vs lr")
        a.legend()
        a.grid(alpha=0.3)
        lr_plot = ctx.savefig(fig, "lr_curves.png")

        best_lines = ["## Best learning rate per optimizer", ""]
        for opt in config.optimizers:
            lrs = config.lrs(opt)
            edge = (" (at the edge of the grid: widen the grid before trusting it)"
                    if len(lrs) > 1 and best[opt] in (min(lrs), max(lrs)) else "")
            best_lines.append(
                f"- **{opt}**: lr {best[opt]:g}{edge}, test accuracy "
                f"{100 * metrics[f'test_acc_{opt}_best']:.2f} ± "
                f"{100 * metrics[f'test_acc_{opt}_best_se']:.2f} %, "
                f"{metrics[f'step_time_ms_{opt}']:.3f} ms per step")
        best_lines += [
            "",
            "The best lr is chosen on mean test accuracy, as in the dp-filters protocol; the "
            "selection makes the best-lr figure slightly optimistic. The whole lr curve is below.",
            "",
            f"![Learning curves]({curves})",
            "",
            f"![Test accuracy vs learning rate]({lr_plot})",
        ]
        return Outcome(metrics=metrics, summary="\n".join([*best_lines, "", *lines]))
