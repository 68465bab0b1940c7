r"""Alignment losses as pure functions of sequence log-probabilities (response tokens only).

Inputs are per-example *sums* of response-token log-probabilities, shape (B,), e.g. from
:func:`optfm.training.lm.sequence_logprob` (prompt masked). ``ref_*`` are the same under a frozen
reference model (they never receive gradient). σ is the logistic function.

- SFT / NLL:         L = −Σ_b log π_θ(y_b|x_b) / Σ_b |y_b|      (token mean; or per sequence)
- DPO (sigmoid):     L = −mean log σ(β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])
  hinge:             L = mean max(0, 1 − β·[...])
- Bradley–Terry:     L = −mean log σ(r(x, y_w) − r(x, y_l))      (explicit reward model)
- SPIN / IRFT:       DPO with y_w = the demonstration y and y_l = the model's own sample ỹ,
  the reference being the frozen stage-start model π_t:
                     L = −mean log σ(β[log π_θ(y) − log π_t(y)] − β[log π_θ(ỹ) − log π_t(ỹ)])
  variants: ``hinge`` max(0, 1 − β·m), ``linear`` −β·m (m = the margin in brackets).
- AIHF (joint demonstrations + preferences, weights w_D and w_P):
  ``nll`` form:       L = w_P · DPO(preferences) + w_D · NLL(demonstrations)
  ``self_play`` form: L = w_P · DPO(preferences) + w_D · SPIN(demonstrations vs own samples)
  so w_D = 0 gives DPO and, in the self-play form, w_P = 0 gives IRFT; the released code uses
  w_D = w_P = 1. (The spec's λ = w_D / w_P is the same objective up to the overall scale w_P.)

Every DPO-style function also returns the implicit rewards β(log π_θ − log π_ref) of both sides,
detached, for logging (reward accuracy = fraction with chosen > rejected).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "aihf_loss",
    "bt_reward_loss",
    "dpo_loss",
    "nll_loss",
    "spin_loss",
]

LOSS_TYPES = ("sigmoid", "hinge", "linear")


def _beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return float(beta)


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"log-prob inputs must all have the same shape (B,), got {shapes}")
    if first[0] == 0:
        raise ValueError("log-prob inputs are empty (batch of 0)")


def nll_loss(logp_sum: torch.Tensor, n_tokens: torch.Tensor, *,
             reduction: str = "token_mean") -> torch.Tensor:
    """SFT negative log-likelihood: ``token_mean`` (Σ −log π / Σ |y|, the Hugging Face convention)
    or ``sequence_mean`` (mean over sequences of the summed NLL)."""
    _same_shape(logp_sum=logp_sum, n_tokens=n_tokens)
    if bool((n_tokens <= 0).any()):
        raise ValueError("n_tokens must be > 0 for every sequence (empty response)")
    if reduction == "token_mean":
        return -logp_sum.sum() / n_tokens.sum()
    if reduction == "sequence_mean":
        return -logp_sum.mean()
    raise ValueError(f"reduction must be 'token_mean' or 'sequence_mean', got {reduction!r}")


def _margin_loss(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin).mean()
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * margin).mean()
    if loss_type == "linear":
        return -(beta * margin).mean()
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO: ``(loss, chosen_rewards, rejected_rewards)`` with rewards β(log π_θ − log π_ref).

    ``loss_type`` is ``sigmoid`` (DPO), ``hinge`` (SLiC-style) or ``linear``.
    """
    beta = _beta(beta)
    _same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    loss = _margin_loss(chosen - rejected, beta, loss_type)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def spin_loss(policy_real: torch.Tensor, policy_generated: torch.Tensor,
              ref_real: torch.Tensor, ref_generated: torch.Tensor, *, beta: float = 0.1,
              loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPIN / IRFT: DPO with the demonstration as chosen and the model's own sample as rejected,
    against the frozen stage-start model. Returns ``(loss, real_rewards, generated_rewards)``."""
    return dpo_loss(policy_real, policy_generated, ref_real, ref_generated, beta=beta,
                    loss_type=loss_type)


def bt_reward_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry reward-model loss −mean log σ(r(x, y_w) − r(x, y_l))."""
    _same_shape(reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def aihf_loss(*, form: str, w_demo: float = 1.0, w_pref: float = 1.0, beta: float = 0.1,
              pref: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              demo_nll: torch.Tensor | None = None,
              self_play: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              loss_type: str = "sigmoid") -> torch.Tensor:
    """AIHF's joint objective (see module docstring).

    Args:
        form: ``"nll"`` (demonstration term = ``demo_nll``, a scalar NLL) or ``"self_play"``
            (demonstration term = SPIN on ``self_play`` = (policy_real, policy_generated,
            ref_real, ref_generated)).
        w_demo, w_pref: weights w_D, w_P ≥ 0 (not both 0). A term whose weight is 0 may be None.
        pref: (policy_chosen, policy_rejected, ref_chosen, ref_rejected) of the preference batch.
    """
    for name, w in (("w_demo", w_demo), ("w_pref", w_pref)):
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"{name} must be a finite number >= 0, got {w}")
    if w_demo == 0 and w_pref == 0:
        raise ValueError("w_demo and w_pref are both 0: nothing to optimise")
    if form not in ("nll", "self_play"):
        raise ValueError(f"form must be 'nll' or 'self_play', got {form!r}")
    total = None
    if w_pref > 0:
        if pref is None:
            raise ValueError("w_pref > 0 needs pref=(policy_chosen, policy_rejected, ref_chosen, "
                             "ref_rejected)")
        total = w_pref * dpo_loss(*pref, beta=beta, loss_type=loss_type)[0]
    if w_demo > 0:
        if form == "nll":
            if demo_nll is None:
                raise ValueError("form='nll' with w_demo > 0 needs demo_nll")
            term = demo_nll
        else:
            if self_play is None:
                raise ValueError("form='self_play' with w_demo > 0 needs self_play=(policy_real, "
                                 "policy_generated, ref_real, ref_generated)")
            term = spin_loss(*self_play, beta=beta, loss_type=loss_type)[0]
        total = w_demo * term if total is None else total + w_demo * term
    assert total is not None
    return total
