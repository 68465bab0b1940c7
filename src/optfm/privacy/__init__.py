"""Differentially private optimizers that denoise privatized gradients, on top of Opacus.

- :class:`LowPassFilter` (DOPPLER, ``privacy/doppler.py``) and :class:`KalmanFilter` (DiSK,
  ``privacy/disk.py``): filters applied to the already-privatized gradient.
- :func:`make_private`: one call over Opacus's ``PrivacyEngine`` (per-sample gradients, Poisson
  sampling, clipping, noise, PRV/RDP accounting) that adds a filter; works with any
  ``torch.optim`` optimizer and any model Opacus supports, including ``transformers`` models.
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
from optfm.privacy.optimizer import (
    DistributedPrivateOptimizer,
    PrivacyBudgetExhaustedError,
    PrivateOptimizer,
)

__all__ = [
    "PRESETS",
    "DistributedPrivateOptimizer",
    "KalmanFilter",
    "LowPassFilter",
    "PrivacyBudgetExhaustedError",
    "PrivateEngine",
    "PrivateOptimizer",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "make_private",
]
