r"""``optfm bench advunlearn``: the cost of one AdvUnlearn iteration against one ESD iteration, as
a function of the number of attack steps.

Set-up shared by every row: the digits text-to-image architecture of
:mod:`optfm.diffusion.text2image` with **random weights** from one seed (no training: the cost of
an iteration does not depend on the weights) -- :func:`~optfm.diffusion.text2image.build_prompt_tokenizer`,
:func:`~optfm.diffusion.text2image.tiny_text_encoder` (``CLIPTextModel``, hidden 64, 2 layers, 8
positions), :func:`~optfm.diffusion.text2image.tiny_text_unet` (``UNet2DConditionModel``, 8x8x1)
and :data:`optfm.diffusion.DIGITS_SCHEDULER_CONFIG`; fp32. Concept ``"a handwritten seven"``,
retain prompts the nine other digits, γ = 1, retain batch 5, DDIM partial sampling with
:data:`DDIM_STEPS` steps and guidance 3 (the settings of ``optfm run concept-erasure``).

Both sides train the **same trainable set**: the text encoder's transformer layers + final
LayerNorm (``trainable="layers"``), UNet frozen.

- Baseline: :class:`optfm.unlearning.advunlearn.ESD` with ``train="text_encoder"`` (the ESD loss
  + γ·ℓ_R, no attack).
- Measured: :class:`optfm.unlearning.advunlearn.AdvUnlearn` past its warm-up (``warmup=1``; one
  iteration is run before timing), i.e. with a fresh :class:`SoftPromptAttack` (1 token, Adam) of
  K steps every iteration, for K in ``attack_steps`` (default :data:`ATTACK_STEPS` = 1, 5, 10,
  30), and with the ``fast`` attack (one sign-gradient step).

Every row builds its own ESD and AdvUnlearn trainer (each on its own copy of the random text
encoder, same seed), runs one iteration of each (AdvUnlearn's warm-up, Adam state), then times
them with :func:`~optfm.bench.core.time_pair`, one iteration per side per round, alternating,
``repeats x ROUNDS_PER_REPEAT`` rounds, medians. Before every timed iteration the trainer's
generator is re-seeded (:func:`stop_seed`) so that every iteration of both sides partially samples
to the same step, ``DDIM_STEPS // 2`` (the cost of an iteration is linear in that depth, and the
training draws it uniformly, so this is about the mean cost), with the same retain batch and
noise: the ratio isolates the attack. (Left random, the depth makes the ESD median -- the
denominator -- swing by ±30 % between runs.)

Rows (ratio = measured / baseline; report only):

- ``AdvUnlearn iteration / ESD iteration (attack steps=K)`` for every K; expected
  ≈ 1 + K·a + c, with a the cost of one attack step (an encoder + UNet forward and backward on
  one prompt, w.r.t. the soft token only) relative to the ESD iteration (partial sampling of
  ``DDIM_STEPS``/2 guided UNet calls on 1 + 5 prompts, the ESD + utility forward/backward, Adam).
  c is the attack's fixed overhead: its final loss evaluation and the initial random token.
- ``AdvUnlearn iteration / ESD iteration (fast attack)``: one sign step; ≈ the K = 1 row.
- ``marginal attack step / ESD iteration``: (t(K_max) − t(K_min)) / (K_max − K_min) against the
  ESD iteration, i.e. a above.

Measured on 2 shared CPU cores with one torch thread, two runs of ``optfm bench advunlearn``
(default ``--repeats 7``, ~31 s each): AdvUnlearn / ESD = 1.07-1.12 (K = 1), 1.37-1.38 (K = 5),
1.71 (K = 10), 3.07-3.12 (K = 30), fast 1.08-1.11; one attack step ≈ 0.063-0.071 ESD
iterations (ESD iteration ~140-150 ms).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optfm.bench.core import BenchRow, register_benchmark, time_pair

__all__ = [
    "ATTACK_STEPS",
    "DDIM_STEPS",
    "ROW_FAST",
    "ROW_MARGINAL",
    "ROW_STEPS",
    "bench_advunlearn",
    "build_components",
    "make_pair",
    "stop_seed",
]

NAME = "advunlearn"
ATTACK_STEPS: tuple[int, ...] = (1, 5, 10, 30)
DDIM_STEPS = 20
RETAIN_BATCH = 5
ROUNDS_PER_REPEAT = 2
SEED = 0

ROW_STEPS = "AdvUnlearn iteration / ESD iteration (attack steps={k})"
ROW_FAST = "AdvUnlearn iteration / ESD iteration (fast attack)"
ROW_MARGINAL = "marginal attack step / ESD iteration"


def build_components(seed: int = SEED) -> tuple[Any, torch.nn.Module, torch.nn.Module,
                                                dict[str, Any]]:
    """``(tokenizer, text_encoder, unet, scheduler_config)`` of the digits text-to-image
    architecture with random weights from ``seed``."""
    from optfm.diffusion import DIGITS_SCHEDULER_CONFIG
    from optfm.diffusion.text2image import build_prompt_tokenizer, tiny_text_encoder, tiny_text_unet

    torch.manual_seed(seed)  # transformers / diffusers initialise from the global generator
    tok = build_prompt_tokenizer()
    enc = tiny_text_encoder(tok)
    unet = tiny_text_unet()
    return tok, enc, unet, dict(DIGITS_SCHEDULER_CONFIG)


def make_pair(components: tuple[Any, torch.nn.Module, torch.nn.Module, dict[str, Any]],
              attack_steps: int, *, fast: bool = False, ddim_steps: int = DDIM_STEPS,
              seed: int = SEED) -> tuple[Any, Any]:
    """``(advunlearn, esd)`` trainers on their own copies of the text encoder (same weights,
    same seed; the UNet is shared and frozen), both training ``trainable="layers"``."""
    from optfm.diffusion.text2image import digit_prompt
    from optfm.unlearning.advunlearn import ESD, AdvUnlearn, AdvUnlearnConfig, ESDConfig

    tok, enc, unet, sched = components
    concept = digit_prompt(7)
    retain = [digit_prompt(d) for d in range(10) if d != 7]
    common: dict[str, Any] = {"retain_prompts": retain, "gamma": 1.0, "lr": 1e-4,
                              "ddim_steps": ddim_steps, "guidance_scale": 3.0,
                              "retain_batch_size": RETAIN_BATCH, "trainable": "layers",
                              "seed": seed}
    adv = AdvUnlearn(copy.deepcopy(enc), tok, unet, sched,
                     AdvUnlearnConfig(concept, warmup=1, attack_steps=attack_steps,
                                      attack_lr=1e-2, attack_fast=fast, **common))
    esd = ESD(copy.deepcopy(enc), tok, unet, sched,
              ESDConfig(concept, train="text_encoder", **common))
    return adv, esd


def stop_seed(ddim_steps: int, stop: int | None = None) -> int:
    """The smallest seed for which a trainer's generator draws partial-sampling stop index
    ``stop`` (default ``ddim_steps // 2``, the mean depth of the uniform draw, rounded up)."""
    stop = ddim_steps // 2 if stop is None else stop
    for seed in range(100_000):
        g = torch.Generator().manual_seed(seed)
        if int(torch.randint(0, ddim_steps, (1,), generator=g)) == stop:
            return seed
    raise ValueError(f"no seed draws stop index {stop} of {ddim_steps}")  # pragma: no cover


def _step(trainer: Any, seed: int) -> Callable[[], None]:
    def run() -> None:
        trainer.generator.manual_seed(seed)  # same stop index, retain batch and noise every time
        trainer.step()
    return run


@register_benchmark(NAME, "AdvUnlearn iteration vs ESD iteration (text encoder, tiny digits "
                          "text-to-image model): attack steps 1, 5, 10, 30 and the fast attack")
def bench_advunlearn(repeats: int = 7, *, attack_steps: Sequence[int] = ATTACK_STEPS,
                     ddim_steps: int = DDIM_STEPS) -> list[BenchRow]:
    """The rows of ``optfm bench advunlearn`` (tests pass fewer ``attack_steps``)."""
    ks = sorted(set(int(k) for k in attack_steps))
    if len(ks) < 2 or ks[0] < 1:
        raise ValueError(f"attack_steps must hold at least two different positive ints, got {ks}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t_start = time.perf_counter()
    comps = build_components()
    n_enc = sum(p.numel() for p in comps[1].parameters())
    n_unet = sum(p.numel() for p in comps[2].parameters())
    rounds = repeats * ROUNDS_PER_REPEAT
    setup = (f"random-weight tiny CLIPTextModel ({n_enc:,} parameters; trainable: layers + final "
             f"LayerNorm) + UNet2DConditionModel ({n_unet:,}, frozen); γ=1, retain batch "
             f"{RETAIN_BATCH}, partial sampling {ddim_steps // 2} of {ddim_steps} DDIM steps; medians of {rounds} interleaved rounds; "
             f"torch threads {torch.get_num_threads()}")
    seed = stop_seed(ddim_steps)
    rows: list[BenchRow] = []
    times: dict[int, float] = {}
    esd_times: list[float] = []
    for k in [*ks, 0]:
        fast = k == 0
        adv, esd = make_pair(comps, 1 if fast else k, fast=fast, ddim_steps=ddim_steps)
        adv.step()  # warm-up iteration (no attack), Adam state
        esd.step()
        t_adv, t_esd = time_pair(_step(adv, seed), _step(esd, seed), repeats=rounds, number=1,
                                 warmup=0)
        esd_times.append(t_esd)
        if fast:
            rows.append(BenchRow(NAME, ROW_FAST, t_adv, t_esd, "s",
                                 note="one sign-gradient step of the soft token (α = lr·steps)"))
        else:
            times[k] = t_adv
            rows.append(BenchRow(NAME, ROW_STEPS.format(k=k), t_adv, t_esd, "s",
                                 note=setup if k == ks[0] else ""))
    lo, hi = ks[0], ks[-1]
    t_esd_med = sorted(esd_times)[len(esd_times) // 2]
    marginal = max((times[hi] - times[lo]) / (hi - lo), 0.0)
    rows.append(BenchRow(
        NAME, ROW_MARGINAL, marginal, t_esd_med, "s",
        note=(f"(t(K={hi}) − t(K={lo})) / {hi - lo} against the median ESD iteration of all rows; "
              f"whole benchmark {time.perf_counter() - t_start:.0f} s")))
    return rows
