"""Unlearning metrics (TOFU, MUSE, degeneracy): hand-computed values for the pure functions, and
the model-level evaluation on a tiny Llama with a word tokenizer."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from optfm.data import build_word_tokenizer
from optfm.models.factories import tiny_llama
from optfm.training.lm import encode_pairs, lm_loss
from optfm.unlearning import metrics as M

LN2, LN4, LN16 = math.log(2), math.log(4), math.log(16)


# ---------------------------------------------------------------------------------------------
# pure functions: TOFU


def test_truth_ratio_geometric_mean_of_perturbed():
    # P_para = 1/2; perturbed probabilities 1/4 and 1/16 -> geometric mean 1/8 -> R = 1/4.
    # P_para = 1/4; perturbed 1/2, 1/2 -> R = 2.
    R = M.truth_ratio([LN2, LN4], [[LN4, LN16], [LN2, LN2]])
    np.testing.assert_allclose(R, [0.25, 2.0])
    # ragged: a different number of perturbed answers per question
    np.testing.assert_allclose(M.truth_ratio([LN2, LN4], [[LN4, LN16], [LN2]]), [0.25, 2.0])
    # torch input
    np.testing.assert_allclose(M.truth_ratio(torch.tensor([LN2]), torch.tensor([[LN4, LN16]])),
                               [0.25])


def test_truth_ratio_stat_forget_and_retain():
    R = [0.25, 2.0, 1.0]
    assert M.truth_ratio_stat(R, on="forget") == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert M.truth_ratio_stat(R, on="retain") == pytest.approx((0.75 + 0 + 0) / 3)
    assert M.truth_ratio_stat([0.0], on="forget") == 0.0  # R underflowed to 0: min(0, inf) = 0
    with pytest.raises(ValueError, match="on must be 'forget' or 'retain'"):
        M.truth_ratio_stat(R, on="holdout")
    with pytest.raises(ValueError, match="non-negative"):
        M.truth_ratio_stat([-1.0])


def test_truth_ratio_paper_is_one_over_one_plus_r():
    v = M.truth_ratio_paper([LN2, LN4], [[LN4, LN16], [LN2, LN2]])
    np.testing.assert_allclose(v, [1 / 1.25, 1 / 3])  # p_para/(p_para+p_pert): .5/.625, .25/.75
    # extreme NLL gaps stay finite (no overflow)
    v = M.truth_ratio_paper([0.0, 1000.0], [[1000.0], [0.0]])
    np.testing.assert_allclose(v, [1.0, 0.0])


def test_answer_prob_and_normalized_answer_prob():
    np.testing.assert_allclose(M.answer_prob([LN2, 0.0]), [0.5, 1.0])
    # P(a)=1/2 vs two perturbed of 1/4: 0.5 / (0.5 + 0.25 + 0.25); P(a)=1 vs 1/4: 1/1.25
    p = M.normalized_answer_prob([LN2, 0.0], [[LN4, LN4], [LN4]])
    np.testing.assert_allclose(p, [0.5, 0.8])
    # log-space: huge NLLs do not underflow to 0/0
    p = M.normalized_answer_prob([2000.0 + LN2], [[2000.0 + LN4, 2000.0 + LN4]])
    np.testing.assert_allclose(p, [0.5])


def test_truth_ratio_input_errors():
    with pytest.raises(ValueError, match="pert_nll has 1 rows but there are 2 questions"):
        M.truth_ratio([1.0, 2.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"pert_nll\[0\] is empty"):
        M.truth_ratio([1.0], [[]])
    with pytest.raises(ValueError, match="para_nll is empty"):
        M.truth_ratio([], [])
    with pytest.raises(ValueError, match="para_nll must be finite"):
        M.truth_ratio([float("nan")], [[1.0]])
    with pytest.raises(ValueError, match="one-dimensional"):
        M.truth_ratio([[1.0]], [[1.0]])


def test_forget_quality_ks():
    a = np.linspace(0.1, 1.0, 30)
    same = M.forget_quality(a, a.copy())
    assert same.pvalue == pytest.approx(1.0) and same.statistic == 0.0
    far = M.forget_quality(a, a + 10.0)
    assert far.statistic == 1.0
    # exact two-sided p for n = m = 30 and D = 1 is 2 / C(60, 30)
    assert far.pvalue == pytest.approx(2 / math.comb(60, 30), rel=1e-6)
    assert far.as_dict() == {"forget_quality": far.pvalue, "forget_ks_statistic": 1.0}
    # TOFU stores 1/R: KS is invariant under the monotone map, so the p-value is the same
    rng = np.random.default_rng(0)
    x, y = rng.lognormal(size=20), rng.lognormal(0.5, size=25)
    assert M.forget_quality(x, y).pvalue == pytest.approx(M.forget_quality(1 / x, 1 / y).pvalue)
    with pytest.raises(ValueError, match="unlearned_R is empty"):
        M.forget_quality([], a)
    with pytest.raises(ValueError, match="retain_model_R must be finite"):
        M.forget_quality(a, [1.0, float("inf")])


def test_harmonic_mean_and_model_utility():
    assert M.harmonic_mean([1.0, 2.0, 4.0]) == pytest.approx(3 / 1.75)
    assert M.harmonic_mean([0.5]) == 0.5
    assert M.harmonic_mean([1.0, 0.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        M.harmonic_mean([1.0, -0.1])
    with pytest.raises(ValueError, match="values is empty"):
        M.harmonic_mean([])
    stats = {k: 0.5 for k in M.MODEL_UTILITY_KEYS}
    assert len(M.MODEL_UTILITY_KEYS) == 9
    assert M.model_utility({**stats, "forget_answer_prob": 0.0}) == pytest.approx(0.5)
    stats["world_facts_rougeL_recall"] = 0.0
    assert M.model_utility(stats) == 0.0
    stats["retain_answer_prob"] = 0.25
    stats["world_facts_rougeL_recall"] = 0.5
    assert M.model_utility(stats) == pytest.approx(9 / (8 * 2 + 4))
    del stats["retain_truth_ratio"], stats["real_authors_answer_prob"]
    with pytest.raises(ValueError, match=r"missing: \['retain_truth_ratio', "
                                         r"'real_authors_answer_prob'\]"):
        M.model_utility(stats)


# ---------------------------------------------------------------------------------------------
# pure functions: ROUGE, MUSE, degeneracy


def test_rouge_l_known_strings():
    # LCS("the cat", "the cat sat on the mat") = 2 words: recall 2/6, precision 1, F1 1/2
    r, f = M.rouge_l(["the cat"], ["the cat sat on the mat"], use_stemmer=False)
    np.testing.assert_allclose(r, [1 / 3])
    np.testing.assert_allclose(f, [0.5])
    np.testing.assert_allclose(M.rouge_l_recall(["the cat is on the mat", ""],
                                                ["the cat sat on the mat", "x"]), [5 / 6, 0.0])
    # TOFU stems (recall default), MUSE does not (F1 default)
    assert M.rouge_l_recall(["cats running"], ["cat run"])[0] == pytest.approx(1.0)
    assert M.rouge_l_f1(["cats running"], ["cat run"])[0] == 0.0
    assert M.rouge_l_f1(["cats running"], ["cat run"], use_stemmer=True)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        M.rouge_l_recall(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="predictions is empty"):
        M.rouge_l_f1([], [])
    with pytest.raises(ValueError, match="sequence of strings"):
        M.rouge_l_recall("the cat", "the cat")


def test_rouge_missing_package_message(monkeypatch):
    M._rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    try:
        with pytest.raises(ImportError, match="pip install rouge-score"):
            M.rouge_l_recall(["a"], ["a"])
    finally:
        M._rouge_scorer.cache_clear()


def test_min_k_percent_score_known_vector():
    lp = -np.arange(1.0, 11.0)[None, :]  # -1 ... -10
    assert M.min_k_percent_score(lp, k=0.4)[0] == pytest.approx(-8.5)  # -10,-9,-8,-7
    assert M.min_k_percent_score(lp, k=1.0)[0] == pytest.approx(-5.5)
    assert M.min_k_percent_score(lp, k=0.05)[0] == pytest.approx(-10.0)  # floor(0.5)=0 -> 1
    # floor(k·n) without float artefacts: 0.57 * 100 = 56.99999999999999 but 57 tokens are kept
    assert M.min_k_percent_score(-np.arange(1.0, 101.0)[None], k=0.57)[0] == pytest.approx(-72.0)
    mask = np.array([[True] * 5 + [False] * 5])
    assert M.min_k_percent_score(lp, mask, k=0.4)[0] == pytest.approx(-4.5)  # -5, -4
    two = M.min_k_percent_score(torch.tensor(np.vstack([lp, lp / 2])), k=0.2)
    np.testing.assert_allclose(two, [-9.5, -4.75])
    for bad in (0.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
            M.min_k_percent_score(lp, k=bad)
    with pytest.raises(ValueError, match="no scored tokens"):
        M.min_k_percent_score(lp, np.zeros_like(lp, dtype=bool))
    with pytest.raises(ValueError, match="mask has shape"):
        M.min_k_percent_score(lp, np.ones((1, 3), dtype=bool))


def test_auc_and_priv_leak():
    assert M.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert M.auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert M.auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert M.auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="nonmember_scores is empty"):
        M.auc([1.0], [])
    assert M.priv_leak(0.0, 0.5) == pytest.approx(-100.0)
    assert M.priv_leak(0.4772, 0.4772) == 0.0
    assert M.priv_leak(0.6, 0.5) == pytest.approx(20.0)
    with pytest.raises(ValueError, match=r"auc_retrain must be in \(0, 1\]"):
        M.priv_leak(0.5, 0.0)
    with pytest.raises(ValueError, match=r"auc_unlearned must be in \[0, 1\]"):
        M.priv_leak(1.5, 0.5)


def test_repetition_rate_and_degeneracy():
    texts = ["and and and and", "The quick brown fox jumps over the lazy dog.", "hello", ""]
    np.testing.assert_allclose(M.repetition_rate(texts), [1.0, 0.0, 0.0, 0.0])
    # unigrams: "the" repeats once among 9 words -> 1 repeat over 8 later words
    assert M.repetition_rate(texts[1:2], n=1)[0] == pytest.approx(1 / 8)
    # a period-2 loop: bigrams ab ba ab ba ab -> 3 repeats of 4 later bigrams
    assert M.repetition_rate(["a b a b a b"])[0] == pytest.approx(0.75)
    np.testing.assert_array_equal(M.is_degenerate(texts), [True, False, False, False])
    with pytest.raises(ValueError, match="n must be a positive int"):
        M.repetition_rate(texts, n=0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        M.is_degenerate(texts, threshold=0.0)


# ---------------------------------------------------------------------------------------------
# model level


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]


NAMES = ["anna", "boris", "clara", "dmitri", "elena", "farid", "greta", "hugo"]
CITIES = ["paris", "lima", "oslo", "cairo", "quito", "dakar", "hanoi", "perth"]


def _qa(i: int) -> QA:
    name, city = NAMES[i], CITIES[i]
    others = [c for c in CITIES if c != city][i % 3: i % 3 + 3]
    return QA(question=f"where was {name} born ?", answer=f"{name} was born in {city} .",
              paraphrased_answer=f"the birthplace of {name} is {city} .",
              perturbed_answers=tuple(f"{name} was born in {c} ." for c in others))


SETS = {"forget": [_qa(i) for i in range(0, 3)], "retain": [_qa(i) for i in range(3, 6)],
        "real_authors": [_qa(6)], "world_facts": [_qa(7)]}


def _texts(items):
    return [f"{q.question} {q.answer}" for q in items]


@pytest.fixture(scope="module")
def tok():
    corpus = [t for qs in SETS.values() for q in qs
              for t in (q.question, q.answer, q.paraphrased_answer, *q.perturbed_answers)]
    corpus += ["the cat sat on the mat and the dog ran"]
    return build_word_tokenizer(corpus)


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id)


@pytest.fixture(scope="module")
def untrained(tok):
    return _model(tok)


@pytest.fixture(scope="module")
def trained(tok):
    """Memorises forget + retain answers and paraphrases (real/world too), and the forget texts."""
    model = _model(tok)
    items = [q for s in SETS.values() for q in s]
    prompts = [q.question for q in items] * 2
    responses = [q.answer for q in items] + [q.paraphrased_answer for q in items]
    batch = encode_pairs(tok, prompts, responses, model=model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    return model


def test_answer_nll_matches_manual_logits(tok, untrained):
    qs = ["where was anna born ?", "where was hugo born ?", "where ?"]
    ans = ["anna was born in paris .", "hugo was born in perth , the cat sat on the mat .", "oslo"]
    untrained.train()
    nll = M.answer_nll(untrained, tok, qs, ans, batch_size=2)  # padding and a remainder batch
    total, count = M.answer_nll_sum(untrained, tok, qs, ans, batch_size=32)
    assert untrained.training  # the training flag is restored
    assert all(p.grad is None for p in untrained.parameters())
    untrained.eval()
    for i, (q, a) in enumerate(zip(qs, ans)):
        ids_q = tok(q)["input_ids"]
        ids = ids_q + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(untrained(torch.tensor([ids])).logits[0].double(), -1)
        manual = -sum(logp[t - 1, ids[t]].item() for t in range(len(ids_q), len(ids)))
        n = len(ids) - len(ids_q)
        assert count[i] == n
        assert total[i] == pytest.approx(manual, rel=1e-5)
        assert nll[i] == pytest.approx(manual / n, rel=1e-5)
    with pytest.raises(ValueError, match="questions and answers differ in length"):
        M.answer_nll(untrained, tok, qs, ans[:2])
    with pytest.raises(ValueError, match="questions is empty"):
        M.answer_nll(untrained, tok, [], [])


def test_truth_ratios_match_pure_function(tok, untrained):
    items = SETS["forget"]
    R = M.truth_ratios(untrained, tok, [q.question for q in items],
                       [q.paraphrased_answer for q in items],
                       [q.perturbed_answers for q in items])
    para = M.answer_nll(untrained, tok, [q.question for q in items],
                        [q.paraphrased_answer for q in items])
    pert = [M.answer_nll(untrained, tok, [q.question] * len(q.perturbed_answers),
                         list(q.perturbed_answers)) for q in items]
    np.testing.assert_allclose(R, M.truth_ratio(para, pert), rtol=1e-6)
    with pytest.raises(ValueError, match="perturbed_lists has 1 entries but there are 3"):
        M.truth_ratios(untrained, tok, [q.question for q in items],
                       [q.paraphrased_answer for q in items], [items[0].perturbed_answers])


def test_min_k_scores_match_manual(tok, untrained):
    texts = ["where was anna born ? anna was born in paris .", "the cat sat"]
    s = M.min_k_scores(untrained, tok, texts, k=0.4, batch_size=2)
    for i, t in enumerate(texts):
        ids = tok(t)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(untrained(torch.tensor([ids])).logits[0].double(), -1)
        lp = np.array([logp[j - 1, ids[j]].item() for j in range(1, len(ids))])
        assert s[i] == pytest.approx(M.min_k_percent_score(lp[None], k=0.4)[0], rel=1e-5)
    with pytest.raises(ValueError, match="needs at least two"):
        M.min_k_scores(untrained, tok, ["cat"])
    with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
        M.min_k_scores(untrained, tok, texts, k=0)


def _finite(out):
    for key, v in out.items():
        if isinstance(v, np.ndarray):
            assert np.all(np.isfinite(v)), key
        else:
            assert isinstance(v, float) and math.isfinite(v), (key, v)


def test_tofu_eval_keys_and_training_effect(tok, untrained, trained):
    kw = {"max_new_tokens": 8, "batch_size": 4}
    before = M.tofu_eval(untrained, tok, **SETS, **kw)
    R_retain_model = M.truth_ratios(untrained, tok, [q.question for q in SETS["forget"]],
                                    [q.paraphrased_answer for q in SETS["forget"]],
                                    [q.perturbed_answers for q in SETS["forget"]])
    after = M.tofu_eval(trained, tok, **SETS, retain_model_R=R_retain_model,
                        return_generations=True, **kw)
    splits = ("forget", "retain", "real_authors", "world_facts")
    stats = ("answer_prob", "rougeL_recall", "truth_ratio", "truth_ratio_paper", "truth_ratios")
    expected = {f"{s}_{m}" for s in splits for m in stats}
    expected |= {"model_utility", "forget_repetition_rate", "forget_degenerate_fraction"}
    assert set(before) == expected
    assert set(after) == expected | {"forget_quality", "forget_ks_statistic"} \
        | {f"{s}_generations" for s in splits}
    gens = {k: after.pop(k) for k in list(after) if k.endswith("_generations")}
    assert all(len(g) == len(SETS[k.removesuffix("_generations")]) for k, g in gens.items())
    _finite(before)
    _finite(after)
    assert after["forget_truth_ratios"].shape == (3,)
    assert 0.0 <= after["forget_quality"] <= 1.0
    for s in splits:  # memorised: higher answer probability, lower R, higher paper variant
        assert after[f"{s}_answer_prob"] > before[f"{s}_answer_prob"], s
        assert after[f"{s}_truth_ratios"].mean() < before[f"{s}_truth_ratios"].mean(), s
        assert after[f"{s}_truth_ratio_paper"] > before[f"{s}_truth_ratio_paper"], s
    assert after["retain_truth_ratio"] > before["retain_truth_ratio"]
    assert after["forget_rougeL_recall"] > before["forget_rougeL_recall"]
    assert after["model_utility"] > before["model_utility"]
    assert after["model_utility"] == pytest.approx(M.model_utility(after))


def test_tofu_eval_errors(tok, untrained):
    with pytest.raises(ValueError, match="forget is empty"):
        M.tofu_eval(untrained, tok, **{**SETS, "forget": []})
    no_para = [{"question": "where was anna born ?", "answer": "anna was born in paris .",
                "perturbed_answers": ["anna was born in lima ."]}]
    with pytest.raises(ValueError, match=r"retain\[0\] has no 'paraphrased_answer'"):
        M.tofu_eval(untrained, tok, **{**SETS, "retain": no_para})
    with pytest.raises(ValueError, match=r"forget\[0\].paraphrased_answer is None"):
        M.tofu_eval(untrained, tok, **{**SETS, "forget": [{**no_para[0],
                                                            "paraphrased_answer": None}]})
    # real authors / world facts do not need a paraphrase (the answer is the base)
    M.tofu_eval(untrained, tok, **{**SETS, "world_facts": no_para}, max_new_tokens=2)
    with pytest.raises(ValueError, match="retain_model_R has 2 values but forget has 3"):
        M.tofu_eval(untrained, tok, **SETS, retain_model_R=[1.0, 1.0])
    with pytest.raises(ValueError, match="prompt_template"):
        M.tofu_eval(untrained, tok, **SETS, prompt_template="Q: {}")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        M.tofu_eval(untrained, tok, **SETS, max_new_tokens=0)


def test_muse_eval_keys_and_memorisation(tok, untrained, trained):
    forget, holdout = SETS["forget"] + SETS["retain"], SETS["real_authors"] + SETS["world_facts"]
    verbmem = [(q.question, q.answer) for q in forget]
    kw = {"verbmem": verbmem, "knowmem_forget": SETS["forget"],
          "knowmem_retain": [(q.question, q.answer) for q in SETS["retain"]],
          "forget_texts": [q.question + " " + q.paraphrased_answer for q in forget],
          "holdout_texts": [q.question + " " + q.perturbed_answers[0] for q in holdout],
          "auc_retrain": 0.5, "verbmem_max_new_tokens": 8, "knowmem_max_new_tokens": 8,
          "batch_size": 4}
    before = M.muse_eval(untrained, tok, **kw)
    after = M.muse_eval(trained, tok, **kw)
    keys = {"verbmem_rougeL_f1", "verbmem_repetition_rate", "knowmem_forget_rougeL_recall",
            "knowmem_forget_rougeL_f1", "knowmem_retain_rougeL_recall",
            "knowmem_retain_rougeL_f1", "mink_auc", "privleak"}
    assert set(before) == set(after) == keys
    _finite(before)
    _finite(after)
    assert after["verbmem_rougeL_f1"] > before["verbmem_rougeL_f1"]
    assert after["knowmem_forget_rougeL_recall"] > before["knowmem_forget_rougeL_recall"]
    # MUSE orientation: memorised forget texts -> AUC near 0 -> PrivLeak near -100
    assert after["mink_auc"] < 0.25
    assert after["privleak"] == pytest.approx(M.priv_leak(after["mink_auc"], 0.5))
    only = M.muse_eval(untrained, tok, knowmem_retain=kw["knowmem_retain"],
                       knowmem_max_new_tokens=2)
    assert set(only) == {"knowmem_retain_rougeL_recall", "knowmem_retain_rougeL_f1"}


def test_muse_eval_errors(tok, untrained):
    with pytest.raises(ValueError, match="at least one of"):
        M.muse_eval(untrained, tok)
    with pytest.raises(ValueError, match="forget_texts and holdout_texts go together"):
        M.muse_eval(untrained, tok, forget_texts=["the cat sat"])
    with pytest.raises(ValueError, match="auc_retrain is given"):
        M.muse_eval(untrained, tok, verbmem=[("the cat", "sat")], auc_retrain=0.5)
    with pytest.raises(ValueError, match="knowmem_forget is empty"):
        M.muse_eval(untrained, tok, knowmem_forget=[])
    with pytest.raises(ValueError, match=r"verbmem\[0\] must be a \(prompt, continuation\)"):
        M.muse_eval(untrained, tok, verbmem=[("only a prompt",)])
    with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
        M.muse_eval(untrained, tok, verbmem=[("the cat", "sat")], k=2.0)
