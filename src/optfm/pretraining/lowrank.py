"""Pure low-rank baseline: W = B A with both factors trained (ReLoRA without merges).

Both factors are Kaiming-uniform initialised (A: U(±1/√in), B: U(±1/√r)), so W ≠ 0 at init and
gradients reach both. Parameters: r·(in + out) (+ bias) instead of in·out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optfm.pretraining.sltrain import LLAMA_TARGET_MODULES, _check_shape, _replace

__all__ = ["LowRankLinear", "apply_lowrank"]


class LowRankLinear(nn.Module):
    """``y = x (B A)ᵀ + bias``, computed as ``(x Aᵀ) Bᵀ`` (never forms W)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_shape(in_features, out_features, rank)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        with torch.no_grad():
            for t, fan_in in ((self.A, in_features), (self.B, rank), (self.bias, in_features)):
                if t is not None:
                    b = 1.0 / math.sqrt(fan_in)
                    t.copy_(torch.empty(t.shape).uniform_(-b, b, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return self.B @ self.A


def apply_lowrank(model: nn.Module, rank: int, *,
                  target_modules: Sequence[str] = LLAMA_TARGET_MODULES, seed: int = 0) -> nn.Module:
    """Replace matching ``nn.Linear`` modules by :class:`LowRankLinear` in place."""
    gen = torch.Generator().manual_seed(seed)
    targets = set(target_modules)
    matches = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not matches:
        raise ValueError(f"no nn.Linear module is named one of {sorted(targets)}")
    for name, lin in matches:
        r = min(rank, lin.in_features, lin.out_features)
        _replace(model, name, LowRankLinear(lin.in_features, lin.out_features, r,
                                            bias=lin.bias is not None, generator=gen,
                                            device=lin.weight.device, dtype=lin.weight.dtype))
    return model
