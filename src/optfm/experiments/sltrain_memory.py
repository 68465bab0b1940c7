"""``sltrain-memory``: SLTrain's memory claim end to end, measured (specs/pretraining.md, "Memory
accounting").

Every method (full rank, low rank, SLTrain, GaLore) × optimizer (``adamw``: fp32 AdamW states;
``adamw8bit``: bitsandbytes' 8-bit AdamW, GaLore's ``GaLoreAdamW8bit`` for GaLore;
``adamw8bit-torchao`` optionally) × update mode (``global``: one ``optimizer.step()`` after
backward; ``per_layer``: each parameter stepped in its gradient hook, its gradient freed at once)
is trained for a few steps on the byte-level Python corpus, **one subprocess per arm**
(:func:`optfm.experiments.sltrain.train_arm`), so each peak RSS is the arm's own. Memory does not
need many steps: the states exist after the first one and the peak of a step repeats.

Reported per arm:

- exact static bytes from the real tensors: parameters + gradients (all of them for ``global``;
  the largest single one for ``per_layer``, the transient peak) + every tensor the optimizer
  really holds (8-bit codes, block-wise scales, quantisation maps, fp32 states of the tensors too
  small to quantise, step counters, GaLore projection matrices) + buffers (SLTrain's int32 index,
  rotary tables); next to the closed form of :func:`optfm.pretraining.memory.static_memory_bytes`
  for the same shapes (fp32 weights; 8-bit Adam as 2 B per parameter);
- the peak of live tensor bytes in one training step, split by category (parameters, optimizer
  state, activations, gradients, ...; torch's memory profiler, :func:`optfm.training.peak_tensor_bytes`):
  what the tensors need, without allocator slack — deterministic, unlike RSS;
- bytes of activations autograd saves for backward on one batch (``saved_tensors_hooks``);
- peak RSS: the process's RSS is taken after the imports and the corpus, the peak is reset to it
  (``/proc/self/clear_refs``), and "RSS added" = peak − that baseline is the part the arm adds.
  It moves by tens of MiB between identical runs (allocator and page reuse), so each arm can be
  run ``repeats`` times (a fresh process each): the median and the range are reported;
- step time and the final validation loss (a few steps: a sanity check, not a comparison).

The summary compares SLTrain + 8-bit + per-layer with full-rank AdamW (global step) and puts the
closed-form paper-scale 7B figures (:func:`optfm.pretraining.memory.paper_scale_table`) beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, register
from optfm.experiments.config import ConfigError, config_to_dict
from optfm.experiments.sltrain import (
    METHODS,
    OPTIMIZERS,
    LlamaArmConfig,
    SLTrainExperimentConfig,
    skip_reason,
    train_arm,
)
from optfm.experiments.worker import run_in_subprocess

__all__ = ["SLTrainMemoryConfig", "SLTrainMemoryExperiment"]

MODES = ("global", "per_layer")
REFERENCE = ("full", "adamw", "global")
TARGET = ("sltrain", "adamw8bit", "per_layer")
_MiB = 2**20


@dataclass
class SLTrainMemoryConfig(LlamaArmConfig):
    optimizers: tuple[str, ...] = ("adamw", "adamw8bit")
    modes: tuple[str, ...] = MODES
    lr_full: float = 1e-3
    lr_lowrank: float = 3e-3
    lr_sltrain: float = 3e-3
    lr_galore: float = 1e-2
    steps: int = 20
    eval_batches: int = 2
    repeats: int = 1
    subprocess: bool = True

    def validate(self) -> None:
        super().validate()
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        for key, allowed in (("methods", METHODS), ("optimizers", OPTIMIZERS), ("modes", MODES)):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"{key} must not be empty")
            for v in values:
                if v not in allowed:
                    raise ConfigError(f"{key}: {v!r} is not one of {', '.join(allowed)}")
        self.arm_config().validate()

    def lr(self, method: str) -> float:
        return getattr(self, f"lr_{method}")

    def arm_config(self) -> SLTrainExperimentConfig:
        """The ``sltrain`` config each arm is trained with (one lr per method)."""
        return SLTrainExperimentConfig(
            **self.shared_fields(), lrs_full=(self.lr_full,), lrs_lowrank=(self.lr_lowrank,),
            lrs_sltrain=(self.lr_sltrain,), lrs_galore=(self.lr_galore,), steps=self.steps,
            eval_every=self.steps, eval_batches=self.eval_batches, subprocess=self.subprocess)


def _key(method: str, optimizer: str, mode: str) -> str:
    return f"{method}-{optimizer}-{mode.replace('_', '-')}"


def _median(xs: list[float]) -> float:
    import statistics

    return float(statistics.median(xs))


def _closed_form(config: SLTrainMemoryConfig, method: str, optimizer: str, mode: str) -> int | None:
    """Closed-form static bytes for the same shapes (fp32), or ``None`` where there is none."""
    from optfm.pretraining.memory import LlamaSize, static_memory_bytes

    if method == "galore" or optimizer not in ("adamw", "adamw8bit", "adamw8bit-torchao"):
        return None
    size = LlamaSize("measured", config.hidden_size, config.intermediate_size, config.num_layers,
                     config.num_heads, rank=config.rank, density=config.density, vocab_size=257)
    return static_memory_bytes(size, method, weight_bytes=4, state_bytes=4,  # type: ignore[arg-type]
                               optimizer="adam" if optimizer == "adamw" else "adam8bit",
                               per_layer=mode == "per_layer", index_bytes="auto").total


def _mib(n: float | None, spec: str = ".2f") -> str:
    return "–" if n is None else format(n / _MiB, spec)


@register
class SLTrainMemoryExperiment(Experiment):
    name = "sltrain-memory"
    description = ("SLTrain's memory claim measured: each method × {fp32 AdamW, 8-bit AdamW} × "
                   "{global step, per-layer updates}: exact static bytes, saved activations, "
                   "peak RSS per subprocess, next to the closed-form paper-scale table.")
    config_cls = SLTrainMemoryConfig
    minutes = {"smoke": 0.2, "quick": 3.0, "full": 8.0}

    @classmethod
    def profiles(cls) -> dict[str, SLTrainMemoryConfig]:
        return {
            # in-process, tiny: plumbing only (RSS is not per arm without subprocesses)
            "smoke": SLTrainMemoryConfig(methods=("full", "sltrain"), hidden_size=32,
                                         intermediate_size=88, num_layers=2, num_heads=2, rank=8,
                                         steps=3, batch_size=2, block_size=32, eval_batches=1,
                                         subprocess=False),
            # the spec's quick model (d = 128)
            "quick": SLTrainMemoryConfig(),
            # the spec's full model (d = 256), torchao's 8-bit AdamW as well
            "full": SLTrainMemoryConfig(hidden_size=256, intermediate_size=688, rank=64,
                                        optimizers=("adamw", "adamw8bit", "adamw8bit-torchao")),
        }

    def arms(self, config: SLTrainMemoryConfig) -> list[Arm]:
        return [Arm(_key(m, o, mode) + (f"-r{i}" if config.repeats > 1 else ""),
                    {"method": m, "optimizer": o, "mode": mode})
                for i in range(config.repeats)
                for m in config.methods for o in config.optimizers for mode in config.modes]

    def run_arm(self, config: SLTrainMemoryConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        m, o, mode = arm.params["method"], arm.params["optimizer"], arm.params["mode"]
        why = skip_reason(m, o)
        if why is not None:
            return {"skipped": why}
        payload = {"method": m, "lr": config.lr(m), "seed": config.seed, "optimizer": o,
                   "per_layer": mode == "per_layer", "config": config_to_dict(config.arm_config())}
        if not config.subprocess:
            return train_arm(payload)
        return run_in_subprocess("optfm.experiments.sltrain:train_arm", payload, ctx.arm_dir(arm),
                                 threads=config.threads or 1)

    def finalize(self, config: SLTrainMemoryConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        from optfm.pretraining.memory import GB, paper_scale_table

        metrics: dict[str, float] = {}
        runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        skipped = []
        for arm in self.arms(config):
            r = results[arm.key]
            p = arm.params
            if "skipped" in r:
                if arm.key.endswith("-r0") or config.repeats == 1:
                    skipped.append(f"- {_key(p['method'], p['optimizer'], p['mode'])} skipped: "
                                   f"{r['skipped']}")
                continue
            runs.setdefault((p["method"], p["optimizer"], p["mode"]), []).append(r)
        done = {}
        for k, rs in runs.items():  # exact numbers from the first run; measured ones: medians
            done[k] = {**rs[0], **{f: _median([r[f] for r in rs]) for f in (
                "peak_rss_bytes", "peak_rss_added_bytes", "rss_setup_added_bytes", "step_time_s")},
                "rss_added_min": min(r["peak_rss_added_bytes"] for r in rs),
                "rss_added_max": max(r["peak_rss_added_bytes"] for r in rs), "n_runs": len(rs)}
        ref = done.get(REFERENCE)
        rows = ["| method | optimizer | updates | params | grads | optimizer state | buffers "
                "| **static (MiB)** | closed form (MiB) | static / ref | **peak tensors (MiB)** "
                "| of which activations etc. | tensors / ref | **RSS added (MiB)** | range "
                "| RSS added / ref | step (ms) | val loss |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (m, o, mode), r in done.items():
            key = _key(m, o, mode)
            closed = _closed_form(config, m, o, mode)
            cats = r.get("peak_tensor_by_category") or {}
            tensors = r.get("peak_tensor_bytes")
            other = None if tensors is None else tensors - sum(
                cats.get(c, 0) for c in ("parameter", "optimizer_state", "gradient"))
            vals = {"static_bytes": r["static_bytes"], "param_bytes": r["param_bytes"],
                    "grad_bytes": r["grad_bytes"], "optimizer_state_bytes": r["optimizer_state_bytes"],
                    "buffer_bytes": r["buffer_bytes"], "activation_bytes": r["activation_bytes"],
                    "peak_rss_bytes": r["peak_rss_bytes"],
                    "peak_rss_added_bytes": r["peak_rss_added_bytes"],
                    "rss_added_min_bytes": r["rss_added_min"], "rss_added_max_bytes": r["rss_added_max"],
                    "rss_setup_added_bytes": r["rss_setup_added_bytes"],
                    "step_time_s": r["step_time_s"], "val_loss": r["val_loss"],
                    "params": r["params"]}
            if tensors is not None:
                vals["peak_tensor_bytes"] = tensors
                vals["peak_tensor_other_bytes"] = other
                for c, v in cats.items():
                    vals[f"peak_tensor_{c}_bytes"] = v
            if closed is not None:
                vals["closed_form_bytes"] = closed
            if ref is not None:
                vals["ratio_static"] = r["static_bytes"] / ref["static_bytes"]
                vals["ratio_rss_added"] = r["peak_rss_added_bytes"] / ref["peak_rss_added_bytes"]
                vals["ratio_step_time"] = r["step_time_s"] / ref["step_time_s"]
                if tensors is not None and ref.get("peak_tensor_bytes"):
                    vals["ratio_peak_tensor"] = tensors / ref["peak_tensor_bytes"]
            for k, v in vals.items():
                metrics[f"{k}_{key}"] = float(v)
            rows.append(
                f"| {m} | {r['optimizer']} | {mode.replace('_', '-')} | {_mib(r['param_bytes'])} "
                f"| {_mib(r['grad_bytes'])} | {_mib(r['optimizer_state_bytes'])} "
                f"| {_mib(r['buffer_bytes'])} | **{_mib(r['static_bytes'])}** | {_mib(closed)} "
                f"| {vals.get('ratio_static', float('nan')):.3f} | **{_mib(tensors, '.1f')}** "
                f"| {_mib(other, '.1f')} | {vals.get('ratio_peak_tensor', float('nan')):.3f} "
                f"| **{_mib(r['peak_rss_added_bytes'], '.0f')}** "
                f"| {_mib(r['rss_added_min'], '.0f')}–{_mib(r['rss_added_max'], '.0f')} "
                f"| {vals.get('ratio_rss_added', float('nan')):.3f} | {1e3 * r['step_time_s']:.0f} "
                f"| {r['val_loss']:.3f} |")

        head: list[str] = []
        target = done.get(TARGET)
        if ref is not None and target is not None:
            s_ratio = target["static_bytes"] / ref["static_bytes"]
            r_ratio = target["peak_rss_added_bytes"] / ref["peak_rss_added_bytes"]
            a_ratio = target["peak_rss_bytes"] / ref["peak_rss_bytes"]
            t_ratio = target["step_time_s"] / ref["step_time_s"]
            metrics.update({"target_vs_ref_static": s_ratio, "target_vs_ref_rss_added": r_ratio,
                            "target_vs_ref_peak_rss": a_ratio, "target_vs_ref_step_time": t_ratio,
                            "saving_static_pct": 100 * (1 - s_ratio),
                            "saving_rss_added_pct": 100 * (1 - r_ratio)})
            tensor_txt = ""
            if target.get("peak_tensor_bytes") and ref.get("peak_tensor_bytes"):
                p_ratio = target["peak_tensor_bytes"] / ref["peak_tensor_bytes"]
                metrics.update({"target_vs_ref_peak_tensor": p_ratio,
                                "saving_peak_tensor_pct": 100 * (1 - p_ratio)})
                tensor_txt = (f"peak of live tensors in a training step "
                              f"{_mib(target['peak_tensor_bytes'], '.1f')} vs "
                              f"{_mib(ref['peak_tensor_bytes'], '.1f')} MiB (×{p_ratio:.3f}, "
                              f"{100 * (1 - p_ratio):.1f}% less); ")
            head = [
                "**SLTrain + 8-bit AdamW + per-layer vs full-rank fp32 AdamW (global step)**: "
                f"static memory {_mib(target['static_bytes'])} vs {_mib(ref['static_bytes'])} MiB "
                f"(×{s_ratio:.3f}, {100 * (1 - s_ratio):.1f}% less); {tensor_txt}peak RSS above "
                f"the pre-model baseline {_mib(target['peak_rss_added_bytes'], '.1f')} vs "
                f"{_mib(ref['peak_rss_added_bytes'], '.1f')} MiB (×{r_ratio:.3f}, "
                f"{100 * (1 - r_ratio):.1f}% less); whole-process peak RSS ×{a_ratio:.3f}; step "
                f"time ×{t_ratio:.2f}.", ""]

        seven = [r for r in paper_scale_table() if r["size"] == "7B"]
        full7 = next(r for r in seven if r["method"] == "full" and r["setting"] == "bf16 Adam")
        sl7 = [r for r in seven if r["method"] == "sltrain" and r["setting"] != "bf16 Adam"]
        paper = ["| 7B (closed form, bf16 weights) | memory (GB) | less than full-rank bf16 Adam |",
                 "|---|---|---|",
                 f"| full rank, bf16 Adam, bf16 gradients | {full7['memory_GB']:.2f} | – |"]
        for r in sl7:
            paper.append(f"| SLTrain r={r['rank']} δ={r['density']:g} int{r['index_bits']} index, "
                         f"8-bit Adam, per-layer (no gradient / largest gradient) "
                         f"| {r['memory_no_grad_GB']:.2f} / {r['memory_GB']:.2f} "
                         f"| {100 * (1 - r['memory_no_grad_vs_full']):.1f}% / "
                         f"{100 * (1 - r['memory_vs_full']):.1f}% |")
        metrics["paper_7b_full_GB"] = full7["memory_GB"]
        metrics["paper_7b_sltrain_8bit_per_layer_GB"] = sl7[0]["memory_no_grad_GB"]
        metrics["paper_7b_saving_pct"] = 100 * (1 - sl7[0]["memory_no_grad_GB"] * GB
                                                / (full7["memory_GB"] * GB))

        summary = [
            f"Tiny Llama d={config.hidden_size}, ffn {config.intermediate_size}, "
            f"{config.num_layers} layers, vocab 257, fp32; SLTrain/low rank r={config.rank}, "
            f"δ={config.density:g}; GaLore rank {config.rank}; {config.steps} steps of "
            f"{config.batch_size}×{config.block_size} tokens; one subprocess per arm: "
            f"{config.subprocess}; {config.repeats} run(s) per arm (measured columns: median, "
            f"range of RSS added over the runs). Reference (ref): full rank, fp32 AdamW, global "
            "step.", "",
            *head, *rows, "", *skipped, "",
            "Static = parameters + gradients (per-layer: the largest single gradient) + the "
            "optimizer's real state tensors + buffers, from the tensors. Closed form: "
            "`static_memory_bytes` with fp32 weights/gradients and 8-bit Adam at 2 B per "
            "parameter (it ignores fp32 states of tensors under 4096 entries, quantisation "
            "constants, step counters and the rotary buffers). Peak tensors: the largest sum of "
            "live tensor bytes during one (extra) training step, from torch's memory profiler; "
            "'activations etc.' is that peak minus the parameters, optimizer states and "
            "gradients alive at that moment. RSS added = peak RSS − RSS just before the model is "
            "built (peak reset there). Step times of arms run one after another on a shared "
            "machine: indicative only (`optfm bench sltrain` interleaves them).",
            "", *paper,
        ]
        return Outcome(metrics=metrics, summary="\n".join(summary))
