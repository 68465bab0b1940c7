r"""``optfm bench privacy``: cost of the DP filters (DOPPLER, DiSK) and of the ``make_private`` façade.

Set-up shared by the timing rows: the digits MLP 64-128-10 (tanh, :func:`optfm.models.mlp`) on
:func:`optfm.data.load_digits_split`, expected batch 64, clipping norm C = 1, noise multiplier
σ = 1. Every timed step is ``optimizer.step(closure)`` with a closure that zeroes the gradients,
runs forward and backward on **one fixed, pre-drawn batch of 64** and returns the loss; Poisson
sampling is off (``poisson_sampling=False``) so that every step does identical work and only the
method differs. One timed call runs :data:`STEPS` steps (a few ms); :func:`~optfm.bench.core.time_pair`
alternates measured and baseline **one call at a time** for ``repeats x ROUNDS_PER_REPEAT`` rounds
and reports the medians, divided by :data:`STEPS`. Alternating at a few-ms grain over many rounds
(rather than few long rounds) keeps the ratio honest on a shared machine whose load changes on a
scale of tenths of a second: both sides of a round see the same load, and the median over ~100
rounds discards the rounds a context switch landed in. ``optfm bench`` first calls
:func:`optfm.bench.core.steady_allocator`, which stops glibc from returning the per-sample gradient blocks to the kernel between steps: otherwise
page faults, whose pattern depends on the allocation history rather than on the code, can double
the cost of one side (two identical DP-SGD optimizers were measured at 1.0 and 3.0 ms per step).

Timing rows (ratio = measured / baseline; each row's note also gives the number of ATen operator
calls of one step on each side, counted with :class:`OpCounter`: a noise-free view of the extra
work, useful when the machine is too busy for the timings to resolve a few per cent):

- ``DOPPLER a9b1 step / DP-SGD step`` (target <= 1.05): the low-pass filter is post-processing of
  the noised gradient: a few element-wise ops on parameter-sized tensors, against a DP-SGD step
  whose cost is per-sample gradients, clipping and noise.
- ``DiSK c=1 step / DP-Adam step`` (target <= 1.10): DiSK's one-evaluation mode
  (:meth:`KalmanFilter.one_evaluation`, κ = 0.7): one forward/backward at the extrapolated point
  x + γd, plus the Kalman update and the d bookkeeping; base optimizer Adam on both sides.

  Both filters add a fixed cost per step (a few small element-wise ATen calls per parameter
  tensor: +20 calls for DOPPLER, +40 for DiSK c=1), independent of the batch. A DP step of this
  tiny model at batch 64 takes about 1 ms on one core, so that fixed cost is a few per cent of it;
  it shrinks in proportion as the batch or the model grows.
- ``DiSK 2-eval (κ=0.7, γ=0.5) step / DP-Adam step`` (target <= 2.1): the general mode needs two
  forward/backward passes (at x + γd and at x), combined per sample before one clipping; clipping,
  noise and the Adam step still happen once, so the ratio is below 2 when the implementation adds
  nothing but the second pass. The target allows 5 % over 2 for the combination and the filter.
- ``make_private DP-SGD step / Opacus DP-SGD step`` (target <= 1.02): our
  :func:`optfm.privacy.make_private` without a filter against DP-SGD built directly with
  ``opacus.PrivacyEngine().make_private(...)`` (same σ, C, batch, accountant): the façade must add
  nothing.
- ``DP-SGD step / SGD step`` (report only): the price of privacy itself (per-sample gradients,
  clipping, noise, accounting) against a plain non-private SGD step on the same batch.

Memory rows (unit ``bytes``):

- ``DOPPLER a9b1 state / parameter bytes`` and ``DiSK state / parameter bytes``: the persistent
  state of the filter after a few steps, counted as the bytes of the **distinct storages** behind
  ``filter.buffers()`` (so a buffer that were a view of another would not be counted twice),
  against the bytes of the trainable parameters. The papers' claims are exact: DOPPLER keeps
  n_a + n_b parameter-sized buffers (1 for ``a9b1``), DiSK keeps 2 (m and d). The target is the
  exact expected ratio; the tests assert equality.
- ``DiSK 2-eval peak / stash-copy peak`` (target < 1, written ``<= 0.99``): the peak extra memory
  during one DiSK two-evaluation step (κ = 0.7, γ = 0.5) at batch 256, where per-sample gradients
  (256 x 9,610 floats = 9.4 MiB per full set) dominate everything else the step allocates.
  *Ours* is :class:`optfm.privacy.PrivateOptimizer`, which hands the first evaluation's per-sample
  gradients to Opacus as the accumulator of the second backward pass
  (:func:`optfm.privacy.disk.combine_two_point_grad_samples`). The *baseline* is
  :func:`stash_disk_step` in this module, an "Opacus-research-style" implementation written only
  for this comparison: it clones all per-sample gradients of the first evaluation, runs the second
  evaluation into fresh per-sample gradients, and combines the two sets afterwards (in place, so
  it is not a strawman). Both run the same clipping, noise, filter and Adam step on identical
  models, batch and filter state (two warm-up steps first, then ``zero_grad`` so no per-sample
  gradients of the previous step are alive). Expect about 1.9 full sets for ours (the full set of
  the first evaluation plus the 64x128 layer's transient, which Opacus materialises before adding
  it into the accumulator) against about 2.9 for the stash (two full sets plus that transient and
  Opacus's fresh zero-filled accumulator for the layer), i.e. a ratio near 0.65 on this model. The
  note of the row gives both peaks in full sets, and for reference the peak of a plain
  one-evaluation DP-Adam step: ours should match it (the second evaluation adds no peak memory).

Tiny-Llama rows (report only; issue 12): what DP costs a causal LM, with per-sample gradients
(``grad_sample_mode="hooks"``) and with ghost clipping (``"ghost"``), for full fine-tuning and for
LoRA (rank 8 on every projection, PEFT; base frozen). The model is a ``LlamaForCausalLM`` from
config (:func:`optfm.models.tiny_llama`: vocab 1000, hidden 128, MLP 256, 2 layers, 2 heads,
untied embeddings; 584,320 parameters, of which LoRA trains 34,816), prepared with
:func:`optfm.privacy.prepare_lm_for_dp`, on one fixed batch of 16 random sequences of 32 tokens,
loss :class:`optfm.privacy.CausalLMLoss` (through ``engine.criterion`` in the DP runs). The DP
side is DP-Adam from :func:`make_private` (σ = 1, C = 1, no filter: the filters' own cost is in
the rows above; no Poisson sampling); the baseline is plain Adam on the same model, loss and batch.

- ``tiny Llama DP-Adam step / Adam step (MODE, TUNING)``: median step times. The three sides of
  one tuning (hooks, ghost, Adam) run one step each per round, in an order that rotates from round
  to round, for ``repeats x LM_ROUNDS_PER_REPEAT`` rounds (42 by default; a step takes 25-50 ms on
  an idle core, so one step is the timed unit), after three warm-up steps. The note also gives
  the ATen operator calls of one step on each side (:class:`OpCounter`), which do not depend on
  the load: DP adds 1.9-2.9 x the operator calls of an Adam step, ghost more than hooks.
- ``tiny Llama DP-Adam peak / Adam peak (MODE, TUNING)``: the peak of live tensor bytes during
  one step (after ``zero_grad``): the state that lives between steps (parameters, buffers, Adam's
  moments, the batch; distinct storages) plus the peak that :class:`LiveStorageTracker` sees
  allocated during the step. This is the CPU counterpart of ``torch.cuda.max_memory_allocated``;
  it agrees with torch's memory profiler (:func:`optfm.training.memory.peak_tensor_bytes`) to
  0.06 MiB on every side. Deterministic: it does not depend on the machine's load.

Measured on a shared 2-core CPU, one torch thread, default repeats: six runs (four of ``optfm
bench privacy``, two of the section alone) while other jobs kept the machine busy (load average
2.4-5), so the step times are noisy: the ranges cover five runs, the value in brackets is the
sixth, an outlier; the milliseconds are those of the fastest run (under load a step took up to
twice as long, on both sides). The memory was the same to the byte in every run:

=================  ==========================================  ===================================
side               step time / Adam                            peak MiB (/ Adam: 22.39 full,
                                                               16.80 LoRA)
=================  ==========================================  ===================================
hooks, full        1.83-1.86 (2.57); 46.5 vs 25.4 ms           52.41 (2.34 x)
ghost, full        2.04-2.14 (2.75); 51.8 vs 25.4 ms           24.62 (1.10 x)
hooks, LoRA r=8    1.30-1.37 (1.41); 31.0 vs 23.9 ms           16.80 (1.00 x)
ghost, LoRA r=8    1.84-1.93 (2.38); 44.1 vs 23.9 ms           16.93 (1.01 x)
=================  ==========================================  ===================================

So at this size ghost clipping removes almost all of DP's extra memory in full fine-tuning (the
per-sample gradients, 16 x 584,320 floats = 35.7 MiB, are never formed: 52.4 -> 24.6 MiB against
22.4 for Adam) at the price of a second backward pass (ghost steps 7-15 % slower than hooks
steps here). With LoRA the per-sample gradients of the adapters are 2.1 MiB and the step's peak
is reached before they exist (while the activations of the frozen base are alive), so hooks-mode
DP costs no peak memory over Adam and ghost clipping has nothing to save: it only adds the second
backward pass (1.4 x the hooks step; 1.7 x in the outlier run). Opacus's ghost norm of a linear
layer builds two B x T x T Gram matrices (inputs and output gradients), so ghost clipping saves
memory while T² is small next to the layer's in x out (here T² = 1024 against 16,384-32,768),
i.e. for full fine-tuning at moderate sequence lengths. The
tiny-Llama section takes about 15 s of CPU time at the default repeats (29 s wall on the busy
machine; about 6 s at ``repeats=1``, which the tests use).

How memory is measured (CPU has no peak-allocation counter): :class:`LiveStorageTracker`, a
``TorchDispatchMode`` that sees every ATen operator call, including those of the backward pass and
of Opacus's hooks. For every tensor an operator returns whose storage is new (not the storage of
any of its inputs, not already tracked, i.e. an actual allocation rather than a view or an
in-place result) it adds the storage's byte size to a running total and registers a weak
reference whose callback subtracts it the moment the storage is freed. The peak of that total over
the step is the peak extra memory: live bytes allocated during the step, over what existed before
it (parameters, optimizer and filter state, data). This counts real tensors at run time, not a
formula; it misses only scratch memory that kernels allocate and free inside one operator, which
is the same for both implementations.
"""

from __future__ import annotations

import statistics
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.data import load_digits_split
from optfm.models import mlp, tiny_llama
from optfm.privacy import (
    CausalLMLoss,
    KalmanFilter,
    LowPassFilter,
    PrivateOptimizer,
    make_private,
    prepare_lm_for_dp,
)
from optfm.training import make_generator

__all__ = [
    "LiveStorageTracker",
    "OpCounter",
    "bench_privacy",
    "count_ops",
    "filter_state_bytes",
    "parameter_bytes",
    "peak_step_bytes",
    "stash_disk_step",
]

BATCH = 64  # expected batch of the timing rows
MEMORY_BATCH = 256  # batch of the peak-memory row: per-sample gradients dominate
SIGMA = 1.0  # noise multiplier
CLIP = 1.0  # max_grad_norm C
STEPS = 5  # optimizer steps per timed call (a few ms)
ROUNDS_PER_REPEAT = 15  # time_pair rounds per requested repeat (one call each side per round)
NAME = "privacy"

ROW_DOPPLER = "DOPPLER a9b1 step / DP-SGD step"
ROW_DOPPLER_256 = "DOPPLER a9b1 step / DP-SGD step (batch 256)"
ROW_DISK1 = "DiSK c=1 step / DP-Adam step"
ROW_DISK2 = "DiSK 2-eval (kappa=0.7, gamma=0.5) step / DP-Adam step"
ROW_FACADE = "make_private DP-SGD step / Opacus DP-SGD step"
ROW_PRICE = "DP-SGD step / SGD step"
ROW_MEM_DOPPLER = "DOPPLER a9b1 state / parameter bytes"
ROW_MEM_DISK = "DiSK state / parameter bytes"
ROW_PEAK = "DiSK 2-eval peak / stash-copy peak (batch 256)"

# the tiny Llama section: DP-Adam vs Adam, per-sample gradients (hooks) vs ghost clipping
LM_VOCAB, LM_HIDDEN, LM_INTERMEDIATE, LM_LAYERS, LM_HEADS = 1000, 128, 256, 2, 2
LM_BATCH, LM_SEQ = 16, 32
LM_LORA = {"r": 8, "lora_alpha": 16,
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LM_ROUNDS_PER_REPEAT = 6  # interleaved rounds per requested repeat (one step of each side per round)
LM_MODES = ("hooks", "ghost")
LM_TUNINGS = ("full", "LoRA r=8")


def lm_time_row(mode: str, tuning: str) -> str:
    """Name of the tiny-Llama step-time row for ``mode`` (hooks, ghost) and ``tuning``."""
    return f"tiny Llama DP-Adam step / Adam step ({mode}, {tuning})"


def lm_peak_row(mode: str, tuning: str) -> str:
    """Name of the tiny-Llama peak-memory row for ``mode`` (hooks, ghost) and ``tuning``."""
    return f"tiny Llama DP-Adam peak / Adam peak ({mode}, {tuning})"


ROWS_LM = [lm_time_row(m, t) for t in LM_TUNINGS for m in LM_MODES] + [
    lm_peak_row(m, t) for t in LM_TUNINGS for m in LM_MODES]


# ---------------------------------------------------------------------------------------------
# memory measurement


class LiveStorageTracker(TorchDispatchMode):
    """Live bytes of the tensor storages allocated while the mode is active, and their peak.

    ``current`` is the byte total of storages allocated inside the mode and still alive, ``peak``
    its maximum (checked after every operator). A storage counts once, when an operator returns a
    tensor on it that shares storage with none of the operator's inputs; it stops counting when it
    is freed (weak-reference callback). Storages that existed before the mode are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st._cdata, st.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = weakref.ref(st, lambda _r, k=key, n=nbytes: self._freed(k, n))
            self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


class OpCounter(TorchDispatchMode):
    """Counts the ATen operator calls made while active (``counts[name]``, ``total``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], object]) -> Counter[str]:
    """ATen operator calls of one call of ``step``, by operator."""
    with OpCounter() as counter:
        step()
    return counter.counts


def peak_step_bytes(step: Callable[[], object]) -> int:
    """Peak extra bytes (live storages allocated during the call) of one call of ``step``."""
    with LiveStorageTracker() as tracker:
        step()
    return tracker.peak


def _distinct_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def filter_state_bytes(filt: LowPassFilter | KalmanFilter) -> int:
    """Bytes of the distinct storages behind the filter's persistent buffers."""
    return _distinct_storage_bytes(filt.buffers())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters."""
    return _distinct_storage_bytes(p for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# the comparison baseline of the peak-memory row


def stash_disk_step(optimizer: PrivateOptimizer, closure: Callable[[], Any]) -> Any:
    """COMPARISON BASELINE ONLY: a DiSK two-evaluation step that stashes a second full copy of the
    per-sample gradients ("Opacus-research-style").

    Same maths and the same Opacus clipping/noise/accounting as ``optimizer.step(closure)`` with a
    :class:`KalmanFilter` whose c is neither 0 nor 1, but the combination
    ``c G_first + (1 - c) G_second`` is formed after the second evaluation from a clone of all of
    the first evaluation's per-sample gradients, so two full sets are alive during the second
    backward pass. The combination itself is in place (no third set). Used by ``optfm bench
    privacy`` to measure what :func:`optfm.privacy.disk.combine_two_point_grad_samples` saves.
    """
    filt = optimizer.filter
    if not isinstance(filt, KalmanFilter) or filt.c in (0.0, 1.0):
        raise ValueError("stash_disk_step needs a KalmanFilter in the two-evaluation mode")
    c = filt.c
    params = optimizer._trainable()
    x_t = [p.detach().clone() for p in params]
    filt.extrapolate_(params)
    with torch.enable_grad():
        closure()                                        # per-sample gradients at x_t + γ d_t
    stash = [p.grad_sample.clone() for p in params]      # the second full copy
    for p in params:
        p.grad_sample = None                             # the first set itself is released
    with torch.no_grad():
        for p, x in zip(params, x_t):
            p.copy_(x)
    del x_t
    with torch.enable_grad():
        loss = closure()                                 # fresh per-sample gradients at x_t
    with torch.no_grad():
        for p, g_first in zip(params, stash):
            p.grad_sample.mul_(1.0 - c).add_(g_first, alpha=c)
    del stash
    if not optimizer.pre_step():                         # clip once, noise once (Opacus)
        return loss
    optimizer._reduce()                                  # all-reduce under DDP; no-op here
    grads = [p.grad for p in params]
    filt.step(grads)
    filt.before_update(params)
    optimizer.original_optimizer.step()
    filt.after_update(params)
    return loss


# ---------------------------------------------------------------------------------------------
# set-ups


class _Setup:
    """A model/optimizer pair and the closure of one fixed batch; ``run()`` does STEPS steps."""

    def __init__(self, model: nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor,
                 step: Callable[[Any, Callable[[], Any]], Any] | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        loss_fn = nn.CrossEntropyLoss()

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        self.closure = closure
        self._step = step or (lambda opt, cl: opt.step(cl))

    def step(self) -> None:
        self._step(self.optimizer, self.closure)

    def run(self) -> None:
        for _ in range(STEPS):
            self.step()


def _base(opt_name: str, model: nn.Module) -> torch.optim.Optimizer:
    if opt_name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _private(x: torch.Tensor, y: torch.Tensor, batch: int, opt_name: str,
             filt: LowPassFilter | KalmanFilter | None, seed: int = 0,
             step: Callable[[Any, Callable[[], Any]], Any] | None = None) -> _Setup:
    """``make_private`` on the digits MLP; the closure always uses the fixed first batch."""
    model = mlp(generator=make_generator(seed))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    model, opt, _, _ = make_private(
        model, _base(opt_name, model), loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
        filter=filt, poisson_sampling=False, noise_generator=make_generator(seed + 1))
    return _Setup(model, opt, x[:batch], y[:batch], step)


def _opacus(x: torch.Tensor, y: torch.Tensor, batch: int) -> _Setup:
    """DP-SGD built directly with Opacus's ``PrivacyEngine`` (no optfm code in the step)."""
    from opacus import PrivacyEngine

    model = mlp(generator=make_generator(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine(accountant="prv")
    model, opt, _ = engine.make_private(
        module=model, optimizer=_base("sgd", model), data_loader=loader, noise_multiplier=SIGMA,
        max_grad_norm=CLIP, poisson_sampling=False, noise_generator=make_generator(1))
    return _Setup(model, opt, x[:batch], y[:batch])


def _non_private(x: torch.Tensor, y: torch.Tensor, batch: int) -> _Setup:
    model = mlp(generator=make_generator(0))
    return _Setup(model, _base("sgd", model), x[:batch], y[:batch])


def _warm(*setups: _Setup, steps: int = 3) -> None:
    for s in setups:
        for _ in range(steps):
            s.step()


class _LMSetup:
    """The tiny Llama, one fixed batch of random tokens and Adam, private (``mode`` "hooks" or
    "ghost", via :func:`make_private`) or not (``mode=None``); ``step()`` is one training step."""

    def __init__(self, mode: str | None, lora: dict | None, seed: int = 0) -> None:
        with torch.random.fork_rng():  # the same initial weights on every side
            torch.manual_seed(seed)
            model = tiny_llama(vocab_size=LM_VOCAB, hidden_size=LM_HIDDEN,
                               intermediate_size=LM_INTERMEDIATE, num_hidden_layers=LM_LAYERS,
                               num_attention_heads=LM_HEADS, max_position_embeddings=LM_SEQ)
        model = prepare_lm_for_dp(model, lora=lora, grad_sample_mode=mode or "hooks")
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.Adam(params, lr=1e-3)
        self.ids = torch.randint(0, LM_VOCAB, (LM_BATCH, LM_SEQ), generator=make_generator(seed))
        self.mask = torch.ones_like(self.ids)
        criterion: Any = CausalLMLoss()
        if mode is not None:
            loader = DataLoader(TensorDataset(self.ids, self.mask, self.ids), batch_size=LM_BATCH)
            model, optimizer, _, engine = make_private(
                model, optimizer, loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                poisson_sampling=False, grad_sample_mode=mode, criterion=criterion,
                noise_generator=make_generator(seed + 1))
            criterion = engine.criterion
        model.train()
        self.model, self.optimizer, self.criterion = model, optimizer, criterion

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # one expression: a local name for the logits would keep them alive during backward
        self.criterion(self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits,
                       self.ids).backward()
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Bytes alive between steps: parameters, buffers, optimizer state and the batch."""
        opt = getattr(self.optimizer, "original_optimizer", self.optimizer)
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return _distinct_storage_bytes([*self.model.parameters(), *self.model.buffers(), *state,
                                        self.ids, self.mask])

    def peak_bytes(self) -> tuple[int, int]:
        """``(state, peak)``: :meth:`state_bytes` and the peak live tensor bytes of one step
        (state + the peak of what the step allocates, :func:`peak_step_bytes`)."""
        self.optimizer.zero_grad(set_to_none=True)  # no gradients of the previous step alive
        state = self.state_bytes()
        return state, state + peak_step_bytes(self.step)


def _time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function; one call of each per round, in an order that
    rotates from round to round (so every side runs first, second, ... equally often)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def _measure_lm(lora: dict | None, rounds: int) -> tuple[dict, dict, dict, int]:
    """Step-time medians (keys ``"hooks"``, ``"ghost"``, ``"adam"``), ATen operator calls of one
    step and ``(state, peak)`` bytes (keys ``"hooks"``, ``"ghost"``, ``None``) and the trainable
    parameter count, for one tuning."""
    with warnings.catch_warnings():
        # Opacus's notices (secure RNG off; RDP orders; its backward hooks on a first layer whose
        # input needs no gradient, as with LoRA) and PEFT asking transformers for a deprecated
        # attribute when it wraps the model
        warnings.filterwarnings("ignore", message=".*(Secure RNG|Optimal order)")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
        setups = {m: _LMSetup(m, lora) for m in (*LM_MODES, None)}
        for s in setups.values():
            for _ in range(3):  # Adam state, lazily built buffers and hooks
                s.step()
        times = _time_interleaved({m or "adam": s.step for m, s in setups.items()}, rounds)
        ops = {m: sum(count_ops(s.step).values()) for m, s in setups.items()}
        mem = {m: s.peak_bytes() for m, s in setups.items()}
    return times, ops, mem, setups[None].trainable


def _bench_lm(repeats: int) -> list[BenchRow]:
    """The tiny-Llama rows: step time and peak memory of DP-Adam (hooks, ghost) over Adam."""
    rounds = repeats * LM_ROUNDS_PER_REPEAT
    threads = torch.get_num_threads()
    time_rows, peak_rows = [], []
    for tuning in LM_TUNINGS:
        t, ops, mem, trainable = _measure_lm(None if tuning == "full" else LM_LORA, rounds)
        psg = LM_BATCH * trainable * 4  # one full set of float32 per-sample gradients
        shape = (f"Llama {LM_LAYERS} layers, hidden {LM_HIDDEN}, vocab {LM_VOCAB}, "
                 f"{trainable:,} trainable parameters ({tuning}), batch {LM_BATCH} x {LM_SEQ} tokens")
        for mode in LM_MODES:
            time_rows.append(BenchRow(
                NAME, lm_time_row(mode, tuning), t[mode], t["adam"], "s", target=None,
                note=(f"ATen ops/step {ops[mode]} vs {ops[None]}; "
                      f"{shape}; DP-Adam (σ={SIGMA:g}, C={CLIP:g}, no filter) vs Adam on the same "
                      f"model, loss and batch: {t[mode] * 1e3:.1f} vs {t['adam'] * 1e3:.1f} ms "
                      f"(hooks {t['hooks'] * 1e3:.1f}, ghost {t['ghost'] * 1e3:.1f}); medians of "
                      f"{rounds} interleaved rounds; torch threads {threads}")))
            (state, peak), (b_state, b_peak) = mem[mode], mem[None]
            peak_rows.append(BenchRow(
                NAME, lm_peak_row(mode, tuning), float(peak), float(b_peak), "bytes", target=None,
                note=(f"{shape}; peak live tensor bytes of one step (state between steps + peak "
                      f"allocated in the step, LiveStorageTracker): {peak / 2**20:.1f} MiB "
                      f"(state {state / 2**20:.1f}) vs {b_peak / 2**20:.1f} MiB (state "
                      f"{b_state / 2**20:.1f}); hooks {mem['hooks'][1] / 2**20:.1f}, ghost "
                      f"{mem['ghost'][1] / 2**20:.1f} MiB; one full set of per-sample gradients "
                      f"of the trainable parameters = {psg / 2**20:.1f} MiB")))
    return time_rows + peak_rows


# ---------------------------------------------------------------------------------------------
# the benchmark


@register_benchmark(NAME, "DP filters (DOPPLER, DiSK) and the make_private façade vs Opacus: "
                          "step time, filter state, DiSK peak memory; a tiny Llama's DP step and peak "
                          "memory over non-private, hooks vs ghost clipping, full vs LoRA")
def bench_privacy(repeats: int = 7) -> list[BenchRow]:
    data = load_digits_split(random_state=0)
    x, y = data.x_train, data.y_train
    rows: list[BenchRow] = []

    def timed(name: str, measured: _Setup, baseline: _Setup, target: float | None,
              note: str = "") -> None:
        _warm(measured, baseline)
        n_m, n_b = (sum(count_ops(s.step).values()) for s in (measured, baseline))
        ops = f"ATen ops/step {n_m} vs {n_b}"
        t_m, t_b = time_pair(measured.run, baseline.run, repeats=repeats * ROUNDS_PER_REPEAT,
                             number=1)
        rows.append(BenchRow(NAME, name, t_m / STEPS, t_b / STEPS, "s", target=target,
                             note=f"{ops}; {note}" if note else ops))

    with warnings.catch_warnings():
        # Opacus's hooks on a first layer whose input needs no gradient; and Opacus's notice that
        # the secure RNG is off (benchmarks need no cryptographic noise).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")

        # --- step time ---------------------------------------------------------------------
        timed(ROW_DOPPLER, _private(x, y, BATCH, "sgd", LowPassFilter.preset("a9b1")),
              _private(x, y, BATCH, "sgd", None), 1.05,
              note="a fixed cost (2 element-wise ops per parameter tensor, ~17 us here) on a ~0.9 ms step")
        timed(ROW_DOPPLER_256, _private(x, y, MEMORY_BATCH, "sgd", LowPassFilter.preset("a9b1")),
              _private(x, y, MEMORY_BATCH, "sgd", None), 1.05,
              note="same filter cost, larger step: the ratio falls toward 1 as the step grows")
        timed(ROW_DISK1, _private(x, y, BATCH, "adam", KalmanFilter.one_evaluation(0.7)),
              _private(x, y, BATCH, "adam", None), 1.10)
        timed(ROW_DISK2, _private(x, y, BATCH, "adam", KalmanFilter(0.7, 0.5)),
              _private(x, y, BATCH, "adam", None), 2.1,
              note="two forward/backward passes, one clip/noise/Adam step: at most ~2")
        timed(ROW_FACADE, _private(x, y, BATCH, "sgd", None), _opacus(x, y, BATCH), 1.02,
              note="baseline: opacus.PrivacyEngine().make_private(...), same σ, C, batch")
        timed(ROW_PRICE, _private(x, y, BATCH, "sgd", None), _non_private(x, y, BATCH), None,
              note="per-sample gradients + clipping + noise + accounting")

        # --- persistent filter state ---------------------------------------------------------
        for name, filt, opt_name in ((ROW_MEM_DOPPLER, LowPassFilter.preset("a9b1"), "sgd"),
                                     (ROW_MEM_DISK, KalmanFilter(0.7, 0.5), "adam")):
            s = _private(x, y, BATCH, opt_name, filt)
            _warm(s)
            expected = filt.n_a + filt.n_b if isinstance(filt, LowPassFilter) else 2
            rows.append(BenchRow(
                NAME, name, float(filter_state_bytes(filt)), float(parameter_bytes(s.model)),
                "bytes", target=float(expected),
                note=f"must equal exactly {expected} x parameter bytes ({len(filt.buffers())} buffers)"))

        # --- DiSK peak memory: ours vs stashing a second per-sample copy ----------------------
        ours = _private(x, y, MEMORY_BATCH, "adam", KalmanFilter(0.7, 0.5))
        stash = _private(x, y, MEMORY_BATCH, "adam", KalmanFilter(0.7, 0.5), step=stash_disk_step)
        dp_adam = _private(x, y, MEMORY_BATCH, "adam", None)  # reference for the note only
        _warm(ours, stash, dp_adam, steps=2)  # filter state (m, d), Adam moments exist already
        peaks = {}
        for label, s in (("ours", ours), ("stash", stash), ("dp-adam", dp_adam)):
            s.optimizer.zero_grad(set_to_none=True)
            peaks[label] = peak_step_bytes(s.step)
        full_set = MEMORY_BATCH * parameter_bytes(ours.model)
        rows.append(BenchRow(
            NAME, ROW_PEAK, float(peaks["ours"]), float(peaks["stash"]), "bytes", target=0.99,
            note=(f"peak extra bytes during one step, measured with LiveStorageTracker; one full set "
                  f"of per-sample gradients = {full_set / 2**20:.2f} MiB; peaks = "
                  f"{peaks['ours'] / full_set:.2f} (ours) vs {peaks['stash'] / full_set:.2f} "
                  f"(stash) full sets; a one-evaluation DP-Adam step: "
                  f"{peaks['dp-adam'] / full_set:.2f}")))

    # --- a tiny Llama: DP-Adam over Adam, hooks vs ghost, full fine-tuning vs LoRA -------------
    rows += _bench_lm(repeats)
    return rows
