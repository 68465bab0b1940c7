"""``optfm bench attention``: rows on tiny lengths, and that every timed arm computes its kernel on
the same input, weights and output cotangent.

Timing ratios are not asserted beyond being finite and positive (too noisy on shared machines).
"""

import math

import pytest
import torch

from optfm.attention import attention_scores
from optfm.bench import attention as ba
from optfm.bench import benchmark_names, get_benchmark

LENGTHS = (8, 16)
TOKENS = 32


@pytest.fixture(scope="module")
def rows():
    return ba.bench_attention(repeats=1, lengths=LENGTHS, tokens=TOKENS, round_s=0.0)


def test_registered_and_every_row_present_finite(rows):
    assert "attention" in benchmark_names()
    assert get_benchmark("attention")[1] is ba.bench_attention
    names = []
    for n in LENGTHS:
        names += [ba.ROW_TIME.format(arm="gaussian", L=n),
                  ba.ROW_TIME.format(arm="gaussian normalize_rows", L=n),
                  ba.ROW_SDPA.format(L=n)]
    big = max(LENGTHS)
    names += [ba.ROW_PEAK.format(measured="gaussian", baseline="softmax", L=big),
              ba.ROW_PEAK.format(measured="gaussian normalize_rows", baseline="softmax", L=big),
              ba.ROW_PEAK.format(measured="softmax attention_scores", baseline="SDPA", L=big)]
    assert [r.name for r in rows] == names
    for r in rows:
        assert r.benchmark == "attention" and r.target is None and r.ok is None
        assert r.unit == ("bytes" if "peak" in r.name else "s")
        assert r.measured > 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
    assert "torch threads" in rows[0].note
    assert "0 of" in rows[0].note  # the underflow check ran and found no dead row
    assert "whole benchmark" in rows[-1].note


def test_peak_memory_rows(rows):
    by = {r.name: r for r in rows}
    big = max(LENGTHS)
    g = by[ba.ROW_PEAK.format(measured="gaussian", baseline="softmax", L=big)]
    gn = by[ba.ROW_PEAK.format(measured="gaussian normalize_rows", baseline="softmax", L=big)]
    s = by[ba.ROW_PEAK.format(measured="softmax attention_scores", baseline="SDPA", L=big)]
    assert g.baseline == gn.baseline == s.measured  # the same softmax measurement
    assert g.measured > g.baseline  # the Gaussian kernel keeps more (B, H, L, L) tensors
    b = TOKENS // big
    assert f"({b}, {ba.NUM_HEADS}, {big}, {big})" in g.note


def test_without_memory_rows():
    rows = ba.bench_attention(repeats=1, lengths=(4,), tokens=8, round_s=0.0, memory=False)
    assert [r.name for r in rows] == [ba.ROW_TIME.format(arm="gaussian", L=4),
                                      ba.ROW_TIME.format(arm="gaussian normalize_rows", L=4),
                                      ba.ROW_SDPA.format(L=4)]


def test_arms_share_input_weights_and_compute_their_kernels():
    case = ba.build_case(16, tokens=TOKENS)
    assert case.x.shape == (TOKENS // 16, 16, ba.EMBED_DIM) and case.x.requires_grad
    ref = case.layers["softmax"].state_dict()
    for arm in ("gaussian", "gaussian normalize_rows"):
        layer = case.layers[arm]
        assert layer is not case.layers["softmax"]
        for k, v in layer.state_dict().items():
            assert torch.equal(v, ref[k])
    assert case.layer("SDPA") is case.layers["softmax"]

    sm = case.layers["softmax"]
    b, n, _ = case.x.shape
    h, d = sm.num_heads, sm.head_dim
    with torch.no_grad():
        q = sm.W_Q(case.x).view(b, n, h, d).transpose(1, 2)
        k = sm.W_K(case.x).view(b, n, h, d).transpose(1, 2)
        v = sm.W_V(case.x).view(b, n, h, d).transpose(1, 2)

        def expected(kernel, normalize=False):
            s = attention_scores(q, k, kernel=kernel, normalize_rows=normalize)
            return sm.W_O((s @ v).transpose(1, 2).reshape(b, n, h * d))

        outs = {arm: case.forward(arm) for arm in ba.ARMS}
    torch.testing.assert_close(outs["softmax"], expected("softmax"))
    torch.testing.assert_close(outs["gaussian"], expected("gaussian"))
    torch.testing.assert_close(outs["gaussian normalize_rows"], expected("gaussian", True))
    torch.testing.assert_close(outs["SDPA"], outs["softmax"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["gaussian"], outs["softmax"])  # really different kernels
    assert not torch.allclose(outs["gaussian normalize_rows"], outs["gaussian"])


@pytest.mark.parametrize("arm", ba.ARMS)
def test_step_returns_the_gradients_of_the_output_cotangent(arm):
    case = ba.build_case(8, tokens=16)
    layer = case.layer(arm)
    grads = case.step(arm)()
    params = list(layer.parameters())
    assert len(grads) == len(params) + 1
    x = case.x.detach().clone().requires_grad_(True)
    out = ba.sdpa_attention(layer, x) if arm == "SDPA" else layer(x)
    loss = (out * case.grad_out).sum()
    ref = torch.autograd.grad(loss, [*params, x])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in params)  # nothing accumulates between timed calls


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        ba.bench_attention(repeats=0, lengths=(4,), tokens=8)
    with pytest.raises(ValueError, match="lengths"):
        ba.bench_attention(repeats=1, lengths=(), tokens=8)
    with pytest.raises(ValueError, match="length"):
        ba.build_case(0)
    with pytest.raises(ValueError, match="arm"):
        ba.build_case(4, tokens=8).layer("linear")
