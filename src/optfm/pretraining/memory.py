r"""Static memory accounting for full-rank, low-rank and SLTrain pretraining.

Two kinds of numbers, both exact given their assumptions (``specs/pretraining.md``, "Memory
accounting"; measured activation bytes and peak RSS live in :mod:`optfm.training.memory`):

- :func:`static_memory_bytes` — closed form from layer shapes, for models too big to build here
  (the LLaMA 60M…7B configurations of the GaLore/SLTrain papers, :data:`LLAMA_SIZES`).
- :func:`module_static_bytes` — from the tensors of a real ``nn.Module`` (``numel × element_size``
  of every parameter and buffer), e.g. a ``transformers`` model after ``apply_sltrain``.

"Static" = parameters + gradients + optimizer state + buffers. Activations, temporary buffers of
the forward/backward pass, allocator fragmentation and framework overhead are *not* included.

Closed-form conventions (every one is a keyword argument; the defaults are the paper's):

1. **Model.** A LLaMA block has q, k, v, o (d→d; no grouped-query attention) and the SwiGLU MLP
   gate, up (d→ffn) and down (ffn→d), all without bias. These 7 linears per block are replaced by
   low-rank / SLTrain layers. Token embeddings (V×d), an *untied* ``lm_head`` (V×d) and the RMSNorm
   weights (2 per block + 1 final, d each) stay dense. Rotary-embedding buffers are ignored.
2. **Methods.** ``"full"``: W (out×in). ``"lowrank"``: W = B A with A (r×in) and B (out×r), both
   trained. ``"sltrain"``: the low-rank factors plus ``nnz = ⌊δ·in·out⌋`` trainable sparse values
   and an index buffer of ``nnz`` entries (not trainable: no gradient, no optimizer state). The
   rank is clamped to ``min(in, out)`` per layer, as ``apply_sltrain`` / ``apply_lowrank`` do.
3. **Bytes.** Weights in bf16 (``weight_bytes=2``); gradients in the weights' dtype
   (``grad_bytes=weight_bytes``; ``grad_bytes=0`` leaves gradients out, the convention of the
   GaLore/SLTrain papers' memory tables, which count weights + optimizer states only).
   Adam keeps 2 states per trainable parameter in the weights' dtype (``state_bytes=weight_bytes``,
   i.e. bf16 states: this, not fp32, reproduces the papers' numbers); ``"adam8bit"`` keeps 2 states
   of 1 byte (2 B per parameter; the block-wise quantisation constants of ``bitsandbytes``, about
   4 B per 256 or 2048 entries, and its 32-bit states for tensors under 4096 entries are ignored);
   ``"sgd"`` keeps none. Index buffers: 8 B (int64, the official code; ``index_bytes=8``),
   4 B (int32, ``index_bytes=4``), or ``"auto"`` (int32 when in·out < 2³¹, as ``SLTrainLinear``).
4. **Per-layer updates** (``per_layer=True``; GaLore's "per-layer weight updates": each parameter
   is stepped in its gradient hook and its gradient freed at once, so full gradients never
   coexist). We count only the largest single trainable parameter's gradient — the transient
   peak — instead of all gradients. Optimizer states and weights are unchanged.
5. **Units.** GB = 10⁹ bytes. (With GiB = 2³⁰ the spec's 53.9 GB would be 50.2 GiB.)

What reproduces the spec's paper-scale figures (:func:`paper_claims`, tested):

- 1B, bf16 weights + 2 bf16 Adam states, no gradients: SLTrain has 48.2% of the full-rank
  parameters (645.5M / 1339.1M) and 51.8% of its memory (4.16 / 8.03 GB). Counting bf16 gradients
  too gives 50.9% (5.45 / 10.71 GB), so "≈52%" needs the no-gradient convention.
- 7B full rank, bf16 weights + bf16 gradients + 2 bf16 Adam states (8 B per parameter):
  6738.4M × 8 B = 53.9 GB.
- 7B SLTrain with 8-bit Adam and per-layer updates: 15.17 GB (71.9% less than 53.9 GB; 13.87 GB,
  74.3% less, with int32 indices) — but only with **δ = 0.05** (the authors' ``sltrain7b.sh``
  uses ``--rank 1024 --sp_ratio 0.05``) and **no gradient memory at all** for per-layer updates.
  With δ = 0.03 the same conventions give 13.6 GB (74.7% / 76.2% less): not the spec's figures.
  Counting the largest transient gradient (the bf16 embedding gradient, 0.26 GB; our default
  ``per_layer`` convention) gives 15.43 GB (71.4% / 73.8% less).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "GB",
    "LLAMA_SIZES",
    "LlamaSize",
    "ModelShapes",
    "StaticMemory",
    "module_static_bytes",
    "optimizer_state_bytes",
    "paper_claims",
    "paper_scale_markdown",
    "paper_scale_table",
    "parameter_breakdown",
    "static_memory_bytes",
]

GB = 10**9
"""Bytes per GB (decimal, as the papers)."""

METHODS = ("full", "lowrank", "sltrain")
OPTIMIZERS = ("adam", "adam8bit", "sgd")


@dataclass(frozen=True)
class ModelShapes:
    """Shapes for the closed form: ``linear`` = ``(in_features, out_features)`` of every linear
    that a method replaces (no bias); ``dense`` = ``numel`` of every parameter that stays dense
    (embeddings, ``lm_head``, norms, biases), one entry per parameter tensor."""

    linear: tuple[tuple[int, int], ...]
    dense: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for pair in self.linear:
            if (not isinstance(pair, tuple) or len(pair) != 2
                    or not all(_is_int(v) and v >= 1 for v in pair)):
                raise ValueError(f"linear must hold (in_features, out_features) pairs of ints >= 1, "
                                 f"got {pair!r}")
        for n in self.dense:
            if not (_is_int(n) and n >= 1):
                raise ValueError(f"dense must hold parameter sizes (ints >= 1), got {n!r}")


@dataclass(frozen=True)
class LlamaSize:
    """A LLaMA configuration of the GaLore/SLTrain papers with its SLTrain rank and density."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    rank: int
    density: float = 0.03
    vocab_size: int = 32000

    def shapes(self) -> ModelShapes:
        """q, k, v, o, gate, up, down per block (replaced); embeddings, untied ``lm_head``, 2
        RMSNorm weights per block and the final norm (dense)."""
        d, f = self.hidden_size, self.intermediate_size
        block = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
        dense = [self.vocab_size * d, self.vocab_size * d] + [d] * (2 * self.num_layers + 1)
        return ModelShapes(tuple(block * self.num_layers), tuple(dense))

    def llama_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.LlamaConfig`` with these shapes."""
        return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_attention_heads, "vocab_size": self.vocab_size,
                "tie_word_embeddings": False}


LLAMA_SIZES: dict[str, LlamaSize] = {
    s.name: s for s in (
        LlamaSize("60M", 512, 1376, 8, 8, rank=128),
        LlamaSize("130M", 768, 2048, 12, 12, rank=256),
        LlamaSize("350M", 1024, 2736, 24, 16, rank=256),
        LlamaSize("1B", 2048, 5461, 24, 32, rank=512),
        # δ = 0.05 at 7B: the authors' scripts/llm_pretrain/sltrain7b.sh (--sp_ratio 0.05), and the
        # only density that reproduces the paper's 7B memory figures (see module docstring).
        LlamaSize("7B", 4096, 11008, 32, 32, rank=1024, density=0.05),
    )
}
"""LLaMA 60M…7B (vocab 32000, untied) with the SLTrain paper's rank r ≈ d/4 and density δ."""


@dataclass(frozen=True)
class StaticMemory:
    """Static memory in bytes, plus element counts. ``buffers`` is every buffer for
    :func:`module_static_bytes` and the SLTrain index buffers for :func:`static_memory_bytes`."""

    num_parameters: int
    num_trainable: int
    num_buffer_elements: int
    parameters: int
    gradients: int
    optimizer_states: int
    buffers: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.buffers

    def as_dict(self) -> dict[str, int]:
        return {"num_parameters": self.num_parameters, "num_trainable": self.num_trainable,
                "num_buffer_elements": self.num_buffer_elements,
                "parameter_bytes": self.parameters, "gradient_bytes": self.gradients,
                "optimizer_state_bytes": self.optimizer_states, "buffer_bytes": self.buffers,
                "total_bytes": self.total}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bytes(name: str, v: object, *, allow_zero: bool) -> int:
    lo = 0 if allow_zero else 1
    if not (_is_int(v) and v >= lo):
        raise ValueError(f"{name} must be an int >= {lo} (bytes per element), got {v!r}")
    return v  # type: ignore[return-value]


def _resolve_shapes(size_or_shapes: str | LlamaSize | ModelShapes | Sequence[tuple[int, int]]
                    ) -> tuple[ModelShapes, LlamaSize | None]:
    if isinstance(size_or_shapes, str):
        if size_or_shapes not in LLAMA_SIZES:
            raise ValueError(f"size_or_shapes: unknown size {size_or_shapes!r}; "
                             f"known: {sorted(LLAMA_SIZES, key=list(LLAMA_SIZES).index)}")
        size = LLAMA_SIZES[size_or_shapes]
        return size.shapes(), size
    if isinstance(size_or_shapes, LlamaSize):
        return size_or_shapes.shapes(), size_or_shapes
    if isinstance(size_or_shapes, ModelShapes):
        return size_or_shapes, None
    if isinstance(size_or_shapes, Sequence):
        return ModelShapes(tuple(tuple(p) if isinstance(p, list) else p
                                 for p in size_or_shapes)), None
    raise ValueError("size_or_shapes must be a LLAMA_SIZES name, a LlamaSize, a ModelShapes or a "
                     f"sequence of (in_features, out_features) pairs, got {type(size_or_shapes)!r}")


def static_memory_bytes(
    size_or_shapes: str | LlamaSize | ModelShapes | Sequence[tuple[int, int]],
    method: Literal["full", "lowrank", "sltrain"],
    *,
    rank: int | None = None,
    density: float | None = None,
    weight_bytes: int = 2,
    grad_bytes: int | None = None,
    optimizer: Literal["adam", "adam8bit", "sgd"] = "adam",
    state_bytes: int | None = None,
    per_layer: bool = False,
    index_bytes: int | Literal["auto"] = 8,
) -> StaticMemory:
    """Closed-form static memory of ``method`` on the given shapes (conventions: module docstring).

    ``size_or_shapes``: a :data:`LLAMA_SIZES` name (``"1B"``), a :class:`LlamaSize` (its ``rank``
    and ``density`` are the defaults), a :class:`ModelShapes`, or a sequence of ``(in, out)``
    pairs (replaced linears only). ``rank`` is required for ``"lowrank"``/``"sltrain"`` on bare
    shapes; ``density`` defaults to 0.03 there. ``grad_bytes`` defaults to ``weight_bytes`` (0:
    no gradients counted). ``state_bytes``: bytes of each of Adam's 2 states (default
    ``weight_bytes``; ignored by ``"adam8bit"`` = 1 and ``"sgd"``). ``rank`` and ``density`` are
    ignored by ``"full"``, ``density`` by ``"lowrank"``. ``per_layer``: count only the
    largest single parameter's gradient. ``index_bytes``: 8 (int64), 4 (int32) or ``"auto"``.
    """
    shapes, size = _resolve_shapes(size_or_shapes)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    weight_bytes = _check_bytes("weight_bytes", weight_bytes, allow_zero=False)
    grad_bytes = weight_bytes if grad_bytes is None else _check_bytes(
        "grad_bytes", grad_bytes, allow_zero=True)
    if state_bytes is None:
        state_bytes = weight_bytes
    state_bytes = _check_bytes("state_bytes", state_bytes, allow_zero=False)
    if not isinstance(per_layer, bool):
        raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
    if not (index_bytes == "auto" or (_is_int(index_bytes) and index_bytes in (4, 8))):
        raise ValueError(f"index_bytes must be 4 (int32), 8 (int64) or 'auto', got {index_bytes!r}")

    if method != "full":
        if rank is None:
            if size is None:
                raise ValueError(f"rank is required for method={method!r} on bare shapes")
            rank = size.rank
        if not (_is_int(rank) and rank >= 1):
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if method == "sltrain":
        if density is None:
            density = size.density if size is not None else 0.03
        if (isinstance(density, bool) or not isinstance(density, (int, float))
                or not 0.0 < density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density!r}")

    trainable: list[int] = list(shapes.dense)  # numel of every trainable parameter tensor
    index_total = 0
    index_elements = 0
    for fan_in, fan_out in shapes.linear:
        if method == "full":
            trainable.append(fan_in * fan_out)
            continue
        r = min(rank, fan_in, fan_out)  # type: ignore[type-var]
        trainable += [r * fan_in, fan_out * r]
        if method == "sltrain":
            nnz = math.floor(density * fan_in * fan_out)  # same expression as SLTrainLinear
            if nnz < 1:
                raise ValueError(f"density={density} leaves no sparse entry in a "
                                 f"{fan_out}x{fan_in} layer")
            trainable.append(nnz)
            width = (4 if fan_in * fan_out < 2**31 else 8) if index_bytes == "auto" else index_bytes
            index_elements += nnz
            index_total += nnz * width  # type: ignore[operator]

    n = sum(trainable)
    per_state = {"adam": 2 * state_bytes, "adam8bit": 2, "sgd": 0}[optimizer]
    grad_elements = max(trainable, default=0) if per_layer else n
    return StaticMemory(num_parameters=n, num_trainable=n, num_buffer_elements=index_elements,
                        parameters=n * weight_bytes, gradients=grad_elements * grad_bytes,
                        optimizer_states=n * per_state, buffers=index_total)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model)!r}")
    return model


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Element counts of ``model``: ``trainable`` / ``frozen`` / ``total`` parameters (shared
    tensors counted once) and ``buffers`` (every buffer, e.g. SLTrain's ``index``)."""
    _check_module(model)
    params = _unique(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    buffers = sum(b.numel() for b in _unique(model.buffers()))
    return {"trainable": trainable, "frozen": total - trainable, "total": total,
            "buffers": buffers}


def module_static_bytes(model: nn.Module, *, optimizer_state_bytes_per_param: float,
                        grad_bytes: int | None = None, per_layer: bool = False) -> StaticMemory:
    """Exact static bytes of a real module, from its tensors (``numel × element_size``).

    - parameters: every parameter (trainable or not), in its own dtype;
    - gradients: trainable parameters only, ``grad_bytes`` per element (default: the parameter's
      own element size); with ``per_layer`` only the largest trainable parameter's gradient;
    - optimizer states: ``optimizer_state_bytes_per_param`` × trainable elements (e.g. 8 for fp32
      Adam, 2 × weight bytes for Adam in the weights' dtype, 2 for 8-bit Adam, 0 for SGD; use
      :func:`optimizer_state_bytes` to measure a real optimizer instead);
    - buffers: every buffer in its own dtype (SLTrain's ``index``, rotary ``inv_freq``, …).
    Shared tensors (tied embeddings) are counted once.
    """
    _check_module(model)
    b = optimizer_state_bytes_per_param
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
        raise ValueError(f"optimizer_state_bytes_per_param must be a finite number >= 0, got {b!r}")
    if grad_bytes is not None:
        _check_bytes("grad_bytes", grad_bytes, allow_zero=True)
    if not isinstance(per_layer, bool):
        raise ValueError(f"per_layer must be a bool, got {per_layer!r}")
    params = _unique(model.parameters())
    train = [p for p in params if p.requires_grad]
    grads = [p.numel() * (p.element_size() if grad_bytes is None else grad_bytes) for p in train]
    buffers = _unique(model.buffers())
    n_train = sum(p.numel() for p in train)
    return StaticMemory(
        num_parameters=sum(p.numel() for p in params), num_trainable=n_train,
        num_buffer_elements=sum(t.numel() for t in buffers),
        parameters=sum(p.numel() * p.element_size() for p in params),
        gradients=max(grads, default=0) if per_layer else sum(grads),
        optimizer_states=round(n_train * b),
        buffers=sum(t.numel() * t.element_size() for t in buffers))


def _state_tensors(v: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """The plain tensors that hold ``v``'s memory: a tensor subclass that flattens (torchao's
    8-bit states) yields its inner tensors (uint8 codes, scales, quantisation map), not its
    nominal float32 size; dicts, lists and plain objects (GaLore's projector and its
    ``ortho_matrix``) are searched."""
    if depth > 4:
        return
    if isinstance(v, torch.Tensor):
        if type(v) in (torch.Tensor, nn.Parameter) or not hasattr(v, "__tensor_flatten__"):
            yield v
        else:
            for name in v.__tensor_flatten__()[0]:
                yield from _state_tensors(getattr(v, name), depth + 1)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _state_tensors(x, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _state_tensors(x, depth + 1)
    elif hasattr(v, "__dict__") and not isinstance(v, type):
        for x in vars(v).values():
            yield from _state_tensors(x, depth + 1)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (after at least one ``step``: most optimizers
    create their state lazily). Includes scalar ``step`` tensors, quantisation constants of 8-bit
    optimizers (counted by their real storage: torchao's 8-bit states by their uint8 codes, not
    their nominal dtype) and tensors held by state objects (GaLore's projection matrices); each
    tensor counted once. Works for a :class:`~optfm.pretraining.per_layer.PerLayerOptimizer`,
    whose ``state`` mirrors its inner optimizers'."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
    tensors = [t for state in optimizer.state.values() for t in _state_tensors(state)]
    return sum(t.numel() * t.element_size() for t in _unique(tensors))


# --------------------------------------------------------------------------------------------
# Paper-scale table (specs/pretraining.md, "Paper-scale arithmetic")

# Weights + 2 Adam states, all bf16, no gradients: the papers' "estimated memory" convention.
_PAPER = {"weight_bytes": 2, "grad_bytes": 0, "optimizer": "adam"}
# The same plus bf16 gradients: the spec's "full-rank bf16 Adam" at 7B (8 B per parameter).
_WITH_GRADS = {"weight_bytes": 2, "optimizer": "adam"}


def paper_scale_table() -> list[dict[str, Any]]:
    """Rows of the paper-scale table. Memory in GB (10⁹ B); ratios are fractions.

    ``setting == "bf16 Adam"``: one row per LLaMA size × method (bf16 weights, 2 bf16 Adam states,
    int64 indices); ``memory_no_grad_GB`` = weights + states (the papers' convention) and
    ``memory_GB`` = that + bf16 gradients, each with its ratio to full rank (``*_vs_full``).

    ``setting == "8-bit Adam, per-layer"``: 7B rows with 8-bit Adam and per-layer updates, for
    int64/int32 indices and δ = 0.05 (authors) / 0.03; ``memory_no_grad_GB`` counts no gradient,
    ``memory_GB`` the largest transient one; ratios are to full-rank bf16 Adam *with* gradients
    (53.9 GB), the spec's reference.
    """
    rows: list[dict[str, Any]] = []
    for name, size in LLAMA_SIZES.items():
        full_ng = static_memory_bytes(size, "full", **_PAPER)
        full_g = static_memory_bytes(size, "full", **_WITH_GRADS)
        for method in METHODS:
            ng = static_memory_bytes(size, method, **_PAPER)
            g = static_memory_bytes(size, method, **_WITH_GRADS)
            rows.append({
                "size": name, "method": method, "setting": "bf16 Adam",
                "rank": None if method == "full" else size.rank,
                "density": size.density if method == "sltrain" else None, "index_bits": 64,
                "params_M": ng.num_parameters / 1e6,
                "params_vs_full": ng.num_parameters / full_ng.num_parameters,
                "memory_no_grad_GB": ng.total / GB,
                "memory_no_grad_vs_full": ng.total / full_ng.total,
                "memory_GB": g.total / GB, "memory_vs_full": g.total / full_g.total,
                "index_GB": ng.buffers / GB,
            })
    seven = LLAMA_SIZES["7B"]
    full_g = static_memory_bytes(seven, "full", **_WITH_GRADS)
    variants = {"full": [(None, 8)], "lowrank": [(None, 8)],
                "sltrain": [(seven.density, 8), (seven.density, 4), (0.03, 8), (0.03, 4)]}
    for method, settings in variants.items():
        for density, index_bytes in settings:
            kw: dict[str, Any] = {"weight_bytes": 2, "optimizer": "adam8bit",
                                  "index_bytes": index_bytes}
            if density is not None:
                kw["density"] = density
            ng = static_memory_bytes(seven, method, grad_bytes=0, **kw)  # type: ignore[arg-type]
            pl = static_memory_bytes(seven, method, per_layer=True, **kw)  # type: ignore[arg-type]
            rows.append({
                "size": "7B", "method": method, "setting": "8-bit Adam, per-layer",
                "rank": None if method == "full" else seven.rank, "density": density,
                "index_bits": 8 * index_bytes if method == "sltrain" else None,
                "params_M": ng.num_parameters / 1e6,
                "params_vs_full": ng.num_parameters / full_g.num_parameters,
                "memory_no_grad_GB": ng.total / GB, "memory_no_grad_vs_full": ng.total / full_g.total,
                "memory_GB": pl.total / GB, "memory_vs_full": pl.total / full_g.total,
                "index_GB": ng.buffers / GB,
            })
    return rows


def paper_claims() -> list[dict[str, Any]]:
    """Each figure of the spec's paper-scale arithmetic against our number under the conventions
    that reproduce it (``reproduced``: within half a unit of the spec's last quoted digit, i.e. its
    own rounding), plus the nearest alternatives that do not reproduce it."""
    one = LLAMA_SIZES["1B"]
    seven = LLAMA_SIZES["7B"]
    f1, s1 = (static_memory_bytes(one, m, **_PAPER) for m in ("full", "sltrain"))
    f1g, s1g = (static_memory_bytes(one, m, **_WITH_GRADS) for m in ("full", "sltrain"))
    f7 = static_memory_bytes(seven, "full", **_WITH_GRADS).total
    eight = {"weight_bytes": 2, "optimizer": "adam8bit"}

    def s7(*, density: float, index_bytes: int, per_layer_grad: bool) -> int:
        grad = {"per_layer": True} if per_layer_grad else {"grad_bytes": 0}
        return static_memory_bytes(seven, "sltrain", density=density, index_bytes=index_bytes,
                                   **grad, **eight).total  # type: ignore[arg-type]

    paper7 = s7(density=seven.density, index_bytes=8, per_layer_grad=False)
    paper7_i32 = s7(density=seven.density, index_bytes=4, per_layer_grad=False)
    pl7 = s7(density=seven.density, index_bytes=8, per_layer_grad=True)
    pl7_i32 = s7(density=seven.density, index_bytes=4, per_layer_grad=True)
    d3 = s7(density=0.03, index_bytes=8, per_layer_grad=False)
    d3_i32 = s7(density=0.03, index_bytes=4, per_layer_grad=False)
    gib7 = f7 / 2**30

    def claim(name: str, spec: float, value: float, unit: str, tol: float, convention: str,
              primary: bool = True) -> dict[str, Any]:
        return {"claim": name, "spec": spec, "value": value, "unit": unit, "tolerance": tol,
                "reproduced": abs(value - spec) <= tol + 1e-12, "convention": convention,
                "primary": primary}

    no_grad = "bf16 weights + 2 bf16 Adam states, no gradients, int64 index"
    pl_none = "δ=0.05, r=1024, bf16 weights, 8-bit Adam (2 B/param), per-layer: no gradient memory"
    return [
        claim("1B SLTrain / full-rank parameters", 48, 100 * s1.num_parameters / f1.num_parameters,
              "%", 0.5, "r=512, δ=0.03; embeddings, lm_head, norms dense"),
        claim("1B SLTrain / full-rank memory", 52, 100 * s1.total / f1.total, "%", 0.5, no_grad),
        claim("1B SLTrain / full-rank memory", 52, 100 * s1g.total / f1g.total, "%", 0.5,
              "as above + bf16 gradients (all parameters)", primary=False),
        claim("7B full-rank bf16 Adam memory", 53.9, f7 / GB, "GB", 0.05,
              "bf16 weights + bf16 gradients + 2 bf16 Adam states = 8 B/param, GB = 1e9 B"),
        claim("7B full-rank bf16 Adam memory, GB read as GiB", 53.9, gib7, "GiB", 0.05,
              "as above with GiB = 2^30 B", primary=False),
        claim("7B SLTrain 8-bit per-layer memory", 15.2, paper7 / GB, "GB", 0.05, pl_none),
        claim("7B SLTrain memory reduction", 72, 100 * (1 - paper7 / f7), "%", 0.5,
              pl_none + "; vs 53.9 GB"),
        claim("7B SLTrain memory reduction, int32 index", 74, 100 * (1 - paper7_i32 / f7), "%", 0.5,
              pl_none.replace("per-layer", "int32 index, per-layer")),
        claim("7B SLTrain 8-bit per-layer memory", 15.2, pl7 / GB, "GB", 0.05,
              "δ=0.05, per-layer counting the largest transient gradient (bf16 embedding)",
              primary=False),
        claim("7B SLTrain memory reduction", 72, 100 * (1 - pl7 / f7), "%", 0.5,
              "δ=0.05, largest transient gradient", primary=False),
        claim("7B SLTrain memory reduction, int32 index", 74, 100 * (1 - pl7_i32 / f7), "%", 0.5,
              "δ=0.05, largest transient gradient", primary=False),
        claim("7B SLTrain 8-bit per-layer memory", 15.2, d3 / GB, "GB", 0.05,
              "δ=0.03 (not the authors' 7B setting), no gradient memory", primary=False),
        claim("7B SLTrain memory reduction", 72, 100 * (1 - d3 / f7), "%", 0.5,
              "δ=0.03, no gradient memory", primary=False),
        claim("7B SLTrain memory reduction, int32 index", 74, 100 * (1 - d3_i32 / f7), "%", 0.5,
              "δ=0.03, no gradient memory", primary=False),
    ]


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def paper_scale_markdown() -> str:
    """:func:`paper_scale_table` and :func:`paper_claims` as three Markdown tables."""
    rows = paper_scale_table()
    lines = ["| size | method | r | δ | params (M) | params / full | weights + states (GB) "
             "| / full | + gradients (GB) | / full | index int64 (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["setting"] == "bf16 Adam"):
        lines.append(
            f"| {r['size']} | {r['method']} | {_fmt(r['rank'], 'd')} | {_fmt(r['density'], 'g')} "
            f"| {r['params_M']:.1f} | {100 * r['params_vs_full']:.1f}% "
            f"| {r['memory_no_grad_GB']:.3f} | {100 * r['memory_no_grad_vs_full']:.1f}% "
            f"| {r['memory_GB']:.3f} | {100 * r['memory_vs_full']:.1f}% | {r['index_GB']:.3f} |")
    ref = next(r for r in rows if r["size"] == "7B" and r["method"] == "full"
               and r["setting"] == "bf16 Adam")["memory_GB"]
    lines += ["", f"| 7B, 8-bit Adam, per-layer | r | δ | index | params (M) "
              f"| no gradient (GB) | less than {ref:.1f} GB | largest gradient (GB) | less |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["setting"] == "8-bit Adam, per-layer"):
        lines.append(
            f"| {r['method']} | {_fmt(r['rank'], 'd')} | {_fmt(r['density'], 'g')} "
            f"| {'–' if r['index_bits'] is None else 'int' + str(r['index_bits'])} "
            f"| {r['params_M']:.1f} | {r['memory_no_grad_GB']:.3f} "
            f"| {100 * (1 - r['memory_no_grad_vs_full']):.1f}% | {r['memory_GB']:.3f} "
            f"| {100 * (1 - r['memory_vs_full']):.1f}% |")
    lines += ["", "| figure | spec | ours | tolerance | reproduced | conventions |",
              "|---|---|---|---|---|---|"]
    for c in paper_claims():
        mark = ("yes" if c["reproduced"] else "**no**") + ("" if c["primary"] else " (alt.)")
        lines.append(f"| {c['claim']} | {c['spec']:g} {c['unit']} | {c['value']:.2f} {c['unit']} "
                     f"| ±{c['tolerance']:g} | {mark} | {c['convention']} |")
    return "\n".join(lines) + "\n"
