r"""Automatic learning rate by a GeN-style quadratic fit along the optimizer's own update.

NGDiff (arXiv 2410.22086, Sec. 3.2) sets the learning rate with the generalized Newton (GeN)
rule. Every ``period`` steps, with the step's gradient already in ``p.grad``, :meth:`AutoLR.probe`

1. snapshots the parameters **and** the optimizer state, takes the optimizer's update
   ``Δ = w − step(w)`` at the current lr η, and restores both, so the optimizer is never stepped
   twice (the reference GeN code advances Adam's moments on every probe: not copied here);
2. evaluates the fitted loss L (no grad, one fixed batch) at three points::

       L0 = L(w),   L+ = L(w − Δ),   L− = L(w + Δ)
       Gg  = (L− − L+) / (2η)               (first-order decrease along the update)
       gHg = (L+ + L− − 2 L0) / η²          (curvature along the update)

3. updates ``η ← s·η + (1 − s)·clip(Gg/gHg, η/2, 2η)`` (s = 0.9) when Gg > 0 and gHg > 0, and
   ``η ← η/2`` otherwise (a non-convex or non-descending fit, or a non-finite loss).

Gg/gHg is the minimiser of the parabola ``L(w − tΔ/η) ≈ L0 − Gg·t + ½gHg·t²``; on a quadratic
``½h‖w‖²`` with SGD it is exactly 1/h. Every parameter group's lr is multiplied by the same factor
η_new/η (η is group 0's lr). The caller then takes the real ``optimizer.step()``.

For NGDiff the fitted loss is the retain loss by default (the negated forget loss is unbounded
below, so fitting it drives η up); ``"scalarized"`` fits ``L_R/‖g_R‖ − CE_F/‖g_F‖`` with the norms
frozen at the current step. The loss callable is the caller's choice; see
:class:`optfm.unlearning.Unlearner`. Cost per probe: one optimizer step, three forward passes and
copies of the parameters and optimizer state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = ["AutoLR", "ProbeResult"]


@dataclass(frozen=True)
class ProbeResult:
    """One quadratic fit: the three losses, the fitted coefficients and the lr before/after."""

    lr_before: float
    lr_after: float
    loss0: float
    loss_plus: float
    loss_minus: float
    Gg: float
    gHg: float
    fitted_lr: float  # Gg/gHg before clipping and smoothing (nan when the fit failed)
    accepted: bool

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def _snapshot_state(opt: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt.state:
                state[p] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                            for k, v in opt.state[p].items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups


def _restore_state(opt: torch.optim.Optimizer, snap: tuple[dict, list[dict]]) -> None:
    state, groups = snap
    for group, saved in zip(opt.param_groups, groups):
        group.update(saved)
        for p in group["params"]:
            if p not in state:
                opt.state.pop(p, None)
                continue
            cur = opt.state[p]
            for k in list(cur):
                if k not in state[p]:
                    del cur[k]
            for k, v in state[p].items():
                old = cur.get(k)
                if torch.is_tensor(v) and torch.is_tensor(old) and old.shape == v.shape \
                        and old.dtype == v.dtype:
                    old.copy_(v)
                else:
                    cur[k] = v


class AutoLR:
    """GeN-style learning-rate adaptation for any ``torch.optim`` optimizer (see module docstring).

    Args:
        optimizer: the optimizer whose lr is adapted; its update direction is the one probed.
        period: probe every ``period`` steps (``should_probe(step)``), default 4.
        smoothing: s in ``η ← s·η + (1−s)·clip(...)``, in [0, 1).
        clip: (low, high) factors bounding the fitted lr to [low·η, high·η].
        min_lr, max_lr: optional absolute bounds on η.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, period: int = 4,
                 smoothing: float = 0.9, clip: tuple[float, float] = (0.5, 2.0),
                 min_lr: float = 0.0, max_lr: float = math.inf) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if int(period) != period or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        lo, hi = clip
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"clip must be (low, high) with 0 < low <= 1 <= high, got {clip}")
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got {min_lr}, {max_lr}")
        self.optimizer = optimizer
        self.period = int(period)
        self.smoothing = float(smoothing)
        self.clip = (float(lo), float(hi))
        self.min_lr, self.max_lr = float(min_lr), float(max_lr)
        self.history: list[ProbeResult] = []

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def should_probe(self, step: int) -> bool:
        """True on steps 0, period, 2·period, ..."""
        return step % self.period == 0

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _set_lr(self, new: float) -> None:
        old = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * (new / old) if old > 0 else new

    @torch.no_grad()
    def probe(self, loss_fn: Callable[[], float | torch.Tensor]) -> ProbeResult:
        """Fit the lr along the update the optimizer would take now; restore everything.

        ``loss_fn()`` must evaluate the fitted loss at the current parameters on a fixed batch
        (it is called three times). ``p.grad`` must hold the step's gradient (e.g. NGDiff's d).
        Parameters and optimizer state are bit-identical afterwards; only the lr changes.
        """
        eta = self.lr
        if not eta > 0:
            raise ValueError(f"AutoLR needs a positive learning rate, the optimizer has {eta}")
        params = self._params()
        w0 = [p.detach().clone() for p in params]
        snap = _snapshot_state(self.optimizer)
        try:
            with torch.enable_grad():  # some optimizers' step() expects grad mode
                self.optimizer.step()
            loss_plus = float(loss_fn())  # at w - Δ
            for p, w in zip(params, w0):  # w + Δ = 2w - (w - Δ)
                p.mul_(-1.0).add_(w, alpha=2.0)
            loss_minus = float(loss_fn())
            for p, w in zip(params, w0):
                p.copy_(w)
            loss0 = float(loss_fn())
        finally:
            for p, w in zip(params, w0):
                p.copy_(w)
            _restore_state(self.optimizer, snap)
        Gg = (loss_minus - loss_plus) / (2 * eta)
        gHg = (loss_plus + loss_minus - 2 * loss0) / eta**2
        finite = all(math.isfinite(v) for v in (loss0, loss_plus, loss_minus))
        accepted = finite and Gg > 0 and gHg > 0
        fitted = Gg / gHg if accepted else math.nan
        if accepted:
            lo, hi = self.clip
            target = min(max(fitted, lo * eta), hi * eta)
            new = self.smoothing * eta + (1 - self.smoothing) * target
        else:
            new = eta / 2
        new = min(max(new, self.min_lr), self.max_lr)
        if new > 0:
            self._set_lr(new)
        result = ProbeResult(lr_before=eta, lr_after=self.lr, loss0=loss0, loss_plus=loss_plus,
                             loss_minus=loss_minus, Gg=Gg, gHg=gHg, fitted_lr=fitted,
                             accepted=accepted)
        self.history.append(result)
        return result

    def state_dict(self) -> dict:
        return {"period": self.period, "smoothing": self.smoothing, "clip": list(self.clip),
                "min_lr": self.min_lr, "max_lr": self.max_lr,
                "history": [r.as_dict() for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.period = int(state["period"])
        self.smoothing = float(state["smoothing"])
        self.clip = (float(state["clip"][0]), float(state["clip"][1]))
        self.min_lr, self.max_lr = float(state["min_lr"]), float(state["max_lr"])
        self.history = [ProbeResult(**r) for r in state.get("history", [])]
