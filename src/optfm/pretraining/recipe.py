"""The pretraining recipe shared by every arm (full rank, low rank, SLTrain, GaLore).

AdamW (or GaLore's AdamW) with linear warm-up over ``warmup_frac`` of the steps and cosine decay
to ``min_lr_frac`` of the peak, gradient clipping at ``clip``, fp32 on CPU (bf16 autocast on CUDA).
Batches are random windows of a token stream drawn from one seeded generator, so every process of
a ``torchrun`` job draws the same global batch and takes its own rows: with DDP the result equals
one process at the same global batch. Validation loss is the mean over a fixed set of validation
batches (divided by their number, not number + 1 as in the authors' code); bits per byte =
loss / ln 2 for byte-level tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from optfm.data.corpus import sample_lm_batch
from optfm.pretraining.sltrain import LLAMA_TARGET_MODULES
from optfm.training.device import autocast

__all__ = ["PretrainConfig", "build_optimizer", "evaluate", "pretrain", "warmup_cosine"]

OPTIMIZERS = ("adamw", "galore")


@dataclass
class PretrainConfig:
    steps: int = 300
    batch_size: int = 16          # global batch (sequences)
    block_size: int = 128
    lr: float = 1e-3
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "block_size", "eval_every", "eval_batches"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError("warmup_frac must be in [0, 1) and min_lr_frac in [0, 1]")
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_frac: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the peak lr, then cosine decay to ``min_lr_frac`` of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, name: str = "adamw", *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), galore_rank: int = 32,
                    galore_scale: float = 0.25, galore_update_proj_gap: int = 200,
                    target_modules: Sequence[str] = LLAMA_TARGET_MODULES) -> torch.optim.Optimizer:
    """``adamw`` or ``galore`` (``galore_torch.GaLoreAdamW`` on the 2-D weights of the target
    projections, plain AdamW on everything else; the peer package is imported lazily)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as e:  # pragma: no cover - depends on the optional peer
        raise ImportError("optimizer='galore' needs the galore-torch package: "
                          "pip install 'optfm[peers]'") from e
    targets = set(target_modules)
    low = [m.weight for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets and m.weight.requires_grad]
    if not low:
        raise ValueError(f"no nn.Linear named one of {sorted(targets)} for GaLore to project")
    ids = {id(p) for p in low}
    rest = [p for p in params if id(p) not in ids]
    groups = [{"params": rest},
              {"params": low, "rank": galore_rank, "update_proj_gap": galore_update_proj_gap,
               "scale": galore_scale, "proj_type": "std"}]
    return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, no_deprecation_warning=True)


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
             on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train for ``cfg.steps`` steps; returns the evaluation history and timing.

    Under DDP pass the wrapped model with ``rank``/``world_size``: each process takes rows
    ``rank::world_size`` of the shared global batch (``cfg.batch_size`` must divide evenly).
    Token streams may be tensors or NumPy arrays (the corpus's uint16 memory maps).
    """
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size={world_size}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    train_time = 0.0
    model.train()
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        x, y = sample_lm_batch(train_tokens, cfg.batch_size, cfg.block_size, generator=gen)
        x, y = x[rank::world_size].to(device), y[rank::world_size].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = model(input_ids=x).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {step}")
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        optimizer.step()
        scheduler.step()
        train_time += time.perf_counter() - t0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            train_loss = loss.detach().clone()
            if world_size > 1:  # log the global-batch loss, the same on every rank
                torch.distributed.all_reduce(train_loss)
                train_loss /= world_size
            rec = {"step": step, "train_loss": train_loss.item(), "grad_norm": grad_norm,
                   "lr": scheduler.get_last_lr()[0], **evaluate(model, val_tokens, cfg, device)}
            history.append(rec)
            if on_eval is not None:
                on_eval(step, rec)
    return {"history": history, "step_time_s": train_time / cfg.steps, "final": history[-1]}
