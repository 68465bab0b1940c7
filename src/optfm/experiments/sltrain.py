"""``sltrain``: byte-level pretraining of a tiny Llama with full-rank, low-rank, SLTrain and GaLore
weights (specs/pretraining.md).

Corpus: CPython's standard-library sources (hash split by file; byte tokens, vocabulary 257).
Model: ``LlamaForCausalLM`` from ``LlamaConfig`` (quick: d = 128, ffn 352, 4 layers, 4 heads,
r = 32; full: d = 256, ffn 688, r = 64), untied embeddings, δ = 0.03. AdamW with 10% warm-up and
cosine decay, clip 1.0, fp32. GaLore comes from the ``galore-torch`` peer package (skipped with a
stated reason when it is not installed).

Every arm runs in its own subprocess (:func:`optfm.experiments.worker.run_in_subprocess`) so that
its peak resident memory (``VmHWM``) is its own. Reported per arm: validation loss (nats/byte),
bits per byte, perplexity, parameter counts, exact static memory (parameters + gradients +
the optimizer's real state tensors + buffers such as SLTrain's index), measured peak RSS and time
per training step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se
from optfm.experiments.worker import run_in_subprocess

__all__ = ["SLTrainExperiment", "SLTrainExperimentConfig", "train_arm"]

METHODS = ("full", "lowrank", "sltrain", "galore")


@dataclass
class SLTrainExperimentConfig(ExperimentConfig):
    methods: tuple[str, ...] = METHODS
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    rank: int = 32
    density: float = 0.03
    alpha: float = 32.0
    lrs_full: tuple[float, ...] = (1e-3,)
    lrs_lowrank: tuple[float, ...] = (3e-3,)
    lrs_sltrain: tuple[float, ...] = (3e-3,)
    lrs_galore: tuple[float, ...] = (1e-2,)
    galore_scale: float = 0.25
    galore_update_proj_gap: int = 200
    steps: int = 250
    batch_size: int = 16
    block_size: int = 128
    eval_every: int = 50
    eval_batches: int = 8
    n_seeds: int = 1
    subprocess: bool = True

    def validate(self) -> None:
        super().validate()
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "rank", "steps",
                    "batch_size", "block_size", "eval_every", "eval_batches", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size must be divisible by num_heads")
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        for m in self.methods:
            lrs = self.lrs(m)
            if not lrs or any(lr <= 0 for lr in lrs):
                raise ConfigError(f"lrs_{m} must be non-empty and > 0, got {lrs}")

    def lrs(self, method: str) -> tuple[float, ...]:
        return getattr(self, f"lrs_{method}")


def train_arm(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one arm in this process and return its result (used by the subprocess entry point)."""
    import torch

    from optfm.data import python_stdlib_corpus
    from optfm.models import count_parameters, tiny_llama
    from optfm.pretraining import (
        PretrainConfig,
        SLTrainConfig,
        apply_lowrank,
        apply_sltrain,
        build_optimizer,
        pretrain,
        warmup_cosine,
    )
    from optfm.pretraining.memory import module_static_bytes, optimizer_state_bytes
    from optfm.training import peak_rss_bytes, resolve_device

    c = payload["config"]
    method, lr, seed = payload["method"], payload["lr"], payload["seed"]
    torch.set_num_threads(max(1, int(c["threads"]) or 1))
    device = resolve_device(c["device"])
    corpus = python_stdlib_corpus()
    torch.manual_seed(seed)
    model = tiny_llama(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                       num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                       max_position_embeddings=max(512, c["block_size"]))
    if method == "sltrain":
        apply_sltrain(model, SLTrainConfig(rank=c["rank"], density=c["density"], alpha=c["alpha"],
                                           seed=seed))
    elif method == "lowrank":
        apply_lowrank(model, c["rank"], seed=seed)
    model.to(device)
    cfg = PretrainConfig(steps=c["steps"], batch_size=c["batch_size"], block_size=c["block_size"],
                         lr=lr, eval_every=c["eval_every"], eval_batches=c["eval_batches"], seed=seed)
    opt = build_optimizer(model, "galore" if method == "galore" else "adamw", lr=lr,
                          galore_rank=c["rank"], galore_scale=c["galore_scale"],
                          galore_update_proj_gap=c["galore_update_proj_gap"])
    sched = warmup_cosine(opt, cfg.steps, max(1, int(0.1 * cfg.steps)), cfg.min_lr_frac)
    out = pretrain(model, opt, sched, corpus.train, corpus.val, cfg, device=device)
    static = module_static_bytes(model, optimizer_state_bytes_per_param=0)
    opt_bytes = optimizer_state_bytes(opt)
    return {
        **out["final"], "history": out["history"], "step_time_s": out["step_time_s"],
        "params": count_parameters(model),
        "static_bytes": static.total + opt_bytes, "param_bytes": static.parameters,
        "grad_bytes": static.gradients, "optimizer_state_bytes": opt_bytes,
        "buffer_bytes": static.buffers, "peak_rss_bytes": peak_rss_bytes(),
    }


def _galore_available() -> bool:
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        return False
    return True


@register
class SLTrainExperiment(Experiment):
    name = "sltrain"
    description = ("Byte-level Llama pretraining on the Python stdlib: full rank vs low rank vs "
                   "SLTrain vs GaLore (loss, bits/byte, parameters, static memory, peak RSS, step time).")
    config_cls = SLTrainExperimentConfig
    minutes = {"smoke": 0.3, "quick": 4.0, "full": 90.0}

    @classmethod
    def profiles(cls) -> dict[str, SLTrainExperimentConfig]:
        return {
            # in-process (no per-arm subprocess): seconds, for the tests
            "smoke": SLTrainExperimentConfig(hidden_size=32, intermediate_size=88, num_layers=2,
                                             num_heads=2, rank=8, steps=30, batch_size=4,
                                             block_size=64, eval_every=15, eval_batches=2,
                                             subprocess=False),
            "quick": SLTrainExperimentConfig(),
            "full": SLTrainExperimentConfig(
                hidden_size=256, intermediate_size=688, rank=64, steps=1200, n_seeds=3,
                lrs_full=(1e-3, 2e-3), lrs_lowrank=(3e-3,), lrs_sltrain=(1.5e-3, 3e-3),
                lrs_galore=(1e-2,)),
        }

    def arms(self, config: SLTrainExperimentConfig) -> list[Arm]:
        return [Arm(f"{m}-lr{lr:g}-s{config.seed + i}", {"method": m, "lr": lr, "seed": config.seed + i})
                for m in config.methods for lr in config.lrs(m) for i in range(config.n_seeds)]

    def run_arm(self, config: SLTrainExperimentConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        from optfm.experiments.config import config_to_dict

        if arm.params["method"] == "galore" and not _galore_available():
            return {"skipped": "galore-torch is not installed (pip install 'optfm[peers]')"}
        payload = {**arm.params, "config": config_to_dict(config)}
        if not config.subprocess:
            return train_arm(payload)
        return run_in_subprocess("optfm.experiments.sltrain:train_arm", payload, ctx.arm_dir(arm),
                                 threads=config.threads or 1)

    def finalize(self, config: SLTrainExperimentConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        plt = pyplot()
        by: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        skipped = {}
        for arm in self.arms(config):
            r = results[arm.key]
            if "skipped" in r:
                skipped[arm.params["method"]] = r["skipped"]
                continue
            by[(arm.params["method"], arm.params["lr"])].append(r)
        methods = [m for m in config.methods if m not in skipped]
        best: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        for m in methods:
            lr = min(config.lrs(m), key=lambda lr: mean_se([r["val_loss"] for r in by[(m, lr)]])[0])
            best[m] = (lr, by[(m, lr)])
        metrics: dict[str, float] = {}
        full_ref = best.get("full")
        rows = ["| method | lr | val loss (nats/byte) | bits/byte | perplexity | parameters | "
                "static memory (MiB) | peak RSS (MiB) | step time (ms) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            lr, rs = best[m]
            loss, se = mean_se([r["val_loss"] for r in rs])
            vals = {
                "val_loss": loss, "val_loss_se": se,
                "val_bpb": mean_se([r["val_bpb"] for r in rs])[0],
                "val_ppl": mean_se([r["val_ppl"] for r in rs])[0],
                "params": rs[0]["params"], "static_bytes": rs[0]["static_bytes"],
                "peak_rss_bytes": mean_se([r["peak_rss_bytes"] for r in rs])[0],
                "step_time_s": mean_se([r["step_time_s"] for r in rs])[0], "best_lr": lr,
            }
            for k, v in vals.items():
                metrics[f"{k}_{m}"] = v
            rows.append(
                f"| {m} | {lr:g} | {loss:.4f} ± {se:.4f} | {vals['val_bpb']:.3f} | {vals['val_ppl']:.2f} | "
                f"{vals['params']:,} | {vals['static_bytes'] / 2**20:.2f} | "
                f"{vals['peak_rss_bytes'] / 2**20:.0f} | {1e3 * vals['step_time_s']:.1f} |")
        ratios = []
        if full_ref is not None:
            for m in methods:
                if m == "full":
                    continue
                for k in ("params", "static_bytes", "peak_rss_bytes", "step_time_s"):
                    metrics[f"ratio_{k}_{m}_vs_full"] = metrics[f"{k}_{m}"] / metrics[f"{k}_full"]
                ratios.append(
                    f"- **{m} / full rank**: parameters {metrics[f'ratio_params_{m}_vs_full']:.2f}×, "
                    f"static memory {metrics[f'ratio_static_bytes_{m}_vs_full']:.2f}×, "
                    f"peak RSS {metrics[f'ratio_peak_rss_bytes_{m}_vs_full']:.2f}×, step time "
                    f"{metrics[f'ratio_step_time_s_{m}_vs_full']:.2f}×; val loss "
                    f"{metrics[f'val_loss_{m}'] - metrics['val_loss_full']:+.4f} nats/byte.")

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for m in methods:
            lr, rs = best[m]
            steps = [h["step"] for h in rs[0]["history"]]
            mean = [mean_se([r["history"][i]["val_loss"] for r in rs])[0] for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, label=f"{m} (lr {lr:g})")
        ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation curves")
        ax.grid(alpha=0.3)
        ax.legend()
        curves = ctx.savefig(fig, "val_curves.png")

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = range(len(methods))
        axes[0].bar(xs, [metrics[f"static_bytes_{m}"] / 2**20 for m in methods])
        axes[0].set(ylabel="MiB", title="Static memory (params+grads+opt state+buffers)")
        axes[1].bar(xs, [metrics[f"peak_rss_bytes_{m}"] / 2**20 for m in methods], color="tab:orange")
        axes[1].set(ylabel="MiB", title="Peak RSS of the arm's process")
        for a in axes:
            a.set_xticks(list(xs), methods)
            a.grid(alpha=0.3, axis="y")
        mem = ctx.savefig(fig, "memory.png")

        summary = [
            f"Tiny Llama d={config.hidden_size}, ffn {config.intermediate_size}, {config.num_layers} "
            f"layers; rank {config.rank}, δ = {config.density:g}, α = {config.alpha:g}; "
            f"{config.steps} steps of {config.batch_size}×{config.block_size} bytes; "
            f"{config.n_seeds} seed(s); best lr per method by validation loss.",
            "", *rows, "", *ratios, "",
            *(f"- {m} skipped: {why}" for m, why in skipped.items()),
            "", f"![Validation curves]({curves})", "", f"![Memory]({mem})",
            "", "Peak RSS includes the Python interpreter, torch and the corpus (tens of MiB), "
            "which dominate at this scale; static memory is the part the methods change.",
        ]
        return Outcome(metrics=metrics, summary="\n".join(summary))

