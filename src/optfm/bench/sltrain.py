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

The memory claim end to end (SLTrain with 8-bit AdamW states and per-layer updates, the
configuration of the paper's 7B figure; 8-bit AdamW = ``bitsandbytes.optim.AdamW8bit`` through
:func:`optfm.pretraining.build_optimizer`, per-layer = :class:`optfm.pretraining.PerLayerOptimizer`;
these rows are left out, with a note, when bitsandbytes is not installed):

- ``SLTrain + 8-bit AdamW + per-layer / full-rank AdamW static memory`` (target <= 0.45):
  parameters + gradients (per-layer: only the largest single gradient exists at once, the
  ``lm_head``/embedding one) + every tensor each optimizer really holds after the timed steps
  (fp32 AdamW: 8 B per parameter + step counters; bitsandbytes: 1-B codes for each of the two
  moments, block-wise absmax scales, the quantisation maps, and fp32 states for tensors under
  4096 entries, e.g. the sparse values of the 256 x 256 projections) + buffers. Exact.
- ``... peak tensor memory`` (report only): the largest sum of live tensor bytes during one
  training step, from torch's memory profiler (:func:`optfm.training.peak_tensor_bytes`):
  deterministic, without allocator slack. The peak comes early in backward, when every
  activation is still saved and few gradients exist yet, so per-layer updates barely move it at
  this batch size; the parameters and optimizer states that SLTrain + 8-bit remove do.
- ``... peak RSS added`` (report only): each side runs ``RSS_STEPS`` training steps in its own
  subprocess; the peak RSS is reset to the RSS after the imports (``/proc/self/clear_refs``), so
  the row compares what the model + optimizer + training steps add. The activations of the
  16 x 128-token batch (the same on both sides: ≈ 174 MiB saved for backward at d = 256, see the
  saved-activations row), autograd temporaries and allocator slack dominate at this scale, so
  the ratio is far above the static one.
- ``... step time`` (report only), and the two factors separately: ``per-layer / global step
  time`` (SLTrain, 8-bit AdamW: the cost of one inner optimizer call per parameter) and
  ``8-bit / fp32 AdamW step time`` (SLTrain, global step: bitsandbytes' CPU kernels).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.models import tiny_llama
from optfm.pretraining import (
    SLTrainConfig,
    SLTrainLinear,
    apply_lowrank,
    apply_sltrain,
    build_optimizer,
)
from optfm.pretraining.memory import StaticMemory, module_static_bytes, optimizer_state_bytes
from optfm.training.memory import peak_tensor_bytes, saved_activation_bytes

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
    "ROW_RSS_8BIT_PL",
    "ROW_STATIC",
    "ROW_STATIC_8BIT_PL",
    "ROW_STEP",
    "ROW_STEP_8BIT",
    "ROW_STEP_8BIT_PL",
    "ROW_STEP_PL",
    "ROW_TENSOR_8BIT_PL",
    "bench_sltrain",
    "bitsandbytes_available",
    "build_model",
    "naive_sltrain_forward",
    "rss_worker",
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
ROW_STATIC_8BIT_PL = "SLTrain + 8-bit AdamW + per-layer / full-rank AdamW static memory"
ROW_RSS_8BIT_PL = "SLTrain + 8-bit AdamW + per-layer / full-rank AdamW peak RSS added (subprocess)"
ROW_TENSOR_8BIT_PL = "SLTrain + 8-bit AdamW + per-layer / full-rank AdamW peak tensor memory (1 step)"
ROW_STEP_8BIT_PL = "SLTrain + 8-bit AdamW + per-layer / full-rank AdamW step time"
ROW_STEP_PL = "per-layer / global step time (SLTrain, 8-bit AdamW)"
ROW_STEP_8BIT = "8-bit / fp32 AdamW step time (SLTrain, global step)"
RSS_STEPS = 3  # training steps per RSS subprocess (states exist after one; the peak repeats)


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
    """A model, its optimizer and the fixed batch; ``step()`` is one training step."""

    def __init__(self, kind: str, inputs: torch.Tensor, targets: torch.Tensor, *,
                 optimizer: str = "adamw", per_layer: bool = False) -> None:
        self.model = build_model(kind)
        self.per_layer = per_layer
        self.optimizer = build_optimizer(self.model, optimizer, lr=1e-3, weight_decay=0.0,
                                         per_layer=per_layer)
        self.inputs, self.targets = inputs, targets

    def loss(self) -> torch.Tensor:
        logits = self.model(input_ids=self.inputs).logits
        return F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()  # per-layer: the parameters are updated here
        if not self.per_layer:
            self.optimizer.step()

    def static_bytes(self) -> StaticMemory:
        """Exact static memory with the optimizer's real state (call after a step)."""
        s = module_static_bytes(self.model, optimizer_state_bytes_per_param=0,
                                per_layer=self.per_layer)
        return StaticMemory(s.num_parameters, s.num_trainable, s.num_buffer_elements,
                            s.parameters, s.gradients, optimizer_state_bytes(self.optimizer),
                            s.buffers)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL_KWARGS["vocab_size"], (BATCH, BLOCK + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def rss_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Subprocess entry point of the RSS row: ``RSS_STEPS`` training steps of one arm
    (``kind``, ``optimizer``, ``per_layer``), peak RSS above the RSS after the imports."""
    from transformers import LlamaForCausalLM  # noqa: F401  (imported lazily by tiny_llama)

    from optfm.pretraining import optimizer_class
    from optfm.training import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(1)
    optimizer_class("adamw8bit")  # both sides import the same libraries before the baseline
    inputs, targets = _batch()
    reset = reset_peak_rss()
    before = current_rss_bytes()
    arm = _Arm(payload["kind"], inputs, targets, optimizer=payload["optimizer"],
               per_layer=payload["per_layer"])
    for _ in range(payload.get("steps", RSS_STEPS)):
        arm.step()
    peak = peak_rss_bytes()
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "added_bytes": peak - before,
            "reset": reset}


def _rss_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    """(SLTrain + 8-bit + per-layer, full-rank AdamW) RSS results, run concurrently."""
    from optfm.experiments.worker import run_in_subprocess

    jobs = [{"kind": "sltrain", "optimizer": "adamw8bit", "per_layer": True},
            {"kind": "full", "optimizer": "adamw", "per_layer": False}]
    with tempfile.TemporaryDirectory(prefix="optfm-bench-rss-") as d, ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(run_in_subprocess, "optfm.bench.sltrain:rss_worker", job, f"{d}/{i}")
                   for i, job in enumerate(jobs)]
        sl, full = (f.result() for f in futures)
    return sl, full


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
                          "parameters, static memory, step time, saved activations; SLTrain + "
                          "8-bit AdamW + per-layer updates vs full-rank AdamW")
def bench_sltrain(repeats: int = 7) -> list[BenchRow]:
    inputs, targets = _batch()
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
    rows += _eight_bit_per_layer_rows(full, sl, act_full, repeats)
    return rows


def _eight_bit_per_layer_rows(full: _Arm, sl32: _Arm, act_full: int,
                              repeats: int) -> list[BenchRow]:
    """The rows of SLTrain + 8-bit AdamW + per-layer; ``full`` and ``sl32`` (SLTrain, fp32
    AdamW, global step) have already stepped."""
    if not bitsandbytes_available():  # pragma: no cover - optional peer
        return []
    sl8pl = _Arm("sltrain", sl32.inputs, sl32.targets, optimizer="adamw8bit", per_layer=True)
    sl8 = _Arm("sltrain", sl32.inputs, sl32.targets, optimizer="adamw8bit")
    for arm in (sl8pl, sl8):
        arm.step()  # create the optimizer states
    st_target, st_full = sl8pl.static_bytes(), full.static_bytes()
    n8 = sum(1 for s in sl8pl.optimizer.state.values()
             if isinstance(s.get("state1"), torch.Tensor) and s["state1"].dtype == torch.uint8)
    n_all = len(sl8pl.optimizer.state)
    rows = [BenchRow(
        NAME, ROW_STATIC_8BIT_PL, float(st_target.total), float(st_full.total), "bytes", target=0.45,
        note=(f"exact, optimizer states as held after a step; SLTrain + bitsandbytes AdamW8bit + "
              f"per-layer: {_breakdown(st_target)} ({n8} of {n_all} tensors with 8-bit states, "
              f"the rest under 4096 entries keep fp32 states); full-rank fp32 AdamW: "
              f"{_breakdown(st_full)}"))]

    peaks = [peak_tensor_bytes(a.step) for a in (sl8pl, full)]
    if all(peaks):
        (p_sl, p_full) = peaks

        def split(p: dict[str, Any]) -> str:
            c = p["by_category"]
            static = sum(c.get(k, 0) for k in ("parameter", "optimizer_state", "gradient"))
            return f"{_mib(static)} parameters/states/gradients + {_mib(p['peak_bytes'] - static)} other"

        rows.append(BenchRow(
            NAME, ROW_TENSOR_8BIT_PL, float(p_sl["peak_bytes"]), float(p_full["peak_bytes"]),
            "bytes",
            note=(f"largest sum of live tensor bytes during one training step (torch's memory "
                  f"profiler; deterministic); at the peak: SLTrain {split(p_sl)}; full rank "
                  f"{split(p_full)} (activations, the logits and their gradient dominate)")))

    rss_sl, rss_full = _rss_pair()
    rows.append(BenchRow(
        NAME, ROW_RSS_8BIT_PL, float(rss_sl["added_bytes"]), float(rss_full["added_bytes"]),
        "bytes",
        note=(f"{RSS_STEPS} steps in a subprocess each, peak RSS above the RSS after the imports "
              f"(peak reset: {rss_sl['reset'] and rss_full['reset']}); whole-process peaks "
              f"{_mib(rss_sl['peak_rss_bytes'])} vs {_mib(rss_full['peak_rss_bytes'])}; the "
              f"activations saved for backward ({_mib(act_full)}, the same on both sides) "
              "dominate both")))

    t_target, t_full, t_8, t_32 = _time_round_robin([sl8pl.step, full.step, sl8.step, sl32.step],
                                                     repeats)
    how = f"median of {repeats} rounds, one step of each of the four arms per round (rotating order)"
    rows += [
        BenchRow(NAME, ROW_STEP_8BIT_PL, t_target, t_full, "s", note=f"{how}, fixed 16x128 batch"),
        BenchRow(NAME, ROW_STEP_PL, t_target, t_8, "s",
                 note=f"{how}; one inner optimizer call per parameter, inside backward"),
        BenchRow(NAME, ROW_STEP_8BIT, t_8, t_32, "s",
                 note=f"{how}; bitsandbytes' CPU 8-bit kernels vs torch's AdamW"),
    ]
    return rows


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports (the 8-bit rows are left out otherwise)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _time_round_robin(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds per call of each function, one call of each per round (load changes hit
    all of them alike); the order rotates between rounds, so none always runs first."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
