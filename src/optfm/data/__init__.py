"""Data: sklearn digits (flat and on a noisy canvas), the Python-stdlib text corpus, tokenizers."""

from optfm.data.corpus import (
    TextCorpus,
    cache_dir,
    hash_split,
    python_stdlib_corpus,
    sample_lm_batch,
    stdlib_files,
)
from optfm.data.digits import DataSplit, load_digits_canvas, load_digits_split, make_digits_canvas
from optfm.data.tokenizers import ByteTokenizer, build_word_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataSplit",
    "TextCorpus",
    "build_word_tokenizer",
    "cache_dir",
    "hash_split",
    "load_digits_canvas",
    "load_digits_split",
    "make_digits_canvas",
    "python_stdlib_corpus",
    "sample_lm_batch",
    "stdlib_files",
]
