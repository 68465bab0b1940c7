"""``contrastive``: SimCLR vs SogCLR vs EMC² over batch sizes on digits-on-canvas
(specs/contrastive.md).

Every arm trains the same MLP backbone (144 → 256 → 128) + normalised 64-d projector with Adam for
the same number of epochs (so small batches take more iterations), with augmented views of
digits-on-canvas and τ = 0.1 (β = 10) for every method. Tracked during training, on a fixed subset
of training samples with two pre-computed augmented views each:

- the **exact** global contrastive loss F (every other sample's views are negatives), and
- the quality of each method's stochastic gradient ĝ on a batch of the subset (with the method's
  current state, not updated) against the exact ∇F: the relative squared error
  ‖c ĝ − ∇F‖² / ‖∇F‖² and the cosine. ``c`` puts every estimate on F's scale: 1 for SimCLR
  (mean over the 2b anchors of −β⟨z, z⁺⟩ + log Σ exp(β⟨z, z_c⟩)) and EMC² (β-scaled, mean over
  anchors), β/2 for SogCLR (its surrogate is τ-scaled and sums the two anchor views per sample).

At the end: linear-probe and 1-NN / 10-NN accuracy of backbone features (train → test split),
time per iteration and state bytes per sample.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se

__all__ = ["ContrastiveConfig", "ContrastiveExperiment"]

METHODS = ("simclr", "sogclr", "emc2")
LABELS = {"simclr": "SimCLR", "sogclr": "SogCLR", "emc2": "EMC²"}


@dataclass
class ContrastiveConfig(ExperimentConfig):
    methods: tuple[str, ...] = METHODS
    batch_sizes: tuple[int, ...] = (4, 8, 32, 128)
    epochs: int = 3
    lr: float = 1e-3
    temperature: float = 0.1
    gamma: float = 0.9  # SogCLR moving average
    burn_in: float = 0.5  # EMC²
    subset: int = 256  # samples with pre-computed views for the exact GCL
    evals: int = 6  # exact-GCL evaluations over training
    grad_batches: int = 4  # batches averaged for the gradient-quality estimate
    n_seeds: int = 2

    def validate(self) -> None:
        super().validate()
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
        if not self.batch_sizes or any(b < 2 for b in self.batch_sizes):
            raise ConfigError(f"batch_sizes must be >= 2, got {self.batch_sizes}")
        for key in ("epochs", "subset", "evals", "grad_batches", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.temperature <= 0 or not 0 < self.gamma <= 1:
            raise ConfigError("lr and temperature must be > 0 and gamma in (0, 1]")


def _state_for(method: str, n: int, config: ContrastiveConfig):
    from optfm.contrastive.losses import EMC2State, SogCLRState

    if method == "sogclr":
        return SogCLRState(n, gamma=config.gamma, temperature=config.temperature)
    if method == "emc2":
        return EMC2State(n, beta=1.0 / config.temperature, burn_in=config.burn_in)
    return None


def _loss(method: str, state, model, x1, x2, index, embed_fn, gen, config) -> torch.Tensor:
    from optfm.contrastive.losses import nt_xent_loss

    z1, z2 = model(x1), model(x2)
    if method == "simclr":
        return nt_xent_loss(z1, z2, temperature=config.temperature)
    if method == "sogclr":
        return state.loss(z1, z2, index)
    return state.loss(z1, z2, index, embed_fn=embed_fn, generator=gen)


def grad_scale(method: str, config: ContrastiveConfig) -> float:
    """The constant c with E[c ĝ] ≈ ∇F for each method's loss (module docstring)."""
    return 0.5 / config.temperature if method == "sogclr" else 1.0


def _state_bytes(state, n: int) -> float:
    if state is None:
        return 0.0
    return sum(t.numel() * t.element_size() for t in state.state_dict().values()
               if torch.is_tensor(t)) / n


@register
class ContrastiveExperiment(Experiment):
    name = "contrastive"
    description = ("SimCLR vs SogCLR vs EMC² over batch sizes: exact global contrastive loss, "
                   "gradient quality, probe accuracy, cost and state memory.")
    config_cls = ContrastiveConfig
    minutes = {"smoke": 0.3, "quick": 5.0, "full": 30.0}

    @classmethod
    def profiles(cls) -> dict[str, ContrastiveConfig]:
        return {
            "smoke": ContrastiveConfig(batch_sizes=(8, 32), epochs=1, subset=64, evals=2,
                                       grad_batches=2, n_seeds=1),
            "quick": ContrastiveConfig(),
            "full": ContrastiveConfig(epochs=15, n_seeds=3, evals=10),
        }

    def arms(self, config: ContrastiveConfig) -> list[Arm]:
        return [Arm(f"{m}-b{b}-s{config.seed + i}", {"method": m, "batch": b,
                                                     "seed": config.seed + i})
                for i in range(config.n_seeds) for b in config.batch_sizes
                for m in config.methods]

    def run_arm(self, config: ContrastiveConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        from optfm.contrastive.augment import CanvasAugment, index_batches
        from optfm.contrastive.evaluation import encode, knn_accuracy, linear_probe_accuracy
        from optfm.contrastive.losses import exact_gcl
        from optfm.contrastive.models import ContrastiveModel, MLPEncoder, Projector
        from optfm.data.digits import load_digits_canvas

        p = arm.params
        method, b, seed = p["method"], p["batch"], p["seed"]
        data = load_digits_canvas()
        x = data.x_train.float()
        n = len(x)
        torch.manual_seed(seed)
        model = ContrastiveModel(MLPEncoder(), Projector())
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        aug = CanvasAugment()
        gen = torch.Generator().manual_seed(seed)
        state = _state_for(method, n, config)

        def embed_fn(idx: torch.Tensor) -> torch.Tensor:  # carried-over EMC² states
            return model(x[idx])

        # fixed subset with pre-computed views for the exact GCL and the gradient check
        sub_gen = torch.Generator().manual_seed(12345)
        m = min(config.subset, n)
        sub_idx = torch.randperm(n, generator=sub_gen)[:m]
        v1, v2 = aug(x[sub_idx], sub_gen), aug(x[sub_idx], sub_gen)

        def measure(it: int) -> dict[str, float]:
            model.zero_grad(set_to_none=True)
            z = torch.stack([model(v1), model(v2)], dim=1)
            f = exact_gcl(z, temperature=config.temperature)
            full = torch.autograd.grad(f, list(model.parameters()))
            gfull = torch.cat([g.reshape(-1) for g in full])
            cos, err = [], []
            scale = grad_scale(method, config)
            g2 = torch.Generator().manual_seed(999 + it)
            for _ in range(config.grad_batches):
                pos = torch.randperm(m, generator=g2)[:min(b, m)]
                st = copy.deepcopy(state)
                if method == "emc2":  # the subset's own indices index the training state
                    loss = _loss(method, st, model, v1[pos], v2[pos], sub_idx[pos], embed_fn,
                                 g2, config)
                else:
                    loss = _loss(method, st, model, v1[pos], v2[pos], sub_idx[pos], None, g2,
                                 config)
                est = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
                ge = torch.cat([(e if e is not None else torch.zeros_like(q)).reshape(-1)
                                for e, q in zip(est, model.parameters())])
                cos.append(float(torch.nn.functional.cosine_similarity(ge, gfull, dim=0)))
                err.append(float((scale * ge - gfull).square().sum() / gfull.square().sum()))
            return {"iteration": it, "exact_gcl": float(f.detach()), "grad_cos": float(np.mean(cos)),
                    "grad_err": float(np.mean(err))}

        iters = config.epochs * math.ceil(n / b)
        marks = set(np.linspace(0, iters, config.evals + 1).round().astype(int).tolist())
        evals = [measure(0)]
        it, t_train, accept = 0, 0.0, []
        for _ in range(config.epochs):
            for idx in index_batches(n, b, gen, drop_last=True):
                t0 = time.perf_counter()
                x1, x2 = aug(x[idx], gen), aug(x[idx], gen)
                loss = _loss(method, state, model, x1, x2, idx, embed_fn, gen, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                t_train += time.perf_counter() - t0
                it += 1
                if method == "emc2" and state.last_acceptance_rate is not None:
                    accept.append(float(state.last_acceptance_rate))
                if it in marks and it > 0:
                    evals.append(measure(it))
        ftr = encode(model, x).numpy()
        fte = encode(model, data.x_test.float()).numpy()
        ytr, yte = data.y_train.numpy(), data.y_test.numpy()
        return {
            "method": method, "batch": b, "seed": seed, "iterations": it, "evals": evals,
            "final_gcl": evals[-1]["exact_gcl"], "final_grad_cos": evals[-1]["grad_cos"],
            "mean_grad_cos": float(np.mean([e["grad_cos"] for e in evals[1:]] or [0.0])),
            "mean_grad_err": float(np.mean([e["grad_err"] for e in evals[1:]] or [0.0])),
            "probe_acc": linear_probe_accuracy(ftr, ytr, fte, yte, seed=seed),
            "knn1_acc": knn_accuracy(ftr, ytr, fte, yte, k=1),
            "knn10_acc": knn_accuracy(ftr, ytr, fte, yte, k=10),
            "time_per_iter_ms": 1000 * t_train / max(it, 1),
            "state_bytes_per_sample": _state_bytes(state, n),
            "acceptance_rate": float(np.mean(accept)) if accept else None,
        }

    def finalize(self, config: ContrastiveConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for a in self.arms(config):
            groups[(a.params["method"], a.params["batch"])].append(results[a.key])
        cols = [("final_gcl", "exact GCL ↓", 3), ("mean_grad_err", "‖cĝ−∇F‖²/‖∇F‖² ↓", 2),
                ("mean_grad_cos", "grad cos with ∇F ↑", 3),
                ("probe_acc", "linear probe ↑", 3), ("knn1_acc", "1-NN ↑", 3),
                ("knn10_acc", "10-NN ↑", 3), ("time_per_iter_ms", "ms / iter", 2),
                ("state_bytes_per_sample", "state B/sample", 1)]
        rows = ["| method | batch | " + " | ".join(c[1] for c in cols) + " | MH acceptance |",
                "|---|---|" + "---|" * (len(cols) + 1)]
        metrics: dict[str, float] = {}
        for b in config.batch_sizes:
            for mth in config.methods:
                rs = groups[(mth, b)]
                cells = []
                for k, _, d in cols:
                    mm, se = mean_se([r[k] for r in rs])
                    cells.append(f"{mm:.{d}f} ± {se:.{d}f}")
                    metrics[f"{mth}_b{b}_{k}"] = mm
                acc = [r["acceptance_rate"] for r in rs if r["acceptance_rate"] is not None]
                rows.append(f"| {LABELS[mth]} | {b} | " + " | ".join(cells)
                            + f" | {np.mean(acc):.3f} |" if acc else
                            f"| {LABELS[mth]} | {b} | " + " | ".join(cells) + " | — |")
        figs = [self._plot(config, groups, ctx)]
        summary = [
            f"Digits-on-canvas (12×12), MLP 144→256→128 + 64-d projector, Adam lr {config.lr:g}, "
            f"{config.epochs} epochs at every batch size, τ = {config.temperature:g} for all "
            f"methods (EMC² β = {1 / config.temperature:g}); exact GCL, relative gradient error "
            f"and cosine on {config.subset} training samples with fixed views; {config.n_seeds} seed(s); "
            "mean ± s.e.", "", *rows, "", *(f"![{f}]({f})" for f in figs)]
        return Outcome(metrics=metrics, summary="\n".join(summary))

    def _plot(self, config, groups, ctx) -> str:
        plt = pyplot()
        bs = list(config.batch_sizes)
        fig, axes = plt.subplots(1, len(bs) + 2, figsize=(3.4 * (len(bs) + 2), 3.4))
        colors = {"simclr": "tab:orange", "sogclr": "tab:green", "emc2": "tab:blue"}
        for ax, b in zip(axes, bs):
            for mth in config.methods:
                rs = groups[(mth, b)]
                its = [e["iteration"] for e in rs[0]["evals"]]
                ys = np.mean([[e["exact_gcl"] for e in r["evals"]] for r in rs], axis=0)
                ax.plot(its, ys, marker="o", color=colors[mth], label=LABELS[mth])
            ax.set(title=f"batch {b}", xlabel="iteration", ylabel="exact GCL")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        for mth in config.methods:
            st = [mean_se([r["mean_grad_err"] for r in groups[(mth, b)]]) for b in bs]
            axes[-2].errorbar(bs, [s[0] for s in st], yerr=[s[1] for s in st], marker="o",
                              color=colors[mth], label=LABELS[mth], capsize=3)
            st = [mean_se([r["probe_acc"] for r in groups[(mth, b)]]) for b in bs]
            axes[-1].errorbar(bs, [s[0] for s in st], yerr=[s[1] for s in st], marker="o",
                              color=colors[mth], label=LABELS[mth], capsize=3)
        axes[-2].set(xscale="log", yscale="log", xlabel="batch size",
                     ylabel="‖cĝ − ∇F‖² / ‖∇F‖²", title="Gradient error")
        axes[-1].set(xscale="log", xlabel="batch size", ylabel="linear probe accuracy",
                     title="Probe")
        for ax in axes[-2:]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        return ctx.savefig(fig, "contrastive.png")
