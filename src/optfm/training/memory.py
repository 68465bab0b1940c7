"""Memory measurements that work on CPU and GPU.

- :func:`saved_activation_bytes`: bytes of the tensors autograd saves for backward during a
  forward pass, excluding the module's own parameters and buffers (which exist anyway), measured
  with ``torch.autograd.graph.saved_tensors_hooks``. ``tracemalloc`` does not see torch
  allocations; this does.
- :func:`peak_rss_bytes`: the process's peak resident set size (``VmHWM`` on Linux, else
  ``ru_maxrss``). Meaningful per process: measure one method per subprocess.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["peak_rss_bytes", "saved_activation_bytes"]


def saved_activation_bytes(module: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes saved for backward by ``forward()`` (which should call ``module``), counting each
    storage once and skipping storages of ``module``'s parameters and buffers."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen and ptr != 0:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


