"""``concept-erasure``: AdvUnlearn vs ESD on a tiny text-to-image model of digits
(specs/concept_erasure.md).

A CLIP text encoder + conditional UNet trained locally on sklearn digits with prompts "a
handwritten seven" (cached) is the original model. One digit is the concept to erase. Methods:
ESD-x (the ESD loss on the UNet's cross-attention), and AdvUnlearn (the ESD loss on the text
encoder with a soft-prompt attack in the loop and a utility regulariser on the other digits' prompts,
γ ∈ {0, 0.3, 1}). Each model is evaluated

- for erasure: attack success rate (ASR) of the concept prompt judged by a digit classifier
  trained on real digits, with no attack, a soft-prompt (continuous) attack and an
  UnlearnDiffAtk-style discrete attack (5 prefix tokens); a sample counts as a success if the
  judge reads the concept without attack, or else after the attack;
- for utility: Fréchet distance between the judge's penultimate features of generations for the
  other nine digits and of real digits (FID stand-in), and the judge's probability of the
  prompted digit (CLIP-score stand-in).

Plug-and-play: a second UNet trained on the original (frozen) text encoder receives AdvUnlearn's
robust encoder; its ASR is compared with the original encoder's.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se

__all__ = ["ConceptErasureConfig", "ConceptErasureExperiment"]

METHODS = ("original", "esd", "advunlearn")


@dataclass
class ConceptErasureConfig(ExperimentConfig):
    t2i_steps: int = 800  # training steps of the text-to-image model (cached)
    concept_digit: int = 7
    iterations: int = 100
    warmup: int = 33
    lr: float = 1e-3  # the tiny model needs a larger lr than SD's 1e-5 (1e-4: nothing erased)
    gammas: tuple[float, ...] = (0.0, 0.3, 1.0)
    attack_steps: int = 10
    ddim_steps: int = 20  # partial sampling and evaluation
    guidance_scale: float = 3.0
    n_eval: int = 32  # concept samples per evaluation
    n_retain_eval: int = 16  # samples per retained digit
    discrete_steps: int = 20
    plug_and_play: bool = True
    n_seeds: int = 2

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.concept_digit <= 9:
            raise ConfigError(f"concept_digit must be 0..9, got {self.concept_digit}")
        for key in ("t2i_steps", "iterations", "attack_steps", "ddim_steps", "n_eval",
                    "n_retain_eval", "discrete_steps", "n_seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.warmup <= self.iterations:
            raise ConfigError(f"warmup must be in [0, iterations], got {self.warmup}")
        if self.lr <= 0 or any(g < 0 for g in self.gammas):
            raise ConfigError("lr must be > 0 and gammas >= 0")


# --------------------------------------------------------------------------- evaluation
class _Judge:
    """The digit classifier trained on real digits, its penultimate features, real features."""

    def __init__(self) -> None:
        from optfm.alignment.dno_rewards import load_digits_pm1, load_or_train_digit_classifier

        self.clf = load_or_train_digit_classifier()
        data = load_digits_pm1()
        with torch.no_grad():
            self.real_feats = self.features(data.x_test).numpy()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.clf.net
        return net[:-1](x.reshape(len(x), -1).float())

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.clf(x.float()), dim=-1)


@torch.no_grad()
def _generate(t2i, text_encoder, unet, emb: torch.Tensor, n: int, config, seed: int):
    from optfm.diffusion import DDIMSampler

    sampler = DDIMSampler(unet, t2i.scheduler_config, num_inference_steps=config.ddim_steps,
                          eta=0.0, guidance_scale=config.guidance_scale,
                          gradient_checkpointing=False)
    uncond = text_encoder(input_ids=t2i.tokenize([""])).last_hidden_state
    noise = sampler.randn_noise(n, generator=torch.Generator().manual_seed(seed))
    cond = emb.expand(n, *emb.shape[1:]) if emb.shape[0] == 1 else emb
    return sampler.sample(noise, encoder_hidden_states=cond,
                          negative_encoder_hidden_states=uncond).clamp(-1, 1)


def evaluate(t2i, text_encoder, unet, judge: _Judge, config, seed: int,
             *, attacks: bool = True) -> dict[str, Any]:
    """ASR (none / soft / discrete) on the concept prompt and utility on the other digits."""
    from optfm.diffusion.text2image import digit_prompt
    from optfm.unlearning.advunlearn import (
        DiscreteAttack,
        SoftPromptAttack,
        attack_success_rate,
        encode_with_soft_prompt,
        frechet_distance,
        partial_sample,
    )

    c = config.concept_digit
    ids = t2i.tokenize([digit_prompt(c)])
    with torch.no_grad():
        emb = text_encoder(input_ids=ids).last_hidden_state
    x = _generate(t2i, text_encoder, unet, emb, config.n_eval, config, seed)
    pre = (judge.probs(x).argmax(-1) == c).numpy()
    out: dict[str, Any] = {"asr_none": float(pre.mean()),
                           "concept_prob": float(judge.probs(x)[:, c].mean())}
    if attacks:
        # the attacker matches the *original* model's concept prediction (it knows the concept)
        orig_enc = t2i.text_encoder
        with torch.no_grad():
            e_orig = orig_enc(input_ids=ids).last_hidden_state
            e_empty = orig_enc(input_ids=t2i.tokenize([""])).last_hidden_state
        g = torch.Generator().manual_seed(seed + 7)
        x_t, t = partial_sample(t2i.unet, t2i.scheduler_config, e_orig.expand(8, -1, -1),
                                e_empty, steps=config.ddim_steps,
                                stop_index=config.ddim_steps // 2,
                                guidance_scale=config.guidance_scale, generator=g)
        with torch.no_grad():
            target = t2i.unet(x_t, t, encoder_hidden_states=e_orig.expand(8, -1, -1)).sample
        ids8 = ids.expand(8, -1)
        soft = SoftPromptAttack(steps=config.attack_steps * 3, lr=1e-2, seed=seed)(
            text_encoder, unet, ids8, x_t, t, target).soft
        with torch.no_grad():
            emb_soft = encode_with_soft_prompt(text_encoder, ids, soft)
        xs = _generate(t2i, text_encoder, unet, emb_soft, config.n_eval, config, seed)
        post_soft = (judge.probs(xs).argmax(-1) == c).numpy()
        out["asr_soft"] = attack_success_rate(pre, post_soft)

        def success(prompt_ids: torch.Tensor) -> bool:
            with torch.no_grad():
                e = text_encoder(input_ids=prompt_ids.view(1, -1)).last_hidden_state
            xx = _generate(t2i, text_encoder, unet, e, 8, config, seed + 11)
            return bool((judge.probs(xx).argmax(-1) == c).float().mean() >= 0.5)

        res = DiscreteAttack(steps=config.discrete_steps, check_every=5, seed=seed,
                             forbidden_ids=tuple(t2i.tokenizer.all_special_ids))(
            text_encoder, unet, ids8, x_t, t, target, success_fn=success)
        with torch.no_grad():
            e_disc = text_encoder(input_ids=res.prompt_ids.view(1, -1)).last_hidden_state
        xd = _generate(t2i, text_encoder, unet, e_disc, config.n_eval, config, seed)
        post_disc = (judge.probs(xd).argmax(-1) == c).numpy()
        out["asr_discrete"] = attack_success_rate(pre, post_disc)
    # utility on the nine retained digits
    feats, align = [], []
    for d in range(10):
        if d == c:
            continue
        with torch.no_grad():
            e = text_encoder(input_ids=t2i.tokenize([digit_prompt(d)])).last_hidden_state
        xr = _generate(t2i, text_encoder, unet, e, config.n_retain_eval, config, seed + 100 + d)
        feats.append(judge.features(xr).numpy())
        align.append(float(judge.probs(xr)[:, d].mean()))
        if "samples_retained" not in out:  # the first retained digit, for the sample grid
            out["samples_retained"] = xr[:8].reshape(len(xr[:8]), -1).tolist()
            out["retained_digit"] = d
    real = judge.real_feats
    out["fd_retain"] = frechet_distance(np.concatenate(feats), real)
    out["prompt_alignment"] = float(np.mean(align))
    out["samples_concept"] = x[:8].reshape(8, -1).tolist()
    return out


# --------------------------------------------------------------------------- the experiment
@register
class ConceptErasureExperiment(Experiment):
    name = "concept-erasure"
    description = ("AdvUnlearn vs ESD on a tiny text-to-image digits model: attack success rate "
                   "under soft-prompt and discrete attacks vs utility; plug-and-play encoder.")
    config_cls = ConceptErasureConfig
    minutes = {"smoke": 1.0, "quick": 15.0, "full": 60.0}

    @classmethod
    def profiles(cls) -> dict[str, ConceptErasureConfig]:
        return {
            "smoke": ConceptErasureConfig(t2i_steps=40, iterations=3, warmup=1, attack_steps=2,
                                          ddim_steps=4, n_eval=8, n_retain_eval=4,
                                          discrete_steps=2, gammas=(1.0,), n_seeds=1),
            "quick": ConceptErasureConfig(),
            "full": ConceptErasureConfig(iterations=300, warmup=100, attack_steps=30,
                                         n_eval=64, n_seeds=5),
        }

    def arms(self, config: ConceptErasureConfig) -> list[Arm]:
        out = []
        for i in range(config.n_seeds):
            s = config.seed + i
            out.append(Arm(f"original-s{s}", {"method": "original", "gamma": None, "seed": s}))
            out.append(Arm(f"esd-s{s}", {"method": "esd", "gamma": None, "seed": s}))
            for g in config.gammas:
                out.append(Arm(f"advunlearn-g{g:g}-s{s}",
                               {"method": "advunlearn", "gamma": g, "seed": s}))
        return out

    def run_arm(self, config: ConceptErasureConfig, arm: Arm, ctx: RunContext) -> dict[str, Any]:
        from optfm.diffusion.text2image import (
            digit_prompt,
            load_or_train_second_unet,
            load_or_train_text2image,
        )
        from optfm.unlearning.advunlearn import ESD, AdvUnlearn, AdvUnlearnConfig, ESDConfig

        p = arm.params
        torch.manual_seed(p["seed"])
        t2i = load_or_train_text2image(steps=config.t2i_steps)
        judge = _Judge()
        concept = digit_prompt(config.concept_digit)
        retain = [digit_prompt(d) for d in range(10) if d != config.concept_digit]
        enc, unet = copy.deepcopy(t2i.text_encoder), copy.deepcopy(t2i.unet)
        history: list[dict[str, Any]] = []
        if p["method"] == "esd":
            cfg = ESDConfig(concept, train="unet_xattn", lr=config.lr, ddim_steps=config.ddim_steps,
                            guidance_scale=config.guidance_scale, seed=p["seed"])
            history = ESD(enc, t2i.tokenizer, unet, t2i.scheduler_config, cfg).train(
                config.iterations)
        elif p["method"] == "advunlearn":
            cfg = AdvUnlearnConfig(concept, retain, gamma=p["gamma"], lr=config.lr,
                                   warmup=config.warmup, ddim_steps=config.ddim_steps,
                                   guidance_scale=config.guidance_scale,
                                   attack_steps=config.attack_steps, attack_lr=1e-2,
                                   seed=p["seed"])
            history = AdvUnlearn(enc, t2i.tokenizer, unet, t2i.scheduler_config, cfg).train(
                config.iterations)
        enc.eval()
        unet.eval()
        out = evaluate(t2i, enc, unet, judge, config, p["seed"])
        out["history"] = [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                          for h in history]
        if config.plug_and_play and p["method"] in ("original", "advunlearn"):
            second = load_or_train_second_unet(t2i, steps=config.t2i_steps)
            pp = evaluate(t2i, enc, second.unet, judge, config, p["seed"])
            out["plug"] = {k: v for k, v in pp.items() if k != "samples_concept"}
        return out

    def finalize(self, config: ConceptErasureConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        order: list[str] = []
        for a in self.arms(config):
            p = a.params
            label = (p["method"] if p["gamma"] is None
                     else f"advunlearn γ={p['gamma']:g}")
            if label not in groups:
                order.append(label)
            groups[label].append(results[a.key])
        cols = [("asr_none", "ASR no attack ↓"), ("asr_soft", "ASR soft prompt ↓"),
                ("asr_discrete", "ASR discrete ↓"), ("fd_retain", "FD retain ↓"),
                ("prompt_alignment", "alignment ↑")]
        rows = ["| model | " + " | ".join(c[1] for c in cols) + " |",
                "|---|" + "---|" * len(cols)]
        metrics: dict[str, float] = {}
        for label in order:
            rs = groups[label]
            cells = []
            for k, _ in cols:
                m, se = mean_se([r[k] for r in rs])
                cells.append(f"{m:.3f} ± {se:.3f}")
                metrics[f"{label.replace(' ', '_').replace('=', '')}_{k}"] = m
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        plug = [(label, groups[label]) for label in order if "plug" in groups[label][0]]
        plug_rows = []
        if plug:
            plug_rows = ["| text encoder on the second UNet | ASR no attack | ASR soft prompt | "
                         "alignment |", "|---|---|---|---|"]
            for label, rs in plug:
                vals = [mean_se([r["plug"][k] for r in rs]) for k in
                        ("asr_none", "asr_soft", "prompt_alignment")]
                plug_rows.append(f"| {label} | " + " | ".join(f"{m:.3f} ± {s:.3f}"
                                                             for m, s in vals) + " |")
        figs = [self._plot(config, groups, order, ctx), self._grid(config, groups, order, ctx)]
        summary = [
            f"Concept: digit {config.concept_digit}; t2i model {config.t2i_steps} training steps "
            f"(cached); {config.iterations} unlearning iterations (AdvUnlearn warm-up "
            f"{config.warmup}, attack {config.attack_steps} Adam steps), lr {config.lr:g}, DDIM "
            f"{config.ddim_steps} steps, guidance {config.guidance_scale:g}; {config.n_eval} "
            f"concept samples, {config.n_retain_eval} per retained digit. {config.n_seeds} "
            "seed(s); mean ± s.e.",
            "", *rows, "", *plug_rows, "", *(f"![{f}]({f})" for f in figs)]
        return Outcome(metrics=metrics, summary="\n".join(summary))

    def _grid(self, config, groups, order, ctx) -> str:
        plt = pyplot()
        r0 = groups[order[0]][0]
        n = len(r0["samples_concept"])
        fig, axes = plt.subplots(len(order), 2 * n + 1, figsize=((2 * n + 1) * 0.7,
                                                                  len(order) * 0.8),
                                 squeeze=False)
        for i, label in enumerate(order):
            r = groups[label][0]
            imgs = [*r["samples_concept"], None, *r["samples_retained"]]
            for j, img in enumerate(imgs):
                ax = axes[i][j]
                ax.set_xticks([])
                ax.set_yticks([])
                if img is None:
                    ax.axis("off")
                    continue
                ax.imshow(np.asarray(img).reshape(8, 8), cmap="gray", vmin=-1, vmax=1)
            axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle(f"Left: prompt for the erased digit {config.concept_digit}; right: "
                     f"retained digit {r0['retained_digit']} (seed {config.seed}, no attack)",
                     fontsize=8)
        return ctx.savefig(fig, "samples.png")

    def _plot(self, config, groups, order, ctx) -> str:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for i, label in enumerate(order):
            rs = groups[label]
            fd = mean_se([r["fd_retain"] for r in rs])
            for key, marker in (("asr_none", "o"), ("asr_soft", "s"), ("asr_discrete", "^")):
                asr = mean_se([r[key] for r in rs])
                ax.errorbar(fd[0], asr[0], xerr=fd[1], yerr=asr[1], fmt=marker,
                            color=plt.get_cmap("tab10")(i),
                            label=f"{label} ({key.split('_')[1]})")
        ax.set(xlabel="Fréchet distance on retained digits (↓ utility kept)",
               ylabel="attack success rate (↓ erased)", title="Erasure vs utility")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        return ctx.savefig(fig, "asr_vs_utility.png")
