"""Factories for the small models used by tests and reproductions.

Parameter counts in the docstrings are for the default arguments (checked by the tests).
Keyword overrides go straight to the config class, so any field of the config can be changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "count_parameters",
    "mlp",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_sequence_classifier",
    "tiny_unet2d",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def mlp(in_features: int = 64, hidden: int | Sequence[int] = (128,), out_features: int = 10, *,
        activation: str = "tanh", generator: torch.Generator | None = None) -> nn.Sequential:
    """A multilayer perceptron ``in -> hidden... -> out``.

    Default: 64-128-10 with tanh, the digits model of the privacy experiments: 9,610 parameters.
    With ``generator``, weights are drawn from it (PyTorch's default ``nn.Linear`` initialisation,
    U(±1/sqrt(fan_in))), so two calls with equally seeded generators give identical models.
    """
    hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        _positive(name, v)
    for h in hidden:
        _positive("hidden", h)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    dims = (in_features, *hidden, out_features)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(_ACTIVATIONS[activation]())
    model = nn.Sequential(*layers)
    if generator is not None:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features**0.5
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.uniform_(-bound, bound, generator=generator)
    return model


def tiny_llama(*, vocab_size: int = 257, hidden_size: int = 128, intermediate_size: int = 352,
               num_hidden_layers: int = 4, num_attention_heads: int = 4,
               max_position_embeddings: int = 512, tie_word_embeddings: bool = False,
               eos_token_id: int | None = None, **overrides: Any):
    """A ``LlamaForCausalLM`` from ``LlamaConfig``; defaults are the byte-level pretraining model
    of specs/pretraining.md (quick profile): 869,760 parameters (untied embeddings).

    ``eos_token_id`` defaults to the last id (256 = :class:`~optfm.data.ByteTokenizer`'s end of
    document for the default byte vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=overrides.pop("num_key_value_heads", num_attention_heads),
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=overrides.pop("bos_token_id", None),
        eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
        **overrides,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(*, vocab_size: int = 257, n_embd: int = 128, n_layer: int = 4, n_head: int = 4,
              n_positions: int = 512, **overrides: Any):
    """A ``GPT2LMHeadModel`` from ``GPT2Config`` (embeddings tied to the LM head, as in GPT-2):
    891,776 parameters. Like GPT-2, bos = eos = the last id unless overridden."""
    from transformers import GPT2Config, GPT2LMHeadModel

    overrides.setdefault("bos_token_id", vocab_size - 1)
    overrides.setdefault("eos_token_id", vocab_size - 1)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     n_positions=n_positions, **overrides)
    return GPT2LMHeadModel(cfg)


def tiny_sequence_classifier(*, arch: str = "bert", num_labels: int = 2, vocab_size: int = 1000,
                             hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                             max_position_embeddings: int = 128, pad_token_id: int = 0,
                             **overrides: Any):
    """A sequence classifier from a config class: ``arch="bert"`` (``BertForSequenceClassification``,
    default: 176,706 parameters) or ``arch="gpt2"`` (``GPT2ForSequenceClassification``, 172,416
    parameters; ``pad_token_id`` is set so padded batches pool the last real token)."""
    if arch == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         intermediate_size=4 * hidden_size,
                         max_position_embeddings=max_position_embeddings,
                         num_labels=num_labels, pad_token_id=pad_token_id, **overrides)
        return BertForSequenceClassification(cfg)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification

        overrides.setdefault("bos_token_id", vocab_size - 1)
        overrides.setdefault("eos_token_id", vocab_size - 1)
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                         n_head=num_heads, n_positions=max_position_embeddings,
                         num_labels=num_labels, pad_token_id=pad_token_id, **overrides)
        return GPT2ForSequenceClassification(cfg)
    raise ValueError(f"arch must be 'bert' or 'gpt2', got {arch!r}")


def tiny_unet2d(*, sample_size: int = 8, in_channels: int = 1, out_channels: int = 1,
                block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                norm_num_groups: int = 8, **overrides: Any):
    """An unconditional ``diffusers.UNet2DModel`` for 8x8 single-channel images (digits):
    one plain and one attention resolution level: 701,345 parameters."""
    from diffusers import UNet2DModel

    boc = tuple(block_out_channels)
    if len(boc) != 2:
        raise ValueError(f"block_out_channels must have 2 entries (one per level), got {boc}")
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
        block_out_channels=boc, layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=norm_num_groups, **overrides,
    )
