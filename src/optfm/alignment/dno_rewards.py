"""Rewards and in-distribution metrics for the DNO small reproduction (specs/dno.md).

Images are sklearn digits rescaled to ``[-1, 1]`` (raw pixel ``p`` in 0..16 becomes ``p / 8 - 1``),
as tensors of shape ``(B, 1, 8, 8)``; every reward and metric also accepts flat ``(B, 64)`` and
raises a ``ValueError`` for any other shape. See :func:`load_digits_pm1` for the data.

Rewards follow DDPO's signature ``reward_fn(samples, prompts, metadata) -> (rewards (B,), info)``
and carry ``differentiable``: whether ``rewards`` has a gradient with respect to ``samples``.

- :class:`BrightnessReward` (differentiable): mean pixel value, in ``[-1, 1]``. Maximised by a white
  blob; the clean reward-hacking demo.
- :class:`ClassifierReward` (differentiable): ``log p(target | x)`` under a small torch MLP trained
  on real digits (:func:`train_digit_classifier`; weights cached as safetensors under
  ``cache_dir()/dno/`` by :func:`load_or_train_digit_classifier`).
- :class:`RandomForestReward` (not differentiable): ``p(target | x)`` under a scikit-learn
  ``RandomForestClassifier`` trained on real digits.
- :class:`OnPixelReward` (not differentiable): fraction of the 64 pixels above ``threshold``.
- :class:`CompressibilityReward` (not differentiable): **minus** the zlib-compressed size in bytes
  of the image quantised to uint8, so *higher reward = more compressible* (DDPO's
  "compressibility"; the negated reward would be its "incompressibility").

In-distribution metrics, independent of every reward (:class:`DigitsReference`, fitted once on the
real training digits, seeded): GMM log-likelihood on 20 PCA components, L2 distance to the nearest
training image, max class probability of an independent "gold" classifier (Platt-scaled one-vs-rest
RBF ``SVC``-s, a model family none of the rewards use), and ``||z||^2 / D`` of the noise
(:func:`noise_sq_norm`; about 1 for standard Gaussian noise). Each returns a NumPy array of shape ``(B,)``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optfm.data.digits import DataSplit, load_digits_split

__all__ = [
    "REWARDS",
    "BrightnessReward",
    "ClassifierReward",
    "CompressibilityReward",
    "DigitClassifier",
    "DigitsReference",
    "OnPixelReward",
    "RandomForestReward",
    "load_digits_pm1",
    "load_or_train_digit_classifier",
    "make_reward",
    "noise_sq_norm",
    "train_digit_classifier",
]

_NUM_CLASSES = 10
_NUM_PIXELS = 64


# --------------------------------------------------------------------------------------------- data


def load_digits_pm1(*, random_state: int = 0, test_size: float = 0.2) -> DataSplit:
    """sklearn digits as ``(N, 1, 8, 8)`` float32 images in ``[-1, 1]`` (``p / 8 - 1``), with the
    stratified split of :func:`optfm.data.digits.load_digits_split` (unstandardised)."""
    split = load_digits_split(random_state=random_state, test_size=test_size, standardize=False)
    return DataSplit(
        x_train=(split.x_train / 8.0 - 1.0).reshape(-1, 1, 8, 8),
        y_train=split.y_train,
        x_test=(split.x_test / 8.0 - 1.0).reshape(-1, 1, 8, 8),
        y_test=split.y_test,
        train_index=split.train_index,
        test_index=split.test_index,
    )


def _flat_tensor(samples: Any, name: str = "samples") -> torch.Tensor:
    """``samples`` as a ``(B, 64)`` tensor (a view when possible; keeps the autograd graph)."""
    x = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
    shape = tuple(x.shape)
    if not (x.ndim == 4 and shape[1:] == (1, 8, 8)) and not (x.ndim == 2 and shape[1] == 64):
        raise ValueError(f"{name} must have shape (B, 1, 8, 8) or (B, 64), got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got batch size 0")
    if not x.is_floating_point():
        x = x.float()
    return x.reshape(shape[0], _NUM_PIXELS)


def _flat_numpy(samples: Any, name: str = "samples") -> np.ndarray:
    return _flat_tensor(samples, name).detach().to("cpu", torch.float64).numpy()


def _check_target(target: int) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be an int digit, got {type(target).__name__}")
    if not 0 <= int(target) < _NUM_CLASSES:
        raise ValueError(f"target must be in [0, 9], got {target}")
    return int(target)


# ------------------------------------------------------------------------------------- classifier


def _make_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(_NUM_PIXELS, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, _NUM_CLASSES),
    )


class DigitClassifier(nn.Module):
    """MLP on ``[-1, 1]`` digits: ``(B, 1, 8, 8)`` or ``(B, 64)`` -> logits ``(B, 10)``."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = int(hidden)
        self.net = _make_mlp(self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def _classifier_settings(seed: int, hidden: int, steps: int, lr: float, weight_decay: float,
                         input_noise: float, random_state: int) -> dict[str, Any]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if input_noise < 0:
        raise ValueError(f"input_noise must be >= 0, got {input_noise}")
    return {"kind": "mlp", "version": 1, "seed": int(seed), "hidden": int(hidden),
            "steps": int(steps), "lr": float(lr), "weight_decay": float(weight_decay),
            "input_noise": float(input_noise), "random_state": int(random_state)}


def train_digit_classifier(seed: int = 0, *, hidden: int = 128, steps: int = 400, lr: float = 3e-3,
                           weight_decay: float = 1e-4, input_noise: float = 0.1,
                           random_state: int = 0) -> DigitClassifier:
    """Train :class:`DigitClassifier` on the training part of :func:`load_digits_pm1`.

    Full-batch AdamW for ``steps`` steps, with Gaussian input noise of std ``input_noise`` as
    augmentation (smooths the classifier a little, so its gradient is less adversarial). ``seed``
    fixes the initialisation and the noise; ``random_state`` the train/test split. About a second
    on one CPU core; returned in eval mode with ``requires_grad`` off.
    """
    _classifier_settings(seed, hidden, steps, lr, weight_decay, input_noise, random_state)
    data = load_digits_pm1(random_state=random_state)
    x, y = data.x_train.reshape(-1, _NUM_PIXELS), data.y_train
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DigitClassifier(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        xb = x + input_noise * torch.randn(x.shape, generator=gen) if input_noise > 0 else x
        loss = nn.functional.cross_entropy(model(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model


def _classifier_path(settings: dict[str, Any]) -> Path:
    from optfm.data.corpus import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "dno" / f"digit_classifier-{key}.safetensors"


def load_or_train_digit_classifier(seed: int = 0, *, hidden: int = 128, steps: int = 400,
                                   lr: float = 3e-3, weight_decay: float = 1e-4,
                                   input_noise: float = 0.1, random_state: int = 0,
                                   use_cache: bool = True) -> DigitClassifier:
    """:func:`train_digit_classifier`, cached as ``cache_dir()/dno/digit_classifier-<hash>.safetensors``
    (hash of the settings; settings also in the file's metadata). Written atomically; a file that
    fails to load or whose settings differ is retrained and overwritten."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from optfm.training.io import atomic_write_bytes

    settings = _classifier_settings(seed, hidden, steps, lr, weight_decay, input_noise,
                                    random_state)
    path = _classifier_path(settings)
    if use_cache and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("settings", "null"))
            if meta == settings:
                model = DigitClassifier(hidden)
                model.load_state_dict(load_file(str(path)))
                return model.eval().requires_grad_(False)
        except Exception:  # a corrupt or unreadable cache entry is retrained
            pass
    model = train_digit_classifier(seed, hidden=hidden, steps=steps, lr=lr,
                                   weight_decay=weight_decay, input_noise=input_noise,
                                   random_state=random_state)
    if use_cache:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, save(state, metadata={"settings": json.dumps(settings)}))
    return model


# ---------------------------------------------------------------------------------------- rewards


class BrightnessReward:
    """Mean pixel value of each image, in ``[-1, 1]`` (differentiable)."""

    differentiable = True

    def __call__(self, samples: torch.Tensor, prompts: Any = None,
                 metadata: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        x = _flat_tensor(samples)
        return x.mean(dim=1), {}


class ClassifierReward:
    """``log p(target | x)`` under a torch classifier (differentiable).

    ``classifier`` maps ``(B, 1, 8, 8)`` images in ``[-1, 1]`` to logits ``(B, 10)``; default:
    :func:`load_or_train_digit_classifier` with its defaults. It is put in eval mode and moved to
    the samples' device; its parameters are not touched otherwise. ``info`` holds the probability
    of the target and the predicted class (detached).
    """

    differentiable = True

    def __init__(self, target: int, classifier: nn.Module | None = None) -> None:
        self.target = _check_target(target)
        if classifier is None:
            classifier = load_or_train_digit_classifier()
        self.classifier = classifier.eval()

    def __call__(self, samples: torch.Tensor, prompts: Any = None,
                 metadata: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        x = _flat_tensor(samples).reshape(-1, 1, 8, 8)
        param = next(self.classifier.parameters(), None)
        if param is not None:
            if param.device != x.device:
                self.classifier.to(x.device)
            x = x.to(param.dtype)
        logp = torch.log_softmax(self.classifier(x), dim=-1)
        reward = logp[:, self.target]
        info = {"prob": reward.detach().exp(), "pred": logp.detach().argmax(dim=-1)}
        return reward, info


class _NoGradReward(abc.ABC):
    """Base of the non-differentiable rewards: NumPy in, detached float32 tensor out."""

    differentiable = False

    @abc.abstractmethod
    def _numpy_reward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Implemented by each subclass."""

    def __call__(self, samples: torch.Tensor, prompts: Any = None,
                 metadata: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        flat = _flat_tensor(samples)
        reward, info = self._numpy_reward(flat.detach().to("cpu", torch.float64).numpy())
        return torch.as_tensor(reward, dtype=torch.float32, device=flat.device), info


class RandomForestReward(_NoGradReward):
    """``p(target | x)`` under a scikit-learn ``RandomForestClassifier`` (``n_estimators`` trees,
    ``random_state=seed``) fitted on the training part of :func:`load_digits_pm1`. Not
    differentiable. ``forest`` replaces the default fitted forest (anything with
    ``predict_proba`` and ``classes_``)."""

    def __init__(self, target: int, *, n_estimators: int = 100, seed: int = 0,
                 random_state: int = 0, forest: Any = None) -> None:
        self.target = _check_target(target)
        if forest is None:
            if n_estimators < 1:
                raise ValueError(f"n_estimators must be >= 1, got {n_estimators}")
            from sklearn.ensemble import RandomForestClassifier

            data = load_digits_pm1(random_state=random_state)
            forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed)
            forest.fit(data.x_train.reshape(-1, _NUM_PIXELS).numpy(), data.y_train.numpy())
        classes = list(np.asarray(forest.classes_).tolist())
        if self.target not in classes:
            raise ValueError(f"target {self.target} is not a class of the forest ({classes})")
        self.forest = forest
        self._column = classes.index(self.target)

    def _numpy_reward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        proba = self.forest.predict_proba(x.astype(np.float32))
        return proba[:, self._column], {"pred": np.asarray(self.forest.classes_)[proba.argmax(1)]}


class OnPixelReward(_NoGradReward):
    """Fraction of the 64 pixels strictly above ``threshold`` (count / 64, in ``[0, 1]``). Not
    differentiable."""

    def __init__(self, threshold: float = 0.0) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
        self.threshold = float(threshold)

    def _numpy_reward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        count = (x > self.threshold).sum(axis=1)
        return count / _NUM_PIXELS, {"count": count}


class CompressibilityReward(_NoGradReward):
    """**Minus** the zlib-compressed size (bytes, compression ``level``) of each image, clipped to
    ``[-1, 1]`` and quantised to uint8 (``round((x + 1) / 2 * 255)``), row-major. Higher reward =
    more compressible (a constant image is the maximum). ``info["compressed_bytes"]`` holds the
    positive size. Not differentiable."""

    def __init__(self, level: int = 9) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"level must be in [0, 9], got {level}")
        self.level = int(level)

    def _numpy_reward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        q = np.rint((np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)
        size = np.array([len(zlib.compress(row.tobytes(), self.level)) for row in q])
        return -size.astype(np.float64), {"compressed_bytes": size}


REWARDS = ("brightness", "classifier", "random_forest", "on_pixels", "compressibility")


def make_reward(name: str, *, target: int = 3, **kwargs: Any):
    """A reward by name (one of :data:`REWARDS`); ``target`` is used by the classifier rewards,
    ``kwargs`` go to the reward's constructor."""
    if name == "brightness":
        return BrightnessReward(**kwargs)
    if name == "classifier":
        return ClassifierReward(target, **kwargs)
    if name == "random_forest":
        return RandomForestReward(target, **kwargs)
    if name == "on_pixels":
        return OnPixelReward(**kwargs)
    if name == "compressibility":
        return CompressibilityReward(**kwargs)
    raise ValueError(f"reward name must be one of {REWARDS}, got {name!r}")


# ---------------------------------------------------------------------------------------- metrics


def noise_sq_norm(noise: Any) -> np.ndarray:
    """``||z||^2 / D`` per sample for noise of shape ``(B, ...)`` (any latent shape); about 1 for
    standard Gaussian noise, ``s^2`` for std ``s``."""
    z = noise if isinstance(noise, torch.Tensor) else torch.as_tensor(np.asarray(noise))
    if z.ndim < 2 or z.shape[0] == 0 or z[0].numel() == 0:
        raise ValueError(f"noise must have shape (B, ...) with B >= 1 and D >= 1, got "
                         f"{tuple(z.shape)}")
    z = z.detach().to("cpu", torch.float64).reshape(z.shape[0], -1)
    return (z.pow(2).sum(dim=1) / z.shape[1]).numpy()


class DigitsReference:
    """In-distribution checks fitted once on the real training digits (:func:`load_digits_pm1`),
    independent of the rewards. A couple of seconds on one CPU core.

    - :meth:`pca_gmm_loglik`: log-density under a ``GaussianMixture`` (``n_mixture`` components,
      full covariance, ``random_state=seed``) on ``n_pca`` PCA components of the real digits.
    - :meth:`nearest_distance`: L2 distance (in ``[-1, 1]`` pixel units) to the nearest training
      image.
    - :meth:`gold_confidence`: max class probability of one-vs-rest RBF ``SVC``-s with Platt
      scaling (``CalibratedClassifierCV``, 5-fold, deterministic) -- a "gold" classifier of a
      different family than the reward models (MLP, random forest).
    - :meth:`noise_sq_norm`: ``||z||^2 / D`` (:func:`noise_sq_norm`).
    """

    def __init__(self, *, seed: int = 0, random_state: int = 0, n_pca: int = 20,
                 n_mixture: int = 10) -> None:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.svm import SVC

        if not 1 <= n_pca <= _NUM_PIXELS:
            raise ValueError(f"n_pca must be in [1, 64], got {n_pca}")
        if n_mixture < 1:
            raise ValueError(f"n_mixture must be >= 1, got {n_mixture}")
        data = load_digits_pm1(random_state=random_state)
        x = data.x_train.reshape(-1, _NUM_PIXELS).numpy().astype(np.float64)
        y = data.y_train.numpy()
        self.x_train = x
        self.pca = PCA(n_components=n_pca, random_state=seed).fit(x)
        self.gmm = GaussianMixture(n_components=n_mixture, covariance_type="full",
                                   random_state=seed).fit(self.pca.transform(x))
        # One-vs-rest RBF SVCs, Platt-scaled (``SVC(probability=True)`` is deprecated in
        # scikit-learn 1.9). Far from the data every RBF decision value falls back to its
        # intercept, so off-manifold images get a low confidence; calibrating SVC's default
        # vote-based "ovr" scores instead gives white blobs a confidence of 0.99.
        self.gold = CalibratedClassifierCV(OneVsRestClassifier(SVC()), method="sigmoid", cv=5,
                                           ensemble=False).fit(x, y)

    def pca_gmm_loglik(self, samples: Any) -> np.ndarray:
        """GMM log-density of each sample's PCA projection (nats; higher = more digit-like)."""
        return self.gmm.score_samples(self.pca.transform(_flat_numpy(samples)))

    def nearest_distance(self, samples: Any) -> np.ndarray:
        """L2 distance from each sample to its nearest real training image."""
        x = _flat_numpy(samples)
        d2 = (x * x).sum(1)[:, None] - 2.0 * x @ self.x_train.T + (self.x_train ** 2).sum(1)[None]
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))

    def gold_confidence(self, samples: Any) -> np.ndarray:
        """Max class probability of the gold classifier."""
        return self.gold.predict_proba(_flat_numpy(samples)).max(axis=1)

    def gold_predict(self, samples: Any) -> np.ndarray:
        """Class predicted by the gold classifier."""
        return self.gold.predict(_flat_numpy(samples))

    @staticmethod
    def noise_sq_norm(noise: Any) -> np.ndarray:
        """``||z||^2 / D`` per sample (:func:`noise_sq_norm`)."""
        return noise_sq_norm(noise)

    def evaluate(self, samples: Any, noise: Any = None) -> dict[str, np.ndarray]:
        """All metrics as ``{"gmm_loglik", "nearest_dist", "gold_conf"[, "noise_sq_norm"]}``."""
        out = {"gmm_loglik": self.pca_gmm_loglik(samples),
               "nearest_dist": self.nearest_distance(samples),
               "gold_conf": self.gold_confidence(samples)}
        if noise is not None:
            out["noise_sq_norm"] = noise_sq_norm(noise)
        return out
