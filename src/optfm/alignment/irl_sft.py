r"""IRL-based SFT (arXiv 2405.17888): learn a reward from demonstrations while fine-tuning.

SFT's likelihood objective, with π_θ the KL-regularised optimum of a reward r_θ, has the gradient
(1/β)(E_demo ∇r − E_{π_θ} ∇r): raise the reward of demonstrations, lower it on the model's own
samples. Two algorithms:

**IRFT** (implicit reward, stagewise). For stage t = 0..T−1: π_t = a frozen copy of the policy at
the stage start (reference *and* sampler); for the stage's slice of prompts generate ỹ ~ π_t, then
one epoch of

    L = −log σ( β[log π_θ(y|x) − log π_t(y|x)] − β[log π_θ(ỹ|x) − log π_t(ỹ|x)] )

with y the demonstration and log-probs summed over response tokens (the SPIN loss; IRFT
regenerates every stage, over T slices, instead of every few epochs). ``loss_type`` ``hinge`` and
``linear`` change the outer function; ``regenerate="batch"`` draws ỹ from the *current* policy for
every batch (the online variant; the reference stays π_t).

**RFT** (explicit reward). Alternate, per batch of prompts:
(1) a reward step on (demonstration ≻ own sample) pairs with the logistic loss
−log σ(r(x, y) − r(x, ỹ)); (2) a KL-regularised policy step (RLOO): draw k samples per prompt,
shaped reward s = r(x, ỹ) − kl_coef·(log π_θ(ỹ|x) − log π_ref(ỹ|x)) (π_ref = the starting
policy), advantage A_j = s_j − mean_{l≠j} s_l, loss −mean A_j log π_θ(ỹ_j|x). Passing
preference pairs with ``w_pref > 0`` adds their Bradley–Terry loss to the reward step: that is
AIHF's explicit-reward variant (:class:`optfm.alignment.AIHFRewardTrainer`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from optfm.alignment.common import (
    DEMO_COLUMNS,
    PREF_COLUMNS,
    AlignConfig,
    AlignTrainer,
    disable_dropout,
    frozen_copy,
    rows,
    stops_at_budget,
)
from optfm.alignment.losses import bt_reward_loss, spin_loss
from optfm.training.lm import encode_pairs

__all__ = ["IRFTTrainer", "RFTTrainer", "sequence_reward"]


class IRFTTrainer(AlignTrainer):
    """Stagewise IRFT on demonstrations (``prompt``/``completion``); see module docstring.

    Args:
        stages: T, the number of prompt slices (and frozen stage models) per epoch.
        regenerate: ``"stage"`` (ỹ from π_t once per stage) or ``"batch"`` (ỹ from the current
            policy for every batch).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, demos: Any,
                 config: AlignConfig | None = None, *, stages: int = 5,
                 regenerate: str = "stage", **kw: Any) -> None:
        super().__init__(model, tokenizer, config, **kw)
        self.demos = rows(demos, DEMO_COLUMNS, "demos")
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if stages > len(self.demos):
            raise ValueError(f"stages ({stages}) exceeds the number of demonstrations "
                             f"({len(self.demos)})")
        if regenerate not in ("stage", "batch"):
            raise ValueError(f"regenerate must be 'stage' or 'batch', got {regenerate!r}")
        self.stages = stages
        self.regenerate = regenerate

    def _slices(self) -> list[list[int]]:
        perm = torch.randperm(len(self.demos), generator=self.generator).tolist()
        k, r = divmod(len(perm), self.stages)
        out, start = [], 0
        for t in range(self.stages):
            end = start + k + (1 if t < r else 0)
            out.append(perm[start:end])
            start = end
        return out

    @stops_at_budget
    def train(self) -> list[dict[str, Any]]:
        c = self.config
        for _ in range(c.epochs):
            for t, sl in enumerate(self._slices()):
                stage_model = frozen_copy(self.model)  # π_t: reference and sampler
                prompts = [self.demos[i]["prompt"] for i in sl]
                real = [self.demos[i]["completion"] for i in sl]
                gen = self.sample(stage_model, prompts) if self.regenerate == "stage" else None
                self.model.train()
                for b in self._slice_batches(len(sl)):
                    p = [prompts[i] for i in b]
                    y = [real[i] for i in b]
                    g = ([gen[i] for i in b] if gen is not None
                         else self.sample(self.model, p))
                    ref_y, _ = self.logprob(stage_model, p, y, grad=False)
                    ref_g, _ = self.logprob(stage_model, p, g, grad=False)
                    lp_y, _ = self.logprob(self.model, p, y)
                    lp_g, _ = self.logprob(self.model, p, g)
                    loss, r_y, r_g = spin_loss(lp_y, lp_g, ref_y, ref_g, beta=c.beta,
                                               loss_type=c.loss_type)
                    self.update(loss, stage=t, reward_acc=(r_y > r_g).float().mean(),
                                margin=(r_y - r_g).mean())
                del stage_model
        return self.history

    def _slice_batches(self, n: int):
        perm = torch.randperm(n, generator=self.generator).tolist()
        for b in range(0, n, self.config.batch_size):
            yield perm[b: b + self.config.batch_size]


def sequence_reward(reward_model: nn.Module, tokenizer: Any, prompts: list[str],
                    responses: list[str], *, add_eos: bool = True,
                    max_length: int | None = None) -> torch.Tensor:
    """Scalar reward per (prompt, response): ``reward_model(input_ids, attention_mask)`` returning
    either a tensor (B,)/(B, 1) or an output with ``logits`` of shape (B, 1) (a Hugging Face
    ``*ForSequenceClassification`` with ``num_labels=1``; it scores the last non-pad token, so
    the tokenizer's pad id must differ from its eos id)."""
    device = next(reward_model.parameters()).device
    cfg = getattr(reward_model, "config", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model_pad = getattr(cfg, "pad_token_id", None)
    if cfg is not None and hasattr(cfg, "pad_token_id") and model_pad != pad:
        raise ValueError(f"reward_model.config.pad_token_id is {model_pad} but batches are padded "
                         f"with {pad}; the model would score a padding position. Set "
                         f"reward_model.config.pad_token_id = {pad}")
    if cfg is not None and add_eos and model_pad is not None \
            and model_pad == tokenizer.eos_token_id:
        raise ValueError("the tokenizer pads with its EOS token, so a sequence classifier would "
                         "read the reward before the appended EOS; give the tokenizer a distinct "
                         "pad token (tokenizer.add_special_tokens({'pad_token': '[PAD]'})) or "
                         "use add_eos=False")
    batch = encode_pairs(tokenizer, prompts, responses, add_eos=add_eos, max_length=max_length,
                         device=device)
    out = reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    r = out.logits if hasattr(out, "logits") else out
    if r.dim() == 2 and r.size(-1) == 1:
        r = r[:, 0]
    if r.dim() != 1:
        raise ValueError(f"reward_model must return one scalar per sequence, got shape "
                         f"{tuple(r.shape)}")
    return r.float()


class RFTTrainer(AlignTrainer):
    """RFT: alternate a reward-model step and an RLOO policy step (see module docstring).

    Args:
        reward_model: a module scoring (prompt, response) sequences (see :func:`sequence_reward`).
        samples_per_prompt: k ≥ 2 RLOO samples per prompt.
        kl_coef: KL coefficient against the starting policy (default 0.05).
        reward_lr: the reward model's AdamW lr (default: ``config.lr``).
        prefs, w_demo, w_pref: optional preference pairs whose Bradley–Terry loss (weight w_pref)
            joins the demonstration term (weight w_demo) in the reward step.
        ref_model: the KL reference (default: a frozen copy of the policy at the start).
        reward_warmup_steps: reward-model steps before the first policy step (SFT → RM → RL);
            the policy's step budget does not count them.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, demos: Any, reward_model: nn.Module,
                 config: AlignConfig | None = None, *, samples_per_prompt: int = 4,
                 kl_coef: float = 0.05, reward_lr: float | None = None, prefs: Any = None,
                 w_demo: float = 1.0, w_pref: float = 0.0, ref_model: nn.Module | None = None,
                 reward_warmup_steps: int = 0, **kw: Any) -> None:
        super().__init__(model, tokenizer, config, **kw)
        self.demos = rows(demos, DEMO_COLUMNS, "demos") if w_demo > 0 or prefs is None else []
        if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) \
                or samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be an integer >= 2 (RLOO needs a "
                             f"leave-one-out baseline), got {samples_per_prompt!r}")
        if not (kl_coef >= 0 and math.isfinite(kl_coef)):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        for name, w in (("w_demo", w_demo), ("w_pref", w_pref)):
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"{name} must be a finite number >= 0, got {w}")
        if w_demo == 0 and w_pref == 0:
            raise ValueError("w_demo and w_pref are both 0: the reward model learns nothing")
        if w_pref > 0 and prefs is None:
            raise ValueError("w_pref > 0 needs prefs (prompt/chosen/rejected)")
        self.prefs = rows(prefs, PREF_COLUMNS, "prefs") if prefs is not None else []
        if not self.demos and not self.prefs:
            raise ValueError("RFT needs demonstrations or preferences")
        self.reward_model = reward_model
        if self.config.disable_dropout:
            disable_dropout(reward_model)
        self.reward_opt = torch.optim.AdamW(
            [p for p in reward_model.parameters() if p.requires_grad],
            lr=reward_lr if reward_lr is not None else self.config.lr)
        self.k = samples_per_prompt
        self.kl_coef = float(kl_coef)
        self.w_demo, self.w_pref = float(w_demo), float(w_pref)
        self.ref_model = ref_model if ref_model is not None else frozen_copy(model)
        if isinstance(reward_warmup_steps, bool) or not isinstance(reward_warmup_steps, int) \
                or reward_warmup_steps < 0:
            raise ValueError(f"reward_warmup_steps must be an integer >= 0, got "
                             f"{reward_warmup_steps!r}")
        self.reward_warmup_steps = reward_warmup_steps
        self.reward_warmup_log: list[dict[str, float]] = []

    def reward(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return sequence_reward(self.reward_model, self.tokenizer, prompts, responses,
                               add_eos=self.config.add_eos, max_length=self.config.max_length)

    def _reward_step(self, prompts: list[str], demos: list[str], own: list[str],
                     pref_batch: list[dict[str, str]]) -> dict[str, float]:
        self.reward_model.train()
        loss = torch.zeros(())
        log: dict[str, float] = {}
        if self.w_demo > 0 and demos:
            r_d = self.reward(prompts, demos)
            r_o = self.reward(prompts, own)
            loss = loss + self.w_demo * bt_reward_loss(r_d, r_o)
            log["rm_demo_acc"] = float((r_d > r_o).float().mean())
        if self.w_pref > 0 and pref_batch:
            pp = [r["prompt"] for r in pref_batch]
            r_c = self.reward(pp, [r["chosen"] for r in pref_batch])
            r_r = self.reward(pp, [r["rejected"] for r in pref_batch])
            loss = loss + self.w_pref * bt_reward_loss(r_c, r_r)
            log["rm_pref_acc"] = float((r_c > r_r).float().mean())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite reward-model loss ({value}) at step {self.step}")
        self.reward_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.reward_opt.step()
        log["rm_loss"] = value
        return log

    def _policy_step(self, prompts: list[str], samples: list[str], log: dict[str, float]) -> None:
        k = self.k
        with torch.no_grad():
            self.reward_model.eval()
            r = self.reward(prompts, samples)
        lp, _ = self.logprob(self.model, prompts, samples)
        ref, _ = self.logprob(self.ref_model, prompts, samples, grad=False)
        kl = lp.detach() - ref
        shaped = (r - self.kl_coef * kl).view(-1, k)
        baseline = (shaped.sum(1, keepdim=True) - shaped) / (k - 1)
        adv = (shaped - baseline).reshape(-1)
        loss = -(adv * lp).mean()
        self.update(loss, reward=r.mean(), kl=kl.mean(), **log)

    def _batches_of_work(self):
        """(prompts, demo completions, preference batch) per step, epoch after epoch."""
        source = self.demos if self.demos else self.prefs
        n_pref = len(self.prefs)
        pref_perm: list[int] = []
        while True:
            for idx in self.batches(len(source)):
                prompts = [source[i]["prompt"] for i in idx]
                demos = [self.demos[i]["completion"] for i in idx] if self.demos else []
                pref_batch = []
                if n_pref and self.w_pref > 0:
                    while len(pref_batch) < len(idx):
                        if not pref_perm:
                            pref_perm = torch.randperm(n_pref, generator=self.generator).tolist()
                        pref_batch.append(self.prefs[pref_perm.pop()])
                yield prompts, demos, pref_batch

    @stops_at_budget
    def train(self) -> list[dict[str, Any]]:
        c = self.config
        work = self._batches_of_work()
        for _ in range(self.reward_warmup_steps):  # SFT -> RM -> RL: fit the reward model first
            prompts, demos, pref_batch = next(work)
            own = self.sample(self.model, prompts) if demos else []
            self.reward_warmup_log.append(self._reward_step(prompts, demos, own, pref_batch))
        n_source = len(self.demos if self.demos else self.prefs)
        steps_per_epoch = -(-n_source // c.batch_size)
        for _ in range(c.epochs * steps_per_epoch):
            prompts, demos, pref_batch = next(work)
            rep = [p for p in prompts for _ in range(self.k)]
            samples = self.sample(self.model, rep)
            own = samples[:: self.k]  # one own sample per prompt for the reward step
            log = self._reward_step(prompts, demos, own, pref_batch)
            self.model.train()
            self._policy_step(rep, samples, log)
        return self.history
