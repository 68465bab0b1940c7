"""Worker for tests/test_pretrain_ddp.py (not a test module; launched by torchrun).

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \\
        tests/pretrain_ddp_worker.py --out DIR

Each rank (gloo, CPU) runs every arm in :data:`ARMS`: a tiny byte-level Llama (the same seeded
initialisation on every rank), optionally with SLTrain layers, wrapped in torch's
``DistributedDataParallel``; AdamW from ``build_optimizer`` with ``warmup_cosine``; then
``pretrain(..., rank=rank, world_size=world)`` on the standard-library byte corpus, each rank
taking rows ``rank::world`` of the shared global batch. It writes ``DIR/rank{R}.json``: per arm,
the final parameters (flattened in ``named_parameters`` order), the validation loss before
training and the evaluation history. :func:`run` is importable, so the test computes the
single-process reference (``world_size=1``, no DDP) with exactly the same code.

The corpus must already be built in ``$OPTFM_CACHE`` (the test builds it before launching), so
the two ranks only read it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from optfm.data.corpus import python_stdlib_corpus
from optfm.models.factories import tiny_llama
from optfm.pretraining import (
    PretrainConfig,
    SLTrainConfig,
    apply_sltrain,
    build_optimizer,
    evaluate,
    pretrain,
    warmup_cosine,
)

# arm -> (SLTrain layers?, dtype). The float64 arms show that the float32 gap between the
# DDP run and one process is rounding only.
ARMS = {"full": (False, torch.float32), "sltrain": (True, torch.float32),
        "full-f64": (False, torch.float64), "sltrain-f64": (True, torch.float64)}
MODEL_SEED = 0
CFG = dict(steps=6, batch_size=4, block_size=32, lr=3e-3, warmup_frac=0.2, eval_every=3,
           eval_batches=4, seed=0)


def config() -> PretrainConfig:
    return PretrainConfig(**CFG)


def build_model(arm: str) -> nn.Module:
    """The same weights on every call (and so on every rank): seeded from the global RNG."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {sorted(ARMS)}, got {arm!r}")
    sltrain, dtype = ARMS[arm]
    torch.manual_seed(MODEL_SEED)
    model = tiny_llama(hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                       num_attention_heads=2)
    if sltrain:
        apply_sltrain(model, SLTrainConfig(rank=8))
    return model.to(dtype)


def flat_params(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().flatten() for _, p in model.named_parameters()]).tolist()


def run(arm: str, *, rank: int = 0, world_size: int = 1) -> dict:
    """Pretrain one arm; under torchrun (``world_size > 1``) the model is wrapped in DDP."""
    cfg = config()
    corpus = python_stdlib_corpus()
    train, val = corpus.tensor("train"), corpus.tensor("val")
    model = build_model(arm)
    net: nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    opt = build_optimizer(net, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.steps, max(1, int(cfg.warmup_frac * cfg.steps)), cfg.min_lr_frac)
    initial = evaluate(net, val, cfg, torch.device("cpu"))
    out = pretrain(net, opt, sched, train, val, cfg, rank=rank, world_size=world_size)
    return {"initial_val_loss": initial["val_loss"], "history": out["history"],
            "numel": sum(p.numel() for p in model.parameters()), "params": flat_params(model)}


def main() -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = {arm: run(arm, rank=rank, world_size=world) for arm in ARMS}
        (args.out / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "world_size": world,
             "runs": results}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
