"""SFT and DPO baselines on the shared alignment harness (TRL-format data, any causal LM).

- :class:`SFTTrainer`: ``epochs`` passes over (prompt, completion) minimising the token-mean NLL
  of the completion.
- :class:`DPOTrainer`: ``epochs`` passes over (prompt, chosen, rejected) minimising the DPO loss
  against a frozen reference (default: a copy of the model at the start).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from optfm.alignment.common import (
    DEMO_COLUMNS,
    PREF_COLUMNS,
    AlignConfig,
    AlignTrainer,
    frozen_copy,
    rows,
    stops_at_budget,
)
from optfm.alignment.losses import dpo_loss, nll_loss

__all__ = ["DPOTrainer", "SFTTrainer"]


class SFTTrainer(AlignTrainer):
    """Supervised fine-tuning on demonstrations (``prompt``/``completion``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, demos: Any,
                 config: AlignConfig | None = None, **kw: Any) -> None:
        super().__init__(model, tokenizer, config, **kw)
        self.demos = rows(demos, DEMO_COLUMNS, "demos")

    @stops_at_budget
    def train(self) -> list[dict[str, Any]]:
        self.model.train()
        for _ in range(self.config.epochs):
            for idx in self.batches(len(self.demos)):
                b = [self.demos[i] for i in idx]
                lp, n = self.logprob(self.model, [r["prompt"] for r in b],
                                     [r["completion"] for r in b])
                self.update(nll_loss(lp, n))
        return self.history


class DPOTrainer(AlignTrainer):
    """DPO on preferences (``prompt``/``chosen``/``rejected``) against a frozen reference."""

    def __init__(self, model: nn.Module, tokenizer: Any, prefs: Any,
                 config: AlignConfig | None = None, *, ref_model: nn.Module | None = None,
                 **kw: Any) -> None:
        super().__init__(model, tokenizer, config, **kw)
        self.prefs = rows(prefs, PREF_COLUMNS, "prefs")
        self.ref_model = ref_model if ref_model is not None else frozen_copy(model)

    @stops_at_budget
    def train(self) -> list[dict[str, Any]]:
        self.model.train()
        for _ in range(self.config.epochs):
            for idx in self.batches(len(self.prefs)):
                b = [self.prefs[i] for i in idx]
                prompts = [r["prompt"] for r in b]
                pc, _ = self.logprob(self.model, prompts, [r["chosen"] for r in b])
                pr, _ = self.logprob(self.model, prompts, [r["rejected"] for r in b])
                rc, _ = self.logprob(self.ref_model, prompts, [r["chosen"] for r in b], grad=False)
                rr, _ = self.logprob(self.ref_model, prompts, [r["rejected"] for r in b],
                                     grad=False)
                loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=self.config.beta,
                                        loss_type=self.config.loss_type)
                self.update(loss, reward_acc=(cr > rj).float().mean(),
                            margin=(cr - rj).mean())
        return self.history
