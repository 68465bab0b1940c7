"""Small loop helpers shared by trainers and experiments: seeded minibatch order, evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["accuracy", "minibatch_indices"]


def minibatch_indices(n: int, batch_size: int, *, generator: torch.Generator,
                      drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Indices of one shuffled epoch over ``n`` samples, ``batch_size`` at a time.

    The order depends only on ``generator``'s state, so a checkpointed generator resumes the same
    order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield perm[i:i + batch_size]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model(x)`` logits against labels ``y`` (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(x)
