"""Differentially private optimizers that denoise privatized gradients, on top of Opacus.

- :class:`LowPassFilter` (DOPPLER, ``privacy/doppler.py``) and :class:`KalmanFilter` (DiSK,
  ``privacy/disk.py``): filters applied to the already-privatized gradient.
- :func:`make_private`: one call over Opacus's ``PrivacyEngine`` (per-sample gradients, Poisson
  sampling, clipping, noise, PRV/RDP accounting) that adds a filter; works with any
  ``torch.optim`` optimizer and any model Opacus supports, including ``transformers`` models;
  ``grad_sample_mode="ghost"`` for ghost clipping (the loss comes from ``engine.criterion``).
- :mod:`optfm.privacy.grad_samplers`: Opacus grad samplers for ``transformers``' ``Conv1D``
  (GPT-2) and Llama-style RMSNorm, so causal LMs run through Opacus's hooks; registered on import
  for the classes already loaded, and again by :func:`make_private`.
- :mod:`optfm.privacy.lm`: DP fine-tuning of causal LMs: :func:`prepare_lm_for_dp` (LoRA,
  freezing, per-sample position ids) and :func:`causal_lm_per_sample_loss` /
  :class:`CausalLMLoss` (a mean of per-sample token means, as DP needs).
- :mod:`optfm.privacy.audit`: a one-run empirical privacy audit (lower bound on ε).
"""

from optfm.privacy.disk import KalmanFilter
from optfm.privacy.doppler import PRESETS, LowPassFilter
from optfm.privacy.engine import (
    PrivateEngine,
    calibrate_noise_multiplier,
    epsilon_for,
    make_private,
)
from optfm.privacy.grad_samplers import (
    modules_without_grad_sampler,
    register_rms_norm_grad_sampler,
    register_transformers_grad_samplers,
    tied_parameters,
)
from optfm.privacy.lm import (
    CausalLMLoss,
    causal_lm_per_sample_loss,
    measure_dp_step,
    per_sample_position_ids,
    prepare_lm_for_dp,
)
from optfm.privacy.optimizer import (
    DistributedPrivateOptimizer,
    GhostPrivateOptimizer,
    PrivacyBudgetExhaustedError,
    PrivateOptimizer,
)

__all__ = [
    "PRESETS",
    "CausalLMLoss",
    "DistributedPrivateOptimizer",
    "GhostPrivateOptimizer",
    "KalmanFilter",
    "LowPassFilter",
    "PrivacyBudgetExhaustedError",
    "PrivateEngine",
    "PrivateOptimizer",
    "calibrate_noise_multiplier",
    "causal_lm_per_sample_loss",
    "epsilon_for",
    "make_private",
    "measure_dp_step",
    "modules_without_grad_sampler",
    "per_sample_position_ids",
    "prepare_lm_for_dp",
    "register_rms_norm_grad_sampler",
    "register_transformers_grad_samplers",
    "tied_parameters",
]

register_transformers_grad_samplers()  # the classes already imported; make_private registers the rest
