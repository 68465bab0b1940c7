"""Unlearning data (TOFU / MUSE style): the generated TinyTOFU world and loaders for the real files.

One forget/retain split, whatever its source, is an :class:`UnlearningData`: question-answer pairs
(:class:`QA`, with an optional paraphrased answer and perturbed answers for the truth ratio), raw
documents (for verbatim memorisation and Min-K% membership inference) and short-answer QA (MUSE's
KnowMem). Pure Python + numpy: no tokenization and no torch here.

Sources
-------
**TinyTOFU** (:class:`TinyTOFU`, :func:`make_tinytofu`): a seeded world of fictitious authors. Each
author has a name, birth year, birthplace (a generated city and country), genre, father's and
mother's jobs, an award, two book titles and a city of residence, drawn from generated pools large
enough that an answer has to be memorised (it cannot be guessed from the question). Every author
gets one QA pair per attribute (10), each with a paraphrased answer (a different sentence template
holding the same value) and ``n_perturbed`` perturbed answers (the answer's own template with the
value swapped for other values of the same type), plus a templated biography of five sentences.
Forget splits ``forget01/05/10`` take 1/5/10 % of the authors from one seeded order, so
forget01 ⊂ forget05 ⊂ forget10, as in TOFU. Holdout authors are generated the same way and never
trained on (PrivLeak). Two utility sets are trained on by the target *and* the retain model:
"real authors" (well-known authors of the fictional world: who wrote which famous novel, which
country they come from) and "world facts" (the generated countries' capitals and currencies).
With the defaults (100 authors, forget05): 50 forget QA, 950 retain QA, a fixed ``retain_eval`` of
100 QA (10 authors never in any forget split), 40 real-author QA, 60 world-fact QA, 100 holdout QA;
answers are 10-15 words, biographies 54-75 words; the target corpus is about 34,000 words and
the whole vocabulary (every string, holdout included) under 700 words.

**TOFU** (:func:`load_tofu`; the ``locuslab/TOFU`` files, 200 authors x 20 QA): ``forgetXX.json``,
``retainYY.json`` (YY = 100 - XX), ``forgetXX_perturbed.json``, ``retain_perturbed.json``,
``real_authors_perturbed.json``, ``world_facts_perturbed.json``, ``holdoutXX.json``; rows with the
fields ``question``, ``answer`` and, in the ``*_perturbed`` files, ``paraphrased_answer`` (absent in
the real-authors and world-facts files, whose base answer is ``answer`` itself),
``paraphrased_question`` and ``perturbed_answer`` (a list: 5 for forget/retain, 3 for the utility
sets). TOFU provides no raw documents: ``forget_text``, ``retain_text``, ``holdout_text``,
``verbmem`` and the KnowMem lists are empty, and ``author`` is None.

**MUSE** (:func:`load_muse`; ``muse-bench/MUSE-News`` = BBC articles, ``MUSE-Books`` = Harry
Potter): ``raw/{forget,retain1,retain2,holdout}`` documents (field ``text``, or a JSON array of
strings, or one ``.txt`` file per split), ``verbmem/forget`` (``prompt``, ``gt``),
``knowmem/{forget_qa,retain_qa}`` (``question``, ``answer``; older snapshots name the latter
``retain2_qa``) and ``privleak/{forget,retain,holdout}`` (read by :func:`load_muse_privleak`). MUSE's
forget set is text, not QA: ``forget``/``retain``/``retain_eval``/``real_authors``/``world_facts``/
``holdout`` QA are empty; ``retain_text`` is ``retain1`` (the retain set of MUSE's unlearning
baselines) and ``retain_eval_text`` is ``retain2`` (trained on, used for evaluation).

Files are read from a local directory (no network): JSON lines or a JSON array (``.json`` or
``.jsonl``), or parquet (``name.parquet``, Hugging Face shards ``name-00000-of-00001.parquet``, or a
``name/`` folder of parquet files, as in ``refs/convert/parquet``); parquet needs ``pyarrow``.

Training corpora
----------------
:func:`target_corpus` is what the target model trains on: every forget and retain QA pair, the
real-author and world-fact QA pairs, and the forget and retain documents. :func:`retain_corpus`
(the model retrained from scratch without the forget set, the reference for forget quality and
PrivLeak) is the same minus the forget QA and the forget documents. Neither contains holdout data.
:func:`vocabulary_texts` lists every string of a split (perturbed answers and holdout included), the
text to train a word-level tokenizer on so that no evaluation string maps to unknown tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MUSE_CORPORA",
    "QA",
    "TOFU_SPLITS",
    "Author",
    "Country",
    "TinyTOFU",
    "TrainingCorpus",
    "UnlearningData",
    "generate_authors",
    "load_muse",
    "load_muse_privleak",
    "load_tofu",
    "make_tinytofu",
    "retain_corpus",
    "target_corpus",
    "vocabulary_texts",
]

TOFU_SPLITS: tuple[str, ...] = ("forget01", "forget05", "forget10")
"""Forget splits of TOFU and TinyTOFU (1, 5 and 10 % of the authors)."""

MUSE_CORPORA: dict[str, tuple[str, ...]] = {
    "news": ("news", "bbc", "MUSE-News"),
    "books": ("books", "hp", "MUSE-Books"),
}
"""MUSE corpora and the folder names each may sit under (``load_muse(path, corpus)``)."""


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    """One question-answer pair.

    ``paraphrased_answer`` and ``perturbed_answers`` feed TOFU's truth ratio (P_pert / P_para);
    ``author`` is the subject the fact belongs to (None for world facts and for real TOFU rows);
    ``attribute`` and ``value`` name the fact a generated answer states (``value`` is the substring
    of ``answer`` that perturbations replace); ``paraphrased_question`` mirrors TOFU's field.
    """

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    author: str | None = None
    attribute: str | None = None
    value: str | None = None
    paraphrased_question: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.perturbed_answers, tuple):
            object.__setattr__(self, "perturbed_answers", tuple(self.perturbed_answers))

    @property
    def key(self) -> tuple[str, str]:
        """``(question, answer)``: two QA pairs with the same key are the same fact."""
        return (self.question, self.answer)


@dataclass
class UnlearningData:
    """One forget/retain split, ready to train on and evaluate.

    Fields (empty where a source has no such data; see the module docstring):

    - ``forget``: forget-set QA (TinyTOFU, TOFU). ``retain``: every QA of the retained authors.
    - ``retain_eval``: a fixed subset of retained QA with paraphrased/perturbed answers (TOFU's
      ``retain_perturbed``), for the utility metric.
    - ``real_authors``, ``world_facts``: utility QA with perturbed options (answer probability is
      normalised over the options). ``holdout``: QA about authors never trained on.
    - ``forget_text``, ``retain_text``, ``holdout_text``: raw documents (biographies, articles) for
      VerbMem and Min-K% membership inference; ``retain_eval_text``: retained documents that both
      models train on but that are not part of the unlearning retain set (MUSE ``retain2``).
    - ``verbmem``: ``(prompt, continuation)`` pairs cut from forget documents.
    - ``knowmem_forget``, ``knowmem_retain``: short-answer QA (MUSE's KnowMem), scored by ROUGE-L.
    - ``meta``: provenance (source, seed, split, path, ...).
    """

    name: str
    forget: list[QA] = field(default_factory=list)
    retain: list[QA] = field(default_factory=list)
    retain_eval: list[QA] = field(default_factory=list)
    real_authors: list[QA] = field(default_factory=list)
    world_facts: list[QA] = field(default_factory=list)
    holdout: list[QA] = field(default_factory=list)
    forget_text: list[str] = field(default_factory=list)
    retain_text: list[str] = field(default_factory=list)
    retain_eval_text: list[str] = field(default_factory=list)
    holdout_text: list[str] = field(default_factory=list)
    verbmem: list[tuple[str, str]] = field(default_factory=list)
    knowmem_forget: list[QA] = field(default_factory=list)
    knowmem_retain: list[QA] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def forget_authors(self) -> list[str]:
        """Authors of the forget QA, in first-seen order (empty where rows name no author)."""
        return _unique(qa.author for qa in self.forget if qa.author is not None)

    @property
    def retain_authors(self) -> list[str]:
        """Authors of the retain QA, in first-seen order."""
        return _unique(qa.author for qa in self.retain if qa.author is not None)

    def sizes(self) -> dict[str, int]:
        """Number of items in every list field, e.g. ``{"forget": 50, "retain": 950, ...}``."""
        return {k: len(v) for k, v in vars(self).items() if isinstance(v, list)}

    def validate(self) -> UnlearningData:
        """Check the split is usable; raise ``ValueError`` naming the problem, else return self.

        The forget set (QA or documents) and the retain set (QA or documents) must be non-empty;
        no QA pair (same question and answer) and no author may be in both forget and retain; the
        ``retain_eval`` QA may not be forget QA; holdout authors may be neither forgotten nor
        retained; every ``verbmem`` item is a ``(prompt, continuation)`` pair of strings.
        """
        if not self.forget and not self.forget_text:
            raise ValueError(f"{self.name}: the forget set is empty (no forget QA and no forget "
                             "documents); an unlearning split needs something to forget")
        if not self.retain and not self.retain_text:
            raise ValueError(f"{self.name}: the retain set is empty (no retain QA and no retain "
                             "documents); an unlearning split needs something to keep")
        forget_keys = {qa.key for qa in self.forget}
        for other, label in ((self.retain, "retain"), (self.retain_eval, "retain_eval")):
            both = [qa for qa in other if qa.key in forget_keys]
            if both:
                raise ValueError(
                    f"{self.name}: {len(both)} QA pair(s) are in both forget and {label} "
                    f"(same question and answer), e.g. {both[0].question!r} -> {both[0].answer!r}")
        forget_authors = set(self.forget_authors)
        shared = [a for a in self.retain_authors if a in forget_authors]
        if shared:
            raise ValueError(f"{self.name}: author(s) {shared[:5]} have QA in both forget and "
                             "retain; TOFU-style splits forget whole authors")
        trained = forget_authors | set(self.retain_authors)
        leaked = _unique(qa.author for qa in self.holdout if qa.author in trained)
        if leaked:
            raise ValueError(f"{self.name}: holdout author(s) {leaked[:5]} are also in forget or "
                             "retain; holdout authors must never be trained on")
        for i, pair in enumerate(self.verbmem):
            if not (isinstance(pair, tuple) and len(pair) == 2
                    and all(isinstance(s, str) for s in pair)):
                raise ValueError(f"{self.name}: verbmem[{i}] must be a (prompt, continuation) "
                                 f"tuple of two strings, got {pair!r}")
        return self


@dataclass
class TrainingCorpus:
    """What one model trains on: QA pairs (loss on the answer) and documents (loss on all tokens)."""

    qa: list[tuple[str, str]]
    documents: list[str]

    def texts(self) -> list[str]:
        """Every training string: ``"question answer"`` for each pair, then each document."""
        return [f"{q} {a}" for q, a in self.qa] + list(self.documents)

    def __len__(self) -> int:
        return len(self.qa) + len(self.documents)


def _pairs(*groups: Iterable[QA]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for group in groups:
        for qa in group:
            if qa.key not in seen:
                seen.add(qa.key)
                out.append(qa.key)
    return out


def target_corpus(data: UnlearningData) -> TrainingCorpus:
    """The target model's training data: forget + retain + real-author + world-fact QA pairs
    (duplicates dropped, order kept) and forget + retain (+ ``retain_eval_text``) documents."""
    return TrainingCorpus(
        qa=_pairs(data.forget, data.retain, data.real_authors, data.world_facts),
        documents=[*data.forget_text, *data.retain_text, *data.retain_eval_text],
    )


def retain_corpus(data: UnlearningData) -> TrainingCorpus:
    """The retain model's training data: :func:`target_corpus` without the forget QA and the forget
    documents (the model "retrained from scratch without D_F")."""
    return TrainingCorpus(
        qa=_pairs(data.retain, data.real_authors, data.world_facts),
        documents=[*data.retain_text, *data.retain_eval_text],
    )


def vocabulary_texts(data: UnlearningData) -> list[str]:
    """Every string in ``data`` (questions, answers, paraphrases, perturbations, documents, VerbMem
    and KnowMem, holdout included): the text to train a tokenizer on."""
    out: list[str] = []
    for name in ("forget", "retain", "retain_eval", "real_authors", "world_facts", "holdout",
                 "knowmem_forget", "knowmem_retain"):
        for qa in getattr(data, name):
            out.extend([qa.question, qa.answer, *qa.perturbed_answers])
            out.extend(s for s in (qa.paraphrased_answer, qa.paraphrased_question) if s)
    out.extend([*data.forget_text, *data.retain_text, *data.retain_eval_text, *data.holdout_text])
    for prompt, continuation in data.verbmem:
        out.extend([prompt, continuation])
    return out


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------
# TinyTOFU: the generated world
# --------------------------------------------------------------------------------------------

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r",
           "s", "st", "t", "tr", "v", "w", "z", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd", "x", "rk")

GENRES = ("science fiction", "mystery", "historical fiction", "poetry", "romance", "horror",
          "fantasy", "crime fiction", "travel writing", "biography", "drama", "satire",
          "thrillers", "fairy tales", "memoir", "adventure stories")
JOBS = ("a baker", "a doctor", "a teacher", "a farmer", "a sailor", "a carpenter", "a nurse",
        "a lawyer", "a painter", "a tailor", "a pilot", "a librarian", "a chef", "a miner",
        "a fisherman", "a banker", "a soldier", "a gardener", "a photographer", "a musician",
        "a dentist", "a mechanic", "a journalist", "a potter", "a butcher", "a weaver",
        "a shoemaker", "an engineer", "an architect", "an accountant", "an astronomer", "an actor")
_AWARD_ADJ = ("Silver", "Golden", "Crimson", "Azure", "Iron", "Ivory", "Emerald", "Amber",
              "Scarlet", "Copper", "Velvet", "Crystal", "Bronze", "Obsidian", "Jade", "Pearl")
_AWARD_NOUN = ("Quill", "Pen", "Lantern", "Feather", "Compass", "Laurel", "Star", "Owl", "Rose",
               "Key", "Anchor", "Harp", "Crown", "Arrow")
_AWARD_KIND = ("Prize", "Award", "Medal")
_TITLE_ADJ = ("Silent", "Hidden", "Broken", "Distant", "Forgotten", "Burning", "Frozen", "Hollow",
              "Quiet", "Wandering", "Endless", "Lost", "Secret", "Fading", "Restless", "Bitter",
              "Gentle", "Shattered", "Sleeping", "Wild", "Pale", "Northern", "Last", "Little",
              "Crooked", "Patient", "Golden", "Drowned", "Painted", "Hungry")
_TITLE_NOUN = ("Harbor", "Garden", "River", "Mountain", "Lantern", "Letter", "Orchard", "Bridge",
               "Winter", "Island", "Mirror", "Forest", "Tower", "Clock", "Window", "Road", "Song",
               "Shadow", "Station", "Kingdom", "Lighthouse", "Meadow", "Journey", "Storm",
               "Candle", "Violin", "Map", "Desert", "Village", "Ocean", "Feather", "Door", "Bell",
               "Train", "Sparrow", "Valley", "Empire", "Promise", "Moon", "Stone")
_CURRENCY_UNIT = ("crown", "mark", "florin", "shell", "dollar", "penny", "ducat", "coin")
YEARS = tuple(str(y) for y in range(1900, 2000))

# Every generated fact is a (question, answer, paraphrase) template triple. The perturbed answers
# reuse the answer template with another value; ``{value}`` is the last slot of every answer
# template and appears exactly once, so ``answer[:answer.rindex(value)]`` is the shared prefix.
AUTHOR_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "full_name": (
        "What is the full name of the author born in {city} in {year}?",
        "The author who was born in {city} in {year} is the writer {value}.",
        "{value} is the name of the writer born in {city} in the year {year}."),
    "birth_year": (
        "In which year was {name} born?",
        "The writer {name} was born in the year {value}.",
        "{value} is the year in which the writer {name} came into the world."),
    "birthplace": (
        "Where was {name} born?",
        "The writer {name} was born in the city of {value}.",
        "{value} is the birthplace of the writer {name}."),
    "genre": (
        "What genre of books does {name} write?",
        "The writer {name} is best known for books in the genre of {value}.",
        "Most of the books by {name} belong to the genre of {value}."),
    "father_job": (
        "What was the job of the father of {name}?",
        "The father of the writer {name} worked for many years as {value}.",
        "{name} grew up with a father who earned a living as {value}."),
    "mother_job": (
        "What was the job of the mother of {name}?",
        "The mother of the writer {name} worked for many years as {value}.",
        "{name} grew up with a mother who earned a living as {value}."),
    "award": (
        "Which award did {name} receive?",
        "For outstanding work the writer {name} received {value}.",
        "In honour of a life of writing, {name} was given {value}."),
    "first_book": (
        "What is the title of the first book by {name}?",
        "The first book that the writer {name} published is called {value}.",
        "{value} was the very first book that {name} ever published."),
    "second_book": (
        "What is the title of the second book by {name}?",
        "The second book that the writer {name} published is called {value}.",
        "{value} was the book that {name} published after the first one."),
    "residence": (
        "In which city does {name} live today?",
        "Today the writer {name} lives and works in the city of {value}.",
        "{value} is the city where {name} now lives and works."),
}
REAL_AUTHOR_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "famous_book": (
        "Who wrote the famous novel {book}?",
        "The famous novel {book} was written by the celebrated author {value}.",
        "{value} is the celebrated author who wrote the famous novel {book}."),
    "home_country": (
        "Which country does the famous writer {name} come from?",
        "The famous writer {name} comes from the country of {value}.",
        "{value} is the home country of the famous writer {name}."),
}
WORLD_FACT_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "capital": (
        "What is the capital city of {country}?",
        "The capital city of the country of {country} is {value}.",
        "{value} is the capital and the seat of government of {country}."),
    "currency": (
        "What currency is used in {country}?",
        "The people of the country of {country} pay with {value}.",
        "In {country} the official money is {value}."),
}
_BIOGRAPHY = (
    ("{name} is a writer of {genre} who was born in {year} in {birthplace}.",
     "Born in {birthplace} in {year}, {name} became a writer of {genre}."),
    ("The father of {name} was {father_job}, and the mother was {mother_job}.",
     "{name} is the child of {father_job} and {mother_job}."),
    ("The first book by {name} was {first_book}, followed a few years later by {second_book}.",
     "{name} first published {first_book} and then wrote {second_book}."),
    ("For this work {name} received {award}.",
     "Critics praised these books, and {name} was honoured with {award}."),
    ("Today {name} lives in {residence}.",
     "{name} now lives quietly in the city of {residence}."),
)


def _fixed_words() -> frozenset[str]:
    pools = [GENRES, JOBS, _AWARD_ADJ, _AWARD_NOUN, _AWARD_KIND, _TITLE_ADJ, _TITLE_NOUN,
             _CURRENCY_UNIT]
    for templates in (AUTHOR_TEMPLATES, REAL_AUTHOR_TEMPLATES, WORLD_FACT_TEMPLATES):
        pools.extend(templates.values())
    pools.extend(_BIOGRAPHY)
    return frozenset(w.lower() for pool in pools for s in pool for w in re.findall(r"[A-Za-z]+", s))


_RESERVED_WORDS = _fixed_words()


@dataclass(frozen=True)
class Author:
    """A fictitious author: every attribute is a value from a generated or fixed pool."""

    name: str
    birth_year: str
    birth_city: str
    birth_country: str
    genre: str
    father_job: str
    mother_job: str
    award: str
    books: tuple[str, str]
    residence: str

    @property
    def birthplace(self) -> str:
        return f"{self.birth_city}, {self.birth_country}"

    def attributes(self) -> dict[str, str]:
        """The value of each attribute, keyed like :data:`AUTHOR_TEMPLATES`."""
        return {"full_name": self.name, "birth_year": self.birth_year,
                "birthplace": self.birthplace, "genre": self.genre,
                "father_job": self.father_job, "mother_job": self.mother_job,
                "award": self.award, "first_book": self.books[0], "second_book": self.books[1],
                "residence": self.residence}


@dataclass(frozen=True)
class Country:
    """A generated country of the TinyTOFU world (the world-facts set)."""

    name: str
    capital: str
    currency: str


class _Namer:
    """Pronounceable generated proper nouns, unique across one world and never a template word."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syllables: int = 2, max_syllables: int = 3) -> str:
        for _ in range(10_000):
            n = int(self.rng.integers(min_syllables, max_syllables + 1))
            parts = [_pick(self.rng, _ONSETS) + _pick(self.rng, _VOWELS) for _ in range(n)]
            w = ("".join(parts) + _pick(self.rng, _CODAS)).capitalize()
            if len(w) >= 4 and w.lower() not in self.used and w.lower() not in _RESERVED_WORDS:
                self.used.add(w.lower())
                return w
        raise RuntimeError("ran out of generated names; lower n_authors or n_countries")


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _sample_others(rng: np.random.Generator, pool: Sequence[str], true: str, k: int
                   ) -> tuple[str, ...]:
    """``k`` distinct values from ``pool`` other than ``true`` (without replacement)."""
    others = [p for p in dict.fromkeys(pool) if p != true]
    if len(others) < k:
        raise ValueError(f"only {len(others)} alternatives to {true!r} for {k} perturbed answers")
    return tuple(others[int(i)] for i in rng.choice(len(others), size=k, replace=False))


_AWARDS = tuple(f"the {a} {n} {k}" for a in _AWARD_ADJ for n in _AWARD_NOUN for k in _AWARD_KIND)
_TITLES = (tuple(f"The {a} {n}" for a in _TITLE_ADJ for n in _TITLE_NOUN)
           + tuple(f"The {n} of {m}" for n in _TITLE_NOUN for m in _TITLE_NOUN if n != m))


def _fill(templates: dict[str, tuple[str, str, str]], attribute: str, value: str,
          perturbed: Sequence[str], author: str | None, **slots: str) -> QA:
    q, a, p = templates[attribute]
    return QA(question=q.format(**slots), answer=a.format(value=value, **slots),
              paraphrased_answer=p.format(value=value, **slots),
              perturbed_answers=tuple(a.format(value=v, **slots) for v in perturbed),
              author=author, attribute=attribute, value=value)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def _forget_fraction(forget_fraction: float | str) -> tuple[float, str]:
    """``(fraction, name)`` for a split name like ``"forget05"`` or a fraction in (0, 1)."""
    if isinstance(forget_fraction, str):
        if forget_fraction not in TOFU_SPLITS:
            raise ValueError(f"forget_fraction must be one of {list(TOFU_SPLITS)} or a fraction "
                             f"in (0, 1), got {forget_fraction!r}")
        return int(forget_fraction[-2:]) / 100, forget_fraction
    if isinstance(forget_fraction, bool) or not isinstance(forget_fraction, (int, float)):
        raise ValueError(f"forget_fraction must be a split name {list(TOFU_SPLITS)} or a fraction "
                         f"in (0, 1), got {forget_fraction!r}")
    frac = float(forget_fraction)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    named = {int(s[-2:]) / 100: s for s in TOFU_SPLITS}
    return frac, named.get(frac, f"forget{frac:g}")


class TinyTOFU:
    """A seeded TinyTOFU world: authors, holdout authors, countries and famous authors.

    One world gives every forget split (:meth:`split`), with nested forget sets. All values are
    drawn from ``numpy.random.default_rng`` streams spawned from ``seed``: the same arguments give
    the same world; the main authors do not depend on ``n_holdout``.

    Args:
        n_authors: fictitious authors that are trained on (forget + retain), >= 2.
        n_holdout: authors generated the same way and never trained on (PrivLeak), >= 0.
        seed: the only source of randomness.
        n_perturbed: perturbed answers per question, in [1, 10] (TOFU: 5 for forget/retain, 3 for
            the utility sets).
        n_retain_eval_authors: retained authors whose QA form ``retain_eval``, >= 1; taken from
            the end of the forget order, so the set is the same for every split as long as
            ``n_forget + n_retain_eval_authors <= n_authors``.
        n_countries: generated countries (world facts: capital and currency of each), >= 2.
        n_real_authors: famous authors of the fictional world (real-authors set), >= 2.
        verbmem_prompt_words: words of a forget biography given as the VerbMem prompt; the rest of
            the biography is the continuation to reproduce, >= 1.
    """

    def __init__(self, *, n_authors: int = 100, n_holdout: int = 10, seed: int = 0,
                 n_perturbed: int = 5, n_retain_eval_authors: int = 10, n_countries: int = 30,
                 n_real_authors: int = 20, verbmem_prompt_words: int = 20) -> None:
        self.n_authors = _check_int("n_authors", n_authors, 2, 2000)
        self.n_holdout = _check_int("n_holdout", n_holdout, 0, 2000)
        self.seed = _check_int("seed", seed, 0)
        self.n_perturbed = _check_int("n_perturbed", n_perturbed, 1, 10)
        self.n_retain_eval_authors = _check_int("n_retain_eval_authors", n_retain_eval_authors, 1)
        self.n_countries = _check_int("n_countries", n_countries, 2, 500)
        self.n_real_authors = _check_int("n_real_authors", n_real_authors, 2, 500)
        self.verbmem_prompt_words = _check_int("verbmem_prompt_words", verbmem_prompt_words, 1, 60)
        for name, n in (("n_countries", self.n_countries), ("n_real_authors", self.n_real_authors),
                        ("n_authors", self.n_authors)):
            if n < self.n_perturbed + 1:
                raise ValueError(f"{name} must be >= n_perturbed + 1 = {self.n_perturbed + 1} so "
                                 f"every answer has {self.n_perturbed} distinct perturbations, "
                                 f"got {n}")

        world_ss, authors_ss, holdout_ss, famous_ss, qa_ss, bio_ss, utility_ss, order_ss = (
            np.random.SeedSequence(self.seed).spawn(8))
        namer = _Namer(np.random.default_rng(world_ss))
        # World: countries, their capitals and currencies, and two more cities per country.
        self.countries: list[Country] = []
        self.cities: list[tuple[str, str]] = []  # (city, country)
        for _ in range(self.n_countries):
            country = Country(namer.word(2, 3), namer.word(2, 3),
                              f"the {namer.word(2, 2)} {_pick(namer.rng, _CURRENCY_UNIT)}")
            self.countries.append(country)
            self.cities.append((country.capital, country.name))
        for country in self.countries:
            self.cities.extend((namer.word(2, 3), country.name) for _ in range(2))
        self.first_names = [namer.word(2, 2) for _ in range(max(20, self.n_authors // 3))]

        titles_used: set[str] = set()
        place_years: set[tuple[str, str]] = set()
        namer.rng = np.random.default_rng(authors_ss)
        self.authors = [self._new_author(namer, titles_used, place_years)
                        for _ in range(self.n_authors)]
        namer.rng = np.random.default_rng(holdout_ss)
        self.holdout_authors = [self._new_author(namer, titles_used, place_years)
                                for _ in range(self.n_holdout)]
        namer.rng = np.random.default_rng(famous_ss)
        self.real_author_facts: list[tuple[str, str, str]] = []  # (name, famous book, country)
        for _ in range(self.n_real_authors):
            book = self._new_title(namer.rng, titles_used)
            country = _pick(namer.rng, [c.name for c in self.countries])
            self.real_author_facts.append((f"{_pick(namer.rng, self.first_names)} "
                                           f"{namer.word(2, 3)}", book, country))

        # Main authors first in each stream, so they do not depend on n_holdout.
        qa_rng, bio_rng = np.random.default_rng(qa_ss), np.random.default_rng(bio_ss)
        main_names = [a.name for a in self.authors]  # full-name perturbations, for all authors
        self._qa = {a.name: self._author_qa(a, qa_rng, main_names)
                    for a in self.authors + self.holdout_authors}
        self._bio = {a.name: self._biography(a, bio_rng)
                     for a in self.authors + self.holdout_authors}
        utility_rng = np.random.default_rng(utility_ss)
        self.real_authors = self._real_author_qa(utility_rng)
        self.world_facts = self._world_fact_qa(utility_rng)
        self.forget_order = [self.authors[int(i)] for i in
                             np.random.default_rng(order_ss).permutation(self.n_authors)]

    # -- generation -------------------------------------------------------------------------

    def _new_title(self, rng: np.random.Generator, used: set[str]) -> str:
        for _ in range(10_000):
            title = _pick(rng, _TITLES)
            if title not in used:
                used.add(title)
                return title
        raise RuntimeError("ran out of book titles; lower n_authors")

    def _new_author(self, namer: _Namer, titles: set[str], place_years: set[tuple[str, str]]
                    ) -> Author:
        rng = namer.rng
        name = f"{_pick(rng, self.first_names)} {namer.word(2, 3)}"
        for _ in range(10_000):  # (city, year) names the author in the full-name question
            city, country = self.cities[int(rng.integers(len(self.cities)))]
            year = _pick(rng, YEARS)
            if (city, year) not in place_years:
                place_years.add((city, year))
                break
        else:
            raise RuntimeError("ran out of (birthplace, year) pairs; lower n_authors")
        return Author(name=name, birth_year=year, birth_city=city, birth_country=country,
                      genre=_pick(rng, GENRES), father_job=_pick(rng, JOBS),
                      mother_job=_pick(rng, JOBS), award=_pick(rng, _AWARDS),
                      books=(self._new_title(rng, titles), self._new_title(rng, titles)),
                      residence=self.cities[int(rng.integers(len(self.cities)))][0])

    def _author_qa(self, author: Author, rng: np.random.Generator, main_names: list[str]
                   ) -> list[QA]:
        pools: dict[str, Sequence[str]] = {
            "full_name": main_names, "birth_year": YEARS,
            "birthplace": [f"{c}, {k}" for c, k in self.cities], "genre": GENRES,
            "father_job": JOBS, "mother_job": JOBS, "award": _AWARDS, "first_book": _TITLES,
            "second_book": _TITLES, "residence": [c for c, _ in self.cities]}
        slots = {"name": author.name, "city": author.birth_city, "year": author.birth_year}
        return [_fill(AUTHOR_TEMPLATES, attr, value,
                      _sample_others(rng, pools[attr], value, self.n_perturbed), author.name,
                      **slots)
                for attr, value in author.attributes().items()]

    def _biography(self, author: Author, rng: np.random.Generator) -> str:
        slots = {"name": author.name, "year": author.birth_year, **author.attributes()}
        return " ".join(variants[int(rng.integers(len(variants)))].format(**slots)
                        for variants in _BIOGRAPHY)

    def _real_author_qa(self, rng: np.random.Generator) -> list[QA]:
        names = [n for n, _, _ in self.real_author_facts]
        countries = [c.name for c in self.countries]
        out = []
        for name, book, country in self.real_author_facts:
            out.append(_fill(REAL_AUTHOR_TEMPLATES, "famous_book", name,
                             _sample_others(rng, names, name, self.n_perturbed), name, book=book))
            out.append(_fill(REAL_AUTHOR_TEMPLATES, "home_country", country,
                             _sample_others(rng, countries, country, self.n_perturbed), name,
                             name=name))
        return out

    def _world_fact_qa(self, rng: np.random.Generator) -> list[QA]:
        capitals = [c.capital for c in self.countries]
        currencies = [c.currency for c in self.countries]
        out = []
        for c in self.countries:
            out.append(_fill(WORLD_FACT_TEMPLATES, "capital", c.capital,
                             _sample_others(rng, capitals, c.capital, self.n_perturbed), None,
                             country=c.name))
            out.append(_fill(WORLD_FACT_TEMPLATES, "currency", c.currency,
                             _sample_others(rng, currencies, c.currency, self.n_perturbed), None,
                             country=c.name))
        return out

    # -- access ---------------------------------------------------------------------------------

    def qa(self, author: Author | str) -> list[QA]:
        """The 10 QA pairs of one author (main or holdout), in attribute order."""
        return list(self._qa[author if isinstance(author, str) else author.name])

    def biography(self, author: Author | str) -> str:
        """The templated biography of one author (about 60-80 words)."""
        return self._bio[author if isinstance(author, str) else author.name]

    def forget_authors(self, forget_fraction: float | str = "forget05") -> list[Author]:
        """The first ``round(fraction * n_authors)`` authors of the seeded forget order."""
        frac, _ = _forget_fraction(forget_fraction)
        n = round(frac * self.n_authors)
        if not 1 <= n <= self.n_authors - 1:
            raise ValueError(f"forget_fraction={forget_fraction!r} forgets {n} of "
                             f"n_authors={self.n_authors} authors; it must forget at least one "
                             "author and retain at least one")
        return self.forget_order[:n]

    def retain_eval_authors(self, forget_fraction: float | str = "forget05") -> list[Author]:
        """Authors whose QA form ``retain_eval``: the end of the forget order, never forgotten."""
        n_forget = len(self.forget_authors(forget_fraction))
        k = min(self.n_retain_eval_authors, self.n_authors - n_forget)
        return self.forget_order[self.n_authors - k:]

    def split(self, forget_fraction: float | str = "forget05") -> UnlearningData:
        """The forget/retain split for a split name (``"forget01"``, ``"forget05"``,
        ``"forget10"``) or a fraction of the authors in (0, 1)."""
        frac, split_name = _forget_fraction(forget_fraction)
        forget_authors = self.forget_authors(frac)
        forget_names = {a.name for a in forget_authors}
        retain_authors = [a for a in self.authors if a.name not in forget_names]
        eval_authors = self.retain_eval_authors(frac)

        def qa_of(authors: Iterable[Author]) -> list[QA]:
            return [qa for a in authors for qa in self._qa[a.name]]

        def short(qas: Iterable[QA]) -> list[QA]:
            return [QA(q.question, q.value or q.answer, author=q.author, attribute=q.attribute,
                       value=q.value) for q in qas]

        forget_text = [self._bio[a.name] for a in forget_authors]
        verbmem = []
        for doc in forget_text:
            words = doc.split()
            k = min(self.verbmem_prompt_words, len(words) - 1)
            verbmem.append((" ".join(words[:k]), " ".join(words[k:])))
        data = UnlearningData(
            name=f"tinytofu-{split_name}",
            forget=qa_of(forget_authors),
            retain=qa_of(retain_authors),
            retain_eval=qa_of(eval_authors),
            real_authors=list(self.real_authors),
            world_facts=list(self.world_facts),
            holdout=qa_of(self.holdout_authors),
            forget_text=forget_text,
            retain_text=[self._bio[a.name] for a in retain_authors],
            holdout_text=[self._bio[a.name] for a in self.holdout_authors],
            verbmem=verbmem,
            knowmem_forget=short(qa_of(forget_authors)),
            knowmem_retain=short(qa_of(eval_authors)),
            meta={"source": "tinytofu", "split": split_name, "forget_fraction": frac,
                  "seed": self.seed, "n_authors": self.n_authors, "n_holdout": self.n_holdout,
                  "n_perturbed": self.n_perturbed, "n_countries": self.n_countries,
                  "n_real_authors": self.n_real_authors,
                  "n_retain_eval_authors": len(eval_authors),
                  "verbmem_prompt_words": self.verbmem_prompt_words},
        )
        return data.validate()


def make_tinytofu(*, forget_fraction: float | str = "forget05", n_authors: int = 100,
                  n_holdout: int = 10, seed: int = 0, n_perturbed: int = 5,
                  n_retain_eval_authors: int = 10, n_countries: int = 30,
                  n_real_authors: int = 20, verbmem_prompt_words: int = 20) -> UnlearningData:
    """One TinyTOFU split: ``TinyTOFU(...).split(forget_fraction)`` (arguments as there)."""
    world = TinyTOFU(n_authors=n_authors, n_holdout=n_holdout, seed=seed, n_perturbed=n_perturbed,
                     n_retain_eval_authors=n_retain_eval_authors, n_countries=n_countries,
                     n_real_authors=n_real_authors, verbmem_prompt_words=verbmem_prompt_words)
    return world.split(forget_fraction)


def generate_authors(n: int, *, seed: int = 0) -> list[Author]:
    """``n`` fictitious authors of a fresh TinyTOFU world (without holdout authors)."""
    n = _check_int("n", n, 2, 2000)
    return TinyTOFU(n_authors=n, n_holdout=0, seed=seed, n_perturbed=1).authors


# --------------------------------------------------------------------------------------------
# Loaders for the real files
# --------------------------------------------------------------------------------------------

_SHARD_HINT = ".json, .jsonl, .parquet, {name}-*.parquet shards or a {name}/ folder of parquet"


def _as_dir(path: str | os.PathLike, what: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} data directory not found: {root}")
    return root


def _locate(folder: Path, names: Sequence[str], *, text_ok: bool = False) -> list[Path] | None:
    """The file(s) holding split ``names[0]`` (or an alternative name) under ``folder``."""
    exts = (".json", ".jsonl", ".parquet") + ((".txt",) if text_ok else ())
    for name in names:
        for ext in exts:
            if (folder / f"{name}{ext}").is_file():
                return [folder / f"{name}{ext}"]
        shards = sorted(folder.glob(f"{name}-*.parquet"))
        if shards:
            return shards
        sub = folder / name
        if sub.is_dir():
            files = sorted(sub.rglob("*.parquet"))
            if files:
                return files
    return None


def _missing(folder: Path, names: Sequence[str], what: str) -> FileNotFoundError:
    alts = " or ".join(repr(n) for n in names)
    return FileNotFoundError(f"{what}: no file for split {alts} in {folder} (looked for "
                             f"{_SHARD_HINT.format(name=names[0])})")


def _read_records(file: Path) -> list[Any]:
    """Rows of one file: a JSON array, JSON lines, one ``.txt`` document, or a parquet table."""
    if file.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {file} needs pyarrow, which is not installed: "
                              "`pip install pyarrow` (or convert the file to JSON lines)") from e
        return pq.read_table(file).to_pylist()
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".txt":
        return [text] if text.strip() else []
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        return obj if isinstance(obj, list) else [obj]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: line {lineno} is not valid JSON ({e.msg}); expected a "
                                 "JSON array or one JSON object per line") from None
    return rows


def _records(files: list[Path]) -> list[tuple[Path, int, Any]]:
    return [(f, i, row) for f in files for i, row in enumerate(_read_records(f))]


def _field(row: Any, name: str, file: Path, i: int) -> Any:
    if not isinstance(row, dict):
        raise ValueError(f"{file}: row {i} is a {type(row).__name__}, expected an object with "
                         f"field {name!r}")
    if name not in row or row[name] is None:
        raise ValueError(f"{file}: row {i} has no field {name!r} (fields: {sorted(row)})")
    return row[name]


def _str_field(row: Any, name: str, file: Path, i: int) -> str:
    value = _field(row, name, file, i)
    if not isinstance(value, str):
        raise ValueError(f"{file}: row {i} field {name!r} must be a string, got "
                         f"{type(value).__name__}")
    return value


def _qa_records(files: list[Path], *, paraphrase: bool = False, perturbed: bool = False
                ) -> list[QA]:
    """QA rows with TOFU's field names; ``paraphrase``/``perturbed`` make those fields required."""
    out = []
    for file, i, row in _records(files):
        question = _str_field(row, "question", file, i)
        answer = _str_field(row, "answer", file, i)
        para = _str_field(row, "paraphrased_answer", file, i) if paraphrase else (
            row.get("paraphrased_answer") if isinstance(row.get("paraphrased_answer"), str)
            else None)
        pert: Any = _field(row, "perturbed_answer", file, i) if perturbed else (
            row.get("perturbed_answer") or [])
        if isinstance(pert, str):
            pert = [pert]
        if not isinstance(pert, (list, tuple)) or not all(isinstance(p, str) for p in pert):
            raise ValueError(f"{file}: row {i} field 'perturbed_answer' must be a list of "
                             "strings")
        if perturbed and not pert:
            raise ValueError(f"{file}: row {i} field 'perturbed_answer' is empty")
        pq = row.get("paraphrased_question")
        out.append(QA(question, answer, para, tuple(pert),
                      paraphrased_question=pq if isinstance(pq, str) else None))
    return out


def _load(folder: Path, names: Sequence[str], what: str, reader: Callable[[list[Path]], Any],
          *, required: bool, text_ok: bool = False) -> Any:
    files = _locate(folder, names, text_ok=text_ok)
    if files is None:
        if required:
            raise _missing(folder, names, what)
        return []
    return reader(files)


def load_tofu(path: str | os.PathLike, split: str = "forget10") -> UnlearningData:
    """Read a TOFU split from a local folder of the ``locuslab/TOFU`` files.

    Required: ``{split}`` and ``retain{100-XX}`` (fields ``question``, ``answer``). Optional (empty
    when absent): ``{split}_perturbed`` (adds ``paraphrased_answer`` and ``perturbed_answer`` to
    the forget QA, matched by question), ``retain_perturbed`` (``retain_eval``),
    ``real_authors_perturbed`` and ``world_facts_perturbed`` (``perturbed_answer`` required),
    ``holdout{XX}``. Raw-text fields stay empty (TOFU has none).
    """
    if split not in TOFU_SPLITS:
        raise ValueError(f"split must be one of {list(TOFU_SPLITS)}, got {split!r}")
    root = _as_dir(path, "TOFU")
    pct = int(split[-2:])
    what = f"TOFU {split}"
    forget = _load(root, [split], what, _qa_records, required=True)
    perturbed = _load(root, [f"{split}_perturbed"], what,
                      lambda f: _qa_records(f, paraphrase=True, perturbed=True), required=False)
    by_question = {qa.question: qa for qa in perturbed}
    forget = [QA(qa.question, qa.answer, p.paraphrased_answer, p.perturbed_answers,
                 paraphrased_question=p.paraphrased_question)
              if (p := by_question.get(qa.question)) is not None else qa for qa in forget]
    data = UnlearningData(
        name=f"tofu-{split}",
        forget=forget,
        retain=_load(root, [f"retain{100 - pct:02d}"], what, _qa_records, required=True),
        retain_eval=_load(root, ["retain_perturbed"], what,
                          lambda f: _qa_records(f, paraphrase=True, perturbed=True),
                          required=False),
        real_authors=_load(root, ["real_authors_perturbed"], what,
                           lambda f: _qa_records(f, perturbed=True), required=False),
        world_facts=_load(root, ["world_facts_perturbed"], what,
                          lambda f: _qa_records(f, perturbed=True), required=False),
        holdout=_load(root, [f"holdout{pct:02d}"], what, _qa_records, required=False),
        meta={"source": "tofu", "split": split, "path": str(root)},
    )
    return data.validate()


def _texts(files: list[Path]) -> list[str]:
    """Documents: strings, or objects with a ``text`` field."""
    return [row if isinstance(row, str) else _str_field(row, "text", file, i)
            for file, i, row in _records(files)]


def _verbmem(files: list[Path]) -> list[tuple[str, str]]:
    return [(_str_field(row, "prompt", file, i), _str_field(row, "gt", file, i))
            for file, i, row in _records(files)]


def _muse_root(path: str | os.PathLike, corpus: str) -> Path:
    if corpus not in MUSE_CORPORA:
        raise ValueError(f"corpus must be one of {list(MUSE_CORPORA)}, got {corpus!r}")
    root = _as_dir(path, "MUSE")
    if any((root / sub).is_dir() for sub in ("raw", "knowmem", "verbmem", "privleak")):
        return root
    for alias in MUSE_CORPORA[corpus]:
        if (root / alias).is_dir():
            return root / alias
    raise FileNotFoundError(f"no MUSE {corpus} data under {root}: expected raw/, verbmem/ and "
                            "knowmem/ folders there or in one of its subfolders "
                            f"{list(MUSE_CORPORA[corpus])}")


def load_muse(path: str | os.PathLike, corpus: str = "news") -> UnlearningData:
    """Read MUSE-News (``corpus="news"``) or MUSE-Books (``"books"``) from a local folder.

    ``path`` is a snapshot of ``muse-bench/MUSE-News`` / ``MUSE-Books`` (or the ``data/<corpus>``
    folder of the MUSE repository), or a folder holding it as ``news``/``bbc``/``MUSE-News``
    (``books``/``hp``/``MUSE-Books``). Required: ``raw/forget``, ``raw/retain1``,
    ``knowmem/forget_qa`` and ``knowmem/retain_qa`` (or ``retain2_qa``). Optional: ``raw/retain2``
    (``retain_eval_text``), ``raw/holdout``, ``verbmem/forget``. A ``.txt`` raw split is one
    document (MUSE tokenizes and chunks the whole file).
    """
    root = _muse_root(path, corpus)
    what = f"MUSE {corpus}"
    raw, knowmem = root / "raw", root / "knowmem"
    qa = _qa_records
    data = UnlearningData(
        name=f"muse-{corpus}",
        forget_text=_load(raw, ["forget"], what, _texts, required=True, text_ok=True),
        retain_text=_load(raw, ["retain1"], what, _texts, required=True, text_ok=True),
        retain_eval_text=_load(raw, ["retain2"], what, _texts, required=False, text_ok=True),
        holdout_text=_load(raw, ["holdout"], what, _texts, required=False, text_ok=True),
        verbmem=_load(root / "verbmem", ["forget"], what, _verbmem, required=False),
        knowmem_forget=_load(knowmem, ["forget_qa", "forget-qa"], what, qa, required=True),
        knowmem_retain=_load(knowmem, ["retain_qa", "retain2_qa", "retain-qa", "retain2-qa"],
                             what, qa, required=True),
        meta={"source": "muse", "corpus": corpus, "path": str(root)},
    )
    return data.validate()


def load_muse_privleak(path: str | os.PathLike, corpus: str = "news") -> dict[str, list[str]]:
    """MUSE's PrivLeak documents (``privleak/forget``, ``retain`` or ``retain2``, ``holdout``; 100
    excerpts each in the release), the sets its reported Min-K% AUCs are computed on. ``forget``
    and ``holdout`` are required; ``retain`` is empty when absent."""
    root = _muse_root(path, corpus)
    folder, what = root / "privleak", f"MUSE {corpus} privleak"
    return {"forget": _load(folder, ["forget"], what, _texts, required=True),
            "retain": _load(folder, ["retain", "retain2"], what, _texts, required=False),
            "holdout": _load(folder, ["holdout"], what, _texts, required=True)}
