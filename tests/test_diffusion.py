"""optfm.diffusion: the differentiable DDIM sampler against diffusers' own loop, and digits DDPM."""

from __future__ import annotations

import warnings

import pytest
import torch

from optfm.diffusion import (
    DDIMSampler,
    digits_unet_cache_path,
    load_or_train_digits_unet,
    train_digits_unet,
)

STEPS = 6


def _sched_config(**kw):
    return {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
            "clip_sample": False, **kw}


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                    layers_per_block=1, norm_num_groups=4,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cond_parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 12, generator=g)
    neg = torch.randn(1, 5, 12, generator=g)
    return (unet.eval().requires_grad_(False), vae.eval().requires_grad_(False), text, neg)


def _reference(unet, noise, eta, steps=STEPS, **sched_kw):
    """diffusers' DDIM loop, with the injected noise taken from the same tensor."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(_sched_config(**sched_kw))
    sched.set_timesteps(steps)
    x = noise[:, 0]
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = unet(x, t).sample
            z = noise[:, i + 1] if eta > 0 else None
            x = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_sample_equals_diffusers_loop(unet, eta):
    s = DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS, eta=eta)
    noise = s.randn_noise(3, generator=torch.Generator().manual_seed(0))
    assert noise.shape == s.noise_shape(3) == (3, STEPS + 1, 1, 8, 8)
    with torch.no_grad():
        out = s.sample(noise)
    torch.testing.assert_close(out, _reference(unet, noise, eta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s(noise), out, atol=0, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_equals_ddim_pipeline_with_generator(unet, eta):
    """Reproduce DDIMPipeline's generator draws: x_T first, then one z per step (η > 0 only)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    b, shape = 2, (2, 1, 8, 8)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(_sched_config()))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=b, generator=torch.Generator().manual_seed(3), eta=eta,
               num_inference_steps=STEPS, output_type="pt").images  # (B, H, W, C) in [0, 1]

    g = torch.Generator().manual_seed(3)
    slots = [torch.randn(shape, generator=g)]
    slots += [torch.randn(shape, generator=g) if eta > 0 else torch.zeros(shape)
              for _ in range(STEPS)]
    noise = torch.stack(slots, dim=1)
    s = DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS, eta=eta)
    with torch.no_grad():
        out = (s.sample(noise) / 2 + 0.5).clamp(0, 1)
    if ref.shape[-1] == 1:  # channels last
        ref = ref.permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _slot_grad_norms(sampler, noise, **kw):
    noise = noise.clone().requires_grad_(True)
    out = sampler.sample(noise, **kw)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return noise.grad.flatten(2).norm(dim=2).sum(0), out.detach(), noise.grad


def test_gradients_reach_every_used_slot(unet):
    noise = torch.randn(2, STEPS + 1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g1, _, _ = _slot_grad_norms(DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS,
                                            eta=1.0), noise)
    assert (g1[:-1] > 0).all(), g1
    assert g1[-1] == 0  # slot S (z of the final step): σ = 0 there with set_alpha_to_one=True
    g0, _, _ = _slot_grad_norms(DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS,
                                            eta=0.0), noise)
    assert g0[0] > 0 and (g0[1:] == 0).all(), g0
    # Stable Diffusion's config (set_alpha_to_one=False): the final z is used, a little.
    gs, _, _ = _slot_grad_norms(DDIMSampler(unet, _sched_config(set_alpha_to_one=False,
                                                                steps_offset=1),
                                            num_inference_steps=STEPS, eta=1.0), noise)
    assert (gs > 0).all(), gs


def test_checkpointing_does_not_change_samples_or_gradients(unet):
    noise = torch.randn(2, STEPS + 1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    res = []
    for ckpt in (True, False):
        s = DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS, eta=1.0,
                        gradient_checkpointing=ckpt)
        res.append(_slot_grad_norms(s, noise))
    torch.testing.assert_close(res[0][1], res[1][1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res[0][2], res[1][2], atol=1e-6, rtol=1e-6)


def test_no_grad_steps(unet):
    k = 2
    noise = torch.randn(2, STEPS + 1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    s = DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS, eta=1.0, no_grad_steps=k)
    g, out, _ = _slot_grad_norms(s, noise)
    assert (g[: k + 1] == 0).all(), g  # x_T and the z of steps 0..k-1
    assert (g[k + 1: -1] > 0).all(), g
    full = DDIMSampler(unet, _sched_config(), num_inference_steps=STEPS, eta=1.0)
    with torch.no_grad():
        torch.testing.assert_close(out, full.sample(noise), atol=1e-6, rtol=1e-6)


def test_conditional_latent_sampler_with_guidance(cond_parts):
    unet, vae, text, neg = cond_parts
    s = DDIMSampler(unet, _sched_config(), num_inference_steps=3, eta=1.0, guidance_scale=5.0,
                    vae=vae)
    assert s.noise_shape(2) == (2, 4, 4, 8, 8)
    noise = s.randn_noise(2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    img = s.sample(noise, encoder_hidden_states=text, negative_encoder_hidden_states=neg)
    assert img.shape == (2, 3, 16, 16)
    img.square().mean().backward()
    assert noise.grad is not None and (noise.grad.flatten(2).norm(dim=2)[:, :-1] > 0).all()

    with torch.no_grad():
        s1 = DDIMSampler(unet, _sched_config(), num_inference_steps=3, eta=1.0,
                         guidance_scale=1.0, vae=vae)
        img1 = s1.sample(noise, encoder_hidden_states=text, negative_encoder_hidden_states=neg)
        assert (img1 - img).abs().max() > 1e-3

        # one step in latent space equals the guidance formula
        one = DDIMSampler(unet, _sched_config(), num_inference_steps=1, eta=0.0,
                          guidance_scale=5.0)
        nz = noise[:, :2]
        got = one.sample(nz, encoder_hidden_states=text, negative_encoder_hidden_states=neg)
        t = one.timesteps[0]
        x = nz[:, 0]
        eps_c = unet(x, t, encoder_hidden_states=text).sample
        eps_u = unet(x, t, encoder_hidden_states=neg.expand_as(text)).sample
        eps = eps_u + 5.0 * (eps_c - eps_u)
        want = one.scheduler.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        # without guidance: a single conditional pass
        plain = DDIMSampler(unet, _sched_config(), num_inference_steps=1, eta=0.0)
        got = plain.sample(nz, encoder_hidden_states=text)
        want = one.scheduler.step(eps_c, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_input(unet, cond_parts):
    cfg = _sched_config()
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(unet, cfg, eta=-0.1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMSampler(unet, cfg, num_inference_steps=0)
    with pytest.raises(ValueError, match="no_grad_steps"):
        DDIMSampler(unet, cfg, num_inference_steps=4, no_grad_steps=4)
    with pytest.raises(ValueError, match=r"guidance_scale.*conditional"):
        DDIMSampler(unet, cfg, guidance_scale=3.0)
    s = DDIMSampler(unet, cfg, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"\(2, 7, 1, 8, 8\)"):
        s.sample(torch.randn(2, STEPS, 1, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        s.sample(torch.randn(s.noise_shape(1)), encoder_hidden_states=torch.randn(1, 2, 3))
    cunet, _, text, _ = cond_parts
    c = DDIMSampler(cunet, cfg, num_inference_steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        c.sample(torch.randn(c.noise_shape(2)))
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        c.sample(torch.randn(c.noise_shape(2)), encoder_hidden_states=text)
    with pytest.warns(UserWarning, match="clip_sample"):
        s = DDIMSampler(unet, {**cfg, "clip_sample": True})
    assert s.scheduler.config.clip_sample is False


def test_accepts_scheduler_objects(unet):
    from diffusers import DDIMScheduler, DDPMScheduler

    noise = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sched in (DDPMScheduler.from_config(_sched_config()),
                      DDIMScheduler.from_config(_sched_config()), _sched_config()):
            s = DDIMSampler(unet, sched, num_inference_steps=3, eta=1.0)
            assert s.eta == 1.0
            with torch.no_grad():
                outs.append(s(noise))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)


def test_train_loss_falls_and_cache_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTFM_CACHE", str(tmp_path))
    kw = dict(steps=30, batch_size=32, lr=2e-3, seed=0, warmup_steps=5, ema_decay=0.0,
              block_out_channels=(8, 16))
    losses: list[float] = []
    unet, cfg = train_digits_unet(losses=losses, **kw)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert cfg["num_train_timesteps"] == 1000 and cfg["clip_sample"] is False

    a, cfg_a = load_or_train_digits_unet(**kw)
    path = digits_unet_cache_path(**kw)
    assert path.is_relative_to(tmp_path) and (path / "settings.json").is_file()
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs
    from diffusers import DDPMScheduler

    assert DDPMScheduler.from_pretrained(path / "scheduler").config.beta_schedule == cfg["beta_schedule"]
    b, cfg_b = load_or_train_digits_unet(**kw)
    assert cfg_a == cfg_b == cfg
    sa, sb, su = a.state_dict(), b.state_dict(), unet.state_dict()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=0, rtol=0)
        torch.testing.assert_close(sa[name], su[name], atol=0, rtol=0)  # training is seeded
    assert digits_unet_cache_path(**{**kw, "seed": 1}) != path
    with pytest.raises(TypeError, match="unknown"):
        digits_unet_cache_path(stepz=3)
