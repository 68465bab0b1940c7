r"""``optfm bench attention``: forward + backward time of :class:`~optfm.attention.KernelAttention`
with the Gaussian kernel against the softmax kernel, and of the softmax kernel against PyTorch's
fused ``scaled_dot_product_attention`` (SDPA), at several sequence lengths.

Set-up, per sequence length L in ``lengths`` (default 64, 256, 1024): one self-attention layer
with D = 64, H = 4 heads of size d = 16, ``W_O``, no bias, float32, weights from one seed and
**shared by every arm** (the Gaussian layers load the softmax layer's ``state_dict``); a batch of
B = ``tokens // L`` sequences (``tokens`` = 1024 by default, so every length processes the same
number of tokens: the projections cost the same and the attention part grows linearly in L);
input ``x (B, L, D)`` with ``requires_grad`` (as inside a model) and one fixed random cotangent
``g`` for the output. One timed call is ``out = forward(x)`` then
``torch.autograd.grad(out, params + [x], g)``; every arm sees the same ``x`` and ``g``. Arms:

- ``softmax``: ``KernelAttention(kernel="softmax")``, i.e. :func:`~optfm.attention.attention_scores`
  forms the explicit (B, H, L, L) score matrix ``softmax(q kᵀ/√d)``, then ``S v``;
- ``gaussian``: ``KernelAttention(kernel="gaussian")``, unnormalised
  ``S_jl = exp(-‖q_j - k_l‖²/(2√d))`` in the log domain, with the default underflow check
  (``on_underflow="warn"``: one extra pass over S and a host sync per forward);
- ``gaussian normalize_rows``: ``KernelAttention(kernel="gaussian", normalize_rows=True)``
  (softmax with a key-norm penalty; no underflow check);
- ``SDPA``: the softmax layer's own ``W_Q``, ``W_K``, ``W_V``, ``W_O`` around
  ``torch.nn.functional.scaled_dot_product_attention`` (:func:`sdpa_attention`; same output as
  the softmax arm up to rounding). On this CPU build SDPA never materialises S: its peak memory
  stays below the size of one score tensor.

Rows (ratio = measured / baseline, all report only: neither the issue nor the spec states a
target), for every L:

- ``gaussian / softmax fwd+bwd (L=…)`` and ``gaussian normalize_rows / softmax fwd+bwd (L=…)``;
- ``softmax attention_scores / SDPA fwd+bwd (L=…)``: the cost of the explicit-score path that
  every ``optfm.attention`` kernel uses, against the fused kernel a softmax-only model could use;

timed with :func:`~optfm.bench.core.time_pair` (the two sides alternate, ABBA; medians of
``2 x repeats`` rounds of ``number`` calls per side, ``number`` calibrated after a warm-up call so
that the slowest arm's side of a round takes about ``ROUND_S`` = 20 ms, at least one call); and at
the largest L,

- ``… peak tensor bytes fwd+bwd (L=…)`` for the same three pairs: the peak of live tensor bytes
  during one call, from torch's memory profiler (:func:`optfm.training.peak_tensor_bytes`;
  deterministic, no allocator slack; left out when the profiler API is unavailable).

Why the Gaussian kernel costs more: with the squared distance expanded as
``‖q‖² + ‖k‖² - 2 q kᵀ`` it runs several more elementwise passes over the (B, H, L, L) scores
(2·qk, the broadcast add and subtract, clamp, scale, then exp or the row softmax) than softmax's
scale + fused softmax, and autograd keeps more of those L² tensors for the backward. Both
explicit-score kernels hold O(B·H·L²) memory; SDPA's is O(B·H·L·d).

Measured on a shared 2-core CPU with one torch thread (``optfm bench attention``, default
``--repeats 7``, about 10 s for the rows plus the imports), three runs while other jobs kept the
load average at 2-5, at L = 64 / 256 / 1024:

- gaussian / softmax: 1.18-1.52x / 1.39-1.52x / 1.64-1.74x;
- gaussian normalize_rows / softmax: 1.12-1.16x / 1.20-1.24x / 1.43-1.45x;
- softmax attention_scores / SDPA: 1.05-1.40x / 1.12-1.54x / 1.38-1.51x;
- softmax fwd+bwd itself 6-7 / 14-15 / 47-50 ms per 1024 tokens (SDPA 5-7 / 12-13 / 33-34 ms:
  at L = 64 most of a call is outside the score computation);
- peak tensor bytes at L = 1024 (deterministic): gaussian 81.34 MiB and gaussian normalize_rows
  81.34 MiB against softmax 49.58 MiB (1.64x); softmax 49.58 MiB against SDPA 3.84 MiB (12.9x;
  one score tensor is 16 MiB).

The short lengths are noisy on a loaded machine (single rounds of a few ms); the L = 1024 ratios
repeat within about 0.1. Part of the gap between the two Gaussian arms at L = 1024 is the
underflow check: timed separately, ``on_underflow="warn"`` took 5-10 % (5-10 ms) longer than
``"ignore"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optfm.attention import KernelAttention
from optfm.bench.core import BenchRow, register_benchmark, time_pair
from optfm.training.memory import peak_tensor_bytes

__all__ = [
    "ARMS",
    "LENGTHS",
    "ROW_PEAK",
    "ROW_SDPA",
    "ROW_TIME",
    "AttentionCase",
    "bench_attention",
    "build_case",
    "sdpa_attention",
]

NAME = "attention"
LENGTHS: tuple[int, ...] = (64, 256, 1024)
TOKENS = 1024
"""Tokens per call: batch ``B = TOKENS // L``."""
EMBED_DIM = 64
NUM_HEADS = 4
SEED = 0
ROUND_S = 0.02
"""Seconds the slowest arm's side of a timing round should take (sets ``number``)."""
ROUNDS_PER_REPEAT = 2
"""``time_pair`` rounds per requested repeat."""
ARMS: tuple[str, ...] = ("softmax", "gaussian", "gaussian normalize_rows", "SDPA")

ROW_TIME = "{arm} / softmax fwd+bwd (L={L})"
ROW_SDPA = "softmax attention_scores / SDPA fwd+bwd (L={L})"
ROW_PEAK = "{measured} / {baseline} peak tensor bytes fwd+bwd (L={L})"


def sdpa_attention(layer: KernelAttention, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s projections around ``F.scaled_dot_product_attention`` (no masks, no dropout):
    the fused equivalent of a softmax :class:`KernelAttention` forward."""
    b, n, _ = x.shape
    h = layer.num_heads
    q = layer.W_Q(x).view(b, n, h, layer.head_dim).transpose(1, 2)
    k = layer.W_K(x).view(b, n, h, layer.head_dim).transpose(1, 2)
    v = layer.W_V(x).view(b, n, h, layer.value_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=layer.scale)
    out = out.transpose(1, 2).reshape(b, n, h * layer.value_dim)
    return layer.W_O(out) if layer.W_O is not None else out


@dataclass
class AttentionCase:
    """One sequence length: the shared input ``x (B, L, D)``, the output cotangent ``grad_out``
    and one layer per kernel (``layers["softmax"]``, ``["gaussian"]``, ``["gaussian
    normalize_rows"]``), all with the same weights. The ``SDPA`` arm uses the softmax layer."""

    length: int
    x: torch.Tensor
    grad_out: torch.Tensor
    layers: dict[str, KernelAttention]

    def layer(self, arm: str) -> KernelAttention:
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        return self.layers["softmax" if arm == "SDPA" else arm]

    def forward(self, arm: str) -> torch.Tensor:
        """The arm's output on ``self.x``."""
        layer = self.layer(arm)
        return sdpa_attention(layer, self.x) if arm == "SDPA" else layer(self.x)

    def step(self, arm: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        """One timed call: forward on ``x``, then the gradients of ``<out, grad_out>`` with
        respect to the layer's parameters and ``x`` (returned, in that order)."""
        layer = self.layer(arm)
        inputs = [*layer.parameters(), self.x]

        def run() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(self.forward(arm), inputs, self.grad_out)

        return run


def build_case(length: int, *, tokens: int = TOKENS, embed_dim: int = EMBED_DIM,
               num_heads: int = NUM_HEADS, seed: int = SEED) -> AttentionCase:
    """The layers and inputs of one sequence length (module docstring); ``B = max(1,
    tokens // length)``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear initialises from the global generator
    softmax = KernelAttention(embed_dim, num_heads, kernel="softmax")
    gaussian = KernelAttention(embed_dim, num_heads, kernel="gaussian")
    normalized = KernelAttention(embed_dim, num_heads, kernel="gaussian", normalize_rows=True)
    for layer in (gaussian, normalized):
        layer.load_state_dict(softmax.state_dict())
    b = max(1, tokens // length)
    x = torch.randn(b, length, embed_dim, generator=g).requires_grad_(True)
    grad_out = torch.randn(b, length, softmax.output_dim, generator=g)
    return AttentionCase(length, x, grad_out, {"softmax": softmax, "gaussian": gaussian,
                                               "gaussian normalize_rows": normalized})


def _number(fns: Sequence[Callable[[], object]], round_s: float) -> int:
    """Calls per timing round so that the slowest of ``fns`` takes about ``round_s`` (each
    function runs twice here, the first call as a warm-up)."""
    worst = 0.0
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        worst = max(worst, time.perf_counter() - t0)
    return max(1, round(round_s / worst)) if worst > 0 else 1


@register_benchmark(NAME, "KernelAttention forward+backward time: Gaussian / softmax kernel and "
                          "softmax (explicit scores) / fused SDPA per sequence length; peak memory")
def bench_attention(repeats: int = 7, *, lengths: Sequence[int] = LENGTHS, tokens: int = TOKENS,
                    round_s: float = ROUND_S, memory: bool = True) -> list[BenchRow]:
    """The rows of ``optfm bench attention`` (tests pass short lengths and few tokens)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be non-empty ints >= 1, got {lengths}")
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    rows: list[BenchRow] = []
    case = None
    for i, length in enumerate(lengths):
        case = build_case(length, tokens=tokens)
        steps = {arm: case.step(arm) for arm in ARMS}
        b = case.x.shape[0]
        number = _number(list(steps.values()), round_s)
        rounds = repeats * ROUNDS_PER_REPEAT
        for arm in ("gaussian", "gaussian normalize_rows"):
            t_m, t_b = time_pair(steps[arm], steps["softmax"], repeats=rounds, number=number,
                                 warmup=0)
            note = ""
            if arm == "gaussian":
                note = f"B={b} x L={length} tokens, {number} call(s) per side per round"
                if i == 0:
                    note = (f"median of {rounds} ABBA rounds (time_pair); D={EMBED_DIM}, "
                            f"H={NUM_HEADS}, d={EMBED_DIM // NUM_HEADS}, W_O, float32, shared "
                            f"weights; {note}; torch threads {threads}")
                last = case.layers["gaussian"]
                note += (f"; underflow check on: {last.last_underflow_rows} of "
                         f"{last.last_checked_rows} rows underflowed")
            rows.append(BenchRow(NAME, ROW_TIME.format(arm=arm, L=length), t_m, t_b, "s",
                                 note=note))
        t_m, t_b = time_pair(steps["softmax"], steps["SDPA"], repeats=rounds, number=number,
                             warmup=0)
        rows.append(BenchRow(NAME, ROW_SDPA.format(L=length), t_m, t_b, "s",
                             note="SDPA: the softmax layer's projections around "
                                  "F.scaled_dot_product_attention" if i == 0 else ""))
    assert case is not None
    if memory:
        rows += _memory_rows(case)
    rows[-1].note = "; ".join(
        s for s in (rows[-1].note, f"whole benchmark {time.perf_counter() - t_start:.1f} s") if s)
    return rows


def _memory_rows(case: AttentionCase) -> list[BenchRow]:
    """Peak tensor bytes of one call per arm at ``case.length`` (empty if unavailable)."""
    peaks = {}
    for arm in ARMS:
        step = case.step(arm)
        step()  # warm: nothing lazily created inside the profiled call
        res = peak_tensor_bytes(step)
        if res is None:
            return []
        peaks[arm] = res["peak_bytes"]
    b, length = case.x.shape[:2]
    h = case.layers["softmax"].num_heads
    score_bytes = b * h * length * length * case.x.element_size()
    score_note = (f"one (B, H, L, L) = ({b}, {h}, {length}, {length}) score tensor = "
                  f"{score_bytes / 2**20:.2f} MiB; torch memory profiler, deterministic")
    return [
        BenchRow(NAME, ROW_PEAK.format(measured="gaussian", baseline="softmax", L=case.length),
                 peaks["gaussian"], peaks["softmax"], "bytes", note=score_note),
        BenchRow(NAME, ROW_PEAK.format(measured="gaussian normalize_rows", baseline="softmax",
                                       L=case.length),
                 peaks["gaussian normalize_rows"], peaks["softmax"], "bytes"),
        BenchRow(NAME, ROW_PEAK.format(measured="softmax attention_scores", baseline="SDPA",
                                       L=case.length),
                 peaks["softmax"], peaks["SDPA"], "bytes"),
    ]
