"""The pretraining recipe shared by every arm (full rank, low rank, SLTrain, GaLore).

AdamW (or GaLore's AdamW) with linear warm-up over ``warmup_frac`` of the steps and cosine decay
to ``min_lr_frac`` of the peak, gradient clipping at ``clip``, fp32 on CPU (bf16 autocast on CUDA).

Optimizers by name (:func:`build_optimizer`; the peer packages are imported lazily, each with an
``ImportError`` naming the package when missing): ``adamw`` (``torch.optim.AdamW``, fp32 states),
``adamw8bit`` (``bitsandbytes.optim.AdamW8bit``: block-wise 8-bit states for tensors of at least
4096 entries, fp32 states below), ``adamw8bit-torchao`` (``torchao.optim.AdamW8bit``: 8-bit states
for tensors of at least 4096 entries whose size is a multiple of its 256-entry block; each step is
compiled with ``torch.compile`` once per shape, which needs a C++ compiler on CPU), ``galore``
(``galore_torch.GaLoreAdamW``) and ``galore8bit`` (``galore_torch.GaLoreAdamW8bit``: GaLore's
projection with bitsandbytes' 8-bit states; galore-torch 1.0 calls ``torch.cuda.synchronize()``
in every step, which raises on a CPU-only torch, so on CPU that call is made a no-op for the
duration of the step). ``per_layer=True`` wraps any of them in
:class:`~optfm.pretraining.per_layer.PerLayerOptimizer` (updates inside backward, gradients freed
at once); :func:`pretrain` then never calls ``optimizer.step()`` and applies ``clip`` per parameter
(global-norm clipping is not available in per-layer mode; see ``per_layer.py``).

Batches are random windows of a token stream drawn from one seeded generator, so every process of
a ``torchrun`` job draws the same global batch and takes its own rows: with DDP the result equals
one process at the same global batch. Validation loss is the mean over a fixed set of validation
batches (divided by their number, not number + 1 as in the authors' code); bits per byte =
loss / ln 2 for byte-level tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optfm.data.corpus import sample_lm_batch
from optfm.pretraining.per_layer import PerLayerOptimizer
from optfm.pretraining.sltrain import LLAMA_TARGET_MODULES
from optfm.training.checkpoint import load_checkpoint, save_checkpoint
from optfm.training.device import autocast

__all__ = ["OPTIMIZERS", "PretrainConfig", "build_optimizer", "evaluate", "optimizer_class",
           "pretrain", "warmup_cosine"]

OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit-torchao", "galore", "galore8bit")
"""Names accepted by :func:`build_optimizer`."""
_PACKAGE = {"adamw8bit": "bitsandbytes", "adamw8bit-torchao": "torchao", "galore": "galore-torch",
            "galore8bit": "galore-torch (and bitsandbytes)"}


@dataclass
class PretrainConfig:
    """Hyperparameters of :func:`pretrain`.

    ``clip``: gradient clipping threshold, ``None`` for none. Normal mode: global-norm clipping
    (``clip_grad_norm_`` over all parameters). ``per_layer=True``: each parameter's gradient norm
    is clipped on its own inside its hook (global-norm clipping is not available there; see
    :mod:`optfm.pretraining.per_layer`), and the optimizer must be a ``PerLayerOptimizer``
    (``build_optimizer(..., per_layer=True)``). ``checkpoint_every``: with a ``checkpoint_path``
    given to :func:`pretrain`, write a resumable checkpoint every that many steps (0: never).
    """

    steps: int = 300
    batch_size: int = 16          # global batch (sequences)
    block_size: int = 128
    lr: float = 1e-3
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    per_layer: bool = False
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "block_size", "eval_every", "eval_batches"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError("warmup_frac must be in [0, 1) and min_lr_frac in [0, 1]")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {self.clip}")
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"per_layer must be a bool, got {self.per_layer!r}")
        v = self.checkpoint_every
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {v!r}")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_frac: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the peak lr, then cosine decay to ``min_lr_frac`` of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _cuda_synchronize_noop() -> Iterator[None]:
    """Make ``torch.cuda.synchronize`` a no-op while CUDA is unavailable (see module docstring)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.synchronize = original  # type: ignore[assignment]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class behind a :data:`OPTIMIZERS` name, importing its package lazily."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW
    try:
        if name == "adamw8bit":
            from bitsandbytes.optim import AdamW8bit

            return AdamW8bit
        if name == "adamw8bit-torchao":
            from torchao.optim import AdamW8bit as TorchAOAdamW8bit

            return TorchAOAdamW8bit
        if name == "galore":
            from galore_torch import GaLoreAdamW

            return GaLoreAdamW
        from galore_torch import GaLoreAdamW8bit  # noqa: F401  (checked here, used below)
    except ImportError as e:  # pragma: no cover - depends on the optional peers
        raise ImportError(f"optimizer={name!r} needs the {_PACKAGE[name]} package: "
                          "pip install 'optfm[peers]'") from e
    return _galore_adamw8bit_cpu()


@functools.cache
def _galore_adamw8bit_cpu() -> type[torch.optim.Optimizer]:
    from galore_torch import GaLoreAdamW8bit

    class GaLoreAdamW8bitCPU(GaLoreAdamW8bit):
        """``galore_torch.GaLoreAdamW8bit`` whose unconditional ``torch.cuda.synchronize()`` is a
        no-op when CUDA is unavailable (otherwise identical)."""

        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            with _cuda_synchronize_noop():
                return super().step(closure)

    GaLoreAdamW8bitCPU.__name__ = GaLoreAdamW8bitCPU.__qualname__ = "GaLoreAdamW8bit"
    return GaLoreAdamW8bitCPU


def build_optimizer(model: nn.Module, name: str = "adamw", *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), galore_rank: int = 32,
                    galore_scale: float = 0.25, galore_update_proj_gap: int = 200,
                    target_modules: Sequence[str] = LLAMA_TARGET_MODULES,
                    per_layer: bool = False) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of ``model`` by name (:data:`OPTIMIZERS`).

    ``galore``/``galore8bit`` project the 2-D weights of the target projections (GaLore's rank,
    scale and update gap) and update everything else like (8-bit) AdamW. ``per_layer=True``
    returns a :class:`~optfm.pretraining.per_layer.PerLayerOptimizer` with one inner optimizer of
    that kind per parameter (its hooks step each parameter during backward; set the clipping with
    its ``max_grad_norm``/``max_grad_value`` or let :func:`pretrain` do it).
    """
    cls = optimizer_class(name)
    if not isinstance(per_layer, bool):
        raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "betas": betas}
    if name == "galore":
        kwargs["no_deprecation_warning"] = True
    if name in ("galore", "galore8bit"):
        targets = set(target_modules)
        low = {id(m.weight) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets
               and m.weight.requires_grad}
        if not low:
            raise ValueError(f"no nn.Linear named one of {sorted(targets)} for GaLore to project")
        groups: list[dict[str, Any]] = [
            {"params": [(n, p) for n, p in named if id(p) not in low]},
            {"params": [(n, p) for n, p in named if id(p) in low], "rank": galore_rank,
             "update_proj_gap": galore_update_proj_gap, "scale": galore_scale, "proj_type": "std"}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": named}]
    if per_layer:
        return PerLayerOptimizer(groups, cls, **kwargs)
    # plain optimizers get unnamed parameters (not every peer supports named ones)
    plain = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
    return cls(plain, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor | np.ndarray, cfg: PretrainConfig, device: torch.device,
             *, seed: int = 1234) -> dict[str, float]:
    """Mean next-token loss over ``cfg.eval_batches`` fixed batches; bits per byte; perplexity."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = sample_lm_batch(tokens, cfg.batch_size, cfg.block_size, generator=gen)
        with autocast(device):
            logits = model(input_ids=x.to(device)).logits
        total += float(nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()))
    model.train(was)
    loss = total / cfg.eval_batches
    return {"val_loss": loss, "val_bpb": loss / math.log(2), "val_ppl": math.exp(loss)}


def pretrain(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             train_tokens: torch.Tensor | np.ndarray, val_tokens: torch.Tensor | np.ndarray,
             cfg: PretrainConfig, *,
             device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
             on_eval: Callable[[int, dict[str, float]], None] | None = None,
             checkpoint_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train for ``cfg.steps`` steps; returns the evaluation history and timing.

    Under DDP pass the wrapped model with ``rank``/``world_size``: each process takes rows
    ``rank::world_size`` of the shared global batch (``cfg.batch_size`` must divide evenly).
    Token streams may be tensors or NumPy arrays (the corpus's uint16 memory maps).

    ``cfg.per_layer``: ``optimizer`` must be a :class:`PerLayerOptimizer`; backward updates the
    parameters, this loop never calls ``optimizer.step()`` and steps ``scheduler`` once per
    logical update, as in normal mode. ``checkpoint_path``: resume from it if it exists (model,
    optimizer — 8-bit states included — scheduler, data generator, RNGs, history), and with
    ``cfg.checkpoint_every > 0`` write it atomically every that many steps and at the end; the
    resumed run is bit-identical to an uninterrupted one (one process only).
    """
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size={world_size}")
    per_layer = isinstance(optimizer, PerLayerOptimizer)
    if cfg.per_layer and not per_layer:
        raise ValueError("per_layer=True needs a PerLayerOptimizer (build_optimizer(..., "
                         f"per_layer=True)), got {type(optimizer).__name__}")
    if per_layer and not cfg.per_layer:
        raise ValueError("optimizer is a PerLayerOptimizer (it updates during backward): set "
                         "per_layer=True in the PretrainConfig")
    if per_layer:
        from torch.nn.parallel import DistributedDataParallel

        if world_size > 1 or isinstance(model, DistributedDataParallel):
            raise ValueError("per_layer=True does not work under DistributedDataParallel: the "
                             "hooks would step on the local gradient before the all-reduce")
        if optimizer.max_grad_value is not None:  # type: ignore[union-attr]
            raise ValueError("pretrain sets the per-layer clipping from cfg.clip; build the "
                             "PerLayerOptimizer without max_grad_value")
        optimizer.max_grad_norm = cfg.clip  # type: ignore[union-attr]
    if checkpoint_path is not None and world_size > 1:
        raise ValueError("checkpoint_path is supported in one process only")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    train_time = 0.0
    start = 1
    run_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        ck = load_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler,
                             generators={"data": gen})
        saved = ck.extra.get("config", run_config)
        diff = sorted(k for k in set(saved) | set(run_config) if saved.get(k) != run_config.get(k))
        if diff:
            raise ValueError(f"{checkpoint_path} was written with another PretrainConfig "
                             f"(differs in {', '.join(diff)}); resume with the same one")
        history, train_time, start = ck.extra["history"], ck.extra["train_time_s"], ck.step + 1

    def save(step: int) -> None:
        save_checkpoint(checkpoint_path, model=model, optimizer=optimizer,  # type: ignore[arg-type]
                        scheduler=scheduler, step=step, generators={"data": gen},
                        extra={"history": history, "train_time_s": train_time,
                               "config": run_config})

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step in range(start, cfg.steps + 1):
        t0 = time.perf_counter()
        x, y = sample_lm_batch(train_tokens, cfg.batch_size, cfg.block_size, generator=gen)
        x, y = x[rank::world_size].to(device), y[rank::world_size].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = model(input_ids=x).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        del logits
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {step}")
        loss.backward()  # per-layer mode: every parameter is updated here
        if per_layer:
            grad_norm = optimizer.grad_norm()  # type: ignore[union-attr]
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                params, math.inf if cfg.clip is None else cfg.clip))
            optimizer.step()
        scheduler.step()  # once per logical update, in both modes
        train_time += time.perf_counter() - t0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            train_loss = loss.detach().clone()
            if world_size > 1:  # log the global-batch loss, the same on every rank
                torch.distributed.all_reduce(train_loss)
                train_loss /= world_size
            rec = {"step": step, "train_loss": train_loss.item(), "grad_norm": grad_norm,
                   "lr": float(scheduler.get_last_lr()[0]), **evaluate(model, val_tokens, cfg, device)}
            history.append(rec)
            if on_eval is not None:
                on_eval(step, rec)
        if checkpoint_path is not None and cfg.checkpoint_every and (
                step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save(step)
    return {"history": history, "step_time_s": train_time / cfg.steps, "final": history[-1]}
