r"""A small pre-LN Transformer encoder for sequence classification built on :class:`KernelAttention`.

Used for the real-task check of ``specs/attention.md`` (ListOps-style classification with a
softmax vs a Gaussian attention kernel). For token ids ``input_ids (B, L)`` with padding id
``pad_id`` (``keep`` = the non-pad positions)::

    h_0 = E_tok[input_ids] + E_pos[0..L-1]                (pooling="cls": a learned CLS vector at
                                                           position 0 in front of the tokens)
    h_l = h_{l-1} + Dropout(Attn_l(LN(h_{l-1}); pad keys masked))
    h_l = h_l + Dropout(W_2 Dropout(GELU(W_1 LN(h_l))))
    z   = mean_{j in keep} LN(h_L)_j        (pooling="mean")   or   LN(h_L)_CLS   (pooling="cls")
    logits = W_head z

Pad tokens never act as keys, so appending pad tokens at the end of a sequence leaves the logits
unchanged (positions of the real tokens do not move). Padding is expected on the right; masking
is correct anywhere, but left padding shifts the position embeddings of the real tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from optfm.attention.kernels import KernelAttention, _check_kernel, _check_pos_int

__all__ = ["EncoderBlock", "TransformerClassifier"]

POOLINGS = ("mean", "cls")


class EncoderBlock(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` then ``x + FFN(LN(x))`` (FFN = Linear-GELU-Linear)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        kernel: str = "softmax",
        normalize_rows: bool = False,
        dropout: float = 0.0,
        on_underflow: str = "warn",
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = KernelAttention(
            d_model, num_heads, kernel=kernel, normalize_rows=normalize_rows, bias=True,
            dropout=dropout, on_underflow=on_underflow,
        )
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_padding_mask=key_padding_mask))
        return x + self.drop(self.ff(self.ln2(x)))


class TransformerClassifier(nn.Module):
    """Token ids ``(B, L)`` -> class logits ``(B, num_classes)`` (equations in the module docstring).

    ``kernel``/``normalize_rows`` select the attention kernel of every block; ``d_model`` must be
    divisible by ``num_heads``; sequences may be at most ``max_len`` tokens long; ``pad_id`` marks
    padding; ``pooling`` is ``"mean"`` (mean over non-pad tokens) or ``"cls"``. ``on_underflow`` is
    passed to every :class:`KernelAttention` (``"warn"`` | ``"raise"`` | ``"ignore"``).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        max_len: int = 512,
        kernel: str = "softmax",
        normalize_rows: bool = False,
        dropout: float = 0.0,
        pad_id: int = 0,
        pooling: str = "mean",
        on_underflow: str = "warn",
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("num_heads", num_heads), ("num_layers", num_layers),
                            ("dim_feedforward", dim_feedforward), ("max_len", max_len)):
            _check_pos_int(name, value)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        _check_kernel(kernel)
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be an int in [0, {vocab_size - 1}], got {pad_id!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self.max_len, self.pad_id, self.pooling = max_len, pad_id, pooling
        self.kernel, self.normalize_rows = kernel, bool(normalize_rows)
        extra = 1 if pooling == "cls" else 0
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len + extra, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if extra else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, num_heads, dim_feedforward, kernel=kernel,
                         normalize_rows=normalize_rows, dropout=dropout, on_underflow=on_underflow)
            for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for ``input_ids (B, L)`` (int64, right-padded with ``pad_id``)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
            raise ValueError(f"input_ids must be a (B, L) integer tensor, got shape {shape}")
        dt = input_ids.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise ValueError(f"input_ids must be an integer (long) tensor, got dtype {input_ids.dtype}")
        b, length = input_ids.shape
        if b == 0 or length == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {(b, length)}")
        if length > self.max_len:
            raise ValueError(f"input_ids has length {length} > max_len ({self.max_len})")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"input_ids values must lie in [0, {self.vocab_size - 1}]")
        input_ids = input_ids.long()
        pad = input_ids == self.pad_id  # (B, L), True = padding
        if self.pooling == "mean" and bool(pad.all(dim=1).any()):
            raise ValueError("every sequence needs at least one non-pad token (pooling='mean')")
        device = input_ids.device
        h = self.tok_emb(input_ids)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
            pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=device), pad], dim=1)
        h = self.drop(h + self.pos_emb(torch.arange(h.shape[1], device=device)))
        for block in self.blocks:
            h = block(h, key_padding_mask=pad)
        h = self.ln_f(h)
        if self.pooling == "cls":
            z = h[:, 0]
        else:
            keep = (~pad).to(h.dtype).unsqueeze(-1)
            z = (h * keep).sum(dim=1) / keep.sum(dim=1)
        return self.head(z)
