"""``alignment``: IRFT/RFT and AIHF against SFT, SPIN, DPO and RLHF on a task with an exact optimum.

The task (:mod:`optfm.data.reward_task`): a prompt names one of 8 topics (plus distractor
tokens); a response is 8 tokens from a 16-token vocabulary; the ground-truth reward is a
topic-conditioned table minus a penalty for adjacent repeats. Backward dynamic programming gives
the exact KL-optimal policy for any β, so the expert that writes the demonstrations, the exact
maximum reward and the Bradley–Terry preference labels are all known. Scores are normalised:
uniform random = 0, maximum reward = 1.

Policy: a tiny GPT-2 from config over a word-level tokenizer of the task's tokens; responses are
sampled with the fixed-length sampler restricted to the 16 response tokens.

Every arm of one cell starts from the same SFT model (``sft_epochs`` on the cell's
demonstrations) and gets the same number of optimizer steps (``budget_steps``):

- (a) demonstrations only, over demonstration counts and noise levels: SFT (more epochs), SPIN
  (IRFT with one stage per epoch: regenerate on all prompts), IRFT (``irft_stages`` stages per
  epoch), RFT (explicit reward model + RLOO).
- (b) ``pref_demos`` demonstrations plus 0…N preference pairs: SFT→DPO, SFT→RM→RLOO (reward model
  fitted on the preferences, interleaved with the policy steps), AIHF ``nll`` and ``self_play``.

Metrics: ground-truth normalised score of sampled and greedy responses, win rate against the SFT
start model (same prompts), per-token NLL of held-out expert demonstrations, KL from the SFT start
model (sampled estimate), and preference accuracy of the learned reward against r* on held-out
pairs (implicit reward log π_θ − log π_SFT, or the explicit reward model).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se

__all__ = ["AlignmentExperiment", "AlignmentExperimentConfig"]

DEMO_METHODS = ("sft", "spin", "irft", "rft")
PREF_METHODS = ("sft_dpo", "sft_rm_rloo", "aihf_nll", "aihf_self_play")
LABELS = {"start": "SFT start", "sft": "SFT", "spin": "SPIN", "irft": "IRFT", "rft": "RFT",
          "sft_dpo": "SFT→DPO", "sft_rm_rloo": "SFT→RM→RLOO", "aihf_nll": "AIHF (nll)",
          "aihf_self_play": "AIHF (self-play)"}
COLORS = {"start": "k", "sft": "tab:gray", "spin": "tab:orange", "irft": "tab:blue",
          "rft": "tab:green", "sft_dpo": "tab:orange", "sft_rm_rloo": "tab:green",
          "aihf_nll": "tab:purple", "aihf_self_play": "tab:blue"}


@dataclass
class AlignmentExperimentConfig(ExperimentConfig):
    task_seed: int = 0
    expert_fraction: float = 0.65
    # policy: tiny GPT-2
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    # shared optimisation
    lrs: tuple[float, ...] = (1e-3, 3e-4)  # every method is run at each; tables use its best
    batch_size: int = 32
    beta: float = 0.5
    sft_epochs: int = 16
    budget_steps: int = 60
    irft_stages: int = 5
    rloo_samples: int = 4
    rm_warmup_steps: int = 100  # SFT→RM→RLOO: reward-model steps on the preferences first
    kl_coef: float = 0.05
    # (a) demonstrations
    demo_counts: tuple[int, ...] = (250, 1000)
    demo_noise: tuple[float, ...] = (0.0, 0.3)
    demo_methods: tuple[str, ...] = DEMO_METHODS
    # (b) preferences
    pref_demos: int = 250
    pref_counts: tuple[int, ...] = (100, 500, 2000)
    pref_methods: tuple[str, ...] = PREF_METHODS
    pref_temperature: float = 0.1
    # evaluation
    eval_prompts: int = 512
    eval_pairs: int = 512
    n_seeds: int = 2

    def validate(self) -> None:
        super().validate()
        for m in self.demo_methods:
            if m not in DEMO_METHODS:
                raise ConfigError(f"demo_methods: {m!r} is not one of {', '.join(DEMO_METHODS)}")
        for m in self.pref_methods:
            if m not in PREF_METHODS:
                raise ConfigError(f"pref_methods: {m!r} is not one of {', '.join(PREF_METHODS)}")
        for key in ("n_embd", "n_layer", "n_head", "batch_size", "sft_epochs", "budget_steps",
                    "irft_stages", "pref_demos", "eval_prompts", "eval_pairs", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.rloo_samples < 2:
            raise ConfigError(f"rloo_samples must be >= 2, got {self.rloo_samples}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ConfigError(f"lrs must be non-empty and > 0, got {self.lrs}")
        if not 0 < self.expert_fraction < 1:
            raise ConfigError(f"expert_fraction must be in (0, 1), got {self.expert_fraction}")
        if any(n < self.irft_stages for n in (*self.demo_counts, self.pref_demos)):
            raise ConfigError("every demonstration count must be >= irft_stages")
        if any(not 0 <= z < 1 for z in self.demo_noise):
            raise ConfigError(f"demo_noise values must be in [0, 1), got {self.demo_noise}")
        if any(n < 1 for n in self.pref_counts):
            raise ConfigError(f"pref_counts must be >= 1, got {self.pref_counts}")


# --------------------------------------------------------------------------- world and models
class World:
    """The task, its tokenizer, and the data of one seed (deterministic)."""

    def __init__(self, config: AlignmentExperimentConfig, seed: int) -> None:
        from optfm.data.reward_task import make_reward_task

        self.config = config
        self.seed = seed
        self.task = make_reward_task(seed=config.task_seed)
        self.tok = self.task.build_tokenizer()
        self.response_ids = [int(i) for i in self.task.response_token_ids(self.tok)]
        rng = np.random.default_rng(10_000 + seed)
        self.eval_prompts = self.task.sample_prompts(config.eval_prompts, rng)
        self.heldout = self.task.demonstrations(config.eval_prompts, rng,
                                                target_fraction=config.expert_fraction)
        self.pairs = self.task.preferences(config.eval_pairs, rng, temperature=0.0)

    def demos(self, n: int, noise: float) -> list[dict[str, str]]:
        rng = np.random.default_rng([20_000 + self.seed, n, round(noise * 1000)])
        d = self.task.demonstrations(n, rng, target_fraction=self.config.expert_fraction,
                                     noise=noise)
        return self.task.to_trl_demos(d)

    def prefs(self, n: int) -> list[dict[str, str]]:
        rng = np.random.default_rng([30_000 + self.seed, n])
        p = self.task.preferences(n, rng, temperature=self.config.pref_temperature)
        return self.task.to_trl_prefs(p)

    def new_model(self):
        from optfm.models.factories import tiny_gpt2

        c = self.config
        torch.manual_seed(self.seed)
        return tiny_gpt2(vocab_size=len(self.tok), n_embd=c.n_embd, n_layer=c.n_layer,
                         n_head=c.n_head, n_positions=32, bos_token_id=self.tok.bos_token_id,
                         eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)

    def new_reward_model(self):
        from transformers import GPT2Config, GPT2ForSequenceClassification

        c = self.config
        torch.manual_seed(self.seed + 1)
        cfg = GPT2Config(vocab_size=len(self.tok), n_embd=c.n_embd, n_layer=c.n_layer,
                         n_head=c.n_head, n_positions=32, num_labels=1,
                         pad_token_id=self.tok.pad_token_id, bos_token_id=self.tok.bos_token_id,
                         eos_token_id=self.tok.eos_token_id)
        return GPT2ForSequenceClassification(cfg)


def _align_config(config: AlignmentExperimentConfig, seed: int, **kw: Any):
    from optfm.alignment import AlignConfig

    base = dict(lr=config.lrs[0], batch_size=config.batch_size, beta=config.beta, sampler="fixed",
                max_new_tokens=8, add_eos=False, do_sample=True, seed=seed)
    base.update(kw)
    return AlignConfig(**base)


def start_model(config: AlignmentExperimentConfig, world: World, demos: list[dict[str, str]],
                path: Path):
    """The SFT start model of a cell (trained once per run, stored as safetensors)."""
    from optfm.alignment import SFTTrainer
    from optfm.training.checkpoint import load_checkpoint, save_checkpoint

    model = world.new_model()
    if path.is_file():
        load_checkpoint(path, model=model, restore_rng=False)
        return model
    SFTTrainer(model, world.tok, demos, _align_config(config, world.seed,
                                                      epochs=config.sft_epochs)).train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model=model, save_rng=False)
    return model


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _sample_ids(model, world: World, prompts: np.ndarray, *, greedy: bool, seed: int) -> np.ndarray:
    from optfm.alignment import generate

    text = generate(model, world.tok, world.task.prompt_text(prompts), sampler="fixed",
                    max_new_tokens=world.task.length, do_sample=not greedy,
                    allowed_token_ids=world.response_ids,
                    generator=torch.Generator().manual_seed(seed))
    return np.stack([world.task.parse_response(t) for t in text])


@torch.no_grad()
def _logprob(model, world: World, prompts: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """Exact log π(y|x) of the sampler's distribution: the softmax restricted to the response
    vocabulary (the fixed-length sampler renormalises over those tokens), summed over y."""
    from optfm.training.lm import IGNORE_INDEX, encode_pairs

    allowed = torch.tensor(world.response_ids)
    index = torch.full((len(world.tok),), -1, dtype=torch.long)
    index[allowed] = torch.arange(len(allowed))
    out = []
    pt, rt = world.task.prompt_text(prompts), world.task.response_text(responses)
    for b in range(0, len(pt), 256):
        batch = encode_pairs(world.tok, pt[b:b + 256], rt[b:b + 256], add_eos=False)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        logp = torch.log_softmax(logits[..., allowed], dim=-1)
        target = batch["labels"][:, 1:]
        mask = target != IGNORE_INDEX
        idx = index[target.clamp_min(0)].clamp_min(0)
        tok_lp = logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mask
        out.append(tok_lp.sum(1).double().numpy())
    return np.concatenate(out)


def evaluate(model, world: World, start, *, reward_model=None) -> dict[str, float]:
    """Ground-truth scores and the other metrics (see module docstring) of ``model``."""
    task, x = world.task, world.eval_prompts
    topics = task.topics(x)
    y = _sample_ids(model, world, x, greedy=False, seed=777)
    y_greedy = _sample_ids(model, world, x, greedy=True, seed=0)
    y_start = _sample_ids(start, world, x, greedy=False, seed=778)
    r, r_start = task.reward(x, y), task.reward(x, y_start)
    win = float(np.mean((r > r_start) + 0.5 * (r == r_start)))
    score = task.normalized_score(r, topics)
    out = {
        "score": float(score.mean()),
        "score_se": float(score.std(ddof=1) / math.sqrt(len(score))),
        "greedy_score": float(task.normalized_score(task.reward(x, y_greedy), topics).mean()),
        "win_rate_vs_start": win,
        "heldout_nll": float(-_logprob(model, world, world.heldout.prompts,
                                       world.heldout.responses).mean() / task.length),
        "kl_from_start": float(np.mean(_logprob(model, world, x, y) - _logprob(start, world, x, y))),
    }
    pairs = world.pairs
    if reward_model is not None:
        from optfm.alignment import sequence_reward

        reward_model.eval()
        pt = task.prompt_text(pairs.prompts)
        with torch.no_grad():
            rc = sequence_reward(reward_model, world.tok, pt, task.response_text(pairs.chosen),
                                 add_eos=False).numpy()
            rr = sequence_reward(reward_model, world.tok, pt, task.response_text(pairs.rejected),
                                 add_eos=False).numpy()
    else:
        rc = (_logprob(model, world, pairs.prompts, pairs.chosen)
              - _logprob(start, world, pairs.prompts, pairs.chosen))
        rr = (_logprob(model, world, pairs.prompts, pairs.rejected)
              - _logprob(start, world, pairs.prompts, pairs.rejected))
    strict = pairs.chosen_reward != pairs.rejected_reward
    out["pref_acc"] = float(np.mean((rc > rr)[strict])) if strict.any() else float("nan")
    return out


# --------------------------------------------------------------------------- training one arm
def train_method(method: str, config: AlignmentExperimentConfig, world: World, model, demos,
                 prefs, lr: float) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``method`` from ``model`` (the SFT start) for ``budget_steps``; (reward model, log)."""
    from optfm.alignment import (
        AIHFTrainer,
        DPOTrainer,
        IRFTTrainer,
        RFTTrainer,
        SFTTrainer,
    )

    seed = world.seed
    cfg = _align_config(config, seed, lr=lr, epochs=10_000, max_steps=config.budget_steps)
    tok, allowed = world.tok, world.response_ids
    rm = None
    if method == "sft":
        tr = SFTTrainer(model, tok, demos, cfg)
    elif method in ("spin", "irft"):
        tr = IRFTTrainer(model, tok, demos, cfg, allowed_token_ids=allowed,
                         stages=1 if method == "spin" else config.irft_stages)
    elif method == "rft":
        rm = world.new_reward_model()
        tr = RFTTrainer(model, tok, demos, rm, cfg, allowed_token_ids=allowed,
                        samples_per_prompt=config.rloo_samples, kl_coef=config.kl_coef)
    elif method == "sft_dpo":
        tr = DPOTrainer(model, tok, prefs, cfg)
    elif method == "sft_rm_rloo":
        rm = world.new_reward_model()
        tr = RFTTrainer(model, tok, demos, rm, cfg, allowed_token_ids=allowed, prefs=prefs,
                        w_demo=0.0, w_pref=1.0, samples_per_prompt=config.rloo_samples,
                        kl_coef=config.kl_coef, reward_warmup_steps=config.rm_warmup_steps)
    elif method in ("aihf_nll", "aihf_self_play"):
        form = method.split("_", 1)[1]
        tr = AIHFTrainer(model, tok, demos, prefs, cfg, form=form, allowed_token_ids=allowed,
                         stages=config.irft_stages if form == "self_play" else 1)
    else:  # pragma: no cover - validated in the config
        raise ValueError(method)
    return rm, tr.train()


# --------------------------------------------------------------------------- the experiment
def _lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def _zkey(z: float) -> str:
    return f"{z:g}"


@register
class AlignmentExperiment(Experiment):
    name = "alignment"
    description = ("IRFT/RFT vs SFT/SPIN with limited or noisy demonstrations, and AIHF vs "
                   "SFT→DPO / SFT→RM→RLOO with scarce preferences, on a task with an exact optimum.")
    config_cls = AlignmentExperimentConfig
    minutes = {"smoke": 0.4, "quick": 9.0, "full": 90.0}

    @classmethod
    def profiles(cls) -> dict[str, AlignmentExperimentConfig]:
        return {
            "smoke": AlignmentExperimentConfig(
                n_embd=32, sft_epochs=3, budget_steps=6, demo_counts=(64,), demo_noise=(0.0,),
                lrs=(1e-3,),
                pref_demos=64, pref_counts=(64,), eval_prompts=64, eval_pairs=64, n_seeds=1,
                batch_size=16, rloo_samples=2, rm_warmup_steps=4),
            "quick": AlignmentExperimentConfig(),
            "full": AlignmentExperimentConfig(
                demo_counts=(125, 250, 500, 2000), demo_noise=(0.0, 0.2, 0.4),
                pref_counts=(50, 100, 250, 500, 1000, 2000, 5000), budget_steps=120,
                n_seeds=5, eval_prompts=1024, eval_pairs=1024),
        }

    def arms(self, config: AlignmentExperimentConfig) -> list[Arm]:
        arms = []
        for i in range(config.n_seeds):
            s = config.seed + i
            for n in config.demo_counts:
                for z in config.demo_noise:
                    arms.append(Arm(f"demo-start-n{n}-z{_zkey(z)}-s{s}",
                                    {"part": "demo", "method": "start", "n": n, "noise": z,
                                     "seed": s, "lr": None}))
                    for m in config.demo_methods:
                        for lr in config.lrs:
                            arms.append(Arm(f"demo-{m}-lr{lr:g}-n{n}-z{_zkey(z)}-s{s}",
                                            {"part": "demo", "method": m, "n": n, "noise": z,
                                             "seed": s, "lr": lr}))
            arms.append(Arm(f"pref-start-n{config.pref_demos}-s{s}",
                            {"part": "pref", "method": "start", "prefs": 0, "seed": s,
                             "lr": None}))
            for k in config.pref_counts:
                for m in config.pref_methods:
                    for lr in config.lrs:
                        arms.append(Arm(f"pref-{m}-lr{lr:g}-p{k}-s{s}",
                                        {"part": "pref", "method": m, "prefs": k, "seed": s,
                                         "lr": lr}))
        return arms

    def run_arm(self, config: AlignmentExperimentConfig, arm: Arm, ctx: RunContext
                ) -> dict[str, Any]:
        p = arm.params
        world = World(config, p["seed"])
        if p["part"] == "demo":
            n, z = p["n"], p["noise"]
        else:
            n, z = config.pref_demos, 0.0
        demos = world.demos(n, z)
        path = ctx.path(f"models/sft-n{n}-z{_zkey(z)}-s{p['seed']}.safetensors")
        start = start_model(config, world, demos, path)
        start.eval()
        if p["method"] == "start":
            out = evaluate(start, world, start)
            out["pref_acc"] = None  # no learned reward: log π_start − log π_start = 0
            return out
        from optfm.alignment import frozen_copy

        model = world.new_model()
        model.load_state_dict(start.state_dict())
        prefs = world.prefs(p["prefs"]) if p["part"] == "pref" else None
        rm, log = train_method(p["method"], config, world, model, demos, prefs, p["lr"])
        model.eval()
        out = evaluate(model, world, frozen_copy(start), reward_model=rm)
        out["steps"] = len(log)
        out["final_loss"] = log[-1]["loss"] if log else float("nan")
        return out

    # ----------------------------------------------------------------------------------------
    def finalize(self, config: AlignmentExperimentConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        from optfm.data.reward_task import make_reward_task

        task = make_reward_task(seed=config.task_seed)
        expert_beta = task.expert_beta(config.expert_fraction)
        by_lr: dict[tuple, dict[float | None, list[dict[str, Any]]]] = defaultdict(
            lambda: defaultdict(list))
        for a in self.arms(config):
            p = a.params
            key = ((p["part"], p["method"], p["n"], p["noise"]) if p["part"] == "demo"
                   else (p["part"], p["method"], p["prefs"]))
            by_lr[key][p["lr"]].append(results[a.key])
        # each method at its best lr (by mean sampled score over seeds: optimistic, as stated)
        groups: dict[tuple, list[dict[str, Any]]] = {}
        best_lr: dict[tuple, float | None] = {}
        for key, runs in by_lr.items():
            lr = max(runs, key=lambda x: mean_se([r["score"] for r in runs[x]])[0])
            groups[key], best_lr[key] = runs[lr], lr
        metrics: dict[str, float] = {"expert_score": float(task.expected_score(expert_beta).mean())}
        cols = [("score", "score (sampled) ↑", 3), ("greedy_score", "score (greedy) ↑", 3),
                ("win_rate_vs_start", "win rate vs SFT start", 3),
                ("heldout_nll", "held-out expert NLL ↓", 3), ("kl_from_start", "KL from start", 2),
                ("pref_acc", "pref. accuracy of reward", 3)]

        def cell(rs, k, d):
            vals = [r[k] for r in rs if r.get(k) is not None and math.isfinite(r[k])]
            if not vals:
                return "—"
            m, se = mean_se(vals)
            return f"{m:.{d}f} ± {se:.{d}f}"

        head = "| " + " | ".join(c[1] for c in cols) + " |"
        rows_a = ["| demos | noise | method | best lr " + head,
                  "|---|---|---|---|" + "---|" * len(cols)]
        for n in config.demo_counts:
            for z in config.demo_noise:
                for m in ("start", *config.demo_methods):
                    rs = groups[("demo", m, n, z)]
                    lr = best_lr[("demo", m, n, z)]
                    rows_a.append(f"| {n} | {z:g} | {LABELS[m]} | {_lr(lr)} | "
                                  + " | ".join(cell(rs, k, d) for k, _, d in cols) + " |")
                    metrics[f"demo_{m}_n{n}_z{z:g}_score"] = mean_se([r["score"] for r in rs])[0]
        rows_b = ["| preferences | method | best lr " + head,
                  "|---|---|---|" + "---|" * len(cols)]
        rs = groups[("pref", "start", 0)]
        rows_b.append(f"| 0 | {LABELS['start']} | — | "
                      + " | ".join(cell(rs, k, d) for k, _, d in cols) + " |")
        metrics["pref_start_score"] = mean_se([r["score"] for r in rs])[0]
        for k in config.pref_counts:
            for m in config.pref_methods:
                rs = groups[("pref", m, k)]
                rows_b.append(f"| {k} | {LABELS[m]} | {_lr(best_lr[('pref', m, k)])} | "
                              + " | ".join(cell(rs, kk, d) for kk, _, d in cols) + " |")
                metrics[f"pref_{m}_p{k}_score"] = mean_se([r["score"] for r in rs])[0]

        claims = self._claims(config, groups, metrics)
        figs = [self._plot_demos(config, groups, ctx), self._plot_prefs(config, groups, ctx)]
        summary = [
            f"Task: 8 topics, responses of {task.length} tokens from {task.vocab}, repeat "
            f"penalty {task.repeat_penalty:g}; expert = exact KL-optimal policy at β = "
            f"{expert_beta:.3f} (expected normalised score {metrics['expert_score']:.3f}). "
            f"Policy: tiny GPT-2 (d = {config.n_embd}, {config.n_layer} layers); SFT start "
            f"{config.sft_epochs} epochs; every method then {config.budget_steps} AdamW steps "
            f"at each lr in {{{', '.join(f'{x:g}' for x in config.lrs)}}} (tables: the best lr "
            "per method and cell by mean sampled score, an optimistic selection), batch "
            f"{config.batch_size}, β = {config.beta:g}; IRFT "
            f"{config.irft_stages} stages; RLOO k = {config.rloo_samples}, KL {config.kl_coef:g}. "
            f"{config.n_seeds} seed(s) ({config.seed}..{config.seed + config.n_seeds - 1}); "
            f"mean ± standard error over seeds; scores on {config.eval_prompts} held-out prompts "
            "(uniform = 0, maximum reward = 1).",
            "",
            "### (a) Demonstrations only",
            "",
            *rows_a,
            "",
            f"### (b) {config.pref_demos} demonstrations + preference pairs",
            "",
            *rows_b,
            "",
            "### Claims",
            "",
            *claims,
            "",
            *(f"![{f}]({f})" for f in figs),
        ]
        return Outcome(metrics=metrics, summary="\n".join(summary))

    def _claims(self, config, groups, metrics) -> list[str]:
        out = []
        for n in config.demo_counts:
            for z in config.demo_noise:
                sft = [r["score"] for r in groups[("demo", "sft", n, z)]]
                for m in ("irft", "spin", "rft"):
                    if m not in config.demo_methods or "sft" not in config.demo_methods:
                        continue
                    other = [r["score"] for r in groups[("demo", m, n, z)]]
                    diff = mean_se([a - b for a, b in zip(other, sft)])
                    metrics[f"demo_{m}_minus_sft_n{n}_z{z:g}"] = diff[0]
                    verdict = ("one seed: no error bar" if len(sft) < 2 else
                               "> SFT by more than 2 SE" if diff[0] - 2 * diff[1] > 0 else
                               "< SFT by more than 2 SE" if diff[0] + 2 * diff[1] < 0 else
                               "≈ SFT (within 2 SE)")
                    out.append(f"- {n} demos, noise {z:g}: {LABELS[m]} − SFT = {diff[0]:+.3f} ± "
                               f"{diff[1]:.3f} ({verdict}).")
        for k in config.pref_counts:
            if "aihf_self_play" in config.pref_methods and "sft_dpo" in config.pref_methods:
                a = [r["score"] for r in groups[("pref", "aihf_self_play", k)]]
                b = [r["score"] for r in groups[("pref", "sft_dpo", k)]]
                diff = mean_se([x - y for x, y in zip(a, b)])
                metrics[f"pref_aihf_minus_dpo_p{k}"] = diff[0]
                out.append(f"- {k} preference pairs: AIHF (self-play) − SFT→DPO = {diff[0]:+.3f} "
                           f"± {diff[1]:.3f}.")
        return out

    def _plot_demos(self, config, groups, ctx) -> str:
        plt = pyplot()
        zs = list(config.demo_noise)
        fig, axes = plt.subplots(1, len(zs), figsize=(4.8 * len(zs), 3.8), squeeze=False)
        for ax, z in zip(axes[0], zs):
            for m in ("start", *config.demo_methods):
                st = [mean_se([r["score"] for r in groups[("demo", m, n, z)]])
                      for n in config.demo_counts]
                ax.errorbar(config.demo_counts, [s[0] for s in st], yerr=[s[1] for s in st],
                            marker="o", capsize=3, color=COLORS[m], label=LABELS[m],
                            ls="--" if m == "start" else "-")
            ax.set(xscale="log", xlabel="demonstrations", ylabel="normalised score (sampled)",
                   title=f"noise {z:g}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        return ctx.savefig(fig, "demonstrations.png")

    def _plot_prefs(self, config, groups, ctx) -> str:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 3.9))
        start = mean_se([r["score"] for r in groups[("pref", "start", 0)]])
        ax.axhline(start[0], color="k", ls="--", label=f"SFT start ({config.pref_demos} demos)")
        for m in config.pref_methods:
            st = [mean_se([r["score"] for r in groups[("pref", m, k)]])
                  for k in config.pref_counts]
            ax.errorbar(config.pref_counts, [s[0] for s in st], yerr=[s[1] for s in st],
                        marker="o", capsize=3, color=COLORS[m], label=LABELS[m])
        ax.set(xscale="log", xlabel="preference pairs", ylabel="normalised score (sampled)",
               title="Demonstrations + preferences")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return ctx.savefig(fig, "preferences.png")
