"""Thread control for many small CPU runs.

Threaded BLAS makes small models much slower (measured ~60x on a 2-core machine), so experiments
run with one intra-op thread unless their config says otherwise. :func:`limit_threads` sets torch's
threads and the BLAS/OpenMP pools used by NumPy, SciPy and scikit-learn (via ``threadpoolctl``), and
restores them on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["limit_threads", "thread_settings"]


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: leave everything as it is)."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    old_env = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # inherited by subprocesses started inside
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)
        if old_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_env


def thread_settings() -> dict[str, object]:
    """The thread settings in force now (for benchmark headers and ``config.json``)."""
    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
    }
