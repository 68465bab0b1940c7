r"""One-run empirical privacy audit (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023).

Insert ``m`` canaries, include each independently with probability 1/2, train once, score every
canary, guess "in" for the ``k_pos`` highest scores and "out" for the ``k_neg`` lowest, and count
the ``v`` correct guesses among the ``r = k_pos + k_neg`` made. Under (ε, δ)-DP the number of
correct guesses is dominated by Binomial(r, e^ε / (1 + e^ε)) up to a δ term, so

    p(ε) = P[Bin(r, q_ε) >= v] + 2 m δ · max_{i=1..v} P[v - i <= Bin(r, q_ε) < v] / i,
    q_ε = e^ε / (1 + e^ε),

is a p-value for "the training run was (ε, δ)-DP", and the largest ε with p(ε) < 1 - confidence
is a lower bound ε_emp on the true ε at that confidence. A correct implementation must give
ε_emp <= ε_claimed (up to the 5% chance the bound itself fails); an implementation that leaks
(noise off, noise too small, clipping skipped) gives ε_emp above it. ``k_pos``/``k_neg`` must be
fixed before looking at the scores.

Canaries here are **gradient canaries** (the white-box setting of the paper): canary ``i`` is a
fixed random direction ``u_i`` of norm C in parameter space, used as a per-sample gradient. An
included canary is Poisson-sampled at every step with the same rate q as every real record and
its gradient joins the step's per-sample gradients *before* clipping, so it goes through exactly
the same clip, noise and filter as real data (:meth:`PrivateOptimizer.add_per_sample_hook`). The
score is the projection of the total parameter change on the canary, ``<θ_0 - θ_T, u_i>``: what
an attacker holding the first and last model sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AuditResult", "GradientCanaries", "audit_from_scores", "epsilon_lower_bound", "p_value"]


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` under (eps, delta)-DP with
    ``m`` canaries (each included with probability 1/2)."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ...
    partial = np.cumsum(pmf) / np.arange(1, v + 1)   # P[v-i <= Bin < v] / i
    return min(1.0, tail + 2 * m * delta * float(partial.max()))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest ε whose p-value is below ``1 - confidence`` (0 if even ε = 0 is not rejected)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditResult:
    eps_lower: float   # ε_emp: lower bound on ε at `confidence`
    m: int             # canaries
    r: int             # guesses made
    v: int             # correct guesses
    confidence: float
    delta: float

    @property
    def accuracy(self) -> float:
        return self.v / self.r if self.r else float("nan")


def audit_from_scores(scores: np.ndarray | torch.Tensor, included: np.ndarray | torch.Tensor, *,
                      k_pos: int, k_neg: int, delta: float, confidence: float = 0.95) -> AuditResult:
    """Guess "in" for the ``k_pos`` highest scores and "out" for the ``k_neg`` lowest; bound ε."""
    s = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, dtype=np.float64)
    inc = np.asarray(included.detach().cpu() if torch.is_tensor(included) else included, dtype=bool)
    m = len(s)
    if inc.shape != s.shape:
        raise ValueError(f"scores and included must have the same shape, got {s.shape} and {inc.shape}")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m or k_pos + k_neg == 0:
        raise ValueError(f"need k_pos, k_neg >= 0 and 0 < k_pos + k_neg <= m={m}, got {k_pos}, {k_neg}")
    order = np.argsort(s, kind="stable")
    v = int(inc[order[m - k_pos:]].sum()) if k_pos else 0
    v += int((~inc[order[:k_neg]]).sum())
    r = k_pos + k_neg
    return AuditResult(epsilon_lower_bound(m, r, v, delta, confidence), m, r, v, confidence, delta)


class GradientCanaries:
    """``m`` gradient canaries for a model's trainable parameters.

    Directions are Gaussian, normalised to norm ``C``; membership is Bernoulli(1/2); both are
    drawn from ``generator``. :meth:`attach` makes a :class:`PrivateOptimizer` Poisson-sample the
    included canaries with ``sample_rate`` at every step and add their gradients to the step's
    per-sample gradients before clipping.
    """

    def __init__(self, params: list[torch.nn.Parameter], m: int, C: float, sample_rate: float, *,
                 generator: torch.Generator) -> None:
        if m < 2:
            raise ValueError(f"m must be >= 2, got {m}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.params = [p for p in params if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        dim = sum(self.sizes)
        u = torch.randn(m, dim, generator=generator)
        self.directions = u * (C / u.norm(dim=1, keepdim=True))
        self.included = torch.rand(m, generator=generator) < 0.5
        self.sample_rate = sample_rate
        self.generator = generator
        self.injected = torch.zeros(m, dtype=torch.long)

    def attach(self, optimizer) -> None:
        optimizer.add_per_sample_hook(self._inject)

    def _inject(self, optimizer) -> None:
        draw = torch.rand(len(self.included), generator=self.generator) < self.sample_rate
        chosen = torch.nonzero(draw & self.included).flatten()
        if len(chosen) == 0:
            return
        self.injected[chosen] += 1
        rows = self.directions[chosen]
        for p, chunk, shape in zip(optimizer.params, rows.split(self.sizes, dim=1), self.shapes):
            gs = optimizer._get_flat_grad_sample(p)
            p.grad_sample = torch.cat([gs, chunk.reshape(len(chosen), *shape).to(gs)], dim=0)

    def scores(self, theta_0: list[torch.Tensor], theta_T: list[torch.Tensor]) -> torch.Tensor:
        """``<θ_0 - θ_T, u_i>`` for every canary (descent moves θ against an included canary's
        gradient, so members score high)."""
        diff = torch.cat([(a - b).flatten() for a, b in zip(theta_0, theta_T)])
        return self.directions @ diff.to(self.directions)
