"""``optfm bench privacy``: rows, exact filter-state sizes, DiSK peak memory, the tiny-Llama rows
(DP over non-private, hooks vs ghost clipping, full vs LoRA), and the tools behind them.

Timing targets are not asserted here (too noisy on shared CI machines); ratios must be finite.
"""

import math
import re
import warnings

import pytest
import torch

from optfm.bench import get_benchmark
from optfm.bench import privacy as bp
from optfm.data import load_digits_split
from optfm.privacy import KalmanFilter, LowPassFilter

PARAM_BYTES = 9610 * 4  # the digits MLP 64-128-10 in float32

ROWS = [bp.ROW_DOPPLER, bp.ROW_DOPPLER_256, bp.ROW_DISK1, bp.ROW_DISK2, bp.ROW_FACADE,
        bp.ROW_PRICE,
        bp.ROW_MEM_DOPPLER, bp.ROW_MEM_DISK, bp.ROW_PEAK]
LM_TIME = {(m, t): bp.lm_time_row(m, t) for m in bp.LM_MODES for t in bp.LM_TUNINGS}
LM_PEAK = {(m, t): bp.lm_peak_row(m, t) for m in bp.LM_MODES for t in bp.LM_TUNINGS}
LM_PARAMS = {"full": 584_320, "LoRA r=8": 34_816}  # trainable parameters of the bench's tiny Llama


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in bp.bench_privacy(repeats=1)}


@pytest.fixture(scope="module")
def digits():
    d = load_digits_split(random_state=0)
    return d.x_train, d.y_train


def test_registered_and_every_row_present_positive_finite(rows):
    assert get_benchmark("privacy")[1] is bp.bench_privacy
    assert list(rows) == ROWS + bp.ROWS_LM
    assert sorted(bp.ROWS_LM) == sorted([*LM_TIME.values(), *LM_PEAK.values()])
    for r in rows.values():
        assert r.benchmark == "privacy"
        assert r.measured > 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
    assert [rows[n].target for n in ROWS] == [1.05, 1.05, 1.10, 2.1, 1.02, None, 1.0, 2.0, 0.99]
    assert all(rows[n].unit == "s" for n in ROWS[:6])
    assert all(rows[n].unit == "bytes" for n in ROWS[6:])
    assert all(rows[n].target is None for n in bp.ROWS_LM)  # report only
    assert all(rows[n].unit == "s" for n in LM_TIME.values())
    assert all(rows[n].unit == "bytes" for n in LM_PEAK.values())


def test_filter_state_is_exactly_the_papers_multiple_of_the_parameters(rows):
    doppler, disk = rows[bp.ROW_MEM_DOPPLER], rows[bp.ROW_MEM_DISK]
    assert doppler.baseline == disk.baseline == PARAM_BYTES
    assert doppler.measured == 1 * PARAM_BYTES  # a9b1: n_a + n_b = 1 + 0
    assert disk.measured == 2 * PARAM_BYTES     # m and d
    assert doppler.ok and disk.ok


@pytest.mark.parametrize("preset,multiple", [("a9b1", 1), ("a9b1505", 2), ("a72b0505", 3)])
def test_doppler_state_bytes_equal_n_a_plus_n_b_parameter_copies(digits, preset, multiple):
    x, y = digits
    filt = LowPassFilter.preset(preset)
    assert filt.n_a + filt.n_b == multiple
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = bp._private(x, y, 64, "sgd", filt)
        bp._warm(s, steps=2)
    assert bp.parameter_bytes(s.model) == PARAM_BYTES
    assert bp.filter_state_bytes(filt) == multiple * PARAM_BYTES
    assert len(filt.buffers()) == multiple * 4  # 4 parameter tensors


def test_disk_peak_is_below_the_stashing_baseline(rows):
    r = rows[bp.ROW_PEAK]
    full_set = bp.MEMORY_BATCH * PARAM_BYTES  # one full set of per-sample gradients
    assert r.measured < r.baseline
    # ours never holds two full sets; the stashing baseline does during the second evaluation
    assert full_set < r.measured < 2 * full_set <= r.baseline
    assert r.ok


def test_lm_dp_steps_cost_more_than_non_private_steps(rows):
    """Per-sample gradients (hooks) or a second backward pass (ghost) on top of the same step.
    The operator counts in the notes are exact: DP adds work on every side, ghost clipping more
    than hooks (its second backward pass). Times are noisy on a shared machine (measured 1.8-2.7 x
    for ghost and for hooks with full fine-tuning, 1.0-1.9 x for hooks with LoRA, whose per-sample
    gradients are small, over six-round runs under load), so only the first three are asserted
    > 1, and hooks with LoRA through its operator count."""
    ops = {}
    for (mode, tuning), name in LM_TIME.items():
        r = rows[name]
        m = re.search(r"ATen ops/step (\d+) vs (\d+)", r.note)
        ops[mode, tuning] = (int(m[1]), int(m[2]))
        assert ops[mode, tuning][0] > 1.3 * ops[mode, tuning][1], (name, ops[mode, tuning])
        assert f"{LM_PARAMS[tuning]:,} trainable parameters" in r.note and "torch threads" in r.note
        if (mode, tuning) != ("hooks", "LoRA r=8"):
            assert r.ratio > 1, (name, r.measured, r.baseline)
    for tuning in bp.LM_TUNINGS:
        assert ops["ghost", tuning][0] > ops["hooks", tuning][0]
        assert ops["ghost", tuning][1] == ops["hooks", tuning][1]
    # the same non-private baseline for both modes of one tuning
    for tuning in bp.LM_TUNINGS:
        assert rows[LM_TIME["hooks", tuning]].baseline == rows[LM_TIME["ghost", tuning]].baseline


def test_lm_peaks_ghost_saves_per_sample_memory_in_full_fine_tuning_lora_needs_none(rows):
    """Deterministic (memory, not time): measured 52.41 (hooks) and 24.62 (ghost) vs 22.39 MiB
    (Adam) for full fine-tuning; 16.80 and 16.93 vs 16.80 MiB with LoRA."""
    peak = {k: rows[n] for k, n in LM_PEAK.items()}
    full_set = bp.LM_BATCH * LM_PARAMS["full"] * 4  # one full set of per-sample gradients
    hooks, ghost = peak["hooks", "full"], peak["ghost", "full"]
    assert hooks.baseline == ghost.baseline
    # hooks mode holds a full set of per-sample gradients on top of what Adam needs ...
    assert hooks.measured > hooks.baseline + 0.75 * full_set
    # ... ghost clipping never forms them: its peak is within 15 % of non-private Adam's
    assert ghost.measured < 0.6 * hooks.measured
    assert ghost.baseline <= ghost.measured < 1.15 * ghost.baseline
    for mode in bp.LM_MODES:
        lora = peak[mode, "LoRA r=8"]
        assert lora.measured < 0.75 * peak[mode, "full"].measured  # frozen base: no per-sample memory
        assert lora.baseline < peak[mode, "full"].baseline        # no Adam moments for the base
        assert lora.ratio < 1.05                                   # LoRA DP peak ~ LoRA Adam peak


def test_lm_peak_counts_state_and_step_allocations():
    """The peak of a non-private step is the state between steps plus what the step allocates;
    the state is parameters + Adam's two moments (+ the batch and the rotary buffer)."""
    s = bp._LMSetup(None, None)
    for _ in range(2):
        s.step()
    state, peak = s.peak_bytes()
    params = LM_PARAMS["full"] * 4
    assert 3 * params <= state < 3 * params + 2**16
    logits = bp.LM_BATCH * bp.LM_SEQ * bp.LM_VOCAB * 4
    assert peak > state + logits  # the step holds at least the logits


def test_make_private_step_dispatches_exactly_the_ops_of_an_opacus_step(digits):
    """The façade adds nothing: the same ATen operator calls, one by one, as plain Opacus."""
    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, opacus = bp._private(x, y, 64, "sgd", None), bp._opacus(x, y, 64)
        bp._warm(ours, opacus)
        assert bp.count_ops(ours.step) == bp.count_ops(opacus.step)
        doppler = bp._private(x, y, 64, "sgd", LowPassFilter.preset("a9b1"))
        bp._warm(doppler)
        extra = bp.count_ops(doppler.step) - bp.count_ops(ours.step)
    # post-processing only: no extra matrix products (evaluations) or noise draws, a few
    # element-wise ops per parameter tensor
    assert not [op for op in extra if any(k in op for k in ("mm", "matmul", "normal"))]
    assert 0 < sum(extra.values()) <= 6 * 4


def test_disk_second_evaluation_adds_no_peak_memory_over_dp_adam(digits):
    x, y = digits
    peaks = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, filt in (("dp-adam", None), ("disk", KalmanFilter(0.7, 0.5))):
            s = bp._private(x, y, bp.MEMORY_BATCH, "adam", filt)
            bp._warm(s, steps=2)
            s.optimizer.zero_grad(set_to_none=True)
            peaks[name] = bp.peak_step_bytes(s.step)
    assert peaks["disk"] <= 1.01 * peaks["dp-adam"]


def test_live_storage_tracker_counts_allocations_once_and_frees():
    with bp.LiveStorageTracker() as tr:
        a = torch.zeros(1000)                 # 4000 B
        b = a + 1                             # 4000 B
        v = b.view(10, 100)                   # a view: nothing new
        assert tr.current == 8000
        a.add_(1)                             # in place: nothing new
        assert tr.current == 8000
        del a
        assert tr.current == 4000
        del b                                 # still referenced through the view
        assert tr.current == 4000
        del v
        assert tr.current == 0
    assert tr.peak == 8000
    pre = torch.ones(500)                     # allocated before the mode: never counted
    with bp.LiveStorageTracker() as tr:
        pre.mul_(2)
        pre[:10].zero_()
    assert tr.peak == 0


def test_live_storage_tracker_sees_the_backward_pass():
    w = torch.randn(100, 50, requires_grad=True)
    x = torch.randn(64, 100)
    with bp.LiveStorageTracker() as tr:
        (x @ w).tanh().sum().backward()
    # forward keeps tanh's output (64x50) for backward; w.grad (100x50) survives the step
    assert tr.peak >= (64 * 50 + 100 * 50) * 4
    assert tr.current == 100 * 50 * 4


def test_stash_baseline_computes_the_same_disk_update(digits):
    """The comparison baseline is the same algorithm: with equal seeds, equal parameters."""
    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = bp._private(x, y, 64, "adam", KalmanFilter(0.7, 0.5))
        stash = bp._private(x, y, 64, "adam", KalmanFilter(0.7, 0.5), step=bp.stash_disk_step)
        for _ in range(4):
            ours.step()
            stash.step()
    for p, q in zip(ours.model.parameters(), stash.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ours.optimizer.filter.t == stash.optimizer.filter.t == 4


def test_stash_baseline_refuses_single_evaluation_filters(digits):
    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = bp._private(x, y, 64, "adam", KalmanFilter.one_evaluation(0.7), step=bp.stash_disk_step)
    with pytest.raises(ValueError, match="two-evaluation"):
        s.step()
