import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optfm.models import count_parameters, tiny_llama
from optfm.pretraining import (
    LowRankLinear,
    SLTrainConfig,
    SLTrainFunction,
    SLTrainLinear,
    apply_lowrank,
    apply_sltrain,
    merge_sltrain,
    random_support,
)
from optfm.training import load_checkpoint, save_checkpoint, saved_activation_bytes


def _layer(in_f=12, out_f=9, rank=3, density=0.2, seed=0, dtype=torch.float64, bias=True):
    m = SLTrainLinear(in_f, out_f, rank, density, alpha=6.0, bias=bias,
                      generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():  # B = 0 at init; make the low-rank part non-trivial for the checks
        m.B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return m


def test_init_follows_the_paper():
    m = SLTrainLinear(64, 32, 8, 0.03, alpha=16.0, generator=torch.Generator().manual_seed(0))
    assert torch.all(m.B == 0)
    assert m.nnz == math.floor(0.03 * 64 * 32) == 61
    assert m.index.dtype == torch.int32 and len(torch.unique(m.index)) == 61
    assert torch.all(m.index[1:] > m.index[:-1]) and int(m.index.min()) >= 0 and int(m.index.max()) < 64 * 32
    assert m.A.abs().max() <= 1 / 8 and m.values.abs().max() <= 1 / 8
    dense = torch.zeros(32 * 64)
    dense[m.index.long()] = m.values.detach()
    assert torch.equal(m.dense_weight(), dense.view(32, 64))  # W = S at init
    assert m.scaling == 2.0


def test_random_support_is_uniform_and_seeded():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(100)
    for _ in range(2000):
        counts[random_support(100, 10, generator=g).long()] += 1
    assert counts.sum() == 20000
    # each position is chosen with probability 0.1: 200 ± 3·sqrt(200·0.9)
    assert (counts - 200).abs().max() < 45
    a = random_support(10**6, 300, generator=torch.Generator().manual_seed(5))
    b = random_support(10**6, 300, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(torch.unique(a)) == 300
    assert random_support(2**31 + 5, 3, generator=g).dtype == torch.int64
    with pytest.raises(ValueError, match="nnz must be"):
        random_support(10, 11, generator=g)


def test_gradcheck_float64():
    m = _layer()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, B, A, v, b: SLTrainFunction.apply(x, B, A, v, m.index, b, m.scaling),
        (x, m.B, m.A, m.values, m.bias))


def test_matches_dense_autograd_reference_forward_and_all_gradients():
    m = _layer(dtype=torch.float32, in_f=40, out_f=24, rank=6, density=0.1)
    x = torch.randn(3, 7, 40, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ours = [x.grad.clone(), m.B.grad.clone(), m.A.grad.clone(), m.values.grad.clone(), m.bias.grad.clone()]

    x2 = x.detach().clone().requires_grad_()
    B, A, v, b = (t.detach().clone().requires_grad_() for t in (m.B, m.A, m.values, m.bias))
    S = torch.zeros(24 * 40).index_put((m.index.long(),), v).view(24, 40)  # differentiable scatter
    W = B @ (A * m.scaling) + S
    y2 = F.linear(x2, W, b)
    (y2 * g).sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    for a, r in zip(ours, [x2.grad, B.grad, A.grad, v.grad, b.grad]):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)


class _NaiveSLTrain(nn.Module):
    """Plain autograd through the same arithmetic (what the custom Function avoids)."""

    def __init__(self, m: SLTrainLinear):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        W = m.B @ (m.A * m.scaling)
        W = W.view(-1).index_add(0, m.index, m.values).view(m.out_features, m.in_features)
        return F.linear(x, W, m.bias)


def test_saved_activation_bytes_equal_dense_linear_and_naive_saves_more():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 256)
    dense = nn.Linear(256, 512)
    sl = SLTrainLinear(256, 512, 64, 0.03, generator=torch.Generator().manual_seed(0))
    naive = _NaiveSLTrain(sl)
    b_dense = saved_activation_bytes(dense, lambda: dense(x.requires_grad_()))
    b_sl = saved_activation_bytes(sl, lambda: sl(x))
    b_naive = saved_activation_bytes(naive, lambda: naive(x))
    assert b_dense == x.numel() * 4
    assert abs(b_sl - b_dense) <= 0.05 * b_dense
    # the naive graph keeps the dense W (512x256) and A·s alive until backward
    assert b_naive >= b_dense + 512 * 256 * 4


def test_support_fixed_across_steps_and_checkpoints(tmp_path):
    m = SLTrainLinear(32, 16, 4, 0.1, generator=torch.Generator().manual_seed(3))
    idx = m.index.clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        m(torch.randn(4, 32)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(m.index, idx)
    assert "index" in m.state_dict()
    save_checkpoint(tmp_path / "c.safetensors", model=m, optimizer=opt, step=5)
    other = SLTrainLinear(32, 16, 4, 0.1, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(other.index, idx)
    load_checkpoint(tmp_path / "c.safetensors", model=other)
    assert torch.equal(other.index, idx) and torch.equal(other.values, m.values)
    assert torch.equal(other.dense_weight(), m.dense_weight())


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"rank": 0}, "rank must be"), ({"rank": 20}, "rank must be <="), ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"), ({"alpha": -1.0}, "alpha"), ({"alpha": float("inf")}, "alpha"),
    ({"density": 1e-4}, "leaves no sparse entry"),
])
def test_bad_hyperparameters(kwargs, msg):
    args = {"in_features": 16, "out_features": 16, "rank": 4, "density": 0.03, "alpha": 8.0} | kwargs
    with pytest.raises(ValueError, match=msg):
        SLTrainLinear(**args)
    if "rank" in kwargs and kwargs["rank"] == 0:
        with pytest.raises(ValueError, match="rank"):
            SLTrainConfig(rank=0)


def _llama():
    torch.manual_seed(0)
    return tiny_llama(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)


def test_apply_sltrain_to_llama_replaces_projections_only():
    model = _llama()
    full = count_parameters(model)
    apply_sltrain(model, SLTrainConfig(rank=16, density=0.03, alpha=32))
    names = [n for n, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    assert len(names) == 2 * 7
    assert all(n.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert count_parameters(model) < full
    ids = torch.randint(0, 257, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"no nn\.Linear module"):
        apply_sltrain(nn.Sequential(nn.Linear(2, 2)), SLTrainConfig(rank=1))


def test_merge_gives_identical_logits_and_exports(tmp_path):
    model = apply_sltrain(_llama(), SLTrainConfig(rank=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 257, (2, 16))
    for _ in range(3):  # move B away from 0 so the low-rank part matters
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    merge_sltrain(model)
    assert not any(isinstance(m, SLTrainLinear) for m in model.modules())
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    model.save_pretrained(tmp_path / "export")
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, after, atol=1e-5)


def test_lowrank_baseline():
    m = LowRankLinear(20, 10, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 20)
    assert torch.allclose(m(x), x @ m.dense_weight().t() + m.bias, atol=1e-6)
    assert count_parameters(m) == 4 * 30 + 10
    model = apply_lowrank(_llama(), 8)
    assert sum(isinstance(mm, LowRankLinear) for mm in model.modules()) == 14
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 5)  # rank > min(in, out)
