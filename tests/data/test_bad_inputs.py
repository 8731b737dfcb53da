"""The inputs users get wrong fail at load time, naming the key, file or dataset and what
was expected: labels outside config.model.num_classes, an empty local corpus, a file that
is not UTF-8, a batch size below 1."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from data_helpers import data_config, make_texts

from configs.common import base_config
from train.data import pipeline, sources


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- Labels against config.model.num_classes --------------------------------------------


def test_local_labels_beyond_num_classes_are_refused(tmp_path):
    texts = make_texts(300, seed=11)
    corpus = _write_jsonl(tmp_path / "topics.jsonl",
                          [{"text": t, "label": i % 52} for i, t in enumerate(texts)])
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(corpus),))
    train = sources.load_split(cfg, "train")
    with pytest.raises(ValueError) as e:
        sources.check_labels(train, 45, "train", cfg)
    message = str(e.value)
    assert message.startswith("config.model.num_classes=45 but ")
    assert str(corpus) in message and "split 'train'" in message
    assert "labels up to 51 (52 classes): set config.model.num_classes=52" in message
    sources.check_labels(train, 52, "train", cfg)
    sources.check_labels(train, 60, "train", cfg)  # Unused outputs: allowed.


def test_local_string_labels_count_as_classes(tmp_path):
    texts = make_texts(200, seed=12)
    corpus = _write_jsonl(tmp_path / "s.jsonl", [{"text": t, "label": ["neg", "pos", "mixed"]
                                                  [i % 3]} for i, t in enumerate(texts)])
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(corpus),))
    with pytest.raises(ValueError, match="set config.model.num_classes=3"):
        sources.check_labels(sources.load_split(cfg, "train"), 2, "train", cfg)


def test_unnamed_int_labels_are_read_and_checked():
    cfg = data_config("", source="tfds", tfds_name="my_reviews", label_key="stars")
    source = [{"text": "a", "label": 4}, {"text": "b", "label": 9}, {"text": "c", "label": 0}]
    with pytest.raises(ValueError, match=r"config.model.num_classes=5 but tfds dataset "
                                         r"'my_reviews' .*labels up to 9 \(10 classes\)"):
        sources.check_labels(source, 5, "train", cfg)
    sources.check_labels(source, 10, "train", cfg)
    unlabelled = [{"text": "a", "label": -1}, {"text": "b", "label": 1}]  # tfds: no label.
    with pytest.raises(ValueError, match=r"'my_reviews'.*split 'test' has 1 of 2 labels "
                                         r"below 0"):
        sources.check_labels(unlabelled, 10, "test", cfg)


def test_unlabelled_source_is_refused(tmp_path):
    corpus = tmp_path / "plain.txt"
    corpus.write_text("\n".join(make_texts(200, seed=13)) + "\n")
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(corpus),))
    with pytest.raises(ValueError, match=r"plain.txt.*split 'train' has no labels"):
        sources.check_labels(sources.load_split(cfg, "train"), 45, "train", cfg)


@pytest.mark.slow
def test_wordnet_labels_checked_fast(wordnet_data_dir):
    cfg = data_config(wordnet_data_dir, label_fraction=0.5)
    full = sources.load_split(data_config(wordnet_data_dir), "train")
    start = time.perf_counter()
    sources.check_labels(full, 45, "train", cfg)
    with pytest.raises(ValueError, match="set config.model.num_classes=45"):
        sources.check_labels(full, 44, "train", cfg)
    assert time.perf_counter() - start < 0.1  # Its labels are class ids by construction.
    # The label array is read once per split and serves label_fraction's subset too.
    half = sources.load_split(cfg, "train")
    labels = sources.label_array(half)
    assert len(labels) == len(half) and labels.max() == 44
    np.testing.assert_array_equal(labels[:50], [half[i]["label"] for i in range(50)])


# --- Local corpus files ----------------------------------------------------------------


def test_empty_local_corpus_names_its_files(tmp_path):
    blank, empty = tmp_path / "blank.txt", tmp_path / "empty.jsonl"
    blank.write_text("\n   \n\t\n")
    empty.write_text("")
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(blank), str(empty)))
    with pytest.raises(ValueError) as e:
        sources.load_split(cfg, "train")
    message = str(e.value)
    assert "config.data.local_files" in message and "no non-empty line/record" in message
    assert str(blank) in message and str(empty) in message


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    corpus = tmp_path / "latin1.txt"
    text = "\n".join(make_texts(50, seed=14)) + "\ncafé crème\n"
    corpus.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(corpus),))
    with pytest.raises(ValueError) as e:
        sources.load_split(cfg, "train")
    message = str(e.value)
    assert message.startswith(f"{corpus}: not UTF-8 text: byte 0xe9 at byte offset {offset} "
                              f"(line 51)")
    assert "must be UTF-8" in message


# --- Batch sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_batch_size_below_one_is_refused(key, value):
    config = base_config()
    config.data[key] = value
    with pytest.raises(ValueError, match=rf"config.data.{key}={value}; expected a whole "
                                         rf"number of examples >= 1"):
        pipeline.check_batch_sizes(config)
    with pytest.raises(ValueError, match=rf"config.data.{key}={value};"):
        pipeline.per_process_batch(value, 1, key)
    pipeline.check_batch_sizes(base_config())


def test_the_loop_refuses_labels_beyond_num_classes_before_writing(tmp_path):
    """Out-of-range labels once trained without an error (the loss fell; evaluation was
    meaningless)."""
    from configs import scratch
    from train import loop

    texts = make_texts(300, seed=12)
    corpus = _write_jsonl(tmp_path / "topics.jsonl",
                          [{"text": t, "label": i % 52} for i, t in enumerate(texts)])
    config = scratch.get_config("runlocal")
    config.data.update(source="local", local_files=(str(corpus),),
                       data_dir=str(tmp_path / "tfds"), vocab_size=300)
    config.model.vocab_size = 300
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"config.model.num_classes=45 .* set "
                                         r"config.model.num_classes=52"):
        loop.train_and_evaluate(config, str(workdir))
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("arg,expected", [
    ("method=lora,lora_rank=abc", "lora_rank='abc' in 'method=lora,lora_rank=abc': "
                                  "expected an int like the default 8"),
    ("method=lora,lora_alpha=x", "expected a float like the default 16.0"),
    ("method=bitfit,norm_offsets=maybe", "expected a boolean")])
def test_a_colon_argument_of_the_wrong_type_names_it(arg, expected):
    from configs import finetune

    with pytest.raises(ValueError, match="Config argument") as error:
        finetune.get_config(arg)
    assert expected in str(error.value)
