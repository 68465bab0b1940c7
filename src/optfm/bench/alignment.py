r"""``optfm bench alignment``: what one IRFT stage costs against one SFT epoch on the same data.

Set-up shared by every row: the synthetic task of ``optfm run alignment``
(:func:`optfm.data.reward_task.make_reward_task` with seed 0: prompts of 4 words, responses of 8
words from a 16-word response vocabulary), its word-level tokenizer (36 tokens, no BOS), and
:data:`N_DEMOS` expert demonstrations in TRL format (``prompt``/``completion``; 4 prompt tokens
and 8 completion tokens each, no EOS). The policy is a ``GPT2LMHeadModel`` from
:func:`optfm.models.tiny_gpt2`: the experiment's policy (d = 64, 2 layers, 4 heads, 32 positions)
and a second size (d = 128, 4 layers), fp32, built from one seed. Both sides run the library's
trainers with the experiment's settings (:func:`make_config`: AdamW lr 1e-3, batch
:data:`BATCH`, β = 0.5, gradient clipping at norm 1, the fixed-length sampler restricted to the
16 response tokens, ``max_new_tokens`` = 8, ``add_eos=False``).

What is timed (exactly these calls, on trainers built once, so AdamW state persists as in a run):

- **SFT epoch** (the baseline): ``SFTTrainer(model, tok, demos, cfg).train()`` with
  ``epochs=1``: ``N_DEMOS / BATCH`` steps, each one forward with grad of the batch
  (:func:`optfm.alignment.batch_logprob`), the token-mean NLL, backward, clipping, AdamW step.
- **IRFT stage**: ``IRFTTrainer(model, tok, demos, cfg, stages=1).train()`` with ``epochs=1``:
  T = 1 stage covering every demonstration, i.e. one epoch of IRFT over the same data. It makes
  the frozen stage model π_t (a deep copy), generates ỹ ~ π_t for all ``N_DEMOS`` prompts, then
  per batch computes log π_t(y|x) and log π_t(ỹ|x) without grad, log π_θ(y|x) and log π_θ(ỹ|x)
  with grad, the SPIN loss, backward, clipping and the AdamW step; the same number of steps as
  the SFT epoch.

The IRFT side is :class:`TimedIRFT`, ``IRFTTrainer`` with its ``sample``, ``logprob`` and
``update`` methods wrapped in a timer (a ``perf_counter`` pair per call, a few hundred ns against
calls of milliseconds; the tests check that it computes exactly what ``IRFTTrainer`` computes).
So the components come from the same runs as the totals:

- *generation*: ``sample`` (ỹ for all prompts with the fixed-length sampler, in chunks of 64
  prompts; the sampler has no KV cache, so each of the 8 new tokens re-runs the whole prefix);
- *reference passes*: ``logprob(..., grad=False)``, the two no-grad forwards of y and ỹ under π_t
  per batch;
- *policy passes + steps*: ``logprob(..., grad=True)`` (the forwards of y and ỹ with grad) and
  ``update`` (zero_grad, backward of the SPIN loss, clipping, AdamW step): twice the sequences of
  an SFT step;
- the rest (the stage-model copy, the loss arithmetic, shuffling) is given in the note of the
  total row.

Rows (ratio = measured / baseline; report only, the issue sets no target):

- ``IRFT stage / SFT epoch`` per model size, then one row per component, each against the same
  SFT epoch: ``IRFT generation / SFT epoch``, ``IRFT reference passes / SFT epoch``,
  ``IRFT policy passes + steps / SFT epoch``. Medians over ``repeats x ROUNDS_PER_REPEAT`` rounds
  (``repeats x LARGE_ROUNDS_PER_REPEAT`` at the second size) in which the two sides alternate
  (ABBA), after one warm-up round each; a component's ratio is its median over the SFT epoch's
  median, the rest is the median of (total − components) per round.
- ``model.generate / fixed-length sampler``: the generation of the stage only, on a frozen copy of
  the starting weights: :func:`optfm.alignment.generate` with ``sampler="generate"``
  (``model.generate``, KV cache, sampling from the whole vocabulary, stops early only if every
  sequence emits EOS) against ``sampler="fixed"`` (as in the IRFT stage), same prompts, 8 new
  tokens, :func:`~optfm.bench.core.time_pair` over ``repeats`` rounds.

Every log-prob pass tokenizes its batch (:func:`optfm.training.lm.encode_pairs`, in Python; the
note of the total row gives its time per batch), and GPT-2's default dropout (0.1) is active in
the passes with grad (the trainers keep the policy in train mode) and off in generation and in
the reference passes (eval mode), as in a real run.

Measured on 2 CPU cores, one thread, five runs of ``optfm bench alignment`` (default
``--repeats 7``, about 30 s each): an IRFT stage costs 3.86-4.07x an SFT epoch at d = 64 and
4.03-4.07x at d = 128. Of that, generation is 1.18-1.28x (d = 64) and 1.43-1.47x (d = 128), the
two reference passes 0.81-0.85x and 0.67-0.68x, the policy passes and steps 1.80-1.89x and
1.87-1.91x (twice the sequences of SFT: about 2x, as expected); the rest is 0.03-0.06x.
``model.generate`` takes 0.49-0.50x (d = 64) and 0.29-0.31x (d = 128) of the fixed-length
sampler's time for the same 256 x 8 tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from optfm.alignment import AlignConfig, IRFTTrainer, SFTTrainer, frozen_copy, generate
from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.data.reward_task import make_reward_task
from optfm.models import tiny_gpt2
from optfm.training.lm import encode_pairs

__all__ = [
    "BATCH",
    "COMPONENTS",
    "LARGE_MODEL_KWARGS",
    "MODEL_KWARGS",
    "N_DEMOS",
    "ROW_GENERATION",
    "ROW_POLICY",
    "ROW_REFERENCE",
    "ROW_SAMPLER",
    "ROW_TOTAL",
    "Clock",
    "Setup",
    "TimedIRFT",
    "TimedSFT",
    "bench_alignment",
    "build_model",
    "make_config",
    "make_setup",
    "model_label",
]

NAME = "alignment"
N_DEMOS = 256
BATCH = 32
MODEL_KWARGS: dict[str, int] = {"n_embd": 64, "n_layer": 2, "n_head": 4}
"""The experiment's policy (``AlignmentExperimentConfig`` defaults)."""
LARGE_MODEL_KWARGS: dict[str, int] = {"n_embd": 128, "n_layer": 4, "n_head": 4}
"""The second size (:func:`optfm.models.tiny_gpt2`'s default width and depth)."""
N_POSITIONS = 32
ROUNDS_PER_REPEAT = 2  # interleaved (IRFT stage, SFT epoch) rounds per requested repeat
LARGE_ROUNDS_PER_REPEAT = 1
COMPONENTS = ("generation", "reference", "policy")
"""Timer keys of :class:`TimedIRFT`: ``sample``; ``logprob(grad=False)``; ``logprob(grad=True)``
and ``update``."""

ROW_TOTAL = "IRFT stage / SFT epoch ({model}, {n} demos, batch {batch})"
ROW_GENERATION = "IRFT generation (fixed-length sampler) / SFT epoch ({model})"
ROW_REFERENCE = "IRFT reference passes (2 no-grad forwards) / SFT epoch ({model})"
ROW_POLICY = "IRFT policy passes + steps / SFT epoch ({model})"
ROW_SAMPLER = "model.generate / fixed-length sampler ({n} responses, {model})"


def model_label(model_kwargs: dict[str, int]) -> str:
    """``"GPT-2 d=64 L=2"``: how a model size appears in the row names."""
    return f"GPT-2 d={model_kwargs['n_embd']} L={model_kwargs['n_layer']}"


# ---------------------------------------------------------------------------------------------
# data, config and models


@dataclass(frozen=True)
class Setup:
    """The tokenizer, the demonstrations (TRL rows), the response token ids and the config."""

    tokenizer: Any
    demos: list[dict[str, str]]
    allowed_token_ids: list[int]
    config: AlignConfig

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.demos]

    @property
    def steps(self) -> int:
        """Optimizer steps of one SFT epoch (and of one IRFT stage over all demonstrations)."""
        return -(-len(self.demos) // self.config.batch_size)


def make_config(batch: int = BATCH, *, seed: int = 0, **overrides: Any) -> AlignConfig:
    """The experiment's trainer settings (``optfm.experiments.alignment``; its first lr), one
    epoch. Only batch size, sampler, token counts and clipping change what a step costs."""
    base = dict(lr=1e-3, batch_size=batch, beta=0.5, sampler="fixed", max_new_tokens=8,
                add_eos=False, do_sample=True, epochs=1, seed=seed)
    base.update(overrides)
    return AlignConfig(**base).validate()


def make_setup(n_demos: int = N_DEMOS, batch: int = BATCH, *, seed: int = 0) -> Setup:
    """``n_demos`` expert demonstrations (score 0.65 of the optimum) of the default task."""
    task = make_reward_task(seed=0)
    tok = task.build_tokenizer()
    demos = task.to_trl_demos(task.demonstrations(n_demos, np.random.default_rng(seed)))
    allowed = [int(i) for i in task.response_token_ids(tok)]
    return Setup(tok, demos, allowed, make_config(batch, seed=seed,
                                                  max_new_tokens=task.length))


def build_model(model_kwargs: dict[str, int], setup: Setup, *, seed: int = 0) -> nn.Module:
    """The benchmark's policy, in train mode (global RNG untouched)."""
    tok = setup.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_gpt2(vocab_size=len(tok), n_positions=N_POSITIONS,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **model_kwargs)
    return model.train()


# ---------------------------------------------------------------------------------------------
# the timed trainers


class Clock:
    """Seconds and call counts per key; ``with clock("key"): ...`` adds one timed call."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.keys, 0.0)
        self.calls = dict.fromkeys(self.keys, 0)

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - t0
            self.calls[key] += 1


class TimedIRFT(IRFTTrainer):
    """:class:`~optfm.alignment.IRFTTrainer` with :data:`COMPONENTS` timed (nothing else
    changes: the same calls in the same order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = Clock(COMPONENTS)

    def sample(self, model: nn.Module, prompts: Sequence[str]) -> list[str]:
        with self.clock("generation"):
            return super().sample(model, prompts)

    def logprob(self, model: nn.Module, prompts: Sequence[str], responses: Sequence[str], *,
                grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with self.clock("policy" if grad else "reference"):
            return super().logprob(model, prompts, responses, grad=grad)

    def update(self, loss: torch.Tensor, **log: Any) -> dict[str, Any]:
        with self.clock("policy"):
            return super().update(loss, **log)


class TimedSFT(SFTTrainer):
    """:class:`~optfm.alignment.SFTTrainer` with its forwards and its backward + steps timed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = Clock(("forward", "step"))

    def logprob(self, model: nn.Module, prompts: Sequence[str], responses: Sequence[str], *,
                grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with self.clock("forward"):
            return super().logprob(model, prompts, responses, grad=grad)

    def update(self, loss: torch.Tensor, **log: Any) -> dict[str, Any]:
        with self.clock("step"):
            return super().update(loss, **log)


def _run(trainer: TimedIRFT | TimedSFT) -> tuple[float, dict[str, float]]:
    """One ``train()`` call (one IRFT stage or one SFT epoch): (seconds, component seconds)."""
    trainer.clock.reset()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return total, dict(trainer.clock.seconds)


# ---------------------------------------------------------------------------------------------
# measurements


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _encode_seconds(setup: Setup, samples: int = 15) -> float:
    """Median seconds of tokenizing one batch of demonstrations (what each log-prob pass does)."""
    b = setup.demos[: setup.config.batch_size]
    prompts, completions = [r["prompt"] for r in b], [r["completion"] for r in b]
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        encode_pairs(setup.tokenizer, prompts, completions, add_eos=setup.config.add_eos)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _stage_rows(model_kwargs: dict[str, int], setup: Setup, rounds: int) -> list[BenchRow]:
    label = model_label(model_kwargs)
    tok, demos, cfg = setup.tokenizer, setup.demos, setup.config
    irft = TimedIRFT(build_model(model_kwargs, setup), tok, demos, cfg, stages=1,
                     allowed_token_ids=setup.allowed_token_ids)
    sft = TimedSFT(build_model(model_kwargs, setup), tok, demos, cfg)
    for tr in (irft, sft):  # warm-up: AdamW state, allocator
        _run(tr)
    irft_t: list[float] = []
    sft_t: list[float] = []
    comp: dict[str, list[float]] = {k: [] for k in COMPONENTS}
    rest: list[float] = []
    sft_fwd: list[float] = []
    for i in range(rounds):
        order = (irft, sft) if i % 2 == 0 else (sft, irft)  # ABBA: no first-in-round bias
        for tr in order:
            total, parts = _run(tr)
            if tr is irft:
                irft_t.append(total)
                for k in COMPONENTS:
                    comp[k].append(parts[k])
                rest.append(total - sum(parts.values()))
            else:
                sft_t.append(total)
                sft_fwd.append(parts["forward"] / total)
    t_irft, t_sft = statistics.median(irft_t), statistics.median(sft_t)
    t_enc = _encode_seconds(setup)
    med = {k: statistics.median(v) for k, v in comp.items()}
    threads = f"torch threads {torch.get_num_threads()}"
    n, steps = len(demos), setup.steps
    calls = irft.clock.calls
    return [
        BenchRow(
            NAME, ROW_TOTAL.format(model=label, n=n, batch=cfg.batch_size), t_irft, t_sft, "s",
            note=(f"median of {rounds} interleaved rounds; IRFTTrainer(stages=1).train() = one "
                  f"stage over all {n} demos (generation, then {steps} steps) vs "
                  f"SFTTrainer.train() = one epoch ({steps} steps); {_n_params(irft.model):,} "
                  f"parameters; components below sum to "
                  f"{sum(med.values()) / t_irft:.1%} of the stage, the rest (stage-model copy, "
                  f"loss, shuffling) {statistics.median(rest) / t_sft:.3f}x the SFT epoch; SFT "
                  f"epoch = {statistics.median(sft_fwd):.0%} forwards, the rest backward + clip "
                  f"+ AdamW; every pass tokenizes its batch (encode_pairs: {t_enc * 1e3:.2f} ms "
                  f"per batch of {cfg.batch_size}, {steps * t_enc / t_sft:.1%} of the SFT epoch); "
                  f"{threads}")),
        BenchRow(
            NAME, ROW_GENERATION.format(model=label), med["generation"], t_sft, "s",
            note=(f"{calls['generation']} sample() call per stage: ỹ for {n} prompts from the "
                  f"frozen stage model, {cfg.max_new_tokens} tokens restricted to "
                  f"{len(setup.allowed_token_ids)} response tokens, chunks of 64 prompts, no KV "
                  "cache (every new token re-runs the prefix)")),
        BenchRow(
            NAME, ROW_REFERENCE.format(model=label), med["reference"], t_sft, "s",
            note=(f"log π_t(y|x) and log π_t(ỹ|x) under the frozen stage model without grad: "
                  f"{calls['reference']} forwards of {cfg.batch_size} sequences per stage")),
        BenchRow(
            NAME, ROW_POLICY.format(model=label), med["policy"], t_sft, "s",
            note=(f"log π_θ(y|x) and log π_θ(ỹ|x) with grad ({2 * steps} forwards), backward "
                  f"of the SPIN loss, clipping and AdamW ({steps} steps): twice the sequences "
                  "of the SFT epoch")),
    ]


@contextmanager
def _quiet_transformers():
    """Silence transformers' warnings for the block: an untrained model samples ``[PAD]`` now and
    then, which makes GPT-2 warn about a missing attention mask inside ``model.generate``."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _sampler_row(model_kwargs: dict[str, int], setup: Setup, repeats: int) -> BenchRow:
    label = model_label(model_kwargs)
    stage = frozen_copy(build_model(model_kwargs, setup))
    c, prompts = setup.config, setup.prompts
    common = dict(max_new_tokens=c.max_new_tokens, do_sample=c.do_sample,
                  temperature=c.temperature)
    fixed = partial(generate, stage, setup.tokenizer, prompts, sampler="fixed",
                    allowed_token_ids=setup.allowed_token_ids,
                    generator=torch.Generator().manual_seed(c.seed), **common)
    hf = partial(generate, stage, setup.tokenizer, prompts, sampler="generate", **common)
    with _quiet_transformers():
        words = statistics.mean(len(s.split()) for s in hf())
        t_hf, t_fixed = time_pair(hf, fixed, repeats=repeats, number=1, warmup=1)
    return BenchRow(
        NAME, ROW_SAMPLER.format(n=len(prompts), model=label), t_hf, t_fixed, "s",
        note=(f"optfm.alignment.generate, {c.max_new_tokens} new tokens, sampling at temperature "
              f"{c.temperature:g}, on the untrained starting weights; model.generate: KV cache, "
              f"whole vocabulary (allowed_token_ids does not apply; {words:.2f} words per "
              "response after dropping special tokens), vs the fixed-length sampler of the IRFT "
              f"stage; median of {repeats} interleaved rounds; torch threads "
              f"{torch.get_num_threads()}"))


@register_benchmark(NAME, "IRFT stage vs SFT epoch on the same demonstrations (generation, "
                          "reference passes, policy passes), model.generate vs fixed sampler")
def bench_alignment(repeats: int = 7, *,
                    sizes: Sequence[dict[str, int]] = (MODEL_KWARGS, LARGE_MODEL_KWARGS),
                    n_demos: int = N_DEMOS, batch: int = BATCH) -> list[BenchRow]:
    """The rows of ``optfm bench alignment`` for every model size in ``sizes`` (tests pass a
    tiny size and fewer demonstrations)."""
    if not sizes:
        raise ValueError("sizes must name at least one model size")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    setup = make_setup(n_demos, batch)
    rows: list[BenchRow] = []
    for k, kwargs in enumerate(sizes):
        per_repeat = ROUNDS_PER_REPEAT if k == 0 else LARGE_ROUNDS_PER_REPEAT
        rows += _stage_rows(kwargs, setup, repeats * per_repeat)
        rows.append(_sampler_row(kwargs, setup, repeats))
    return rows

