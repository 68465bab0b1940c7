"""Text-generation metrics for data-to-text (E2E): corpus BLEU, ROUGE-L and the slot error rate.

- :func:`corpus_bleu`: ``sacrebleu.corpus_bleu`` (BLEU-4, ``13a`` tokenization, case-sensitive by
  default; 0-100) with multiple references per hypothesis. ``references[i]`` lists the references
  of hypothesis ``i`` and may have any length >= 1: sacrebleu takes reference *streams*
  (``refs[j][i]`` = the j-th reference of item i), so the lists are transposed and the shorter
  ones padded with ``None``, which sacrebleu drops per segment. (Padding with ``""`` would be
  wrong: an empty string is kept as a zero-length reference and can win the closest-length
  choice of the brevity penalty.)
- :func:`sentence_bleu`: ``sacrebleu.sentence_bleu`` (exponential smoothing), for per-item scores
  and for the variety of a reference set.
- :func:`rouge_l`: the mean over items of the best ROUGE-L F-measure against that item's
  references (``rouge_score``, ``RougeScorer(["rougeL"], use_stemmer=True)``; 0-1).
- :func:`slot_error_rate`: the fraction of MR slot values *not realised* in the hypothesis
  (missing slots only; E2E's full SER also counts added and wrong values, which need a
  value-spotting parser). A value is realised when it occurs verbatim, case-insensitively, between
  non-word characters ("high" is found in "high-priced" but not in "highly"). familyFriendly is
  the exception (its values are ``yes``/``no``): a *friendly phrase* is ``family``, ``kid(s)``,
  ``child`` or ``children`` followed by ``friendly`` (joined by a space, a hyphen or nothing); it
  is *negated* when "not", "isn't", "is not", "aren't", "non", "never" or "no" comes right before
  it (optionally with "very", "really", "particularly", "so", "too" or "especially" between). ``yes``
  is realised by a friendly phrase that is not negated, ``no`` by a negated one or by "adults
  only" / "adult only" / "no children" / "no kids". These are the phrasings the grammar of
  :mod:`optfm.data.e2e` uses (and the common ones in the real E2E references). Verbatim matching
  is lenient in one way: two slots with the same value ("high" price and "high" rating) are both
  found in a text that realises one of them.

sacrebleu and rouge_score are imported when a function needs them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from optfm.data.e2e import parse_mr

__all__ = [
    "corpus_bleu",
    "missing_slots",
    "rouge_l",
    "sentence_bleu",
    "slot_error_rate",
    "slot_realised",
]


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("BLEU needs sacrebleu: pip install sacrebleu") from err
    return sacrebleu


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                 ref_name: str = "references") -> None:
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise ValueError(f"hypotheses must be a list of strings, got {type(hypotheses).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(f"{ref_name} must be a list (one entry per hypothesis), got "
                         f"{type(references).__name__}")
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses and {ref_name} must have the same length, got "
                         f"{len(hypotheses)} and {len(references)}")
    if not hypotheses:
        raise ValueError("hypotheses is empty")
    for i, h in enumerate(hypotheses):
        if not isinstance(h, str):
            raise ValueError(f"hypotheses[{i}] must be a string, got {type(h).__name__}")


def _check_refs(references: Sequence[Sequence[str]]) -> list[list[str]]:
    out = []
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references[{i}] must be a list of reference strings (wrap a single "
                             f"reference in a list), got {type(refs).__name__}")
        if not refs:
            raise ValueError(f"references[{i}] is empty; every hypothesis needs >= 1 reference")
        for j, r in enumerate(refs):
            if not isinstance(r, str):
                raise ValueError(f"references[{i}][{j}] must be a string, got {type(r).__name__}")
        out.append(list(refs))
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                lowercase: bool = False, tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` against ``references[i]`` (any number >= 1 each).

    Raises ``ValueError`` when the lengths differ, a reference list is empty or is a bare string.
    """
    _check_pairs(hypotheses, references)
    refs = _check_refs(references)
    n_streams = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n_streams)]
    sb = _sacrebleu()
    return float(sb.corpus_bleu(list(hypotheses), streams, lowercase=lowercase,
                                tokenize=tokenize).score)


def sentence_bleu(hypothesis: str, references: Sequence[str], *, lowercase: bool = False,
                  tokenize: str = "13a") -> float:
    """Sentence BLEU (0-100, sacrebleu's default exponential smoothing) of one hypothesis."""
    _check_pairs([hypothesis], [references])
    refs = _check_refs([references])[0]
    return float(_sacrebleu().sentence_bleu(hypothesis, refs, lowercase=lowercase,
                                            tokenize=tokenize).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over items of the best ROUGE-L F-measure against that item's references (0-1)."""
    _check_pairs(hypotheses, references)
    refs = _check_refs(references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ROUGE-L needs rouge-score: pip install rouge-score") from err
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for hyp, item_refs in zip(hypotheses, refs):
        total += max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in item_refs)
    return total / len(hypotheses)


# --------------------------------------------------------------------------------------------
# Slot error rate
# --------------------------------------------------------------------------------------------

_FRIENDLY = r"(?:family|kids?|child|children)[\s-]?friendly"
_NEGATOR = r"(?:not|isn't|isnt|is\s+not|aren't|non|never|no)"
_INTENSIFIER = r"(?:very|really|particularly|so|too|especially)"
_FRIENDLY_RE = re.compile(rf"(?<!\w){_FRIENDLY}(?!\w)", re.IGNORECASE)
_NEGATED_RE = re.compile(rf"(?<!\w){_NEGATOR}[\s-]+(?:{_INTENSIFIER}\s+)?({_FRIENDLY})(?!\w)",
                         re.IGNORECASE)
_NOT_FOR_FAMILIES_RE = re.compile(r"(?<!\w)(?:adults?[\s-]only|no\s+(?:children|kids))(?!\w)",
                                  re.IGNORECASE)


def _family_mentions(text: str) -> tuple[bool, bool]:
    """(has a non-negated friendly phrase, has a negated one or an adults-only phrase)."""
    negated_starts = {m.start(1) for m in _NEGATED_RE.finditer(text)}
    positive = any(m.start() not in negated_starts for m in _FRIENDLY_RE.finditer(text))
    negative = bool(negated_starts) or bool(_NOT_FOR_FAMILIES_RE.search(text))
    return positive, negative


def slot_realised(slot: str, value: str, text: str) -> bool:
    """Whether ``text`` realises ``slot[value]`` (rules in the module docstring)."""
    if slot == "familyFriendly" and value.strip().lower() in ("yes", "no"):
        positive, negative = _family_mentions(text)
        return positive if value.strip().lower() == "yes" else negative
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in value.split()) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def missing_slots(hypothesis: str, mr: str | Mapping[str, str]) -> list[str]:
    """The slots of ``mr`` (an E2E string or a dict) that ``hypothesis`` does not realise."""
    slots = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    return [s for s, v in slots.items() if not slot_realised(s, v, hypothesis)]


def slot_error_rate(hypotheses: Sequence[str], mrs: Sequence[str | Mapping[str, str]]) -> float:
    """Fraction of the MRs' slot values (all slots, ``name`` included) that the hypotheses do not
    realise: ``sum_i |missing_slots(h_i, mr_i)| / sum_i |mr_i|`` (0 = every value realised)."""
    _check_pairs(hypotheses, mrs, "mrs")
    missing = total = 0
    for i, (hyp, mr) in enumerate(zip(hypotheses, mrs)):
        if not isinstance(mr, (str, Mapping)):
            raise ValueError(f"mrs[{i}] must be an MR string or a dict, got {type(mr).__name__}")
        slots = parse_mr(mr) if isinstance(mr, str) else dict(mr)
        total += len(slots)
        missing += len(missing_slots(hyp, slots))
    if total == 0:
        raise ValueError("mrs hold no slots")
    return missing / total
