r"""AdvUnlearn: robust concept erasure in text-to-image diffusion models (arXiv 2405.15234).

AdvUnlearn erases a concept ``c_e`` (e.g. "nudity") by adversarially training the **text encoder**
θ of a latent diffusion model while the UNet stays frozen. It solves the bi-level problem::

    min_θ  ℓ_u(θ, c*) + γ · ℓ_R(θ)        s.t.  c* = argmin_{c'} ℓ_atk(θ, c')

with ε_o the frozen *original* model (original text encoder + original UNet):

- **Unlearning loss (ESD)**, negative guidance with η = 1::

      ε̃(x_t)   = ε_o(x_t, ∅) − η (ε_o(x_t, c_e) − ε_o(x_t, ∅))
      ℓ_u(θ, c) = ‖ ε_θ(x_t, c) − ε̃(x_t) ‖²,      c = [c*; c_e] (adversarial prefix + concept)

  x_t is drawn by *partially* sampling the original model with DDIM (guidance 3) from pure noise
  for a random number of steps (:func:`partial_sample`), so t is uniform over the DDIM timesteps.
- **Utility regulariser** on retain prompts c_r (other concepts)::

      ℓ_R(θ) = E_{c_r} ‖ ε_θ(x_t, c_r) − ε_o(x_t, c_r) ‖²

- **Attack** (:class:`SoftPromptAttack`): k continuous token embeddings c' (word-embedding space)
  inserted after BOS of the concept prompt, minimising::

      ℓ_atk(θ, c') = ‖ ε_θ(x_t, [c'; c_e]) − ε_o(x_t, c_e) ‖²

  with Adam (30 steps, lr 1e-3, gradients zeroed every step — the authors' code never zeroes
  them), started from a random vocabulary token's embedding or the previous round's result; a
  ``fast`` variant takes one sign-gradient step; optional projection onto an L2 ball of radius ε
  around the initial embedding. The first ``warmup`` iterations train without attack.

Every ‖·‖² is the *mean* squared error over all elements (as ``torch.nn.MSELoss``; a constant
factor of the squared norm).

Baselines and evaluation:

- :class:`ESD`: the same ℓ_u without attack (plus optional γ·ℓ_R), training either the UNet's
  cross-attention (ESD-x: every parameter of the ``attn2`` modules — ``to_q``, ``to_k``, ``to_v``,
  ``to_out``) or the text encoder.
- :class:`DiscreteAttack`: UnlearnDiffAtk-style discrete prompt attack — 5 prefix tokens as rows
  z ∈ Δ^V of the probability simplex (relaxed one-hot), forward with the straight-through one-hot
  of argmax z, Adam lr 0.01 then Euclidean projection onto the simplex, early stop as soon as the
  judge says the discrete prompt succeeds.
- Metrics: :func:`attack_success_rate`, :func:`frechet_distance` (FID on a classifier's
  features), :func:`prompt_alignment` (CLIP-score stand-in).

Components work with any ``transformers.CLIPTextModel`` (4.x with ``.text_model`` or 5.x flat) +
tokenizer, ``diffusers.UNet2DConditionModel`` and a DDIM scheduler (config), e.g. those of a
Stable Diffusion folder. Prompts are tokenised by :func:`tokenize_prompts` (BOS/EOS added when the
tokenizer does not add them; padded to a fixed length, as Stable Diffusion does); the text
encoder's ``last_hidden_state`` (causal mask only, no padding mask — as in Stable Diffusion) is
the UNet's ``encoder_hidden_states``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ESD",
    "AdvUnlearn",
    "AdvUnlearnConfig",
    "AttackResult",
    "DiscreteAttack",
    "DiscreteAttackResult",
    "ESDConfig",
    "SoftPromptAttack",
    "attack_success_rate",
    "encode_with_soft_prompt",
    "esd_loss",
    "esd_target",
    "frechet_distance",
    "insert_prefix_ids",
    "negative_guidance",
    "partial_sample",
    "project_simplex",
    "prompt_alignment",
    "select_trainable",
    "tokenize_prompts",
    "utility_loss",
]


# ---------------------------------------------------------------------------------------- text
def _text_transformer(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``embeddings``/``encoder``/``final_layer_norm`` (4.x: ``.text_model``)."""
    tm = getattr(text_encoder, "text_model", text_encoder)
    for name in ("embeddings", "encoder", "final_layer_norm"):
        if not hasattr(tm, name):
            raise TypeError(f"text_encoder must be a transformers CLIPTextModel (missing {name!r}),"
                            f" got {type(text_encoder).__name__}")
    return tm


def _token_embedding(text_encoder: torch.nn.Module) -> torch.nn.Embedding:
    return _text_transformer(text_encoder).embeddings.token_embedding


def _max_positions(text_encoder: torch.nn.Module) -> int:
    return int(_text_transformer(text_encoder).embeddings.position_embedding.num_embeddings)


def _as_ids(input_ids: torch.Tensor, name: str = "input_ids") -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"{name} must be an integer torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"{name} must have shape (L,) or (B, L), got {tuple(input_ids.shape)}")
    return input_ids.long()


def _run_transformer(tm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLIPTextTransformer's forward from the (token + position) embeddings on."""
    try:  # transformers >= 5
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None,
                                  cache=None)
        out = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    except ImportError:  # transformers 4.x
        from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

        mask = _create_4d_causal_attention_mask(hidden.shape[:2], hidden.dtype, hidden.device)
        out = tm.encoder(inputs_embeds=hidden, causal_attention_mask=mask)
    last = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return tm.final_layer_norm(last)


def encode_with_soft_prompt(text_encoder: torch.nn.Module, input_ids: torch.Tensor,
                            soft: torch.Tensor | None = None, position: int = 1) -> torch.Tensor:
    """The text encoder's ``last_hidden_state`` with k continuous token embeddings inserted.

    ``soft`` (shape ``(k, D)`` or ``(B, k, D)``, word-embedding space, i.e. *before* the position
    embeddings) is **inserted** at ``position`` (default 1: right after BOS): the prompt's tokens
    from ``position`` on shift right by k, and the sequence (length L + k) is truncated to the
    model's ``max_position_embeddings`` (for Stable Diffusion's 77-padded prompts the last k pad
    tokens drop; a prompt that fills all positions loses its tail, EOS included). Position
    embeddings follow the new positions. ``soft=None`` gives the ordinary encoding.

    Differentiable w.r.t. ``soft`` and the encoder weights; only the causal mask is used.
    """
    tm = _text_transformer(text_encoder)
    ids = _as_ids(input_ids)
    emb_layer = tm.embeddings.token_embedding
    ids = ids.to(emb_layer.weight.device)
    tokens = emb_layer(ids)
    if soft is not None:
        if not isinstance(soft, torch.Tensor):
            raise ValueError(f"soft must be a torch.Tensor or None, got {type(soft).__name__}")
        d = tokens.shape[-1]
        if soft.ndim == 2:
            soft = soft.unsqueeze(0)
        if soft.ndim != 3 or soft.shape[-1] != d or soft.shape[0] not in (1, ids.shape[0]):
            raise ValueError(f"soft must have shape (k, {d}) or ({ids.shape[0]}, k, {d}), got "
                             f"{tuple(soft.shape)}")
        if isinstance(position, bool) or not isinstance(position, int) or not (
                0 <= position <= ids.shape[1]):
            raise ValueError(f"position must be an int in [0, {ids.shape[1]}], got {position!r}")
        soft = soft.to(tokens.dtype).to(tokens.device).expand(ids.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :position], soft, tokens[:, position:]], dim=1)
        tokens = tokens[:, :_max_positions(text_encoder)]
    hidden = tm.embeddings(inputs_embeds=tokens)
    return _run_transformer(tm, hidden)


def insert_prefix_ids(input_ids: torch.Tensor, prefix_ids: torch.Tensor, position: int = 1,
                      max_length: int | None = None) -> torch.Tensor:
    """Discrete counterpart of :func:`encode_with_soft_prompt`'s insertion: ``prefix_ids`` (k,)
    inserted at ``position`` of every row, truncated to ``max_length``."""
    ids = _as_ids(input_ids)
    prefix = _as_ids(prefix_ids, "prefix_ids")[0].to(ids.device)
    out = torch.cat([ids[:, :position], prefix.expand(ids.shape[0], -1), ids[:, position:]], 1)
    return out if max_length is None else out[:, :max_length]


def tokenize_prompts(tokenizer: Any, prompts: str | Sequence[str], *,
                     max_length: int | None = None) -> torch.Tensor:
    """Token ids ``(B, L)`` with BOS/EOS (added if the tokenizer does not add them), truncated to
    ``max_length`` (keeping EOS last) and padded with the pad token (EOS if none) to
    ``max_length`` — or to the longest prompt when ``max_length`` is None."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty string or sequence of strings")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    rows = []
    for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if eos is not None and ids[-1] != eos:
            ids = [*ids, eos]
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length - 1] + ([eos] if eos is not None else [ids[max_length - 1]])
        rows.append(ids)
    length = max_length if max_length is not None else max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------- ESD
def _eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | int,
         emb: torch.Tensor) -> torch.Tensor:
    if emb.shape[0] == 1 and x.shape[0] > 1:
        emb = emb.expand(x.shape[0], *emb.shape[1:])
    dtype = getattr(unet, "dtype", x.dtype)
    return unet(x.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample.to(x.dtype)


def negative_guidance(eps_uncond: torch.Tensor, eps_concept: torch.Tensor,
                      eta: float = 1.0) -> torch.Tensor:
    """ESD's target ``ε(∅) − η (ε(c_e) − ε(∅))``."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


@torch.no_grad()
def esd_target(unet_orig: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor | int,
               emb_concept: torch.Tensor, emb_empty: torch.Tensor,
               eta: float = 1.0) -> torch.Tensor:
    """``ε_o(x_t, ∅) − η (ε_o(x_t, c_e) − ε_o(x_t, ∅))`` with the frozen original UNet and the
    *original* encoder's embeddings (no gradient)."""
    eps_c, eps_u = _concept_and_empty(unet_orig, x_t, t, emb_concept, emb_empty)
    return negative_guidance(eps_u, eps_c, eta)


def _concept_and_empty(unet, x_t, t, emb_concept, emb_empty):
    b = x_t.shape[0]
    emb_c = emb_concept.expand(b, *emb_concept.shape[1:]) if emb_concept.shape[0] == 1 else \
        emb_concept
    emb_u = emb_empty.expand(b, *emb_empty.shape[1:]) if emb_empty.shape[0] == 1 else emb_empty
    if emb_c.shape[1] != emb_u.shape[1]:
        return _eps(unet, x_t, t, emb_c), _eps(unet, x_t, t, emb_u)
    both = _eps(unet, torch.cat([x_t, x_t]), t, torch.cat([emb_c, emb_u]))
    return both.chunk(2)


def esd_loss(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor | int,
             emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖ε_θ(x_t, c) − target‖²`` (mean) with ``emb`` the trained model's embedding of c."""
    return F.mse_loss(_eps(unet, x_t, t, emb), target)


def utility_loss(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor | int,
                 emb_retain: torch.Tensor, target: torch.Tensor | None = None, *,
                 unet_orig: torch.nn.Module | None = None,
                 emb_retain_orig: torch.Tensor | None = None) -> torch.Tensor:
    """``‖ε_θ(x_t, c_r) − ε_o(x_t, c_r)‖²`` (mean). Pass ``target = ε_o(x_t, c_r)`` or
    ``unet_orig`` and ``emb_retain_orig`` (the original encoder's embedding) to compute it."""
    if target is None:
        if unet_orig is None or emb_retain_orig is None:
            raise ValueError("target is None: pass unet_orig and emb_retain_orig")
        with torch.no_grad():
            target = _eps(unet_orig, x_t, t, emb_retain_orig)
    return F.mse_loss(_eps(unet, x_t, t, emb_retain), target)


def _scheduler_config(scheduler: Any) -> dict[str, Any]:
    cfg = scheduler if isinstance(scheduler, Mapping) else getattr(scheduler, "config", None)
    if not isinstance(cfg, Mapping):
        raise ValueError("scheduler_config must be a diffusers scheduler or its config mapping, "
                         f"got {type(scheduler).__name__}")
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


@torch.no_grad()
def partial_sample(unet_orig: torch.nn.Module, scheduler_config: Any, emb: torch.Tensor,
                   emb_uncond: torch.Tensor | None, *, steps: int, stop_index: int,
                   guidance_scale: float | None = 3.0, generator: torch.Generator | None = None,
                   eta: float = 0.0, latent_shape: tuple[int, ...] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM from x_T ~ N(0, I) for ``stop_index`` of ``steps`` steps with the frozen original
    model and classifier-free guidance ``ε_u + s (ε_c − ε_u)``; returns ``(x_t, t)`` where
    ``t = timesteps[stop_index]`` is the timestep at which x_t is to be denoised next
    (``stop_index = 0``: pure noise at the first timestep). One sample per row of ``emb``.
    Clipping/thresholding of the scheduler config is switched off."""
    from diffusers import DDIMScheduler

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(stop_index, bool) or not isinstance(stop_index, int) or not (
            0 <= stop_index < steps):
        raise ValueError(f"stop_index must be an int in [0, steps={steps}), got {stop_index!r}")
    guided = guidance_scale is not None and guidance_scale != 1.0
    if guided and emb_uncond is None:
        raise ValueError("emb_uncond is None but guidance_scale is set")
    cfg = _scheduler_config(scheduler_config)
    cfg.update(clip_sample=False, thresholding=False)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    if latent_shape is None:
        size = unet_orig.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        latent_shape = (int(unet_orig.config.in_channels), int(h), int(w))
    b = emb.shape[0]
    gen_device = generator.device if generator is not None else "cpu"
    x = torch.randn((b, *latent_shape), generator=generator, device=gen_device)
    x = x.to(emb.device) * sched.init_noise_sigma
    unc = None
    if guided:
        unc = emb_uncond.expand(b, *emb_uncond.shape[1:]) if emb_uncond.shape[0] == 1 \
            else emb_uncond
    for i in range(stop_index):
        t = sched.timesteps[i]
        if guided:
            eps_u, eps_c = _eps(unet_orig, torch.cat([x, x]), t, torch.cat([unc, emb])).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = _eps(unet_orig, x, t, emb)
        x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x, sched.timesteps[stop_index].to(x.device)


# ---------------------------------------------------------------------------------------- attacks
@dataclass
class AttackResult:
    """A soft-prompt attack's outcome: ``soft`` (k, D), detached; ``losses[i]`` is ℓ_atk before
    step i, ``final_loss`` after the last step."""

    soft: torch.Tensor
    losses: list[float]
    final_loss: float

    @property
    def initial_loss(self) -> float:
        return self.losses[0] if self.losses else self.final_loss


def _attack_objective(text_encoder, unet, input_ids, soft, x_t, t, target, position):
    emb = encode_with_soft_prompt(text_encoder, input_ids, soft, position)
    return F.mse_loss(_eps(unet, x_t, t, emb), target)


class SoftPromptAttack:
    """Continuous soft-prompt attack: ``min_{c'} ‖ε_θ(x_t, [c'; c_e]) − ε_o(x_t, c_e)‖²``.

    Args:
        n_tokens: k, the number of soft tokens inserted after BOS.
        steps: Adam steps (gradients zeroed every step).
        lr: Adam learning rate.
        fast: one sign-gradient step ``c' ← c' − α sign(∇ℓ_atk)`` instead of Adam.
        alpha: the fast step size α; default ``lr · steps`` (the distance Adam can travel).
        epsilon: if set, project each token onto the L2 ball of radius ε around its initial
            embedding after every step (per token row).
        init: ``"random_token"`` (embedding of a uniformly random vocabulary token, per soft
            token) or ``"previous"`` (the last result of this attack object; random the first
            time).
        position: insertion position (1 = after BOS).
        seed: seed of the attack's own generator (random token draws).

    Only the soft prompt receives a gradient (``torch.autograd.grad``): the encoder's and UNet's
    ``.grad`` are left untouched.
    """

    def __init__(self, n_tokens: int = 1, steps: int = 30, lr: float = 1e-3, fast: bool = False,
                 epsilon: float | None = None, init: str = "random_token", *,
                 alpha: float | None = None, position: int = 1, seed: int = 0) -> None:
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and epsilon > 0):
            raise ValueError(f"epsilon must be a number > 0 or None, got {epsilon!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a number > 0 or None, got {alpha!r}")
        if init not in ("random_token", "previous"):
            raise ValueError(f"init must be 'random_token' or 'previous', got {init!r}")
        self.n_tokens, self.steps, self.lr, self.fast = n_tokens, steps, float(lr), bool(fast)
        self.epsilon = None if epsilon is None else float(epsilon)
        self.alpha = float(alpha) if alpha is not None else self.lr * steps
        self.init, self.position = init, position
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: torch.Tensor | None = None

    def initial(self, text_encoder: torch.nn.Module) -> torch.Tensor:
        """The starting soft prompt (k, D), detached."""
        if self.init == "previous" and self.previous is not None:
            return self.previous.clone()
        w = _token_embedding(text_encoder).weight
        ids = torch.randint(0, w.shape[0], (self.n_tokens,), generator=self.generator)
        return w.detach()[ids.to(w.device)].clone()

    def _project(self, soft: torch.Tensor, center: torch.Tensor) -> None:
        if self.epsilon is None:
            return
        with torch.no_grad():
            delta = soft - center
            norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            soft.copy_(center + delta * torch.clamp(self.epsilon / norm, max=1.0))

    def __call__(self, text_encoder: torch.nn.Module, unet: torch.nn.Module,
                 input_ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                 target: torch.Tensor, init: torch.Tensor | None = None) -> AttackResult:
        """Attack the model (``text_encoder`` + ``unet``) on the concept prompt ``input_ids``;
        ``target = ε_o(x_t, c_e)``. ``init`` overrides the configured initialisation."""
        start = (init.detach().clone() if init is not None else self.initial(text_encoder))
        start = start.to(_token_embedding(text_encoder).weight.device)
        if start.ndim != 2 or start.shape[0] != self.n_tokens:
            raise ValueError(f"init must have shape ({self.n_tokens}, D), got "
                             f"{tuple(start.shape)}")
        soft = start.clone().requires_grad_(True)
        target = target.detach()
        losses: list[float] = []
        if self.fast:
            loss = _attack_objective(text_encoder, unet, input_ids, soft, x_t, t, target,
                                     self.position)
            (g,) = torch.autograd.grad(loss, [soft])
            losses.append(float(loss.detach()))
            with torch.no_grad():
                soft -= self.alpha * g.sign()
            self._project(soft, start)
        else:
            opt = torch.optim.Adam([soft], lr=self.lr)
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = _attack_objective(text_encoder, unet, input_ids, soft, x_t, t, target,
                                         self.position)
                (soft.grad,) = torch.autograd.grad(loss, [soft])
                losses.append(float(loss.detach()))
                opt.step()
                self._project(soft, start)
        with torch.no_grad():
            final = float(_attack_objective(text_encoder, unet, input_ids, soft, x_t, t, target,
                                            self.position))
        result = soft.detach().clone()
        self.previous = result.clone()
        return AttackResult(result, losses, final)


def project_simplex(z: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row of ``z`` onto the probability simplex (sort-based)."""
    u, _ = torch.sort(z, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cond = u - css / k > 0
    rho = cond.to(z.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(z.dtype)
    return torch.clamp(z - theta, min=0.0)


@dataclass
class DiscreteAttackResult:
    """``prompt_ids`` (L',) the adversarial prompt (prefix inserted), ``prefix_ids`` (k,),
    ``success`` (None without a judge), ``steps`` (optimisation steps taken), ``losses``."""

    prompt_ids: torch.Tensor
    prefix_ids: torch.Tensor
    success: bool | None
    steps: int
    losses: list[float] = field(default_factory=list)


class DiscreteAttack:
    """UnlearnDiffAtk-style discrete prefix attack.

    Each of the k prefix tokens is a row z_i ∈ Δ^V of the simplex over the vocabulary, started at
    the one-hot of a random allowed token. Forward: the straight-through one-hot
    ``h = onehot(argmax z) + z − sg(z)`` times the token-embedding matrix, inserted after BOS
    (exactly the discrete prompt's encoding); loss = ``‖ε_θ(x_t, [h; c]) − target‖²`` where the
    caller picks the target: ``ε_o(x_t, c_e)`` of the original model (denoising matching, the
    default used here) or the true noise of a noised target image (UnlearnDiffAtk's own loss).
    Adam (lr 0.01) on z, then projection onto the simplex (forbidden ids held at 0). Before every
    step and after the last, ``success_fn(prompt_ids) -> bool`` (the judge, e.g. generate + classify)
    is asked every ``check_every`` steps; the attack stops at the first success.
    """

    def __init__(self, n_tokens: int = 5, steps: int = 40, lr: float = 0.01, *,
                 check_every: int = 1, forbidden_ids: Sequence[int] = (), position: int = 1,
                 seed: int = 0) -> None:
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        self.n_tokens, self.steps, self.lr, self.check_every = n_tokens, steps, float(lr), \
            check_every
        self.forbidden_ids = sorted({int(i) for i in forbidden_ids})
        self.position = position
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, text_encoder: torch.nn.Module, unet: torch.nn.Module,
                 input_ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                 target: torch.Tensor,
                 success_fn: Callable[[torch.Tensor], bool] | None = None
                 ) -> DiscreteAttackResult:
        ids = _as_ids(input_ids)[:1]
        w = _token_embedding(text_encoder).weight
        v = w.shape[0]
        allowed = torch.ones(v, dtype=torch.bool)
        if self.forbidden_ids:
            if min(self.forbidden_ids) < 0 or max(self.forbidden_ids) >= v:
                raise ValueError(f"forbidden_ids must lie in [0, {v}), got {self.forbidden_ids}")
            allowed[self.forbidden_ids] = False
        allowed_idx = allowed.nonzero().squeeze(1)
        if allowed_idx.numel() == 0:
            raise ValueError("forbidden_ids forbids the whole vocabulary")
        start = allowed_idx[torch.randint(0, allowed_idx.numel(), (self.n_tokens,),
                                          generator=self.generator)]
        z = F.one_hot(start, v).to(w.dtype).to(w.device).requires_grad_(True)
        allowed_dev = allowed.to(w.device)
        opt = torch.optim.Adam([z], lr=self.lr)
        max_len = _max_positions(text_encoder)
        target = target.detach()
        losses: list[float] = []

        def current() -> tuple[torch.Tensor, torch.Tensor]:
            prefix = z.detach().masked_fill(~allowed_dev, -1.0).argmax(-1)
            return insert_prefix_ids(ids, prefix, self.position, max_len)[0], prefix

        def judge(step: int) -> bool | None:
            if success_fn is None:
                return None
            prompt, _ = current()
            return bool(success_fn(prompt))

        success = judge(0)
        taken = 0
        for step in range(self.steps):
            if success:
                break
            opt.zero_grad(set_to_none=True)
            masked = z.masked_fill(~allowed_dev, 0.0)
            hard = F.one_hot(masked.detach().masked_fill(~allowed_dev, -1.0).argmax(-1), v)
            st = hard.to(z.dtype) + masked - masked.detach()
            soft = st @ w.detach()
            loss = _attack_objective(text_encoder, unet, ids, soft, x_t, t, target,
                                     self.position)
            (z.grad,) = torch.autograd.grad(loss, [z])
            losses.append(float(loss.detach()))
            opt.step()
            with torch.no_grad():
                proj = torch.zeros_like(z)
                proj[:, allowed_dev] = project_simplex(z[:, allowed_dev])
                z.copy_(proj)
            taken = step + 1
            if success_fn is not None and (taken % self.check_every == 0 or taken == self.steps):
                success = judge(taken)
        prompt, prefix = current()
        self.z = z.detach()
        return DiscreteAttackResult(prompt, prefix, success, taken, losses)


# ---------------------------------------------------------------------------------------- trainers
def select_trainable(module: torch.nn.Module,
                     trainable: str | Callable[[str, torch.nn.Parameter], bool]) -> list[str]:
    """Set ``requires_grad`` on ``module``'s parameters by ``trainable`` and return the names.

    ``"all"``: every parameter; ``"layers"`` (text encoder): the transformer layers
    (``encoder.layers.*``) + ``final_layer_norm`` — not token/position embeddings;
    ``"xattn"`` (UNet): every parameter of the cross-attention ``attn2`` modules; or a predicate
    ``(name, param) -> bool``.
    """
    if callable(trainable):
        pred = trainable
    elif trainable == "all":
        def pred(n, p):
            return True
    elif trainable == "layers":
        def pred(n, p):
            return "encoder.layers." in n or "final_layer_norm" in n
    elif trainable == "xattn":
        def pred(n, p):
            return ".attn2." in n
    else:
        raise ValueError(f"trainable must be 'all', 'layers', 'xattn' or a predicate, got "
                         f"{trainable!r}")
    names = []
    for n, p in module.named_parameters():
        on = bool(pred(n, p))
        p.requires_grad_(on)
        if on:
            names.append(n)
    if not names:
        raise ValueError(f"trainable={trainable!r} selects no parameter")
    return names


@dataclass
class AdvUnlearnConfig:
    """AdvUnlearn hyper-parameters (defaults: the authors' script)."""

    concept: str
    retain_prompts: Sequence[str] = ()
    gamma: float = 1.0
    eta: float = 1.0
    lr: float = 1e-5
    warmup: int = 200
    ddim_steps: int = 50
    guidance_scale: float = 3.0
    retain_batch_size: int = 5
    attack_tokens: int = 1
    attack_steps: int = 30
    attack_lr: float = 1e-3
    attack_fast: bool = False
    attack_epsilon: float | None = None
    attack_init: str = "random_token"
    trainable: str | Callable[[str, torch.nn.Parameter], bool] = "layers"
    max_length: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ValueError(f"concept must be a non-empty string, got {self.concept!r}")
        for name in ("gamma", "eta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("warmup", "retain_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if isinstance(self.ddim_steps, bool) or not isinstance(self.ddim_steps, int) or \
                self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be a positive int, got {self.ddim_steps!r}")
        if self.gamma > 0 and self.retain_batch_size > 0 and not self.retain_prompts:
            raise ValueError("retain_prompts is empty but gamma > 0 (set gamma=0 or give "
                             "retain prompts)")


@dataclass
class ESDConfig:
    """ESD baseline: ``train`` = ``"unet_xattn"`` (ESD-x) or ``"text_encoder"``; optional γ·ℓ_R
    (γ = 0 by default, as in ESD)."""

    concept: str
    train: str = "unet_xattn"
    retain_prompts: Sequence[str] = ()
    gamma: float = 0.0
    eta: float = 1.0
    lr: float = 1e-5
    ddim_steps: int = 50
    guidance_scale: float = 3.0
    retain_batch_size: int = 5
    trainable: str | Callable[[str, torch.nn.Parameter], bool] | None = None
    max_length: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.train not in ("unet_xattn", "text_encoder"):
            raise ValueError(f"train must be 'unet_xattn' or 'text_encoder', got {self.train!r}")
        AdvUnlearnConfig(self.concept, self.retain_prompts, self.gamma, self.eta, self.lr, 0,
                         self.ddim_steps, self.guidance_scale, self.retain_batch_size).validate()


class _Eraser:
    """Shared ESD-style iteration: partial sampling, ESD target, utility, optimiser step."""

    def __init__(self, text_encoder, tokenizer, unet, scheduler, cfg, *, train_encoder: bool,
                 trainable) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.scheduler_config = _scheduler_config(scheduler)
        self.text_encoder = text_encoder
        self.unet = unet
        if train_encoder:
            self.text_encoder_orig = copy.deepcopy(text_encoder).requires_grad_(False).eval()
            unet.requires_grad_(False)
            self.unet_orig = unet
            self.trainable_names = select_trainable(text_encoder, trainable)
            module = text_encoder
        else:
            self.unet_orig = copy.deepcopy(unet).requires_grad_(False).eval()
            text_encoder.requires_grad_(False)
            self.text_encoder_orig = text_encoder
            self.trainable_names = select_trainable(unet, trainable)
            module = unet
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        max_len = cfg.max_length or min(_max_positions(text_encoder),
                                        int(getattr(tokenizer, "model_max_length", 10**9)))
        self.max_length = max_len
        device = _token_embedding(text_encoder).weight.device
        self.concept_ids = tokenize_prompts(tokenizer, cfg.concept, max_length=max_len).to(device)
        self.empty_ids = tokenize_prompts(tokenizer, "", max_length=max_len).to(device)
        self.retain_ids = (tokenize_prompts(tokenizer, list(cfg.retain_prompts),
                                            max_length=max_len).to(device)
                           if cfg.retain_prompts else None)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.iteration = 0
        self.history: list[dict[str, Any]] = []

    def _attack(self, x_t, t, eps_concept) -> tuple[torch.Tensor | None, dict[str, Any]]:
        return None, {}

    def step(self) -> dict[str, Any]:
        cfg = self.cfg
        g = self.generator
        stop = int(torch.randint(0, cfg.ddim_steps, (1,), generator=g))
        use_retain = cfg.gamma > 0 and self.retain_ids is not None and cfg.retain_batch_size > 0
        ids = self.concept_ids
        if use_retain:
            pick = torch.randint(0, self.retain_ids.shape[0], (cfg.retain_batch_size,),
                                 generator=g)
            retain_ids = self.retain_ids[pick.to(self.retain_ids.device)]
            ids = torch.cat([ids, retain_ids])
        with torch.no_grad():
            emb_o = encode_with_soft_prompt(self.text_encoder_orig, ids)
            emb_empty_o = encode_with_soft_prompt(self.text_encoder_orig, self.empty_ids)
            x_all, t = partial_sample(self.unet_orig, self.scheduler_config, emb_o, emb_empty_o,
                                      steps=cfg.ddim_steps, stop_index=stop,
                                      guidance_scale=cfg.guidance_scale, generator=g)
            x_t = x_all[:1]
            eps_c, eps_u = _concept_and_empty(self.unet_orig, x_t, t, emb_o[:1], emb_empty_o)
            target = negative_guidance(eps_u, eps_c, cfg.eta)
            retain_target = (_eps(self.unet_orig, x_all[1:], t, emb_o[1:]) if use_retain
                             else None)
        soft, info = self._attack(x_t, t, eps_c)
        emb = encode_with_soft_prompt(self.text_encoder, self.concept_ids, soft)
        l_u = esd_loss(self.unet, x_t, t, emb, target)
        loss = l_u
        l_r = None
        if use_retain:
            emb_r = encode_with_soft_prompt(self.text_encoder, ids[1:])
            l_r = utility_loss(self.unet, x_all[1:], t, emb_r, retain_target)
            loss = loss + cfg.gamma * l_r
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rec = {"iteration": self.iteration, "t": int(t), "loss": float(loss.detach()),
               "unlearn_loss": float(l_u.detach()),
               "utility_loss": None if l_r is None else float(l_r.detach()),
               "attack_loss": None, "attack_loss_init": None, **info}
        self.iteration += 1
        self.history.append(rec)
        return rec

    def train(self, iterations: int) -> list[dict[str, Any]]:
        """Run ``iterations`` iterations; returns their history records."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
        return [self.step() for _ in range(iterations)]


class AdvUnlearn(_Eraser):
    """AdvUnlearn trainer: adversarially trains ``text_encoder`` (in place) to erase
    ``config.concept``; the UNet is frozen; a frozen copy of the encoder is the original model.

    Per iteration: x_t by partial DDIM sampling of the original model on the concept (+ retain)
    prompts to a random step; after ``warmup`` iterations a fresh :class:`SoftPromptAttack` gives
    c*; ``ℓ = ESD(θ, [c*; c_e]) + γ · ℓ_R`` on a retain batch; one Adam step. ``history`` holds a
    record per iteration (losses, attack loss before/after the attack).
    """

    def __init__(self, text_encoder: torch.nn.Module, tokenizer: Any, unet: torch.nn.Module,
                 scheduler: Any, config: AdvUnlearnConfig) -> None:
        if not isinstance(config, AdvUnlearnConfig):
            raise ValueError(f"config must be an AdvUnlearnConfig, got {type(config).__name__}")
        config.validate()
        super().__init__(text_encoder, tokenizer, unet, scheduler, config, train_encoder=True,
                         trainable=config.trainable)
        self.attack = SoftPromptAttack(config.attack_tokens, config.attack_steps,
                                       config.attack_lr, config.attack_fast,
                                       config.attack_epsilon, config.attack_init,
                                       seed=config.seed + 1)

    def _attack(self, x_t, t, eps_concept):
        if self.iteration < self.cfg.warmup:
            return None, {}
        res = self.attack(self.text_encoder, self.unet, self.concept_ids, x_t, t, eps_concept)
        return res.soft, {"attack_loss": res.final_loss, "attack_loss_init": res.initial_loss}


class ESD(_Eraser):
    """ESD baseline: the ESD loss without attack, training the UNet's cross-attention
    (``config.train="unet_xattn"``, default trainable set ``"xattn"``; a frozen UNet copy is the
    original) or the text encoder (``"text_encoder"``, default ``"layers"``)."""

    def __init__(self, text_encoder: torch.nn.Module, tokenizer: Any, unet: torch.nn.Module,
                 scheduler: Any, config: ESDConfig) -> None:
        if not isinstance(config, ESDConfig):
            raise ValueError(f"config must be an ESDConfig, got {type(config).__name__}")
        config.validate()
        train_encoder = config.train == "text_encoder"
        trainable = config.trainable or ("layers" if train_encoder else "xattn")
        super().__init__(text_encoder, tokenizer, unet, scheduler, config,
                         train_encoder=train_encoder, trainable=trainable)


# ---------------------------------------------------------------------------------------- metrics
def _bool_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1)")
        arr = arr.astype(bool)
    return arr


def attack_success_rate(pre_success: Any, post_success: Any) -> float:
    """ASR = (pre-attack successes + post-attack successes) / N.

    Sample i counts once: it is a success if the unattacked prompt already regenerates the concept
    (``pre_success[i]``), else if the attacked prompt does (``post_success[i]``; ignored where
    ``pre_success[i]`` — the attack is not needed there). So ASR = mean(pre ∨ post)."""
    pre = _bool_array(pre_success, "pre_success")
    post = _bool_array(post_success, "post_success")
    if pre.shape != post.shape:
        raise ValueError(f"pre_success and post_success must have the same length, got "
                         f"{pre.size} and {post.size}")
    return float((pre.sum() + (post & ~pre).sum()) / pre.size)


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) — FID on any features:
    ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})``. If the product is singular, ``eps·I``
    is added to both covariances (as pytorch-fid); imaginary round-off is dropped; the result is
    clamped at 0."""
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    for name, x in (("feats_a", a), ("feats_b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N >= 2, D), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains non-finite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dimension, got "
                         f"{a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa = np.atleast_2d(np.cov(a, rowvar=False))
    sb = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular products are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sa @ sb)
        if not np.isfinite(covmean).all():
            off = np.eye(sa.shape[0]) * eps
            covmean = linalg.sqrtm((sa + off) @ (sb + off))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def prompt_alignment(probs: Any, labels: Any) -> float:
    """Mean classifier probability of the prompted class: ``mean_i probs[i, labels[i]]``."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N >= 1, classes), got {p.shape}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probs must be probabilities in [0, 1]")
    if y.shape != (p.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {p.shape[0]} integers, got shape {y.shape}")
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {p.shape[1]})")
    return float(p[np.arange(p.shape[0]), y].mean())
