"""ListOps: the evaluator, the LRA-style generator, the tokenizer, the splits and the TSV loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optfm.data.listops import (
    LRA_LISTOPS,
    OPERATORS,
    ListOpsTokenizer,
    evaluate_listops,
    generate_listops,
    listops_depth,
    load_listops_tsv,
    make_listops_splits,
)


@pytest.mark.parametrize(("expr", "value"), [
    ("7", 7),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 5 1 ]", 1),
    ("[SM 5 6 7 ]", 8),                      # 18 mod 10
    ("[SM 9 ]", 9),
    ("[MED 1 9 3 ]", 3),                     # odd count: the middle value
    ("[MED 2 5 ]", 3),                       # even count: int(np.median) = floor(3.5)
    ("[MED 4 1 6 2 ]", 3),                   # sorted 1 2 4 6 -> floor(3.0)
    ("[MED 7 8 ]", 7),                       # floor(7.5)
    ("[SM [MED 1 8 ] 3 [MAX 0 2 ] ]", 9),    # 4 + 3 + 2
    ("[MIN [MAX 1 [SM 9 9 ] ] [MED 9 9 9 ] ]", 8),
])
def test_evaluate_hand_cases(expr: str, value: int) -> None:
    assert evaluate_listops(expr) == value
    assert evaluate_listops(expr.split()) == value


def test_med_matches_lra_numpy_median() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        args = rng.integers(0, 10, size=int(rng.integers(1, 9))).tolist()
        expr = "[MED " + " ".join(map(str, args)) + " ]"
        assert evaluate_listops(expr) == int(np.median(args))


@pytest.mark.parametrize(("expr", "match"), [
    ("", "empty"),
    ("[MAX 1 2", "open"),
    ("[MAX 1 2 ] ]", "after the end"),
    ("]", "without an open operator"),
    ("[MAX ]", "without arguments"),
    ("[MAX 1 12 ]", "unknown token"),
    ("[FIRST 1 2 ]", "unknown token"),
    ("( [MAX 1 2 ] )", "unknown token"),
    ("1 2", "after the end"),
])
def test_evaluate_rejects_malformed(expr: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_listops(expr)


def test_generated_labels_lengths_and_uniqueness() -> None:
    data = generate_listops(2000, max_depth=6, max_args=5, min_length=12, max_length=60, seed=3)
    assert len(data) == 2000
    assert len({e for e, _ in data}) == 2000
    for expr, label in data:
        assert 12 <= len(expr.split()) <= 60
        assert evaluate_listops(expr) == label
        assert 1 <= listops_depth(expr) <= 5
        assert expr.split()[0] in OPERATORS
    labels = np.bincount([y for _, y in data], minlength=10) / len(data)
    assert labels.min() > 0.05 and labels.max() < 0.2   # roughly balanced, 0 and 9 a little ahead


def test_generated_operator_arity_bounds() -> None:
    for expr, _ in generate_listops(300, max_depth=4, max_args=3, min_length=4, max_length=40,
                                    seed=1):
        stack: list[int] = []
        for tok in expr.split():
            if tok in OPERATORS:
                stack.append(0)
            elif tok == "]":
                assert 2 <= stack.pop() <= 3
                if stack:
                    stack[-1] += 1
            else:
                stack[-1] += 1
        assert listops_depth(expr) <= 3


def test_generation_is_seeded_and_fast() -> None:
    import time

    a = generate_listops(300, seed=5)
    assert a == generate_listops(300, seed=5)
    assert a != generate_listops(300, seed=6)
    start = time.perf_counter()
    generate_listops(5000, seed=0)
    assert time.perf_counter() - start < 3.0


def test_lra_setting_lengths() -> None:
    data = generate_listops(20, seed=0, **LRA_LISTOPS)
    assert all(501 <= len(e.split()) <= 1999 and evaluate_listops(e) == y for e, y in data)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num_samples": -1}, "num_samples"),
    ({"num_samples": 2.0}, "num_samples"),
    ({"max_depth": 1}, "max_depth"),
    ({"max_args": 1}, "max_args"),
    ({"max_length": 3}, "max_length"),
    ({"min_length": 0}, "min_length"),
    ({"min_length": 50, "max_length": 40}, "min_length"),
    ({"max_depth": 2, "max_args": 3, "min_length": 6}, "min_length"),   # longest is 5 tokens
    ({"seed": True}, "seed"),
])
def test_generate_rejects_bad_args(kwargs: dict, name: str) -> None:
    args = {"num_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate_listops(**args)


def test_generate_reports_exhaustion() -> None:
    # depth 2, two args, exactly 4 tokens: 4 operators x 100 digit pairs = 400 expressions
    assert len(generate_listops(400, max_depth=2, max_args=2, min_length=4, max_length=4)) == 400
    with pytest.raises(RuntimeError, match="distinct"):
        generate_listops(401, max_depth=2, max_args=2, min_length=4, max_length=4)


def test_tokenizer_round_trip_and_padding() -> None:
    tok = ListOpsTokenizer()
    assert tok.vocab_size == len(tok) == 17 and tok.pad_id == 0
    assert tok.vocab[:2] == ("<pad>", "<cls>") and tok.vocab[-1] == "]"
    exprs = [e for e, _ in generate_listops(50, seed=2)]
    for e in exprs:
        ids = tok.encode(e)
        assert tok.decode(ids) == e
        assert tok.encode(e, add_cls=True) == [tok.cls_id, *ids]
        assert tok.decode(tok.encode(e, add_cls=True)) == e
    batch = tok.encode_batch(exprs[:4])
    assert batch.dtype == torch.long
    lengths = [len(e.split()) for e in exprs[:4]]
    assert batch.shape == (4, max(lengths))
    assert (batch != tok.pad_id).sum(1).tolist() == lengths
    for row, e in zip(batch.tolist(), exprs[:4]):
        assert tok.decode(row) == e
    assert tok.encode_batch(exprs[:2], length=200).shape == (2, 200)
    with pytest.raises(ValueError, match="length"):
        tok.encode_batch(exprs[:2], length=3)
    with pytest.raises(ValueError, match="outside the ListOps vocabulary"):
        tok.encode("[MAX 1 x ]")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([17])


def test_splits_are_disjoint_and_consistent() -> None:
    s = make_listops_splits(300, 50, 60, seed=4)
    assert s.sizes() == {"train": 300, "val": 50, "test": 60}
    sets = {k: set(v) for k, v in s.expressions.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"]
                or sets["val"] & sets["test"])
    for name in ("train", "val", "test"):
        for (ids, label), expr in zip(getattr(s, name), s.expressions[name]):
            assert s.tokenizer.decode(ids) == expr
            assert label == evaluate_listops(expr)
    assert sum(s.class_counts("train")) == 300
    assert 0.0 < s.majority_accuracy("test") < 0.3
    again = make_listops_splits(300, 50, 60, seed=4)
    assert again.train == s.train and again.test == s.test
    ids, labels = s.tokenizer.collate(s.train[:8])
    assert ids.shape[0] == 8 and labels.tolist() == [y for _, y in s.train[:8]]
    with_cls = make_listops_splits(5, 0, 0, seed=4, add_cls=True)
    assert all(ids[0] == ListOpsTokenizer.cls_id for ids, _ in with_cls.train)
    with pytest.raises(ValueError, match="n_val"):
        make_listops_splits(10, -1, 0)
    with pytest.raises(ValueError, match="split"):
        s.class_counts("dev")


def test_load_lra_tsv(tmp_path) -> None:
    path = tmp_path / "basic_test.tsv"
    path.write_text("Source\tTarget\n"
                    "( ( ( ( [MAX 2 ) 9 ) ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )\t9\n"
                    "( ( ( [SM 5 ) 6 ) 7 ) ] )\t8\n", encoding="utf-8")
    assert load_listops_tsv(path) == [("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[SM 5 6 7 ]", 8)]
    path.write_text("Source\tTarget\n( ( [SM 5 ) 6 ) ]\t3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="evaluates to 1"):
        load_listops_tsv(path)
    with pytest.raises(FileNotFoundError):
        load_listops_tsv(tmp_path / "missing.tsv")
