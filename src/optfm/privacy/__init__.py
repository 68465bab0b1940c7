"""Differentially private optimizers that denoise privatized gradients, on top of Opacus.

Will hold DOPPLER's low-pass filter (``privacy/doppler.py``) and DiSK's simplified Kalman filter
(``privacy/disk.py``), the ``make_private`` facade over Opacus's ``PrivacyEngine``, and the one-run
empirical privacy audit. See ``specs/privacy.md``.
"""
