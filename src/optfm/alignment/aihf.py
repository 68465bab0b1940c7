r"""AIHF: joint demonstration and preference learning (arXiv 2406.06874).

    max_θ  w_D · E_demo[log π_θ(y|x)]  +  w_P · E_pref[log σ(r(x, y_w) − r(x, y_l))]

with π_θ the KL-regularised optimum of r. Three trainers of one objective:

- ``form="nll"``: L = w_P · DPO(prefs; ref = the starting model) + w_D · NLL(demos).
- ``form="self_play"``: L = w_P · DPO(prefs) + w_D · SPIN(demo ≻ own sample), stagewise like
  IRFT: each of ``stages`` stages freezes π_t, samples ỹ ~ π_t for the stage's demonstrations and
  uses π_t as the reference of both terms (the released code's form, w_D = w_P = 1).
- explicit reward (:class:`AIHFRewardTrainer`): a reward model trained on both the preference
  pairs (weight w_P) and (demo ≻ own sample) pairs (weight w_D), and an RLOO policy step with a
  KL penalty — :class:`optfm.alignment.RFTTrainer` with preferences.

w_D = 0 reduces every form to preference learning alone (DPO, or RLHF with an explicit reward);
w_P = 0 reduces ``self_play`` to IRFT and the explicit form to RFT. The loss itself is
:func:`optfm.alignment.losses.aihf_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
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
from optfm.alignment.irl_sft import RFTTrainer
from optfm.alignment.losses import aihf_loss, dpo_loss, nll_loss

__all__ = ["AIHF_FORMS", "AIHFRewardTrainer", "AIHFTrainer"]

AIHF_FORMS = ("nll", "self_play")


class AIHFTrainer(AlignTrainer):
    """AIHF in its DPO-style forms on demonstrations + preferences (TRL formats).

    One epoch walks the larger of the two sets in batches of ``batch_size`` and cycles the
    smaller one, so every step sees a demonstration batch and a preference batch.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, demos: Any, prefs: Any,
                 config: AlignConfig | None = None, *, form: str = "self_play",
                 w_demo: float = 1.0, w_pref: float = 1.0, stages: int = 1,
                 ref_model: nn.Module | None = None, **kw: Any) -> None:
        super().__init__(model, tokenizer, config, **kw)
        if form not in AIHF_FORMS:
            raise ValueError(f"form must be one of {', '.join(AIHF_FORMS)}, got {form!r}")
        self.demos = rows(demos, DEMO_COLUMNS, "demos") if w_demo > 0 else []
        self.prefs = rows(prefs, PREF_COLUMNS, "prefs") if w_pref > 0 else []
        for name, w in (("w_demo", w_demo), ("w_pref", w_pref)):
            if not (isinstance(w, (int, float)) and 0 <= w < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if w_demo == 0 and w_pref == 0:
            raise ValueError("w_demo and w_pref are both 0: nothing to optimise")
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if form == "nll" and stages != 1:
            raise ValueError("stages applies to form='self_play' only")
        self.form, self.w_demo, self.w_pref, self.stages = form, w_demo, w_pref, stages
        self.start_model = ref_model if ref_model is not None else frozen_copy(model)

    def _cycle(self, data: list, n: int, state: list[int]) -> list:
        out = []
        while len(out) < n:
            if not state:
                state.extend(torch.randperm(len(data), generator=self.generator).tolist())
            out.append(data[state.pop()])
        return out

    @stops_at_budget
    def train(self) -> list[dict[str, Any]]:
        c = self.config
        n_steps = -(-max(len(self.demos), len(self.prefs)) // c.batch_size)
        demo_state: list[int] = []
        pref_state: list[int] = []
        for _ in range(c.epochs):
            per_stage = -(-n_steps // self.stages)
            done = 0
            for t in range(self.stages):
                ref = self.start_model if self.form == "nll" else frozen_copy(self.model)
                self.model.train()
                for _ in range(min(per_stage, n_steps - done)):
                    done += 1
                    log: dict[str, Any] = {"stage": t}
                    pref = None
                    if self.prefs:
                        pb = self._cycle(self.prefs, c.batch_size, pref_state)
                        pp = [r["prompt"] for r in pb]
                        ch, rj = [r["chosen"] for r in pb], [r["rejected"] for r in pb]
                        pref = (self.logprob(self.model, pp, ch)[0],
                                self.logprob(self.model, pp, rj)[0],
                                self.logprob(ref, pp, ch, grad=False)[0],
                                self.logprob(ref, pp, rj, grad=False)[0])
                        _, cr, rr = dpo_loss(*pref, beta=c.beta, loss_type=c.loss_type)
                        log["pref_reward_acc"] = (cr > rr).float().mean()
                    demo_nll = self_play = None
                    if self.demos:
                        db = self._cycle(self.demos, c.batch_size, demo_state)
                        dp, dy = [r["prompt"] for r in db], [r["completion"] for r in db]
                        if self.form == "nll":
                            demo_nll = nll_loss(*self.logprob(self.model, dp, dy))
                            log["demo_nll"] = demo_nll.detach()
                        else:
                            own = self.sample(ref, dp)
                            self_play = (self.logprob(self.model, dp, dy)[0],
                                         self.logprob(self.model, dp, own)[0],
                                         self.logprob(ref, dp, dy, grad=False)[0],
                                         self.logprob(ref, dp, own, grad=False)[0])
                    loss = aihf_loss(form=self.form, w_demo=self.w_demo, w_pref=self.w_pref,
                                     beta=c.beta, pref=pref, demo_nll=demo_nll,
                                     self_play=self_play, loss_type=c.loss_type)
                    self.update(loss, **log)
        return self.history


class AIHFRewardTrainer(RFTTrainer):
    """AIHF with an explicit reward model: RFT whose reward step also fits the preferences."""

    def __init__(self, model: nn.Module, tokenizer: Any, demos: Any, prefs: Any,
                 reward_model: nn.Module, config: AlignConfig | None = None, *,
                 w_demo: float = 1.0, w_pref: float = 1.0, **kw: Any) -> None:
        super().__init__(model, tokenizer, demos, reward_model, config, prefs=prefs,
                         w_demo=w_demo, w_pref=w_pref, **kw)
