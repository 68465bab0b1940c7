"""E2E-NLG-style data-to-text data (Novikova et al. 2017), generated locally, and the real CSV loader.

The E2E NLG Challenge pairs a restaurant *meaning representation* (MR) with several human-written
references. An MR is a comma-separated list of ``slot[value]`` items, in the dataset's order::

    name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate],
    customer rating[3 out of 5], area[riverside], familyFriendly[yes], near[Burger King]

(one line in the files). :func:`parse_mr` turns such a string into an ordered ``dict`` and
:func:`format_mr` writes one back (the order of the ``dict`` is kept, so the two round-trip).

Generated data (:func:`make_e2e`)
---------------------------------
MRs use the eight real slots (``SLOTS``) and the real value sets of the closed slots
(``SLOT_VALUES``: eatType, food, priceRange, customer rating, area, familyFriendly); ``name`` and
``near`` are invented (``name`` like "The Copper Kettle" or "Marvola", ``near`` like "Kingsley
Hotel"; the two pools are disjoint and avoid every word a slot value or the grammar uses). Every MR
has ``name`` and 2-7 more slots drawn uniformly (3-8 slots in all, as in E2E), each with a uniform
value, written in ``SLOTS`` order; MRs are distinct.

Each MR gets ``refs_per_mr`` distinct references (a uniform count in the given inclusive range)
from a small composable grammar: every non-name slot is realised either as a premodifier of the
head noun ("a cheap French pub"), a postmodifier ("... in the city centre", "... with a rating of
5 out of 5", "... that is not family-friendly") or a verb phrase ("It serves Italian food and is
near Kingsley Hotel."); the head noun is the eatType (or "place", "venue", "spot" without one); an
opening clause ("X is a ...", "There is a ... called X", "X, a ..., ...", "A ... called X ...",
"Located in the riverside area, X is ...", or a verb-phrase sentence first and "It is a ..."
after) is followed by the remaining verb phrases, in one or more sentences with varied subjects
("It", the name, "The pub", "This venue"). Each slot has several phrasings (synonyms, word order),
so references of one MR share the slot values but little else: with ``make_e2e(1000, seed=0)`` the
mean pairwise sentence BLEU among references of the same MR is about 25 (median 23), and one
reference of each test MR scored against the others reaches a corpus BLEU of about 50 and a
ROUGE-L of about 0.55 (:mod:`optfm.data.text_metrics`) — a rough ceiling for a model that learnt
the grammar (the real E2E references score lower against each other).

**Every slot value is realised verbatim** (case-insensitively: "Fast food" as "fast food"), which
is what the slot error rate of :func:`optfm.data.text_metrics.slot_error_rate` checks; familyFriendly
is realised as "family-friendly" / "family friendly" / "kid friendly" / "kid-friendly" / "child
friendly" (``yes``) or the same after "not" / "isn't" (``no``) — the phrasings that metric
recognises. The references are fluent enough to train on, not human-like: there are no hedges,
omissions or hallucinations (the real references omit a slot in about 40 % of cases).

Splits are by MR: train/validation/test hold disjoint MRs (fractions ``splits``), as in E2E.
:func:`to_pairs` makes one ``(prompt, response)`` training pair per reference.

Real data (:func:`load_e2e_csv`)
--------------------------------
The E2E CSV files (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``, and the cleaned
release's files) have the columns ``mr`` and ``ref``, one row per reference; rows are grouped by
MR (first-seen order) into :class:`E2EExample`. A file with only an ``mr``/``MR`` column (the
reference-less ``testset.csv``) gives examples with no references.

Randomness only through the ``seed`` argument (Python's ``random.Random``): the same arguments
give the same data. Pure Python.
"""

from __future__ import annotations

import csv
import numbers
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optfm.data._checks import check_int as _check_int

__all__ = [
    "SLOTS",
    "SLOT_VALUES",
    "E2EData",
    "E2EExample",
    "format_mr",
    "generate_mrs",
    "load_e2e_csv",
    "make_e2e",
    "parse_mr",
    "realise_mr",
    "to_pairs",
]

SLOTS: tuple[str, ...] = ("name", "eatType", "food", "priceRange", "customer rating", "area",
                          "familyFriendly", "near")
"""The E2E slots, in the order the dataset writes them."""

SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "eatType": ("coffee shop", "pub", "restaurant"),
    "food": ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"),
    "priceRange": ("less than £20", "£20-25", "more than £30", "cheap", "moderate", "high"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
}
"""The values of E2E's closed slots (``name`` and ``near`` are open: venue names)."""


# --------------------------------------------------------------------------------------------
# MR strings
# --------------------------------------------------------------------------------------------

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")


def parse_mr(mr: str) -> dict[str, str]:
    """``"name[X], food[Y]"`` -> ``{"name": "X", "food": "Y"}`` (in the string's order).

    Slot names are stripped of surrounding spaces; values are kept as written. Raises
    ``ValueError`` for an empty MR, an item that is not ``slot[value]``, a missing or trailing
    comma, an empty value or a slot given twice. Any slot name is accepted (not only ``SLOTS``).
    """
    if not isinstance(mr, str):
        raise ValueError(f"mr must be a string, got {type(mr).__name__}")
    if not mr.strip():
        raise ValueError("mr is empty; expected 'slot[value], slot[value], ...'")
    out: dict[str, str] = {}
    pos = 0
    while True:
        m = _MR_ITEM.match(mr, pos)
        if m is None:
            raise ValueError(f"mr is malformed at character {pos}: expected 'slot[value]', got "
                             f"{mr[pos:pos + 30]!r} in {mr!r}")
        slot, value = m.group(1), m.group(2)
        if not value.strip():
            raise ValueError(f"mr gives slot {slot!r} an empty value: {mr!r}")
        if slot in out:
            raise ValueError(f"mr gives slot {slot!r} twice: {mr!r}")
        out[slot] = value
        pos = m.end()
        if pos == len(mr):
            return out
        if mr[pos] != ",":
            raise ValueError(f"mr is malformed at character {pos}: expected ',' between items, "
                             f"got {mr[pos:pos + 30]!r} in {mr!r}")
        pos += 1
        if not mr[pos:].strip():
            raise ValueError(f"mr ends with a comma: {mr!r}")


def format_mr(slots: Mapping[str, str]) -> str:
    """``{"name": "X", "food": "Y"}`` -> ``"name[X], food[Y]"``, in the mapping's order.

    Raises ``ValueError`` for an empty mapping, a slot name that is empty, has surrounding spaces
    or holds ``[``, ``]`` or ``,``, or a value that is empty or holds ``[`` or ``]``.
    """
    if not isinstance(slots, Mapping) or not slots:
        raise ValueError(f"slots must be a non-empty mapping of slot -> value, got {slots!r}")
    items = []
    for slot, value in slots.items():
        if (not isinstance(slot, str) or not slot or slot != slot.strip()
                or any(c in slot for c in "[],")):
            raise ValueError(f"slots has an invalid slot name {slot!r}: a non-empty string "
                             "without '[', ']', ',' or surrounding spaces")
        if not isinstance(value, str) or not value.strip() or "[" in value or "]" in value:
            raise ValueError(f"slots[{slot!r}] must be a non-empty string without '[' or ']', "
                             f"got {value!r}")
        items.append(f"{slot}[{value}]")
    return ", ".join(items)


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass
class E2EExample:
    """One MR (an E2E string) and its references."""

    mr: str
    references: list[str] = field(default_factory=list)

    @property
    def slots(self) -> dict[str, str]:
        """``parse_mr(self.mr)``."""
        return parse_mr(self.mr)


@dataclass
class E2EData:
    """Train/validation/test examples (disjoint MRs) and provenance in ``meta``."""

    train: list[E2EExample]
    validation: list[E2EExample]
    test: list[E2EExample]
    meta: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of MRs per split."""
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test)}

    def n_references(self) -> dict[str, int]:
        """Number of references (training pairs) per split."""
        return {name: sum(len(ex.references) for ex in getattr(self, name))
                for name in ("train", "validation", "test")}


def to_pairs(split: Sequence[E2EExample], prompt_template: str = "{mr}\n"
             ) -> list[tuple[str, str]]:
    """One ``(prompt, response)`` pair per reference: ``prompt_template.format(mr=ex.mr)`` and the
    reference. ``prompt_template`` must contain ``{mr}`` and no other field."""
    if not isinstance(prompt_template, str) or "{mr}" not in prompt_template:
        raise ValueError(f"prompt_template must be a string containing '{{mr}}', got "
                         f"{prompt_template!r}")
    try:
        prompt_template.format(mr="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt_template may hold no field but {{mr}} (write '{{{{' for a "
                         f"literal brace), got {prompt_template!r}: {err}") from None
    return [(prompt_template.format(mr=ex.mr), ref) for ex in split for ref in ex.references]


# --------------------------------------------------------------------------------------------
# Generation: MRs
# --------------------------------------------------------------------------------------------

_NAME_ADJ = ("Golden", "Silver", "Copper", "Crooked", "Little", "Jolly", "Hidden", "Velvet",
             "Rusty", "Lucky", "Sleepy", "Crimson", "Amber", "Ivory", "Twisted", "Humble", "Merry",
             "Painted", "Brass", "Wandering", "Northern", "Blue", "Scarlet", "Dancing", "Whistling")
_NAME_NOUN = ("Kettle", "Lantern", "Anchor", "Fox", "Owl", "Compass", "Acorn", "Willow", "Sparrow",
              "Thistle", "Falcon", "Teapot", "Spoon", "Barrel", "Bell", "Heron", "Otter", "Badger",
              "Quill", "Lark", "Pelican", "Swan", "Wheel", "Ladle", "Feather", "Pear", "Plum")
_ONSETS = ("b", "br", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o")
_CODAS = ("", "", "", "n", "r", "l", "s")
_NEAR_SURNAME = ("Ashworth", "Bramley", "Carrow", "Dunmore", "Elmsley", "Fairfax", "Grantham",
                 "Harcourt", "Kingsley", "Langley", "Marlow", "Norcott", "Pemberton", "Redfield",
                 "Stanford", "Thornbury", "Whitmore", "Yardley", "Beckett", "Cresswell")
_NEAR_PLACE = ("Hotel", "Arms", "Museum", "Theatre", "Station", "Gallery", "Bridge", "Market",
               "Library", "Cinema", "Inn", "Lodge")
_OPEN_SLOTS = ("name", "near")


def _invented_name(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return f"The {rng.choice(_NAME_ADJ)} {rng.choice(_NAME_NOUN)}"
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.randint(2, 3)))
    return word.capitalize()


_RESERVED = re.compile(
    r"\b(?:" + "|".join(sorted({w.lower() for vs in SLOT_VALUES.values() for v in vs
                                for w in re.findall(r"[A-Za-z]+", v)}
                               | {"family", "kid", "kids", "child", "children", "friendly", "not",
                                  "isn", "place", "venue", "spot", "food", "cuisine", "dishes",
                                  "price", "prices", "rating", "rated", "near", "it", "this",
                                  "called", "named", "located", "centre", "river", "range"}))
    + r")\b", re.IGNORECASE)


def generate_mrs(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct generated MRs (ordered dicts, ``SLOTS`` order), each with ``name`` and 2-7
    more slots (uniform count, uniform subset, uniform values)."""
    n = _check_int("n", n, 0)
    rng = random.Random(_check_int("seed", seed, 0))
    seen: dict[str, dict[str, str]] = {}
    others = SLOTS[1:]
    while len(seen) < n:
        name = _invented_name(rng)
        if _RESERVED.search(name):
            continue
        chosen = set(rng.sample(others, rng.randint(2, len(others))))
        mr = {"name": name}
        for slot in others:
            if slot not in chosen:
                continue
            if slot == "near":
                mr[slot] = f"{rng.choice(_NEAR_SURNAME)} {rng.choice(_NEAR_PLACE)}"
            else:
                mr[slot] = rng.choice(SLOT_VALUES[slot])
        key = format_mr(mr)
        if key not in seen:
            seen[key] = mr
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# Generation: the grammar
# --------------------------------------------------------------------------------------------

_LEVELS = ("low", "average", "high", "cheap", "moderate")


def _food_np(v: str) -> list[str]:
    if v.lower() == "fast food":
        return ["fast food"]
    return [f"{v} food", f"{v} cuisine", f"{v} dishes", f"{v} meals"]


def _forms(slot: str, v: str) -> dict[str, list[str]]:
    """Phrasings of one slot value: ``pre`` (premodifier), ``pp`` (postmodifier) and ``vp``
    (third-person verb phrase). Every phrasing holds ``v`` verbatim (familyFriendly: a
    family-friendly phrase, negated for ``no``)."""
    if slot == "food":
        nps = _food_np(v)
        return {"pre": ["fast food" if v.lower() == "fast food" else v],
                "pp": [f"{p} {np}" for p in ("serving", "offering") for np in nps]
                + [f"that serves {np}" for np in nps],
                "vp": [f"{verb} {np}" for verb in ("serves", "offers", "provides",
                                                   "specialises in") for np in nps]
                + [f"has {np} on the menu" for np in nps]}
    if slot == "priceRange":
        if v in _LEVELS:
            pre = {"cheap": ["cheap"], "high": ["high-priced"]}.get(v, [])
            return {"pre": pre,
                    "pp": [f"with {_a(v)} {v} price range", f"with {v} prices"],
                    "vp": [f"has {_a(v)} {v} price range", f"offers {v} prices",
                           f"has {v} prices", f"is in the {v} price range"]
                    + (["is cheap"] if v == "cheap" else [])}
        return {"pre": [],
                "pp": [f"with a price range of {v}", f"with prices of {v}", f"charging {v}",
                       f"with meals for {v}"],
                "vp": [f"has a price range of {v}", f"charges {v}", f"costs {v} per person",
                       f"has meals for {v}", f"has prices of {v}"]}
    if slot == "customer rating":
        if v in _LEVELS:
            return {"pre": [f"{v}-rated"],
                    "pp": [f"with {_a(v)} {v} customer rating", f"with {_a(v)} {v} rating"],
                    "vp": [f"has {_a(v)} {v} customer rating", f"is rated {v} by customers",
                           f"has {_a(v)} {v} rating", f"gets {v} ratings from customers",
                           f"has received {_a(v)} {v} customer rating"]}
        return {"pre": [],
                "pp": [f"with a customer rating of {v}", f"with a rating of {v}",
                       f"rated {v} by customers"],
                "vp": [f"has a customer rating of {v}", f"is rated {v}", f"has a rating of {v}",
                       f"is rated {v} by customers", f"has been rated {v} by its customers"]}
    if slot == "area":
        if v == "riverside":
            return {"pre": ["riverside"],
                    "pp": ["by the riverside", "on the riverside", "in the riverside area"],
                    "vp": ["is on the riverside", "is located by the riverside",
                           "is in the riverside area", "can be found by the riverside",
                           "sits on the riverside"]}
        return {"pre": [v],
                "pp": [f"in the {v}", f"located in the {v}", f"in the {v} area"],
                "vp": [f"is in the {v}", f"is located in the {v}", f"is situated in the {v}",
                       f"can be found in the {v}", f"is in the {v} area"]}
    if slot == "familyFriendly":
        if v.lower() == "yes":
            return {"pre": ["family-friendly", "kid-friendly", "child-friendly"],
                    "pp": ["that is family-friendly", "that is kid friendly",
                           "which is child friendly"],
                    "vp": ["is family-friendly", "is kid friendly", "is child friendly",
                           "is family friendly", "is kid-friendly"]}
        return {"pre": [],
                "pp": ["that is not family-friendly", "that isn't kid friendly",
                       "which is not child friendly"],
                "vp": ["is not family-friendly", "is not kid friendly", "isn't child friendly",
                       "is not family friendly", "is not kid-friendly"]}
    if slot == "near":
        return {"pre": [],
                "pp": [f"near {v}", f"close to {v}", f"not far from {v}", f"next to {v}",
                       f"located near {v}"],
                "vp": [f"is near {v}", f"is located near {v}", f"is close to {v}",
                       f"is not far from {v}", f"is next to {v}", f"is in the vicinity of {v}"]}
    raise ValueError(f"no grammar for slot {slot!r}; the generated data uses {list(SLOTS)}")


_RELATIVE = ("that ", "which ")
_LOCATIVE = ("in the ", "by the ", "on the ", "located ", "near ", "close to ", "next to ",
             "not far from ")
_PRE_ORDER = ("priceRange", "customer rating", "familyFriendly", "area", "food")
_NOUNS = ("place", "venue", "spot")


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(parts: Sequence[str], rng: random.Random) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    comma = "," if len(parts) > 2 and rng.random() < 0.5 else ""
    return ", ".join(parts[:-1]) + f"{comma} and {parts[-1]}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _chunks(items: list[str], rng: random.Random) -> list[list[str]]:
    out = []
    i = 0
    while i < len(items):
        k = rng.randint(1, 3)
        out.append(items[i:i + k])
        i += k
    return out


def realise_mr(mr: Mapping[str, str] | str, rng: random.Random | int) -> str:
    """One reference for ``mr`` (a dict or an E2E string) from the grammar (module docstring).

    Every slot value is realised; ``mr`` may hold any subset of ``SLOTS`` but must hold ``name``.
    """
    slots = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    if "name" not in slots:
        raise ValueError(f"mr must have a name slot, got {format_mr(slots)!r}")
    gen = rng if isinstance(rng, random.Random) else random.Random(rng)
    name = slots["name"]
    noun = slots.get("eatType") or gen.choice(_NOUNS)
    others = [s for s in slots if s not in ("name", "eatType")]
    gen.shuffle(others)

    pre: dict[str, str] = {}
    pp: list[str] = []
    vp: list[str] = []
    for slot in others:
        forms = _forms(slot, slots[slot])
        r = gen.random()
        if forms["pre"] and r < 0.25 and len(pre) < 2:
            pre[slot] = gen.choice(forms["pre"])
        elif r < 0.5 and len(pp) < 2:
            pp.append(gen.choice(forms["pp"]))
        else:
            vp.append(gen.choice(forms["vp"]))
    # locations first, relative clauses ("that ...", "which ...") last; a second phrase that is
    # not a location or a relative clause ("with ...", "rated ...", "serving ...") gets "and"
    pp.sort(key=lambda p: 2 if p.startswith(_RELATIVE) else 0 if p.startswith(_LOCATIVE) else 1)
    coordinate = len(pp) == 2 and not pp[1].startswith(_RELATIVE + _LOCATIVE)
    if len(pp) == 2 and pp[0].startswith(_RELATIVE):      # "that serves ... and is not ..."
        post = f"{pp[0]} and {pp[1].split(' ', 1)[1]}"
    else:
        post = " and ".join(pp) if coordinate else " ".join(pp)
    adjs = [pre[s] for s in _PRE_ORDER if s in pre]
    head = " ".join([*adjs, noun])
    np_ = f"{_a(head)} {head}" + (f" {post}" if post else "")

    sentences: list[str] = []
    rest = vp
    form = gen.randrange(6)
    if form == 0:                                    # X is a ... [that VP and VP].
        if rest and gen.random() < 0.4:
            k = gen.randint(1, min(2, len(rest)))
            sentences.append(f"{name} is {np_} that {_join(rest[:k], gen)}")
            rest = rest[k:]
        else:
            sentences.append(f"{name} is {np_}")
    elif form == 1:                                  # There is a ... called X.
        verb = gen.choice(("called", "named", "by the name of"))
        if post:
            sentences.append(f"There is {_a(head)} {head} {verb} {name} {post}")
        else:
            sentences.append(f"There is {np_} {verb} {name}")
    elif form == 2 and rest:                         # X, a ..., VP.
        k = gen.randint(1, min(2, len(rest)))
        sentences.append(f"{name}, {np_}, {_join(rest[:k], gen)}")
        rest = rest[k:]
    elif form == 3 and rest:                         # A ... called X VP.
        k = gen.randint(1, min(2, len(rest)))
        sentences.append(f"{_a(head)} {head} called {name}" + (f", {post}," if post else "")
                         + f" {_join(rest[:k], gen)}")
        rest = rest[k:]
    elif form == 4 and rest:                         # X VP. It is a ...
        k = gen.randint(1, min(2, len(rest)))
        sentences.append(f"{name} {_join(rest[:k], gen)}")
        sentences.append(f"{gen.choice(('It', 'This'))} is {np_}")
        rest = rest[k:]
    else:                                            # X is a ... (plain, or fronted location)
        area_pps = ("in the", "by the", "on the", "located in")
        fronted = [p for p in pp if p.startswith(area_pps)] if len(pp) == 1 else []
        if fronted and gen.random() < 0.6:
            loc = fronted[0].removeprefix("located ")
            np_plain = f"{_a(head)} {head}"
            sentences.append(f"{gen.choice(('Located', 'Situated'))} {loc}, {name} is {np_plain}")
        else:
            sentences.append(f"{name} is {np_}")
    subjects = ("It", "It", name, f"The {noun}", f"This {noun}")
    for chunk in _chunks(rest, gen):
        sentences.append(f"{gen.choice(subjects)} {_join(chunk, gen)}")
    return " ".join(_cap(s) + "." for s in sentences)


def _references(mr: dict[str, str], k: int, rng: random.Random) -> list[str]:
    refs: dict[str, None] = {}
    for _ in range(50 * k):
        refs[realise_mr(mr, rng)] = None
        if len(refs) == k:
            break
    return list(refs)


def make_e2e(n_mrs: int, *, seed: int = 0, refs_per_mr: int | tuple[int, int] = (3, 6),
             splits: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> E2EData:
    """Generated E2E-style data: ``n_mrs`` distinct MRs with references, split by MR.

    Args:
        n_mrs: number of distinct MRs, >= 1.
        seed: seeds the MRs, the references and the split.
        refs_per_mr: references per MR, an int or an inclusive ``(low, high)`` range with
            1 <= low <= high <= 20; each MR draws its count uniformly. (An MR with very few slots
            could in principle get fewer distinct references than drawn; none does in practice.)
        splits: train/validation/test fractions, each >= 0, summing to 1; the validation and
            test counts are rounded and train takes the rest.
    """
    n_mrs = _check_int("n_mrs", n_mrs, 1)
    seed = _check_int("seed", seed, 0)
    if isinstance(refs_per_mr, numbers.Integral) and not isinstance(refs_per_mr, bool):
        lo = hi = _check_int("refs_per_mr", refs_per_mr, 1, 20)
    elif isinstance(refs_per_mr, Sequence) and len(refs_per_mr) == 2:
        lo = _check_int("refs_per_mr[0]", refs_per_mr[0], 1, 20)
        hi = _check_int("refs_per_mr[1]", refs_per_mr[1], lo, 20)
    else:
        raise ValueError(f"refs_per_mr must be an int or a (low, high) pair, got {refs_per_mr!r}")
    fractions = _check_splits(splits)
    mrs = generate_mrs(n_mrs, seed=seed)
    rng = random.Random(seed + 1_000_003)
    examples = [E2EExample(format_mr(mr), _references(mr, rng.randint(lo, hi), rng))
                for mr in mrs]
    rng.shuffle(examples)
    n_val = round(n_mrs * fractions[1])
    n_test = min(round(n_mrs * fractions[2]), n_mrs - n_val)
    n_train = n_mrs - n_val - n_test
    return E2EData(
        train=examples[:n_train], validation=examples[n_train:n_train + n_val],
        test=examples[n_train + n_val:],
        meta={"source": "generated", "seed": seed, "n_mrs": n_mrs, "refs_per_mr": [lo, hi],
              "splits": list(fractions)},
    )


def _check_splits(splits: Any) -> tuple[float, float, float]:
    if not isinstance(splits, Sequence) or len(splits) != 3:
        raise ValueError(f"splits must be three fractions (train, validation, test), got {splits!r}")
    out = []
    for s in splits:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s <= 1:
            raise ValueError(f"splits must be fractions in [0, 1], got {splits!r}")
        out.append(float(s))
    if abs(sum(out) - 1) > 1e-6:
        raise ValueError(f"splits must sum to 1, got {splits!r} (sum {sum(out)})")
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def load_e2e_csv(path: str | os.PathLike) -> list[E2EExample]:
    """Read an E2E CSV file (columns ``mr`` and ``ref``, any case, one row per reference) into
    examples grouped by MR in first-seen order. Every MR is checked with :func:`parse_mr`
    (``ValueError`` with the line number); a file without a ``ref`` column gives examples with no
    references; empty references are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"E2E CSV file not found: {p}")
    groups: dict[str, list[str]] = {}
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "mr" not in columns:
            raise ValueError(f"{p}: expected an 'mr' column (and a 'ref' column), got columns "
                             f"{reader.fieldnames}")
        mr_col, ref_col = columns["mr"], columns.get("ref")
        for line, row in enumerate(reader, start=2):
            mr = (row.get(mr_col) or "").strip()
            try:
                parse_mr(mr)
            except ValueError as err:
                raise ValueError(f"{p}:{line}: {err}") from None
            refs = groups.setdefault(mr, [])
            ref = (row.get(ref_col) or "").strip() if ref_col else ""
            if ref:
                refs.append(ref)
    return [E2EExample(mr, refs) for mr, refs in groups.items()]
