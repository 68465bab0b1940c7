"""``optfm bench unlearning``: rows on tiny models, the exact gradient-buffer ratio, and that the
two timed steps compute what they claim (GradDiff: the gradient of -CE_F + CE_R; NGDiff: the
normalized difference d, ‖d‖ <= 2), checked against plain autograd on a copy of the model.

Timing targets are not asserted here (too noisy on shared CI machines); ratios must be finite.
"""

import copy
import math

import pytest
import torch

from optfm.bench import get_benchmark
from optfm.bench import unlearning as bu
from optfm.training.lm import IGNORE_INDEX, lm_loss

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2}
TINY2 = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
         "num_attention_heads": 2}


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in bu.bench_unlearning(repeats=1, sizes=(TINY, TINY2))}


@pytest.fixture(scope="module")
def batches():
    return bu.make_batches()


def test_registered_and_every_row_present_positive_finite(rows):
    assert get_benchmark("unlearning")[1] is bu.bench_unlearning
    small, large = bu.model_label(TINY), bu.model_label(TINY2)
    names = [bu.ROW_STEP.format(model=small), bu.ROW_AUTOLR.format(model=small),
             bu.ROW_GRADS.format(model=small), bu.ROW_PEAK.format(model=small),
             bu.ROW_STEP.format(model=large)]
    assert list(rows) == names
    for r in rows.values():
        assert r.benchmark == "unlearning"
        assert r.measured > 0 and r.baseline > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
    assert [rows[n].target for n in names] == [1.05, 1.25, 2.0, None, 1.05]
    assert [rows[n].unit for n in names] == ["s", "s", "bytes", "bytes", "s"]
    assert "torch threads" in rows[names[0]].note and "direction()" in rows[names[0]].note


def test_gradient_buffers_are_exactly_two_gradients(rows):
    r = rows[bu.ROW_GRADS.format(model=bu.model_label(TINY))]
    n_params = sum(p.numel() for p in bu.build_model(TINY, bu.make_batches()).parameters())
    assert (r.measured, r.baseline) == (8 * n_params, 4 * n_params)
    assert r.ok and r.ratio == 2.0


def test_batches_mask_the_prompt_and_have_fixed_shapes(batches):
    for b in (batches.forget, batches.retain, batches.fit):
        assert b["input_ids"].shape[0] == bu.BATCH
        assert 32 <= b["input_ids"].shape[1] <= 64
        assert bool(b["attention_mask"].all())  # same-length pairs: no padding
        answer = b["labels"] != IGNORE_INDEX
        assert bool(answer.any(dim=1).all()) and not bool(answer[:, 0].any())  # prompt masked
        assert bool((b["labels"][answer] == b["input_ids"][answer]).all())
    assert not torch.equal(batches.forget["input_ids"], batches.retain["input_ids"])


def _grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def _adamw_step(model, grads):
    """A fresh AdamW(lr=LR) step of ``model`` with ``grads``: the reference update."""
    opt = torch.optim.AdamW(model.parameters(), lr=bu.LR)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()


def _dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def test_graddiff_step_is_adamw_on_the_autograd_gradient_of_minus_forget_plus_retain(batches):
    arm = bu.GradDiffArm(TINY, batches)
    ref = copy.deepcopy(arm.model)
    g = _grads(ref, -lm_loss(ref, batches.forget) + lm_loss(ref, batches.retain))
    arm.backward()
    for p, gi in zip(arm.model.parameters(), g):
        torch.testing.assert_close(p.grad, gi, rtol=1e-5, atol=1e-7)
    arm.optimizer.step()
    _adamw_step(ref, g)
    for p, q in zip(arm.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_ngdiff_step_is_adamw_on_the_normalized_gradient_difference(batches):
    arm = bu.NGDiffArm(TINY, batches)
    ref = copy.deepcopy(arm.model)
    g_r = _grads(ref, lm_loss(ref, batches.retain))
    g_f = _grads(ref, lm_loss(ref, batches.forget))
    nr, nf = math.sqrt(_dot(g_r, g_r)), math.sqrt(_dot(g_f, g_f))
    d = [r / nr - f / nf for r, f in zip(g_r, g_f)]
    stats = arm.backward()
    grads = [p.grad for p in arm.model.parameters()]
    for gi, di in zip(grads, d):
        torch.testing.assert_close(gi, di, rtol=1e-4, atol=1e-7)
    norm = math.sqrt(_dot(grads, grads))
    assert norm <= 2 + 1e-6 and stats.direction_norm == pytest.approx(norm, rel=1e-5)
    assert _dot(g_r, grads) >= 0 >= _dot(g_f, grads)  # retain falls, forget rises (first order)
    assert stats.retain_grad_norm == pytest.approx(nr, rel=1e-5)
    arm.optimizer.step()
    _adamw_step(ref, d)
    for p, q in zip(arm.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_autolr_arm_probes_once_per_block_and_restores_the_fit_point(batches):
    arm = bu.AutoLRArm(TINY, batches)
    twin = bu.NGDiffArm(TINY, batches)  # same initial weights, no AutoLR
    arm.step()  # step 0: probe, then the real step at the (possibly changed) lr
    assert len(arm.auto_lr.history) == 1
    probe = arm.auto_lr.history[0]
    assert probe.lr_before == bu.LR
    for group in twin.optimizer.param_groups:
        group["lr"] = probe.lr_after
    twin.step()  # the same step at the probed lr: the probe must have left no trace
    for p, q in zip(arm.model.parameters(), twin.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    arm.run(2 * bu.AUTOLR_PERIOD - 1)
    assert len(arm.auto_lr.history) == 2  # steps 0 and 4 of 8
    assert arm.auto_lr.lr >= bu.AUTOLR_MIN_LR
