"""Tokenizer: training, caching, special ids, round trips, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_helpers import data_config, make_texts

from train.data import tokenizer as tokenizer_lib


@pytest.fixture
def corpus_cfg(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(make_texts(1500, seed=7)) + "\n")
    return data_config(
        tmp_path / "tfds", source="local", local_files=(str(f),), local_name="tok", vocab_size=250
    )


def test_trains_once_then_reuses_cache(corpus_cfg):
    before = tokenizer_lib.train_count
    tok = tokenizer_lib.get_tokenizer(corpus_cfg)
    path = tokenizer_lib.tokenizer_path(corpus_cfg)
    assert tokenizer_lib.train_count == before + 1
    assert path.is_file() and tok.path == str(path)
    assert path.parent.name == "tokenizers" and path.name.endswith("-v250-s200000.model")
    mtime = os.stat(path).st_mtime_ns

    again = tokenizer_lib.get_tokenizer(corpus_cfg)
    assert tokenizer_lib.train_count == before + 1  # No retraining.
    assert os.stat(path).st_mtime_ns == mtime
    assert again.encode("ka lo mi") == tok.encode("ka lo mi")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # No temp left.

    corpus_cfg.vocab_size = 200  # Another size is another cache entry.
    assert tokenizer_lib.tokenizer_path(corpus_cfg) != path


def test_special_ids(tiny_tokenizer):
    t = tiny_tokenizer
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 1, 2, 3, 4)
    assert (t.bos_id, t.eos_id) == (t.cls_id, t.sep_id)
    assert t.special_ids == {0, 1, 2, 3, 4}
    assert [t.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 100 < t.vocab_size <= 300
    # Text never encodes to the control symbols, even when spelled out.
    ids = t.encode("ka [MASK] lo [CLS]")
    assert not {0, 2, 3, 4} & set(ids)


def test_round_trip_and_word_starts(tiny_tokenizer):
    t = tiny_tokenizer
    for text in make_texts(50, seed=11):
        ids = t.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert t.decode(ids) == text
        assert t.decode([t.cls_id, *ids, t.sep_id, t.pad_id, t.pad_id]) == text
        starts = t.word_start_mask(ids)
        assert starts.dtype == np.bool_ and starts.shape == (len(ids),)
        assert starts.sum() == len(text.split())  # One word start per word.
        assert starts[0]
    assert t.word_start_mask(np.array([[0, 2], [3, 4]])).all()  # Specials stand alone.


def test_training_is_deterministic(tmp_path):
    texts = make_texts(800, seed=9)
    a = tokenizer_lib.train_tokenizer(texts, tmp_path / "a.model", 150)
    b = tokenizer_lib.train_tokenizer(texts, tmp_path / "sub" / "b.model", 150)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "sub" / "b.model").read_bytes()
    assert a.encode(texts[0]) == b.encode(texts[0])


def test_bad_tokenizer_path_errors(tmp_path, tiny_tokenizer):
    missing = tmp_path / "missing.model"
    cfg = data_config(tmp_path, tokenizer_path=str(missing))
    with pytest.raises(FileNotFoundError) as e:
        tokenizer_lib.get_tokenizer(cfg)
    assert str(missing) in str(e.value) and "sentencepiece .model" in str(e.value)

    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a model\x00\xff" * 10)
    cfg.tokenizer_path = str(corrupt)
    with pytest.raises(tokenizer_lib.TokenizerError) as e:
        tokenizer_lib.get_tokenizer(cfg)
    assert str(corrupt) in str(e.value) and "sentencepiece .model" in str(e.value)

    cfg.tokenizer_path = tiny_tokenizer.path  # A valid explicit path is loaded as is.
    assert tokenizer_lib.get_tokenizer(cfg).vocab_size == tiny_tokenizer.vocab_size


def test_pickles_for_worker_processes(tiny_tokenizer):
    import pickle

    t = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert t.encode("ka lo") == tiny_tokenizer.encode("ka lo") and t.mask_id == 4
