"""``dno``: Direct Noise Optimization on a small diffusion model of sklearn digits (specs/dno.md).

A ``diffusers.UNet2DModel`` trained on 8×8 digits (cached) is frozen; DNO optimises all the noise
a 50-step DDIM sampler injects (η = 1: x_T and z_T..z_1) with Adam, to raise a reward:

- ``brightness`` at γ ∈ {0, 1, 10}: the reward-hacking demo and the probability regulariser R;
- ``classifier`` (log p(3) under a small MLP) with η = 1 and η = 0 (only x_T optimised);
- ``hybrid-rf``: a scikit-learn random forest's p(3), not differentiable, with Hybrid-2.

In-distribution checks independent of the rewards (:class:`optfm.alignment.dno_rewards.
DigitsReference`): PCA(20)+GMM log-likelihood, distance to the nearest training image, an
independent "gold" classifier's confidence (and whether it also reads the target digit), and
‖z‖²/D of the noise. Figures: reward and GMM log-likelihood per iteration, and a sample grid per arm.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se

__all__ = ["DNOExperiment", "DNOExperimentConfig"]

ARM_KINDS = ("brightness", "classifier", "classifier_eta0", "hybrid_rf")


@dataclass
class DNOExperimentConfig(ExperimentConfig):
    unet_steps: int = 1200  # training steps of the digits UNet (cached; ~2 min on 1 thread)
    sampler_steps: int = 50
    batch_size: int = 8
    iterations: int = 30
    lr: float = 0.01
    eval_every: int = 5
    target: int = 3
    gammas: tuple[float, ...] = (0.0, 1.0, 10.0)  # brightness arms
    gamma: float = 1.0  # classifier and hybrid arms
    kinds: tuple[str, ...] = ARM_KINDS
    n_perturb: int = 4
    mu: float = 0.01
    n_seeds: int = 2

    def validate(self) -> None:
        super().validate()
        for k in self.kinds:
            if k not in ARM_KINDS:
                raise ConfigError(f"kinds: {k!r} is not one of {', '.join(ARM_KINDS)}")
        for key in ("unet_steps", "sampler_steps", "batch_size", "iterations", "eval_every",
                    "n_perturb", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.target <= 9:
            raise ConfigError(f"target must be a digit 0..9, got {self.target}")
        if self.lr <= 0 or self.mu <= 0:
            raise ConfigError("lr and mu must be > 0")
        if self.gamma < 0 or any(g < 0 for g in self.gammas):
            raise ConfigError("gamma and gammas must be >= 0")


class _Clamped:
    """The sampler with images clamped to [−1, 1], the data range (as pipelines clamp before
    display); the rewards see what a user would see. Keeps ``eta`` for DNO."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.eta = inner.eta

    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        return self.inner(noise).clamp(-1.0, 1.0)


def _arm_label(p: dict[str, Any]) -> str:
    if p["kind"] == "brightness":
        return f"brightness γ={p['gamma']:g}"
    return {"classifier": "log p(3), η=1", "classifier_eta0": "log p(3), η=0",
            "hybrid_rf": "RF p(3), hybrid"}[p["kind"]].replace("3", str(p["target"]))


@register
class DNOExperiment(Experiment):
    name = "dno"
    description = ("Direct Noise Optimization of a frozen digits diffusion model: reward hacking "
                   "and the probability regulariser, η = 1 vs 0, a non-differentiable reward.")
    config_cls = DNOExperimentConfig
    minutes = {"smoke": 0.5, "quick": 10.0, "full": 60.0}

    @classmethod
    def profiles(cls) -> dict[str, DNOExperimentConfig]:
        return {
            "smoke": DNOExperimentConfig(unet_steps=60, sampler_steps=8, batch_size=4,
                                         iterations=3, eval_every=3, gammas=(0.0, 10.0),
                                         n_seeds=1),
            "quick": DNOExperimentConfig(),
            "full": DNOExperimentConfig(iterations=100, eval_every=10, n_seeds=5,
                                        gammas=(0.0, 0.3, 1.0, 3.0, 10.0)),
        }

    def arms(self, config: DNOExperimentConfig) -> list[Arm]:
        out = []
        for i in range(config.n_seeds):
            s = config.seed + i
            for k in config.kinds:
                if k == "brightness":
                    for g in config.gammas:
                        out.append(Arm(f"brightness-g{g:g}-s{s}",
                                       {"kind": k, "gamma": g, "seed": s,
                                        "target": config.target}))
                else:
                    out.append(Arm(f"{k}-s{s}", {"kind": k, "gamma": config.gamma, "seed": s,
                                                 "target": config.target}))
        return out

    def run_arm(self, config: DNOExperimentConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        from optfm.alignment.dno import DNO
        from optfm.alignment.dno_rewards import (
            BrightnessReward,
            ClassifierReward,
            DigitsReference,
            RandomForestReward,
            load_or_train_digit_classifier,
        )
        from optfm.diffusion import DDIMSampler, load_or_train_digits_unet

        p = arm.params
        unet, sched_cfg = load_or_train_digits_unet(steps=config.unet_steps)
        for q in unet.parameters():
            q.requires_grad_(False)
        eta = 0.0 if p["kind"] == "classifier_eta0" else 1.0
        sampler = _Clamped(DDIMSampler(unet, sched_cfg, num_inference_steps=config.sampler_steps,
                                       eta=eta))
        gen = torch.Generator().manual_seed(1000 + p["seed"])
        noise = sampler.inner.randn_noise(config.batch_size, generator=gen)
        if p["kind"] == "brightness":
            reward = BrightnessReward()
        elif p["kind"] in ("classifier", "classifier_eta0"):
            reward = ClassifierReward(p["target"], load_or_train_digit_classifier())
        else:
            reward = RandomForestReward(p["target"])
        estimator = "hybrid" if p["kind"] == "hybrid_rf" else "grad"
        dno = DNO(sampler, reward, noise, lr=config.lr, gamma=p["gamma"], estimator=estimator,
                  mu=config.mu, n_perturb=config.n_perturb,
                  generator=torch.Generator().manual_seed(2000 + p["seed"]))
        ref = DigitsReference()
        evals: list[dict[str, Any]] = []

        def measure(it: int) -> None:
            x = dno.samples.detach()
            ev = ref.evaluate(x, noise=dno.noise.detach())
            r, _ = reward(x)
            rec = {"iteration": it, "reward": float(r.float().mean())}
            for k, v in ev.items():
                rec[k] = float(np.mean(v))
            rec["gold_is_target"] = float(np.mean(ref.gold_predict(x) == p["target"]))
            evals.append(rec)

        measure(0)
        initial = dno.samples.detach().clone()

        def callback(d: Any, entry: dict[str, Any]) -> None:
            it = entry["iteration"] + 1
            if it % config.eval_every == 0 or it == config.iterations:
                measure(it)

        history = dno.run(config.iterations, callback=callback)
        final = dno.samples.detach()
        return {
            "label": _arm_label(p), "kind": p["kind"], "gamma": p["gamma"], "eta": eta,
            "reward_curve": [h["reward_mean"] for h in history],
            "reg_curve": [h["reg_mean"] for h in history],
            "time_per_iter_s": float(np.mean([h["time_s"] for h in history])),
            "evals": evals, "initial": evals[0], "final": evals[-1],
            "initial_samples": initial.reshape(len(initial), -1).tolist(),
            "final_samples": final.reshape(len(final), -1).tolist(),
            "best_reward_mean": float(dno.best_rewards.float().mean()),
        }

    def finalize(self, config: DNOExperimentConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        order: list[str] = []
        for a in self.arms(config):
            r = results[a.key]
            if r["label"] not in groups:
                order.append(r["label"])
            groups[r["label"]].append(r)

        cols = [("reward", "reward", 3), ("gmm_loglik", "GMM log-lik ↑", 1),
                ("nearest_dist", "nearest train dist ↓", 2),
                ("gold_conf", "gold conf. ↑", 3), ("gold_is_target", "gold = target", 2),
                ("noise_sq_norm", "‖z‖²/D", 3)]
        rows = ["| arm | " + " | ".join(f"{c[1]} (start → end)" for c in cols) + " | s/iter |",
                "|---|" + "---|" * (len(cols) + 1)]
        metrics: dict[str, float] = {}
        for label in order:
            rs = groups[label]
            cells = []
            for k, _, d in cols:
                a = mean_se([r["initial"][k] for r in rs])
                b = mean_se([r["final"][k] for r in rs])
                cells.append(f"{a[0]:.{d}f} → {b[0]:.{d}f} ± {b[1]:.{d}f}")
                key = label.replace(" ", "_").replace(",", "").replace("=", "")
                metrics[f"{key}_{k}_start"] = a[0]
                metrics[f"{key}_{k}_end"] = b[0]
            t = mean_se([r["time_per_iter_s"] for r in rs])[0]
            rows.append(f"| {label} | " + " | ".join(cells) + f" | {t:.2f} |")

        figs = [self._plot_curves(config, groups, order, ctx), self._plot_grid(groups, order, ctx)]
        summary = [
            f"Frozen digits UNet ({config.unet_steps} training steps, cached), DDIM "
            f"{config.sampler_steps} steps, batch {config.batch_size}; DNO with Adam lr "
            f"{config.lr:g} (no weight decay), clip 1.0, {config.iterations} iterations; "
            f"hybrid: μ = {config.mu:g}, K = {config.n_perturb}. {config.n_seeds} seed(s) "
            f"({config.seed}..{config.seed + config.n_seeds - 1}); mean ± s.e. over seeds of the "
            "batch means.",
            "",
            *rows,
            "",
            *(f"![{f}]({f})" for f in figs),
        ]
        return Outcome(metrics=metrics, summary="\n".join(summary))

    def _plot_curves(self, config, groups, order, ctx) -> str:
        plt = pyplot()
        panels = [("brightness", "brightness (mean pixel)"),
                  ("classifier", "log p(target) (MLP)"), ("hybrid_rf", "RF p(target)")]
        present = [(k, t) for k, t in panels
                   if any(groups[lab][0]["kind"].startswith(k) for lab in order)]
        fig, axes = plt.subplots(1, len(present) + 1, figsize=(4.2 * (len(present) + 1), 3.8),
                                 squeeze=False)
        axes = axes[0]
        cmap = plt.get_cmap("tab10")
        for i, label in enumerate(order):
            rs = groups[label]
            its = [e["iteration"] for e in rs[0]["evals"]]
            rew = np.mean([[e["reward"] for e in r["evals"]] for r in rs], axis=0)
            ll = np.mean([[e["gmm_loglik"] for e in r["evals"]] for r in rs], axis=0)
            j = next(n for n, (k, _) in enumerate(present) if rs[0]["kind"].startswith(k))
            axes[j].plot(its, rew, marker="o", color=cmap(i), label=label)
            axes[-1].plot(its, ll, marker="o", color=cmap(i), label=label)
        for ax, (_, title) in zip(axes, present):
            ax.set(xlabel="DNO iteration", ylabel="reward", title=title)
            ax.legend(fontsize=7)
        axes[-1].set(xlabel="DNO iteration", ylabel="PCA-GMM log-likelihood",
                     title="In distribution? (↑)")
        axes[-1].legend(fontsize=6)
        for ax in axes:
            ax.grid(alpha=0.3)
        return ctx.savefig(fig, "curves.png")

    def _plot_grid(self, groups, order, ctx) -> str:
        plt = pyplot()
        first = groups[order[0]][0]
        rows = [("start (η = 1 arms)", first["initial_samples"])]
        rows += [(label, groups[label][0]["final_samples"]) for label in order]
        n = len(first["initial_samples"])
        fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
        for i, (label, imgs) in enumerate(rows):
            for j in range(n):
                ax = axes[i][j]
                ax.imshow(np.asarray(imgs[j]).reshape(8, 8), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle("Samples: start, then each arm after DNO (seed 0)", fontsize=9)
        return ctx.savefig(fig, "samples.png")
