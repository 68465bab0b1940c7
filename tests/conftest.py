"""Shared test setup: one intra-op thread (small models run far faster), a private cache dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep built corpora and cached models out of the user's ~/.cache during tests."""
    if "OPTFM_CACHE" not in os.environ:
        os.environ["OPTFM_CACHE"] = str(tmp_path_factory.mktemp("optfm-cache"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m optfm ARGS`` in a subprocess, quietly, with one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTFM_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "optfm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(worker: Path, out: Path, *, nproc: int = 2, timeout: float = 300) -> list[dict]:
    """Run ``worker --out OUT`` under ``torchrun --nproc_per_node nproc`` (gloo, CPU, loopback),
    retrying once if the free port was taken in between; return each rank's ``rank{R}.json``."""
    def launch() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(worker), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=worker.parent.parent)

    res = launch()
    if res.returncode != 0 and "address already in use" in (res.stdout + res.stderr).lower():
        res = launch()
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert [r["rank"] for r in results] == list(range(nproc))
    return results
