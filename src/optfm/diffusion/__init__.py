"""Shared diffusion building blocks (arrive with the DNO issue, reused by concept erasure).

Will hold: training of small ``diffusers`` models on local data (``UNet2DModel`` on digits, cached
as safetensors + config) and a differentiable DDIM sampler over a ``diffusers`` scheduler that
takes the full injected-noise tensor, with eta, classifier-free guidance, gradient checkpointing
per model call and no-grad early steps. See ``specs/dno.md``.
"""
