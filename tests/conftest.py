"""Shared test setup: one intra-op thread (small models run far faster), a private cache dir."""

from __future__ import annotations

import os
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
