"""The character-level text data module: vocabulary, windows, split, errors."""

from __future__ import annotations

import pytest
import torch

from curvlightning.data.text import (
    CharTextDataModule,
    RandomWindowSampler,
    stdlib_dir,
)

TEXT = "def f(x):\n    return x * 2  # double\n" * 30  # 1,110 characters


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _setup(**kwargs) -> CharTextDataModule:
    data = CharTextDataModule(**kwargs)
    data.setup("fit")
    return data


def test_user_file_is_encoded_with_a_sorted_vocabulary(corpus):
    data = _setup(paths=str(corpus), seq_len=16, val_fraction=0.1)
    assert data.vocab == "".join(sorted(set(TEXT)))
    assert data.vocab_size == len(set(TEXT))
    assert data.decode(data.tokens) == TEXT
    assert data.tokens.dtype == torch.int64


def test_vocabulary_is_deterministic_and_independent_of_file_order(tmp_path):
    (tmp_path / "b.txt").write_text("zebra\n")
    (tmp_path / "a.txt").write_text("apple pie\n" * 10)
    one = _setup(paths=[str(tmp_path / "b.txt"), str(tmp_path / "a.txt")], seq_len=4)
    two = _setup(paths=str(tmp_path), glob="*.txt", seq_len=4)
    assert one.vocab == two.vocab == "\n abeilprz"
    # a folder is read in sorted order, a list in the order given
    assert two.decode(two.tokens).startswith("apple pie\n")
    assert one.decode(one.tokens).startswith("zebra\n")


def test_windows_are_the_corpus_shifted_by_one(corpus):
    data = _setup(paths=str(corpus), seq_len=16, val_fraction=0.2)
    for dataset in (data.train_set, data.val_set):
        for index in (0, 1, len(dataset) - 1):
            x, y = dataset[index]
            start = dataset.start(index)
            assert x.shape == y.shape == (16,)
            assert data.decode(x) == TEXT[start : start + 16]
            assert data.decode(y) == TEXT[start + 1 : start + 17]


def test_train_and_val_windows_read_disjoint_positions(corpus):
    data = _setup(paths=str(corpus), seq_len=16, val_fraction=0.2)
    split = data.num_train_chars
    assert split == len(TEXT) - 222  # ceil(0.2 * 1110) = 222 held out

    def positions(dataset):
        starts = [dataset.start(i) for i in range(len(dataset))]
        return {p for s in starts for p in range(s, s + 17)}  # inputs and targets

    train, val = positions(data.train_set), positions(data.val_set)
    assert train.isdisjoint(val)
    assert max(train) == split - 1  # every training start is used, up to the split
    assert min(val) == split
    assert [data.val_set.start(i) for i in range(3)] == [split, split + 16, split + 32]


def test_training_batches_hold_random_windows_fixed_by_seed_and_epoch(corpus):
    data = _setup(paths=str(corpus), seq_len=16, batch_size=8, seed=3)
    loader = data.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 16)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    assert len(loader.sampler) == data.num_train_chars // 16

    sampler = RandomWindowSampler(num_windows=1000, num_samples=50, seed=3)
    first = list(sampler)
    assert first == list(sampler)  # a function of (seed, epoch) only
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(RandomWindowSampler(1000, 50, seed=4)) != first
    assert all(0 <= i < 1000 for i in first)


def test_validation_batches_are_in_order(corpus):
    data = _setup(paths=str(corpus), seq_len=16, batch_size=4, val_fraction=0.2)
    x, _ = next(iter(data.val_dataloader()))
    expected = torch.stack([data.val_set[i][0] for i in range(4)])
    torch.testing.assert_close(x, expected)


def test_default_corpus_is_the_standard_library_capped_at_max_chars():
    data = _setup(max_chars=60_000)
    assert len(data.tokens) == 60_000
    assert all(f.parent == stdlib_dir() and f.suffix == ".py" for f in data.files)
    assert len(data.files) > 50
    first = data.files[0].read_text(encoding="utf-8")
    assert data.decode(data.tokens[:100]) == first[:100]
    assert 60 < data.vocab_size < 200


def test_vocabulary_travels_in_the_state_dict(corpus, tmp_path):
    data = _setup(paths=str(corpus), seq_len=16)
    state = data.state_dict()
    fresh = CharTextDataModule(paths=str(corpus), seq_len=16)
    fresh.load_state_dict(state)
    assert fresh.vocab == data.vocab
    fresh.setup("fit")  # the corpus agrees with the checkpoint
    other = tmp_path / "other.txt"
    other.write_text("completely different words\n" * 20)
    resumed = _setup(paths=str(other), seq_len=16)
    with pytest.raises(ValueError, match="vocabulary .* differs from the corpus'"):
        resumed.load_state_dict(state)


def test_encode_refuses_unknown_characters(corpus):
    data = _setup(paths=str(corpus), seq_len=16)
    start = TEXT.index("x * 2")
    torch.testing.assert_close(data.encode("x * 2"), data.tokens[start : start + 5])
    with pytest.raises(ValueError, match="character 'Q' of `text` is not in the"):
        data.encode("xQ")


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt' does not exist"):
        CharTextDataModule(paths=str(missing))


def test_too_short_corpus_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a" * 199 + "\n")
    data = CharTextDataModule(paths=str(short), seq_len=128, val_fraction=0.5)
    with pytest.raises(ValueError, match=r"100 for training and 100 for valid.*129"):
        data.setup("fit")


def test_folder_without_matching_files_is_refused(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(ValueError, match=r"no file matching `glob`='\*.py'"):
        CharTextDataModule(paths=str(tmp_path))


def test_undecodable_file_is_named(tmp_path):
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("café au lait\n".encode("latin-1") * 50)
    data = CharTextDataModule(paths=str(binary), seq_len=8)
    with pytest.raises(ValueError, match="latin1.txt' is not valid utf-8 text"):
        data.setup("fit")
    data = _setup(paths=str(binary), seq_len=8, encoding="latin-1")
    assert "é" in data.vocab


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "`seq_len` must be a positive integer: got 0"),
        ({"batch_size": 2.5}, "`batch_size` must be a positive integer: got 2.5"),
        ({"val_fraction": 1.0}, r"`val_fraction` must be in \(0, 1\): got 1.0"),
        ({"max_chars": 1}, "`max_chars` must be an integer of at least 2"),
        ({"num_workers": -1}, "`num_workers` must be a non-negative integer"),
        ({"paths": []}, "`paths` is an empty list"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CharTextDataModule(**kwargs)


def test_vocab_before_setup_says_what_to_do(corpus):
    with pytest.raises(RuntimeError, match="call `setup\\(\\)` first"):
        _ = CharTextDataModule(paths=str(corpus)).vocab_size
