"""Unlearning data: the TinyTOFU generator and the TOFU / MUSE loaders (on small format fixtures)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from optfm.data import tofu
from optfm.data.tofu import (
    QA,
    TinyTOFU,
    UnlearningData,
    generate_authors,
    load_muse,
    load_muse_privleak,
    load_tofu,
    make_tinytofu,
    retain_corpus,
    target_corpus,
    vocabulary_texts,
)

FIXTURES = Path(__file__).parent / "fixtures"
TOFU_DIR = FIXTURES / "tofu"
MUSE_DIR = FIXTURES / "muse"


@pytest.fixture(scope="module")
def world() -> TinyTOFU:
    return TinyTOFU()


@pytest.fixture(scope="module")
def data(world: TinyTOFU) -> UnlearningData:
    return world.split("forget05")


def _all_generated_qa(d: UnlearningData) -> list[QA]:
    return d.forget + d.retain + d.real_authors + d.world_facts + d.holdout


def _split_on_value(qa: QA) -> tuple[str, str]:
    i = qa.answer.rindex(qa.value)
    return qa.answer[:i], qa.answer[i + len(qa.value):]


# ------------------------------------------------------------------------------------------
# TinyTOFU
# ------------------------------------------------------------------------------------------


def test_default_sizes(data: UnlearningData):
    assert data.name == "tinytofu-forget05"
    assert data.sizes() == {
        "forget": 50, "retain": 950, "retain_eval": 100, "real_authors": 40, "world_facts": 60,
        "holdout": 100, "forget_text": 5, "retain_text": 95, "retain_eval_text": 0,
        "holdout_text": 10, "verbmem": 5, "knowmem_forget": 50, "knowmem_retain": 100}
    assert len(data.forget) >= 40  # KS p-values need enough forget questions
    assert len(data.forget_authors) == 5 and len(data.retain_authors) == 95


def test_forget_splits_are_nested(world: TinyTOFU):
    splits = {s: world.split(s) for s in ("forget01", "forget05", "forget10")}
    authors = {s: set(d.forget_authors) for s, d in splits.items()}
    assert [len(authors[s]) for s in splits] == [1, 5, 10]
    assert authors["forget01"] < authors["forget05"] < authors["forget10"]
    keys = {s: {qa.key for qa in d.forget} for s, d in splits.items()}
    assert keys["forget01"] < keys["forget05"] < keys["forget10"]
    # retain = every other author; retain_eval is the same fixed set for every split
    everyone = {a.name for a in world.authors}
    for s, d in splits.items():
        assert set(d.retain_authors) == everyone - authors[s]
        assert len(d.retain) + len(d.forget) == 10 * world.n_authors
    evals = [[qa.key for qa in d.retain_eval] for d in splits.values()]
    assert evals[0] == evals[1] == evals[2]
    assert not {qa.author for qa in splits["forget10"].retain_eval} & authors["forget10"]
    # a fraction gives the same split as its name
    assert world.split(0.05) == splits["forget05"]


def test_authors_are_disjoint_across_forget_retain_holdout(data: UnlearningData):
    forget, retain = set(data.forget_authors), set(data.retain_authors)
    holdout = {qa.author for qa in data.holdout}
    assert len(holdout) == 10
    assert not forget & retain and not forget & holdout and not retain & holdout
    assert {qa.author for qa in data.retain_eval} <= retain
    assert not {qa.key for qa in data.forget} & {qa.key for qa in data.retain}


def test_each_author_has_one_qa_per_attribute(world: TinyTOFU, data: UnlearningData):
    attrs = list(tofu.AUTHOR_TEMPLATES)
    assert len(attrs) == 10
    for author in world.authors[:20] + world.holdout_authors:
        qas = world.qa(author)
        assert [qa.attribute for qa in qas] == attrs
        assert all(qa.author == author.name for qa in qas)
    for qa in _all_generated_qa(data):
        assert qa.paraphrased_answer and len(qa.perturbed_answers) == 5


def test_perturbed_answers_share_the_template_and_swap_the_value(data: UnlearningData):
    for qa in _all_generated_qa(data):
        assert qa.value and qa.value in qa.answer
        prefix, suffix = _split_on_value(qa)
        assert len(set(qa.perturbed_answers)) == len(qa.perturbed_answers)
        for pert in qa.perturbed_answers:
            assert pert != qa.answer
            assert pert.startswith(prefix) and pert.endswith(suffix)
            swapped = pert[len(prefix):len(pert) - len(suffix)]
            assert swapped and swapped != qa.value


def test_paraphrase_differs_but_keeps_the_value(data: UnlearningData):
    for qa in _all_generated_qa(data):
        assert qa.paraphrased_answer != qa.answer
        assert qa.value in qa.paraphrased_answer
        prefix, suffix = _split_on_value(qa)
        assert not (qa.paraphrased_answer.startswith(prefix)
                    and qa.paraphrased_answer.endswith(suffix))  # a different template


def test_answers_are_short_sentences_not_guessable_from_the_question(data: UnlearningData):
    for qa in _all_generated_qa(data):
        assert 8 <= len(qa.answer.split()) <= 20, qa.answer
        assert qa.value not in qa.question
    trained = data.forget + data.retain + data.holdout
    assert len({qa.question for qa in trained}) == len(trained)  # no ambiguous question
    by_attr: dict[str, set[str]] = {}
    for qa in trained:
        by_attr.setdefault(qa.attribute, set()).add(qa.value)
    # values come from pools big enough that they must be memorised
    assert len(by_attr["full_name"]) == 110
    assert len(by_attr["first_book"] | by_attr["second_book"]) == 220
    assert len(by_attr["birth_year"]) > 40 and len(by_attr["birthplace"]) > 40
    assert len(by_attr["award"]) > 60 and len(by_attr["genre"]) == len(tofu.GENRES)


def test_same_seed_same_data_different_seed_different_data():
    a = make_tinytofu(n_authors=30, n_holdout=4, seed=3)
    b = make_tinytofu(n_authors=30, n_holdout=4, seed=3)
    c = make_tinytofu(n_authors=30, n_holdout=4, seed=4)
    assert a == b
    assert a.forget != c.forget and a.retain_text != c.retain_text
    # the main authors do not depend on the number of holdout authors
    d = make_tinytofu(n_authors=30, n_holdout=7, seed=3)
    assert d.retain == a.retain and d.forget_text == a.forget_text and len(d.holdout) == 70


def test_biographies_hold_every_fact_and_verbmem_is_cut_from_them(world: TinyTOFU,
                                                                 data: UnlearningData):
    forget_authors = world.forget_authors("forget05")
    assert data.forget_text == [world.biography(a) for a in forget_authors]
    for author, bio in zip(forget_authors, data.forget_text):
        for value in author.attributes().values():
            assert value in bio
        assert 40 <= len(bio.split()) <= 100
    assert data.holdout_text == [world.biography(a) for a in world.holdout_authors]
    for (prompt, continuation), doc in zip(data.verbmem, data.forget_text):
        assert f"{prompt} {continuation}" == doc and len(prompt.split()) == 20


def test_knowmem_is_short_answer_qa(data: UnlearningData):
    assert [(q.question, q.answer) for q in data.knowmem_forget] == [
        (q.question, q.value) for q in data.forget]
    assert [(q.question, q.answer) for q in data.knowmem_retain] == [
        (q.question, q.value) for q in data.retain_eval]


def test_target_and_retain_corpora(data: UnlearningData):
    target, retain = target_corpus(data), retain_corpus(data)
    utility = {qa.key for qa in data.real_authors + data.world_facts}
    forget = {qa.key for qa in data.forget}
    assert set(target.qa) == forget | {qa.key for qa in data.retain} | utility
    assert set(target.qa) - set(retain.qa) == forget
    assert not forget & set(retain.qa) and utility <= set(retain.qa)
    assert target.documents == data.forget_text + data.retain_text
    assert retain.documents == data.retain_text
    holdout = {qa.key for qa in data.holdout}
    assert not holdout & set(target.qa) and not set(data.holdout_text) & set(target.documents)
    assert len(target.texts()) == len(target) == len(target.qa) + len(target.documents)
    assert target.texts()[0] == f"{data.forget[0].question} {data.forget[0].answer}"


def test_vocabulary_is_modest(data: UnlearningData):
    words = [w.lower() for t in vocabulary_texts(data) for w in re.findall(r"\w+|[^\w\s]+", t)]
    assert len(set(words)) < 3000
    train_words = sum(len(t.split()) for t in target_corpus(data).texts())
    assert 10_000 < train_words < 100_000


def test_generate_authors():
    authors = generate_authors(12, seed=1)
    assert len(authors) == 12 and len({a.name for a in authors}) == 12
    assert authors == generate_authors(12, seed=1) and authors != generate_authors(12, seed=2)
    assert all(len(a.books) == 2 and a.books[0] != a.books[1] for a in authors)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"forget_fraction": "forget20"}, r"forget_fraction must be one of \['forget01'"),
    ({"forget_fraction": 0.0}, "forget_fraction must be in"),
    ({"forget_fraction": 1.5}, "forget_fraction must be in"),
    ({"n_authors": 20, "forget_fraction": "forget01"}, "forgets 0 of n_authors=20"),
    ({"n_perturbed": 0}, r"n_perturbed must be in \[1, 10\]"),
    ({"n_perturbed": 11}, r"n_perturbed must be in \[1, 10\]"),
    ({"n_authors": 1}, "n_authors must be in"),
    ({"n_authors": 4, "n_perturbed": 5}, "n_authors must be >= n_perturbed"),
    ({"n_countries": 3}, "n_countries must be >= n_perturbed"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"n_holdout": 2.5}, "n_holdout must be an integer"),
])
def test_invalid_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tinytofu(**kwargs)


def test_validate_rejects_overlap_and_empty_sets(data: UnlearningData):
    qa = data.forget[0]
    with pytest.raises(ValueError, match="in both forget and retain"):
        UnlearningData("x", forget=[qa], retain=[QA(qa.question, qa.answer)]).validate()
    with pytest.raises(ValueError, match="forget set is empty"):
        UnlearningData("x", retain=data.retain).validate()
    with pytest.raises(ValueError, match="retain set is empty"):
        UnlearningData("x", forget=data.forget).validate()
    other = QA("Another question?", "Another answer.", author=qa.author)
    with pytest.raises(ValueError, match="have QA in both forget and retain"):
        UnlearningData("x", forget=[qa], retain=[other]).validate()
    with pytest.raises(ValueError, match="holdout author"):
        UnlearningData("x", forget=[qa], retain=data.retain[:1], holdout=[other]).validate()
    with pytest.raises(ValueError, match=r"verbmem\[0\]"):
        UnlearningData("x", forget=[qa], retain=data.retain[:1], verbmem=["text"]).validate()
    assert data.validate() is data


def test_module_has_no_torch_and_no_upper_layer_imports():
    tree = ast.parse(Path(tofu.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.split(".")[0] == "torch" or n.startswith(
        ("optfm.unlearning", "optfm.experiments", "optfm.cli", "transformers", "tokenizers"))]


# ------------------------------------------------------------------------------------------
# TOFU loader
# ------------------------------------------------------------------------------------------


def test_load_tofu_fixture():
    d = load_tofu(TOFU_DIR, split="forget10")
    assert isinstance(d, UnlearningData) and d.name == "tofu-forget10"
    assert d.sizes() == {
        "forget": 4, "retain": 6, "retain_eval": 3, "real_authors": 3, "world_facts": 3,
        "holdout": 2, "forget_text": 0, "retain_text": 0, "retain_eval_text": 0,
        "holdout_text": 0, "verbmem": 0, "knowmem_forget": 0, "knowmem_retain": 0}
    # forget rows get paraphrased and 5 perturbed answers from forget10_perturbed (JSON lines)
    for qa in d.forget + d.retain_eval:
        assert qa.paraphrased_answer and qa.paraphrased_answer != qa.answer
        assert len(qa.perturbed_answers) == 5 and qa.answer not in qa.perturbed_answers
    assert d.forget[0].paraphrased_question.startswith("Who is the novelist")
    # retain_perturbed is a JSON array; utility sets have 3 options and no paraphrase
    assert d.retain_eval[0].answer == d.retain[0].answer
    for qa in d.real_authors + d.world_facts:
        assert qa.paraphrased_answer is None and len(qa.perturbed_answers) == 3
    assert d.real_authors[0].answer == "Mirela Stanhope"
    assert all(qa.author is None for qa in d.forget + d.retain)
    assert len(target_corpus(d).qa) == 4 + 6 + 3 + 3 and len(retain_corpus(d).qa) == 6 + 3 + 3


def test_load_tofu_needs_only_forget_and_retain(tmp_path: Path):
    shutil.copy(TOFU_DIR / "forget10.json", tmp_path / "forget10.jsonl")
    shutil.copy(TOFU_DIR / "retain90.json", tmp_path)
    d = load_tofu(tmp_path, "forget10")
    assert len(d.forget) == 4 and not d.forget[0].perturbed_answers
    assert d.retain_eval == d.real_authors == d.world_facts == d.holdout == []


def test_load_tofu_errors(tmp_path: Path):
    with pytest.raises(ValueError, match=r"split must be one of \['forget01', 'forget05', "):
        load_tofu(TOFU_DIR, split="forget20")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_tofu(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="'retain90'"):
        shutil.copy(TOFU_DIR / "forget10.json", tmp_path)
        load_tofu(tmp_path)
    # a row without a required field: the error names the file and the field
    (tmp_path / "retain90.json").write_text(json.dumps({"question": "Who?"}) + "\n")
    with pytest.raises(ValueError, match=r"retain90\.json: row 0 has no field 'answer'"):
        load_tofu(tmp_path)
    shutil.copy(TOFU_DIR / "retain90.json", tmp_path)
    (tmp_path / "world_facts_perturbed.json").write_text(
        json.dumps({"question": "Capital?", "answer": "Kestris"}) + "\n")
    with pytest.raises(ValueError, match=r"world_facts_perturbed\.json: row 0 has no field "
                                         r"'perturbed_answer'"):
        load_tofu(tmp_path)
    (tmp_path / "world_facts_perturbed.json").unlink()
    (tmp_path / "retain90.json").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"retain90\.json: line 1 is not valid JSON"):
        load_tofu(tmp_path)
    # a forget row also in retain
    rows = (TOFU_DIR / "retain90.json").read_text() + (TOFU_DIR / "forget10.json").read_text()
    (tmp_path / "retain90.json").write_text(rows)
    with pytest.raises(ValueError, match=r"4 QA pair\(s\) are in both forget and retain"):
        load_tofu(tmp_path)


# ------------------------------------------------------------------------------------------
# MUSE loader
# ------------------------------------------------------------------------------------------


def test_load_muse_fixture():
    d = load_muse(MUSE_DIR, corpus="news")  # finds news/ under the folder
    assert d == load_muse(MUSE_DIR / "news")
    assert d.name == "muse-news"
    assert d.sizes() == {
        "forget": 0, "retain": 0, "retain_eval": 0, "real_authors": 0, "world_facts": 0,
        "holdout": 0, "forget_text": 2, "retain_text": 2, "retain_eval_text": 1,
        "holdout_text": 2, "verbmem": 2, "knowmem_forget": 3, "knowmem_retain": 3}
    assert d.forget_text[0].startswith("The town council of Ashbury")
    assert d.retain_text[1].startswith("A bakery in Coldharbour")  # JSON lines with "text"
    prompt, gt = d.verbmem[0]
    assert prompt.endswith("swimming baths") and gt.startswith("after 92 years")
    assert d.knowmem_forget[0].answer == "92 years"
    target, retain = target_corpus(d), retain_corpus(d)
    assert target.documents == d.forget_text + d.retain_text + d.retain_eval_text
    assert retain.documents == d.retain_text + d.retain_eval_text and not target.qa
    privleak = load_muse_privleak(MUSE_DIR)
    assert {k: len(v) for k, v in privleak.items()} == {"forget": 2, "retain": 1, "holdout": 2}


def test_load_muse_text_files_and_old_names(tmp_path: Path):
    root = tmp_path / "bbc"
    shutil.copytree(MUSE_DIR / "news", root)
    (root / "raw" / "forget.json").unlink()
    (root / "raw" / "forget.txt").write_text("One long forget document.\n\nSecond paragraph.\n")
    (root / "knowmem" / "retain_qa.json").rename(root / "knowmem" / "retain2_qa.json")
    d = load_muse(tmp_path, corpus="news")
    assert d.forget_text == ["One long forget document.\n\nSecond paragraph.\n"]
    assert len(d.knowmem_retain) == 3


def test_load_muse_errors(tmp_path: Path):
    with pytest.raises(ValueError, match=r"corpus must be one of \['news', 'books'\]"):
        load_muse(MUSE_DIR, corpus="poems")
    with pytest.raises(FileNotFoundError, match="no MUSE books data"):
        load_muse(MUSE_DIR, corpus="books")
    root = tmp_path / "news"
    shutil.copytree(MUSE_DIR / "news", root)
    (root / "knowmem" / "forget_qa.json").rename(root / "knowmem" / "other.json")
    with pytest.raises(FileNotFoundError, match="'forget_qa'"):
        load_muse(root)
    (root / "knowmem" / "other.json").rename(root / "knowmem" / "forget_qa.json")
    (root / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    with pytest.raises(ValueError, match=r"verbmem.forget\.json: row 0 has no field 'gt'"):
        load_muse(root)
    (root / "verbmem" / "forget.json").unlink()
    (root / "raw" / "retain1.json").write_text(json.dumps([{"body": "no text field"}]))
    with pytest.raises(ValueError, match=r"retain1\.json: row 0 has no field 'text'"):
        load_muse(root)


# ------------------------------------------------------------------------------------------
# Parquet
# ------------------------------------------------------------------------------------------


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "forget10.parquet").write_bytes(b"PAR1")
    shutil.copy(TOFU_DIR / "retain90.json", tmp_path)
    with pytest.raises(ImportError, match=r"forget10\.parquet needs pyarrow.*pip install pyarrow"):
        load_tofu(tmp_path)


def _write_parquet(path: Path, rows: list) -> None:
    pa = pytest.importorskip("pyarrow", reason="parquet files need pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tofu_parquet_reads_like_json(tmp_path: Path):
    pytest.importorskip("pyarrow", reason="parquet files need pyarrow")
    # the three parquet layouts: name.parquet, HF shards, and a refs/convert/parquet folder
    _write_parquet(tmp_path / "forget10.parquet", _rows(TOFU_DIR / "forget10.json"))
    _write_parquet(tmp_path / "forget10_perturbed-00000-of-00001.parquet",
                   _rows(TOFU_DIR / "forget10_perturbed.json"))
    _write_parquet(tmp_path / "retain90" / "train" / "0000.parquet",
                   _rows(TOFU_DIR / "retain90.json"))
    d = load_tofu(tmp_path, "forget10")
    ref = load_tofu(TOFU_DIR, "forget10")
    assert d.forget == ref.forget and d.retain == ref.retain


def test_muse_parquet_shards(tmp_path: Path):
    pytest.importorskip("pyarrow", reason="parquet files need pyarrow")
    src = MUSE_DIR / "news"
    for split in ("forget", "retain1"):
        docs = json.loads((src / "raw" / f"{split}.json").read_text()) if split == "forget" else [
            r["text"] for r in _rows(src / "raw" / "retain1.json")]
        _write_parquet(tmp_path / "raw" / f"{split}-00000-of-00001.parquet",
                       [{"text": t} for t in docs])
    for split in ("forget_qa", "retain_qa"):
        _write_parquet(tmp_path / "knowmem" / f"{split}-00000-of-00001.parquet",
                       json.loads((src / "knowmem" / f"{split}.json").read_text()))
    d = load_muse(tmp_path)
    ref = load_muse(src)
    assert d.forget_text == ref.forget_text and d.retain_text == ref.retain_text
    assert d.knowmem_forget == ref.knowmem_forget and d.knowmem_retain == ref.knowmem_retain
