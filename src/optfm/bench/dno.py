r"""``optfm bench dno``: time and peak memory of one DNO iteration, with and without gradient
checkpointing, against one plain sampling pass.

Set-up shared by every row: a ``diffusers.UNet2DModel`` from :func:`optfm.models.tiny_unet2d`
(the digits model's architecture, 701k parameters, 8x8x1) with **random weights** from one seed
(no training: the cost of an iteration does not depend on the weights), frozen
(``requires_grad_(False)``, eval mode), fp32; the digits noise schedule
(:data:`optfm.diffusion.DIGITS_SCHEDULER_CONFIG`); :class:`optfm.diffusion.DDIMSampler` with
η = 1 and S steps; a batch of :data:`BATCH` noise tensors of shape (B, S+1, 1, 8, 8); the
differentiable :class:`~optfm.alignment.dno_rewards.BrightnessReward`. The DNO iteration is
:meth:`optfm.alignment.DNO.step` with the ``"grad"`` estimator (sampling with the graph, reward,
backward through all S steps, per-sample clipping, Adam), γ = 0 and ``reg_permutations=1``: the
regulariser does not enter the update at γ = 0, but DNO still evaluates R for its record, and
with the default K = 100 permutations that costs B·K·D floats (D = (S+1)·64) -- the last row
shows how much; with K = 1 the rows measure the sampler. The plain sampling pass is
``sampler(noise)`` under ``torch.no_grad()`` (what generating a batch costs).

Rows (ratio = measured / baseline; report only, the issue sets no target), for every S in
``steps`` (default :data:`STEPS` = 10, 25, 50):

- ``DNO iteration / plain sampling pass (checkpointed, S=…)`` and ``(no checkpointing, S=…)``:
  medians over ``repeats x ROUNDS_PER_REPEAT`` rounds of :func:`~optfm.bench.core.time_pair`
  (the two sides alternate, one call each per round), after one warm-up iteration (Adam state).
  Expected about 2x without checkpointing (a forward, a backward of about the forward's cost) and
  about 3x+ with it (each UNet forward runs again during the backward).
- ``DNO iteration peak memory, checkpointed / not (S=…)``: the largest sum of bytes of tensor
  storages allocated during one iteration and alive at the same time (:func:`peak_new_tensor_bytes`:
  parameters, the noise and Adam's state exist before and are not counted, nor are views of them).
- ``DNO iteration peak memory S=max / S=min (checkpointed)`` and ``(no checkpointing)``: how the
  peak grows with the number of steps. With checkpointing only the per-step inputs
  (latent-sized) and the noise-sized tensors grow with S, so the ratio stays near 1; without it
  every step keeps its UNet activations, so the peak grows about linearly in S.
- ``hybrid iteration / grad iteration (K=4, S=min, checkpointed)``: the Hybrid-2 estimator (one
  sampling pass with the graph, K = :data:`HYBRID_K` no-grad passes of perturbed noise, the
  backward of the surrogate) against the ``"grad"`` iteration, same sampler; medians of
  ``repeats x ROUNDS_PER_REPEAT`` interleaved rounds.
- ``DNO iteration peak memory, R with K=100 / K=1 (S=max, checkpointed)``: the default
  regulariser's share of the iteration's memory (its permuted copies, chunked at 2^24 floats).

Peak memory comes from :func:`peak_new_tensor_bytes`, a ``TorchDispatchMode`` that counts every
storage an operator allocates (outputs whose storage is not one of the operator's inputs) until
it is freed (a weak reference on the storage). It agrees with torch's memory profiler
(:func:`optfm.training.peak_tensor_bytes`, minus parameters and optimizer state) to about 0.1 MiB
on this model and costs ~2x the iteration instead of ~40x, which keeps the default run short.

Measured on 2 CPU cores with one thread, three runs of ``optfm bench dno`` (default
``--repeats 7``, 40-46 s each): a DNO iteration costs 3.71-3.73x / 3.66-3.89x / 3.85-3.98x a plain
sampling pass with checkpointing and 2.06-2.07x / 2.07-2.12x / 2.08x without (S = 10 / 25 / 50);
peak memory (deterministic) 3.98 / 4.04 / 4.14 MiB with checkpointing against 37.7 / 93.9 /
187.5 MiB without, i.e. 1.04x from S = 10 to 50 against 4.98x; hybrid / grad 2.03-2.08x; R with
K = 100 raises the S = 50 peak to 12.6 MiB (3.05x).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from optfm.alignment import DNO
from optfm.alignment.dno_rewards import BrightnessReward
from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.diffusion import DIGITS_SCHEDULER_CONFIG, DDIMSampler
from optfm.models.factories import tiny_unet2d

__all__ = [
    "BATCH",
    "HYBRID_K",
    "MODEL_KWARGS",
    "ROW_HYBRID",
    "ROW_MEM",
    "ROW_MEM_GROWTH",
    "ROW_REG",
    "ROW_TIME",
    "STEPS",
    "bench_dno",
    "build_unet",
    "make_dno",
    "peak_new_tensor_bytes",
]

NAME = "dno"
STEPS: tuple[int, ...] = (10, 25, 50)
BATCH = 8
HYBRID_K = 4
MODEL_KWARGS: dict[str, Any] = {}
"""Arguments of :func:`~optfm.models.tiny_unet2d` (default: the digits model's architecture)."""
ROUNDS_PER_REPEAT = 1
SEED = 0

ROW_TIME = "DNO iteration / plain sampling pass ({mode}, S={steps})"
ROW_MEM = "DNO iteration peak memory, checkpointed / not (S={steps})"
ROW_MEM_GROWTH = "DNO iteration peak memory S={hi} / S={lo} ({mode})"
ROW_HYBRID = "hybrid iteration / grad iteration (K={k}, S={steps}, checkpointed)"
ROW_REG = "DNO iteration peak memory, R with K=100 / K=1 (S={steps}, checkpointed)"
CKPT, NO_CKPT = "checkpointed", "no checkpointing"


# ---------------------------------------------------------------------------------------------
# peak memory


class _NewStorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st._cdata, st.nbytes()
            if key in inputs or key in self._refs or nbytes == 0:
                continue  # a view or in-place result, or already counted
            self._refs[key] = weakref.ref(st, lambda _r, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out


def peak_new_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` and return the peak of the bytes of tensor storages allocated *during* the call
    and alive at the same time (forward, backward and optimizer ops alike; storages that existed
    before, and views or in-place results of them, are not counted). Device-agnostic; counts
    storage sizes, not the allocator's rounding."""
    tracker = _NewStorageTracker()
    with tracker:
        fn()
    return tracker.peak


# ---------------------------------------------------------------------------------------------
# set-up


def build_unet(model_kwargs: dict[str, Any] | None = None, *, seed: int = SEED) -> torch.nn.Module:
    """A frozen :func:`~optfm.models.tiny_unet2d` with random weights from ``seed``."""
    torch.manual_seed(seed)  # diffusers initialises weights from the global generator
    unet = tiny_unet2d(**(MODEL_KWARGS if model_kwargs is None else model_kwargs))
    return unet.eval().requires_grad_(False)


def make_dno(unet: torch.nn.Module, steps: int, *, checkpointing: bool = True,
             batch_size: int = BATCH, estimator: str = "grad", reg_permutations: int = 1,
             seed: int = SEED) -> DNO:
    """The benchmarked DNO: DDIM (η = 1, ``steps`` steps) over ``unet``, brightness reward, γ = 0,
    noise and perturbations from ``seed``."""
    sampler = DDIMSampler(unet, DIGITS_SCHEDULER_CONFIG, num_inference_steps=steps, eta=1.0,
                          gradient_checkpointing=checkpointing)
    noise = sampler.randn_noise(batch_size, generator=torch.Generator().manual_seed(seed))
    return DNO(sampler, BrightnessReward(), noise, gamma=0.0, estimator=estimator,
               n_perturb=HYBRID_K, reg_permutations=reg_permutations,
               generator=torch.Generator().manual_seed(seed + 1))


def _plain_pass(dno: DNO) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return dno.sampler(dno.noise.detach())
    return run


def _step(dno: DNO) -> Callable[[], None]:
    def run() -> None:
        dno.step()
    return run


def _median_peak(fn: Callable[[], Any], samples: int = 1) -> int:
    return sorted(peak_new_tensor_bytes(fn) for _ in range(samples))[samples // 2]


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------------
# the benchmark


@register_benchmark(NAME, "DNO iteration vs plain DDIM sampling pass: time and peak memory with "
                          "and without gradient checkpointing (S = 10, 25, 50), hybrid vs grad")
def bench_dno(repeats: int = 7, *, steps: Sequence[int] = STEPS, batch_size: int = BATCH,
              model_kwargs: dict[str, Any] | None = None) -> list[BenchRow]:
    """The rows of ``optfm bench dno`` (tests pass small ``steps``, batch and model)."""
    steps = sorted(set(int(s) for s in steps))
    if len(steps) < 2 or steps[0] < 1:
        raise ValueError(f"steps must hold at least two different positive ints, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t_start = time.perf_counter()
    unet = build_unet(model_kwargs)
    n_params = sum(p.numel() for p in unet.parameters())
    rounds = repeats * ROUNDS_PER_REPEAT
    threads = torch.get_num_threads()
    setup = (f"tiny_unet2d ({n_params:,} parameters, random weights), batch {batch_size}, "
             f"DDIM η=1, brightness reward, grad estimator, γ=0; torch threads {threads}")
    rows: list[BenchRow] = []
    peaks: dict[tuple[int, bool], int] = {}
    for s in steps:
        dnos = {ck: make_dno(unet, s, checkpointing=ck, batch_size=batch_size)
                for ck in (True, False)}
        for ck, dno in dnos.items():
            dno.step()  # Adam state, warm allocator
            t_it, t_plain = time_pair(_step(dno), _plain_pass(dno), repeats=rounds, number=1,
                                      warmup=0)
            rows.append(BenchRow(
                NAME, ROW_TIME.format(mode=CKPT if ck else NO_CKPT, steps=s), t_it, t_plain,
                "s", note=(f"median of {rounds} interleaved rounds; {setup}")
                if (s, ck) == (steps[0], True) else ""))
        for ck, dno in dnos.items():
            peaks[(s, ck)] = _median_peak(_step(dno))
        rows.append(BenchRow(
            NAME, ROW_MEM.format(steps=s), float(peaks[(s, True)]), float(peaks[(s, False)]),
            "bytes",
            note=("bytes of tensor storages allocated during one iteration and alive at once "
                  "(parameters, noise and Adam state not counted); noise tensor "
                  f"{_mib(dnos[True].noise.numel() * 4)} at S={s}") if s == steps[0] else ""))
    lo, hi = steps[0], steps[-1]
    for ck in (True, False):
        mode = CKPT if ck else NO_CKPT
        rows.append(BenchRow(
            NAME, ROW_MEM_GROWTH.format(hi=hi, lo=lo, mode=mode), float(peaks[(hi, ck)]),
            float(peaks[(lo, ck)]), "bytes",
            note=(f"steps ratio {hi / lo:g}; checkpointing keeps one UNet forward's activations "
                  "(recomputed in the backward) plus per-step inputs") if ck else
            f"steps ratio {hi / lo:g}; every step keeps its UNet activations for the backward"))

    grad_dno = make_dno(unet, lo, batch_size=batch_size)
    hyb_dno = make_dno(unet, lo, batch_size=batch_size, estimator="hybrid")
    for dno in (grad_dno, hyb_dno):
        dno.step()
    t_h, t_g = time_pair(_step(hyb_dno), _step(grad_dno), repeats=rounds, number=1, warmup=0)
    rows.append(BenchRow(
        NAME, ROW_HYBRID.format(k=HYBRID_K, steps=lo), t_h, t_g, "s",
        note=(f"median of {rounds} interleaved rounds; hybrid = the grad iteration's sampling "
              f"with graph and backward + {HYBRID_K} no-grad sampling passes + reward calls")))

    reg_dno = make_dno(unet, hi, batch_size=batch_size, reg_permutations=100)
    reg_dno.step()
    p_reg = _median_peak(_step(reg_dno))
    d_size = reg_dno.noise[0].numel()
    rows.append(BenchRow(
        NAME, ROW_REG.format(steps=hi), float(p_reg), float(peaks[(hi, True)]), "bytes",
        note=(f"γ=0, so R only enters the record; R's permuted copies are B·K·D floats = "
              f"{_mib(batch_size * 100 * d_size * 4)} (D={d_size}), plus K·D int64 "
              f"permutations = {_mib(100 * d_size * 8)}; whole benchmark "
              f"{time.perf_counter() - t_start:.0f} s")))
    return rows
