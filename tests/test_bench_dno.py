"""``optfm bench dno``: rows on a tiny UNet, the memory tracker on known allocations, peak memory
flat in the number of steps with gradient checkpointing (and growing without), and that
checkpointing does not change DNO's gradient.

Timing ratios are not asserted beyond being finite and positive (too noisy on shared machines).
"""

import math

import pytest
import torch

from optfm.bench import dno as bd
from optfm.bench import get_benchmark

TINY = {"block_out_channels": (8, 16), "norm_num_groups": 4}
LO, HI = 2, 8


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in bd.bench_dno(repeats=1, steps=(HI, LO), batch_size=2,
                                            model_kwargs=TINY)}


def test_registered_and_every_row_present_positive_finite(rows):
    assert get_benchmark("dno")[1] is bd.bench_dno
    names = []
    for s in (LO, HI):
        names += [bd.ROW_TIME.format(mode=bd.CKPT, steps=s),
                  bd.ROW_TIME.format(mode=bd.NO_CKPT, steps=s), bd.ROW_MEM.format(steps=s)]
    names += [bd.ROW_MEM_GROWTH.format(hi=HI, lo=LO, mode=bd.CKPT),
              bd.ROW_MEM_GROWTH.format(hi=HI, lo=LO, mode=bd.NO_CKPT),
              bd.ROW_HYBRID.format(k=bd.HYBRID_K, steps=LO), bd.ROW_REG.format(steps=HI)]
    assert list(rows) == names
    for r in rows.values():
        assert r.benchmark == "dno" and r.target is None
        assert r.measured > 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
        assert r.unit in ("s", "bytes")
    assert "torch threads" in rows[names[0]].note


def test_checkpointed_memory_is_flat_in_steps_and_plain_memory_grows(rows):
    ck = rows[bd.ROW_MEM_GROWTH.format(hi=HI, lo=LO, mode=bd.CKPT)]
    plain = rows[bd.ROW_MEM_GROWTH.format(hi=HI, lo=LO, mode=bd.NO_CKPT)]
    assert ck.ratio < 1.3  # 4x the steps
    assert plain.ratio > 2.0
    assert rows[bd.ROW_MEM.format(steps=HI)].ratio < 0.5


def test_tracker_counts_new_storages_not_views_or_inputs():
    x = torch.zeros(1000)

    def fn():
        y = torch.ones(2000)  # 8000 bytes, alive with z
        z = y * 2  # 8000 bytes
        x.add_(1)  # in place: nothing new
        _ = x.view(10, 100).t()  # views: nothing new
        del y, z
        w = torch.empty(500)  # 2000 bytes, after y and z are freed
        return w

    assert bd.peak_new_tensor_bytes(fn) == 16000
    assert bd.peak_new_tensor_bytes(lambda: x.add_(1)) == 0


def test_checkpointing_does_not_change_the_gradient():
    unet = bd.build_unet(TINY)
    grads = []
    for ck in (True, False):
        dno = bd.make_dno(unet, 4, checkpointing=ck, batch_size=2)
        g, rec = dno.compute_gradient()
        assert g.abs().sum() > 0
        grads.append((g, rec["samples"]))
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)


def test_bad_steps_raise():
    with pytest.raises(ValueError, match="steps"):
        bd.bench_dno(1, steps=(4,))
