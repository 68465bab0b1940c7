r"""``optfm bench sltrain``: what SLTrain costs and saves against full-rank training.

Set-up shared by every model row: the ``full`` profile model of ``specs/pretraining.md``, a
``LlamaForCausalLM`` from :func:`optfm.models.tiny_llama` with d = 256, ffn 688, 4 layers, 4 heads,
byte vocabulary 257, untied embeddings (3,296,000 parameters), fp32, built from one seed. The
**SLTrain** arm is the same model after :func:`optfm.pretraining.apply_sltrain` with r = d/4 = 64,
δ = 0.03, α = 32 (every q, k, v, o, gate, up, down projection replaced; embeddings, ``lm_head`` and
norms dense); the **low-rank** arm uses :func:`optfm.pretraining.apply_lowrank` with r = 64. The
batch is one fixed, pre-drawn batch of 16 sequences x 128 byte tokens (next-token targets): the
batch of the ``sltrain`` experiment and of :class:`~optfm.pretraining.PretrainConfig`, so every
timed step does identical work and only the layers differ. Ratios are SLTrain (or low rank) over
full rank, measured in the same process.

Rows (ratio = measured / baseline):

- ``SLTrain / full-rank parameters`` (target <= 0.50): element counts of ``model.parameters()``.
  Exact and deterministic: 1,478,020 / 3,296,000 = 0.448 (per replaced layer r·(in + out) +
  ⌊δ·in·out⌋ instead of in·out).
- ``SLTrain / full-rank static memory (fp32 AdamW)`` (target <= 0.55): bytes of parameters +
  gradients + the 2 AdamW moments (fp32: 16 B per trainable parameter) + every buffer (SLTrain's
  int32 ``index`` support, 4 B per sparse entry; the rotary ``inv_freq`` buffers of both models),
  from the tensors of the real modules with
  :func:`optfm.pretraining.memory.module_static_bytes`. Exact and deterministic. The note gives
  the breakdown and, as a cross-check, the AdamW state actually held by the optimizer after the
  timed steps (:func:`optfm.pretraining.memory.optimizer_state_bytes`): 8 B per parameter plus
  one 4-B ``step`` counter per tensor, which the static count leaves out.
- ``SLTrain / full-rank step time`` (target <= 1.10): one training step, i.e. ``zero_grad``,
  forward, cross-entropy, backward and ``AdamW.step``, on the fixed batch.
  :func:`~optfm.bench.core.time_pair` alternates the two models **one step at a time** for
  ``repeats x ROUNDS_PER_REPEAT`` rounds and reports the medians, so load changes on a shared
  machine hit both sides. SLTrain does the dense matmuls of full rank (x Wᵀ, g W, gᵀ x: 3 x 2·T·in·out
  FLOPs per layer for T tokens) plus four of 2·r·in·out each (B (A·s) in the forward and again in
  the backward, G Aᵀ, Bᵀ G), i.e. 4r / 3T extra on the replaced layers, less on the whole model:
  x1.041 matmul FLOPs at T = 16 x 128 (x1.082 at 8 x 128, where the step-time ratio measured
  1.11-1.19 on this machine because the rank-64 matmuls run below the large ones' FLOP rate).
  AdamW work shrinks with the 55 % fewer parameters. The note gives the matmul FLOPs of one step on each side
  (``torch.utils.flop_counter.FlopCounterMode``, which sees the matmuls inside the custom autograd
  Function): a noise-free view of the extra work when the machine is too busy for the timings to
  resolve a few per cent.
- ``SLTrain / full-rank saved activations`` (target <= 1.05): bytes autograd saves for backward
  during the forward of a training step (model + loss) on the batch, counted with
  :func:`optfm.training.memory.saved_activation_bytes` (each storage once; the modules' own
  parameters and buffers excluded). :class:`~optfm.pretraining.SLTrainFunction` saves only the
  layer input x, exactly what ``nn.Linear`` saves, so the ratio is 1 (deterministic).
- ``SLTrainLinear / naive autograd saved activations`` (report only): the same count for one
  256 -> 688 layer (the shape of gate/up, no bias) on the same 16 x 128 tokens, against
  :func:`naive_sltrain_forward`, the same arithmetic written with plain autograd ops. The naive
  version also saves A·s (r x in) and the dense W (out x in) of every layer until backward; the
  custom Function saves x alone. This is why the custom Function matters: across the 28 replaced
  layers the naive version would keep a dense fp32 copy of every replaced weight (12.06 MiB here,
  as much as the full-rank model's projection weights) alive from the forward to the backward,
  on top of the activations, and that copy grows with the model, not with the batch.
- ``low-rank / full-rank step time`` (report only): the pure low-rank baseline W = B A (computed
  as (x Aᵀ) Bᵀ, never forming W), timed like the SLTrain row (``repeats`` rounds: report only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.models import tiny_llama
from optfm.pretraining import SLTrainConfig, SLTrainLinear, apply_lowrank, apply_sltrain
from optfm.pretraining.memory import StaticMemory, module_static_bytes, optimizer_state_bytes
from optfm.training.memory import saved_activation_bytes

__all__ = [
    "ALPHA",
    "BATCH",
    "BLOCK",
    "DENSITY",
    "MODEL_KWARGS",
    "RANK",
    "ROW_ACT",
    "ROW_LAYER",
    "ROW_LOWRANK",
    "ROW_PARAMS",
    "ROW_STATIC",
    "ROW_STEP",
    "bench_sltrain",
    "build_model",
    "naive_sltrain_forward",
]

NAME = "sltrain"
MODEL_KWARGS = {"vocab_size": 257, "hidden_size": 256, "intermediate_size": 688,
                "num_hidden_layers": 4, "num_attention_heads": 4}
"""The ``full`` profile model of ``specs/pretraining.md``."""
RANK = 64  # r = d / 4
DENSITY = 0.03
ALPHA = 32.0
BATCH, BLOCK = 16, 128  # sequences x tokens of the fixed batch
ADAM_FP32_STATE_BYTES = 8  # two fp32 moments per trainable parameter
ROUNDS_PER_REPEAT = 3  # time_pair rounds (one step each side) per requested repeat
LAYER_SHAPE = (256, 688)  # (in, out) of the single-layer row: gate/up of the model

ROW_PARAMS = "SLTrain / full-rank parameters"
ROW_STATIC = "SLTrain / full-rank static memory (fp32 AdamW)"
ROW_STEP = "SLTrain / full-rank step time (fwd+bwd+AdamW, 16x128 tokens)"
ROW_ACT = "SLTrain / full-rank saved activations (model forward + loss)"
ROW_LAYER = "SLTrainLinear / naive autograd saved activations (one 256->688 layer)"
ROW_LOWRANK = "low-rank / full-rank step time (fwd+bwd+AdamW, 16x128 tokens)"


def naive_sltrain_forward(layer: SLTrainLinear, x: torch.Tensor) -> torch.Tensor:
    """COMPARISON BASELINE ONLY: ``layer(x)`` with W formed by plain autograd ops.

    Same values and gradients as :class:`~optfm.pretraining.SLTrainFunction`, but autograd saves
    what the ops need for backward: A·s (for the ``mm`` forming B A·s) and the dense W (for the
    final ``linear``), per layer, until backward. Used by ``optfm bench sltrain``.
    """
    W = layer.B @ (layer.A * layer.scaling)
    W = W.reshape(-1).index_add(0, layer.index, layer.values).view(layer.out_features,
                                                                  layer.in_features)
    return F.linear(x, W, layer.bias)


def build_model(kind: str, *, seed: int = 0) -> nn.Module:
    """The benchmark's model: ``"full"``, ``"sltrain"`` or ``"lowrank"`` (global RNG untouched)."""
    if kind not in ("full", "sltrain", "lowrank"):
        raise ValueError(f"kind must be full, sltrain or lowrank, got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama(**MODEL_KWARGS)
    if kind == "sltrain":
        apply_sltrain(model, SLTrainConfig(rank=RANK, density=DENSITY, alpha=ALPHA, seed=seed))
    elif kind == "lowrank":
        apply_lowrank(model, RANK, seed=seed)
    return model.train()


class _Arm:
    """A model, its AdamW and the fixed batch; ``step()`` is one training step."""

    def __init__(self, kind: str, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.model = build_model(kind)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.0)
        self.inputs, self.targets = inputs, targets

    def loss(self) -> torch.Tensor:
        logits = self.model(input_ids=self.inputs).logits
        return F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()


def _matmul_flops(step: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{int(n):,} B"


def _breakdown(s: StaticMemory) -> str:
    return (f"params {_mib(s.parameters)} + grads {_mib(s.gradients)} + Adam "
            f"{_mib(s.optimizer_states)} + buffers {_mib(s.buffers)}")


def _held(arm: _Arm, static: StaticMemory) -> str:
    """The AdamW state the optimizer really holds, against the static count."""
    real, n = optimizer_state_bytes(arm.optimizer), len(list(arm.model.parameters()))
    if real == static.optimizer_states + 4 * n:  # + one fp32 ``step`` scalar per tensor
        return f"{real:,} B = static count + {n} x 4-B step counters"
    return f"{real:,} B (static count {static.optimizer_states:,} B)"


@register_benchmark(NAME, "SLTrain (r=d/4, δ=0.03) vs full rank on the spec's full Llama: "
                          "parameters, static memory, step time, saved activations")
def bench_sltrain(repeats: int = 7) -> list[BenchRow]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL_KWARGS["vocab_size"], (BATCH, BLOCK + 1), generator=gen)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    full, sl, low = (_Arm(k, inputs, targets) for k in ("full", "sltrain", "lowrank"))
    rows: list[BenchRow] = []

    # --- parameters ---------------------------------------------------------------------------
    n_sl, n_full = _n_params(sl.model), _n_params(full.model)
    n_layers = sum(isinstance(m, SLTrainLinear) for m in sl.model.modules())
    nnz = sum(m.nnz for m in sl.model.modules() if isinstance(m, SLTrainLinear))
    rows.append(BenchRow(NAME, ROW_PARAMS, float(n_sl), float(n_full), "params", target=0.50,
                         note=f"{n_layers} layers replaced (r={RANK}, δ={DENSITY}: {nnz:,} sparse "
                              f"values); low rank r={RANK}: {_n_params(low.model):,}"))

    # --- static memory --------------------------------------------------------------------------
    st_sl, st_full = (module_static_bytes(a.model, optimizer_state_bytes_per_param=ADAM_FP32_STATE_BYTES)
                      for a in (sl, full))

    # --- step time (also creates the AdamW state checked in the static-memory note) ------------
    for arm in (full, sl, low):
        arm.step()
    flops = {k: _matmul_flops(a.step) for k, a in (("full", full), ("sl", sl), ("low", low))}
    rounds = repeats * ROUNDS_PER_REPEAT
    t_sl, t_full = time_pair(sl.step, full.step, repeats=rounds, number=1, warmup=0)
    t_low, t_full2 = time_pair(low.step, full.step, repeats=repeats, number=1, warmup=0)

    rows.append(BenchRow(
        NAME, ROW_STATIC, float(st_sl.total), float(st_full.total), "bytes", target=0.55,
        note=(f"module_static_bytes, 16 B per trainable parameter + buffers (int32 index: "
              f"{_mib(4 * nnz)}); SLTrain: {_breakdown(st_sl)}; full: {_breakdown(st_full)}; "
              f"AdamW state actually held after the timed steps: SLTrain {_held(sl, st_sl)}; "
              f"full {_held(full, st_full)}")))
    rows.append(BenchRow(
        NAME, ROW_STEP, t_sl, t_full, "s", target=1.10,
        note=(f"median of {rounds} interleaved steps; matmul FLOPs/step {flops['sl'] / 1e9:.2f} G "
              f"vs {flops['full'] / 1e9:.2f} G (x{flops['sl'] / flops['full']:.3f}, "
              "FlopCounterMode: noise-free)")))

    # --- saved activations ---------------------------------------------------------------------
    act_sl, act_full = (saved_activation_bytes(a.model, a.loss) for a in (sl, full))
    rows.append(BenchRow(NAME, ROW_ACT, float(act_sl), float(act_full), "bytes", target=1.05,
                         note="saved_tensors_hooks count, modules' own parameters/buffers excluded"))

    d_in, d_out = LAYER_SHAPE
    layer = SLTrainLinear(d_in, d_out, RANK, DENSITY, ALPHA, bias=False,
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.B.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))  # W != S
    x = torch.randn(BATCH, BLOCK, d_in, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    act_layer = saved_activation_bytes(layer, lambda: layer(x))
    act_naive = saved_activation_bytes(layer, lambda: naive_sltrain_forward(layer, x))
    x_bytes = x.numel() * x.element_size()
    rows.append(BenchRow(
        NAME, ROW_LAYER, float(act_layer), float(act_naive), "bytes",
        note=(f"custom Function saves x ({_mib(x_bytes)}); naive autograd also keeps A·s "
              f"({_mib(RANK * d_in * 4)}) and the dense W ({_mib(d_in * d_out * 4)}) per layer "
              "until backward")))

    rows.append(BenchRow(
        NAME, ROW_LOWRANK, t_low, t_full2, "s",
        note=(f"median of {repeats} interleaved steps; matmul FLOPs/step {flops['low'] / 1e9:.2f} G "
              f"(x{flops['low'] / flops['full']:.3f} of full rank)")))
    return rows
