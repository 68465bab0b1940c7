r"""NGDiff: the normalized gradient difference direction for unlearning (arXiv 2410.22086).

Unlearning is a two-task problem: keep the retain loss ``CE_R`` low and drive the forget loss
``CE_F`` up. NGDiff takes one gradient per task and normalises each by its global L2 norm (over
all trainable parameters) before taking the difference::

    g_R = ∇_w CE_R(w),   g_F = ∇_w CE_F(w)                       (two backward passes)
    d   = g_R / (‖g_R‖ + eps) − g_F / (‖g_F‖ + eps)
    w  ← BaseOpt(w, d)                   (any torch.optim optimizer consumes d as the gradient)

With cos θ = ⟨g_R, g_F⟩ / (‖g_R‖‖g_F‖) one gets ⟨g_R, d⟩ = ‖g_R‖(1 − cos θ) ≥ 0 and
⟨g_F, d⟩ = −‖g_F‖(1 − cos θ) ≤ 0, so under SGD, to first order, the retain loss falls by
η‖g_R‖(1 − cos θ) and the forget loss rises by η‖g_F‖(1 − cos θ) at every step; ‖d‖ ≤ 2.

Gradient accumulation accumulates ``g_R`` and ``g_F`` separately over micro-batches and
normalises once, in :meth:`NGDiff.direction`. The buffers reuse the ``.grad`` tensors that the
backward passes produce, so there is no copy: memory is two gradients instead of one.

:class:`LinearCombination` is the same harness for the baselines (GA, GradDiff, NPO, SimNPO):
``d = retain_weight · g_R + forget_weight · g_F`` where ``g_F`` is the gradient of the forget
*objective* the baseline minimises (``−CE_F`` for GA/GradDiff, the NPO or SimNPO loss). Because
both tasks are back-propagated separately, every method logs the same statistics.

Usage with any optimizer::

    ngd = NGDiff(model.parameters())
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        stats = ngd.backward(retain_loss=lm_loss(model, retain_batch),
                             forget_loss=lm_loss(model, forget_batch))
        optimizer.step()            # consumes p.grad = d
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

__all__ = ["LinearCombination", "NGDiff", "TwoTaskGradient", "TwoTaskStats", "ngdiff_direction"]


@dataclass(frozen=True)
class TwoTaskStats:
    """Per-step statistics of a two-task update (the issue's per-step log).

    ``cos_theta`` is the cosine between the retain gradient and the gradient of the forget *fit*
    (``∇CE_F`` for NGDiff; minus the gradient of the forget objective for the baselines), so it
    means the same thing for every method: > 0 when fitting the forget set also helps the retain
    set. ``direction_norm`` is ‖d‖ (≤ 2 for NGDiff).
    """

    retain_loss: float
    forget_loss: float
    retain_grad_norm: float
    forget_grad_norm: float
    cos_theta: float
    direction_norm: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_eps(eps: float) -> float:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


def ngdiff_direction(g_retain: list[torch.Tensor], g_forget: list[torch.Tensor], *,
                     eps: float = 1e-12) -> tuple[list[torch.Tensor], float, float, float]:
    """The NGDiff direction from two gradient lists: ``(d, ‖g_R‖, ‖g_F‖, cos θ)``.

    A functional form of :class:`NGDiff` (no buffers, new tensors); norms are global over the list.
    """
    _check_eps(eps)
    if len(g_retain) != len(g_forget):
        raise ValueError(f"g_retain and g_forget have {len(g_retain)} and {len(g_forget)} tensors")
    nr, nf, dot = _norms_and_dot(g_retain, g_forget)
    d = [r / (nr + eps) - f / (nf + eps) for r, f in zip(g_retain, g_forget)]
    return d, nr, nf, _cos(dot, nr, nf)


def _norms_and_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, float]:
    if not a:
        return 0.0, 0.0, 0.0
    na = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(a)).double())
    nb = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(b)).double())
    # per-tensor dots in the gradients' dtype, summed in float64 (no float64 copies of grads)
    dot = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).double().sum()
    vals = torch.stack([na, nb, dot]).tolist()  # one device sync
    return vals[0], vals[1], vals[2]


def _cos(dot: float, na: float, nb: float) -> float:
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


class TwoTaskGradient(abc.ABC):
    """Accumulate the retain and forget gradients in separate buffers; subclasses combine them.

    ``accumulate`` runs one backward pass per task (the caller builds both losses, typically from
    two forward passes), stealing the fresh ``.grad`` tensors as buffers. Pass micro-batch losses
    already scaled so that their sum is the batch loss (the usual accumulation convention);
    :meth:`direction` then combines once, writes ``d`` into ``p.grad`` and resets the buffers.
    While accumulating, the class owns ``p.grad`` of the given parameters.
    """

    forget_sign = 1.0  # +1: the forget loss is a fit loss (CE_F); -1: an unlearning objective

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], *,
                 eps: float = 1e-12) -> None:
        params = list(params)
        if params and isinstance(params[0], dict):  # optimizer-style param groups
            params = [p for g in params for p in g["params"]]
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params has no tensors with requires_grad=True")
        self.eps = _check_eps(eps)
        self._reset()

    def _reset(self) -> None:
        self._g_r: list[torch.Tensor | None] = [None] * len(self.params)
        self._g_f: list[torch.Tensor | None] = [None] * len(self.params)
        self._loss_r = 0.0
        self._loss_f = 0.0
        self._n = 0

    def _backward_into(self, loss: torch.Tensor, buf: list[torch.Tensor | None], name: str) -> float:
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"{name} must be a scalar tensor")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} is not finite ({value})")
        for p, b in zip(self.params, buf):
            p.grad = b  # backward accumulates in place into the running buffer
        loss.backward()
        for i, p in enumerate(self.params):
            buf[i] = p.grad
            p.grad = None
        return value

    def accumulate(self, *, retain_loss: torch.Tensor | None, forget_loss: torch.Tensor) -> None:
        """Back-propagate both losses into their own buffers (``retain_loss=None``: forget only)."""
        for p in self.params:
            if p.grad is not None:
                p.grad = None
        if retain_loss is not None:
            self._loss_r += self._backward_into(retain_loss, self._g_r, "retain_loss")
        self._loss_f += self._backward_into(forget_loss, self._g_f, "forget_loss")
        self._n += 1

    def _filled(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        g_r, g_f = [], []
        for p, r, f in zip(self.params, self._g_r, self._g_f):
            g_r.append(r if r is not None else torch.zeros_like(p))
            g_f.append(f if f is not None else torch.zeros_like(p))
        return g_r, g_f

    @abc.abstractmethod
    def _combine(self, g_r: list[torch.Tensor], g_f: list[torch.Tensor], nr: float, nf: float
                 ) -> list[torch.Tensor]:
        """Implemented by each subclass."""

    @torch.no_grad()
    def direction(self) -> TwoTaskStats:
        """Combine the accumulated gradients into ``p.grad = d``; return the step's statistics."""
        if self._n == 0:
            raise RuntimeError("direction() called before accumulate()")
        g_r, g_f = self._filled()
        nr, nf, dot = _norms_and_dot(g_r, g_f)
        if not (math.isfinite(nr) and math.isfinite(nf)):
            self._reset()
            raise FloatingPointError(f"non-finite gradient norm (retain {nr}, forget {nf})")
        d = self._combine(g_r, g_f, nr, nf)
        nd = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d)).double()))
        for p, t in zip(self.params, d):
            p.grad = t
        stats = TwoTaskStats(retain_loss=self._loss_r, forget_loss=self._loss_f,
                             retain_grad_norm=nr, forget_grad_norm=nf,
                             cos_theta=self.forget_sign * _cos(dot, nr, nf), direction_norm=nd)
        self._reset()
        return stats

    def backward(self, *, retain_loss: torch.Tensor | None, forget_loss: torch.Tensor
                 ) -> TwoTaskStats:
        """``accumulate`` once and ``direction``: the whole step for one (retain, forget) batch."""
        self.accumulate(retain_loss=retain_loss, forget_loss=forget_loss)
        return self.direction()


class NGDiff(TwoTaskGradient):
    """NGDiff: ``d = g_R/(‖g_R‖+eps) − g_F/(‖g_F‖+eps)``; pass the plain LM losses of both sets."""

    forget_sign = 1.0

    def _combine(self, g_r, g_f, nr, nf):
        # in place into the retain buffers: d = g_R/(nr+eps) - g_F/(nf+eps)
        torch._foreach_mul_(g_r, 1.0 / (nr + self.eps) if nr + self.eps > 0 else 0.0)
        torch._foreach_add_(g_r, g_f, alpha=-(1.0 / (nf + self.eps) if nf + self.eps > 0 else 0.0))
        return g_r


class LinearCombination(TwoTaskGradient):
    """``d = retain_weight · g_R + forget_weight · g_F`` (GA, GradDiff, NPO, SimNPO).

    ``forget_loss`` is the forget objective the method *minimises* (``−CE_F`` for GA and GradDiff,
    the NPO/SimNPO loss), so ``d`` is exactly the gradient of
    ``forget_weight · forget_loss + retain_weight · retain_loss``.
    """

    forget_sign = -1.0

    def __init__(self, params, *, retain_weight: float = 1.0, forget_weight: float = 1.0,
                 eps: float = 1e-12) -> None:
        super().__init__(params, eps=eps)
        for name, v in (("retain_weight", retain_weight), ("forget_weight", forget_weight)):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        self.retain_weight = float(retain_weight)
        self.forget_weight = float(forget_weight)

    def _combine(self, g_r, g_f, nr, nf):
        torch._foreach_mul_(g_f, self.forget_weight)
        if self.retain_weight:
            torch._foreach_add_(g_f, g_r, alpha=self.retain_weight)
        return g_f
