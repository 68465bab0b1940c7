"""DOPPLER's low-pass filter and DiSK's Kalman filter as standalone components."""

import numpy as np
import pytest
import torch

from optfm.privacy import PRESETS, KalmanFilter, LowPassFilter


@pytest.mark.parametrize("name", list(PRESETS))
def test_unit_dc_gain_constant_input_returned_from_t0(name):
    f = LowPassFilter.preset(name)
    for _ in range(50):
        g = [torch.full((4,), 3.0, dtype=torch.float64)]
        f.step(g)
        assert torch.allclose(g[0], torch.full((4,), 3.0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert f.impulse_response(20000).sum() == pytest.approx(1.0, abs=1e-6)


def test_a9b1_equals_adams_bias_corrected_first_moment():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(10))
    adam = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    f = LowPassFilter.preset("a9b1")
    for t in range(1, 30):
        g = torch.randn(10, generator=gen)
        p.grad = g.clone()
        adam.step()
        mine = [g.clone()]
        f.step(mine)
        m_hat = adam.state[p]["exp_avg"] / (1 - 0.9**t)
        assert torch.allclose(mine[0], m_hat, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["a9b1", "a9b1505", "a72b0505", "cheby2"])
def test_filtered_white_noise_variance_is_sum_of_squared_impulse_response(name):
    f = LowPassFilter.preset(name)
    gen = torch.Generator().manual_seed(1)
    steps = 400 if name != "cheby2" else 1500  # cheby2's poles are close to 1: longer transient
    n = 20000
    for _ in range(steps):
        g = [torch.randn(n, generator=gen, dtype=torch.float64)]
        f.step(g)
    h = f.impulse_response(steps)
    assert g[0].var().item() == pytest.approx(float((h**2).sum()), rel=0.05)
    assert float((h**2).sum()) < 0.1  # the point of the filter: ≥ 10x less noise variance


def test_filter_state_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(2)
    seq = [[torch.randn(3, generator=gen), torch.randn(2, 2, generator=gen)] for _ in range(10)]
    a, b = LowPassFilter.preset("a72b0505"), LowPassFilter.preset("a72b0505")
    for g in seq[:4]:
        a.step([x.clone() for x in g])
    b.load_state_dict(a.state_dict())
    for g in seq[4:]:
        ga, gb = [x.clone() for x in g], [x.clone() for x in g]
        a.step(ga)
        b.step(gb)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    with pytest.raises(ValueError, match="different filter"):
        LowPassFilter.preset("a9b1").load_state_dict(a.state_dict())


def test_buffer_counts():
    params = [torch.zeros(5), torch.zeros(2, 3)]
    for name, expected in (("a9b1", 1), ("a9b1505", 2), ("a72b0505", 3), ("cheby2", 4)):
        f = LowPassFilter.preset(name)
        f.step([p.clone() for p in params])
        assert f.n_a + f.n_b == expected
        assert len(f.buffers()) == expected * len(params)
    k = KalmanFilter()
    k.step([p.clone() for p in params])
    k.before_update(params)
    assert len(k.buffers()) == 2 * len(params)


@pytest.mark.parametrize(("a", "b", "msg"), [
    ([1.0, -0.9], [0.2], "unit DC gain"),
    ([2.0, -0.9], [0.1], r"a\[0\] must be 1"),
    ([1.0, -1.5], [-0.5], "unstable"),
    ([1.0, -0.9], [0.0, 0.1], r"b\[0\] must be non-zero"),
    ([1.0], [float("nan")], "finite"),
])
def test_invalid_coefficients(a, b, msg):
    with pytest.raises(ValueError, match=msg):
        LowPassFilter(a, b)
    with pytest.raises(ValueError, match="unknown preset"):
        LowPassFilter.preset("butter")


@pytest.mark.parametrize(("kappa", "gamma", "msg"), [
    (0.0, 0.5, "kappa must be in"), (1.2, 0.5, "kappa must be in"), (0.7, 0.0, "gamma must be > 0"),
    (0.7, -1.0, "gamma must be > 0"), (float("nan"), 0.5, "kappa"),
])
def test_invalid_kalman_parameters(kappa, gamma, msg):
    with pytest.raises(ValueError, match=msg):
        KalmanFilter(kappa, gamma)


def test_kalman_c_and_evaluation_count():
    assert KalmanFilter(0.7, 0.5).c == pytest.approx(0.3 / 0.35)
    assert KalmanFilter(0.7, 0.5).evaluations == 2
    assert KalmanFilter.one_evaluation(0.7).c == 1.0
    assert KalmanFilter.one_evaluation(0.7).evaluations == 1
    assert KalmanFilter(1.0, 0.5).c == 0.0 and KalmanFilter(1.0, 0.5).evaluations == 1
    with pytest.raises(ValueError, match="one-evaluation"):
        KalmanFilter.one_evaluation(1.0)


def test_kalman_update_rule():
    k = KalmanFilter(0.25, 1.0)
    g0, g1 = [torch.tensor([4.0])], [torch.tensor([8.0])]
    k.step(g0)
    assert g0[0].item() == 4.0  # m_0 = g̃_0
    k.step(g1)
    assert g1[0].item() == pytest.approx(0.75 * 4.0 + 0.25 * 8.0)
    x = [torch.tensor([1.0])]
    k.before_update(x)
    x[0] += 2.0
    k.after_update(x)
    k.extrapolate_(x)
    assert x[0].item() == pytest.approx(3.0 + 1.0 * 2.0)
    state = k.state_dict()
    k2 = KalmanFilter(0.25, 1.0)
    k2.load_state_dict(state)
    assert k2.t == 2 and np.allclose(k2.buffers()[0].numpy(), k.buffers()[0].numpy())
