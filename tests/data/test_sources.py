"""sources: dispatch, field mapping, label_fraction, training texts, errors."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from data_helpers import data_config, make_texts

from train.data import sources, tokenizer, wordnet
from train.data.builder_base import LocalBuilder

REVIEWS = make_texts(120, seed=21)


class StrataTinyReviews(LocalBuilder):
    """A registered tfds dataset with a nested text field, standing in for e.g. imdb."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs looks for package metadata, and a
        # test module is not a package.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "review": {"body": tfds.features.Text()},
                    "polarity": tfds.features.ClassLabel(names=["neg", "pos"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(REVIEWS[:100]),
            "test": self._generate_examples(REVIEWS[100:]),
        }

    def _generate_examples(self, texts):
        for t in texts:
            yield t, {"review": {"body": t}, "polarity": len(t) % 2}


def test_data_dir_resolution(monkeypatch, tmp_path):
    cfg = data_config("")
    monkeypatch.delenv("STRATA_DATA_DIR", raising=False)
    assert sources.data_dir(cfg) == os.path.expanduser("~/.cache/strata/tfds")
    monkeypatch.setenv("STRATA_DATA_DIR", str(tmp_path / "env"))
    assert sources.data_dir(cfg) == str(tmp_path / "env")
    assert sources.data_dir(data_config(tmp_path / "cfg")) == str(tmp_path / "cfg")


def test_tfds_source_maps_fields(tmp_path):
    StrataTinyReviews(data_dir=str(tmp_path)).prepare()
    cfg = data_config(
        tmp_path, source="tfds", tfds_name="strata_tiny_reviews", text_key="review/body",
        label_key="polarity",
    )  # fmt: skip
    train = sources.load_split(cfg, "train")
    assert len(train) == 100 and train.labelled
    rows = [train[i] for i in range(len(train))]
    assert sorted(r["text"] for r in rows) == sorted(REVIEWS[:100])
    assert all(r["label"] == len(r["text"]) % 2 for r in rows)
    assert sources.label_names(cfg) == ["neg", "pos"]
    assert sorted(sources.training_texts(cfg)) == sorted(REVIEWS[:100])
    assert len(list(sources.training_texts(cfg, limit=7))) == 7

    cfg.label_key = ""  # Unlabelled use (e.g. MLM).
    assert "label" not in sources.load_split(cfg, "test")[0]
    cfg.text_key = "nope"
    with pytest.raises(KeyError, match="review/body"):  # Names the available features.
        sources.load_split(cfg, "test")


def test_tfds_not_prepared_says_no_download(tmp_path):
    cfg = data_config(tmp_path / "empty", source="tfds", tfds_name="strata_tiny_reviews")
    with pytest.raises(FileNotFoundError) as e:
        sources.load_split(cfg, "train")
    assert str(tmp_path / "empty") in str(e.value) and "nothing is downloaded" in str(e.value)


def test_bad_source_and_missing_split(tmp_path):
    with pytest.raises(ValueError, match="config.data.source"):
        sources.load_split(data_config(tmp_path, source="csv"), "train")
    f = tmp_path / "tiny.txt"
    f.write_text("one doc\nanother doc\n")
    cfg = data_config(tmp_path, source="local", local_files=(str(f),))
    missing = {"train", "validation", "test"} - set(sources.builder(cfg).info.splits)
    assert missing  # Two documents cannot fill three splits.
    with pytest.raises(KeyError, match="98/1/1"):
        sources.load_split(cfg, sorted(missing)[0])


def test_wordnet_missing_files_error(tmp_path):
    cfg = data_config(tmp_path / "tfds", wordnet_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        sources.load_split(cfg, "train")
    assert not (tmp_path / "tfds" / "strata_wordnet").exists()  # Nothing half-built.


def test_wordnet_splits(wordnet_data_dir):
    cfg = data_config(wordnet_data_dir)
    splits = {s: sources.load_split(cfg, s) for s in ("train", "validation", "test")}
    assert all(src.labelled for src in splits.values())
    assert sources.label_names(cfg) == list(wordnet.LEXNAMES)
    ex = splits["validation"][3]
    assert set(ex) == {"text", "label"} and isinstance(ex["text"], str) and ex["text"]
    assert 0 <= ex["label"] < 45
    ex = sources.load_split(cfg, "test", extra_fields=("synset_id", "lemmas"))[0]
    assert ex["synset_id"][0] in "nvar" and isinstance(ex["lemmas"], list)


def test_label_fraction_is_stratified_and_deterministic(wordnet_data_dir):
    cfg = data_config(wordnet_data_dir, label_fraction=0.05)
    full = sources.load_split(data_config(wordnet_data_dir), "train")
    sub = sources.load_split(cfg, "train")
    assert list(sub.indices) == list(sources.subset_indices(full, 0.05))  # Deterministic.
    assert len(sub) == pytest.approx(0.05 * len(full), rel=0.05)
    full_counts = collections.Counter(ex["label"] for ex in full.iter_range(keys=("label",)))
    sub_counts = collections.Counter(sub[i]["label"] for i in range(len(sub)))
    assert set(sub_counts) == set(full_counts)  # Every class kept (at least one example).
    for c, n in full_counts.items():
        assert sub_counts[c] == max(1, round(0.05 * n))
    assert len(sources.load_split(cfg, "validation")) == len(  # Only train is subsampled.
        sources.load_split(data_config(wordnet_data_dir), "validation")
    )


def test_wordnet_training_texts_and_tokenizer(wordnet_data_dir):
    cfg = data_config(wordnet_data_dir, vocab_size=400, tokenizer_sample=3000)
    fields = {"gloss": "gloss", "examples": "examples", "lemmas": "lemmas"}
    b = sources.builder(cfg)
    first = sources._split_reader(cfg, b, "train", fields)[0]
    texts = list(sources.training_texts(cfg, limit=3000))
    assert len(texts) == 3000
    assert texts[: 2 + len(first["examples"])] == [
        first["gloss"],
        *first["examples"],
        " ".join(first["lemmas"]),
    ]
    path = tokenizer.tokenizer_path(cfg)  # Cached beside the dataset (session temp dir).
    assert path == Path(wordnet_data_dir) / "tokenizers" / "strata_wordnet-v400-s3000.model"
    tok = tokenizer.get_tokenizer(cfg)
    assert tok.decode(tok.encode("a member of the genus Canis")) == "a member of the genus Canis"


def test_wordnet_documents_with_examples():
    from train.data.records import WithExamples

    class Synsets(list):
        labelled = True

    source = WithExamples(Synsets([
        {"text": "a member of the genus Canis", "label": 5,
         "examples": ["the dog barked all night", ""]},
        {"text": "no examples here", "label": 1, "examples": []},
    ]))
    assert len(source) == 2 and source.labelled
    assert source[0] == {"text": "a member of the genus Canis; the dog barked all night",
                         "label": 5}
    assert source[1]["text"] == "no examples here"
