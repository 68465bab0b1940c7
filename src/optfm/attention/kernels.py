r"""Softmax and Gaussian attention kernels, and a drop-in multi-head attention module.

Paper: "Unraveling the Gradient Descent Dynamics of Transformers" (Song et al., NeurIPS 2024,
arXiv 2411.07538). No official code is public; the Gaussian kernel follows Skyformer (Chen et al.,
2021). See ``specs/attention.md``.

Notation: queries ``q`` of shape ``(..., n, d)``, keys ``k`` of shape ``(..., m, d)``, the
bandwidth factor ``scale`` (default ``1 / √d``) and the score matrix ``S`` of shape ``(..., n, m)``::

    softmax:                     S_jl = exp(q_j·k_l·scale) / Σ_l' exp(q_j·k_l'·scale)
    gaussian:                    S_jl = exp(-‖q_j - k_l‖² · scale / 2)      (= exp(-‖q_j - k_l‖²/(2√d)))
    gaussian, normalize_rows:    S_jl = softmax_l(-‖q_j - k_l‖² · scale / 2)
                                      = softmax_l(q_j·k_l·scale - ‖k_l‖² · scale / 2)

The Gaussian kernel is computed in the log domain, ``logits = -sq · scale / 2`` with the squared
distance expanded as ``sq = ‖q‖² + ‖k‖² - 2 q·kᵀ`` and clamped at ``sq >= 0`` (rounding can make it
slightly negative when ``q_j ≈ k_l``). Unnormalised rows are not stochastic: their sums grow with
``m`` and shrink towards 0 when queries and keys are far apart. With ``normalize_rows=True`` the
``‖q_j‖²`` term cancels within a row and the kernel is softmax attention with a key-norm penalty.

Masks: ``mask`` is boolean (``True`` = the key takes part, the convention of
``torch.nn.functional.scaled_dot_product_attention``) or an additive float mask (added to the
logits; ``-inf`` removes a key). Removed entries are exactly 0 in ``S``; a row whose keys are all
removed is all zeros (never NaN) for every kernel. For the unnormalised Gaussian kernel a finite
additive mask value ``a`` multiplies the entry by ``exp(a)``.

Underflow: an unnormalised Gaussian row whose kept entries are all at or below machine epsilon
(every entry ``<= torch.finfo(dtype).eps``: ‖q_j - k_l‖²·scale/2 above ~36 in float64, ~16 in
float32) gives a numerically zero output for that query and no usable gradient through it, whether
or not the entries reached exact zero (GD stalled with gradient norms ~1e-30 at rows summing to
~1e-18, which an exact-zero test missed). :class:`KernelAttention` counts such rows
on every forward (``last_underflow_rows``) and warns (``on_underflow="warn"``, the default), raises
:class:`AttentionUnderflowError` (``"raise"``) or stays quiet (``"ignore"``, no device sync).

:class:`KernelAttention` (input ``x`` of shape ``(B, n, D)``, H heads of size ``d``, values of size
``d_v``)::

    q_h = x W_Q^h,  k_h = x W_K^h,  v_h = x W_V^h          (W_Q, W_K: D -> H·d; W_V: D -> H·d_v)
    out = concat_h( dropout(S(q_h, k_h)) v_h ) W_O        (W_O: H·d_v -> D; omitted if out_proj=False)

``W_Q``, ``W_K``, ``W_V`` and ``W_O`` are ``nn.Linear`` modules (weight of shape ``(out, in)``, so
the paper's matrix ``W_Q ∈ R^{D×H·d}`` is ``W_Q.weight.T``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KERNELS",
    "ON_UNDERFLOW",
    "AttentionUnderflowError",
    "KernelAttention",
    "attention_scores",
    "count_underflow_rows",
]

KERNELS = ("softmax", "gaussian")
ON_UNDERFLOW = ("warn", "raise", "ignore")


class AttentionUnderflowError(RuntimeError):
    """Raised by :class:`KernelAttention` (``on_underflow="raise"``) when unnormalised Gaussian
    attention rows underflow to zero."""


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _check_scale(scale: float | None) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
        math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be None (= 1/sqrt(head_dim)) or a finite number > 0, got {scale!r}")
    return float(scale)


def _check_pos_int(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dimension that maps an all ``-inf`` row to zeros (not NaN)."""
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(logits - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool or float tensor or None, got {type(mask).__name__}")
    try:
        shape = torch.broadcast_shapes(mask.shape, logits.shape)
    except RuntimeError:
        shape = None
    if shape != logits.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} must broadcast to the scores' shape "
            f"{tuple(logits.shape)} (..., n, m)"
        )
    mask = mask.to(logits.device)
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    if mask.dtype.is_floating_point:
        return logits + mask.to(logits.dtype)
    raise ValueError(f"mask must be bool (True = keep) or floating (additive), got dtype {mask.dtype}")


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    kernel: str,
    scale: float | None = None,
    normalize_rows: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score matrix ``S`` of shape ``(..., n, m)`` for queries ``q (..., n, d)`` and keys
    ``k (..., m, d)`` (equations in the module docstring).

    ``kernel`` is ``"softmax"`` or ``"gaussian"``; ``scale`` defaults to ``1/√d``.
    ``normalize_rows`` applies to the Gaussian kernel (softmax rows are always normalised).
    ``mask``: bool (``True`` = keep) or additive float, broadcastable to ``(..., n, m)``;
    removed entries are exactly 0 and fully removed rows are all zeros.
    """
    _check_kernel(kernel)
    scale = _check_scale(scale)
    if q.ndim < 2 or k.ndim < 2:
        raise ValueError(
            f"q and k must have shape (..., n, d) and (..., m, d), got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share the last (head) dimension, got {q.shape[-1]} and {k.shape[-1]}"
        )
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qk = q @ k.transpose(-2, -1)
    # without a mask no row can be fully removed: the fused softmax is exact and faster
    softmax = _masked_softmax if mask is not None else lambda t: torch.softmax(t, dim=-1)
    if kernel == "softmax":
        return softmax(_apply_mask(qk * scale, mask))
    q_sq = (q * q).sum(dim=-1, keepdim=True)  # (..., n, 1)
    k_sq = (k * k).sum(dim=-1).unsqueeze(-2)  # (..., 1, m)
    sq_dist = (q_sq + k_sq - 2.0 * qk).clamp(min=0.0)
    logits = _apply_mask(sq_dist * (-0.5 * scale), mask)
    if normalize_rows:
        return softmax(logits)
    return torch.exp(logits)


def count_underflow_rows(scores: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Number of rows of ``scores (..., n, m)`` that vanished: every kept entry is
    ``<= torch.finfo(dtype).eps`` (a row of unnormalised Gaussian weights that small carries no
    signal and no gradient at working precision, whether or not it reached exact zero) while the
    row has at least one kept key.

    ``mask`` is the mask passed to :func:`attention_scores` (bool ``True`` = keep, or additive
    float where ``-inf`` removes a key); rows with no kept key are fully masked, not underflowed.
    """
    eps = torch.finfo(scores.dtype).eps
    dead = (scores.detach() <= eps).all(dim=-1)
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask > float("-inf")
        keep = torch.broadcast_to(keep.to(scores.device), scores.shape)
        dead = dead & keep.any(dim=-1)
    return int(dead.sum())


class KernelAttention(nn.Module):
    """Multi-head self-attention with a softmax or Gaussian kernel (module docstring).

    Parameters: ``embed_dim`` D (input and, with ``out_proj``, output size); ``num_heads`` H;
    ``kernel`` ``"softmax"`` | ``"gaussian"``; ``normalize_rows`` (Gaussian only: row softmax of the
    Gaussian logits); ``head_dim`` d (default ``D // H``, which then must divide); ``value_dim``
    d_v (default d); ``out_proj`` (``W_O``; without it ``W_O`` is None and the output has
    ``H·d_v`` features); ``bias`` on every projection; ``scale`` (default ``1/√d``);
    ``dropout`` on the attention weights in training mode; ``on_underflow`` ``"warn"`` | ``"raise"``
    | ``"ignore"`` for vanished unnormalised Gaussian rows (counted in ``last_underflow_rows``,
    out of ``last_checked_rows``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        *,
        kernel: str = "softmax",
        normalize_rows: bool = False,
        head_dim: int | None = None,
        value_dim: int | None = None,
        out_proj: bool = True,
        bias: bool = False,
        scale: float | None = None,
        dropout: float = 0.0,
        on_underflow: str = "warn",
    ) -> None:
        super().__init__()
        _check_pos_int("embed_dim", embed_dim)
        _check_pos_int("num_heads", num_heads)
        _check_pos_int("head_dim", head_dim, allow_none=True)
        _check_pos_int("value_dim", value_dim, allow_none=True)
        _check_kernel(kernel)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                    "when head_dim is None; pass head_dim explicitly otherwise"
                )
            head_dim = embed_dim // num_heads
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if on_underflow not in ON_UNDERFLOW:
            raise ValueError(f"on_underflow must be one of {ON_UNDERFLOW}, got {on_underflow!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.kernel, self.normalize_rows = kernel, bool(normalize_rows)
        self.scale = _check_scale(scale)
        self.dropout = float(dropout)
        self.on_underflow = on_underflow
        self.W_Q = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.W_K = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.W_V = nn.Linear(embed_dim, num_heads * self.value_dim, bias=bias)
        self.W_O = (
            nn.Linear(num_heads * self.value_dim, embed_dim, bias=bias) if out_proj else None
        )
        self.last_underflow_rows = 0
        self.last_checked_rows = 0

    @property
    def output_dim(self) -> int:
        """Feature size of the output: ``embed_dim`` with ``W_O``, else ``num_heads * value_dim``."""
        return self.embed_dim if self.W_O is not None else self.num_heads * self.value_dim

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel!r}, normalize_rows={self.normalize_rows}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}"
        )

    def _build_mask(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        b, n, _ = x.shape
        mask = None
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor) or not (
                attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point
            ):
                raise ValueError("attn_mask must be a bool (True = keep) or float (additive) tensor")
            if attn_mask.ndim == 2:
                ok = attn_mask.shape == (n, n)
            elif attn_mask.ndim == 3:
                ok = attn_mask.shape in ((b, n, n), (1, n, n))
                attn_mask = attn_mask.unsqueeze(1)
            elif attn_mask.ndim == 4:
                ok = attn_mask.shape[0] in (1, b) and attn_mask.shape[1] in (1, self.num_heads)
                ok = ok and attn_mask.shape[2:] == (n, n)
            else:
                ok = False
            if not ok:
                raise ValueError(
                    f"attn_mask must have shape (n, n), (B, n, n) or (B, H, n, n) with n={n}, "
                    f"B={b}, H={self.num_heads}; got {tuple(attn_mask.shape)}"
                )
            mask = attn_mask.to(x.device)
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise ValueError("key_padding_mask must be a bool tensor (True = padding)")
            if key_padding_mask.shape != (b, n):
                raise ValueError(
                    f"key_padding_mask must have shape (B, n) = {(b, n)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            pad = key_padding_mask.to(x.device)[:, None, None, :]  # (B, 1, 1, n)
            if mask is None:
                mask = ~pad
            elif mask.dtype == torch.bool:
                mask = mask & ~pad
            else:
                mask = mask.to(x.dtype).masked_fill(pad, float("-inf"))
        return mask

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_scores: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attention of ``x (B, n, D)`` -> ``(B, n, output_dim)``.

        ``key_padding_mask (B, n)`` bool, ``True`` = padding: that key is ignored (the convention
        of ``nn.MultiheadAttention``). ``attn_mask`` of shape ``(n, n)``, ``(B, n, n)`` or
        ``(B, H, n, n)``: bool with ``True`` = the query may attend to the key (the convention of
        ``F.scaled_dot_product_attention``, the opposite of ``nn.MultiheadAttention``'s bool
        ``attn_mask``) or additive float. Both masks combine. With ``return_scores`` also returns
        ``S (B, H, n, n)`` (before dropout).
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, n, {self.embed_dim}), got {shape}")
        b, n, _ = x.shape
        h = self.num_heads
        mask = self._build_mask(x, key_padding_mask, attn_mask)
        q = self.W_Q(x).view(b, n, h, self.head_dim).transpose(1, 2)
        k = self.W_K(x).view(b, n, h, self.head_dim).transpose(1, 2)
        v = self.W_V(x).view(b, n, h, self.value_dim).transpose(1, 2)
        s = attention_scores(
            q, k, kernel=self.kernel, scale=self.scale, normalize_rows=self.normalize_rows, mask=mask
        )
        if self.kernel == "gaussian" and not self.normalize_rows and self.on_underflow != "ignore":
            self._check_underflow(s, mask)
        weights = F.dropout(s, p=self.dropout, training=self.training) if self.dropout else s
        out = (weights @ v).transpose(1, 2).reshape(b, n, h * self.value_dim)
        if self.W_O is not None:
            out = self.W_O(out)
        return (out, s) if return_scores else out

    def _check_underflow(self, s: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.last_underflow_rows = count_underflow_rows(s, mask)
        self.last_checked_rows = s.shape[:-1].numel()
        if not self.last_underflow_rows:
            return
        msg = (
            f"KernelAttention: {self.last_underflow_rows} of {self.last_checked_rows} Gaussian "
            "attention rows vanished (every exp(-‖q-k‖²·scale/2) <= machine epsilon), so "
            "those tokens get a zero output and no gradient. Use a smaller init of W_Q/W_K, a "
            "smaller scale (wider bandwidth), or normalize_rows=True."
        )
        if self.on_underflow == "raise":
            raise AttentionUnderflowError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
