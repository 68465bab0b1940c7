r"""DOPPLER: a low-pass filter on privatized gradients.

Paper: "DOPPLER: Differentially Private Optimizers with Low-pass Filter for Privacy Noise
Reduction" (NeurIPS 2024, arXiv 2408.13460).

The DP optimizer produces a privatized gradient ``g̃_t`` (clipped, noised, averaged). DOPPLER runs
every coordinate of that sequence through a linear filter with coefficients ``a`` (feedback,
``a[0] = 1``) and ``b`` (feed-forward), from a zero initial state, and divides by the filter's
response to a constant input so that the output is unbiased from the first step::

    m_t = - sum_{tau=1}^{n_a} a[tau] m_{t-tau} + sum_{tau=0}^{n_b} b[tau] g̃_{t-tau}
    c_t = - sum_{tau=1}^{n_a} a[tau] c_{t-tau} + sum_{tau=0}^{min(n_b, t)} b[tau]
    m̂_t = m_t / c_t        (handed to the base optimizer as the gradient)

with the unit-DC-gain constraint ``sum(b) - sum(a[1:]) = 1``. The filter is pure post-processing
of the privatized gradients: it costs no privacy, no extra forward/backward pass, and keeps
``n_a + n_b`` parameter-sized buffers (the past outputs and past inputs).

``a9b1`` (a = [1, -0.9], b = [0.1]) is an exponential moving average with Adam's bias correction:
``m̂_t`` equals Adam's ``m_t / (1 - 0.9^t)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["PRESETS", "LowPassFilter"]


def _cheby2() -> tuple[list[float], list[float]]:
    """Second-order Chebyshev type-I low-pass (ripple 10 dB, cutoff 0.02 of Nyquist), with ``b``
    rescaled to unit DC gain."""
    from scipy.signal import cheby1

    b, a = cheby1(2, 10, 0.02)
    a = a / a[0]
    b = b * (a.sum() / b.sum())
    return [float(x) for x in a], [float(x) for x in b]


PRESETS: dict[str, Any] = {
    "a9b1": ([1.0, -0.9], [0.1]),
    "a9b1505": ([1.0, -0.9], [0.15, -0.05]),
    "a72b0505": ([1.0, -0.7, -0.2], [0.05, 0.05]),
    "cheby2": _cheby2,
}


class LowPassFilter:
    """Stateful IIR low-pass filter applied in place to a list of gradient tensors.

    Args:
        a: feedback coefficients including ``a[0] = 1``.
        b: feed-forward coefficients, ``b[0] != 0``.

    Raises ``ValueError`` when ``a[0] != 1``, ``b[0] == 0``, the DC gain is not 1
    (``|sum(b) - sum(a[1:]) - 1| > 1e-6``) or the filter is unstable (a pole on or outside the
    unit circle).
    """

    kind = "lowpass"

    def __init__(self, a: Sequence[float] = (1.0, -0.9), b: Sequence[float] = (0.1,)) -> None:
        a = [float(x) for x in a]
        b = [float(x) for x in b]
        if not a or not b:
            raise ValueError("a and b must each have at least one coefficient")
        if not all(math.isfinite(x) for x in a + b):
            raise ValueError(f"filter coefficients must be finite, got a={a}, b={b}")
        if a[0] != 1.0:
            raise ValueError(f"a[0] must be 1 (normalise the coefficients by a[0]), got a[0]={a[0]}")
        if b[0] == 0.0:
            raise ValueError("b[0] must be non-zero (the bias correction c_0 = b[0] would be 0)")
        gain = sum(b) - sum(a[1:])
        if abs(gain - 1.0) > 1e-6:
            raise ValueError(
                f"coefficients must have unit DC gain: sum(b) - sum(a[1:]) = {gain:.8g}, need 1 "
                f"(a={a}, b={b})")
        if len(a) > 1:
            poles = np.roots(a)
            if np.max(np.abs(poles)) >= 1.0:
                raise ValueError(f"filter is unstable: pole magnitude {np.max(np.abs(poles)):.4g} >= 1 "
                                 f"(a={a})")
        self.a = a
        self.b = b
        self.reset()

    @classmethod
    def preset(cls, name: str) -> LowPassFilter:
        """``a9b1`` (default), ``a9b1505``, ``a72b0505`` or ``cheby2``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
        p = PRESETS[name]
        a, b = p() if callable(p) else p
        return cls(a, b)

    @property
    def n_a(self) -> int:
        return len(self.a) - 1

    @property
    def n_b(self) -> int:
        return len(self.b) - 1

    def reset(self) -> None:
        """Back to the zero initial state."""
        self.t = 0
        self._c_hist: list[float] = []  # c_{t-1}, c_{t-2}, ... (most recent first)
        self._m: list[list[torch.Tensor]] | None = None  # per tensor: m_{t-1}, ..., m_{t-n_a}
        self._g: list[list[torch.Tensor]] | None = None  # per tensor: g_{t-1}, ..., g_{t-n_b}

    def _next_c(self) -> float:
        c = sum(self.b[: min(self.n_b, self.t) + 1])
        for tau, c_prev in enumerate(self._c_hist[: self.n_a], start=1):
            c -= self.a[tau] * c_prev
        return c

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """Filter one step: each tensor in ``grads`` (the privatized gradient g̃_t) is replaced in
        place by m̂_t."""
        grads = list(grads)
        if self._m is None:
            self._m = [[torch.zeros_like(g) for _ in range(self.n_a)] for g in grads]
            self._g = [[torch.zeros_like(g) for _ in range(self.n_b)] for g in grads]
        elif len(grads) != len(self._m):
            raise ValueError(f"filter state holds {len(self._m)} tensors, got {len(grads)}")
        c_t = self._next_c()
        if self.n_a == 1 and self.n_b == 0:  # first order (a9b1): update m in its own buffer
            a1, b0 = self.a[1], self.b[0]
            exact_lerp = -a1 == 1.0 - b0  # m = (1 - b0) m + b0 g: one fused op
            for g, (m,) in zip(grads, self._m):
                if exact_lerp:
                    m.lerp_(g, b0)
                else:
                    m.mul_(-a1).add_(g, alpha=b0)
                torch.div(m, c_t, out=g)
            self._c_hist = [c_t]
            self.t += 1
            return
        for g, past_m, past_g in zip(grads, self._m, self._g):
            m = g * self.b[0]
            for tau, gp in enumerate(past_g, start=1):
                m.add_(gp, alpha=self.b[tau])
            for tau, mp in enumerate(past_m, start=1):
                m.add_(mp, alpha=-self.a[tau])
            if past_g:  # ring shift: the oldest input buffer now holds g_t
                oldest = past_g.pop()
                past_g.insert(0, oldest.copy_(g))
            if past_m:
                oldest = past_m.pop()
                past_m.insert(0, oldest.copy_(m))
            g.copy_(m.div_(c_t))
        self._c_hist.insert(0, c_t)
        del self._c_hist[self.n_a:]
        self.t += 1

    def impulse_response(self, n: int) -> np.ndarray:
        """First ``n`` taps h_k of the (un-normalised) filter, for variance checks: white noise of
        variance s² comes out with variance s² · sum(h_k²) in steady state."""
        h = np.zeros(n)
        x = np.zeros(n)
        x[0] = 1.0
        for t in range(n):
            acc = sum(self.b[k] * x[t - k] for k in range(len(self.b)) if t - k >= 0)
            acc -= sum(self.a[k] * h[t - k] for k in range(1, len(self.a)) if t - k >= 0)
            h[t] = acc
        return h

    def buffers(self) -> list[torch.Tensor]:
        """The persistent state tensors (n_a + n_b per filtered tensor)."""
        if self._m is None:
            return []
        return [t for group in (*self._m, *self._g) for t in group]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "a": list(self.a), "b": list(self.b), "t": self.t,
            "c_hist": list(self._c_hist),
            "m": None if self._m is None else [[t.clone() for t in ms] for ms in self._m],
            "g": None if self._g is None else [[t.clone() for t in gs] for gs in self._g],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or list(state["a"]) != self.a or list(state["b"]) != self.b:
            raise ValueError("state belongs to a different filter (kind or coefficients differ)")
        self.t = int(state["t"])
        self._c_hist = [float(c) for c in state["c_hist"]]
        self._m = None if state["m"] is None else [[t.clone() for t in ms] for ms in state["m"]]
        self._g = None if state["g"] is None else [[t.clone() for t in gs] for gs in state["g"]]

    def __repr__(self) -> str:
        return f"LowPassFilter(a={self.a}, b={self.b})"
