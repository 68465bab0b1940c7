r"""Per-layer weight updates: each parameter is stepped inside backward, as soon as its gradient is
complete, and its gradient is freed at once, so the full set of gradients never coexists.

This is the "per-layer weight update" of GaLore (Zhao et al., ICML 2024) that the SLTrain paper
(NeurIPS 2024) combines with 8-bit Adam for its 7B memory figure. :class:`PerLayerOptimizer` wraps
any ``torch.optim.Optimizer`` class (or factory): it builds **one inner optimizer per parameter**
and registers ``Tensor.register_post_accumulate_grad_hook`` on every parameter. During
``loss.backward()``, for each parameter ``p`` in the order autograd finishes its gradient::

    n_p      = ‖g_p‖₂                          (pre-clip norm, recorded for logging)
    g_p      ← clamp(g_p, -c_v, c_v)           if max_grad_value = c_v is set
    g_p      ← g_p · min(1, c_n / (n_p + 1e-6))  if max_grad_norm = c_n is set (per parameter)
    group_p  ← the logical param group's hyperparameters (lr, betas, weight decay, ...)
    inner_p.step()                             (the wrapped optimizer's own update rule)
    p.grad   ← None                            (freed before autograd moves on)

so at any moment at most one finished gradient is alive (plus what autograd is still computing).
For an optimizer that updates each parameter independently (SGD, Adam, AdamW, 8-bit AdamW of
bitsandbytes or torchao, GaLore's projected AdamW) the result equals a normal
``optimizer.step()`` after backward; with ``torch.optim.AdamW`` on CPU in fp32 it is bit-identical
(tested). Optimizers that couple parameters (LBFGS, a global trust ratio) are not per-layer.

**Learning-rate schedules.** The wrapper is itself a ``torch.optim.Optimizer`` whose
``param_groups`` are the *logical* groups; a scheduler is attached to the wrapper and stepped once
per logical update (after ``backward``), exactly as in a normal loop. Before each inner step the
group's hyperparameters are copied into the inner optimizer, so every parameter sees the
scheduler's current value. (The authors' per-layer code instead created one scheduler per
parameter and stepped it inside the hooks with doubled step counts, so the schedule ran at half
speed; here one schedule, one count.)

**Clipping: what per-layer mode can and cannot clip.**

- *Element-wise value clipping* (``max_grad_value``) is local: identical to
  ``torch.nn.utils.clip_grad_value_`` before a normal step.
- *Per-parameter norm clipping* (``max_grad_norm``) clips each tensor's gradient to norm ≤ c on
  its own (the same formula as ``clip_grad_norm_`` applied to one tensor). This is weaker than
  global-norm clipping at the same c: k tensors may together reach norm c·√k.
- *Global-norm clipping* (``clip_grad_norm_`` over all parameters) is **not available**: the
  global norm of the current step is known only after the last gradient, and by then every other
  parameter has already been updated and its gradient freed. We do not offer the stale variant
  (scaling step t by the norm of step t-1): it does not bound the update of the step whose
  gradient spikes, which is the point of clipping. :meth:`PerLayerOptimizer.grad_norm` still
  reports the global pre-clip norm of the last backward (the number ``clip_grad_norm_`` would
  return), for logging.

**Other limits.** Gradient accumulation over several backward passes is not possible (each
backward updates the parameters). Under ``DistributedDataParallel`` the hook fires on the local
gradient, before DDP's all-reduce: per-layer mode is for one process (or sharded set-ups that
reduce gradients before the hook, which this module does not provide). A parameter without a
gradient in a backward pass is not stepped, as with a normal optimizer. ``step()`` never updates
anything (the updates happen in backward); it only evaluates a closure if one is given, so a
generic loop that still calls it does not update twice — but such a loop's own
``clip_grad_norm_`` after backward sees no gradients and does nothing.

Checkpoints: :meth:`state_dict` has the standard ``{"state": {index: ...}, "param_groups": [...]}``
layout over the logical groups, so :func:`optfm.training.save_checkpoint` stores it (tensors in
safetensors, the rest as JSON) and :meth:`load_state_dict` hands each parameter its own state back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["PerLayerOptimizer", "per_layer_optimizer"]

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
_NOT_SYNCED = ("params", "param_names")


def _check_clip(name: str, v: float | None) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None, got {v!r}")
    return float(v)


def _sync_group(src: dict[str, Any], dst: dict[str, Any]) -> None:
    """Copy the logical group's hyperparameters into an inner optimizer's group (tensor-valued
    ones, e.g. torchao's tensor ``lr``, in place)."""
    for k, v in src.items():
        if k in _NOT_SYNCED:
            continue
        cur = dst.get(k)
        if isinstance(cur, torch.Tensor):
            if isinstance(v, torch.Tensor):
                if cur is not v:
                    cur.copy_(v)
            else:
                cur.fill_(v)
        else:
            dst[k] = v


class PerLayerOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped in the parameter's post-accumulate-grad hook.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs (names are used in error
            messages and kept as ``param_names``), or of param-group dicts holding either.
        optimizer: the inner optimizer: a class (e.g. ``torch.optim.AdamW``,
            ``bitsandbytes.optim.AdamW8bit``) called as ``optimizer(groups, **defaults)``, or a
            factory ``f(groups) -> Optimizer``; ``groups`` is a one-element list
            ``[{**group_options, "params": [p]}]``.
        max_grad_value: element-wise gradient clipping (exact, as ``clip_grad_value_``).
        max_grad_norm: per-parameter gradient-norm clipping (see the module docstring; global-norm
            clipping is not available in per-layer mode). At most one of the two.
        track_grad_norm: record each gradient's norm so that :meth:`grad_norm` can report the
            global pre-clip norm of the last backward (one extra pass over each gradient).
        **defaults: keyword arguments for the inner optimizer class (``lr=...``).

    Hooks are registered on construction; :meth:`remove_hooks` detaches them.
    """

    def __init__(self, params: Iterable[Any], optimizer: type[torch.optim.Optimizer] | OptimizerFactory,
                 *, max_grad_value: float | None = None, max_grad_norm: float | None = None,
                 track_grad_norm: bool = True, **defaults: Any) -> None:
        if not callable(optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer class or a factory "
                             f"f(groups) -> Optimizer, got {optimizer!r}")
        if isinstance(optimizer, type):
            if not issubclass(optimizer, torch.optim.Optimizer):
                raise ValueError(f"optimizer must be a torch.optim.Optimizer subclass, got {optimizer!r}")
            cls, kwargs = optimizer, dict(defaults)
            self._factory: OptimizerFactory = lambda groups: cls(groups, **kwargs)
            self._inner_name = cls.__name__
        else:
            if defaults:
                raise ValueError(f"keyword arguments {sorted(defaults)} are only accepted with an "
                                 "optimizer class; put them into the factory instead")
            self._factory = optimizer
            self._inner_name = getattr(optimizer, "__name__", type(optimizer).__name__)
        self.max_grad_value = _check_clip("max_grad_value", max_grad_value)
        self.max_grad_norm = _check_clip("max_grad_norm", max_grad_norm)
        if self.max_grad_value is not None and self.max_grad_norm is not None:
            raise ValueError("set at most one of max_grad_value and max_grad_norm")
        self.track_grad_norm = bool(track_grad_norm)
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._group_of: dict[torch.Tensor, int] = {}
        self._hooks: list[Any] = []
        self._norms: dict[torch.Tensor, torch.Tensor] = {}
        self._n_groups = 0
        super().__init__(params, {})
        self.checkpoint_class = f"PerLayerOptimizer[{self._inner_name}]"

    # -------------------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ValueError(f"a param group must be a dict with 'params', got {param_group!r}")
        gi = self._n_groups
        raw = param_group["params"]
        if isinstance(raw, torch.Tensor):
            raw = [raw]
        elif isinstance(raw, set):
            raise ValueError("params must be an ordered collection (list), not a set")
        items = list(raw)
        if not items:
            raise ValueError(f"param_groups[{gi}] has no parameters")
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        named = [isinstance(it, tuple) for it in items]
        if any(named) and not all(named):
            raise ValueError(f"param_groups[{gi}]: give all parameters with names or none")
        for i, it in enumerate(items):
            name, p = it if isinstance(it, tuple) else (f"param_groups[{gi}]['params'][{i}]", it)
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"parameter {name} is not a tensor ({type(p).__name__})")
            if not p.requires_grad:
                raise ValueError(f"parameter {name} does not require grad: it never gets a "
                                 "gradient, so per-layer mode would never update it; leave it out")
            if not p.is_leaf:
                raise ValueError(f"parameter {name} is not a leaf tensor: gradient hooks need the "
                                 "leaf parameters")
            if p in self.optimizers or any(p is q for q in tensors):
                other = self._names.get(p, name)
                raise ValueError(f"parameter {name} appears twice (also as {other})")
            names.append(name)
            tensors.append(p)
        options = {k: v for k, v in param_group.items() if k not in _NOT_SYNCED}
        inners = []
        for name, p in zip(names, tensors):
            inner = self._factory([{**options, "params": [p]}])
            if not isinstance(inner, torch.optim.Optimizer):
                raise ValueError(f"the optimizer factory returned {type(inner).__name__} for "
                                 f"parameter {name}, not a torch.optim.Optimizer")
            if len(inner.param_groups) != 1 or len(inner.param_groups[0]["params"]) != 1 \
                    or inner.param_groups[0]["params"][0] is not p:
                raise ValueError(f"the inner optimizer for parameter {name} must hold exactly that "
                                 "parameter in one param group")
            inners.append(inner)
        group: dict[str, Any] = {"params": tensors}
        if all(named):
            group["param_names"] = names
        for k, v in inners[0].param_groups[0].items():  # the inner optimizer's defaults
            if k not in _NOT_SYNCED:
                group[k] = v.clone() if isinstance(v, torch.Tensor) else v
        super().add_param_group(group)
        for name, p, inner in zip(names, tensors, inners):
            self.optimizers[p] = inner
            self._names[p] = name
            self._group_of[p] = gi
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
        self._n_groups += 1

    # -------------------------------------------------------------------------- the update

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        if self.track_grad_norm or self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(g, 2.0)
            if self.track_grad_norm:
                self._norms[p] = norm
        if self.max_grad_value is not None:
            g.clamp_(-self.max_grad_value, self.max_grad_value)
        if self.max_grad_norm is not None:
            g.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        inner = self.optimizers[p]
        _sync_group(self.param_groups[self._group_of[p]], inner.param_groups[0])
        inner.step()
        p.grad = None
        self.state[p] = inner.state[p]
        # torch's lr schedulers warn when scheduler.step() comes before any optimizer.step();
        # here the update happened in backward, so mark it as done.
        self._opt_called = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """No update here (the parameters were updated during backward); evaluates ``closure``
        (which should run forward and backward, triggering the updates) if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new logical step: forget the recorded gradient norms, clear any gradient."""
        self._norms = {}
        super().zero_grad(set_to_none=set_to_none)

    def grad_norm(self) -> float:
        """Global L2 norm (before clipping) of the gradients seen since the last
        :meth:`zero_grad`, in parameter order: the value ``clip_grad_norm_`` returns in a normal
        step. ``nan`` if ``track_grad_norm`` is off, 0.0 if no gradient was seen."""
        if not self.track_grad_norm:
            return math.nan
        if not self._norms:
            return 0.0
        order = [p for g in self.param_groups for p in g["params"] if p in self._norms]
        return float(torch.linalg.vector_norm(torch.stack([self._norms[p] for p in order]), 2.0))

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (backward no longer updates the parameters)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -------------------------------------------------------------------------- checkpoints

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"state": {i: state of parameter i}, "param_groups": [logical groups]}`` with the
        parameters numbered across groups, as ``torch.optim.Optimizer.state_dict``."""
        state: dict[int, Any] = {}
        for i, p in enumerate(self._params()):
            s = self.optimizers[p].state_dict()["state"].get(0)
            if s:
                state[i] = s
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for i, (s, g) in enumerate(zip(saved, self.param_groups)):
            if len(s["params"]) != len(g["params"]):
                raise ValueError(f"param group {i}: state_dict has {len(s['params'])} parameters, "
                                 f"the optimizer has {len(g['params'])}")
        index = [i for s in saved for i in s["params"]]
        for s, g in zip(saved, self.param_groups):
            for k, v in s.items():
                if k in _NOT_SYNCED:
                    continue
                cur = g.get(k)
                if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor):
                    cur.copy_(v)
                elif isinstance(cur, tuple) and isinstance(v, list):
                    g[k] = tuple(v)
                else:
                    g[k] = v
        states = state_dict["state"]
        for saved_i, p in zip(index, self._params()):
            inner = self.optimizers[p]
            _sync_group(self.param_groups[self._group_of[p]], inner.param_groups[0])
            st = states.get(saved_i, states.get(str(saved_i)))
            inner.load_state_dict({"state": {0: st} if st else {},
                                   "param_groups": inner.state_dict()["param_groups"]})
            self.state.pop(p, None)
            if p in inner.state:
                self.state[p] = inner.state[p]


def per_layer_optimizer(model: nn.Module, optimizer: type[torch.optim.Optimizer] | OptimizerFactory,
                        *, max_grad_value: float | None = None, max_grad_norm: float | None = None,
                        **defaults: Any) -> PerLayerOptimizer:
    """:class:`PerLayerOptimizer` over every trainable parameter of ``model`` (named, so errors
    name the parameter)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model)!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    return PerLayerOptimizer(named, optimizer, max_grad_value=max_grad_value,
                             max_grad_norm=max_grad_norm, **defaults)
