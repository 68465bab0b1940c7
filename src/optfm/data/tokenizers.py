"""Tokenizers: byte-level (vocabulary 257) and a word-level helper built with ``tokenizers``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["ByteTokenizer", "build_word_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus an end-of-document token 256 (vocabulary 257)."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [*ids, self.eos_token_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})")
            if i != self.eos_token_id:
                data.append(i)
        return data.decode("utf-8", errors="replace")


def build_word_tokenizer(texts: Iterable[str], *, vocab_size: int | None = None,
                         min_frequency: int = 1, lowercase: bool = True,
                         special_tokens: Sequence[str] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]"),
                         model_max_length: int = 512):
    """Train a word-level tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Words are split on whitespace and punctuation (``Whitespace`` pre-tokenizer); unknown words map
    to ``[UNK]``. The special tokens take ids 0..len(special_tokens)-1 in the order given, and the
    first four are used as pad, unk, bos and eos. The result works with ``transformers`` models
    (``tok(batch, padding=True, return_tensors="pt")``) and ``save_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) < 4:
        raise ValueError("special_tokens must name at least pad, unk, bos and eos tokens")
    if vocab_size is not None and vocab_size <= len(special_tokens):
        raise ValueError(f"vocab_size must exceed the {len(special_tokens)} special tokens, got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    pad, unk, bos, eos = special_tokens[:4]
    tok = Tokenizer(models.WordLevel(unk_token=unk))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size if vocab_size is not None else 1 << 30,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
        model_max_length=model_max_length,
    )
