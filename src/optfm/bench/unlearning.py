r"""``optfm bench unlearning``: what NGDiff and its automatic learning rate cost per step.

Set-up shared by every row: a ``LlamaForCausalLM`` from :func:`optfm.models.tiny_llama` (the
default tiny model, d = 128, ffn 352, 4 layers, 4 heads, untied embeddings; a second size d = 256,
ffn 688 for the step-time row), fp32, built from one seed, over a word-level tokenizer
(:func:`optfm.data.build_word_tokenizer`, ~100 words) trained on :data:`N_PAIRS` generated
(question, answer) pairs about fictitious authors. Three fixed, pre-encoded batches of
:data:`BATCH` pairs each (:func:`optfm.training.lm.encode_pairs`: prompt tokens masked out of the
labels, ~62 tokens per sequence of which ~28 are answer tokens): a forget batch, a retain batch,
and a second retain batch for AutoLR's fit. Losses are :func:`optfm.training.lm.lm_loss` (token-
mean cross-entropy over answer tokens). Every side has its own model (same initial weights) and
its own ``torch.optim.AdamW(lr=1e-5)``; every timed step does identical work on the same batches,
so only the update rule differs.

The two steps (exactly these lines; :class:`GradDiffArm` and :class:`NGDiffArm`)::

    # GradDiff, the usual way: two forwards, one backward of the summed loss
    opt.zero_grad(set_to_none=True)
    loss = -lm_loss(model, forget) + lm_loss(model, retain)
    loss.backward()
    opt.step()

    # NGDiff: two forwards, one backward per task into separate buffers, then
    # p.grad = g_R/‖g_R‖ − g_F/‖g_F‖ (global norms; optfm.unlearning.NGDiff)
    opt.zero_grad(set_to_none=True)
    ngd.backward(retain_loss=lm_loss(model, retain), forget_loss=lm_loss(model, forget))
    opt.step()

Rows (ratio = measured / baseline):

- ``NGDiff step / GradDiff step`` (target <= 1.05), at both model sizes. Both sides run the same two
  forward passes and the same backward FLOPs (the summed loss back-propagates through both graphs;
  autograd adds the two contributions per parameter where NGDiff keeps them apart). NGDiff's extra
  work is O(#parameters) and memory-bound: two ``_foreach_norm``, a per-tensor dot product in
  float64 (for cos θ), the in-place combination (``_foreach_mul_``, ``_foreach_add_``) and ‖d‖:
  ~2 ms on the d = 128 model (0.83 M parameters), ~2.5 % of an 80-ms step (~5 ms, ~2 % at d = 256),
  two thirds of it the float64 dot products (each gradient tensor is upcast, i.e. copied, twice);
  the share falls as the batch grows. Measured 1.027-1.033 (d = 128) and 1.022-1.029 (d = 256) on
  2 cores, one thread. :func:`~optfm.bench.core.time_pair` alternates the two sides **one step at a
  time** for ``repeats x ROUNDS_PER_REPEAT`` rounds (``repeats x LARGE_ROUNDS_PER_REPEAT`` at
  d = 256) and reports the medians. The note gives the time of ``NGDiff.direction()`` alone
  (norms, dot, combination; median of :data:`DIRECTION_SAMPLES` instrumented steps run after the
  timed ones) and the torch thread count.
- ``NGDiff+AutoLR step / NGDiff step`` (target <= 1.25): :class:`optfm.unlearning.AutoLR` with
  period 4 on the same NGDiff step, fitted loss = retain CE on the separate retain batch (the
  default ``"retain"`` fit), probing once every 4 steps exactly as
  :meth:`optfm.unlearning.Unlearner.train_step` does (after ``ngd.backward``, before
  ``opt.step()``). A probe snapshots parameters and AdamW state, takes one AdamW step, runs three
  no-grad forward passes of the fit batch and restores everything: ~3 forwards of 8 sequences
  against a step of 2 forwards and 2 backwards of 8, i.e. ~0.5 step per probe, ~1.12x amortised
  over 4 steps (measured 1.12-1.15). The lr has a floor, :data:`AUTOLR_MIN_LR`. Timed as whole
  blocks of 4 steps (one probe each) against 4 plain NGDiff steps, alternating for
  ``repeats x AUTOLR_ROUNDS_PER_REPEAT`` rounds; the ratio is of the block times, the absolute
  numbers are per step.
- ``NGDiff / GradDiff gradient buffers`` (target <= 2, exact): bytes of the distinct gradient
  storages alive when the backward passes are done: NGDiff's retain and forget buffers (read after
  :meth:`NGDiff.accumulate`, before the combination) against GradDiff's ``.grad`` tensors. NGDiff
  reuses the ``.grad`` tensors autograd produces and combines in place into the retain buffers, so
  this is exactly 2 (one extra gradient), never more.
- ``NGDiff / GradDiff peak tensor memory`` (report only): the largest sum of live tensor bytes
  during one step (forwards, backward(s), combination, AdamW step), from torch's memory profiler
  (:func:`optfm.training.peak_tensor_bytes`; deterministic, without allocator slack). Measured
  1.000 at d = 128: on both sides the peak comes at the start of the backward, when the
  activations of both forwards (and the logits) are alive and hardly any gradient exists yet;
  NGDiff's forget buffers are allocated during its second backward, after the retain graph has
  been freed, so the extra gradient only shows once it outweighs one forward's activations
  (large models, small batches).

The default run (``--repeats 7``) takes about 30 s on 2 CPU cores with one thread (``optfm bench``
runs with ``--threads 1`` by default).
"""

from __future__ import annotations

import abc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.data import build_word_tokenizer
from optfm.models import tiny_llama
from optfm.training.lm import encode_pairs, lm_loss
from optfm.training.memory import peak_tensor_bytes
from optfm.unlearning import AutoLR, NGDiff

__all__ = [
    "AUTOLR_MIN_LR",
    "AUTOLR_PERIOD",
    "BATCH",
    "LARGE_MODEL_KWARGS",
    "LR",
    "MODEL_KWARGS",
    "ROW_AUTOLR",
    "ROW_GRADS",
    "ROW_PEAK",
    "ROW_STEP",
    "AutoLRArm",
    "Batches",
    "GradDiffArm",
    "NGDiffArm",
    "bench_unlearning",
    "build_model",
    "make_batches",
    "model_label",
]

NAME = "unlearning"
MODEL_KWARGS: dict[str, int] = {"hidden_size": 128, "intermediate_size": 352,
                                "num_hidden_layers": 4, "num_attention_heads": 4}
"""The default :func:`~optfm.models.tiny_llama` (every row)."""
LARGE_MODEL_KWARGS: dict[str, int] = {"hidden_size": 256, "intermediate_size": 688,
                                      "num_hidden_layers": 4, "num_attention_heads": 4}
"""The second size (step-time row only)."""
BATCH = 8  # pairs in each of the forget, retain and AutoLR-fit batches
N_PAIRS = 3 * BATCH
LR = 1e-5  # AdamW learning rate on every side (the low end of the spec's sweep)
AUTOLR_PERIOD = 4
AUTOLR_MIN_LR = 1e-3 * LR
"""On this fixed batch the retain fit soon stops descending (the forget ascent raises it), so AutoLR
halves η at most probes; the floor keeps AdamW's arithmetic out of float32 denormals (slow on CPU)
however long ``--repeats`` makes the run. It does not change what a probe costs."""
ROUNDS_PER_REPEAT = 3  # time_pair rounds (one step each side) per requested repeat
LARGE_ROUNDS_PER_REPEAT = 2
AUTOLR_ROUNDS_PER_REPEAT = 2  # rounds of one 4-step block each side per requested repeat
DIRECTION_SAMPLES = 5  # instrumented NGDiff steps for the direction() time in the note

ROW_STEP = "NGDiff step / GradDiff step ({model}, AdamW)"
ROW_AUTOLR = "NGDiff+AutoLR step / NGDiff step (period 4, amortised; {model})"
ROW_GRADS = "NGDiff / GradDiff gradient buffers after backward ({model})"
ROW_PEAK = "NGDiff / GradDiff peak tensor memory (1 step; {model})"


def model_label(model_kwargs: dict[str, int]) -> str:
    """``"Llama d=128 L=4"``: how a model size appears in the row names."""
    return f"Llama d={model_kwargs['hidden_size']} L={model_kwargs['num_hidden_layers']}"


# ---------------------------------------------------------------------------------------------
# data and models

_FIRST = ("anna", "boris", "clara", "dmitri", "elena", "farid", "greta", "hugo", "ines", "jonas",
          "kira", "lars", "mila", "niko", "olga", "pavel")
_LAST = ("berg", "castillo", "dunmore", "eklund", "fairbairn", "grigore", "holm", "ivanova",
         "jansen", "kowal", "lindqvist", "moreau")
_CITY = ("oslo", "lima", "quito", "riga", "perth", "turin", "lyon", "porto", "graz", "bergen")
_GENRE = ("mystery", "poetry", "history", "romance", "fantasy", "satire")
_WORD = ("river", "glass", "winter", "lantern", "garden", "silence", "harbor", "shadow",
         "orchard", "clock", "mirror", "storm")


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs about fictitious authors; every pair has the same length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        q = (f"question : in which city was the author {name} born , which genre does {name} "
             f"write , and what is the title of the first novel by {name} ? answer :")
        a = (f"{name} was born in {rng.choice(_CITY)} in {rng.randint(1930, 1999)} , writes "
             f"{rng.choice(_GENRE)} , and the first novel by {name} is called the "
             f"{rng.choice(_WORD)} of the {rng.choice(_WORD)} .")
        out.append((q, a))
    return out


class Batches:
    """The tokenizer and the three fixed batches (``forget``, ``retain``, ``fit``)."""

    def __init__(self, tokenizer: Any, forget: dict[str, torch.Tensor],
                 retain: dict[str, torch.Tensor], fit: dict[str, torch.Tensor]) -> None:
        self.tokenizer, self.forget, self.retain, self.fit = tokenizer, forget, retain, fit

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def describe(self) -> str:
        ids, labels = self.forget["input_ids"], self.forget["labels"]
        answer = int((labels != -100).sum()) / ids.shape[0]
        return (f"{BATCH}+{BATCH} sequences x {ids.shape[1]} tokens ({answer:.0f} answer tokens "
                f"each), vocabulary {self.vocab_size}")


def make_batches(seed: int = 0, batch: int = BATCH) -> Batches:
    """Generated pairs, a word-level tokenizer trained on them, and the three encoded batches."""
    pairs = _pairs(3 * batch, seed)
    tok = build_word_tokenizer([f"{q} {a}" for q, a in pairs])

    def enc(chunk: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        return encode_pairs(tok, [q for q, _ in chunk], [a for _, a in chunk])

    return Batches(tok, enc(pairs[:batch]), enc(pairs[batch:2 * batch]), enc(pairs[2 * batch:]))


def build_model(model_kwargs: dict[str, int], batches: Batches, *, seed: int = 0) -> nn.Module:
    """The benchmark's causal LM, in train mode (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama(vocab_size=batches.vocab_size,
                           eos_token_id=batches.tokenizer.eos_token_id, **model_kwargs)
    return model.train()


# ---------------------------------------------------------------------------------------------
# the timed steps


class _Arm(abc.ABC):
    def __init__(self, model_kwargs: dict[str, int], batches: Batches) -> None:
        self.model = build_model(model_kwargs, batches)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.batches = batches

    @abc.abstractmethod
    def step(self) -> None:
        """Implemented by each subclass."""

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


class GradDiffArm(_Arm):
    """The baseline: ``loss = -CE_F + CE_R; loss.backward(); opt.step()``."""

    def backward(self) -> torch.Tensor:
        """``zero_grad`` and the backward pass; returns the loss (``p.grad`` = its gradient)."""
        self.optimizer.zero_grad(set_to_none=True)
        b = self.batches
        loss = -lm_loss(self.model, b.forget) + lm_loss(self.model, b.retain)
        loss.backward()
        return loss

    def step(self) -> None:
        self.backward()
        self.optimizer.step()


class NGDiffArm(_Arm):
    """``ngd.backward(retain_loss=CE_R, forget_loss=CE_F); opt.step()``."""

    def __init__(self, model_kwargs: dict[str, int], batches: Batches) -> None:
        super().__init__(model_kwargs, batches)
        self.ngd = NGDiff(self.model.parameters())

    def backward(self):
        """``zero_grad`` and ``NGDiff.backward``: ``p.grad`` = d; returns the step's stats."""
        self.optimizer.zero_grad(set_to_none=True)
        b = self.batches
        return self.ngd.backward(retain_loss=lm_loss(self.model, b.retain),
                                 forget_loss=lm_loss(self.model, b.forget))

    def step(self) -> None:
        self.backward()
        self.optimizer.step()

    def direction_seconds(self, samples: int = DIRECTION_SAMPLES) -> float:
        """Median seconds of ``NGDiff.direction()`` alone over ``samples`` full steps."""
        times = []
        b = self.batches
        for _ in range(samples):
            self.optimizer.zero_grad(set_to_none=True)
            self.ngd.accumulate(retain_loss=lm_loss(self.model, b.retain),
                                forget_loss=lm_loss(self.model, b.forget))
            t0 = time.perf_counter()
            self.ngd.direction()
            times.append(time.perf_counter() - t0)
            self.optimizer.step()
        return statistics.median(times)


class AutoLRArm(NGDiffArm):
    """The NGDiff step plus :class:`~optfm.unlearning.AutoLR` (period 4, retain-CE fit), in the
    order of :meth:`optfm.unlearning.Unlearner.train_step`: backward, probe when due, step."""

    def __init__(self, model_kwargs: dict[str, int], batches: Batches) -> None:
        super().__init__(model_kwargs, batches)
        self.auto_lr = AutoLR(self.optimizer, period=AUTOLR_PERIOD, min_lr=AUTOLR_MIN_LR)
        self.t = 0
        fit = batches.fit
        self._fitted_loss: Callable[[], float] = lambda: float(lm_loss(self.model, fit))

    def step(self) -> None:
        self.backward()
        if self.auto_lr.should_probe(self.t):
            self.auto_lr.probe(self._fitted_loss)
        self.optimizer.step()
        self.t += 1


# ---------------------------------------------------------------------------------------------
# measurements


def _distinct_storage_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in tensors if t is not None}
    return sum(storages.values())


def gradient_buffer_bytes(ng: NGDiffArm, gd: GradDiffArm) -> tuple[int, int]:
    """(NGDiff's retain + forget buffers after both backward passes, GradDiff's ``.grad``s after
    its backward), bytes of distinct storages. Leaves both arms with ``p.grad`` set, unstepped."""
    b = ng.batches
    ng.optimizer.zero_grad(set_to_none=True)
    ng.ngd.accumulate(retain_loss=lm_loss(ng.model, b.retain),
                      forget_loss=lm_loss(ng.model, b.forget))
    n_ng = _distinct_storage_bytes([*ng.ngd._g_r, *ng.ngd._g_f])  # the buffers, before combining
    ng.ngd.direction()
    gd.backward()
    n_gd = _distinct_storage_bytes([p.grad for p in gd.model.parameters()])
    return n_ng, n_gd


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _step_row(ng: NGDiffArm, gd: GradDiffArm, label: str, rounds: int) -> BenchRow:
    for arm in (ng, gd):  # AdamW state, warm allocator
        arm.run(2)
    t_ng, t_gd = time_pair(ng.step, gd.step, repeats=rounds, number=1, warmup=0)
    t_dir = ng.direction_seconds()
    return BenchRow(
        NAME, ROW_STEP.format(model=label), t_ng, t_gd, "s", target=1.05,
        note=(f"median of {rounds} interleaved steps; {_n_params(ng.model):,} parameters, "
              f"{ng.batches.describe()}; NGDiff.direction() (norms, dot, combination) "
              f"{t_dir * 1e3:.2f} ms/step = {t_dir / t_gd:.1%} of the GradDiff step; "
              f"torch threads {torch.get_num_threads()}"))


def _autolr_row(ng: NGDiffArm, label: str, model_kwargs: dict[str, int], rounds: int) -> BenchRow:
    auto = AutoLRArm(model_kwargs, ng.batches)
    auto.run(AUTOLR_PERIOD)  # one probe; AdamW state
    block_auto, block_ng = (partial(arm.run, AUTOLR_PERIOD) for arm in (auto, ng))
    t_auto, t_ng = time_pair(block_auto, block_ng, repeats=rounds, number=1, warmup=0)
    return BenchRow(
        NAME, ROW_AUTOLR.format(model=label), t_auto / AUTOLR_PERIOD, t_ng / AUTOLR_PERIOD, "s",
        target=1.25,
        note=(f"median of {rounds} interleaved blocks of {AUTOLR_PERIOD} steps, one probe per "
              f"block (AdamW step on a snapshot, 3 no-grad forwards of a separate retain batch of "
              f"{BATCH}, restore); times per step; {len(auto.auto_lr.history)} probes, lr "
              f"{LR:g} -> {auto.auto_lr.lr:.3g}; torch threads {torch.get_num_threads()}"))


def _memory_rows(ng: NGDiffArm, gd: GradDiffArm, label: str) -> list[BenchRow]:
    n_ng, n_gd = gradient_buffer_bytes(ng, gd)
    rows = [BenchRow(
        NAME, ROW_GRADS.format(model=label), float(n_ng), float(n_gd), "bytes", target=2.0,
        note=(f"exact: distinct gradient storages when the backward passes are done; one gradient "
              f"= {_mib(4 * _n_params(ng.model))} (fp32); NGDiff combines in place into the retain "
              "buffers, so d takes no third buffer"))]
    for arm in (ng, gd):
        arm.optimizer.zero_grad(set_to_none=True)
    peaks = [peak_tensor_bytes(arm.step) for arm in (ng, gd)]
    if all(peaks):
        p_ng, p_gd = peaks

        def at_peak(p: dict[str, Any]) -> str:
            grads = p["by_category"].get("gradient", 0)
            return f"{_mib(p['peak_bytes'])} ({_mib(grads)} gradients)"

        rows.append(BenchRow(
            NAME, ROW_PEAK.format(model=label), float(p_ng["peak_bytes"]),
            float(p_gd["peak_bytes"]), "bytes",
            note=(f"largest sum of live tensor bytes during one step (torch's memory profiler): "
                  f"NGDiff {at_peak(p_ng)}, GradDiff {at_peak(p_gd)}; NGDiff's forget buffers are "
                  "allocated during its second backward, after the retain graph has been freed")))
    return rows


@register_benchmark(NAME, "NGDiff vs GradDiff step (tiny Llama, AdamW), NGDiff+AutoLR (period 4) "
                          "vs NGDiff, gradient buffers and peak memory")
def bench_unlearning(repeats: int = 7, *,
                     sizes: Sequence[dict[str, int]] = (MODEL_KWARGS, LARGE_MODEL_KWARGS)
                     ) -> list[BenchRow]:
    """The rows of ``optfm bench unlearning``: ``sizes[0]`` gets every row, the other sizes the
    step-time row only (tests pass tiny sizes)."""
    if not sizes:
        raise ValueError("sizes must name at least one model size")
    batches = make_batches()
    rows: list[BenchRow] = []
    for k, kwargs in enumerate(sizes):
        label = model_label(kwargs)
        ng, gd = NGDiffArm(kwargs, batches), GradDiffArm(kwargs, batches)
        per_repeat = ROUNDS_PER_REPEAT if k == 0 else LARGE_ROUNDS_PER_REPEAT
        rows.append(_step_row(ng, gd, label, repeats * per_repeat))
        if k == 0:
            rows.append(_autolr_row(ng, label, kwargs, repeats * AUTOLR_ROUNDS_PER_REPEAT))
            rows += _memory_rows(ng, gd, label)
    return rows
