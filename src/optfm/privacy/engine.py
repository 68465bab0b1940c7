"""``make_private``: one call that turns a model, optimizer and data loader into a DP training
setup on Opacus, with an optional DOPPLER/DiSK filter.

Opacus does the privacy work (``GradSampleModule`` per-sample gradients, Poisson-sampling
``DPDataLoader``, clipping, noise, the RDP/PRV accountant); this module chooses σ, swaps in
:class:`~optfm.privacy.optimizer.PrivateOptimizer` (same clipping and noise, plus the filter) and
keeps the accountant attached to the optimizer so it sees exactly the σ that is used. The filter
runs after the noise and is post-processing: ε does not depend on it.

``grad_sample_mode="ghost"`` (Opacus's ghost clipping) never forms per-sample gradients: the loss
must come from the criterion wrapper that ``make_private`` leaves on ``engine.criterion``, whose
``backward()`` runs two backward passes (per-sample norms, then the clipped sum). The 4-tuple
return stays the same in every mode; ``engine.criterion`` is the caller's own criterion in the
other modes, so ``loss = engine.criterion(output, target); loss.backward()`` works in all of them.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from optfm.privacy.disk import KalmanFilter
from optfm.privacy.doppler import LowPassFilter
from optfm.privacy.grad_samplers import register_transformers_grad_samplers, tied_parameters
from optfm.privacy.optimizer import (
    DistributedPrivateOptimizer,
    GhostPrivateOptimizer,
    PrivacyBudgetExhaustedError,
    PrivateOptimizer,
    ghost_clipping_error,
)

__all__ = ["PrivateEngine", "calibrate_noise_multiplier", "epsilon_for", "make_private"]

_ACCOUNTANTS = ("prv", "rdp")
_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


def _new_accountant(name: str):
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, *,
                               epochs: int | None = None, steps: int | None = None,
                               accountant: str = "prv") -> float:
    """σ that spends exactly ``target_epsilon`` at ``target_delta`` (Opacus's
    ``get_noise_multiplier``, tolerance 0.01). Cached: calibration with the PRV accountant takes
    about a second, and sweeps ask for the same σ many times."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
            epochs=epochs, steps=steps, accountant=accountant))


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv") -> float:
    """ε after ``steps`` steps of the subsampled Gaussian mechanism (Opacus's accountant)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _new_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivateEngine:
    """What :func:`make_private` returns besides the model, optimizer and loader.

    ``epsilon(delta)`` is the ε spent so far; ``steps`` the privatized steps taken; ``max_steps``
    the steps the budget allows (``None`` without a target ε). ``criterion``: with
    ``grad_sample_mode="ghost"``, Opacus's ``DPLossFastGradientClipping`` around the criterion given
    to :func:`make_private` (compute the loss with it: its ``backward()`` does the clipping);
    otherwise that criterion unchanged (``None`` if none was given).
    """

    privacy_engine: Any  # opacus.PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    target_delta: float
    target_epsilon: float | None
    accountant_name: str
    filter: LowPassFilter | KalmanFilter | None
    on_budget_exhausted: str | None
    steps: int = 0
    max_steps: int | None = None
    criterion: Any = None
    grad_sample_mode: str = "hooks"
    _warned: bool = field(default=False, repr=False)

    @property
    def accountant(self) -> Any:
        return self.privacy_engine.accountant

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the target δ)."""
        d = self.target_delta if delta is None else delta
        if not 0.0 < d < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {d}")
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf  # no noise: no privacy (the PRV accountant would overflow here)
        return float(self.accountant.get_epsilon(delta=d))

    def _budget_allows_step(self) -> bool:
        if self.max_steps is None or self.steps < self.max_steps:
            return True
        msg = (f"privacy budget exhausted: {self.steps} steps at σ={self.noise_multiplier:.4g}, "
               f"q={self.sample_rate:.4g} reach ε={self.epsilon():.4g} "
               f"(target {self.target_epsilon} at δ={self.target_delta}); another step would exceed it")
        if self.on_budget_exhausted == "raise":
            raise PrivacyBudgetExhaustedError(msg)
        if not self._warned:
            warnings.warn(msg + "; continuing because on_budget_exhausted='warn'", stacklevel=3)
            self._warned = True
        return True

    def _count_step(self, _optimizer: Any) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Accountant history, step count and filter state (for checkpoints)."""
        return {"steps": self.steps, "accountant": self.accountant.state_dict(),
                "filter": None if self.filter is None else self.filter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.accountant.load_state_dict(state["accountant"])
        if self.filter is not None and state["filter"] is not None:
            self.filter.load_state_dict(state["filter"])


def _max_steps(sigma: float, q: float, eps: float, delta: float, accountant: str) -> int:
    """Largest T with ε(σ, q, T) <= eps (binary search over the accountant)."""
    if sigma == 0:
        return 0
    if epsilon_for(sigma, q, 1, delta, accountant) > eps:
        return 0
    lo, hi = 1, 2
    while epsilon_for(sigma, q, hi, delta, accountant) <= eps:
        lo, hi = hi, hi * 2
        if hi > 10**9:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_for(sigma, q, mid, delta, accountant) <= eps:
            lo = mid
        else:
            hi = mid
    return lo


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    target_delta: float = 1e-5,
    epochs: int | None = None,
    steps: int | None = None,
    max_grad_norm: float = 1.0,
    filter: LowPassFilter | KalmanFilter | None = None,
    accountant: str = "prv",
    normalize: bool = False,
    normalize_r: float = 0.01,
    on_budget_exhausted: str | None = None,
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
    grad_sample_mode: str = "hooks",
    criterion: Any = None,
) -> tuple[torch.nn.Module, PrivateOptimizer | GhostPrivateOptimizer, DataLoader, PrivateEngine]:
    """Make ``model``/``optimizer``/``data_loader`` differentially private (Opacus) with an optional
    DOPPLER (:class:`LowPassFilter`) or DiSK (:class:`KalmanFilter`) filter.

    σ comes from ``noise_multiplier``, or is calibrated from ``target_epsilon`` for ``epochs`` or
    ``steps`` at ``target_delta`` with Opacus's ``get_noise_multiplier``. With both given, σ is
    ``noise_multiplier`` and ``target_epsilon`` is only the budget for ``on_budget_exhausted``.
    ``normalize=True`` gives DP-NSGD (per-sample ``C g / (||g|| + normalize_r)`` instead of clipping).
    ``on_budget_exhausted="raise"`` raises :class:`PrivacyBudgetExhaustedError` before a step that
    would exceed ``target_epsilon``; ``"warn"`` warns once and continues.

    ``grad_sample_mode``: ``"hooks"`` (default; Opacus's per-layer grad samplers, including
    optfm's for ``transformers``' ``Conv1D`` and Llama-style RMSNorm, see
    :mod:`optfm.privacy.grad_samplers`), ``"functorch"``, ``"ew"``, or ``"ghost"`` (ghost
    clipping: per-sample gradient norms without per-sample gradients; needs ``criterion``, a loss
    module with ``reduction="mean"`` whose ``reduction="none"`` output is one loss per sample,
    e.g. :class:`optfm.privacy.lm.CausalLMLoss` or ``nn.CrossEntropyLoss()``; compute the loss with
    ``engine.criterion``). Ghost clipping supports no filter, DOPPLER, and DiSK with c ∈ {0, 1}
    (``KalmanFilter.one_evaluation``); it refuses DiSK's two-evaluation mode, ``normalize=True``,
    tied trainable parameters (e.g. tied input/output embeddings) and DDP, each with a
    ``ValueError`` that says why.

    Returns ``(model, optimizer, data_loader, engine)``: the model wrapped in Opacus's
    ``GradSampleModule``, the private optimizer (use it like any optimizer; with DiSK call
    ``optimizer.step(closure)``), the Poisson-sampling loader, and a :class:`PrivateEngine`.
    """
    from opacus import PrivacyEngine
    from opacus.optimizers.ddpoptimizer import DistributedDPOptimizer

    if accountant not in _ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(_ACCOUNTANTS)}, got {accountant!r}")
    if not 0.0 < target_delta < 1.0:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if target_epsilon is None and noise_multiplier is None:
        raise ValueError("give target_epsilon (σ is calibrated) or noise_multiplier")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if on_budget_exhausted not in (None, "raise", "warn"):
        raise ValueError(f"on_budget_exhausted must be None, 'raise' or 'warn', got {on_budget_exhausted!r}")
    if on_budget_exhausted is not None and target_epsilon is None:
        raise ValueError("on_budget_exhausted needs target_epsilon (the budget to enforce)")
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    for name, v in (("epochs", epochs), ("steps", steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if grad_sample_mode not in _GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {', '.join(_GRAD_SAMPLE_MODES)}, "
                         f"got {grad_sample_mode!r}")
    register_transformers_grad_samplers()
    if grad_sample_mode == "ghost":
        _check_ghost(model, criterion, filter, normalize)

    for name, p in model.named_parameters():  # lets errors name the parameter
        p._optfm_name = name
    n_batches = len(data_loader)
    if n_batches == 0:
        raise ValueError("data_loader is empty")
    sample_rate = 1.0 / n_batches
    if noise_multiplier is None:
        if epochs is None and steps is None:
            raise ValueError("calibrating σ from target_epsilon needs epochs or steps")
        sigma = calibrate_noise_multiplier(float(target_epsilon), float(target_delta), sample_rate,
                                           epochs=epochs, steps=steps, accountant=accountant)
    else:
        sigma = float(noise_multiplier)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    extra = {"criterion": criterion} if grad_sample_mode == "ghost" else {}
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=sigma,
        max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling,
        noise_generator=noise_generator, grad_sample_mode=grad_sample_mode, **extra)
    if grad_sample_mode == "ghost":
        model, dp_opt, _, loader = wrapped  # the criterion is rebuilt below around our optimizer
        cls = GhostPrivateOptimizer
    else:
        model, dp_opt, loader = wrapped
        cls = DistributedPrivateOptimizer if isinstance(dp_opt, DistributedDPOptimizer) else PrivateOptimizer
    private_opt = cls(
        dp_opt.original_optimizer, filter=filter, normalize=normalize, normalize_r=normalize_r,
        noise_multiplier=dp_opt.noise_multiplier, max_grad_norm=dp_opt.max_grad_norm,
        expected_batch_size=dp_opt.expected_batch_size, loss_reduction=dp_opt.loss_reduction,
        generator=dp_opt.generator, secure_mode=dp_opt.secure_mode)
    accountant_hook = dp_opt.step_hook

    pe = PrivateEngine(
        privacy_engine=engine, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
        sample_rate=sample_rate, target_delta=target_delta, target_epsilon=target_epsilon,
        accountant_name=accountant, filter=filter, on_budget_exhausted=on_budget_exhausted,
        criterion=criterion, grad_sample_mode=grad_sample_mode)
    if grad_sample_mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        pe.criterion = DPLossFastGradientClipping(model, private_opt, criterion, loss_reduction="mean")

    def hook(opt: Any) -> None:  # after noise, before the base step: accountant + step count
        accountant_hook(opt)
        pe._count_step(opt)

    private_opt.attach_step_hook(hook)
    if on_budget_exhausted is not None:
        pe.max_steps = _max_steps(sigma, sample_rate, target_epsilon, target_delta, accountant)
        private_opt._before_step = pe._budget_allows_step
    return model, private_opt, loader, pe


def _check_ghost(model: torch.nn.Module, criterion: Any, filter: Any, normalize: bool) -> None:
    """The ``ValueError`` s of :func:`make_private` specific to ghost clipping."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    if criterion is None:
        raise ValueError("grad_sample_mode='ghost' needs criterion=...: the loss module (reduction='mean', "
                         "one loss per sample with reduction='none', e.g. optfm.privacy.CausalLMLoss() or "
                         "nn.CrossEntropyLoss()); compute the loss with engine.criterion")
    if getattr(criterion, "reduction", "mean") != "mean":
        raise ValueError(f"criterion.reduction must be 'mean' with grad_sample_mode='ghost' (a mean over "
                         f"samples of per-sample losses), got {criterion.reduction!r}")
    if isinstance(model, (DDP, DPDDP)):
        raise ValueError("grad_sample_mode='ghost' under DDP is not supported by optfm.privacy yet; "
                         "use grad_sample_mode='hooks'")
    why = ghost_clipping_error(filter, normalize)
    if why is not None:
        raise ValueError(why)
    tied = tied_parameters(model, ghost_only=True)
    if tied:
        name, users = next(iter(tied.items()))
        raise ValueError(
            f"trainable parameter {name} is shared by {len(users)} layers ({', '.join(users)}): "
            "ghost clipping computes each layer's per-sample gradient norm on its own and cannot "
            "combine two layers' contributions to one tensor (Opacus: 'Parameter tying is not "
            "supported with Ghost Clipping'). Untie it (tie_word_embeddings=False in the model config), "
            "freeze it (requires_grad_(False), e.g. optfm.privacy.prepare_lm_for_dp(model, "
            "train_embeddings=False)), or use grad_sample_mode='hooks', which sums the per-sample "
            "gradients of tied parameters exactly")
