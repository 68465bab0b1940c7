r"""Unlearning metrics: TOFU (truth ratio, forget quality, model utility) and MUSE (VerbMem,
KnowMem, Min-K% PrivLeak), plus a degeneracy check.

Two levels. Pure functions on numbers and strings (``truth_ratio``, ``forget_quality``,
``harmonic_mean``, ``min_k_percent_score``, ``auc``, ``priv_leak``, ``rouge_l_recall``, ...) work
on any source of log-likelihoods; model-level functions (``answer_nll``, ``truth_ratios``,
``tofu_eval``, ``muse_eval``) take any ``transformers`` causal LM and its tokenizer, batch
internally and run under ``torch.no_grad()`` in eval mode (the training flag is restored).

Notation. For a question ``q`` and an answer ``a`` of ``|a|`` tokens, ``NLL(a) = −Σ_t log
p(a_t | q, a_<t)`` over the answer tokens (with the EOS that training appends,
:func:`optfm.training.lm.encode_pairs`), and ``avgNLL(a) = NLL(a)/|a|``. Per-token normalised
probability ``P(a) = exp(−avgNLL(a)) = p(a|q)^{1/|a|}``.

TOFU (Maini et al. 2024, arXiv 2401.06121; code: locuslab/tofu ``evaluate_util.py`` and
``aggregate_eval_stat.py``)
---------------------------------------------------------------------------------------------
- **Answer probability** (forget, retain): ``mean_i P(a_i)``.  For real authors and world facts
  the answer is scored as a multiple choice against its perturbed answers::

      P_norm(a) = P(a) / (P(a) + Σ_j P(a_pert_j))

  The paper writes ``P(a|q)/Σ_i P(a_i|q)`` without saying whether P is length-normalised; the
  reference code (``get_model_utility``) uses the per-token normalised ``exp(−avgNLL)`` for every
  term (``avg_gt_loss`` and ``average_perturb_loss``). :func:`normalized_answer_prob` takes the
  NLLs you give it: pass per-token averages for TOFU's code convention (what :func:`tofu_eval`
  does) or sums for sequence probabilities ``exp(−NLL)``.
- **Truth ratio** per question (the code's convention, used here)::

      R = P_pert / P_para,   P_pert = exp(−mean_j avgNLL(a_pert_j)),   P_para = exp(−avgNLL(ã))

  i.e. ``P_pert`` is the *geometric* mean over the perturbed answers of their per-token
  probabilities (the paper's formula writes an arithmetic mean; the code averages the losses).
  ``ã`` is the paraphrased answer on forget/retain and the answer itself on real authors and
  world facts (TOFU's ``base_answer_key``). Aggregates (:func:`truth_ratio_stat`)::

      forget:  mean_i min(R_i, 1/R_i)        retain/real/world:  mean_i max(0, 1 − R_i)

  TOFU's code stores the inverse ``exp(avgNLL_pert − avgNLL_para) = 1/R`` and writes the
  aggregates as ``min(x, 1/x)`` and ``max(0, 1 − 1/x)``; they are the same numbers.
  A second convention (the "paper variant", :func:`truth_ratio_paper`) reports
  ``p_para / (p_para + p_pert) = 1/(1 + R)`` in [0, 1]: 1/2 when the model cannot tell the
  paraphrase from the perturbations, → 1 when it prefers the true paraphrase.
- **Forget quality**: p-value of the two-sided two-sample Kolmogorov-Smirnov test
  (``scipy.stats.ks_2samp``) between the unlearned model's and the retain model's truth ratios
  on the forget set. KS is invariant under a strictly monotone map applied to both samples, so
  using ``R`` or TOFU's stored ``1/R`` gives the same p-value.
- **Model utility**: harmonic mean of the nine statistics {retain, real_authors, world_facts} ×
  {answer prob, ROUGE-L recall, truth ratio} (``scipy.stats.hmean`` in TOFU).
- **ROUGE-L recall** of the greedy generation against the answer: ``rouge_score`` with
  ``RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)``, ``.recall`` (TOFU).

MUSE (Shi et al. 2024, arXiv 2407.06460; code: swj0419/muse_bench ``eval.py`` and
``metrics/{verbmem,knowmem,privleak,logger}.py``)
-------------------------------------------------------------------------------------------
- **VerbMem**: ROUGE-L F1 between the greedy continuation (128 new tokens) of a forget-text
  prompt and the true continuation cut to its first 128 tokens. MUSE's ``RougeEvalLogger`` uses
  ``use_stemmer=False`` and aggregates ``mean_rougeL`` = the F-measure.
- **KnowMem** on forget and retain QA: greedy answer (32 new tokens) to ``"Question: q\nAnswer: "``
  (MUSE adds few-shot examples), cut at ``"\n\n"``, ``"\nQuestion"`` or ``"Question:"``, scored by
  ROUGE-L against the answer. MUSE's default aggregate key ``mean_rougeL`` is the F-measure; TOFU
  and our spec use recall: :func:`muse_eval` reports both.
- **Min-K% score** of a text (Shi et al. 2023): the mean of the lowest ``k`` fraction
  (``floor(k·n)`` of its ``n`` scored tokens, at least 1) of token log-probabilities
  ``log p(x_t | x_<t)``. Sign convention here: :func:`min_k_percent_score` returns that mean
  log-probability, so **higher = more likely a training member**. MUSE stores its negation
  (``Min-40% = −mean``, a loss, lower = member).
- **AUC**: :func:`auc` is the usual membership-inference AUC with members as the positive class
  and higher score = member (1 = members perfectly detected, 0.5 = chance). MUSE's PrivLeak key
  ``forget_holdout_Min-40%`` instead labels *forget* as the non-member class and *holdout* as
  the member class (``roc_curve(y, −ppl)``), so its AUC is ``auc(holdout, forget) =
  1 − auc(forget, holdout)``: ≈ 0 for a model that still knows the forget set, ≈ 0.5 for one
  never trained on it. :func:`muse_eval` reports ``mink_auc`` in MUSE's orientation so
  **PrivLeak** = ``(AUC_unl − AUC_retrain)/AUC_retrain × 100`` is comparable with MUSE's
  published ``AUC_retrain`` (0.4772 on News): ≈ 0 is ideal, ≈ −100 means nothing was unlearned,
  large positive means over-unlearning.

Degeneracy
----------
Gradient-ascent-style unlearning collapses generations into loops ("and and and ...").
:func:`repetition_rate` of a text is the fraction of its word n-grams (after the first) that
repeat an earlier n-gram: ``(#ngrams − #distinct)/(#ngrams − 1)``, 1.0 for "and and and and"
(n=2), 0.0 for a sentence without a repeated n-gram, 0.0 for texts with fewer than two n-grams.
Words are lower-cased ``\w+`` runs (punctuation dropped). :func:`is_degenerate` thresholds it.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from optfm.training.lm import (
    IGNORE_INDEX,
    check_tokenizer_model,
    encode_pairs,
    generate_greedy,
    sequence_logprob,
    token_logprobs,
)

__all__ = [
    "MODEL_UTILITY_KEYS",
    "MUSE_KNOWMEM_STOP",
    "ForgetQuality",
    "answer_nll",
    "answer_nll_sum",
    "answer_prob",
    "auc",
    "forget_quality",
    "harmonic_mean",
    "is_degenerate",
    "min_k_percent_score",
    "min_k_scores",
    "model_utility",
    "muse_eval",
    "normalized_answer_prob",
    "priv_leak",
    "repetition_rate",
    "rouge_l",
    "rouge_l_f1",
    "rouge_l_recall",
    "tofu_eval",
    "truth_ratio",
    "truth_ratio_paper",
    "truth_ratio_stat",
    "truth_ratios",
]

UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("answer_prob", "rougeL_recall", "truth_ratio")
#: The nine statistics whose harmonic mean is TOFU's model utility.
MODEL_UTILITY_KEYS: tuple[str, ...] = tuple(
    f"{s}_{m}" for s in UTILITY_SPLITS for m in UTILITY_METRICS)
#: MUSE's KnowMem post-processing: the answer is cut before the first of these strings.
MUSE_KNOWMEM_STOP: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")

_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------------------------
# validation helpers


def _vector(x: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """A finite float64 vector, or ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per item), got shape "
                         f"{arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; it needs at least one value")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite; entry {bad} is {arr[bad]}")
    return arr


def _rows(x: Any, name: str, n: int) -> list[np.ndarray]:
    """``n`` non-empty finite rows from a 2-D array or a ragged sequence of sequences."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (questions × perturbed answers) or a list of "
                             f"per-question sequences, got shape {x.shape}")
        rows = [np.asarray(r, dtype=np.float64) for r in x]
    else:
        if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
            raise ValueError(f"{name} must be a 2-D array or a sequence of per-question "
                             f"sequences, got {type(x).__name__}")
        rows = [_vector(r, f"{name}[{i}]", allow_empty=True) for i, r in enumerate(x)]
    if len(rows) != n:
        raise ValueError(f"{name} has {len(rows)} rows but there are {n} questions; give one row "
                         "of perturbed-answer values per question")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"{name}[{i}] is empty; every question needs at least one "
                             "perturbed answer")
        if not np.all(np.isfinite(r)):
            raise ValueError(f"{name}[{i}] must be finite, got {r.tolist()}")
    return rows


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    return float(k)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _strings(x: Any, name: str, *, allow_empty_strings: bool = True) -> list[str]:
    if isinstance(x, str) or not isinstance(x, Sequence):
        raise ValueError(f"{name} must be a sequence of strings, got {type(x).__name__}")
    out = list(x)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(s).__name__}")
        if not allow_empty_strings and not s.strip():
            raise ValueError(f"{name}[{i}] is empty")
    return out


# ----------------------------------------------------------------------------------------------
# A. pure functions: TOFU


def answer_prob(avg_nll: Any) -> np.ndarray:
    """Per-token normalised answer probability ``exp(−avgNLL)`` per question (TOFU's forget and
    retain "Prob."). ``avg_nll``: shape (N,) of per-token average NLLs."""
    return np.exp(-_vector(avg_nll, "avg_nll"))


def truth_ratio(para_nll: Any, pert_nll: Any) -> np.ndarray:
    """TOFU truth ratio per question, ``R = P_pert / P_para = exp(avgNLL_para − mean_j avgNLL_pert_j)``.

    ``para_nll``: shape (N,), per-token average NLL of the paraphrased answer (the answer itself
    for real authors / world facts). ``pert_nll``: shape (N, K) of the K perturbed answers' per-token
    average NLLs, or a length-N list of per-question sequences (K may differ per question).
    R < 1: the model prefers the paraphrase (knows the fact); R ≈ 1: it cannot tell.
    """
    para = _vector(para_nll, "para_nll")
    rows = _rows(pert_nll, "pert_nll", para.size)
    mean_pert = np.array([r.mean() for r in rows])
    return np.exp(para - mean_pert)


def truth_ratio_stat(R: Any, on: str = "forget") -> float:
    """Aggregate truth ratios: ``on="forget"`` → ``mean min(R, 1/R)`` (1 = no preference for the
    true answer, the forget target); ``on="retain"`` (also real authors / world facts) →
    ``mean max(0, 1 − R)`` (higher = the model prefers the true answer)."""
    r = _vector(R, "R")
    if np.any(r < 0):
        raise ValueError("R must be non-negative (a ratio of probabilities)")
    if on == "forget":
        with np.errstate(divide="ignore"):
            return float(np.mean(np.minimum(r, 1.0 / r)))
    if on == "retain":
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    raise ValueError(f"on must be 'forget' or 'retain', got {on!r}")


def truth_ratio_paper(para_nll: Any, pert_nll: Any) -> np.ndarray:
    """The paper variant ``p_para / (p_para + p_pert) = 1/(1 + R)`` per question, in [0, 1], with
    ``p_para = exp(−avgNLL_para)`` and ``p_pert = exp(−mean_j avgNLL_pert_j)`` (same inputs as
    :func:`truth_ratio`). 1/2 = no preference; → 1 = prefers the paraphrased (true) answer."""
    para = _vector(para_nll, "para_nll")
    rows = _rows(pert_nll, "pert_nll", para.size)
    mean_pert = np.array([r.mean() for r in rows])  # −log p_pert
    # p_para/(p_para+p_pert) = sigmoid(log p_para − log p_pert) = sigmoid(mean_pert − para)
    z = mean_pert - para
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def normalized_answer_prob(ans_nll: Any, pert_nll: Any) -> np.ndarray:
    """TOFU's multiple-choice answer probability ``P(a) / (P(a) + Σ_j P(a_pert_j))`` per question,
    with ``P = exp(−nll)``.

    Pass per-token average NLLs for TOFU's reference-code convention (what :func:`tofu_eval` does)
    or summed NLLs for whole-sequence probabilities. ``ans_nll``: (N,); ``pert_nll``: (N, K) or a
    ragged list of N sequences. Computed in log space (no underflow).
    """
    ans = _vector(ans_nll, "ans_nll")
    rows = _rows(pert_nll, "pert_nll", ans.size)
    out = np.empty_like(ans)
    for i, (a, r) in enumerate(zip(ans, rows)):
        logits = -np.concatenate([[a], r])
        m = logits.max()
        out[i] = math.exp(logits[0] - m - math.log(np.exp(logits - m).sum()))
    return out


@dataclass(frozen=True)
class ForgetQuality:
    """Result of :func:`forget_quality`: the KS p-value (TOFU's forget quality; higher = closer
    to the retain model) and the KS statistic."""

    pvalue: float
    statistic: float

    def as_dict(self) -> dict[str, float]:
        return {"forget_quality": self.pvalue, "forget_ks_statistic": self.statistic}


def forget_quality(unlearned_R: Any, retain_model_R: Any) -> ForgetQuality:
    """Two-sided ``scipy.stats.ks_2samp`` between the unlearned model's and the retain model's
    truth ratios on the forget set; the p-value is TOFU's forget quality."""
    from scipy.stats import ks_2samp

    a = _vector(unlearned_R, "unlearned_R")
    b = _vector(retain_model_R, "retain_model_R")
    res = ks_2samp(a, b, alternative="two-sided")
    return ForgetQuality(pvalue=float(res.pvalue), statistic=float(res.statistic))


def harmonic_mean(values: Any) -> float:
    """Harmonic mean ``n / Σ 1/x``; 0 if any value is 0. Values must be finite and >= 0."""
    v = _vector(values, "values")
    if np.any(v < 0):
        raise ValueError(f"harmonic_mean needs non-negative values, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def model_utility(stats: Mapping[str, float]) -> float:
    """TOFU model utility: harmonic mean of the nine :data:`MODEL_UTILITY_KEYS`
    (``{retain, real_authors, world_facts}_{answer_prob, rougeL_recall, truth_ratio}``).
    Other keys of ``stats`` are ignored."""
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a mapping of statistic name to value, got "
                         f"{type(stats).__name__}")
    missing = [k for k in MODEL_UTILITY_KEYS if k not in stats]
    if missing:
        raise ValueError(f"model_utility needs the statistics {list(MODEL_UTILITY_KEYS)}; "
                         f"missing: {missing}")
    return harmonic_mean([float(stats[k]) for k in MODEL_UTILITY_KEYS])


# ----------------------------------------------------------------------------------------------
# A. pure functions: ROUGE


@functools.lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool):
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ROUGE metrics need the rouge-score package: pip install rouge-score"
                          ) from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """ROUGE-L ``(recall, f1)`` per pair, ``RougeScorer(["rougeL"]).score(reference, prediction)``.
    Recall = LCS / len(reference). Empty texts score 0."""
    preds = _strings(predictions, "predictions")
    refs = _strings(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"predictions and references differ in length ({len(preds)} vs "
                         f"{len(refs)})")
    if not preds:
        raise ValueError("predictions is empty; ROUGE needs at least one pair")
    scorer = _rouge_scorer(bool(use_stemmer))
    recall = np.empty(len(preds))
    f1 = np.empty(len(preds))
    for i, (p, r) in enumerate(zip(preds, refs)):
        s = scorer.score(r, p)["rougeL"]
        recall[i], f1[i] = s.recall, s.fmeasure
    return recall, f1


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str], *,
                   use_stemmer: bool = True) -> np.ndarray:
    """ROUGE-L recall per pair (TOFU: ``use_stemmer=True``, the default here)."""
    return rouge_l(predictions, references, use_stemmer=use_stemmer)[0]


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str], *,
               use_stemmer: bool = False) -> np.ndarray:
    """ROUGE-L F-measure per pair (MUSE's VerbMem/KnowMem ``mean_rougeL``: ``use_stemmer=False``,
    the default here)."""
    return rouge_l(predictions, references, use_stemmer=use_stemmer)[1]


# ----------------------------------------------------------------------------------------------
# A. pure functions: MUSE membership inference


def min_k_percent_score(token_logprobs: Any, mask: Any = None, k: float = 0.4) -> np.ndarray:
    """Min-K% score per sequence: mean of the lowest ``floor(k·n)`` (at least 1) of the ``n``
    scored token log-probabilities. Higher = more likely a member (MUSE stores the negation).

    ``token_logprobs``: (B, L) array or tensor of ``log p(x_t | x_<t)``; ``mask``: (B, L) bool,
    True on scored tokens (default: all). A row without scored tokens raises ``ValueError``.
    """
    k = _check_k(k)
    if isinstance(token_logprobs, torch.Tensor):
        token_logprobs = token_logprobs.detach().cpu().double().numpy()
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"token_logprobs must be 2-D (sequences × tokens), got shape {lp.shape}")
    if mask is None:
        m = np.ones(lp.shape, dtype=bool)
    else:
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        m = np.asarray(mask).astype(bool)
        if m.shape != lp.shape:
            raise ValueError(f"mask has shape {m.shape} but token_logprobs has shape {lp.shape}")
    out = np.empty(lp.shape[0])
    for i in range(lp.shape[0]):
        vals = lp[i][m[i]]
        if vals.size == 0:
            raise ValueError(f"sequence {i} has no scored tokens (its mask is all False)")
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"token_logprobs of sequence {i} must be finite on scored tokens")
        n_low = max(1, math.floor(k * vals.size + 1e-9))
        out[i] = np.sort(vals)[:n_low].mean()
    return out


def auc(member_scores: Any, nonmember_scores: Any) -> float:
    """ROC AUC of a membership score (``sklearn.metrics.roc_auc_score``), members = positive
    class, higher score = member: 1 = members perfectly separated, 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    pos = _vector(member_scores, "member_scores")
    neg = _vector(nonmember_scores, "nonmember_scores")
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(y, np.concatenate([pos, neg])))


def priv_leak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE PrivLeak in percent: ``(AUC_unl − AUC_retrain) / AUC_retrain × 100``. Both AUCs in
    MUSE's orientation (see the module docstring); ``auc_retrain`` must be in (0, 1]."""
    for name, v in (("auc_unlearned", auc_unlearned), ("auc_retrain", auc_retrain)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number in [0, 1], got {v!r}")
    if not 0.0 <= auc_unlearned <= 1.0:
        raise ValueError(f"auc_unlearned must be in [0, 1], got {auc_unlearned}")
    if not 0.0 < auc_retrain <= 1.0:
        raise ValueError(f"auc_retrain must be in (0, 1], got {auc_retrain}")
    return float((auc_unlearned - auc_retrain) / auc_retrain * 100.0)


# ----------------------------------------------------------------------------------------------
# A. pure functions: degeneracy


def repetition_rate(texts: Sequence[str], n: int = 2) -> np.ndarray:
    """Per text, the fraction of word n-grams after the first that repeat an earlier one,
    ``(#ngrams − #distinct) / (#ngrams − 1)``; 0 when the text has fewer than two n-grams.
    "and and and and" → 1.0 (n=2); a sentence without repeated n-grams → 0.0."""
    _check_positive_int("n", n)
    items = _strings(texts, "texts")
    out = np.zeros(len(items))
    for i, t in enumerate(items):
        words = _WORD.findall(t.lower())
        grams = [tuple(words[j: j + n]) for j in range(len(words) - n + 1)]
        if len(grams) >= 2:
            out[i] = (len(grams) - len(set(grams))) / (len(grams) - 1)
    return out


def is_degenerate(texts: Sequence[str], *, n: int = 2, threshold: float = 0.5) -> np.ndarray:
    """Boolean per text: ``repetition_rate(texts, n) >= threshold`` (threshold in (0, 1])."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return repetition_rate(texts, n) >= threshold


# ----------------------------------------------------------------------------------------------
# B. model-level evaluation


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the training flag is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def answer_nll_sum(model: nn.Module, tokenizer, questions: Sequence[str],
                   answers: Sequence[str], *, batch_size: int = 32, add_eos: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(NLL summed over answer tokens, number of answer tokens)`` per (question, answer) pair,
    two arrays of shape (N,). Answers are scored as in training (:func:`encode_pairs`: the
    question with the tokenizer's special tokens, then the answer and EOS when ``add_eos``)."""
    qs = _strings(questions, "questions")
    ans = _strings(answers, "answers")
    if len(qs) != len(ans):
        raise ValueError(f"questions and answers differ in length ({len(qs)} vs {len(ans)})")
    if not qs:
        raise ValueError("questions is empty; answer_nll needs at least one pair")
    _check_positive_int("batch_size", batch_size)
    check_tokenizer_model(tokenizer, model)
    device = _device(model)
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    with _evaluating(model):
        for b in range(0, len(qs), batch_size):
            batch = encode_pairs(tokenizer, qs[b: b + batch_size], ans[b: b + batch_size],
                                 model=model, add_eos=add_eos, device=device)
            total, count = sequence_logprob(model, batch)
            sums.append((-total).double().cpu().numpy())
            counts.append(count.cpu().numpy().astype(np.int64))
    return np.concatenate(sums), np.concatenate(counts)


def answer_nll(model: nn.Module, tokenizer, questions: Sequence[str], answers: Sequence[str], *,
               batch_size: int = 32, add_eos: bool = True) -> np.ndarray:
    """Per-token average NLL of each answer given its question, shape (N,) (TOFU's
    ``avg_gt_loss``)."""
    total, count = answer_nll_sum(model, tokenizer, questions, answers, batch_size=batch_size,
                                  add_eos=add_eos)
    return total / count


def _perturbed_nll(model: nn.Module, tokenizer, questions: Sequence[str],
                   perturbed_lists: Sequence[Sequence[str]], *, batch_size: int,
                   name: str = "perturbed_lists") -> list[np.ndarray]:
    """Per-token average NLL of every perturbed answer, one array per question."""
    if isinstance(perturbed_lists, str) or not isinstance(perturbed_lists, Sequence):
        raise ValueError(f"{name} must be a sequence with one list of perturbed answers per "
                         "question")
    if len(perturbed_lists) != len(questions):
        raise ValueError(f"{name} has {len(perturbed_lists)} entries but there are "
                         f"{len(questions)} questions")
    flat_q: list[str] = []
    flat_a: list[str] = []
    sizes: list[int] = []
    for i, (q, ps) in enumerate(zip(questions, perturbed_lists)):
        ps_list = _strings(ps, f"{name}[{i}]")
        if not ps_list:
            raise ValueError(f"{name}[{i}] is empty; every question needs at least one perturbed "
                             "answer")
        flat_q.extend([q] * len(ps_list))
        flat_a.extend(ps_list)
        sizes.append(len(ps_list))
    flat = answer_nll(model, tokenizer, flat_q, flat_a, batch_size=batch_size)
    return np.split(flat, np.cumsum(sizes)[:-1])


def truth_ratios(model: nn.Module, tokenizer, questions: Sequence[str],
                 paraphrased: Sequence[str], perturbed_lists: Sequence[Sequence[str]], *,
                 batch_size: int = 32) -> np.ndarray:
    """TOFU truth ratio ``R`` per question (:func:`truth_ratio`) computed with the model."""
    qs = _strings(questions, "questions")
    para = answer_nll(model, tokenizer, qs, paraphrased, batch_size=batch_size)
    pert = _perturbed_nll(model, tokenizer, qs, perturbed_lists, batch_size=batch_size)
    return truth_ratio(para, pert)


def _field(item: Any, name: str, where: str, needed: str) -> Any:
    if isinstance(item, Mapping):
        if name in item:
            return item[name]
    elif hasattr(item, name):
        return getattr(item, name)
    raise ValueError(f"{where} has no {name!r}; {needed}")


def _format(template: str, question: str) -> str:
    return template.format(question=question)


def _check_template(template: str) -> None:
    if not isinstance(template, str) or "{question}" not in template:
        raise ValueError(f"prompt_template must be a str containing '{{question}}', got "
                         f"{template!r}")


_TOFU_NEEDS = ("tofu_eval items need attributes (or keys) question, answer, perturbed_answers "
               "and, on forget/retain, paraphrased_answer")


def _tofu_split(model: nn.Module, tokenizer, items: Sequence[Any], split: str, *,
                prompt_template: str, max_new_tokens: int, batch_size: int
                ) -> dict[str, Any]:
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
        raise ValueError(f"{split} must be a sequence of QA items, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{split} is empty; tofu_eval needs at least one QA item per set")
    multiple_choice = split in ("real_authors", "world_facts")
    qs, ans, base, perts = [], [], [], []
    for i, it in enumerate(items):
        where = f"{split}[{i}]"
        q = _field(it, "question", where, _TOFU_NEEDS)
        a = _field(it, "answer", where, _TOFU_NEEDS)
        p = a if multiple_choice else _field(it, "paraphrased_answer", where, _TOFU_NEEDS)
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}.paraphrased_answer is {p!r}; forget and retain items need a "
                             "paraphrased answer (the truth-ratio base)")
        pa = _field(it, "perturbed_answers", where, _TOFU_NEEDS)
        if isinstance(pa, str) or not isinstance(pa, Sequence):
            raise ValueError(f"{where}.perturbed_answers must be a sequence of strings, got "
                             f"{type(pa).__name__}")
        qs.append(_format(prompt_template, q))
        ans.append(a)
        base.append(p)
        perts.append(list(pa))
    ans_nll = answer_nll(model, tokenizer, qs, ans, batch_size=batch_size)
    base_nll = ans_nll if multiple_choice else answer_nll(model, tokenizer, qs, base,
                                                          batch_size=batch_size)
    pert_nll = _perturbed_nll(model, tokenizer, qs, perts, batch_size=batch_size,
                              name=f"{split} perturbed_answers")
    R = truth_ratio(base_nll, pert_nll)
    if multiple_choice:
        prob = float(np.mean(normalized_answer_prob(ans_nll, pert_nll)))
    else:
        prob = float(np.mean(answer_prob(ans_nll)))
    gens = generate_greedy(model, tokenizer, qs, max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    return {
        "answer_prob": prob,
        "rougeL_recall": float(np.mean(rouge_l_recall(gens, ans, use_stemmer=True))),
        "truth_ratio": truth_ratio_stat(R, on="forget" if split == "forget" else "retain"),
        "truth_ratio_paper": float(np.mean(truth_ratio_paper(base_nll, pert_nll))),
        "truth_ratios": R,
        "generations": gens,
    }


def tofu_eval(model: nn.Module, tokenizer, *, forget: Sequence[Any], retain: Sequence[Any],
              real_authors: Sequence[Any], world_facts: Sequence[Any],
              retain_model_R: Any = None, max_new_tokens: int = 32,
              prompt_template: str = "{question}", batch_size: int = 32,
              degeneracy_n: int = 2, degeneracy_threshold: float = 0.5,
              return_generations: bool = False) -> dict[str, Any]:
    """TOFU evaluation of ``model`` on the four sets.

    Each set is a sequence of items with attributes (or mapping keys) ``question``, ``answer``,
    ``perturbed_answers`` (a sequence of strings) and, on ``forget`` and ``retain``,
    ``paraphrased_answer`` (e.g. ``optfm.data.tofu.QA``). Questions are formatted with
    ``prompt_template`` before scoring and generation. On real authors and world facts the
    answer itself is the truth-ratio base and the answer probability is the normalised
    multiple-choice one (TOFU's reference code).

    Returns a flat dict; for each ``S`` in forget, retain, real_authors, world_facts:

    - ``S_answer_prob`` (float), ``S_rougeL_recall`` (float), ``S_truth_ratio`` (float: the
      forget or retain aggregate of :func:`truth_ratio_stat`), ``S_truth_ratio_paper`` (float:
      mean ``1/(1+R)``), ``S_truth_ratios`` (np.ndarray: R per question);

    and ``model_utility`` (float), ``forget_repetition_rate`` (mean :func:`repetition_rate` of the
    greedy forget generations), ``forget_degenerate_fraction`` (share flagged by
    :func:`is_degenerate`); with ``retain_model_R`` (the retain model's forget-set truth ratios,
    one per forget question) also ``forget_quality`` and ``forget_ks_statistic``; with
    ``return_generations`` also ``S_generations`` (list of str).
    """
    _check_positive_int("max_new_tokens", max_new_tokens)
    _check_positive_int("batch_size", batch_size)
    _check_template(prompt_template)
    if retain_model_R is not None:
        retain_model_R = _vector(retain_model_R, "retain_model_R")
        if isinstance(forget, Sequence) and retain_model_R.size != len(forget):
            raise ValueError(f"retain_model_R has {retain_model_R.size} values but forget has "
                             f"{len(forget)} questions; pass the retain model's truth ratios on "
                             "the same forget set")
    out: dict[str, Any] = {}
    with _evaluating(model):
        for split, items in (("forget", forget), ("retain", retain),
                             ("real_authors", real_authors), ("world_facts", world_facts)):
            res = _tofu_split(model, tokenizer, items, split, prompt_template=prompt_template,
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
            gens = res.pop("generations")
            for key, value in res.items():
                out[f"{split}_{key}"] = value
            if return_generations:
                out[f"{split}_generations"] = gens
            if split == "forget":
                out["forget_repetition_rate"] = float(np.mean(repetition_rate(gens, degeneracy_n)))
                out["forget_degenerate_fraction"] = float(np.mean(is_degenerate(
                    gens, n=degeneracy_n, threshold=degeneracy_threshold)))
    out["model_utility"] = model_utility(out)
    if retain_model_R is not None:
        out.update(forget_quality(out["forget_truth_ratios"], retain_model_R).as_dict())
    return out


def min_k_scores(model: nn.Module, tokenizer, texts: Sequence[str], *, k: float = 0.4,
                 batch_size: int = 32, max_length: int | None = None) -> np.ndarray:
    """Min-K% score (:func:`min_k_percent_score`, higher = member) of each raw text, shape (N,).

    Each text is tokenised as MUSE does (``tokenizer(text, add_special_tokens=True)``); every
    token after the first is scored given its prefix (the first token, or the BOS where the
    tokenizer adds one, has no prediction). Texts longer than ``max_length`` (default: the model's
    context length) are cut to their first ``max_length`` tokens; a text with fewer than two
    tokens raises ``ValueError``.
    """
    items = _strings(texts, "texts")
    if not items:
        raise ValueError("texts is empty; min_k_scores needs at least one text")
    k = _check_k(k)
    _check_positive_int("batch_size", batch_size)
    if max_length is None:
        cfg = getattr(model, "config", None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                max_length = value
                break
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    check_tokenizer_model(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set "
                         "tokenizer.pad_token")
    device = _device(model)
    out: list[np.ndarray] = []
    with _evaluating(model):
        for b in range(0, len(items), batch_size):
            rows = []
            for i, t in enumerate(items[b: b + batch_size], start=b):
                ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])
                if max_length is not None:
                    ids = ids[:max_length]
                if len(ids) < 2:
                    raise ValueError(f"texts[{i}] ({t[:40]!r}) has {len(ids)} token(s); Min-K% "
                                     "needs at least two (the first token is not scored)")
                rows.append(ids)
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, ids in enumerate(rows):
                input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[i, : len(ids)] = 1
            labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
            batch = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                     "labels": labels.to(device)}
            logp, mask = token_logprobs(model, batch)
            out.append(min_k_percent_score(logp, mask, k))
    return np.concatenate(out)


def _qa_pairs(items: Any, name: str) -> tuple[list[str], list[str]]:
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
        raise ValueError(f"{name} must be a sequence of QA items or (question, answer) pairs")
    if not items:
        raise ValueError(f"{name} is empty; give at least one QA item or pass None to skip it")
    qs, ans = [], []
    needed = "give objects with question and answer attributes (or keys), or (q, a) pairs"
    for i, it in enumerate(items):
        if isinstance(it, tuple) and len(it) == 2:
            q, a = it
        else:
            q = _field(it, "question", f"{name}[{i}]", needed)
            a = _field(it, "answer", f"{name}[{i}]", needed)
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(f"{name}[{i}] question and answer must be strings")
        qs.append(q)
        ans.append(a)
    return qs, ans


def _cut_at(text: str, stops: Sequence[str]) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text.strip()


def muse_eval(model: nn.Module, tokenizer, *,
              verbmem: Sequence[tuple[str, str]] | None = None,
              knowmem_forget: Sequence[Any] | None = None,
              knowmem_retain: Sequence[Any] | None = None,
              forget_texts: Sequence[str] | None = None,
              holdout_texts: Sequence[str] | None = None,
              auc_retrain: float | None = None, k: float = 0.4,
              verbmem_max_new_tokens: int = 128, knowmem_max_new_tokens: int = 32,
              prompt_template: str = "{question}", batch_size: int = 32,
              max_length: int | None = None) -> dict[str, float]:
    """MUSE evaluation of ``model``; each group is optional (None skips it), at least one is given.

    - ``verbmem``: (prompt, continuation) pairs → ``verbmem_rougeL_f1`` (mean ROUGE-L F1 of the
      greedy continuation vs the continuation cut to ``verbmem_max_new_tokens`` tokens, no
      stemmer) and ``verbmem_repetition_rate``.
    - ``knowmem_forget`` / ``knowmem_retain``: QA items (``question``/``answer`` attributes or keys)
      or (question, answer) pairs; questions go through ``prompt_template`` (MUSE uses
      ``"Question: {question}\\nAnswer: "``), greedy answers are cut at :data:`MUSE_KNOWMEM_STOP`
      → ``knowmem_{forget,retain}_rougeL_recall`` and ``..._rougeL_f1`` (MUSE's aggregate).
    - ``forget_texts`` and ``holdout_texts`` (both or neither): ``mink_auc`` = the Min-K% AUC in
      MUSE's orientation (holdout as the positive class: ≈ 0 when the forget texts are still
      memorised, ≈ 0.5 when they look like unseen text), and ``privleak`` (percent) when
      ``auc_retrain`` (same orientation, e.g. 0.4772 for MUSE-News) is given.
    """
    _check_template(prompt_template)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("verbmem_max_new_tokens", verbmem_max_new_tokens)
    _check_positive_int("knowmem_max_new_tokens", knowmem_max_new_tokens)
    k = _check_k(k)
    if (forget_texts is None) != (holdout_texts is None):
        raise ValueError("forget_texts and holdout_texts go together: give both (for Min-K% AUC "
                         "and PrivLeak) or neither")
    if auc_retrain is not None and forget_texts is None:
        raise ValueError("auc_retrain is given but forget_texts/holdout_texts are not; PrivLeak "
                         "needs both text sets")
    if all(x is None for x in (verbmem, knowmem_forget, knowmem_retain, forget_texts)):
        raise ValueError("muse_eval needs at least one of verbmem, knowmem_forget, "
                         "knowmem_retain, or forget_texts + holdout_texts")
    out: dict[str, float] = {}
    with _evaluating(model):
        if verbmem is not None:
            if isinstance(verbmem, str) or not isinstance(verbmem, Sequence) or not verbmem:
                raise ValueError("verbmem must be a non-empty sequence of (prompt, continuation) "
                                 "pairs")
            prompts, refs = [], []
            for i, pair in enumerate(verbmem):
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                        and all(isinstance(s, str) for s in pair)):
                    raise ValueError(f"verbmem[{i}] must be a (prompt, continuation) pair of str")
                prompts.append(pair[0])
                ids = list(tokenizer(pair[1], add_special_tokens=False)["input_ids"])
                refs.append(tokenizer.decode(ids[:verbmem_max_new_tokens],
                                             skip_special_tokens=True))
            gens = generate_greedy(model, tokenizer, prompts,
                                   max_new_tokens=verbmem_max_new_tokens, batch_size=batch_size)
            out["verbmem_rougeL_f1"] = float(np.mean(rouge_l_f1(gens, refs, use_stemmer=False)))
            out["verbmem_repetition_rate"] = float(np.mean(repetition_rate(gens)))
        for split, items in (("forget", knowmem_forget), ("retain", knowmem_retain)):
            if items is None:
                continue
            qs, ans = _qa_pairs(items, f"knowmem_{split}")
            gens = generate_greedy(model, tokenizer, [_format(prompt_template, q) for q in qs],
                                   max_new_tokens=knowmem_max_new_tokens, batch_size=batch_size)
            gens = [_cut_at(g, MUSE_KNOWMEM_STOP) for g in gens]
            recall, f1 = rouge_l(gens, ans, use_stemmer=False)
            out[f"knowmem_{split}_rougeL_recall"] = float(np.mean(recall))
            out[f"knowmem_{split}_rougeL_f1"] = float(np.mean(f1))
        if forget_texts is not None:
            s_forget = min_k_scores(model, tokenizer, forget_texts, k=k, batch_size=batch_size,
                                    max_length=max_length)
            s_holdout = min_k_scores(model, tokenizer, holdout_texts, k=k,
                                     batch_size=batch_size, max_length=max_length)
            out["mink_auc"] = auc(s_holdout, s_forget)  # MUSE: forget = class 0, holdout = 1
            if auc_retrain is not None:
                out["privleak"] = priv_leak(out["mink_auc"], auc_retrain)
    return out
