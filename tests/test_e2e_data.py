"""E2E-style data-to-text data (generator, MR strings, CSV loader) and its text metrics."""

from __future__ import annotations

import itertools
import re
import statistics

import pytest

from optfm.data.e2e import (
    SLOT_VALUES,
    SLOTS,
    E2EExample,
    format_mr,
    generate_mrs,
    load_e2e_csv,
    make_e2e,
    parse_mr,
    realise_mr,
    to_pairs,
)
from optfm.data.text_metrics import (
    corpus_bleu,
    missing_slots,
    rouge_l,
    sentence_bleu,
    slot_error_rate,
    slot_realised,
)

MR = ("name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], "
      "customer rating[3 out of 5], area[riverside], familyFriendly[yes], near[Burger King]")


@pytest.fixture(scope="module")
def data():
    return make_e2e(400, seed=0)


# ---- MR strings --------------------------------------------------------------------------------


def test_parse_format_round_trip() -> None:
    slots = parse_mr(MR)
    assert list(slots) == list(SLOTS)
    assert slots["customer rating"] == "3 out of 5" and slots["near"] == "Burger King"
    assert format_mr(slots) == MR
    assert parse_mr(format_mr(slots)) == slots
    assert parse_mr(" name[A] ,food[Fast food]") == {"name": "A", "food": "Fast food"}
    assert parse_mr("name[Café, Rouge]") == {"name": "Café, Rouge"}
    for mr in generate_mrs(200, seed=1):
        assert parse_mr(format_mr(mr)) == mr


@pytest.mark.parametrize("bad", ["", "   ", "name", "name[X", "name[X]]", "name[X] food[Y]",
                                 "name[X],", "name[X], , food[Y]", "name[]", "name[X], name[Y]",
                                 "[X]", "name[X], food[Y]z"])
def test_parse_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="mr"):
        parse_mr(bad)


@pytest.mark.parametrize("bad", [{}, {"name": ""}, {"name": "a[b]"}, {"na,me": "x"},
                                 {" name": "x"}, {"name": 3}])
def test_format_rejects_malformed(bad: dict) -> None:
    with pytest.raises(ValueError, match="slots"):
        format_mr(bad)


# ---- generator -----------------------------------------------------------------------------------


def test_generated_mrs_use_the_e2e_schema() -> None:
    mrs = generate_mrs(300, seed=2)
    assert len({format_mr(m) for m in mrs}) == 300
    for mr in mrs:
        assert "name" in mr and 3 <= len(mr) <= 8
        assert list(mr) == [s for s in SLOTS if s in mr]
        for slot, value in mr.items():
            if slot in SLOT_VALUES:
                assert value in SLOT_VALUES[slot]
        assert mr.get("near") != mr["name"]
    counts = {len(m) for m in mrs}
    assert counts == set(range(3, 9))


def test_make_e2e_splits_by_mr_and_counts_refs(data) -> None:
    assert data.sizes() == {"train": 320, "validation": 40, "test": 40}
    mrs = {name: {ex.mr for ex in getattr(data, name)} for name in ("train", "validation", "test")}
    assert sum(map(len, mrs.values())) == 400
    assert not (mrs["train"] & mrs["validation"] or mrs["train"] & mrs["test"]
                or mrs["validation"] & mrs["test"])
    for ex in data.train + data.validation + data.test:
        assert 3 <= len(ex.references) <= 6
        assert len(set(ex.references)) == len(ex.references)
        assert ex.slots == parse_mr(ex.mr)
    assert {len(ex.references) for ex in data.train} == {3, 4, 5, 6}


def test_make_e2e_is_seeded(data) -> None:
    again = make_e2e(400, seed=0)
    assert again.train == data.train and again.test == data.test
    other = make_e2e(400, seed=1)
    assert other.train != data.train
    assert make_e2e(10, seed=0, refs_per_mr=2).n_references()["train"] == 16


def _family_ok(value: str, text: str) -> bool:
    lowered = text.lower()
    negated = re.search(r"(not|isn't) (family|kid|child)[ -]friendly", lowered) is not None
    positive = re.search(r"(?<!not )(?<!isn't )(family|kid|child)[ -]friendly", lowered)
    return negated if value == "no" else positive is not None and not negated


def test_every_reference_realises_every_slot_value(data) -> None:
    hyps, mrs = [], []
    for ex in data.train + data.validation + data.test:
        slots = ex.slots
        for ref in ex.references:
            for slot, value in slots.items():
                if slot == "familyFriendly":
                    assert _family_ok(value, ref), (ref, value)
                else:
                    assert value.lower() in ref.lower(), (ref, slot, value)
            assert ref.endswith(".") and ref[0].isupper()
            hyps.append(ref)
            mrs.append(ex.mr)
    assert slot_error_rate(hyps, mrs) == 0.0


def test_references_vary(data) -> None:
    scores = [sentence_bleu(a, [b]) for ex in data.train[:120]
              for a, b in itertools.combinations(ex.references, 2)]
    assert statistics.mean(scores) < 60
    assert statistics.mean(scores) > 5     # same slot values: related, not unrelated


def test_realise_mr_on_the_real_example() -> None:
    texts = {realise_mr(MR, seed) for seed in range(20)}
    assert len(texts) > 15
    assert all(not missing_slots(t, MR) for t in texts)
    with pytest.raises(ValueError, match="name"):
        realise_mr({"food": "French", "area": "riverside"}, 0)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_mrs": 0}, "n_mrs"), ({"seed": -1}, "seed"), ({"refs_per_mr": 0}, "refs_per_mr"),
    ({"refs_per_mr": (4, 3)}, "refs_per_mr"), ({"refs_per_mr": (1, 2, 3)}, "refs_per_mr"),
    ({"splits": (0.8, 0.1)}, "splits"), ({"splits": (0.8, 0.3, -0.1)}, "splits"),
    ({"splits": (0.5, 0.1, 0.1)}, "splits"),
])
def test_make_e2e_rejects_bad_args(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_e2e(**{"n_mrs": 10, **kwargs})


def test_to_pairs(data) -> None:
    pairs = to_pairs(data.validation)
    assert len(pairs) == data.n_references()["validation"]
    ex = data.validation[0]
    assert pairs[0] == (ex.mr + "\n", ex.references[0])
    custom = to_pairs([E2EExample("name[A], food[French]", ["A serves French food."])],
                      prompt_template="Describe {{venue}}: {mr}\nText:")
    assert custom == [("Describe {venue}: name[A], food[French]\nText:", "A serves French food.")]
    with pytest.raises(ValueError, match="prompt_template"):
        to_pairs(data.validation, prompt_template="no field")
    with pytest.raises(ValueError, match="prompt_template"):
        to_pairs(data.validation, prompt_template="{mr} {other}")


# ---- real CSV ------------------------------------------------------------------------------------


def test_load_e2e_csv(tmp_path) -> None:
    path = tmp_path / "devset.csv"
    path.write_text(
        "\ufeffmr,ref\n"
        '"name[The Eagle], eatType[coffee shop], priceRange[less than £20]",'
        '"The Eagle is a cheap coffee shop, under £20."\n'
        '"name[Zizzi], food[Italian]",Zizzi serves Italian food.\n'
        '"name[The Eagle], eatType[coffee shop], priceRange[less than £20]",'
        "For less than £20 try The Eagle.\n", encoding="utf-8")
    examples = load_e2e_csv(path)
    assert [ex.mr for ex in examples] == [
        "name[The Eagle], eatType[coffee shop], priceRange[less than £20]",
        "name[Zizzi], food[Italian]"]
    assert examples[0].references == ["The Eagle is a cheap coffee shop, under £20.",
                                      "For less than £20 try The Eagle."]
    assert examples[0].slots["priceRange"] == "less than £20"
    assert examples[1].references == ["Zizzi serves Italian food."]

    no_refs = tmp_path / "testset.csv"
    no_refs.write_text('MR\n"name[Zizzi], food[Italian]"\n', encoding="utf-8")
    assert load_e2e_csv(no_refs) == [E2EExample("name[Zizzi], food[Italian]", [])]

    bad = tmp_path / "bad.csv"
    bad.write_text('mr,ref\n"name[Zizzi], food[Italian]",ok\n"name[Zizzi",x\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        load_e2e_csv(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("meaning,ref\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'mr' column"):
        load_e2e_csv(wrong)
    with pytest.raises(FileNotFoundError):
        load_e2e_csv(tmp_path / "missing.csv")


# ---- metrics -------------------------------------------------------------------------------------


def test_identical_hypotheses_score_perfectly() -> None:
    refs = [["The Eagle is a pub.", "A pub called The Eagle."], ["Zizzi serves French food."]]
    hyps = ["The Eagle is a pub.", "Zizzi serves French food."]
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)
    assert rouge_l(hyps, refs) == pytest.approx(1.0)


def test_bleu_hand_case() -> None:
    # 1-4-gram precisions 5/6, 4/5, 3/4, 2/3, equal lengths: BLEU = (1/3) ** (1/4)
    assert corpus_bleu(["a b c d e f"], [["a b c d e g"]]) == pytest.approx(
        100 * (1 / 3) ** 0.25, abs=1e-6)
    # the best-matching reference counts, the others do not lower the score
    assert corpus_bleu(["a b c d e f"], [["x y z", "a b c d e g"]]) == pytest.approx(
        100 * (1 / 3) ** 0.25, abs=1e-6)
    assert corpus_bleu(["A B C D E F"], [["a b c d e f"]]) < 1.0
    assert corpus_bleu(["A B C D E F"], [["a b c d e f"]], lowercase=True) == pytest.approx(100)


def test_bleu_with_varying_numbers_of_references() -> None:
    hyps = ["the pub is in the city centre near the river", "a dog"]
    refs = [["the pub is in the city centre", "a pub in the city centre near the river"],
            ["a dog barks very loudly"]]
    score = corpus_bleu(hyps, refs)
    # padding must not act as a reference: a duplicate of the lone reference changes nothing
    assert score == pytest.approx(corpus_bleu(hyps, [refs[0], refs[1] * 2]))
    # and neither the order of items nor the order of references matters
    assert score == pytest.approx(corpus_bleu(hyps[::-1], refs[::-1]))
    assert score == pytest.approx(corpus_bleu(hyps, [refs[0][::-1], refs[1]]))
    # padding with "" would be wrong: an empty reference wins the closest-length choice for "a dog"
    import sacrebleu

    streams_empty = [[refs[0][0], refs[1][0]], [refs[0][1], ""]]
    assert sacrebleu.corpus_bleu(hyps, streams_empty).score != pytest.approx(score)


def test_rouge_l_hand_case() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each way
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # best reference per item, then the mean over items
    value = rouge_l(["the cat sat on the mat", "a b"],
                    [["x y z", "the cat is on the mat"], ["c d"]])
    assert value == pytest.approx((5 / 6 + 0) / 2)
    # stemming: "cats"/"sitting" match "cat"/"sits" after Porter stemming
    assert rouge_l(["cats sitting"], [["cat sits"]]) > rouge_l(["dogs running"], [["cat sits"]])


@pytest.mark.parametrize(("text", "yes", "no"), [
    ("It is family-friendly.", True, False),
    ("A kid friendly pub.", True, False),
    ("The pub is children friendly", True, False),
    ("It is not family-friendly.", False, True),
    ("It isn't kid friendly.", False, True),
    ("A non family-friendly pub.", False, True),
    ("It is not very child friendly.", False, True),
    ("Adults only.", False, True),
    ("It is not far from Kingsley Hotel and is kid friendly.", True, False),
    ("A pub near the river.", False, False),
])
def test_family_friendly_phrasing(text: str, yes: bool, no: bool) -> None:
    assert slot_realised("familyFriendly", "yes", text) is yes
    assert slot_realised("familyFriendly", "no", text) is no


def test_slot_error_rate_hand_case() -> None:
    mr = "name[The Eagle], food[French], priceRange[high], familyFriendly[no]"
    hyp = "The Eagle serves french food and is kid friendly."
    assert missing_slots(hyp, mr) == ["priceRange", "familyFriendly"]
    assert slot_error_rate([hyp], [mr]) == pytest.approx(2 / 4)
    assert slot_error_rate([hyp, "The Eagle is a high-priced French place, not kid friendly."],
                           [mr, parse_mr(mr)]) == pytest.approx(2 / 8)
    assert not slot_realised("priceRange", "high", "It is highly rated.")
    assert slot_realised("priceRange", "£20-25", "It charges £20-25 per person.")
    assert slot_realised("customer rating", "1 out of 5", "rated 1 out  of 5")


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="same length"):
        rouge_l(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="same length"):
        slot_error_rate(["a"], [MR, MR])
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        corpus_bleu(["a b"], ["a b"])              # a bare string, not a list of references
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        rouge_l(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="mr"):
        slot_error_rate(["a"], ["not an mr"])
