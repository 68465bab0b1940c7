r"""Forget objectives of the unlearning baselines (minimised; sequence log-probs over answer tokens).

With ``logp_θ(y|x)`` the *sum* of the answer tokens' log-probabilities (prompt masked), ``|y|`` the
number of answer tokens, NLL_sum = −logp_θ(y|x), σ the logistic function:

- GA (gradient ascent):     L_F = −CE_F
- GradDiff:                 L = −CE_F + α·CE_R
- NPO (β = 0.1):            L_F = −(2/β) · mean log σ(−β (logp_θ(y|x) − logp_ref(y|x)))
- SimNPO (β = 4.5, δ = 0.125, the open-unlearning defaults; δ is the reward margin γ/β):
                            L_F = −(2/β) · mean log σ(β (NLL_sum/|y| − δ))

NPO and SimNPO are added to ``α·CE_R`` on the retain batch, like GradDiff. NPO uses
*sequence* log-probability ratios: MUSE's implementation compares logits, a known bug not copied.
As β → 0, NPO's gradient tends to GA's (on the summed log-prob); it is bounded because
σ(β·ratio) → 0 once the model has forgotten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ga_loss", "grad_diff_loss", "npo_loss", "simnpo_loss"]


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def ga_loss(ce_forget: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: ``−CE_F``."""
    return -ce_forget


def grad_diff_loss(ce_forget: torch.Tensor, ce_retain: torch.Tensor, *, alpha: float = 1.0
                   ) -> torch.Tensor:
    """GradDiff: ``−CE_F + α·CE_R``."""
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return -ce_forget + alpha * ce_retain


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """NPO: ``−(2/β)·mean log σ(−β(logp − logp_ref))`` on sequence-summed answer log-probs (B,)."""
    _positive("beta", beta)
    if logp.shape != logp_ref.shape or logp.dim() != 1:
        raise ValueError(f"logp and logp_ref must both have shape (B,), got {tuple(logp.shape)} "
                         f"and {tuple(logp_ref.shape)}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref.detach())).mean()


def simnpo_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor, *, beta: float = 4.5,
                delta: float = 0.125) -> torch.Tensor:
    """SimNPO: ``−(2/β)·mean log σ(β(NLL_sum/|y| − δ))`` (reference-free, length-normalised)."""
    _positive("beta", beta)
    if not math.isfinite(delta):
        raise ValueError(f"delta must be finite, got {delta}")
    if nll_sum.shape != n_tokens.shape or nll_sum.dim() != 1:
        raise ValueError(f"nll_sum and n_tokens must both have shape (B,), got "
                         f"{tuple(nll_sum.shape)} and {tuple(n_tokens.shape)}")
    if bool((n_tokens <= 0).any()):
        raise ValueError("n_tokens must be > 0 for every sequence (empty answer)")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum / n_tokens - delta)).mean()
