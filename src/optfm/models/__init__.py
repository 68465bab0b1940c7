"""Tiny model factories built from config classes (no hub downloads), and parameter counting.

Every factory builds a real ``transformers``/``diffusers``/``torch.nn`` model from its config
class, so the same code runs unchanged on full-size models loaded by the user.
"""

from optfm.models.factories import (
    count_parameters,
    mlp,
    tiny_gpt2,
    tiny_llama,
    tiny_sequence_classifier,
    tiny_unet2d,
)

__all__ = [
    "count_parameters",
    "mlp",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_sequence_classifier",
    "tiny_unet2d",
]
