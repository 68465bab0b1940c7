import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from optfm.training.io import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    read_json,
    to_jsonable,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def test_exception_mid_write_keeps_old_file(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write('{"half": ')
        raise RuntimeError("crash")
    assert read_json(p) == {"ok": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_killed_writer_never_exposes_partial_file(tmp_path):
    """SIGKILL a process in the middle of a write: the destination keeps its old content."""
    p = tmp_path / "f.txt"
    atomic_write_text(p, "complete")
    code = (
        "import sys, time\n"
        "from optfm.training.io import atomic_open\n"
        f"with atomic_open({str(p)!r}, 'w') as f:\n"
        "    f.write('partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert p.read_text() == "complete"


def test_to_jsonable_converts_arrays_and_nonfinite():
    out = to_jsonable({"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": (1, float("nan")),
                       "d": math.inf})
    assert out == {"a": 1.5, "b": [1, 2], "c": [1, None], "d": None}
    with pytest.raises(TypeError, match="cannot convert"):
        to_jsonable(object())


def test_atomic_open_rejects_append_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be"), atomic_open(tmp_path / "x", "a"):
        pass


def test_atomic_file_is_fsynced_and_renamed_in_same_directory(tmp_path):
    p = tmp_path / "f.txt"
    t0 = time.time()
    atomic_write_text(p, "x")
    assert os.stat(p).st_mtime >= t0 - 1


def test_atomic_write_dir_renames_complete_dirs_and_keeps_a_winner(tmp_path):
    from optfm.training.io import atomic_write_dir

    def write(tmp):
        (tmp / "a.txt").write_text("one")
        (tmp / "settings.json").write_text("{}")

    out = atomic_write_dir(tmp_path / "entry", write)
    assert (out / "a.txt").read_text() == "one"

    def second(tmp):
        (tmp / "a.txt").write_text("two")

    atomic_write_dir(tmp_path / "entry", second)  # an existing complete entry wins
    assert (out / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temp dir left behind

    def broken(tmp):
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists() and [p.name for p in tmp_path.iterdir()] == ["entry"]
