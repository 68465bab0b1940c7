"""``optfm bench digits``: cost of the digits-baseline training step.

Rows:

- ``harness step / bare step``: one step of the experiment's training loop
  (:func:`optfm.experiments.digits_baseline.train_mlp`: seeded epoch shuffling, zero_grad, forward,
  loss, backward, step) against the shortest hand-written PyTorch loop doing the same work.
  The harness must add nothing measurable (target <= 1.05).
- ``Adam step / SGD step``: the price of Adam's moment updates on this model (report only).
"""

from __future__ import annotations

import torch
from torch import nn

from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.data import load_digits_split
from optfm.experiments.digits_baseline import make_optimizer, train_mlp
from optfm.models import mlp
from optfm.training import make_generator

__all__ = ["bench_digits"]

STEPS = 25  # steps per timed call (a few ms; long enough for a stable timer reading)


@register_benchmark("digits", "digits-baseline training step: harness vs bare loop, Adam vs SGD")
def bench_digits(repeats: int = 7) -> list[BenchRow]:
    data = load_digits_split(random_state=0)
    x, y = data.x_train, data.y_train
    n, batch = len(x), 64

    def harness(opt_name: str):
        model = mlp(generator=make_generator(0))
        opt = make_optimizer(opt_name, model.parameters(), 0.1 if opt_name == "sgd" else 1e-3)
        gen = make_generator(1)
        return lambda: train_mlp(model, opt, x, y, steps=STEPS, batch_size=batch, generator=gen)

    def bare():
        model = mlp(generator=make_generator(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.CrossEntropyLoss()
        gen = make_generator(1)

        def run() -> None:
            perm = torch.randperm(n, generator=gen)
            for i in range(STEPS):
                idx = perm[(i * batch) % (n - batch):][:batch]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()

        return run

    h, b = time_pair(harness("sgd"), bare(), repeats=repeats, number=4)
    adam, sgd = time_pair(harness("adam"), harness("sgd"), repeats=repeats, number=4)
    return [
        BenchRow("digits", "harness step / bare step (SGD, batch 64)", h / STEPS, b / STEPS, "s",
                 target=1.05),
        BenchRow("digits", "Adam step / SGD step (MLP 64-128-10, batch 64)", adam / STEPS,
                 sgd / STEPS, "s"),
    ]
