"""``optfm bench sltrain``: rows, the deterministic parameter/memory/activation targets, and the
naive-autograd comparison baseline.

Timing targets are not asserted here (too noisy on shared CI machines); ratios must be finite.
"""

import math

import pytest
import torch

from optfm.bench import get_benchmark
from optfm.bench import sltrain as bs
from optfm.pretraining import SLTrainLinear

ROWS = [bs.ROW_PARAMS, bs.ROW_STATIC, bs.ROW_STEP, bs.ROW_ACT, bs.ROW_LAYER, bs.ROW_LOWRANK]
N_FULL, N_SLTRAIN, NNZ = 3_296_000, 1_478_020, 94_852  # the spec's "full" Llama, r=64, δ=0.03


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in bs.bench_sltrain(repeats=1)}


def test_registered_and_every_row_present_positive_finite(rows):
    assert get_benchmark("sltrain")[1] is bs.bench_sltrain
    assert list(rows) == ROWS
    for r in rows.values():
        assert r.benchmark == "sltrain"
        assert r.measured > 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
    assert [rows[n].target for n in ROWS] == [0.50, 0.55, 1.10, 1.05, None, None]
    assert [rows[n].unit for n in ROWS] == ["params", "bytes", "s", "bytes", "bytes", "s"]


def test_parameter_ratio_is_exact_and_meets_target(rows):
    r = rows[bs.ROW_PARAMS]
    assert (r.measured, r.baseline) == (N_SLTRAIN, N_FULL)
    assert r.ok and r.ratio == pytest.approx(0.4484, abs=1e-4)


def test_static_memory_is_16_bytes_per_parameter_plus_buffers_and_meets_target(rows):
    r = rows[bs.ROW_STATIC]
    other = r.baseline - 16 * N_FULL  # the rotary inv_freq buffers, in both models
    assert 0 < other < 1024
    assert r.measured == 16 * N_SLTRAIN + 4 * NNZ + other  # + the int32 index support
    assert r.ok and r.ratio < 0.46
    assert "step counters" in r.note  # the real AdamW state matched the static count


def test_saved_activations_meet_target(rows):
    r = rows[bs.ROW_ACT]
    assert r.ok and r.ratio <= 1.05


def test_single_layer_custom_function_saves_only_the_input(rows):
    r = rows[bs.ROW_LAYER]
    d_in, d_out = bs.LAYER_SHAPE
    x_bytes = bs.BATCH * bs.BLOCK * d_in * 4
    assert r.measured == x_bytes
    assert r.baseline == x_bytes + d_out * d_in * 4 + bs.RANK * d_in * 4  # + dense W + A·s
    assert r.target is None and r.ratio < 1


def test_naive_baseline_computes_the_same_values_and_gradients():
    layer = SLTrainLinear(24, 40, 6, 0.1, 16.0, bias=True, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    out = layer(x)
    grads = torch.autograd.grad(out, params, g)
    out_naive = bs.naive_sltrain_forward(layer, x)
    grads_naive = torch.autograd.grad(out_naive, params, g)
    torch.testing.assert_close(out_naive, out)
    for a, b in zip(grads_naive, grads):
        torch.testing.assert_close(a, b)


def test_build_model_kinds():
    assert sum(p.numel() for p in bs.build_model("lowrank").parameters()) == 1_383_168
    with pytest.raises(ValueError, match="kind must be"):
        bs.build_model("galore")
