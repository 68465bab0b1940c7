"""``optfm bench contrastive``: rows on a tiny random data set, exact state bytes, and that the
benchmarked iterations compute the library's losses on their views and take an Adam step.

Timing ratios are not asserted beyond being finite and positive (too noisy on shared machines).
"""

import copy
import math

import pytest
import torch

from optfm.bench import contrastive as bc
from optfm.bench import get_benchmark
from optfm.contrastive import EMC2State, SogCLRState, nt_xent_loss

N = 24
BATCHES = (4, 8)


def _x(n: int = N) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def rows():
    return {r.name: r for r in bc.bench_contrastive(repeats=1, batch_sizes=BATCHES, x=_x(),
                                                    iters_per_round=8)}


def test_registered_and_every_row_present_finite(rows):
    assert get_benchmark("contrastive")[1] is bc.bench_contrastive
    names = []
    for b in BATCHES:
        names += [bc.ROW_TIME.format(method="SogCLR", b=b), bc.ROW_TIME.format(method="EMC²", b=b),
                  bc.ROW_ACCEPT.format(b=b)]
    names += [bc.ROW_STATE.format(method=m, d=64) for m in bc.METHODS]
    assert list(rows) == names
    for b in BATCHES:
        for m in ("SogCLR", "EMC²"):
            r = rows[bc.ROW_TIME.format(method=m, b=b)]
            assert r.unit == "s" and r.target == bc.TARGET
            assert r.measured > 0 and r.baseline > 0 and math.isfinite(r.ratio)
        acc = rows[bc.ROW_ACCEPT.format(b=b)]
        assert acc.target is None and 0.0 < acc.measured <= 1.0
    assert "torch threads" in rows[names[0]].note


def test_state_bytes_exact(rows):
    for n in (2, 24, 1437):
        assert bc.state_bytes(bc.make_state("SimCLR", n)) == 0
        assert bc.state_bytes(bc.make_state("SogCLR", n)) == n * (4 + 1)  # u float32 + seen bool
        assert bc.state_bytes(bc.make_state("EMC²", n)) == n * (8 + 4)  # int64 index + f32 score
    per_sample = {"SimCLR": 0, "SogCLR": 5, "EMC²": 12}
    for m in bc.METHODS:
        r = rows[bc.ROW_STATE.format(method=m, d=64)]
        assert r.unit == "bytes" and r.target is None
        assert r.measured == per_sample[m] and r.baseline == 64 * 4
        assert f"{per_sample[m] * N} B" in r.note
    with pytest.raises(ValueError, match="method"):
        bc.make_state("MoCo", 4)


@pytest.mark.parametrize("method", bc.METHODS)
def test_iteration_computes_the_library_loss_and_steps(method):
    """The timed step's loss is the library loss on the same batch, views and (EMC²) uniforms,
    and Adam changes the weights."""
    x = _x()
    it = bc.ContrastiveIteration(method, bc.build_model(), x, 8, torch.Generator().manual_seed(3))
    it()  # past the first visit: SogCLR's moving average and EMC²'s chains are in use
    twin_model = copy.deepcopy(it.model)
    twin_state = copy.deepcopy(it.state)
    twin_gen = torch.Generator().set_state(it.generator.get_state())
    twin = bc.ContrastiveIteration(method, twin_model, x, 8, twin_gen)
    twin._batches = copy.deepcopy(list(it._batches))
    it._batches = iter(copy.deepcopy(twin._batches))
    twin._batches = iter(twin._batches)
    before = [p.detach().clone() for p in it.model.parameters()]

    loss = it()

    idx, v1, v2 = twin.next_batch()
    z1, z2 = twin_model(v1), twin_model(v2)
    if method == "SimCLR":
        expected = nt_xent_loss(z1, z2, temperature=bc.TEMPERATURE)
    elif method == "SogCLR":
        assert isinstance(twin_state, SogCLRState)
        expected = twin_state.loss(z1, z2, idx)
    else:
        assert isinstance(twin_state, EMC2State)
        expected = twin_state.loss(z1, z2, idx, embed_fn=lambda i: twin_model(x[i]),
                                   generator=twin_gen)
    assert math.isfinite(loss)
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    assert any(not torch.equal(b, p) for b, p in zip(before, it.model.parameters()))


def test_emc2_embed_fn_is_a_forward_pass_with_gradient():
    """Recorded carried-over states outside the batch are embedded by a real forward pass of the
    un-augmented samples (a sharp β and no burn-in make such states frequent on 12 samples)."""
    x = _x(12)
    it = bc.ContrastiveIteration("EMC²", bc.build_model(), x, 4, torch.Generator().manual_seed(0))
    it.state = EMC2State(12, beta=100.0, burn_in=0.0)
    seen = []
    embed = it.embed

    def spy(ids):
        z = embed(ids)
        with torch.no_grad():
            torch.testing.assert_close(z.detach(), it.model(x[ids]), rtol=0, atol=0)
        seen.append((ids.clone(), z))
        return z

    it.embed = spy
    for _ in range(20):
        it()
    assert it.embed_calls == len(seen) > 0 and it.embed_rows == sum(len(i) for i, _ in seen)
    for ids, z in seen:
        assert z.requires_grad and z.shape == (len(ids), 64)
        assert set(ids.tolist()) <= set(range(12))
