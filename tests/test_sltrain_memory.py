"""Closed-form and module memory accounting (``optfm.pretraining.memory``).

Tolerances for the spec's paper-scale figures: the spec quotes rounded numbers ("≈48%",
"≈15.2 GB"), so a convention that reproduces a figure must land within half a unit of its last
quoted digit (±0.5 percentage points, ±0.05 GB). That is tighter than needed to tell the candidate
conventions apart (they differ by ≥ 0.9 pp or ≥ 0.26 GB), and looser would hide a wrong convention.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optfm.models.factories import count_parameters
from optfm.pretraining.memory import (
    GB,
    LLAMA_SIZES,
    LlamaSize,
    ModelShapes,
    module_static_bytes,
    optimizer_state_bytes,
    paper_claims,
    paper_scale_markdown,
    paper_scale_table,
    parameter_breakdown,
    static_memory_bytes,
)

PAPER = {"weight_bytes": 2, "grad_bytes": 0, "optimizer": "adam"}  # weights + bf16 Adam states
WITH_GRADS = {"weight_bytes": 2, "optimizer": "adam"}  # + bf16 gradients
EIGHT_BIT = {"weight_bytes": 2, "optimizer": "adam8bit"}


# ------------------------------------------------------------------ paper-scale arithmetic

def test_parameter_counts_match_the_papers():
    # GaLore/SLTrain tables: full rank 58M / 134M / 368M / 1339M / 6.74B; SLTrain 44M / 97M /
    # 194M / 646M.
    full = {k: static_memory_bytes(k, "full").num_parameters / 1e6 for k in LLAMA_SIZES}
    assert [round(v) for v in full.values()] == [58, 134, 368, 1339, 6738]
    sl = {k: static_memory_bytes(k, "sltrain").num_parameters / 1e6 for k in LLAMA_SIZES}
    assert [round(sl[k]) for k in ("60M", "130M", "350M", "1B")] == [44, 97, 194, 646]


def test_1b_ratios():
    f, s = (static_memory_bytes("1B", m, **PAPER) for m in ("full", "sltrain"))
    assert 100 * s.num_parameters / f.num_parameters == pytest.approx(48, abs=0.5)
    assert 100 * s.total / f.total == pytest.approx(52, abs=0.5)
    assert f.total / GB == pytest.approx(8.03, abs=0.005)  # 1339.08M × 6 B
    # Counting gradients as well does not give the spec's 52% (50.9%): the figure uses the
    # papers' weights + optimizer-states convention.
    fg, sg = (static_memory_bytes("1B", m, **WITH_GRADS) for m in ("full", "sltrain"))
    assert 100 * sg.total / fg.total == pytest.approx(50.9, abs=0.05)


def test_7b_figures():
    full = static_memory_bytes("7B", "full", **WITH_GRADS)
    assert full.total == full.num_parameters * 8
    assert full.total / GB == pytest.approx(53.9, abs=0.05)
    assert full.total / 2**30 == pytest.approx(50.2, abs=0.05)  # not GiB
    sl = static_memory_bytes("7B", "sltrain", grad_bytes=0, **EIGHT_BIT)
    sl32 = static_memory_bytes("7B", "sltrain", grad_bytes=0, index_bytes=4, **EIGHT_BIT)
    assert LLAMA_SIZES["7B"].density == 0.05 and LLAMA_SIZES["7B"].rank == 1024
    assert sl.total / GB == pytest.approx(15.2, abs=0.05)
    assert 100 * (1 - sl.total / full.total) == pytest.approx(72, abs=0.5)
    assert 100 * (1 - sl32.total / full.total) == pytest.approx(74, abs=0.5)
    # Per-layer updates counting the largest transient gradient (bf16 embedding, 32000 × 4096).
    pl = static_memory_bytes("7B", "sltrain", per_layer=True, **EIGHT_BIT)
    assert pl.gradients == 32000 * 4096 * 2
    assert pl.total == sl.total + pl.gradients
    assert pl.total / GB == pytest.approx(15.43, abs=0.005)
    # δ = 0.03 at 7B does not reproduce the figures: 13.6 GB, 74.7% less.
    d3 = static_memory_bytes("7B", "sltrain", density=0.03, grad_bytes=0, **EIGHT_BIT)
    assert d3.total / GB == pytest.approx(13.6, abs=0.05)


def test_paper_claims_and_table():
    claims = paper_claims()
    primary = [c for c in claims if c["primary"]]
    assert len(primary) == 6 and all(c["reproduced"] for c in primary)
    for c in claims:
        assert c["reproduced"] == (abs(c["value"] - c["spec"]) <= c["tolerance"] + 1e-12)
    rows = paper_scale_table()
    bf16 = [r for r in rows if r["setting"] == "bf16 Adam"]
    assert {(r["size"], r["method"]) for r in bf16} == {
        (s, m) for s in LLAMA_SIZES for m in ("full", "lowrank", "sltrain")}
    assert all(r["params_vs_full"] == 1.0 for r in bf16 if r["method"] == "full")
    md = paper_scale_markdown()
    for name in LLAMA_SIZES:
        assert f"| {name} | sltrain |" in md
    assert "**no**" in md  # the alternatives that do not reproduce are shown


# ------------------------------------------------------------------ closed form, small cases

def test_closed_form_by_hand():
    shapes = ModelShapes(linear=((10, 20),), dense=(7,))
    full = static_memory_bytes(shapes, "full", **WITH_GRADS)
    assert full.num_parameters == 207
    assert (full.parameters, full.gradients, full.optimizer_states, full.buffers) == (
        414, 414, 828, 0)
    low = static_memory_bytes(shapes, "lowrank", rank=2)
    assert low.num_parameters == 2 * 10 + 20 * 2 + 7
    sl = static_memory_bytes(shapes, "sltrain", rank=2, density=0.1)
    assert sl.num_parameters == 67 + 20 and sl.num_buffer_elements == 20
    assert (sl.parameters, sl.gradients, sl.optimizer_states, sl.buffers) == (174, 174, 348, 160)
    assert sl.total == 856
    assert static_memory_bytes(shapes, "sltrain", rank=2, density=0.1, index_bytes=4).buffers == 80
    assert static_memory_bytes(shapes, "sltrain", rank=2, density=0.1,
                               index_bytes="auto").buffers == 80
    # Per-layer: only the largest parameter (the 20-entry sparse values / B factor: 40 > 20).
    assert static_memory_bytes(shapes, "sltrain", rank=2, density=0.1,
                               per_layer=True).gradients == 40 * 2
    # fp32 Adam states, 8-bit, SGD
    assert static_memory_bytes(shapes, "full", state_bytes=4).optimizer_states == 207 * 8
    assert static_memory_bytes(shapes, "full", optimizer="adam8bit").optimizer_states == 207 * 2
    assert static_memory_bytes(shapes, "full", optimizer="sgd").optimizer_states == 0
    # rank clamped to min(in, out) like apply_sltrain; bare (in, out) pairs accepted
    assert static_memory_bytes([(3, 5)], "lowrank", rank=64).num_parameters == 3 * 3 + 5 * 3
    # "auto" index width switches to int64 at 2^31 entries
    big = static_memory_bytes([(2**16, 2**15)], "sltrain", rank=1, density=1e-6,
                              index_bytes="auto")
    assert big.buffers == 8 * math.floor(1e-6 * 2**16 * 2**15)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    size = LlamaSize("tiny", 64, 176, 2, 4, rank=16, density=0.03, vocab_size=257)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**size.llama_config_kwargs()))
    return size, model


def test_closed_form_full_matches_transformers_llama():
    size, model = _tiny_llama()
    closed = static_memory_bytes(size, "full", weight_bytes=4, state_bytes=4)
    assert count_parameters(model) == closed.num_parameters == 133_568
    real = module_static_bytes(model, optimizer_state_bytes_per_param=8)
    assert (real.parameters, real.gradients, real.optimizer_states) == (
        closed.parameters, closed.gradients, closed.optimizer_states)
    assert real.buffers == sum(b.numel() * b.element_size() for b in model.buffers())  # rotary


def test_closed_form_sltrain_and_lowrank_match_real_layers():
    sltrain = pytest.importorskip("optfm.pretraining.sltrain")
    lowrank = pytest.importorskip("optfm.pretraining.lowrank")
    size, model = _tiny_llama()
    rotary = sum(b.numel() * b.element_size() for b in model.buffers())
    sltrain.apply_sltrain(model, sltrain.SLTrainConfig(rank=size.rank, density=size.density))
    closed = static_memory_bytes(size, "sltrain", weight_bytes=4, state_bytes=4,
                                 index_bytes="auto")
    real = module_static_bytes(model, optimizer_state_bytes_per_param=8)
    assert real.num_parameters == closed.num_parameters
    assert (real.parameters, real.gradients, real.optimizer_states) == (
        closed.parameters, closed.gradients, closed.optimizer_states)
    assert real.buffers == closed.buffers + rotary  # int32 index buffers + rotary
    _, model = _tiny_llama()
    lowrank.apply_lowrank(model, size.rank)
    assert count_parameters(model) == static_memory_bytes(size, "lowrank").num_parameters


# ------------------------------------------------------------------ real modules

class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)  # 12 + 3
        self.b = nn.Linear(3, 2, bias=False)  # 6
        self.a.bias.requires_grad_(False)
        self.register_buffer("index", torch.arange(5, dtype=torch.int32))  # 20 B
        self.register_buffer("scale", torch.ones(2, dtype=torch.float64))  # 16 B


def test_module_static_bytes_by_hand():
    m = _Stack()
    assert parameter_breakdown(m) == {"trainable": 18, "frozen": 3, "total": 21, "buffers": 7}
    r = module_static_bytes(m, optimizer_state_bytes_per_param=8)
    assert (r.parameters, r.gradients, r.optimizer_states, r.buffers) == (84, 72, 144, 36)
    assert r.total == 336 and r.as_dict()["total_bytes"] == 336
    assert module_static_bytes(m, optimizer_state_bytes_per_param=8, per_layer=True).gradients == 48
    assert module_static_bytes(m, optimizer_state_bytes_per_param=2, grad_bytes=2).total == (
        84 + 36 + 36 + 36)
    # shared modules count once; dtypes come from the tensors
    lin = nn.Linear(4, 3, dtype=torch.bfloat16)
    shared = nn.Sequential(lin, lin)
    s = module_static_bytes(shared, optimizer_state_bytes_per_param=0)
    assert (s.num_parameters, s.parameters, s.gradients) == (15, 30, 30)


def test_optimizer_state_bytes_matches_adam():
    lin = nn.Linear(4, 3)
    opt = torch.optim.Adam(lin.parameters())
    assert optimizer_state_bytes(opt) == 0  # lazily created
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert optimizer_state_bytes(opt) == 2 * 15 * 4 + steps


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize(("kwargs", "name"), [
    ({"method": "dense"}, "method"),
    ({"optimizer": "adamw"}, "optimizer"),
    ({"rank": 0}, "rank"),
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": float("nan")}, "density"),
    ({"weight_bytes": 0}, "weight_bytes"),
    ({"grad_bytes": -1}, "grad_bytes"),
    ({"state_bytes": 1.5}, "state_bytes"),
    ({"index_bytes": 2}, "index_bytes"),
    ({"index_bytes": 4.0}, "index_bytes"),
    ({"per_layer": 1}, "per_layer"),
])
def test_static_memory_bad_input(kwargs, name):
    kw = {"method": "sltrain", **kwargs}
    method = kw.pop("method")
    with pytest.raises(ValueError, match=name):
        static_memory_bytes("60M", method, **kw)


def test_bad_shapes_and_modules():
    with pytest.raises(ValueError, match="size_or_shapes"):
        static_memory_bytes("3B", "full")
    with pytest.raises(ValueError, match="size_or_shapes"):
        static_memory_bytes(42, "full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="linear"):
        static_memory_bytes([(0, 4)], "full")
    with pytest.raises(ValueError, match="dense"):
        ModelShapes(linear=((2, 2),), dense=(0,))
    with pytest.raises(ValueError, match="rank is required"):
        static_memory_bytes([(4, 4)], "lowrank")
    with pytest.raises(ValueError, match="density"):
        static_memory_bytes([(4, 4)], "sltrain", rank=1, density=0.01)  # no sparse entry
    with pytest.raises(ValueError, match="model"):
        module_static_bytes("not a module", optimizer_state_bytes_per_param=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model"):
        parameter_breakdown(None)  # type: ignore[arg-type]
    for bad in (-1, float("inf"), True):
        with pytest.raises(ValueError, match="optimizer_state_bytes_per_param"):
            module_static_bytes(nn.Linear(2, 2), optimizer_state_bytes_per_param=bad)
    with pytest.raises(ValueError, match="grad_bytes"):
        module_static_bytes(nn.Linear(2, 2), optimizer_state_bytes_per_param=8, grad_bytes=-2)
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_state_bytes([])  # type: ignore[arg-type]
