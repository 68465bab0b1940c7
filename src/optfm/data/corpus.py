"""A real text corpus available on every machine: the running Python's standard-library sources.

Every ``.py`` file under the standard library directory, except test suites (any directory named
``test``, ``tests`` or ``idle_test``), ``idlelib``, ``site-packages`` and caches. Files are split
into train/validation by a hash of their POSIX relative path, so the split is stable across runs
and machines, and no file lands in both splits. Each file's bytes are followed by an end-of-document
token (256), giving byte-level tokens with a vocabulary of 257.

The built corpus is cached as ``.npy`` arrays (no pickle) under ``$OPTFM_CACHE`` (default
``~/.cache/optfm``), keyed by the Python version, the file list (names, sizes, mtimes) and the split
fraction.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from optfm.data.tokenizers import ByteTokenizer
from optfm.training.io import atomic_write_bytes, atomic_write_json, read_json

__all__ = [
    "EXCLUDED_DIRS",
    "TextCorpus",
    "cache_dir",
    "hash_split",
    "python_stdlib_corpus",
    "sample_lm_batch",
    "stdlib_files",
]

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "__pycache__"})
_CORPUS_VERSION = 1


def cache_dir() -> Path:
    """Where optfm caches built data and trained base models (``$OPTFM_CACHE`` or ``~/.cache/optfm``)."""
    return Path(os.environ.get("OPTFM_CACHE", Path.home() / ".cache" / "optfm"))


def hash_split(relpath: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for a file, decided by SHA-256 of its POSIX relative path."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def stdlib_files(root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Sorted ``(posix relative path, absolute path)`` of the corpus files under ``root``
    (default: this interpreter's standard library)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    out.sort()
    return out


@dataclass
class TextCorpus:
    """Byte-level token streams (uint16; 256 = end of document) and the files in each split."""

    train: np.ndarray
    val: np.ndarray
    train_files: list[str]
    val_files: list[str]
    vocab_size: int = ByteTokenizer.vocab_size

    def tensor(self, split: str) -> torch.Tensor:
        """The token stream of ``split`` (``"train"`` or ``"val"``) as an int64 tensor."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return torch.from_numpy(np.asarray(getattr(self, split), dtype=np.int64))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def python_stdlib_corpus(*, val_fraction: float = 0.1, root: str | os.PathLike | None = None,
                         cache: bool = True) -> TextCorpus:
    """Build (or load from cache) the standard-library byte corpus."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files found under {root or sysconfig.get_paths()['stdlib']}")
    fingerprint = hashlib.sha256()
    fingerprint.update(f"v{_CORPUS_VERSION}|{sys.version}|{val_fraction!r}".encode())
    for rel, p in files:
        st = p.stat()
        fingerprint.update(f"|{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    key = fingerprint.hexdigest()[:16]
    where = cache_dir() / "corpus" / f"stdlib-{key}"
    manifest_path = where / "manifest.json"
    if cache and manifest_path.is_file():
        m = read_json(manifest_path)
        return TextCorpus(
            train=np.load(where / "train.npy", allow_pickle=False, mmap_mode="r"),
            val=np.load(where / "val.npy", allow_pickle=False, mmap_mode="r"),
            train_files=m["train_files"], val_files=m["val_files"],
        )

    eos = np.array([ByteTokenizer.eos_token_id], dtype=np.uint16)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    for rel, p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        split = hash_split(rel, val_fraction)
        parts[split].append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16))
        parts[split].append(eos)
        names[split].append(rel)
    if not names["train"] or not names["val"]:
        raise ValueError(f"val_fraction={val_fraction} leaves a split empty ({len(files)} files)")
    train = np.concatenate(parts["train"])
    val = np.concatenate(parts["val"])
    if cache:
        atomic_write_bytes(where / "train.npy", _npy_bytes(train))
        atomic_write_bytes(where / "val.npy", _npy_bytes(val))
        # Written last: its presence marks a complete cache entry.
        atomic_write_json(manifest_path, {
            "train_files": names["train"], "val_files": names["val"],
            "train_tokens": len(train), "val_tokens": len(val),
            "python": sys.version, "val_fraction": val_fraction,
        })
    return TextCorpus(train=train, val=val, train_files=names["train"], val_files=names["val"])


def sample_lm_batch(tokens: torch.Tensor | np.ndarray, batch_size: int, block_size: int, *,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for next-token prediction: ``x = t[i:i+L]``, ``y = t[i+1:i+L+1]``.

    ``tokens`` may be a tensor or a NumPy array (e.g. the corpus's uint16 memory map): only the
    sampled windows are converted to int64, never the whole stream."""
    n = len(tokens)
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if n <= block_size:
        raise ValueError(f"token stream of length {n} is too short for block_size={block_size}")
    starts = torch.randint(0, n - block_size, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size + 1)[None, :]
    if torch.is_tensor(tokens):
        w = tokens[idx].long()
    else:
        w = torch.from_numpy(np.asarray(tokens)[idx.numpy()].astype(np.int64))
    return w[:, :-1], w[:, 1:]
