"""``optfm bench advunlearn``: every row present, finite and positive; the AdvUnlearn / ESD ratio
grows with the number of attack steps and the fast (sign) attack costs about one attack step
(loose checks: timings on shared machines are noisy)."""

import math

import pytest

from optfm.bench import advunlearn as ba
from optfm.bench import get_benchmark

LO, HI = 1, 12


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in ba.bench_advunlearn(repeats=1, attack_steps=(HI, LO),
                                                   ddim_steps=6)}


def test_registered_and_every_row_present_positive_finite(rows):
    assert get_benchmark("advunlearn")[1] is ba.bench_advunlearn
    assert list(rows) == [ba.ROW_STEPS.format(k=LO), ba.ROW_STEPS.format(k=HI), ba.ROW_FAST,
                          ba.ROW_MARGINAL]
    for r in rows.values():
        assert r.benchmark == "advunlearn" and r.target is None and r.unit == "s"
        assert r.measured >= 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio >= 0
    assert rows[ba.ROW_MARGINAL].measured > 0
    assert "torch threads" in rows[ba.ROW_STEPS.format(k=LO)].note


def test_ratio_grows_with_attack_steps_and_fast_is_about_one_step(rows):
    lo, hi = rows[ba.ROW_STEPS.format(k=LO)].ratio, rows[ba.ROW_STEPS.format(k=HI)].ratio
    assert hi > 1.2 * lo  # 11 more attack steps: expected ~1.5-2x
    assert hi > 1.1
    fast = rows[ba.ROW_FAST].ratio
    assert 0.5 * lo < fast < lo + 0.5 * (hi - lo)  # loose: fast ≈ the 1-step row


def test_stop_seed_draws_the_requested_stop_index():
    import torch

    for steps, stop in ((6, None), (20, 3)):
        g = torch.Generator().manual_seed(ba.stop_seed(steps, stop))
        want = steps // 2 if stop is None else stop
        assert int(torch.randint(0, steps, (1,), generator=g)) == want


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attack_steps"):
        ba.bench_advunlearn(1, attack_steps=(5,))
    with pytest.raises(ValueError, match="repeats"):
        ba.bench_advunlearn(0)
