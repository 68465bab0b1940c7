"""Batch-wise image augmentations for the digits-on-canvas contrastive reproduction, in torch.

specs/contrastive.md ("Small reproduction"): random affine (±15°, scale 0.9–1.1, ±2 px shift),
brightness ×0.8–1.2, Gaussian noise σ 0.05, 2×2 cutout with probability 0.5, **no flips**.
torchvision does not import beside the CPU torch wheel, so the affine warp is
``torch.nn.functional.affine_grid`` + ``grid_sample`` (bilinear, zero padding).

All randomness comes from an explicit ``torch.Generator``. Contrastive methods with per-sample
state (SogCLR's moving average, EMC²'s Markov chains) need the sample index of every row, so the
batch iterator :func:`index_batches` yields indices, and :class:`TwoViewDataset` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["CanvasAugment", "TwoViewDataset", "index_batches", "two_views"]


def _check_range(name: str, value: tuple[float, float], low: float) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (low <= lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must satisfy {low} <= low <= high < inf, got {value!r}")
    return lo, hi


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)


class CanvasAugment:
    """Random affine + brightness + Gaussian noise + cutout, drawn independently per sample.

    Args:
        rotation: maximum absolute rotation in degrees (angle ~ U(-rotation, rotation)).
        scale: (low, high) zoom factor range, ``0 < low <= high``.
        shift: maximum absolute translation in pixels per axis (continuous, U(-shift, shift)).
        brightness: (low, high) multiplicative brightness range, ``0 <= low <= high``.
        noise_std: standard deviation of the additive Gaussian pixel noise (no clamping).
        cutout: side of the square patch set to zero (0 disables).
        cutout_p: probability that a sample gets a cutout patch, in [0, 1].

    Called as ``aug(x, generator)`` on ``(B, C, H, W)`` images or ``(B, D)`` flattened square
    single-channel images (``D = S*S``); returns a new tensor of the same shape and dtype.
    Order: affine, brightness, noise, cutout.
    """

    def __init__(self, rotation: float = 15.0, scale: tuple[float, float] = (0.9, 1.1),
                 shift: float = 2.0, brightness: tuple[float, float] = (0.8, 1.2),
                 noise_std: float = 0.05, cutout: int = 2, cutout_p: float = 0.5) -> None:
        if not (math.isfinite(rotation) and 0.0 <= rotation <= 180.0):
            raise ValueError(f"rotation must be in [0, 180] degrees, got {rotation}")
        if not (math.isfinite(shift) and shift >= 0.0):
            raise ValueError(f"shift must be >= 0 pixels, got {shift}")
        if not (math.isfinite(noise_std) and noise_std >= 0.0):
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if isinstance(cutout, bool) or int(cutout) != cutout or cutout < 0:
            raise ValueError(f"cutout must be an integer >= 0, got {cutout}")
        if not 0.0 <= cutout_p <= 1.0:
            raise ValueError(f"cutout_p must be in [0, 1], got {cutout_p}")
        self.scale = _check_range("scale", scale, 0.0)
        if self.scale[0] <= 0.0:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {scale!r}")
        self.brightness = _check_range("brightness", brightness, 0.0)
        self.rotation = float(rotation)
        self.shift = float(shift)
        self.noise_std = float(noise_std)
        self.cutout = int(cutout)
        self.cutout_p = float(cutout_p)

    def __repr__(self) -> str:
        return (f"CanvasAugment(rotation={self.rotation}, scale={self.scale}, shift={self.shift}, "
                f"brightness={self.brightness}, noise_std={self.noise_std}, "
                f"cutout={self.cutout}, cutout_p={self.cutout_p})")

    @property
    def _has_affine(self) -> bool:
        return self.rotation > 0.0 or self.shift > 0.0 or self.scale != (1.0, 1.0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("x must be a floating-point torch.Tensor")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        flat_shape = None
        if x.dim() == 2:
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"x of shape (B, D) needs D a perfect square, got D={x.shape[1]}")
            flat_shape = x.shape
            x = x.reshape(x.shape[0], 1, side, side)
        elif x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W) or (B, H*W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        if self.cutout > min(h, w):
            raise ValueError(f"cutout={self.cutout} is larger than the image ({h}x{w})")
        out = x
        if b > 0:
            if self._has_affine:
                out = self._affine(out, generator)
            if self.brightness != (1.0, 1.0):
                factor = _uniform(b, *self.brightness, generator).to(x.device, x.dtype)
                out = out * factor.view(b, 1, 1, 1)
            if self.noise_std > 0.0:
                noise = torch.randn(out.shape, generator=generator, device=generator.device)
                out = out + self.noise_std * noise.to(x.device, x.dtype)
            if self.cutout > 0 and self.cutout_p > 0.0:
                out = self._cutout(out, generator)
        out = out.clone() if out is x else out
        return out.reshape(flat_shape) if flat_shape is not None else out

    def _affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        angle = torch.deg2rad(_uniform(b, -self.rotation, self.rotation, generator))
        zoom = _uniform(b, *self.scale, generator)
        # Shift in pixels -> normalised coordinates (align_corners=False: 2 units span W pixels).
        tx = _uniform(b, -self.shift, self.shift, generator) * 2.0 / w
        ty = _uniform(b, -self.shift, self.shift, generator) * 2.0 / h
        # affine_grid maps output coordinates to input coordinates: the inverse of
        # "rotate by angle, zoom by zoom, then translate by (tx, ty)".
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([
            torch.stack([cos, sin, -(cos * tx + sin * ty)], dim=1),
            torch.stack([-sin, cos, -(-sin * tx + cos * ty)], dim=1),
        ], dim=1).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _cutout(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        k = self.cutout
        apply = torch.rand(b, generator=generator, device=generator.device) < self.cutout_p
        top = torch.randint(0, h - k + 1, (b,), generator=generator, device=generator.device)
        left = torch.randint(0, w - k + 1, (b,), generator=generator, device=generator.device)
        rows = torch.arange(h, device=generator.device).view(1, h, 1)
        cols = torch.arange(w, device=generator.device).view(1, 1, w)
        inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + k).view(b, 1, 1))
                  & (cols >= left.view(b, 1, 1)) & (cols < (left + k).view(b, 1, 1)))
        mask = (inside & apply.view(b, 1, 1)).unsqueeze(1).to(x.device)
        return x.masked_fill(mask, 0.0)


def two_views(x: torch.Tensor, augment: CanvasAugment,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmentations of the same batch: ``(view1, view2)``."""
    return augment(x, generator), augment(x, generator)


class TwoViewDataset(Dataset):
    """Dataset over ``x`` (``(N, ...)``) returning ``(view1, view2, index)`` per item.

    ``dataset[i]`` accepts an int or a 1-D LongTensor of indices (then it augments the whole batch
    in one call, the fast path used with :func:`index_batches`). The sample index is returned so
    per-sample state (SogCLR, EMC²) can be addressed.
    """

    def __init__(self, x: torch.Tensor, augment: CanvasAugment,
                 generator: torch.Generator) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty tensor of shape (N, ...)")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.x = x
        self.augment = augment
        self.generator = generator

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                              int | torch.Tensor]:
        if isinstance(index, torch.Tensor) and index.dim() == 1:
            v1, v2 = two_views(self.x[index], self.augment, self.generator)
            return v1, v2, index
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of size {len(self)}")
        i %= len(self)
        v1, v2 = two_views(self.x[i:i + 1], self.augment, self.generator)
        return v1[0], v2[0], i


def index_batches(n: int, batch_size: int, generator: torch.Generator,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    """One epoch of shuffled sample indices in batches of ``batch_size`` (LongTensors).

    Every index in ``range(n)`` appears exactly once (the last batch may be smaller unless
    ``drop_last``).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    n, batch_size = int(n), int(batch_size)
    perm = torch.randperm(n, generator=generator, device=generator.device).cpu()
    n_full = (n // batch_size) * batch_size if drop_last else n
    return (perm[start:start + batch_size] for start in range(0, n_full, batch_size))
