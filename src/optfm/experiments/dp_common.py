"""Shared protocol pieces of the privacy experiments (``dp-filters``, ``dp-audit``): the digits
MLP trained with a DP optimizer from :mod:`optfm.privacy`, named filters and bases.

This is composition only; the algorithms live in :mod:`optfm.privacy`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from optfm.data import DataSplit, load_digits_split
from optfm.models import mlp
from optfm.privacy import KalmanFilter, LowPassFilter, make_private
from optfm.training import accuracy, make_generator, seed_everything

__all__ = ["BASES", "FILTERS", "clipped_mean_grad", "digits", "make_filter", "train_dp_digits"]

BASES = ("dp-sgd", "dp-nsgd", "dp-adam")
FILTERS = ("none", "a9b1", "a9b1505", "a72b0505", "cheby2", "disk", "disk-c1")
DISK_KAPPA, DISK_GAMMA = 0.7, 0.5


def make_filter(name: str) -> LowPassFilter | KalmanFilter | None:
    """``none``, a DOPPLER preset, ``disk`` (κ=0.7, γ=0.5) or ``disk-c1`` (κ=0.7, one evaluation)."""
    if name == "none":
        return None
    if name == "disk":
        return KalmanFilter(DISK_KAPPA, DISK_GAMMA)
    if name == "disk-c1":
        return KalmanFilter.one_evaluation(DISK_KAPPA)
    if name in ("a9b1", "a9b1505", "a72b0505", "cheby2"):
        return LowPassFilter.preset(name)
    raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {name!r}")


@functools.lru_cache(maxsize=4)
def digits(split_seed: int = 0) -> DataSplit:
    """The digits split of the privacy protocol (cached: many arms share it)."""
    return load_digits_split(random_state=split_seed)


def clipped_mean_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, C: float, *,
                      params: dict[str, torch.Tensor] | None = None, normalize: bool = False,
                      normalize_r: float = 0.01) -> list[torch.Tensor]:
    """∇̄(θ): the full-data mean of clipped (or DP-NSGD-normalised) per-sample gradients of
    ``model`` at ``params`` (default: its own parameters), via ``torch.func``."""
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)

    def loss(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g[n].flatten(1).norm(dim=1) for n in names], 1).norm(dim=1)
    factor = C / (norms + normalize_r) if normalize else (C / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...", factor, g[n]) / len(x) for n in names]


def train_dp_digits(*, base: str, filter_name: str, lr: float, seed: int, steps: int,
                    batch_size: int, max_grad_norm: float, delta: float,
                    epsilon: float | None = None, noise_multiplier: float | None = None,
                    hidden: int = 128, split_seed: int = 0, accountant: str = "prv",
                    setup: Callable[[nn.Module, Any, Any], None] | None = None,
                    before_step: Callable[[int, nn.Module], None] | None = None,
                    after_step: Callable[[int, nn.Module, Any], None] | None = None) -> dict[str, Any]:
    """Train the MLP 64-``hidden``-10 (tanh) on digits for ``steps`` Poisson-sampled DP steps.

    σ is calibrated for (``epsilon``, ``delta``) over ``steps`` unless ``noise_multiplier`` is given.
    Callbacks: ``setup(model, optimizer, engine)`` once; ``before_step(t, model)`` and
    ``after_step(t, model, optimizer)`` around every step. Returns the model, engine, test accuracy
    and the final training loss.
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
    data = digits(split_seed)
    seed_everything(seed)  # Poisson batches come from torch's global RNG
    model = mlp(64, hidden, 10, generator=make_generator(seed))
    opt = (torch.optim.Adam if base == "dp-adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size)
    kw: dict[str, Any] = ({"noise_multiplier": noise_multiplier} if noise_multiplier is not None
                          else {"target_epsilon": epsilon, "steps": steps})
    model, opt, loader, engine = make_private(
        model, opt, loader, target_delta=delta, max_grad_norm=max_grad_norm,
        filter=make_filter(filter_name), accountant=accountant, normalize=(base == "dp-nsgd"),
        noise_generator=make_generator(50_000 + seed), **kw)
    if setup is not None:
        setup(model, opt, engine)
    loss_fn = nn.CrossEntropyLoss()
    t = 0
    while t < steps:
        for x, y in loader:
            if before_step is not None:
                before_step(t, model)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            if after_step is not None:
                after_step(t, model, opt)
            t += 1
            if t == steps:
                break
    inner = model._module
    with torch.no_grad():
        train_loss = float(loss_fn(inner(data.x_train), data.y_train))
    return {"model": inner, "engine": engine, "test_acc": accuracy(inner, data.x_test, data.y_test),
            "train_loss": train_loss}
