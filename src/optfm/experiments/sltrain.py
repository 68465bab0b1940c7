"""``sltrain``: byte-level pretraining of a tiny Llama with full-rank, low-rank, SLTrain and GaLore
weights (specs/pretraining.md).

Corpus: CPython's standard-library sources (hash split by file; byte tokens, vocabulary 257).
Model: ``LlamaForCausalLM`` from ``LlamaConfig`` (quick: d = 128, ffn 352, 4 layers, 4 heads,
r = 32; full: d = 256, ffn 688, r = 64), untied embeddings, δ = 0.03. AdamW with 10% warm-up and
cosine decay, clip 1.0, fp32. GaLore comes from the ``galore-torch`` peer package (skipped with a
stated reason when it is not installed).

Optimizer and update mode (``--set optimizer=adamw8bit per_layer=true``) apply to every arm:
``optimizer`` is ``adamw`` (fp32 states), ``adamw8bit`` (bitsandbytes) or ``adamw8bit-torchao``
(torchao); GaLore arms use GaLore's own AdamW / 8-bit AdamW (no torchao variant: skipped).
``per_layer`` steps each parameter inside backward and frees its gradient at once
(:class:`optfm.pretraining.PerLayerOptimizer`; clipping is then per parameter, see
``pretraining/per_layer.py``). ``extra_arms`` adds single arms with their own optimizer and mode,
``"method:optimizer[:per_layer]"`` (e.g. ``"sltrain:adamw8bit:per_layer"``), at the method's first
learning rate. ``checkpoint_every > 0`` makes each arm resumable (a safetensors checkpoint with
model, optimizer — 8-bit states included — scheduler and data-generator state in the arm's
directory, removed when the arm finishes).

Every arm runs in its own subprocess (:func:`optfm.experiments.worker.run_in_subprocess`) so that
its peak resident memory (``VmHWM``) is its own. Reported per arm: validation loss (nats/byte),
bits per byte, perplexity, parameter counts, exact static memory (parameters + gradients — only
the largest single one in per-layer mode — + the optimizer's real state tensors + buffers such as
SLTrain's index), measured peak RSS (absolute, and above the process's RSS just before the model is
built), the peak of live tensor bytes in one (extra, profiled) training step with its split by
category (:func:`optfm.training.peak_tensor_bytes`), bytes of activations saved for backward, and
time per training step.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se
from optfm.experiments.worker import run_in_subprocess

__all__ = ["SLTrainExperiment", "SLTrainExperimentConfig", "train_arm"]

METHODS = ("full", "lowrank", "sltrain", "galore")
OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit-torchao")
_GALORE = {"adamw": "galore", "adamw8bit": "galore8bit"}


def optimizer_for(method: str, optimizer: str) -> str | None:
    """The :func:`~optfm.pretraining.build_optimizer` name for ``method`` with ``optimizer``
    (GaLore arms use GaLore's own optimizers); ``None`` if there is none (GaLore + torchao)."""
    if method == "galore":
        return _GALORE.get(optimizer)
    return optimizer


def parse_extra_arm(spec: str) -> tuple[str, str, bool]:
    """``"method:optimizer[:per_layer]"`` -> ``(method, optimizer, per_layer)``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "per_layer"):
        raise ConfigError(f"extra_arms: {spec!r} is not 'method:optimizer' or "
                          "'method:optimizer:per_layer'")
    method, opt = parts[0], parts[1]
    if method not in METHODS:
        raise ConfigError(f"extra_arms: method {method!r} is not one of {', '.join(METHODS)}")
    if opt not in OPTIMIZERS:
        raise ConfigError(f"extra_arms: optimizer {opt!r} is not one of {', '.join(OPTIMIZERS)}")
    return method, opt, len(parts) == 3


def variant_label(method: str, optimizer: str, per_layer: bool) -> str:
    """``sltrain_adamw8bit_per_layer``-style label (metric-key friendly)."""
    return f"{method}_{optimizer.replace('-', '_')}" + ("_per_layer" if per_layer else "")


@dataclass
class LlamaArmConfig(ExperimentConfig):
    """Model, SLTrain/GaLore and batch settings shared by ``sltrain`` and ``sltrain-memory``."""

    methods: tuple[str, ...] = METHODS
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    rank: int = 32
    density: float = 0.03
    alpha: float = 32.0
    galore_scale: float = 0.25
    galore_update_proj_gap: int = 200
    batch_size: int = 16
    block_size: int = 128

    def validate(self) -> None:
        super().validate()
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "rank",
                    "batch_size", "block_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size must be divisible by num_heads")
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")

    def shared_fields(self) -> dict[str, Any]:
        """This class's fields (and :class:`ExperimentConfig`'s) with their values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LlamaArmConfig)}


@dataclass
class SLTrainExperimentConfig(LlamaArmConfig):
    lrs_full: tuple[float, ...] = (1e-3,)
    lrs_lowrank: tuple[float, ...] = (3e-3,)
    lrs_sltrain: tuple[float, ...] = (3e-3,)
    lrs_galore: tuple[float, ...] = (1e-2,)
    steps: int = 250
    eval_every: int = 50
    eval_batches: int = 8
    n_seeds: int = 1
    subprocess: bool = True
    optimizer: str = "adamw"
    per_layer: bool = False
    extra_arms: tuple[str, ...] = ()
    checkpoint_every: int = 0

    def validate(self) -> None:
        super().validate()
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        for spec in self.extra_arms:
            method, _, _ = parse_extra_arm(spec)
            if not self.lrs(method) or any(lr <= 0 for lr in self.lrs(method)):
                raise ConfigError(f"lrs_{method} must be non-empty and > 0 for extra arm {spec!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for key in ("steps", "eval_every", "eval_batches", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for m in self.methods:
            lrs = self.lrs(m)
            if not lrs or any(lr <= 0 for lr in lrs):
                raise ConfigError(f"lrs_{m} must be non-empty and > 0, got {lrs}")

    def lrs(self, method: str) -> tuple[float, ...]:
        return getattr(self, f"lrs_{method}")


def train_arm(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one arm in this process and return its result (used by the subprocess entry point).

    ``payload``: ``method``, ``lr``, ``seed``, ``config`` (a config dict), optionally
    ``optimizer`` and ``per_layer`` (default: the config's) and ``checkpoint`` (a path: resume
    from it, write it every ``checkpoint_every`` steps, delete it at the end).
    """
    import os

    import torch

    from optfm.data import python_stdlib_corpus
    from optfm.models import count_parameters, tiny_llama
    from optfm.pretraining import (
        PretrainConfig,
        SLTrainConfig,
        apply_lowrank,
        apply_sltrain,
        build_optimizer,
        optimizer_class,
        pretrain,
        warmup_cosine,
    )
    from optfm.pretraining.memory import module_static_bytes, optimizer_state_bytes
    from optfm.training import (
        current_rss_bytes,
        peak_rss_bytes,
        peak_tensor_bytes,
        reset_peak_rss,
        resolve_device,
        saved_activation_bytes,
    )

    c = payload["config"]
    method, lr, seed = payload["method"], payload["lr"], payload["seed"]
    opt_choice = payload.get("optimizer", c.get("optimizer", "adamw"))
    per_layer = bool(payload.get("per_layer", c.get("per_layer", False)))
    opt_name = optimizer_for(method, opt_choice)
    if opt_name is None:
        raise ValueError(f"method {method!r} has no {opt_choice!r} optimizer")
    torch.set_num_threads(max(1, int(c["threads"]) or 1))
    device = resolve_device(c["device"])
    corpus = python_stdlib_corpus()
    # Import what building and training import lazily (transformers' Llama modules, the
    # optimizer's package) before the RSS baseline, so that it is not counted as the method's.
    from transformers import LlamaForCausalLM  # noqa: F401

    optimizer_class(opt_name)
    rss_reset = reset_peak_rss()
    rss_before = current_rss_bytes()  # interpreter, libraries, corpus: not the method's
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
                         lr=lr, eval_every=c["eval_every"], eval_batches=c["eval_batches"], seed=seed,
                         per_layer=per_layer, checkpoint_every=int(c.get("checkpoint_every", 0)))
    opt = build_optimizer(model, opt_name, lr=lr, galore_rank=c["rank"],
                          galore_scale=c["galore_scale"],
                          galore_update_proj_gap=c["galore_update_proj_gap"], per_layer=per_layer)
    sched = warmup_cosine(opt, cfg.steps, max(1, int(0.1 * cfg.steps)), cfg.min_lr_frac)
    rss_setup = current_rss_bytes() - rss_before  # the model (optimizer states come lazily)
    ckpt = payload.get("checkpoint")
    out = pretrain(model, opt, sched, corpus.train, corpus.val, cfg, device=device,
                   checkpoint_path=ckpt)
    peak = peak_rss_bytes()
    static = module_static_bytes(model, optimizer_state_bytes_per_param=0, per_layer=per_layer)
    opt_bytes = optimizer_state_bytes(opt)
    from optfm.data.corpus import sample_lm_batch

    x, y = sample_lm_batch(corpus.train, cfg.batch_size, cfg.block_size,
                           generator=torch.Generator().manual_seed(seed))
    x, y = x.to(device), y.to(device)

    def loss() -> torch.Tensor:
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    activations = saved_activation_bytes(model, loss)  # after the peak was read

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()  # per-layer: the updates happen here
        if not per_layer:
            opt.step()

    tensors = peak_tensor_bytes(one_step, device=device.type) or {}  # one more (profiled) step
    if ckpt is not None and os.path.exists(ckpt):
        os.remove(ckpt)
    return {
        **out["final"], "history": out["history"], "step_time_s": out["step_time_s"],
        "optimizer": opt_name, "per_layer": per_layer,
        "params": count_parameters(model),
        "static_bytes": static.total + opt_bytes, "param_bytes": static.parameters,
        "grad_bytes": static.gradients, "optimizer_state_bytes": opt_bytes,
        "buffer_bytes": static.buffers, "activation_bytes": activations,
        "peak_rss_bytes": peak, "rss_before_model_bytes": rss_before,
        "peak_rss_added_bytes": peak - rss_before, "rss_peak_reset": rss_reset,
        "rss_setup_added_bytes": rss_setup,
        "peak_tensor_bytes": tensors.get("peak_bytes"),
        "peak_tensor_by_category": tensors.get("by_category"),
    }


_PACKAGES = {"adamw8bit": ("bitsandbytes",), "adamw8bit-torchao": ("torchao",),
             "galore": ("galore_torch",), "galore8bit": ("galore_torch", "bitsandbytes")}
_PIP_NAMES = {"galore_torch": "galore-torch"}


def skip_reason(method: str, optimizer: str) -> str | None:
    """Why an arm cannot run here (a missing peer package, no such optimizer), else ``None``."""
    import importlib
    import importlib.util

    name = optimizer_for(method, optimizer)
    if name is None:
        return f"{method} has no {optimizer} variant (GaLore's 8-bit optimizer is bitsandbytes')"
    for module in _PACKAGES.get(name, ()):
        missing = importlib.util.find_spec(module) is None
        if not missing:
            try:  # installed but not importable (galore-torch without bitsandbytes, ...)
                importlib.import_module(module)
            except ImportError:
                missing = True
        if missing:
            return (f"{_PIP_NAMES.get(module, module)} is not installed "
                    "(pip install 'optfm[peers]')")
    return None


def _suffix(optimizer: str, per_layer: bool) -> str:
    if (optimizer, per_layer) == ("adamw", False):
        return ""
    return f"-{optimizer}" + ("+per-layer" if per_layer else "")


@register
class SLTrainExperiment(Experiment):
    name = "sltrain"
    description = ("Byte-level Llama pretraining on the Python stdlib: full rank vs low rank vs "
                   "SLTrain vs GaLore (loss, bits/byte, parameters, static memory, peak RSS, step time).")
    config_cls = SLTrainExperimentConfig
    minutes = {"smoke": 0.3, "quick": 4.0, "full": 180.0}

    @classmethod
    def profiles(cls) -> dict[str, SLTrainExperimentConfig]:
        return {
            # in-process (no per-arm subprocess): seconds, for the tests; one per-layer 8-bit arm
            "smoke": SLTrainExperimentConfig(hidden_size=32, intermediate_size=88, num_layers=2,
                                             num_heads=2, rank=8, steps=30, batch_size=4,
                                             block_size=64, eval_every=15, eval_batches=2,
                                             subprocess=False,
                                             extra_arms=("sltrain:adamw8bit:per_layer",)),
            "quick": SLTrainExperimentConfig(extra_arms=("sltrain:adamw8bit:per_layer",)),
            "full": SLTrainExperimentConfig(
                hidden_size=256, intermediate_size=688, rank=64, steps=1200, n_seeds=3,
                lrs_full=(1e-3, 2e-3), lrs_lowrank=(3e-3,), lrs_sltrain=(1.5e-3, 3e-3),
                lrs_galore=(1e-2,), extra_arms=("sltrain:adamw8bit:per_layer",),
                checkpoint_every=200),
        }

    def _variants(self, config: SLTrainExperimentConfig
                  ) -> list[tuple[str, str, str, bool, tuple[float, ...], int]]:
        """``(label, method, optimizer, per_layer, lrs, n_seeds)`` of every reported variant."""
        main = [(m, m, config.optimizer, config.per_layer, config.lrs(m), config.n_seeds)
                for m in config.methods]
        seen = {(m, config.optimizer, config.per_layer) for m in config.methods}
        extra = []
        for spec in config.extra_arms:
            m, opt, pl = parse_extra_arm(spec)
            if (m, opt, pl) not in seen:
                seen.add((m, opt, pl))
                extra.append((variant_label(m, opt, pl), m, opt, pl, config.lrs(m)[:1], 1))
        return main + extra

    def arms(self, config: SLTrainExperimentConfig) -> list[Arm]:
        return [Arm(f"{m}{_suffix(opt, pl)}-lr{lr:g}-s{config.seed + i}",
                    {"method": m, "lr": lr, "seed": config.seed + i, "optimizer": opt,
                     "per_layer": pl, "label": label})
                for label, m, opt, pl, lrs, n in self._variants(config)
                for lr in lrs for i in range(n)]

    def run_arm(self, config: SLTrainExperimentConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        from optfm.experiments.config import config_to_dict

        why = skip_reason(arm.params["method"], arm.params["optimizer"])
        if why is not None:
            return {"skipped": why}
        payload = {**arm.params, "config": config_to_dict(config)}
        if config.checkpoint_every > 0:
            payload["checkpoint"] = str(ctx.arm_dir(arm) / "checkpoint.safetensors")
        if not config.subprocess:
            return train_arm(payload)
        return run_in_subprocess("optfm.experiments.sltrain:train_arm", payload, ctx.arm_dir(arm),
                                 threads=config.threads or 1)

    def finalize(self, config: SLTrainExperimentConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        plt = pyplot()
        by: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        skipped: dict[str, str] = {}
        for arm in self.arms(config):
            r = results[arm.key]
            if "skipped" in r:
                skipped[arm.params["label"]] = r["skipped"]
                continue
            by[(arm.params["label"], arm.params["lr"])].append(r)
        variants = {v[0]: v for v in self._variants(config) if v[0] not in skipped}
        labels = list(variants)
        best: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        for lab in labels:
            lrs = variants[lab][4]
            lr = min(lrs, key=lambda lr: mean_se([r["val_loss"] for r in by[(lab, lr)]])[0])
            best[lab] = (lr, by[(lab, lr)])
        metrics: dict[str, float] = {}
        full_ref = best.get("full")
        rows = ["| arm | optimizer | updates | lr | val loss (nats/byte) | bits/byte | perplexity "
                "| parameters | static memory (MiB) | peak RSS (MiB) | RSS added (MiB) "
                "| step time (ms) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for lab in labels:
            lr, rs = best[lab]
            loss, se = mean_se([r["val_loss"] for r in rs])
            vals = {
                "val_loss": loss, "val_loss_se": se,
                "val_bpb": mean_se([r["val_bpb"] for r in rs])[0],
                "val_ppl": mean_se([r["val_ppl"] for r in rs])[0],
                "params": rs[0]["params"], "static_bytes": rs[0]["static_bytes"],
                "peak_rss_bytes": mean_se([r["peak_rss_bytes"] for r in rs])[0],
                "peak_rss_added_bytes": mean_se([r["peak_rss_added_bytes"] for r in rs])[0],
                "activation_bytes": rs[0]["activation_bytes"],
                "step_time_s": mean_se([r["step_time_s"] for r in rs])[0], "best_lr": lr,
            }
            for k, v in vals.items():
                metrics[f"{k}_{lab}"] = v
            rows.append(
                f"| {lab} | {rs[0]['optimizer']} | {'per-layer' if rs[0]['per_layer'] else 'global'} "
                f"| {lr:g} | {loss:.4f} ± {se:.4f} | {vals['val_bpb']:.3f} | {vals['val_ppl']:.2f} | "
                f"{vals['params']:,} | {vals['static_bytes'] / 2**20:.2f} | "
                f"{vals['peak_rss_bytes'] / 2**20:.0f} | {vals['peak_rss_added_bytes'] / 2**20:.1f} "
                f"| {1e3 * vals['step_time_s']:.1f} |")
        ratios = []
        if full_ref is not None:
            for lab in labels:
                if lab == "full":
                    continue
                for k in ("params", "static_bytes", "peak_rss_bytes", "peak_rss_added_bytes",
                          "step_time_s"):
                    den = metrics[f"{k}_full"]
                    # a tiny smoke model can add no measurable RSS above the baseline: no ratio
                    metrics[f"ratio_{k}_{lab}_vs_full"] = (metrics[f"{k}_{lab}"] / den if den
                                                           else float("nan"))
                ratios.append(
                    f"- **{lab} / full rank**: parameters {metrics[f'ratio_params_{lab}_vs_full']:.2f}×, "
                    f"static memory {metrics[f'ratio_static_bytes_{lab}_vs_full']:.2f}×, "
                    f"peak RSS {metrics[f'ratio_peak_rss_bytes_{lab}_vs_full']:.2f}× "
                    f"(above the pre-model baseline "
                    f"{metrics[f'ratio_peak_rss_added_bytes_{lab}_vs_full']:.2f}×), step time "
                    f"{metrics[f'ratio_step_time_s_{lab}_vs_full']:.2f}×; val loss "
                    f"{metrics[f'val_loss_{lab}'] - metrics['val_loss_full']:+.4f} nats/byte.")

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for lab in labels:
            lr, rs = best[lab]
            steps = [h["step"] for h in rs[0]["history"]]
            mean = [mean_se([r["history"][i]["val_loss"] for r in rs])[0] for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, label=f"{lab} (lr {lr:g})")
        ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        curves = ctx.savefig(fig, "val_curves.png")

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = range(len(labels))
        axes[0].bar(xs, [metrics[f"static_bytes_{lab}"] / 2**20 for lab in labels])
        axes[0].set(ylabel="MiB", title="Static memory (params+grads+opt state+buffers)")
        axes[1].bar(xs, [metrics[f"peak_rss_added_bytes_{lab}"] / 2**20 for lab in labels],
                    color="tab:orange")
        axes[1].set(ylabel="MiB", title="Peak RSS above the pre-model baseline")
        for a in axes:
            a.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=7)
            a.grid(alpha=0.3, axis="y")
        mem = ctx.savefig(fig, "memory.png")

        mode = "per-layer updates" if config.per_layer else "a global optimizer step"
        extra = [v[0] for v in self._variants(config) if v[0] != v[1]]  # label != method
        summary = [
            f"Tiny Llama d={config.hidden_size}, ffn {config.intermediate_size}, {config.num_layers} "
            f"layers; rank {config.rank}, δ = {config.density:g}, α = {config.alpha:g}; "
            f"{config.steps} steps of {config.batch_size}×{config.block_size} bytes; "
            f"{config.n_seeds} seed(s); best lr per method by validation loss; optimizer "
            f"{config.optimizer} with {mode} (GaLore: its own variant); extra arms "
            f"{', '.join(extra) or 'none'} (one seed, first lr).",
            "", *rows, "", *ratios, "",
            *(f"- {lab} skipped: {why}" for lab, why in skipped.items()),
            "", f"![Validation curves]({curves})", "", f"![Memory]({mem})",
            "", "Peak RSS includes the Python interpreter, torch and the corpus (hundreds of MiB); "
            "'RSS added' is the peak above the process's RSS just before the model was built "
            "(the peak is reset there on Linux). At this scale activations and allocator overhead, "
            "not parameters and optimizer states, dominate it; static memory is the part the "
            "methods change. Per-layer arms clip each parameter's gradient norm on its own "
            "(global-norm clipping is not available in per-layer mode).",
        ]
        return Outcome(metrics=metrics, summary="\n".join(summary))
