"""Shared diffusion building blocks: a differentiable DDIM sampler and a small digits DDPM.

Used by DNO (``optfm.alignment.dno``, specs/dno.md) and concept erasure.

- :class:`DDIMSampler` — DDIM over a ``diffusers`` scheduler and UNet (``UNet2DModel``, or
  ``UNet2DConditionModel`` + ``AutoencoderKL`` with classifier-free guidance) as a differentiable
  function of *all* its injected noise, one tensor ``noise`` of shape ``(B, S+1, *latent)``:
  slot 0 = x_T, slots 1..S = z_T..z_1 (slot S is unused when σ = 0 at the final step, the usual
  ``set_alpha_to_one=True`` case). Gradient checkpointing per model call, optional no-grad early
  steps.
- :func:`train_digits_unet` / :func:`load_or_train_digits_unet` — an ε-prediction
  ``UNet2DModel`` on scikit-learn's 8x8 digits in [−1, 1], cached as safetensors + config.

The DDIM step (Song et al., 2021, eq. 12 and 16), as ``diffusers.DDIMScheduler.step`` computes
it with ``variance_noise=z`` (ᾱ = ``alphas_cumprod[t]``, ᾱ′ = the value at the previous
timestep, or ``final_alpha_cumprod`` at the last step; ε̂ the model's noise prediction):

    x̂_0    = (x − √(1−ᾱ) ε̂) / √ᾱ
    σ       = η √((1−ᾱ′)/(1−ᾱ)) √(1−ᾱ/ᾱ′)
    x_prev  = √ᾱ′ x̂_0 + √(1−ᾱ′−σ²) ε̂ + σ z
            = √(ᾱ′/ᾱ) x + (√(1−ᾱ′−σ²) − √(1−ᾱ) √(ᾱ′/ᾱ)) ε̂ + σ z

With classifier-free guidance ε̂ = ε_u + s (ε_c − ε_u). η = 0 is deterministic DDIM (only x_T
matters); η = 1 gives DDPM-like ancestral steps.
"""

from optfm.diffusion.sampler import ConditionedSampler, DDIMSampler
from optfm.diffusion.text2image import (
    PROMPT_DIGITS,
    PROMPT_LENGTH,
    PROMPT_STYLES,
    TextToImage,
    digit_prompt,
    load_or_train_second_unet,
    load_or_train_text2image,
    train_text2image,
)
from optfm.diffusion.train import (
    DIGITS_SCHEDULER_CONFIG,
    digits_images,
    digits_unet_cache_path,
    load_or_train_digits_unet,
    train_digits_unet,
)

__all__ = [
    "DIGITS_SCHEDULER_CONFIG",
    "PROMPT_DIGITS",
    "PROMPT_LENGTH",
    "PROMPT_STYLES",
    "ConditionedSampler",
    "DDIMSampler",
    "TextToImage",
    "digit_prompt",
    "digits_images",
    "digits_unet_cache_path",
    "load_or_train_digits_unet",
    "load_or_train_second_unet",
    "load_or_train_text2image",
    "train_digits_unet",
    "train_text2image",
]
