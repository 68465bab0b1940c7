"""The DP optimizer behind :func:`optfm.privacy.make_private`: Opacus's ``DPOptimizer`` plus a
filter on the privatized gradient and the DP-NSGD normalisation.

Order of one step (every privacy-relevant operation is Opacus's own)::

    [DiSK: evaluate at x + γd, then at x, combining per-sample gradients]
    per-sample clip (or normalise)  ->  sum  ->  + N(0, σ²C²)  ->  / expected batch   (Opacus)
    [distributed: all-reduce]        ->  filter (sees only the noised gradient)  ->  base step

With ghost clipping (:class:`GhostPrivateOptimizer`, ``grad_sample_mode="ghost"``) the first two
lines happen inside ``loss.backward()`` of Opacus's wrapped criterion: a first backward pass
computes per-sample gradient *norms* only, a second one backpropagates ``Σ_i min(1, C/‖g_i‖) ℓ_i``,
so ``p.grad`` already holds the sum of clipped per-sample gradients; the optimizer then adds the
same noise, scales, and runs the same filter and base step. Per-sample gradients never exist, so
what needs them is refused: DP-NSGD normalisation, per-sample hooks, and DiSK with two
evaluations (c ∉ {0, 1}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.ddpoptimizer import DistributedDPOptimizer
from opacus.optimizers.optimizer import _mark_as_processed

from optfm.privacy.disk import KalmanFilter, combine_two_point_grad_samples
from optfm.privacy.doppler import LowPassFilter

__all__ = ["DistributedPrivateOptimizer", "GhostPrivateOptimizer", "PrivacyBudgetExhaustedError",
           "PrivateOptimizer", "ghost_clipping_error"]

Filter = LowPassFilter | KalmanFilter


class PrivacyBudgetExhaustedError(RuntimeError):
    """Raised before a step that would spend more than the privacy budget."""


def ghost_clipping_error(filter: Filter | None, normalize: bool) -> str | None:
    """Why ghost clipping cannot run this configuration (``None`` when it can)."""
    if normalize:
        return ("normalize=True (DP-NSGD) is not supported with grad_sample_mode='ghost': optfm "
                "applies the normalisation to per-sample gradients, which ghost clipping never forms; "
                "use grad_sample_mode='hooks'")
    if isinstance(filter, KalmanFilter) and filter.c not in (0.0, 1.0):
        return (f"DiSK with c = (1-κ)/(κγ) = {filter.c:.4g} (κ={filter.kappa}, γ={filter.gamma}) is not "
                "supported with grad_sample_mode='ghost': it clips the combined per-sample vector "
                "c·∇f(x+γd; ξ) + (1-c)·∇f(x; ξ) jointly, and its norm needs the per-sample gradients of "
                "both evaluations (or their per-sample cross inner products), while ghost clipping only "
                "yields per-sample norms of one evaluation at a time. Clipping the two evaluations "
                "separately would change the sensitivity (see specs/privacy.md). Use "
                "KalmanFilter.one_evaluation(kappa) (c = 1: one evaluation, then the Kalman update on "
                "the noised gradient), kappa=1 (c = 0), or grad_sample_mode='hooks'")
    return None


class _PrivateMixin:
    """Shared by the single-process and distributed optimizers (mixed into Opacus's classes)."""

    filter: Filter | None
    normalize: bool
    normalize_r: float
    _per_sample_hooks: list[Callable[[Any], None]]
    _privatized_hooks: list[Callable[[list[torch.Tensor]], None]]
    _before_step: Callable[[], bool] | None

    def _init_private(self, filter: Filter | None, normalize: bool, normalize_r: float) -> None:
        if filter is not None and not isinstance(filter, (LowPassFilter, KalmanFilter)):
            raise TypeError(f"filter must be None, a LowPassFilter or a KalmanFilter, got {type(filter).__name__}")
        if normalize_r <= 0:
            raise ValueError(f"normalize_r must be > 0, got {normalize_r}")
        self.filter = filter
        self.normalize = bool(normalize)
        self.normalize_r = float(normalize_r)
        self._per_sample_hooks = []
        self._privatized_hooks = []
        self._before_step = None

    def add_per_sample_hook(self, fn: Callable[[Any], None]) -> None:
        """``fn(optimizer)`` runs right before clipping, when ``p.grad_sample`` holds this step's
        (combined) per-sample gradients; it may change them (the privacy audit inserts canaries).
        """
        self._per_sample_hooks.append(fn)

    def add_privatized_grad_hook(self, fn: Callable[[list[torch.Tensor]], None]) -> None:
        """``fn(grads)`` sees the privatized gradient g̃_t (after noise and, under DDP, the
        all-reduce) right before the filter; for logging and analysis. It must not modify them.
        """
        self._privatized_hooks.append(fn)

    def _check_batch_dims(self) -> None:
        sizes = [len(g) for g in self.grad_samples]
        if len(set(sizes)) > 1:
            common = max(set(sizes), key=sizes.count)
            odd = next(i for i, s in enumerate(sizes) if s != common)
            p = self.params[odd]
            name = getattr(p, "_optfm_name", f"parameter #{odd} {tuple(p.shape)}")
            raise ValueError(
                f"per-sample gradients disagree on the batch size: {name} has {sizes[odd]}, the "
                f"others {common}. An input of that layer is shared across the batch (e.g. "
                "transformers' default position_ids of shape (1, L)); pass per-sample inputs "
                "(position_ids=torch.arange(L).expand(B, L)) or freeze that parameter")

    def clip_and_accumulate(self) -> None:
        self._check_batch_dims()
        for fn in self._per_sample_hooks:
            fn(self)
        if not self.normalize:
            return super().clip_and_accumulate()
        # DP-NSGD: every per-sample gradient becomes C g / (||g|| + r): norm < C, so the
        # sensitivity and the calibrated noise σC are unchanged.
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples],
                            dim=1).norm(2, dim=1)
        factor = self.max_grad_norm / (norms + self.normalize_r)
        for p in self.params:
            gs = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(gs.device, p.dtype), gs)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def _reduce(self) -> None:
        """All-reduce the noised gradients (distributed subclass only)."""

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.params if p.requires_grad]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._before_step is not None and not self._before_step():
            return None
        filt = self.filter
        params = self._trainable()
        loss = None
        if isinstance(filt, KalmanFilter) and filt.c != 0.0:
            if filt.c != 1.0 and isinstance(self, DPOptimizerFastGradientClipping):
                raise ValueError(ghost_clipping_error(filt, False))
            if closure is None:
                raise ValueError("DiSK evaluates gradients at two points: call optimizer.step(closure) "
                                 "with a closure that zeroes gradients, runs forward and backward "
                                 "and returns the loss (as for torch.optim.LBFGS)")
            c = filt.c
            # Low-precision parameters keep a transient copy of x_t for an exact return; fp32/fp64
            # step back by -γd in place (no parameter-sized copy; error ~1 ulp of γd).
            x_t = [p.detach().clone() if p.dtype not in (torch.float32, torch.float64) else None
                   for p in params]
            filt.extrapolate_(params)
            with torch.enable_grad():
                loss = closure()                      # per-sample gradients at x_t + γ d_t
            filt.extrapolate_(params, sign=-1.0)
            with torch.no_grad():
                for p, x in zip(params, x_t):
                    if x is not None:
                        p.copy_(x)
            del x_t
            if c != 1.0:
                def second() -> Any:
                    with torch.enable_grad():
                        return closure()              # at x_t, accumulated into c·G_first
                loss = combine_two_point_grad_samples(params, c, second)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.pre_step():  # clip once, noise once, scale; accountant hook
            return loss
        self._reduce()
        grads = [p.grad for p in params]
        for fn in self._privatized_hooks:
            fn(grads)
        if isinstance(filt, KalmanFilter):
            filt.step(grads)
            filt.before_update(params)
            self.original_optimizer.step()
            filt.after_update(params)
        else:
            if filt is not None:
                filt.step(grads)
            self.original_optimizer.step()
        return loss


class PrivateOptimizer(_PrivateMixin, DPOptimizer):
    """Opacus ``DPOptimizer`` with an optional DOPPLER/DiSK filter and DP-NSGD normalisation."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, filter: Filter | None = None,
                 normalize: bool = False, normalize_r: float = 0.01, **dp_kwargs: Any) -> None:
        super().__init__(optimizer, **dp_kwargs)
        self._init_private(filter, normalize, normalize_r)


class DistributedPrivateOptimizer(_PrivateMixin, DistributedDPOptimizer):
    """The same under DDP: noise is added on rank 0, gradients are all-reduced, then every rank
    applies the same filter to the same averaged noised gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, filter: Filter | None = None,
                 normalize: bool = False, normalize_r: float = 0.01, **dp_kwargs: Any) -> None:
        super().__init__(optimizer, **dp_kwargs)
        self._init_private(filter, normalize, normalize_r)

    def _reduce(self) -> None:
        self.reduce_gradients()


class GhostPrivateOptimizer(_PrivateMixin, DPOptimizerFastGradientClipping):
    """Opacus ``DPOptimizerFastGradientClipping`` (ghost clipping) with an optional DOPPLER filter
    or one-evaluation DiSK filter (c ∈ {0, 1}).

    Clipping happens in ``loss.backward()`` of the criterion that :func:`~optfm.privacy.make_private`
    returns as ``engine.criterion`` (two backward passes); ``step`` adds the noise σC, divides by
    the expected batch size, and applies the filter to the noised gradient only (post-processing).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, filter: Filter | None = None,
                 normalize: bool = False, normalize_r: float = 0.01, **dp_kwargs: Any) -> None:
        why = ghost_clipping_error(filter, normalize)
        if why is not None:
            raise ValueError(why)
        super().__init__(optimizer, **dp_kwargs)
        self._init_private(filter, normalize, normalize_r)

    def add_per_sample_hook(self, fn: Callable[[Any], None]) -> None:
        raise ValueError("per-sample hooks need per-sample gradients, which ghost clipping never forms; "
                         "use grad_sample_mode='hooks'")

    def clip_and_accumulate(self) -> None:
        """Nothing to do: the criterion's second backward pass already clipped and summed."""
