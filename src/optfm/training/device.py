"""Device selection and mixed precision: bf16 autocast on CUDA, full precision on CPU."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

__all__ = ["autocast", "resolve_device"]

_ALLOWED = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a ``torch.device``.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA on a machine without it is an
    error, not a silent fallback.
    """
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {', '.join(_ALLOWED)} (or 'cuda:N'), got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available here")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    return torch.device("cpu")


def autocast(device: str | torch.device, *, enabled: bool = True,
             dtype: torch.dtype = torch.bfloat16) -> AbstractContextManager:
    """bf16 autocast on CUDA (when ``enabled``); a no-op context on CPU.

    CPU runs stay in float32 so that small reproductions are exact and comparable.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if enabled and dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()
