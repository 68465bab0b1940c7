"""A differentiable DDIM sampler that takes all of its randomness as one tensor.

Noise layout (batch first): ``noise`` has shape ``(B, S+1, *latent)`` for ``S`` sampling steps.

- slot 0 is x_T, the starting latent;
- slot ``i+1`` (``i = 0 … S−1``) is z, the noise injected by step ``i`` (timestep ``timesteps[i]``),
  i.e. slots 1..S are z_T … z_1.

Slot S (z_1, the noise of the final step) is unused whenever σ = 0 at the final step, which is the
case for the usual ``set_alpha_to_one=True`` (ᾱ′ = 1 there); with ``set_alpha_to_one=False``
(Stable Diffusion's scheduler config) σ is tiny but non-zero and the slot is used. With η = 0 only
slot 0 is used. Unused slots receive zero gradient.

Each step is ``scheduler.step(ε̂, t, x, eta=eta, variance_noise=z).prev_sample`` of a
``diffusers.DDIMScheduler`` (see :mod:`optfm.diffusion` for the equation), so the sampler equals
diffusers' own DDIM loop given the same noise, and is differentiable w.r.t. ``noise``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["DDIMSampler"]


def _scheduler_config(scheduler: Any) -> dict[str, Any]:
    cfg = scheduler if isinstance(scheduler, Mapping) else getattr(scheduler, "config", None)
    if not isinstance(cfg, Mapping):
        raise TypeError("scheduler must be a diffusers scheduler or its config (a mapping), got "
                        f"{type(scheduler).__name__}")
    return dict(cfg)


class DDIMSampler:
    """DDIM sampling as a differentiable function of the injected noise.

    Args:
        unet: a ``diffusers`` ``UNet2DModel`` (unconditional) or ``UNet2DConditionModel``
            (conditional: pass ``encoder_hidden_states`` to :meth:`sample`). The sampler does not
            change its mode or ``requires_grad``; freeze it (``unet.requires_grad_(False)``) when
            only the noise is optimised.
        scheduler: any ``diffusers`` scheduler (or its config) with the model's noise schedule; a
            private ``DDIMScheduler`` is built from its config. Clipping/thresholding of the
            predicted x_0 is switched off (with a warning if the config asked for it): it is not
            part of the DDIM update and would cut gradients.
        num_inference_steps: S, the number of DDIM steps (≥ 1).
        eta: η ≥ 0; 0 is deterministic DDIM (only x_T matters), 1 is DDPM-like.
        guidance_scale: classifier-free guidance scale s (conditional UNet only):
            ε̂ = ε_u + s (ε_c − ε_u), both passes batched in one model call. ``None``: no guidance
            (one conditional pass). With s = 1 the unconditional pass is skipped (ε̂ = ε_c).
        gradient_checkpointing: wrap each model call in ``torch.utils.checkpoint.checkpoint``
            (``use_reentrant=False``), so that activation memory does not grow with S.
        no_grad_steps: run the first k steps under ``torch.no_grad()`` (0 ≤ k < S). Slots 0..k
            (x_T and the z of those steps) then get zero gradient.
        vae: optional ``diffusers`` ``AutoencoderKL``; sampling then runs in latent space and the
            result is ``vae.decode(latents / vae.config.scaling_factor).sample``.
    """

    def __init__(self, unet: torch.nn.Module, scheduler: Any, *, num_inference_steps: int = 50,
                 eta: float = 1.0, guidance_scale: float | None = None,
                 gradient_checkpointing: bool = True, no_grad_steps: int = 0,
                 vae: torch.nn.Module | None = None) -> None:
        from diffusers import DDIMScheduler

        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive int, got "
                             f"{num_inference_steps!r}")
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        if (isinstance(no_grad_steps, bool) or not isinstance(no_grad_steps, int)
                or not 0 <= no_grad_steps < num_inference_steps):
            raise ValueError(f"no_grad_steps must be an int in [0, num_inference_steps="
                             f"{num_inference_steps}), got {no_grad_steps!r}")
        self.conditional = getattr(unet.config, "cross_attention_dim", None) is not None
        if guidance_scale is not None:
            if not self.conditional:
                raise ValueError("guidance_scale needs a conditional UNet (UNet2DConditionModel "
                                 f"with cross_attention_dim); got {type(unet).__name__} without "
                                 "cross-attention. Use guidance_scale=None.")
            if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
                raise ValueError(f"guidance_scale must be a number or None, got "
                                 f"{guidance_scale!r}")
            guidance_scale = float(guidance_scale)

        cfg = _scheduler_config(scheduler)
        if cfg.get("clip_sample", True) or cfg.get("thresholding", False):
            warnings.warn("DDIMSampler switches off clip_sample/thresholding of the scheduler "
                          "config (not part of the DDIM update; would cut gradients)",
                          UserWarning, stacklevel=2)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg.update(clip_sample=False, thresholding=False)
        self.scheduler = DDIMScheduler.from_config(cfg)
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = self.scheduler.timesteps.clone()

        self.unet = unet
        self.vae = vae
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.guidance_scale = guidance_scale
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.no_grad_steps = no_grad_steps

    # ------------------------------------------------------------------ shapes
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Default ``(C, H, W)`` of one latent, from the UNet's config."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    def noise_shape(self, batch_size: int,
                    latent_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """``(batch_size, S+1, *latent_shape)``; ``latent_shape`` defaults to :attr:`latent_shape`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        latent = self.latent_shape if latent_shape is None else tuple(int(s) for s in latent_shape)
        return (batch_size, self.num_inference_steps + 1, *latent)

    def randn_noise(self, batch_size: int, latent_shape: tuple[int, ...] | None = None, *,
                    generator: torch.Generator | None = None, device: Any = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A N(0, I) noise tensor of :meth:`noise_shape` (the sampler's prior)."""
        return torch.randn(self.noise_shape(batch_size, latent_shape), generator=generator,
                           device=device, dtype=dtype)

    def _check_noise(self, noise: torch.Tensor) -> None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        s1 = self.num_inference_steps + 1
        channels = int(self.unet.config.in_channels)
        if noise.ndim != 5 or noise.shape[1] != s1 or noise.shape[2] != channels:
            expected = self.noise_shape(noise.shape[0] if noise.ndim else 1)
            raise ValueError(
                f"noise must have shape (B, S+1, C, H, W) = (B, {s1}, {channels}, H, W) "
                f"(e.g. {expected}; slot 0 = x_T, slots 1..S = z_T..z_1), got "
                f"{tuple(noise.shape)}")

    # ------------------------------------------------------------------ model
    def _eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
             uncond: torch.Tensor | None) -> torch.Tensor:
        dtype = getattr(self.unet, "dtype", x.dtype)
        if not self.conditional:
            return self.unet(x.to(dtype), t).sample.to(x.dtype)
        s = self.guidance_scale
        if s is None or s == 1.0:
            return self.unet(x.to(dtype), t, encoder_hidden_states=cond).sample.to(x.dtype)
        both = self.unet(torch.cat([x, x]).to(dtype), t,
                         encoder_hidden_states=torch.cat([uncond, cond])).sample.to(x.dtype)
        eps_u, eps_c = both.chunk(2)
        return eps_u + s * (eps_c - eps_u)

    def _prepare_cond(self, ehs: torch.Tensor | None, neg: torch.Tensor | None,
                      batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.conditional:
            if ehs is not None or neg is not None:
                raise ValueError("encoder_hidden_states given, but the UNet is unconditional "
                                 "(no cross_attention_dim)")
            return None, None
        if ehs is None:
            raise ValueError("the UNet is conditional: pass encoder_hidden_states "
                             "(B or 1, sequence, cross_attention_dim)")
        needs_neg = self.guidance_scale is not None and self.guidance_scale != 1.0
        if needs_neg and neg is None:
            raise ValueError("guidance_scale is set: pass negative_encoder_hidden_states (e.g. the "
                             "text encoder's embedding of the empty prompt)")

        def expand(e: torch.Tensor, name: str) -> torch.Tensor:
            if e.ndim != 3 or e.shape[0] not in (1, batch):
                raise ValueError(f"{name} must have shape ({batch} or 1, sequence, dim), got "
                                 f"{tuple(e.shape)}")
            return e.expand(batch, *e.shape[1:]) if e.shape[0] == 1 else e

        ehs = expand(ehs, "encoder_hidden_states")
        neg = expand(neg, "negative_encoder_hidden_states") if needs_neg else None
        dtype = getattr(self.unet, "dtype", ehs.dtype)
        return ehs.to(dtype), (neg.to(dtype) if neg is not None else None)

    # ------------------------------------------------------------------ sampling
    def sample(self, noise: torch.Tensor, *, encoder_hidden_states: torch.Tensor | None = None,
               negative_encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Run S DDIM steps from ``noise`` (see the module docstring for the layout); returns x_0
        (decoded by the VAE if one was given). Differentiable w.r.t. ``noise``."""
        self._check_noise(noise)
        cond, uncond = self._prepare_cond(encoder_hidden_states, negative_encoder_hidden_states,
                                          noise.shape[0])
        x = noise[:, 0]
        for i, t in enumerate(self.timesteps):
            grad = torch.is_grad_enabled() and i >= self.no_grad_steps
            with torch.set_grad_enabled(grad):
                if grad and self.gradient_checkpointing:
                    eps = checkpoint(self._eps, x, t, cond, uncond, use_reentrant=False)
                else:
                    eps = self._eps(x, t, cond, uncond)
                z = noise[:, i + 1] if self.eta > 0 else None
                x = self.scheduler.step(eps, t, x, eta=self.eta, variance_noise=z).prev_sample
        if self.vae is not None:
            vae_dtype = getattr(self.vae, "dtype", x.dtype)
            x = self.vae.decode((x / self.vae.config.scaling_factor).to(vae_dtype)).sample
        return x

    __call__ = sample

    def conditioned(self, encoder_hidden_states: torch.Tensor,
                    negative_encoder_hidden_states: torch.Tensor | None = None
                    ) -> ConditionedSampler:
        """This sampler with its text conditioning bound: a callable ``noise -> samples`` with
        ``eta`` (what :class:`optfm.alignment.DNO` needs for a prompted model)."""
        self._prepare_cond(encoder_hidden_states, negative_encoder_hidden_states, 1)
        return ConditionedSampler(self, encoder_hidden_states, negative_encoder_hidden_states)

    def __repr__(self) -> str:
        return (f"DDIMSampler(steps={self.num_inference_steps}, eta={self.eta}, "
                f"guidance_scale={self.guidance_scale}, "
                f"gradient_checkpointing={self.gradient_checkpointing}, "
                f"no_grad_steps={self.no_grad_steps}, vae={self.vae is not None})")


class ConditionedSampler:
    """A :class:`DDIMSampler` with bound ``encoder_hidden_states`` (see
    :meth:`DDIMSampler.conditioned`); embeddings with batch 1 are broadcast to the noise batch."""

    def __init__(self, sampler: DDIMSampler, encoder_hidden_states: torch.Tensor,
                 negative_encoder_hidden_states: torch.Tensor | None) -> None:
        self.sampler = sampler
        self.encoder_hidden_states = encoder_hidden_states
        self.negative_encoder_hidden_states = negative_encoder_hidden_states

    @property
    def eta(self) -> float:
        return self.sampler.eta

    @property
    def unet(self) -> torch.nn.Module:
        return self.sampler.unet

    @property
    def vae(self) -> torch.nn.Module | None:
        return self.sampler.vae

    def noise_shape(self, batch_size: int, latent_shape: tuple[int, ...] | None = None
                    ) -> tuple[int, ...]:
        return self.sampler.noise_shape(batch_size, latent_shape)

    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        return self.sampler.sample(
            noise, encoder_hidden_states=self.encoder_hidden_states,
            negative_encoder_hidden_states=self.negative_encoder_hidden_states)
