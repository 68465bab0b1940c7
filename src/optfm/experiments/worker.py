"""Run one arm in a fresh Python process (for per-arm peak-memory measurements).

``run_in_subprocess("pkg.module:function", payload, workdir)`` writes ``payload.json`` to
``workdir``, runs ``python -m optfm.experiments.worker WORKDIR``, which calls
``function(payload)`` and writes its JSON result atomically to ``result.json``; the parent reads
it back. A failing child raises ``RuntimeError`` with the tail of its stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from optfm.training.io import atomic_write_json, read_json

__all__ = ["run_in_subprocess"]


def run_in_subprocess(target: str, payload: dict[str, Any], workdir: str | os.PathLike, *,
                      threads: int = 1) -> dict[str, Any]:
    """Call ``target`` (``"module:function"``) on ``payload`` in a child process."""
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").unlink(missing_ok=True)
    atomic_write_json(d / "payload.json", {"target": target, "payload": payload})
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads))}
    proc = subprocess.run([sys.executable, "-m", "optfm.experiments.worker", str(d)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{target} failed in its subprocess (exit {proc.returncode}):\n{tail}")
    return read_json(d / "result.json")


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m optfm.experiments.worker WORKDIR", file=sys.stderr)
        return 2
    d = Path(argv[0])
    job = json.loads((d / "payload.json").read_text())
    module, _, name = job["target"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    atomic_write_json(d / "result.json", fn(job["payload"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
