"""Encoder pieces for the small contrastive reproduction (specs/contrastive.md).

``MLPEncoder`` is the backbone (flatten → 256 → 128, ReLU after each layer): its output is the
representation evaluated by linear probe / kNN. ``Projector`` maps it to the 64-d, L2-normalised
embedding the contrastive loss sees. ``ContrastiveModel`` joins them; any backbone/projector pair of
``nn.Module`` s works (e.g. a ResNet trunk at scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveModel", "MLPEncoder", "Projector"]


def _check_dim(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


class MLPEncoder(nn.Module):
    """Flatten → Linear(in_dim, hidden) → ReLU → Linear(hidden, feat) → ReLU."""

    def __init__(self, in_dim: int = 144, hidden: int = 256, feat: int = 128) -> None:
        super().__init__()
        self.in_dim = _check_dim("in_dim", in_dim)
        self.hidden = _check_dim("hidden", hidden)
        self.feat = _check_dim("feat", feat)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(self.in_dim, self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, self.feat), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != self.in_dim:
            raise ValueError(f"x must be (B, ...) with {self.in_dim} values per sample, "
                             f"got shape {tuple(x.shape)}")
        return self.net(x)


class Projector(nn.Module):
    """Linear(feat, hidden) → ReLU → Linear(hidden, out), then L2 normalisation (``hidden``
    defaults to ``feat``)."""

    def __init__(self, feat: int = 128, out: int = 64, hidden: int | None = None) -> None:
        super().__init__()
        self.feat = _check_dim("feat", feat)
        self.out = _check_dim("out", out)
        self.hidden = self.feat if hidden is None else _check_dim("hidden", hidden)
        self.net = nn.Sequential(nn.Linear(self.feat, self.hidden), nn.ReLU(),
                                 nn.Linear(self.hidden, self.out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=-1)


class ContrastiveModel(nn.Module):
    """``forward(x)`` → normalised embedding ``z``; ``features(x)`` → backbone representation."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(projector, nn.Module):
            raise ValueError(f"projector must be an nn.Module, got {type(projector).__name__}")
        self.backbone = backbone
        self.projector = projector

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=-1)
