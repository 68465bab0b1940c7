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


def time_pair(measured: Callable[[], object], baseline: Callable[[], object], *, repeats: int = 7,
              number: int = 20, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of ``measured`` and ``baseline``, interleaved round by round."""
    if repeats < 1 or number < 1:
        raise ValueError(f"repeats and number must be >= 1, got {repeats}, {number}")
    for _ in range(warmup):
        for _ in range(number):
            measured()
            baseline()
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((measured, a), (baseline, b)):
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
