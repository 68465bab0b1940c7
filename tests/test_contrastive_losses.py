"""Tests for optfm.contrastive.losses: NT-Xent, SogCLR, EMC² MH sampler, exact GCL."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest, chisquare

from optfm.contrastive.losses import EMC2State, SogCLRState, exact_gcl, nt_xent_loss


def _views(b: int, d: int, seed: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g)
    z2 = z1 + 0.5 * torch.randn(b, d, generator=g)
    return z1.requires_grad_(grad), z2.requires_grad_(grad)


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("b,tau", [(2, 0.1), (8, 0.1), (16, 0.5)])
def test_nt_xent_matches_pytorch_metric_learning(b: int, tau: float) -> None:
    from pytorch_metric_learning.losses import NTXentLoss

    z1, z2 = _views(b, 6, seed=b)
    labels = torch.arange(b).repeat(2)
    ref = NTXentLoss(temperature=tau)(torch.cat([z1, z2]), labels)
    ours = nt_xent_loss(z1, z2, temperature=tau)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- SogCLR


def test_sogclr_matches_libauc_gcloss_v1() -> None:
    contrastive = pytest.importorskip(
        "libauc.losses.contrastive", reason="libauc not installed (pip install --no-deps libauc)"
    )
    n, b, d = 20, 6, 5
    with contextlib.redirect_stdout(io.StringIO()):
        ref = contrastive.GCLoss_v1(N=n, tau=0.1, gamma=0.9, device=torch.device("cpu"))
    ours = SogCLRState(n, gamma=0.9, temperature=0.1)
    index = torch.tensor([3, 7, 0, 19, 11, 5])
    # First call initialises u (libauc: gamma=1 when u[index] is all zero), second uses gamma.
    for seed in (0, 1):
        z1, z2 = _views(b, d, seed, grad=True)
        r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        loss_ours = ours.loss(z1, z2, index)
        loss_ref = ref(r1, r2, index)
        loss_ours.backward()
        loss_ref.backward()
        assert torch.allclose(loss_ours, loss_ref, atol=1e-5)
        assert torch.allclose(z1.grad, r1.grad, atol=1e-5)
        assert torch.allclose(z2.grad, r2.grad, atol=1e-5)
        assert torch.allclose(ours.u, ref.u.view(-1), atol=1e-5, rtol=1e-5)


def test_sogclr_u_initialisation_and_update_by_hand() -> None:
    tau, gamma = 0.5, 0.9
    state = SogCLRState(10, gamma=gamma, temperature=tau)
    b = 3
    index = torch.tensor([1, 4, 8])

    def g_by_hand(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        g = torch.zeros(2 * b)
        for r in range(2 * b):
            vals = [torch.exp(z[r] @ z[c] / tau) for c in range(2 * b) if c % b != r % b]
            g[r] = torch.stack(vals).mean()
        return g

    z1, z2 = _views(b, 4, seed=3)
    state.loss(z1, z2, index)
    g = g_by_hand(z1, z2)
    u_first = (g[:b] + g[b:]) / 2
    assert torch.allclose(state.u[index], u_first, atol=1e-6)
    assert state.seen[index].all() and int(state.seen.sum()) == 3
    assert torch.all(state.u[[0, 2, 3, 5, 6, 7, 9]] == 0)

    # Mixed batch: samples 1, 4 seen (moving average), 9 new (per-sample initialisation).
    index2 = torch.tensor([1, 4, 9])
    z1, z2 = _views(b, 4, seed=4)
    state.loss(z1, z2, index2)
    g = g_by_hand(z1, z2)
    prev = torch.cat([u_first[:2], torch.zeros(1)]).repeat(2)
    seen = torch.tensor([True, True, False]).repeat(2)
    u_view = torch.where(seen, (1 - gamma) * prev + gamma * g, g)
    assert torch.allclose(state.u[index2], (u_view[:b] + u_view[b:]) / 2, atol=1e-6)
    assert state.u[8] == u_first[2]


def test_sogclr_surrogate_gradient_is_weighted_contrast() -> None:
    """At the first visit the weights are exp(s/τ)/g, so the loss gradient equals that of
    (1/b) Σ_r τ·log mean exp(s/τ) − s_pos (the GCL of the batch)."""
    tau, b = 0.2, 4
    z1, z2 = _views(b, 5, seed=7, grad=True)
    SogCLRState(10, temperature=tau).loss(z1, z2, torch.arange(b)).backward()
    g_ours = torch.cat([z1.grad, z2.grad])
    a1, a2 = _views(b, 5, seed=7, grad=True)
    z = F.normalize(torch.cat([a1, a2]), dim=1)
    sim = z @ z.T
    rows = torch.arange(2 * b)
    pos = (rows + b) % (2 * b)
    mask = torch.ones(2 * b, 2 * b, dtype=torch.bool)
    mask[rows, rows] = False
    mask[rows, pos] = False
    lse = torch.logsumexp((sim / tau).masked_fill(~mask, float("-inf")), dim=1)
    ((tau * lse - sim[rows, pos]).sum() / b).backward()
    assert torch.allclose(g_ours, torch.cat([a1.grad, a2.grad]), atol=1e-5)


def test_sogclr_state_dict_round_trip() -> None:
    state = SogCLRState(12)
    z1, z2 = _views(4, 3, seed=1)
    state.loss(z1, z2, torch.tensor([0, 5, 6, 11]))
    other = SogCLRState(12)
    other.load_state_dict(state.state_dict())
    assert torch.equal(other.u, state.u) and torch.equal(other.seen, state.seen)
    z1, z2 = _views(4, 3, seed=2)
    idx = torch.tensor([0, 1, 6, 11])
    assert torch.equal(state.loss(z1, z2, idx), other.loss(z1, z2, idx))
    with pytest.raises(ValueError, match="state_dict"):
        SogCLRState(13).load_state_dict(state.state_dict())


# ---------------------------------------------------------------- EMC²


def _fixed_embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_emc2_mh_step_chain_matches_softmax() -> None:
    """Fixed embeddings; each iteration gives anchor 0 one i.i.d. uniform proposal (batch {0, o}),
    and the chain is advanced by the state after the first valid proposal of the scan. This is
    exactly MH with an independent uniform proposal, so its law is π_0(j) ∝ exp(β<z_0, z_j>)."""
    n, d, beta = 8, 4, 3.0
    emb = _fixed_embeddings(n, d, 0)
    g = torch.Generator().manual_seed(0)
    state = EMC2State(n, beta=beta, burn_in=0.0)
    draws = []
    n_iter, warm = 4000, 50
    for it in range(n_iter + warm):
        o = int(torch.randint(1, n, (1,), generator=g))
        index = torch.tensor([0, o])
        z = emb[index]
        neg = state.sample_negatives(torch.cat([z, z]), index, generator=g)
        x = int(neg.sample_ids[0, 0, 1])  # state after the first valid proposal (position 1)
        state.cur_idx[0] = x
        state.cur_score[0] = emb[0] @ emb[x]
        if it >= warm:
            draws.append(x)
    counts = np.bincount(draws, minlength=n)
    assert counts[0] == 0
    pi = torch.softmax(beta * (emb[1:] @ emb[0]).double(), dim=0).numpy()
    assert chisquare(counts[1:], pi * n_iter).pvalue > 0.01, (counts, pi * n_iter)


def test_emc2_acceptance_probability_is_metropolis_hastings() -> None:
    n, d, beta, reps = 6, 4, 2.0, 3000
    emb = _fixed_embeddings(n, d, 1)
    g = torch.Generator().manual_seed(1)
    for x, o in [(1, 2), (2, 1), (3, 5)]:
        prob = min(1.0, float(torch.exp(beta * (emb[0] @ emb[o] - emb[0] @ emb[x]))))
        index = torch.tensor([0, o])
        z = torch.cat([emb[index], emb[index]])
        hits = 0
        for _ in range(reps):
            state = EMC2State(n, beta=beta, burn_in=0.0)
            state.cur_idx[0], state.cur_score[0] = x, emb[0] @ emb[x]
            hits += int(state.sample_negatives(z, index, generator=g).sample_ids[0, 0, 1] == o)
        if prob == 1.0:
            assert hits == reps
        else:
            assert binomtest(hits, reps, prob).pvalue > 0.01, (x, o, hits / reps, prob)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "The spec's in-batch scan proposes the same sample several times per iteration (both views, "
        "both anchor views); repeated proposals are not an exact MH step, so with fixed embeddings "
        "the long-run law of the full scan is flatter than π (known bias, reported)."
    ),
)
def test_emc2_full_scan_chain_matches_softmax() -> None:
    n, d, beta, b = 8, 4, 3.0, 4
    emb = _fixed_embeddings(n, d, 0)
    g = torch.Generator().manual_seed(0)
    state = EMC2State(n, beta=beta, burn_in=0.5)
    draws = []
    n_iter, warm = 2000, 50
    for it in range(n_iter + warm):
        index = torch.cat([torch.tensor([0]), torch.randint(1, n, (b - 1,), generator=g)])
        z = emb[index]
        state.sample_negatives(torch.cat([z, z]), index, generator=g)
        if it >= warm:
            draws.append(int(state.cur_idx[0]))
    counts = np.bincount(draws, minlength=n)
    pi = torch.softmax(beta * (emb[1:] @ emb[0]).double(), dim=0).numpy()
    assert chisquare(counts[1:], pi * n_iter).pvalue > 0.01


def test_emc2_never_accepts_self_or_positive() -> None:
    n, b, d = 30, 6, 8
    g = torch.Generator().manual_seed(1)
    state = EMC2State(n, beta=50.0, burn_in=0.0)
    for _ in range(200):
        index = torch.randperm(n, generator=g)[:b]
        z1, z2 = _views(b, d, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        z2 = z1 + 1e-3 * z2  # positive would be by far the best proposal
        neg = state.sample_negatives(torch.cat([z1, z2]), index, generator=g)
        anchors = index[None, :, None].expand_as(neg.sample_ids)
        assert neg.mask.any(dim=-1).all()
        assert not (neg.sample_ids[neg.mask] == anchors[neg.mask]).any()
        assert (state.cur_idx[index] != index).all()
        assert 0.0 <= state.last_acceptance_rate <= 1.0
    seen = state.cur_idx >= 0
    assert (state.cur_idx[seen] != torch.arange(n)[seen]).all()


def test_emc2_burn_in_counts_and_recorded_states() -> None:
    b, n = 5, 10
    state = EMC2State(n, beta=1.0, burn_in=0.5)
    z1, z2 = _views(b, 3, seed=2)
    index = torch.arange(b)
    neg = state.sample_negatives(torch.cat([z1, z2]), index, torch.Generator().manual_seed(0))
    # 2(b-1) = 8 valid proposals per view, 4 burn-in, 4 recorded.
    assert neg.mask.sum(dim=-1).eq(b - 1).all()
    # First view of a fresh chain accepts its first valid proposal.
    assert neg.extra_indices.numel() == 0
    owner = torch.cat([index, index])
    assert torch.equal(owner[neg.positions[neg.mask]], neg.sample_ids[neg.mask])
    assert 0.0 < neg.acceptance_rate <= 1.0
    assert neg.acceptance_rate == state.last_acceptance_rate


def test_emc2_loss_gradient_and_embed_fn() -> None:
    n, d, beta = 12, 5, 2.0
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, d, generator=g)
    calls: list[torch.Tensor] = []

    def embed_fn(idx: torch.Tensor) -> torch.Tensor:
        calls.append(idx.clone())
        return base[idx]

    index = torch.tensor([0, 1, 8, 9])
    z1 = base[index].clone().requires_grad_()
    z2 = (base[index] + 0.1).requires_grad_()

    def fresh_state() -> EMC2State:
        # Chains of 0 and 1 sit on samples 2, 3 (not in the batch) with a stale score so high
        # that nothing is accepted: their recorded negatives need a fresh forward pass.
        state = EMC2State(n, beta=beta, burn_in=0.0)
        state.cur_idx[[0, 1]] = torch.tensor([2, 3])
        state.cur_score[[0, 1]] = 1e9
        return state

    with pytest.raises(ValueError, match="embed_fn"):
        fresh_state().loss(z1, z2, index, None, generator=g)
    state = fresh_state()
    loss = state.loss(z1, z2, index, embed_fn, generator=g)
    assert len(calls) == 1 and set(calls[0].tolist()) == {2, 3}
    assert state.cur_idx[0] == 2 and state.cur_idx[1] == 3
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    # Gradients flow into the freshly embedded negatives as well.
    base.requires_grad_()
    fresh_state().loss(z1, z2, index, embed_fn, generator=g).backward()
    assert base.grad[[2, 3]].abs().sum() > 0


def test_emc2_loss_value_by_hand() -> None:
    b, d, beta = 3, 4, 2.0
    z1, z2 = _views(b, d, seed=5)
    index = torch.tensor([0, 1, 2])
    state = EMC2State(5, beta=beta, burn_in=0.5)
    st2 = EMC2State(5, beta=beta, burn_in=0.5)
    neg = st2.sample_negatives(torch.cat([z1, z2]), index, torch.Generator().manual_seed(9))
    loss = state.loss(z1, z2, index, generator=torch.Generator().manual_seed(9))
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for a in range(2):
        for r in range(b):
            anc = z[a * b + r]
            posv = z[(1 - a) * b + r]
            ks = neg.positions[a, r][neg.mask[a, r]]
            total += beta * (-(anc @ posv) + torch.stack([anc @ z[k] for k in ks]).mean())
    assert torch.allclose(loss, total / (2 * b), atol=1e-6)
    assert torch.equal(state.cur_idx, st2.cur_idx)


def test_emc2_state_dict_round_trip() -> None:
    state = EMC2State(10, beta=5.0)
    z1, z2 = _views(4, 3, seed=1)
    idx = torch.tensor([0, 2, 4, 6])
    state.sample_negatives(torch.cat([z1, z2]), idx, torch.Generator().manual_seed(0))
    other = EMC2State(10, beta=5.0)
    other.load_state_dict(state.state_dict())
    n1 = state.sample_negatives(torch.cat([z2, z1]), idx, torch.Generator().manual_seed(1))
    n2 = other.sample_negatives(torch.cat([z2, z1]), idx, torch.Generator().manual_seed(1))
    assert torch.equal(n1.sample_ids, n2.sample_ids) and torch.equal(n1.mask, n2.mask)
    assert torch.equal(state.cur_idx, other.cur_idx)
    with pytest.raises(ValueError, match="state_dict"):
        EMC2State(11).load_state_dict(state.state_dict())


# ---------------------------------------------------------------- exact GCL


def test_exact_gcl_matches_loop_and_closed_form_gradient() -> None:
    n, v, d, tau = 4, 2, 3, 0.5
    beta = 1 / tau
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, v, d, generator=g, dtype=torch.float64), dim=-1)
    z.requires_grad_()
    value = exact_gcl(z, tau, normalize=False)
    zz = z.detach()
    loop = 0.0
    for i in range(n):
        for a in range(v):
            negs = [zz[j, c] for j in range(n) if j != i for c in range(v)]
            lse = torch.logsumexp(torch.stack([beta * zz[i, a] @ x for x in negs]), 0)
            loop += -beta * zz[i, a] @ zz[i, 1 - a] + lse
    loop /= n * v
    assert torch.allclose(value, loop, atol=1e-12)
    value.backward()
    # Closed form: anchor term -β z_i' + β E_{π_i^a} z_j, plus the positive and negative roles.
    grad = torch.zeros_like(zz)
    for i in range(n):
        for a in range(v):
            keys = [(j, c) for j in range(n) if j != i for c in range(v)]
            pi = torch.softmax(torch.stack([beta * zz[i, a] @ zz[j, c] for j, c in keys]), 0)
            grad[i, a] += -beta * zz[i, 1 - a] + beta * sum(
                p * zz[j, c] for p, (j, c) in zip(pi, keys)
            )
            grad[i, 1 - a] += -beta * zz[i, a]
            for p, (j, c) in zip(pi, keys):
                grad[j, c] += beta * p * zz[i, a]
    grad /= n * v
    assert torch.allclose(z.grad, grad, atol=1e-10)


def test_exact_gcl_normalises_inside() -> None:
    z = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(exact_gcl(3 * z), exact_gcl(F.normalize(z, dim=-1), normalize=False))


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error_naming_parameter() -> None:
    z1, z2 = _views(4, 3, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, temperature=0.0)
    with pytest.raises(ValueError, match="z2"):
        nt_xent_loss(z1, z2[:3])
    with pytest.raises(ValueError, match="z1"):
        nt_xent_loss(z1[:1], z2[:1])
    with pytest.raises(ValueError, match="gamma"):
        SogCLRState(10, gamma=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SogCLRState(10, temperature=-1.0)
    with pytest.raises(ValueError, match="n "):
        SogCLRState(1)
    with pytest.raises(ValueError, match="index"):
        SogCLRState(10).loss(z1, z2, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="index"):
        SogCLRState(10).loss(z1, z2, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="index"):
        SogCLRState(10).loss(z1, z2, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="beta"):
        EMC2State(10, beta=0.0)
    with pytest.raises(ValueError, match="burn_in"):
        EMC2State(10, burn_in=1.0)
    with pytest.raises(ValueError, match="z_all_views"):
        EMC2State(10).sample_negatives(torch.randn(5, 3), torch.arange(2))
    with pytest.raises(ValueError, match="index"):
        EMC2State(10).sample_negatives(torch.randn(4, 3), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="z_views"):
        exact_gcl(torch.randn(3, 1, 4))


def _emc2_run(scan: str, steps: int = 6) -> list:
    """A few iterations with duplicates in the batch and chains carried over (some not in batch)."""
    n, b, d = 30, 6, 4
    state = EMC2State(n, beta=3.0, burn_in=0.5, scan=scan)
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(steps):
        index = torch.randint(0, n, (b,), generator=g)
        index[1] = index[0]  # a duplicate
        z = torch.randn(2 * b, d, generator=g)
        if t == 3:  # stale high scores: nothing accepted, carried-over states get recorded
            state.cur_score[index] = 1e9
        neg = state.sample_negatives(z, index, g)
        out.append((neg, state.cur_idx.clone(), state.cur_score.clone()))
    return out


def test_emc2_numba_and_numpy_scans_agree() -> None:
    pytest.importorskip("numba", reason="numba is the optional fast path (optfm[fast])")
    for (n1, i1, s1), (n2, i2, s2) in zip(_emc2_run("numba"), _emc2_run("numpy"), strict=True):
        for f in ("positions", "mask", "extra_indices", "weights", "sample_ids"):
            assert torch.equal(getattr(n1, f), getattr(n2, f)), f
        assert n1.acceptance_rate == n2.acceptance_rate
        assert torch.equal(i1, i2) and torch.equal(s1, s2)


@pytest.mark.parametrize("scan", ["numpy", "auto"])
def test_emc2_weights_count_the_recorded_positions(scan: str) -> None:
    carried_seen = False
    for neg, _, _ in _emc2_run(scan):
        b = neg.start_ids.numel()
        table = b * 2 + neg.extra_indices.numel()
        expected = torch.zeros(2 * b, table)
        rows = torch.arange(2 * b).view(2, b, 1).expand_as(neg.positions)
        expected.index_put_((rows[neg.mask], neg.positions[neg.mask]),
                            torch.ones(int(neg.mask.sum())), accumulate=True)
        assert (neg.positions[neg.mask] >= 0).all()
        assert torch.equal(neg.weights, expected)
        carried_seen |= neg.extra_indices.numel() > 0
    assert carried_seen


def test_emc2_scan_option_is_checked() -> None:
    with pytest.raises(ValueError, match="scan must be one of"):
        EMC2State(10, scan="cuda")
