import numpy as np
import pytest
import torch

from optfm.data import (
    ByteTokenizer,
    build_word_tokenizer,
    hash_split,
    load_digits_canvas,
    load_digits_split,
    make_digits_canvas,
    python_stdlib_corpus,
    sample_lm_batch,
    stdlib_files,
)
from optfm.training import make_generator


def test_digits_split_is_stratified_disjoint_and_standardised():
    d = load_digits_split(random_state=0)
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.train_index).isdisjoint(d.test_index)
    assert len(set(d.train_index) | set(d.test_index)) == 1797
    # stratified: every class is 20% +- one sample of its count in the test part
    counts_tr = np.bincount(d.y_train.numpy(), minlength=10)
    counts_te = np.bincount(d.y_test.numpy(), minlength=10)
    assert np.all(np.abs(counts_te - 0.2 * (counts_tr + counts_te)) <= 1)
    # standardised with training statistics only (constant pixels keep scale 1)
    varying = d.x_train.std(0) > 0
    assert torch.allclose(d.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(d.x_train[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum())), atol=1e-4)
    assert d.num_classes == 10


def test_digits_split_depends_on_random_state_only():
    a, b, c = (load_digits_split(random_state=s) for s in (0, 0, 1))
    assert np.array_equal(a.train_index, b.train_index)
    assert not np.array_equal(a.train_index, c.train_index)
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=1.5)


def test_digits_canvas_layout():
    images, labels, offsets = make_digits_canvas(canvas_size=12, noise=0.1, random_state=0)
    assert images.shape == (1797, 12, 12) and labels.shape == (1797,)
    assert offsets.min() >= 0 and offsets.max() <= 4
    assert len({tuple(o) for o in offsets}) == 25  # all 5x5 offsets occur
    assert images.min() >= 0.0 and images.max() <= 1.0
    # outside the pasted 8x8 block only U(0, 0.1) noise remains
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0
    for i in (0, 1, 500):
        r, c = offsets[i]
        mask = np.ones((12, 12), bool)
        mask[r:r + 8, c:c + 8] = False
        assert images[i][mask].max() < 0.1
        assert np.all(images[i, r:r + 8, c:c + 8] >= raw[i] - 1e-6)
    again, _, off2 = make_digits_canvas(random_state=0)
    assert np.array_equal(images, again) and np.array_equal(offsets, off2)
    with pytest.raises(ValueError, match="canvas_size"):
        make_digits_canvas(canvas_size=6)


def test_digits_canvas_defeats_raw_pixel_linear_model():
    """The canvas exists because plain digits are too easy: specs/contrastive.md measured raw-pixel
    logistic regression at 96.9% (plain) vs 29% (canvas)."""
    from sklearn.linear_model import LogisticRegression

    d = load_digits_canvas(random_state=0)
    assert d.x_train.shape == (1437, 1, 12, 12)
    clf = LogisticRegression(max_iter=2000).fit(d.x_train.flatten(1).numpy(), d.y_train.numpy())
    acc = clf.score(d.x_test.flatten(1).numpy(), d.y_test.numpy())
    assert 0.2 < acc < 0.45, acc


def _fake_stdlib(root):
    files = {
        "os.py": b"import sys\n",
        "json/__init__.py": b"# json\n",
        "json/decoder.py": b"x = 1\n",
        "test/test_os.py": b"bad\n",
        "idlelib/editor.py": b"bad\n",
        "unittest/test/test_case.py": b"bad\n",
        "site-packages/pkg/mod.py": b"bad\n",
        "email/__pycache__/x.py": b"bad\n",
        "email/parser.py": b"def parse(): pass\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_corpus_excludes_tests_idlelib_and_site_packages(tmp_path):
    _fake_stdlib(tmp_path)
    names = [rel for rel, _ in stdlib_files(tmp_path)]
    assert names == ["email/parser.py", "json/__init__.py", "json/decoder.py", "os.py"]


def test_hash_split_is_stable_and_by_path():
    # Pinned values: the split must never change across runs, machines or versions.
    assert hash_split("os.py", 0.1) == "train"
    assert [hash_split(f"m{i}.py", 0.5) for i in range(8)] == [
        hash_split(f"m{i}.py", 0.5) for i in range(8)]
    frac = np.mean([hash_split(f"pkg/mod{i}.py", 0.1) == "val" for i in range(4000)])
    assert 0.08 < frac < 0.12


def test_pinned_hash_assignments():
    import hashlib

    for rel in ("asyncio/events.py", "json/decoder.py", "collections/__init__.py"):
        h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
        assert hash_split(rel, 0.1) == ("val" if h < 0.1 else "train")


def test_corpus_build_cache_and_no_file_in_both_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTFM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "lib"
    _fake_stdlib(root)
    c = python_stdlib_corpus(root=root, val_fraction=0.5)
    assert set(c.train_files).isdisjoint(c.val_files)
    assert sorted(c.train_files + c.val_files) == [rel for rel, _ in stdlib_files(root)]
    n_docs = int((np.asarray(c.train) == 256).sum() + (np.asarray(c.val) == 256).sum())
    assert n_docs == 4
    total = sum(len(p.read_bytes()) for _, p in stdlib_files(root))
    assert len(c.train) + len(c.val) == total + 4
    assert (tmp_path / "cache" / "corpus").is_dir()
    cached = python_stdlib_corpus(root=root, val_fraction=0.5)
    assert np.array_equal(cached.train, c.train) and cached.val_files == c.val_files
    # editing a file changes the fingerprint: no stale cache
    (root / "os.py").write_bytes(b"import sys\nimport os\n")
    rebuilt = python_stdlib_corpus(root=root, val_fraction=0.5)
    assert len(rebuilt.train) + len(rebuilt.val) == total + 4 + len(b"import os\n")


def test_real_stdlib_corpus():
    c = python_stdlib_corpus()
    assert len(c.train_files) > 300 and len(c.val_files) > 20
    assert set(c.train_files).isdisjoint(c.val_files)
    assert not any(f.startswith(("test/", "idlelib/")) for f in c.train_files + c.val_files)
    assert len(c.train) > 1_000_000 and int(np.max(c.train)) == 256 and c.vocab_size == 257
    text = ByteTokenizer().decode(np.asarray(c.train[:2000]))
    assert "\n" in text
    x, y = sample_lm_batch(c.tensor("val"), 4, 64, generator=make_generator(0))
    assert x.shape == y.shape == (4, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_sample_lm_batch_errors():
    with pytest.raises(ValueError, match="too short"):
        sample_lm_batch(torch.arange(10), 2, 10, generator=make_generator(0))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ∑", add_eos=True)
    assert ids[-1] == 256 and max(ids[:-1]) < 256
    assert tok.decode(ids) == "héllo ∑"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_word_tokenizer():
    tok = build_word_tokenizer(["a handwritten seven", "a handwritten three, bold"])
    assert tok.pad_token_id == 0 and tok.unk_token_id == 1
    ids = tok("A handwritten seven")["input_ids"]
    assert tok.decode(ids) == "a handwritten seven"
    assert tok("a purple seven")["input_ids"][1] == tok.unk_token_id
    batch = tok(["a seven", "a handwritten bold three"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"][0].tolist() == [1, 1, 0, 0]
    small = build_word_tokenizer(["a b c d e f g"], vocab_size=6)
    assert len(small) == 6
    with pytest.raises(ValueError, match="vocab_size"):
        build_word_tokenizer(["x"], vocab_size=3)
