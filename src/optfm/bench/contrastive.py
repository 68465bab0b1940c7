r"""``optfm bench contrastive``: cost of one SogCLR / EMC² training iteration against one SimCLR
iteration at the same batch size, and the per-sample state each method keeps.

One training iteration (:class:`ContrastiveIteration`) = draw the next batch of sample indices
(:func:`~optfm.contrastive.augment.index_batches`, shuffled epochs, full batches), augment two
views of the digits-on-canvas images (:class:`~optfm.contrastive.augment.CanvasAugment` defaults),
forward the MLP backbone + projector (:class:`~optfm.contrastive.models.ContrastiveModel`,
144 → 256 → 128 → 64, normalised) on both views, the method's loss, backward, Adam step
(lr 1e-4). Losses: SimCLR :func:`~optfm.contrastive.nt_xent_loss` (τ = 0.1), SogCLR
:meth:`~optfm.contrastive.SogCLRState.loss` (τ = 0.1, γ = 0.9), EMC²
:meth:`~optfm.contrastive.EMC2State.loss` (β = 14.28, burn-in 0.5). EMC²'s ``embed_fn`` for
recorded carried-over chain states whose sample is not in the batch is a real forward pass, with
gradient, of the model on the un-augmented samples; its cost is part of the timed iteration.
The data set is the training part of :func:`~optfm.data.load_digits_canvas` (1437 samples); the
three methods start from the same weights and see the same batches and views.

Rows (ratio = measured / baseline), for every batch size in ``batch_sizes`` (default 8, 32, 128):

- ``SogCLR iteration / SimCLR iteration (b=…)`` and ``EMC² iteration / SimCLR iteration (b=…)``,
  target 1.25: medians of ``repeats`` rounds in which the three iterations run ``number`` times
  each, interleaved in a rotating order (so drift in machine load hits all three), after warm-up
  iterations (Adam state, EMC² chains started);
- ``EMC² acceptance rate (b=…)`` (report only): mean of ``EMC2State.last_acceptance_rate`` over the
  timed EMC² iterations (accepted / valid proposals, burn-in included).

and once, ``… state bytes per sample / embedding cache`` for SimCLR, SogCLR and EMC² (report
only): bytes of the tensors in the state's ``state_dict()`` divided by the number of training
samples n, against an fp32 embedding cache of the projector's width (the O(n·d) alternative):
SimCLR 0, SogCLR 5 (``u`` float32 + ``seen`` bool), EMC² 12 (``cur_idx`` int64 + ``cur_score``
float32), cache 256 (d = 64).

EMC²'s in-batch scan is sequential in the 2b proposals of each view and vectorised or compiled
across anchors: numba-compiled with the ``fast`` extra, else a NumPy loop over the proposals
(``EMC2State.backend`` names the one that ran; the EMC² row's note says which). The NumPy loop's
overhead grows linearly in b.

Measured on a shared 2-core CPU with one torch thread (``optfm bench contrastive``, default
``--repeats 7``, about 4 s), numba scan, three runs: SogCLR / SimCLR 1.14-1.15x / 1.09-1.15x /
1.08-1.09x and EMC² / SimCLR 1.18-1.25x / 1.15-1.19x / 1.18-1.21x at b = 8 / 32 / 128 (SimCLR
1.49-1.60 / 2.02-2.19 / 4.60-5.09 ms per iteration); EMC² acceptance rate 0.56 / 0.61 / 0.75
(deterministic: fixed seeds); state 0 / 5 / 12 bytes per sample against 256 for a d = 64 fp32
embedding cache. SogCLR meets the 1.25x target at every batch; EMC² does at b = 32 and 128 and
sits at the target at b = 8 (one run of three at 1.252x), where it also pays for ``embed_fn``
forward passes in 15 % of its iterations. With the NumPy scan (``scan="numpy"``, one run while
other jobs shared the machine) EMC² / SimCLR was 1.27x / 1.50x / 1.65x.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from optfm.bench.core import BenchRow, register_benchmark
from optfm.contrastive import EMC2State, SogCLRState, nt_xent_loss
from optfm.contrastive.augment import CanvasAugment, index_batches, two_views
from optfm.contrastive.models import ContrastiveModel, MLPEncoder, Projector

__all__ = [
    "BATCH_SIZES",
    "METHODS",
    "ROW_ACCEPT",
    "ROW_STATE",
    "ROW_TIME",
    "ContrastiveIteration",
    "bench_contrastive",
    "build_model",
    "make_state",
    "state_bytes",
]

NAME = "contrastive"
BATCH_SIZES: tuple[int, ...] = (8, 32, 128)
METHODS: tuple[str, ...] = ("SimCLR", "SogCLR", "EMC²")
TARGET = 1.25
LR = 1e-4
TEMPERATURE = 0.1
GAMMA = 0.9
BETA = 14.28
BURN_IN = 0.5
SEED = 0
WARMUP = 3
ITERS_PER_ROUND = 512
"""Samples per timed round and method: ``number = max(1, ITERS_PER_ROUND // b)`` iterations."""

ROW_TIME = "{method} iteration / SimCLR iteration (b={b})"
ROW_ACCEPT = "EMC² acceptance rate (b={b})"
ROW_STATE = "{method} state bytes per sample / embedding cache (d={d} fp32)"


def build_model(in_dim: int = 144, *, seed: int = SEED) -> ContrastiveModel:
    """The reproduction's model: MLP backbone (→256→128) + 64-d normalised projector."""
    torch.manual_seed(seed)  # nn.Linear initialises from the global generator
    return ContrastiveModel(MLPEncoder(in_dim=in_dim), Projector())


def make_state(method: str, n: int, scan: str = "auto") -> SogCLRState | EMC2State | None:
    """The per-sample state of ``method`` for ``n`` training samples (None for SimCLR); ``scan``
    picks EMC²'s MH-scan backend (see :class:`~optfm.contrastive.EMC2State`)."""
    if method == "SimCLR":
        return None
    if method == "SogCLR":
        return SogCLRState(n, gamma=GAMMA, temperature=TEMPERATURE)
    if method == "EMC²":
        return EMC2State(n, beta=BETA, burn_in=BURN_IN, scan=scan)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def state_bytes(state: SogCLRState | EMC2State | None) -> int:
    """Bytes of the tensors in ``state.state_dict()`` (0 for ``None``)."""
    if state is None:
        return 0
    return sum(t.numel() * t.element_size() for t in state.state_dict().values())


class ContrastiveIteration:
    """One method's training loop over ``x`` (``(n, 1, S, S)`` images); calling it runs one
    iteration and returns the loss value.

    ``generator`` drives the batch order, the augmentations and (EMC²) the MH proposals' uniforms.
    ``embed_calls`` / ``embed_rows`` count EMC²'s ``embed_fn`` forward passes and their samples.
    """

    def __init__(self, method: str, model: ContrastiveModel, x: torch.Tensor, batch_size: int,
                 generator: torch.Generator, augment: CanvasAugment | None = None,
                 scan: str = "auto") -> None:
        if batch_size < 2 or batch_size > x.shape[0]:
            raise ValueError(f"batch_size must lie in [2, {x.shape[0]}], got {batch_size}")
        self.method = method
        self.model = model
        self.x = x
        self.n = x.shape[0]
        self.batch_size = int(batch_size)
        self.generator = generator
        self.augment = CanvasAugment() if augment is None else augment
        self.state = make_state(method, self.n, scan)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        self.embed_calls = 0
        self.embed_rows = 0
        self.acceptance: list[float] = []
        self._batches: Iterator[torch.Tensor] = iter(())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, view1, view2)`` of the next full batch (a new shuffled epoch when needed)."""
        idx = next(self._batches, None)
        if idx is None:
            self._batches = index_batches(self.n, self.batch_size, self.generator, drop_last=True)
            idx = next(self._batches)
        v1, v2 = two_views(self.x[idx], self.augment, self.generator)
        return idx, v1, v2

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """EMC²'s ``embed_fn``: a forward pass (with gradient) on the un-augmented samples."""
        self.embed_calls += 1
        self.embed_rows += int(indices.numel())
        return self.model(self.x[indices.cpu()])

    def loss(self, idx: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.model(v1), self.model(v2)
        if self.state is None:
            return nt_xent_loss(z1, z2, temperature=TEMPERATURE)
        if isinstance(self.state, SogCLRState):
            return self.state.loss(z1, z2, idx)
        out = self.state.loss(z1, z2, idx, embed_fn=self.embed, generator=self.generator)
        self.acceptance.append(self.state.last_acceptance_rate)
        return out

    def __call__(self) -> float:
        loss = self.loss(*self.next_batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _time_interleaved(fns: Sequence[Callable[[], object]], repeats: int,
                      number: int) -> list[float]:
    """Median seconds per call of each of ``fns``; every round runs each ``number`` times, the
    order rotating from round to round."""
    times: list[list[float]] = [[] for _ in fns]
    k = len(fns)
    for r in range(repeats):
        for j in range(k):
            i = (j + r) % k
            t0 = time.perf_counter()
            for _ in range(number):
                fns[i]()
            times[i].append((time.perf_counter() - t0) / number)
    return [statistics.median(t) for t in times]


def _load_x() -> torch.Tensor:
    from optfm.data.digits import load_digits_canvas

    return load_digits_canvas().x_train


@register_benchmark(NAME, "EMC² and SogCLR iteration time / SimCLR iteration time at the same "
                          "batch (target <= 1.25x), state bytes per sample")
def bench_contrastive(repeats: int = 7, *, batch_sizes: Sequence[int] = BATCH_SIZES,
                      x: torch.Tensor | None = None,
                      iters_per_round: int = ITERS_PER_ROUND, scan: str = "auto") -> list[BenchRow]:
    """The rows of ``optfm bench contrastive`` (tests pass a small ``x`` and batch sizes)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 2:
        raise ValueError(f"batch_sizes must be non-empty ints >= 2, got {batch_sizes}")
    t_start = time.perf_counter()
    x = _load_x() if x is None else x
    n = x.shape[0]
    in_dim = x[0].numel()
    threads = torch.get_num_threads()
    rows: list[BenchRow] = []
    d = 0
    for b in batch_sizes:
        its = {}
        for method in METHODS:
            model = build_model(in_dim)
            d = model.projector.out
            its[method] = ContrastiveIteration(method, model, x, b,
                                               torch.Generator().manual_seed(SEED), scan=scan)
        for it in its.values():
            for _ in range(WARMUP):
                it()
            it.acceptance.clear()
            it.embed_calls = it.embed_rows = 0
        number = max(1, iters_per_round // b)
        t_simclr, t_sog, t_emc = _time_interleaved(
            [its["SimCLR"], its["SogCLR"], its["EMC²"]], repeats, number)
        emc = its["EMC²"]
        timed = repeats * number
        rows.append(BenchRow(
            NAME, ROW_TIME.format(method="SogCLR", b=b), t_sog, t_simclr, "s", TARGET,
            note=(f"median of {repeats} rounds x {number} iterations, the three methods "
                  f"interleaved (rotating order); n={n}, MLP {in_dim}→256→128→64, Adam lr {LR}; "
                  f"torch threads {threads}") if b == batch_sizes[0] else ""))
        rows.append(BenchRow(
            NAME, ROW_TIME.format(method="EMC²", b=b), t_emc, t_simclr, "s", TARGET,
            note=(f"embed_fn forward passes in {emc.embed_calls} of {timed} timed iterations, "
                  f"{emc.embed_rows / timed:.2f} samples per iteration on average; MH scan over "
                  f"2x{2 * b} proposals per anchor: {emc.state.backend}")))
        rate = statistics.fmean(emc.acceptance) if emc.acceptance else float("nan")
        rows.append(BenchRow(NAME, ROW_ACCEPT.format(b=b), rate, 1.0, "",
                             note=f"mean over {len(emc.acceptance)} timed EMC² iterations"
                             if b == batch_sizes[0] else ""))
    cache = n * d * 4
    for method in METHODS:
        st = make_state(method, n)
        nbytes = state_bytes(st)
        keys = ", ".join(f"{k} {v.dtype}" for k, v in st.state_dict().items()) if st else "none"
        rows.append(BenchRow(
            NAME, ROW_STATE.format(method=method, d=d), nbytes / n, cache / n, "bytes",
            note=(f"{nbytes} B in state_dict() for n={n} ({keys})"
                  + (f"; whole benchmark {time.perf_counter() - t_start:.0f} s"
                     if method == METHODS[-1] else ""))))
    return rows
