"""Memory measurements that work on CPU and GPU.

- :func:`saved_activation_bytes`: bytes of the tensors autograd saves for backward during a
  forward pass, excluding the module's own parameters and buffers (which exist anyway), measured
  with ``torch.autograd.graph.saved_tensors_hooks``. ``tracemalloc`` does not see torch
  allocations; this does.
- :func:`peak_rss_bytes`: the process's peak resident set size (``VmHWM`` on Linux, else
  ``ru_maxrss``). Meaningful per process: measure one method per subprocess.
- :func:`current_rss_bytes` and :func:`reset_peak_rss`: to measure what a piece of work *adds*,
  take ``current_rss_bytes()`` after the imports and data loading, reset the peak to it
  (Linux ≥ 4.0: writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current RSS),
  do the work, and subtract: ``peak_rss_bytes() - baseline``. Without the reset (other systems)
  the peak also covers whatever happened before the baseline (import-time transients).
- :func:`peak_tensor_bytes`: the peak of live tensor bytes during a call (one training step),
  by category (parameters, optimizer state, activations, gradients, ...), from torch's memory
  profiler: what the tensors need, without the allocator's slack and the framework's own memory
  that RSS also contains (the CPU counterpart of ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["current_rss_bytes", "peak_rss_bytes", "peak_tensor_bytes", "reset_peak_rss",
           "saved_activation_bytes"]


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


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``; on systems without ``/proc``, the peak
    so far, ``ru_maxrss``, which is an upper bound)."""
    v = _status_bytes("VmRSS")
    return v if v is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the peak RSS (``VmHWM``) to the current RSS; ``False`` where the OS does not allow
    it (non-Linux, or Linux < 4.0), in which case :func:`peak_rss_bytes` keeps the old peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


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




@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (C++ log lines bypass Python)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no real fd 2
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_tensor_bytes(fn: Callable[[], Any], *, device: str = "cpu") -> dict[str, Any] | None:
    """Run ``fn()`` under ``torch.profiler`` (memory profiling) and return the peak of live tensor
    bytes on ``device``: ``{"peak_bytes": int, "by_category": {"parameter": ..., "optimizer_state":
    ..., "input": ..., "temporary": ..., "activation": ..., "gradient": ..., "autograd_detail": ...,
    "unknown": ...}}`` at the moment of the peak. Categories are torch's own (tensors existing
    before the call are counted once they are used). Uses the profiler's memory timeline, a
    private torch API (torch >= 2.1): returns ``None`` where it is unavailable. ``fn`` runs once,
    with profiling overhead; run it on a warmed-up model so lazily created state exists."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline
    except ImportError:  # pragma: no cover - depends on the torch version
        return None
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = profile(activities=activities, profile_memory=True, record_shapes=True,
                       with_stack=True)
        with _quiet_stderr():  # the profiler's C++ start/stop notices
            prof.start()
        try:
            fn()
        finally:
            with _quiet_stderr():
                prof.stop()
        try:
            _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
        except Exception:  # pragma: no cover - private API changed
            return None
    if not sizes:
        return {"peak_bytes": 0, "by_category": {}}
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    by = {("unknown" if c is None else c.name.lower()): int(sizes[at][i + 1])
          for c, i in _CATEGORY_TO_INDEX.items()}
    return {"peak_bytes": int(totals[at]), "by_category": by}
