"""Metric logging as JSON lines: one JSON object per line, flushed as written.

A process killed mid-write leaves at most one torn last line, which :func:`read_jsonl` skips.
Resuming from a checkpoint at step k drops records logged after k (``resume_from_step``), so a
resumed run's log has each step once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from optfm.training.io import atomic_write_text, to_jsonable

__all__ = ["MetricLogger", "read_jsonl"]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a torn (unparseable) last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final write from a killed process
            raise
    return out


class MetricLogger:
    """Append metrics to ``path`` as JSON lines.

    ``log(step, **metrics)`` writes ``{"step": step, "wall_s": seconds since creation, **metrics}``.
    With ``resume_from_step=k`` existing records with ``step > k`` are dropped first.
    """

    def __init__(self, path: str | os.PathLike, *, resume_from_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None:
            kept = [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_from_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            # Start fresh unless resuming: a stale log must not look like this run's.
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._t0 = time.perf_counter()

    def log(self, step: int | None = None, **metrics: Any) -> None:
        rec: dict[str, Any] = {}
        if step is not None:
            rec["step"] = int(step)
        rec["wall_s"] = round(time.perf_counter() - self._t0, 6)
        rec.update(to_jsonable(metrics))
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
