r"""DiSK: a simplified Kalman filter on privatized gradients, with an extrapolated query point.

Paper: "DiSK: Differentially Private Optimizer with Simplified Kalman Filter for Noise Reduction"
(ICLR 2025, arXiv 2410.03883).

``kappa`` in (0, 1] is the Kalman gain **on the new measurement** (the paper's convention), and
``gamma`` > 0 the extrapolation step. With parameters ``x_t``::

    d_t  = x_t - x_{t-1}                  (d_0 = 0)
    c    = (1 - kappa) / (kappa * gamma)
    g(ξ) = c ∇f(x_t + gamma d_t; ξ) + (1 - c) ∇f(x_t; ξ)       per sample, BEFORE clipping
    g̃_t  = (1/B) [ sum_ξ clip_C(g(ξ)) + N(0, σ² C² I) ]          clipped once, noised once
    m_t  = (1 - kappa) m_{t-1} + kappa g̃_t                        (m_0 = g̃_0)
    x_{t+1} = BaseOpt(x_t, m_t)

Privacy: the combined per-sample vector is clipped to norm C, so the sensitivity is C for any c
and the noise multiplier σ is used as calibrated: it is never rescaled by sqrt(c² + (1 - c)²), and
the two evaluations are never clipped separately.

Cost: two forward/backward passes per step in general. When ``gamma = (1 - kappa) / kappa``,
c = 1 and one evaluation at the extrapolated point suffices; when ``kappa = 1``, c = 0 and DiSK is
DP-SGD (one evaluation at x_t, no filtering). Memory: two parameter-sized buffers (m and d). The
two per-sample gradients are combined as the second is produced: the first evaluation's per-sample
gradients are pre-scaled and handed to Opacus as the accumulator that the second backward pass adds
into, layer by layer, so no second full copy of all per-sample gradients is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["KalmanFilter", "combine_two_point_grad_samples"]


class KalmanFilter:
    """DiSK's state (m, d) and its update rules.

    The optimizer (:class:`optfm.privacy.PrivateOptimizer`) calls :meth:`extrapolate_` before the
    evaluation at x_t + gamma d_t, :meth:`step` on the privatized gradient, and
    :meth:`before_update` / :meth:`after_update` around the base optimizer's step to track d.
    """

    kind = "kalman"

    def __init__(self, kappa: float = 0.7, gamma: float = 0.5) -> None:
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and 0.0 < kappa <= 1.0):
            raise ValueError(f"kappa must be in (0, 1] (the Kalman gain on the new measurement), got {kappa!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0.0):
            raise ValueError(f"gamma must be > 0 (the extrapolation step), got {gamma!r}")
        self.kappa = float(kappa)
        self.gamma = float(gamma)
        self.reset()

    @classmethod
    def one_evaluation(cls, kappa: float = 0.7) -> KalmanFilter:
        """The cheap mode: gamma = (1 - kappa) / kappa, so c = 1 (needs kappa < 1)."""
        if not 0.0 < kappa < 1.0:
            raise ValueError(f"the one-evaluation mode needs kappa in (0, 1), got {kappa!r}")
        return cls(kappa, (1.0 - kappa) / kappa)

    @property
    def c(self) -> float:
        """Weight of the extrapolated gradient, (1 - kappa) / (kappa gamma); snapped to exactly 1
        within 1e-12 so the one-evaluation mode is taken."""
        c = (1.0 - self.kappa) / (self.kappa * self.gamma)
        return 1.0 if abs(c - 1.0) < 1e-12 else c

    @property
    def evaluations(self) -> int:
        """Forward/backward passes per step: 1 when c is 0 or 1, else 2."""
        return 1 if self.c in (0.0, 1.0) else 2

    def reset(self) -> None:
        self.t = 0
        self._m: list[torch.Tensor] | None = None
        self._d: list[torch.Tensor] | None = None

    @torch.no_grad()
    def extrapolate_(self, params: Sequence[torch.Tensor], sign: float = 1.0) -> None:
        """``x <- x + sign * gamma * d`` (no-op before the first update, where d = 0)."""
        if self._d is None:
            return
        for p, d in zip(params, self._d):
            p.add_(d, alpha=sign * self.gamma)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """``m_t = (1 - kappa) m_{t-1} + kappa g̃_t`` (m_0 = g̃_0); each tensor in ``grads`` is
        replaced in place by m_t."""
        grads = list(grads)
        if self._m is None:
            self._m = [g.detach().clone() for g in grads]
        else:
            if len(grads) != len(self._m):
                raise ValueError(f"filter state holds {len(self._m)} tensors, got {len(grads)}")
            for m, g in zip(self._m, grads):
                m.lerp_(g, self.kappa)  # (1 - kappa) m + kappa g
                g.copy_(m)
        self.t += 1

    @torch.no_grad()
    def before_update(self, params: Sequence[torch.Tensor]) -> None:
        """Stash x_t in the d buffer (it becomes x_{t+1} - x_t in :meth:`after_update`)."""
        if self._d is None:
            self._d = [p.detach().clone() for p in params]
        else:
            for d, p in zip(self._d, params):
                d.copy_(p)

    @torch.no_grad()
    def after_update(self, params: Sequence[torch.Tensor]) -> None:
        """``d = x_{t+1} - x_t``."""
        for d, p in zip(self._d, params):
            torch.sub(p, d, out=d)

    def buffers(self) -> list[torch.Tensor]:
        """The persistent state tensors (m and d: two per parameter tensor)."""
        return [*(self._m or []), *(self._d or [])]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "kappa": self.kappa, "gamma": self.gamma, "t": self.t,
                "m": None if self._m is None else [m.clone() for m in self._m],
                "d": None if self._d is None else [d.clone() for d in self._d]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state["kappa"] != self.kappa or state["gamma"] != self.gamma:
            raise ValueError("state belongs to a different filter (kind, kappa or gamma differ)")
        self.t = int(state["t"])
        self._m = None if state["m"] is None else [m.clone() for m in state["m"]]
        self._d = None if state["d"] is None else [d.clone() for d in state["d"]]

    def __repr__(self) -> str:
        return f"KalmanFilter(kappa={self.kappa}, gamma={self.gamma}, c={self.c:.4g})"


def combine_two_point_grad_samples(params: Sequence[torch.nn.Parameter], c: float,
                                   second_evaluation: Callable[[], Any]) -> Any:
    """Leave ``c · G_first + (1 - c) · G_second`` in each ``p.grad_sample``.

    On entry ``p.grad_sample`` holds the per-sample gradients of the first evaluation. They are
    scaled in place by ``c / (1 - c)`` and installed as Opacus's per-sample accumulator
    (``p._current_grad_sample``), which the hooks of the second backward pass add each layer's
    per-sample gradients into; the sum is then scaled by ``(1 - c)``. Peak memory is one set of
    per-sample gradients plus one layer's transient, never two full sets. Returns what
    ``second_evaluation`` returned. Requires c != 1.
    """
    if c == 1.0:
        raise ValueError("c = 1 needs a single evaluation; nothing to combine")
    scale = c / (1.0 - c)
    for p in params:
        gs = p.grad_sample
        if gs is None:
            raise RuntimeError("no per-sample gradients after the first evaluation: did the "
                               "closure run a forward and backward pass through the private model?")
        if isinstance(gs, list):
            raise RuntimeError("per-sample gradients were accumulated over several batches; DiSK "
                               "needs exactly one forward/backward pass per evaluation")
        p._current_grad_sample = gs.mul_(scale)
        p.grad_sample = None
    out = second_evaluation()
    for p in params:
        if hasattr(p, "_current_grad_sample"):  # the second pass did not reach this parameter
            p.grad_sample = p._current_grad_sample
            del p._current_grad_sample
        if isinstance(p.grad_sample, list):
            raise RuntimeError("the second evaluation produced several per-sample gradient batches")
        p.grad_sample.mul_(1.0 - c)
    return out
