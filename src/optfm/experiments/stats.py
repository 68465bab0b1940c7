"""Small statistics helpers for experiment summaries (mean and standard error over seeds)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["fmt_mean_se", "mean_se"]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_se needs at least one value")
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), se


def fmt_mean_se(values: Sequence[float], *, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± se"`` with ``scale`` applied (e.g. 100 for percentages)."""
    m, s = mean_se(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
