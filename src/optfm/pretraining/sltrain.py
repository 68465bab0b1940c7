r"""SLTrain: sparse plus low-rank weights for parameter- and memory-efficient pretraining.

Paper: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"
(NeurIPS 2024). Each replaced linear layer has the weight

    W = B (A · α/r) + S,        y = x Wᵀ + bias

- ``A`` ∈ R^{r×in}: Kaiming-uniform U(±1/√in); ``B`` ∈ R^{out×r}: zeros, so W = S at init.
- ``S``: sparse with a uniformly random support of ``nnz = ⌊δ·in·out⌋`` positions drawn once from
  a seeded ``torch.Generator`` and **fixed** for the whole training; only its ``values`` are
  trainable (init U(±1/√in)). The support is the buffer ``index`` (flat positions, sorted; int32
  when in·out < 2³¹, half the memory of int64), saved in the state dict.

Forward/backward (:class:`SLTrainFunction`), which never saves the dense W::

    forward:  W = B @ (A·s);  W.view(-1).index_add_(0, index, values);  y = F.linear(x, W, bias)
              save (x, B, A, values, index, bias)                         s = α / r
    backward: W recomputed;  grad_x = g @ W                  (W freed before the next line)
              G = g2ᵀ @ x2   (dense weight gradient, transient)
              grad_B = s · G @ Aᵀ;  grad_A = s · Bᵀ @ G;  grad_values = G.view(-1)[index]
              grad_bias = g2.sum(0)                 (g2, x2: g and x flattened to 2-D)

so the activations kept per layer are those of a dense ``nn.Linear`` (its input x); plain autograd
through the same arithmetic keeps the dense W and A·s alive per layer until backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LLAMA_TARGET_MODULES",
    "SLTrainConfig",
    "SLTrainFunction",
    "SLTrainLinear",
    "apply_sltrain",
    "merge_sltrain",
    "random_support",
]

LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_support(numel: int, nnz: int, *, generator: torch.Generator,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``nnz`` distinct positions in ``[0, numel)``, uniformly at random, sorted; int32 when
    ``numel < 2**31``. Memory O(nnz): draws with replacement, deduplicates, tops up, then keeps a
    uniformly random subset of exactly ``nnz`` (never a ``randperm(numel)``, which would cost
    8·numel bytes for a 7B layer)."""
    if not 0 < nnz <= numel:
        raise ValueError(f"nnz must be in [1, numel={numel}], got {nnz}")
    if nnz > numel // 2:  # dense enough that a permutation is the cheaper way
        chosen = torch.randperm(numel, generator=generator)[:nnz]
    else:
        chosen = torch.empty(0, dtype=torch.long)
        while len(chosen) < nnz:
            draw = torch.randint(0, numel, (int(1.1 * (nnz - len(chosen))) + 16,), generator=generator)
            chosen = torch.unique(torch.cat([chosen, draw]))
        # a uniformly random subset of the (uniformly random) unique set
        chosen = chosen[torch.randperm(len(chosen), generator=generator)[:nnz]]
    chosen, _ = torch.sort(chosen)
    dtype = torch.int32 if numel < 2**31 else torch.int64
    return chosen.to(device=device, dtype=dtype)


def _dense(B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
           scaling: float) -> torch.Tensor:
    W = B @ (A * scaling)
    W.view(-1).index_add_(0, index, values.to(W.dtype))
    return W


class SLTrainFunction(torch.autograd.Function):
    """``y = x (B A s + S)ᵀ + bias`` with the memory-saving backward of the paper."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, values: torch.Tensor,
                index: torch.Tensor, bias: torch.Tensor | None, scaling: float) -> torch.Tensor:
        W = _dense(B, A, values, index, scaling)
        out = F.linear(x, W.to(x.dtype) if W.dtype != x.dtype else W,
                       None if bias is None else bias.to(x.dtype))
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, B, A, values, index, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: torch.Tensor):
        x, B, A, values, index = ctx.saved_tensors[:5]
        bias = ctx.saved_tensors[5] if ctx.has_bias else None
        s = ctx.scaling
        need_x, need_B, need_A, need_v = ctx.needs_input_grad[:4]
        need_bias = ctx.has_bias and ctx.needs_input_grad[5]
        grad_x = grad_B = grad_A = grad_v = grad_bias = None
        if need_x:
            W = _dense(B, A, values, index, s)
            grad_x = grad_out @ W.to(grad_out.dtype)
            del W
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_B or need_A or need_v:
            x2 = x.reshape(-1, x.shape[-1])
            G = g2.t() @ x2.to(g2.dtype)  # dense weight gradient: transient
            if need_B:
                grad_B = ((G @ A.to(G.dtype).t()) * s).to(B.dtype)
            if need_A:
                grad_A = ((B.to(G.dtype).t() @ G) * s).to(A.dtype)
            if need_v:
                grad_v = G.view(-1)[index].to(values.dtype)
            del G
        if need_bias:
            grad_bias = g2.sum(0).to(bias.dtype)
        return grad_x, grad_B, grad_A, grad_v, None, grad_bias, None


def _check_int(name: str, v: int, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_shape(in_features: int, out_features: int, rank: int) -> None:
    _check_int("in_features", in_features)
    _check_int("out_features", out_features)
    _check_int("rank", rank)
    if rank > min(in_features, out_features):
        raise ValueError(f"rank must be <= min(in_features, out_features) = "
                         f"{min(in_features, out_features)}, got {rank}")


class SLTrainLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` with weight ``B (A·α/r) + S`` (see module docstring).

    Parameters: ``A`` (rank × in), ``B`` (out × rank), ``values`` (nnz), ``bias`` (out, optional);
    buffer ``index`` (nnz, fixed support).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03,
                 alpha: float = 32.0, bias: bool = True, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_shape(in_features, out_features, rank)
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        nnz = math.floor(density * in_features * out_features)
        if nnz < 1:
            raise ValueError(f"density={density} leaves no sparse entry in a {out_features}x{in_features} layer")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.density, self.alpha = rank, float(density), float(alpha)
        self.scaling = self.alpha / rank
        factory = {"device": device, "dtype": dtype}
        bound = 1.0 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.values = nn.Parameter(torch.empty(nnz, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("index", random_support(in_features * out_features, nnz,
                                                     generator=gen, device=device))
        with torch.no_grad():
            for t in (self.A, self.values, *(() if self.bias is None else (self.bias,))):
                t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=gen))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SLTrainFunction.apply(x, self.B, self.A, self.values, self.index, self.bias,
                                     self.scaling)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The dense W = B (A·s) + S (for merging/export)."""
        return _dense(self.B, self.A, self.values, self.index, self.scaling)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density}, alpha={self.alpha}, nnz={self.nnz}, bias={self.bias is not None}")


@dataclass
class SLTrainConfig:
    """What to replace and how. ``target_modules``: names (last path component) of the
    ``nn.Linear`` modules to replace; the default is every attention and MLP projection of a
    Llama-style model. ``seed`` seeds the supports (layer by layer, in module order)."""

    rank: int = 128
    density: float = 0.03
    alpha: float = 32.0
    target_modules: Sequence[str] = field(default_factory=lambda: LLAMA_TARGET_MODULES)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("rank", self.rank)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_sltrain(model: nn.Module, config: SLTrainConfig) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose name ends in one of ``config.target_modules``
    by a freshly initialised :class:`SLTrainLinear` (pretraining from scratch: W = S at init).
    Embeddings, ``lm_head`` and norms are untouched unless named in ``target_modules``. Returns
    the model. Raises ``ValueError`` when nothing matches."""
    gen = torch.Generator().manual_seed(config.seed)
    targets = set(config.target_modules)
    matches = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not matches:
        raise ValueError(f"no nn.Linear module is named one of {sorted(targets)}; "
                         "set SLTrainConfig.target_modules to the model's projection names")
    for name, lin in matches:
        rank = min(config.rank, lin.in_features, lin.out_features)
        new = SLTrainLinear(lin.in_features, lin.out_features, rank, config.density, config.alpha,
                            bias=lin.bias is not None, generator=gen, device=lin.weight.device,
                            dtype=lin.weight.dtype)
        _replace(model, name, new)
    return model


def merge_sltrain(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`SLTrainLinear` by an ``nn.Linear`` holding its dense
    weight, so the model exports as a plain checkpoint (``save_pretrained``). Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SLTrainLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.A.device, dtype=m.A.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.dense_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            _replace(model, name, lin)
    return model
