"""Representation quality of a contrastive backbone (specs/contrastive.md, "Evaluation").

Features come from the backbone, not the projector. Two read-outs, both scikit-learn:

- :func:`linear_probe_accuracy`: ``LogisticRegression`` on standardised features (scaler fitted on
  the training features only);
- :func:`knn_accuracy`: ``KNeighborsClassifier`` with cosine distance (1-NN and 10-NN in the spec).

:func:`encode` computes backbone features batch by batch without gradients.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["encode", "knn_accuracy", "linear_probe_accuracy"]


def _as_numpy(name: str, a: torch.Tensor | np.ndarray, ndim: int) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def _check_xy(train_feats, train_y, test_feats, test_y) -> tuple[np.ndarray, ...]:
    xtr = _as_numpy("train_feats", train_feats, 2).astype(np.float64)
    ytr = _as_numpy("train_y", train_y, 1)
    xte = _as_numpy("test_feats", test_feats, 2).astype(np.float64)
    yte = _as_numpy("test_y", test_y, 1)
    if len(xtr) != len(ytr):
        raise ValueError(f"train_feats and train_y differ in length: {len(xtr)} vs {len(ytr)}")
    if len(xte) != len(yte):
        raise ValueError(f"test_feats and test_y differ in length: {len(xte)} vs {len(yte)}")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train_feats and test_feats differ in width: "
                         f"{xtr.shape[1]} vs {xte.shape[1]}")
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise ValueError("train_feats and test_feats must be finite")
    return xtr, ytr, xte, yte


def linear_probe_accuracy(train_feats: torch.Tensor | np.ndarray,
                          train_y: torch.Tensor | np.ndarray,
                          test_feats: torch.Tensor | np.ndarray,
                          test_y: torch.Tensor | np.ndarray, seed: int = 0,
                          max_iter: int = 2000, C: float = 1.0) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression trained on
    standardised training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, xte, yte = _check_xy(train_feats, train_y, test_feats, test_y)
    if len(np.unique(ytr)) < 2:
        raise ValueError("train_y must contain at least two classes")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    clf = make_pipeline(StandardScaler(),
                        LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def knn_accuracy(train_feats: torch.Tensor | np.ndarray, train_y: torch.Tensor | np.ndarray,
                 test_feats: torch.Tensor | np.ndarray, test_y: torch.Tensor | np.ndarray,
                 k: int = 1) -> float:
    """Test accuracy of a ``k``-nearest-neighbour classifier with cosine distance
    (majority vote, brute-force search)."""
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr, xte, yte = _check_xy(train_feats, train_y, test_feats, test_y)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if k > len(xtr):
        raise ValueError(f"k must be <= the number of training samples ({len(xtr)}), got {k}")
    clf = KNeighborsClassifier(n_neighbors=int(k), metric="cosine", algorithm="brute")
    clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def encode(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Backbone features of ``x`` (``model.features`` if it exists, else ``model``) as a CPU
    float tensor, computed in eval mode without gradients; the model's train/eval mode is
    restored afterwards. Batches are moved to the model's device."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty tensor of shape (N, ...)")
    fn = getattr(model, "features", model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [fn(x[i:i + batch_size].to(device)).float().cpu()
                    for i in range(0, x.shape[0], int(batch_size))]
    finally:
        model.train(was_training)
    return torch.cat(outs)
