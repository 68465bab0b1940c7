"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes).

Two views:

- :func:`load_digits_split`: the 64 pixels standardised with statistics of the training part only,
  stratified 80/20 split. The data set of the privacy experiments (specs/privacy.md).
- :func:`load_digits_canvas`: each digit placed at a fixed random offset in a 12x12 canvas with
  U(0, 0.1) background noise (specs/contrastive.md). Plain 8x8 digits are too easy for
  representation learning; the random offset makes raw-pixel linear classification hard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DataSplit", "load_digits_canvas", "load_digits_split", "make_digits_canvas"]


@dataclass
class DataSplit:
    """Train/test tensors (``x`` float32, ``y`` int64) plus the train/test row indices into the
    original data set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: np.ndarray
    test_index: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max().item()) + 1


def _check_fraction(test_size: float) -> None:
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")


def _stratified_split(y: np.ndarray, test_size: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_size, stratify=y, random_state=random_state)
    return np.sort(tr), np.sort(te)


def load_digits_split(*, random_state: int = 0, test_size: float = 0.2,
                      standardize: bool = True) -> DataSplit:
    """Digits as 64-d vectors, stratified split; standardised with training-set mean/std.

    Pixels that are constant in the training set keep scale 1 (scikit-learn's ``StandardScaler``).
    """
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    _check_fraction(test_size)
    x, y = load_digits(return_X_y=True)
    tr, te = _stratified_split(y, test_size, random_state)
    x_tr, x_te = x[tr].astype(np.float64), x[te].astype(np.float64)
    if standardize:
        scaler = StandardScaler().fit(x_tr)
        x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    return DataSplit(
        x_train=torch.from_numpy(x_tr.astype(np.float32)),
        y_train=torch.from_numpy(y[tr].astype(np.int64)),
        x_test=torch.from_numpy(x_te.astype(np.float32)),
        y_test=torch.from_numpy(y[te].astype(np.int64)),
        train_index=tr,
        test_index=te,
    )


def make_digits_canvas(*, canvas_size: int = 12, noise: float = 0.1,
                       random_state: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1797 digits on a ``canvas_size`` square canvas.

    Each image is U(0, ``noise``) background noise with the digit (pixel values scaled to [0, 1])
    pasted at an offset drawn once, uniformly, per image; where the digit is darker than the
    noise, the noise stays (elementwise maximum). Offsets and noise are fixed by ``random_state``.

    Returns ``(images [N, S, S] float32 in [0, 1], labels [N] int64, offsets [N, 2] (row, col))``.
    """
    from sklearn.datasets import load_digits

    if canvas_size < 8:
        raise ValueError(f"canvas_size must be >= 8 (digits are 8x8), got {canvas_size}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    data = load_digits()
    digits = (data.images / 16.0).astype(np.float32)
    n = len(digits)
    rng = np.random.default_rng(random_state)
    span = canvas_size - 8 + 1
    offsets = rng.integers(0, span, size=(n, 2))
    images = rng.uniform(0.0, noise, size=(n, canvas_size, canvas_size)).astype(np.float32)
    for i, (r, c) in enumerate(offsets):
        region = images[i, r:r + 8, c:c + 8]
        np.maximum(region, digits[i], out=region)
    return images, data.target.astype(np.int64), offsets


def load_digits_canvas(*, canvas_size: int = 12, noise: float = 0.1, random_state: int = 0,
                       test_size: float = 0.2) -> DataSplit:
    """Digits-on-canvas as ``[N, 1, S, S]`` image tensors, stratified split (same ``random_state``
    draws offsets/noise and the split)."""
    _check_fraction(test_size)
    images, labels, _ = make_digits_canvas(canvas_size=canvas_size, noise=noise,
                                           random_state=random_state)
    tr, te = _stratified_split(labels, test_size, random_state)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    return DataSplit(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
                     train_index=tr, test_index=te)
