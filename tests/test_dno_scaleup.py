"""DNO on the Stable Diffusion path: a conditional UNet + VAE + text embeddings, with guidance.

Tiny random-config components of the same classes as a real Stable Diffusion folder; what is
checked is the plumbing: shapes, gradients reaching every noise slot, guidance being applied.
"""

from __future__ import annotations

import pytest
import torch

from optfm.alignment import DNO
from optfm.diffusion import DDIMSampler

STEPS = 4


def _components():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=8, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2))
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False)
    with torch.no_grad():
        cond = text(torch.tensor([[1, 5, 7, 9, 2, 0, 0, 0]])).last_hidden_state
        uncond = text(torch.tensor([[1, 2, 0, 0, 0, 0, 0, 0]])).last_hidden_state
    return unet, vae, sched, cond, uncond


class _RedReward:
    """Mean of the red channel of the decoded image (differentiable), per sample."""

    def __call__(self, samples, prompts=None, metadata=None):
        return samples[:, 0].mean(dim=(1, 2)), {}


def test_dno_optimises_sd_style_latent_noise_with_guidance():
    unet, vae, sched, cond, uncond = _components()
    sampler = DDIMSampler(unet, sched, num_inference_steps=STEPS, eta=1.0, guidance_scale=5.0,
                          vae=vae)
    bound = sampler.conditioned(cond, uncond)
    noise = sampler.randn_noise(2, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, STEPS + 1, 4, 8, 8)
    x = bound(noise)
    assert x.shape == (2, 3, 16, 16)  # the 2-block VAE decodes 8x8 latents to 16x16 RGB
    dno = DNO(bound, _RedReward(), noise, prompts=["a red thing", "a red thing"], lr=0.05,
              gamma=1.0)
    grad, _ = dno.compute_gradient()
    # every slot that the sampler consumes receives gradient (set_alpha_to_one=False: the last
    # step's z is used too)
    per_slot = grad.abs().flatten(2).sum(-1)
    assert (per_slot > 0).all()
    hist = dno.run(5)
    assert hist[-1]["reward_mean"] > hist[0]["reward_mean"]
    # guidance is applied: the same noise gives different images at scale 5 and scale 1
    plain = DDIMSampler(unet, sched, num_inference_steps=STEPS, eta=1.0, guidance_scale=1.0,
                        vae=vae).conditioned(cond, uncond)
    with torch.no_grad():
        assert not torch.allclose(bound(noise), plain(noise))


def test_dno_warns_when_the_sampler_model_is_not_frozen():
    unet, vae, sched, cond, _ = _components()
    unet.requires_grad_(True)
    sampler = DDIMSampler(unet, sched, num_inference_steps=2, eta=1.0, vae=vae)
    noise = sampler.randn_noise(1)
    with pytest.warns(UserWarning, match="requires_grad=True"):
        DNO(sampler.conditioned(cond), _RedReward(), noise)
