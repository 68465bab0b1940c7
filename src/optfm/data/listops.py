"""ListOps (Nangia & Bowman 2018; the Long Range Arena task), generated locally.

ListOps is synthetic by construction: the LRA benchmark's own data is the output of a small
generator script (``lra_benchmarks/data/listops.py``), which this module reproduces. An expression
is a tree of operators over the digits 0-9, written in prefix form with the operator token carrying
its opening bracket::

    [MAX 2 9 [MIN 4 7 ] 0 ]          -> 9
    [SM [MED 1 8 ] 3 [MAX 0 2 ] ]    -> (4 + 3 + 2) mod 10 = 9

and the label is its value, a digit (10 classes).

Operators (``OPERATORS``)
-------------------------
- ``[MAX``, ``[MIN``: the largest / smallest argument.
- ``[MED``: the median, as LRA computes it: ``int(np.median(args))``. For an even number of
  arguments that is the *floor of the mean of the two middle values* (``[MED 2 5 ]`` -> 3, not the
  lower median 2); for an odd number it is the middle value.
- ``[SM``: the sum modulo 10.

LRA's generator also defines ``[FIRST`` and ``[LAST`` but does not use them; neither does this one.

Generation (:func:`generate_listops`)
-------------------------------------
As in LRA: a node at depth ``d < max_depth`` is an operator with probability ``VALUE_P = 0.25``
(else a uniform digit); a node at depth ``max_depth`` is always a digit; an operator draws its
number of arguments uniformly from ``2 .. max_args`` and its operator uniformly from the four. The
root is at depth 1, so expressions nest at most ``max_depth - 1`` operators deep. The *length* of an
expression is its number of tokens (digits, operator tokens and ``]``; an operator adds 2), and
expressions outside ``min_length <= length <= max_length`` are rejected and redrawn; duplicates are
dropped. Two deliberate differences from the LRA script, neither of which changes the distribution
of the accepted expressions: the root is always an operator (LRA draws a bare digit 75 % of the
time and its length bound rejects it; a bare digit is rejected here for any ``min_length >= 2`` as
well), and a draw is abandoned as soon as it passes ``max_length`` (LRA finishes the tree and then
rejects it). LRA's bounds are strict (``500 < length < 2000``); here they are inclusive, so LRA's
setting is ``min_length=501, max_length=1999`` (``LRA_LISTOPS``). LRA writes the expressions with
parentheses around every partial application (``( ( [MAX 2 ) 9 ) ] )``) and its input pipeline
deletes them; this module writes the expressions without them and :func:`load_listops_tsv` deletes
them when reading LRA's files.

The defaults (``max_depth=6, max_args=5, min_length=10, max_length=100``) make short sequences for
a small encoder on a CPU: at ``seed=0``, 5000 expressions have 10-100 tokens (median 24, mean 29)
and nest 2-5 operators deep, and take about 0.2 s to generate. The labels are roughly balanced
but not uniform: ``0`` and ``9`` are the most frequent classes (11.5 % and 12.2 %; the others 8.8-
10 %) because MAX and MIN favour the extremes; with ``LRA_LISTOPS`` the skew is larger (about 15 %
each for 0 and 9). Report the majority-class baseline (:meth:`ListOpsSplits.majority_accuracy`)
next to accuracy.

Tokenization (:class:`ListOpsTokenizer`)
----------------------------------------
A fixed vocabulary of 17 tokens: ``<pad>`` (id 0), ``<cls>`` (1), the digits ``0``-``9`` (ids 2-11),
``[MAX [MIN [MED [SM`` (12-15) and ``]`` (16). ``encode`` splits on whitespace; ``pad`` /
``encode_batch`` right-pad a batch with 0 into a ``torch.LongTensor`` (mask = ``ids != 0``).
Sequences are never truncated (a truncated expression has another value): a ``length`` shorter
than a sequence is an error. LRA adds no ``<cls>`` token (its models mean-pool); pass
``add_cls=True`` to put one first.

Randomness only through the ``seed`` argument (Python's ``random.Random``, which is an order of
magnitude faster than numpy for the scalar draws a tree needs): the same arguments give the same
data. Pure Python; torch is imported only to build tensors.
"""

from __future__ import annotations

import csv
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optfm.data._checks import check_int as _check_int

__all__ = [
    "END",
    "LRA_LISTOPS",
    "OPERATORS",
    "VALUE_P",
    "ListOpsSplits",
    "ListOpsTokenizer",
    "evaluate_listops",
    "generate_listops",
    "listops_depth",
    "load_listops_tsv",
    "make_listops_splits",
]

OPERATORS: tuple[str, ...] = ("[MAX", "[MIN", "[MED", "[SM")
"""Operator tokens (each includes its opening bracket), in vocabulary order."""

END = "]"
"""The token that closes an operator."""

VALUE_P = 0.25
"""LRA's probability that a node above ``max_depth`` is an operator (its name, its value)."""

LRA_LISTOPS: dict[str, int] = {"max_depth": 10, "max_args": 10, "min_length": 501,
                               "max_length": 1999}
"""The LRA setting (96k/2k/2k train/val/test there), with this module's inclusive length bounds."""

_DIGITS = tuple(str(d) for d in range(10))
_MAX_STALLED_DRAWS = 20_000


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _apply(op: str, args: list[int]) -> int:
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[SM":
        return sum(args) % 10
    # [MED: int(np.median(args)), i.e. the floor of the mean of the middle two for even counts
    s = sorted(args)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def _tokens(expr: str | Sequence[str]) -> list[str]:
    if isinstance(expr, str):
        return expr.split()
    return [str(t) for t in expr]


def evaluate_listops(expr: str | Sequence[str]) -> int:
    """The value (0-9) of a ListOps expression (a string, or its whitespace-split tokens).

    A single digit is an expression too. Raises ``ValueError`` naming the problem for an empty
    expression, an unknown token, a ``]`` without an open operator, an operator without arguments,
    an operator left open, or tokens after the end of the expression.
    """
    toks = _tokens(expr)
    if not toks:
        raise ValueError("expr is empty; a ListOps expression is a digit or '[OP arg ... ]'")
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for i, tok in enumerate(toks):
        if result is not None:
            raise ValueError(f"expr has tokens after the end of the expression at token {i}: "
                             f"{' '.join(toks[i:i + 5])!r}")
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack:
                raise ValueError(f"expr has a ']' without an open operator at token {i}")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"expr has an operator {op} without arguments at token {i}")
            value = _apply(op, args)
        elif tok in _DIGITS:
            value = int(tok)
        else:
            raise ValueError(f"expr has an unknown token {tok!r} at token {i}; allowed are the "
                             f"digits 0-9, {', '.join(OPERATORS)} and ']'")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if stack:
        raise ValueError(f"expr leaves {len(stack)} operator(s) open (missing ']')")
    assert result is not None
    return result


def listops_depth(expr: str | Sequence[str]) -> int:
    """The nesting depth of operators (0 for a bare digit, 1 for ``[MAX 1 2 ]``). No validation."""
    depth = best = 0
    for tok in _tokens(expr):
        if tok in OPERATORS:
            depth += 1
            best = max(best, depth)
        elif tok == END:
            depth -= 1
    return best


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


class _TooLong(Exception):
    pass


def _draw(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[str],
          max_length: int, force_op: bool = False) -> int:
    """Append one LRA-distributed subtree's tokens to ``out``; return its value."""
    if not force_op and (depth >= max_depth or rng.random() > VALUE_P):
        value = int(rng.random() * 10)
        out.append(_DIGITS[value])
        if len(out) > max_length:
            raise _TooLong
        return value
    n_args = rng.randint(2, max_args)
    op = OPERATORS[int(rng.random() * 4)]
    out.append(op)
    args = [_draw(rng, depth + 1, max_depth, max_args, out, max_length) for _ in range(n_args)]
    out.append(END)
    if len(out) > max_length:
        raise _TooLong
    return _apply(op, args)


def _max_possible_length(max_depth: int, max_args: int) -> int:
    length = 1  # a node at depth max_depth is a digit
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def generate_listops(num_samples: int, *, max_depth: int = 6, max_args: int = 5,
                     min_length: int = 10, max_length: int = 100, seed: int = 0
                     ) -> list[tuple[str, int]]:
    """``num_samples`` distinct ListOps expressions with their values, ``[(expr, label), ...]``.

    Args:
        num_samples: how many distinct expressions, >= 0.
        max_depth: depth of the tree, >= 2 (the root is at depth 1, digits only at ``max_depth``).
        max_args: most arguments of one operator, >= 2 (each draws uniformly from 2..max_args).
        min_length, max_length: inclusive bounds on the number of tokens, 4 <= max_length and
            1 <= min_length <= max_length; ``min_length`` must be reachable with ``max_depth`` and
            ``max_args``.
        seed: the seed of the ``random.Random`` that draws everything.

    The order is the order of generation (already random). Raises ``RuntimeError`` when 20,000
    draws in a row bring no new expression (the setting cannot make that many distinct ones, or
    its length bounds are almost never met).
    """
    num_samples = _check_int("num_samples", num_samples, 0)
    max_depth = _check_int("max_depth", max_depth, 2)
    max_args = _check_int("max_args", max_args, 2)
    max_length = _check_int("max_length", max_length, 4)
    min_length = _check_int("min_length", min_length, 1, max_length)
    reachable = _max_possible_length(max_depth, max_args)
    if min_length > reachable:
        raise ValueError(f"min_length must be <= {reachable}, the longest expression max_depth="
                         f"{max_depth} and max_args={max_args} can make, got {min_length}")
    seed = _check_int("seed", seed, 0)
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    stalled = 0
    while len(seen) < num_samples:
        stalled += 1
        if stalled > _MAX_STALLED_DRAWS:
            raise RuntimeError(f"generate_listops found only {len(seen)} of {num_samples} distinct "
                               f"expressions with {min_length} <= length <= {max_length}: the "
                               f"last {_MAX_STALLED_DRAWS} draws gave no new one; widen the length "
                               "bounds, raise max_depth/max_args or ask for fewer samples")
        out: list[str] = []
        try:
            value = _draw(rng, 1, max_depth, max_args, out, max_length, force_op=True)
        except _TooLong:
            continue
        if len(out) < min_length:
            continue
        expr = " ".join(out)
        if expr not in seen:
            seen[expr] = value
            stalled = 0
    return list(seen.items())


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class ListOpsTokenizer:
    """The fixed ListOps vocabulary: ``<pad> <cls> 0..9 [MAX [MIN [MED [SM ]`` (ids 0..16)."""

    pad_token = "<pad>"
    cls_token = "<cls>"
    pad_id = 0
    cls_id = 1

    def __init__(self) -> None:
        self.vocab: tuple[str, ...] = (self.pad_token, self.cls_token, *_DIGITS, *OPERATORS, END)
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, expr: str | Sequence[str], *, add_cls: bool = False) -> list[int]:
        """Token ids of ``expr`` (whitespace-split), with ``<cls>`` first if ``add_cls``.

        Raises ``ValueError`` on a token outside the vocabulary (the expression is not checked to
        be well formed; :func:`evaluate_listops` does that)."""
        ids = [self.cls_id] if add_cls else []
        for tok in _tokens(expr):
            try:
                ids.append(self.token_to_id[tok])
            except KeyError:
                raise ValueError(f"expr has token {tok!r} outside the ListOps vocabulary "
                                 f"{list(self.vocab[2:])}") from None
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The expression string of ``ids``, without ``<pad>`` and ``<cls>``."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.vocab)})")
            if i not in (self.pad_id, self.cls_id):
                out.append(self.vocab[i])
        return " ".join(out)

    def pad(self, sequences: Sequence[Sequence[int]], *, length: int | None = None):
        """Right-pad id lists with ``pad_id`` into a ``torch.LongTensor`` (batch, length).

        ``length`` defaults to the longest sequence; a sequence longer than ``length`` raises
        ``ValueError`` (ListOps sequences are never truncated)."""
        import torch

        longest = max((len(s) for s in sequences), default=0)
        if length is None:
            length = longest
        length = _check_int("length", length, 0)
        if longest > length:
            raise ValueError(f"length must be >= the longest sequence ({longest}), got {length}; "
                             "truncating a ListOps expression changes its value")
        out = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            if len(seq):
                out[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        return out

    def encode_batch(self, exprs: Sequence[str], *, add_cls: bool = False,
                     length: int | None = None):
        """``pad([encode(e) for e in exprs])``: a ``torch.LongTensor`` (batch, length)."""
        return self.pad([self.encode(e, add_cls=add_cls) for e in exprs], length=length)

    def collate(self, items: Sequence[tuple[Sequence[int], int]], *, length: int | None = None):
        """``(input_ids, labels)`` LongTensors from ``(ids, label)`` items (a DataLoader
        ``collate_fn``); the attention mask is ``input_ids != tokenizer.pad_id``."""
        import torch

        ids = self.pad([it[0] for it in items], length=length)
        return ids, torch.tensor([int(it[1]) for it in items], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass
class ListOpsSplits:
    """Train/validation/test ``(ids, label)`` lists, the tokenizer, and the expressions.

    ``expressions[name]`` holds the strings behind ``getattr(self, name)`` in the same order; no
    expression is in two splits. ``meta`` records the generator's arguments.
    """

    train: list[tuple[list[int], int]]
    val: list[tuple[list[int], int]]
    test: list[tuple[list[int], int]]
    tokenizer: ListOpsTokenizer
    expressions: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def class_counts(self, split: str = "train") -> list[int]:
        """How many items of ``split`` have each label 0..9."""
        counts = Counter(label for _, label in self._split(split))
        return [counts.get(c, 0) for c in range(10)]

    def majority_accuracy(self, split: str = "test") -> float:
        """Accuracy of always predicting ``train``'s most frequent label, on ``split``."""
        train = self.class_counts("train")
        best = max(range(10), key=train.__getitem__)
        items = self._split(split)
        return sum(label == best for _, label in items) / max(len(items), 1)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def _split(self, split: str) -> list[tuple[list[int], int]]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be one of 'train', 'val', 'test', got {split!r}")
        return getattr(self, split)


def make_listops_splits(n_train: int, n_val: int, n_test: int, *, seed: int = 0,
                        max_depth: int = 6, max_args: int = 5, min_length: int = 10,
                        max_length: int = 100, add_cls: bool = False) -> ListOpsSplits:
    """Generate ``n_train + n_val + n_test`` distinct expressions (:func:`generate_listops`) and
    cut them, in generation order, into train/val/test ``(ids, label)`` lists (so no expression is
    shared across splits). ``add_cls`` puts ``<cls>`` first in every sequence."""
    n_train = _check_int("n_train", n_train, 0)
    n_val = _check_int("n_val", n_val, 0)
    n_test = _check_int("n_test", n_test, 0)
    data = generate_listops(n_train + n_val + n_test, max_depth=max_depth, max_args=max_args,
                            min_length=min_length, max_length=max_length, seed=seed)
    tok = ListOpsTokenizer()
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    parts = {name: data[a:b] for name, (a, b) in bounds.items()}
    encoded = {name: [(tok.encode(e, add_cls=add_cls), y) for e, y in rows]
               for name, rows in parts.items()}
    return ListOpsSplits(
        train=encoded["train"], val=encoded["val"], test=encoded["test"], tokenizer=tok,
        expressions={name: [e for e, _ in rows] for name, rows in parts.items()},
        meta={"source": "generated", "seed": seed, "max_depth": max_depth,
              "max_args": max_args, "min_length": min_length, "max_length": max_length,
              "add_cls": add_cls},
    )


# --------------------------------------------------------------------------------------------
# LRA's files
# --------------------------------------------------------------------------------------------


def load_listops_tsv(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read an LRA ListOps file (``basic_train.tsv`` etc.: a header ``Source<TAB>Target``, then one
    expression and its value per row) into ``[(expr, label), ...]``.

    The parentheses LRA writes around partial applications are deleted, so the expressions are in
    this module's form. Raises ``ValueError`` for a row whose label is not a digit or whose
    expression does not evaluate to its label.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ListOps file not found: {p}")
    out: list[tuple[str, int]] = []
    with p.open(newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh, delimiter="\t")
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["Source", "Target"]:
            raise ValueError(f"{p}: expected a header 'Source<TAB>Target', got {header!r}")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{p}:{line}: expected two tab-separated columns, got {row!r}")
            expr = " ".join(t for t in row[0].replace("(", " ").replace(")", " ").split())
            try:
                label = int(row[1])
            except ValueError:
                raise ValueError(f"{p}:{line}: label must be a digit 0-9, got {row[1]!r}") from None
            if evaluate_listops(expr) != label:
                raise ValueError(f"{p}:{line}: expression evaluates to {evaluate_listops(expr)}, "
                                 f"but the file says {label}")
            out.append((expr, label))
    return out
