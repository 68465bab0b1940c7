import os
import random

import numpy as np
import pytest
import torch

from optfm.training import (
    MetricLogger,
    autocast,
    current_rss_bytes,
    is_quiet,
    limit_threads,
    make_generator,
    minibatch_indices,
    peak_rss_bytes,
    peak_tensor_bytes,
    progress,
    read_jsonl,
    reset_peak_rss,
    resolve_device,
    seed_everything,
    set_quiet,
)


def test_seed_everything_makes_all_rngs_repeatable():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    assert draw() != a


def test_generator_helper_and_seed_validation():
    g1, g2 = make_generator(3), make_generator(3)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    with pytest.raises(ValueError, match="seed must be in"):
        make_generator(-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything(1.5)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_autocast_is_noop_on_cpu():
    with autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_limit_threads_sets_and_restores():
    before = torch.get_num_threads()
    env_before = os.environ.get("OMP_NUM_THREADS")
    with limit_threads(2):
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert torch.get_num_threads() == before
    assert os.environ.get("OMP_NUM_THREADS") == env_before
    with pytest.raises(ValueError, match="threads must be"), limit_threads(0):
        pass


def test_minibatch_indices_cover_epoch_and_follow_generator():
    idx = list(minibatch_indices(10, 3, generator=make_generator(0)))
    assert [len(i) for i in idx] == [3, 3, 3, 1]
    assert sorted(torch.cat(idx).tolist()) == list(range(10))
    again = list(minibatch_indices(10, 3, generator=make_generator(0)))
    assert all(torch.equal(a, b) for a, b in zip(idx, again))
    assert [len(i) for i in minibatch_indices(10, 3, generator=make_generator(0), drop_last=True)] == [3, 3, 3]
    with pytest.raises(ValueError, match="batch_size"):
        list(minibatch_indices(10, 0, generator=make_generator(0)))


def test_metric_logger_round_trip_torn_line_and_resume(tmp_path):
    p = tmp_path / "m.jsonl"
    with MetricLogger(p) as log:
        for s in range(5):
            log.log(step=s, loss=1.0 / (s + 1), acc=np.float32(0.5))
    recs = read_jsonl(p)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[1]["loss"] == 0.5 and recs[0]["acc"] == 0.5 and "wall_s" in recs[0]
    with open(p, "a") as f:
        f.write('{"step": 5, "loss"')  # a write torn by a kill
    assert len(read_jsonl(p)) == 5
    with MetricLogger(p, resume_from_step=2) as log:
        log.log(step=3, loss=0.0)
    assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2, 3]
    MetricLogger(p).close()  # a fresh (non-resumed) logger does not inherit a stale log
    assert read_jsonl(p) == []


def test_progress_is_quiet_off_tty_and_when_asked(monkeypatch):
    monkeypatch.delenv("OPTFM_QUIET", raising=False)
    set_quiet(None)
    assert is_quiet()  # pytest captures stderr: not a TTY
    set_quiet(False)
    try:
        assert not is_quiet()
        bar = progress(range(3))
        assert not bar.disable
        bar.close()
    finally:
        set_quiet(None)
    monkeypatch.setenv("OPTFM_QUIET", "1")
    assert progress(range(3)).disable


def test_rss_baseline_reset_and_peak_tensor_bytes():
    import mmap

    def touch(n: int) -> mmap.mmap:  # fresh anonymous pages (malloc could reuse freed memory)
        m = mmap.mmap(-1, n)
        for i in range(0, n, mmap.PAGESIZE):
            m[i] = 1
        return m

    touch(16 * 2**20).close()  # a peak that the reset forgets
    if reset_peak_rss():  # Linux: the peak restarts from the current RSS
        assert peak_rss_bytes() - current_rss_bytes() < 8 * 2**20
    before = current_rss_bytes()
    m = touch(32 * 2**20)
    assert peak_rss_bytes() - before >= 30 * 2**20
    m.close()

    def work() -> None:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # + 4 MiB alive at once
        del a, b
        torch.ones(256, 1024)  # 1 MiB, after the others were freed

    r = peak_tensor_bytes(work)
    if r is None:
        pytest.skip("torch's memory profiler timeline is unavailable in this torch version")
    assert 8 * 2**20 <= r["peak_bytes"] < 9 * 2**20
    assert sum(r["by_category"].values()) == r["peak_bytes"]
