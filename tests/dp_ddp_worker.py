"""Worker for tests/test_privacy_distributed.py (not a test module; launched by torchrun).

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \\
        tests/dp_ddp_worker.py --out DIR

Each rank (gloo, CPU) runs every configuration in :data:`RUNS`: a small MLP wrapped in Opacus's
``DifferentiallyPrivateDistributedDataParallel``, a loader with a ``DistributedSampler`` (the
per-rank loader of Opacus's distributed examples; with Poisson sampling Opacus swaps its sampler
for ``DistributedUniformWithReplacementSampler`` over the whole data set), ``make_private`` with a
filter, a few steps; then it writes ``DIR/rank{R}.json``: per run, the final parameters, ε, the
optimizer's class, the sample rate and batch sizes, and after the first step the noise in the
all-reduced privatized gradient. The builders are importable so the test can compute
single-process references with exactly the same model and data.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optfm.models.factories import mlp
from optfm.privacy import KalmanFilter, LowPassFilter

N, D, K = 512, 10, 3          # samples, features, classes
GLOBAL_BATCH = 64             # per rank: GLOBAL_BATCH / world size
STEPS = 6
SIGMA, C, DELTA = 1.0, 1.0, 1e-5
LR = 0.05


def make_filter(name: str):
    return {"none": lambda: None,
            "a9b1": lambda: LowPassFilter.preset("a9b1"),
            "kalman": lambda: KalmanFilter(0.7, 0.5)}[name]()


# (run name, filter, noise multiplier, clipping norm, Poisson sampling, wrapper)
RUNS = [
    *[(f"{f}-noisy", f, SIGMA, C, True, "dpddp") for f in ("none", "a9b1", "kalman")],
    *[(f"{f}-noisy-ddp", f, SIGMA, C, True, "ddp") for f in ("a9b1", "kalman")],
    *[(f"{f}-sigma0", f, 0.0, C, True, "dpddp") for f in ("a9b1", "kalman")],
    # deterministic: no noise, no clipping, fixed batches -> comparable with one process
    *[(f"{f}-exact", f, 0.0, 1e6, False, "dpddp") for f in ("a9b1", "kalman")],
]


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    teacher = torch.randn(D, K, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(1))


def model() -> nn.Sequential:
    return mlp(D, (64,), K, generator=torch.Generator().manual_seed(1))  # 899 parameters


def train(model_, opt, loader, steps: int, after_first_step=None) -> None:
    loss_fn = nn.CrossEntropyLoss()
    done = 0
    while done < steps:
        for x, y in loader:
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model_(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            done += 1
            if done == 1 and after_first_step is not None:
                after_first_step()
            if done == steps:
                return


def _run(name: str, filt: str, sigma: float, clip: float, poisson: bool, wrapper: str) -> dict:
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data.distributed import DistributedSampler

    from optfm.privacy import make_private

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(100 + rank)  # seeds the Poisson masks (per rank) and rank 0's noise
    net = DPDDP(model()) if wrapper == "dpddp" else DDP(model())
    ds = dataset()
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH // world,
                        sampler=DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False))
    base = torch.optim.Adam(net.parameters(), lr=LR)
    net, opt, loader, engine = make_private(net, base, loader, noise_multiplier=sigma,
                                            max_grad_norm=clip, filter=make_filter(filt),
                                            poisson_sampling=poisson, target_delta=DELTA)
    out: dict = {"optimizer": type(opt).__name__, "sample_rate": engine.sample_rate,
                 "expected_batch_size": float(opt.expected_batch_size), "world_size": world,
                 "loader_batches": len(loader)}

    # The clipped local sums of the first step, before noise. (They must be copied here: on
    # ranks > 0 Opacus's DistributedDPOptimizer.add_noise sets p.grad to a view of p.summed_grad,
    # so the scaling, the all-reduce and the filter then overwrite p.summed_grad in place.)
    clipped: list[torch.Tensor] = []
    clip_and_accumulate = opt.clip_and_accumulate

    def recording_clip_and_accumulate() -> None:
        clip_and_accumulate()
        if not clipped:
            clipped.extend(p.summed_grad.detach().clone() for p in opt.params)

    opt.clip_and_accumulate = recording_clip_and_accumulate

    def noise_after_first_step() -> None:
        # p.grad is now the all-reduced privatized gradient (both filters pass the first one
        # through unchanged); sum_ranks(clipped) / global batch is the same without noise.
        noise = []
        for p, summed in zip(opt.params, clipped):
            dist.all_reduce(summed)
            noise.append((p.grad * opt.expected_batch_size * world - summed).flatten())
        noise = torch.cat(noise)
        out["noise_std"] = noise.std().item()
        out["noise_mean"] = noise.mean().item()
        out["noise_numel"] = noise.numel()

    train(net, opt, loader, STEPS, noise_after_first_step)
    out["steps"] = engine.steps
    # With σ = 0, ε is infinite, but PrivateEngine.epsilon() raises OverflowError from Opacus's
    # PRV accountant instead of returning inf, so ε is only asked for the noisy runs.
    out["epsilon"] = engine.epsilon() if sigma > 0 else None
    out["params"] = torch.cat([p.detach().flatten() for p in net.parameters()]).tolist()
    return out


def main() -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {name: _run(name, *rest) for name, *rest in RUNS}
        rank = dist.get_rank()
        (args.out / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "runs": results}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
