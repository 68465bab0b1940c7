"""Alignment losses: hand-computed values and the special cases the spec pins."""

from __future__ import annotations

import math

import pytest
import torch

from optfm.alignment import aihf_loss, bt_reward_loss, dpo_loss, nll_loss, spin_loss


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _lp(seed: int, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 20) for _ in range(4)]


def test_dpo_hand_values():
    pc, pr = torch.tensor([-5.0, -8.0]), torch.tensor([-7.0, -6.0])
    rc, rr = torch.tensor([-6.0, -8.0]), torch.tensor([-6.0, -7.0])
    beta = 0.5
    # margins: ((-5+6) - (-7+6)) = 2 ; ((-8+8) - (-6+7)) = -1
    want = -(math.log(_sig(beta * 2)) + math.log(_sig(beta * -1))) / 2
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert cr.tolist() == pytest.approx([0.5, 0.0]) and rj.tolist() == pytest.approx([-0.5, 0.5])
    hinge, *_ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx((max(0, 1 - 1.0) + max(0, 1 + 0.5)) / 2)
    lin, *_ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="linear")
    assert lin.item() == pytest.approx(-(1.0 - 0.5) / 2)


def test_reference_gets_no_gradient_and_policy_gradient_sign():
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in _lp(0))
    loss, *_ = dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert rc.grad is None and rr.grad is None
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise chosen, lower rejected


def test_bt_and_nll_hand_values():
    assert bt_reward_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        -math.log(_sig(2.0)))
    lp, n = torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 1.0])
    assert nll_loss(lp, n).item() == pytest.approx(8 / 4)
    assert nll_loss(lp, n, reduction="sequence_mean").item() == pytest.approx(4.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "linear"])
def test_spin_is_dpo_on_real_vs_generated_pairs(loss_type):
    real, gen, ref_real, ref_gen = _lp(1)
    a = spin_loss(real, gen, ref_real, ref_gen, beta=0.3, loss_type=loss_type)
    b = dpo_loss(real, gen, ref_real, ref_gen, beta=0.3, loss_type=loss_type)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_aihf_special_cases():
    pref = tuple(_lp(2))
    sp = tuple(_lp(3))
    nll = torch.tensor(1.7)
    dpo = dpo_loss(*pref, beta=0.2)[0]
    spin = spin_loss(*sp, beta=0.2)[0]
    for form in ("nll", "self_play"):  # w_D = 0: DPO
        assert aihf_loss(form=form, w_demo=0, w_pref=1, beta=0.2, pref=pref).item() == \
            pytest.approx(dpo.item())
    # w_P = 0: IRFT (self-play) / SFT (nll)
    assert aihf_loss(form="self_play", w_demo=1, w_pref=0, beta=0.2, self_play=sp).item() == \
        pytest.approx(spin.item())
    assert aihf_loss(form="nll", w_demo=2, w_pref=0, demo_nll=nll).item() == pytest.approx(3.4)
    # both: the weighted sum (λ = w_D/w_P up to the overall scale)
    both = aihf_loss(form="self_play", w_demo=0.5, w_pref=2.0, beta=0.2, pref=pref, self_play=sp)
    assert both.item() == pytest.approx(2.0 * dpo.item() + 0.5 * spin.item(), rel=1e-6)


def test_losses_reject_bad_input():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0)
    with pytest.raises(ValueError, match="beta"):
        spin_loss(a, a, a, a, beta=-1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(a, a, a, a, loss_type="ipo")
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(a, torch.zeros(2), a, a)
    with pytest.raises(ValueError, match="empty response"):
        nll_loss(a, torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="both 0"):
        aihf_loss(form="nll", w_demo=0, w_pref=0)
    with pytest.raises(ValueError, match="form"):
        aihf_loss(form="joint", pref=(a, a, a, a))
    with pytest.raises(ValueError, match="needs pref"):
        aihf_loss(form="nll", w_demo=0, w_pref=1)
