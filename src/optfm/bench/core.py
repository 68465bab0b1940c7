"""Benchmark registry, timing and the table format of ``optfm bench``.

A benchmark is a function ``(repeats: int) -> list[BenchRow]``. Each row compares a measured cost
against its baseline **measured in the same process**, so the ratio is meaningful on any machine;
absolute numbers are printed for reference only. Timings are medians over ``repeats`` rounds in
which the measured and baseline functions alternate (so drift in machine load hits both).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BenchRow",
    "UnknownBenchmarkError",
    "benchmark_names",
    "format_table",
    "get_benchmark",
    "register_benchmark",
    "steady_allocator",
    "time_pair",
]


@dataclass
class BenchRow:
    """``ratio = measured / baseline``; ``target`` is the largest acceptable ratio (None: report
    only)."""

    benchmark: str
    name: str
    measured: float
    baseline: float
    unit: str
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.measured / self.baseline if self.baseline else float("inf")

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    def as_dict(self) -> dict[str, object]:
        return {"benchmark": self.benchmark, "name": self.name, "measured": self.measured,
                "baseline": self.baseline, "unit": self.unit, "ratio": self.ratio,
                "target": self.target, "ok": self.ok, "note": self.note}


BenchFn = Callable[[int], list[BenchRow]]
_REGISTRY: dict[str, tuple[str, BenchFn]] = {}


class UnknownBenchmarkError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register_benchmark(name: str, description: str) -> Callable[[BenchFn], BenchFn]:
    """Decorator registering a benchmark function under ``name``."""

    def deco(fn: BenchFn) -> BenchFn:
        if name in _REGISTRY and _REGISTRY[name][1] is not fn:
            raise ValueError(f"benchmark {name!r} is already registered")
        _REGISTRY[name] = (description, fn)
        return fn

    return deco


def benchmark_names() -> list[str]:
    return list(_REGISTRY)


def get_benchmark(name: str) -> tuple[str, BenchFn]:
    """``(description, function)`` of a registered benchmark."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; choose from: {', '.join(_REGISTRY) or '(none)'}, all"
        ) from None


def steady_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    A DP step frees and reallocates a few MiB of per-sample gradients. With glibc's default
    (dynamic) thresholds those blocks are, depending on the allocation history of the process,
    either reused or handed back to the kernel and page-faulted in again at the next step: on this
    model that is ~500 page faults and up to 2x the CPU time of a step, and which of two identical
    optimizers gets the slow pattern depends on the order they were built in, not on their code.
    Setting ``M_MMAP_THRESHOLD`` to 32 MiB (glibc's own upper limit for the dynamic threshold) and
    ``M_TRIM_THRESHOLD`` to 256 MiB makes every step reuse its memory. Process-wide and kept
    afterwards (harmless: the state glibc reaches by itself once a 32 MiB block has been freed).
    Returns whether it was applied (False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 256 * 2**20))


def time_pair(measured: Callable[[], object], baseline: Callable[[], object], *, repeats: int = 7,
              number: int = 20, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of ``measured`` and ``baseline``, interleaved round by round
    (the order alternates between rounds, so neither side always runs first)."""
    if repeats < 1 or number < 1:
        raise ValueError(f"repeats and number must be >= 1, got {repeats}, {number}")
    for _ in range(warmup):
        for _ in range(number):
            measured()
            baseline()
    a, b = [], []
    for i in range(repeats):
        pair = ((measured, a), (baseline, b))
        for fn, acc in (pair if i % 2 == 0 else pair[::-1]):  # ABBA: no first-in-round bias
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            acc.append((time.perf_counter() - t0) / number)
    return statistics.median(a), statistics.median(b)


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.1f} us"
        if v < 1:
            return f"{v * 1e3:.3f} ms"
        return f"{v:.3f} s"
    if unit == "bytes":
        return f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{int(v)} B"
    return f"{v:.4g} {unit}".strip()


def format_table(rows: list[BenchRow]) -> str:
    """A plain-text table of rows (benchmark, row, measured, baseline, ratio, target, ok)."""
    header = ("benchmark", "row", "measured", "baseline", "ratio", "target", "ok")
    body = [
        (r.benchmark, r.name, _fmt(r.measured, r.unit), _fmt(r.baseline, r.unit), f"{r.ratio:.3f}",
         "-" if r.target is None else f"<= {r.target:g}",
         "-" if r.ok is None else ("yes" if r.ok else "NO"))
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    notes = [f"  [{r.name}] {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", "notes:", *notes] if notes else []))
