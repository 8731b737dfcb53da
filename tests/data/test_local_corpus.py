"""Local .txt / .jsonl corpora: counts, labels, cache keys and error messages."""

from __future__ import annotations

import json

import pytest
from data_helpers import data_config, make_texts

from train.data import local_corpus, sources

SPLITS = ("train", "validation", "test")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _all_rows(cfg):
    b = sources.builder(cfg)
    out = []
    for s in SPLITS:
        if s in b.info.splits:
            src = sources.load_split(cfg, s)
            out += [src[i] for i in range(len(src))]
    return out


def test_txt_and_jsonl_counts(tmp_path):
    texts = make_texts(700, seed=3)
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(texts[:400]) + "\n\n   \n")  # Blank lines are skipped.
    jl = _write_jsonl(
        tmp_path / "b.jsonl", [{"body": t, "id": i} for i, t in enumerate(texts[400:])]
    )
    cfg = data_config(
        tmp_path / "tfds", source="local", local_files=(str(txt), str(jl)), local_name="mine",
        text_key="body",
    )  # fmt: skip
    rows = _all_rows(cfg)
    assert sorted(r["text"] for r in rows) == sorted(texts)
    assert all("label" not in r for r in rows)  # No label_key field in the records.
    assert sources.label_names(cfg) is None
    train = sources.load_split(cfg, "train")
    assert 0.95 * 700 < len(train) < 700 and not train.labelled
    assert all(local_corpus.split_of(train[i]["text"]) == "train" for i in range(len(train)))


def test_jsonl_labels_strings_and_ints(tmp_path):
    texts = make_texts(300, seed=4)
    recs = [{"text": t, "label": ["neg", "pos", "mixed"][i % 3]} for i, t in enumerate(texts)]
    cfg = data_config(
        tmp_path / "tfds",
        source="local",
        local_files=(str(_write_jsonl(tmp_path / "s.jsonl", recs)),),
    )
    names = sources.label_names(cfg)
    assert names == ["mixed", "neg", "pos"]
    want = {r["text"]: names.index(r["label"]) for r in recs}
    rows = _all_rows(cfg)
    assert len(rows) == 300 and all(want[r["text"]] == r["label"] for r in rows)

    recs = [{"text": t, "y": i % 4 + 1} for i, t in enumerate(texts)]  # Class 0 unused.
    cfg = data_config(
        tmp_path / "tfds", source="local", label_key="y",
        local_files=(str(_write_jsonl(tmp_path / "i.jsonl", recs)),),
    )  # fmt: skip
    assert sources.label_names(cfg) == ["0", "1", "2", "3", "4"]
    want = {r["text"]: r["y"] for r in recs}
    assert all(want[r["text"]] == r["label"] for r in _all_rows(cfg))


def test_cache_key_by_name_and_content(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(make_texts(200, seed=5)) + "\n")
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(f),), local_name="one")
    b1 = sources.builder(cfg)
    assert sources.builder(cfg).data_path == b1.data_path  # Reused, same key.
    assert b1.builder_config.name.startswith("one-")
    cfg2 = data_config(tmp_path / "tfds", source="local", local_files=(str(f),), local_name="two")
    assert sources.builder(cfg2).data_path != b1.data_path  # Names never collide.

    f.write_text("\n".join(make_texts(250, seed=6)) + "\n")  # Edit the file: rebuild.
    b3 = sources.builder(cfg)
    assert b3.data_path != b1.data_path
    assert sum(b3.info.splits[s].num_examples for s in b3.info.splits) == 250


def test_jsonl_missing_text_field_names_file_line_key(tmp_path):
    recs = [{"text": "fine"}, {"text": "also fine"}, {"txt": "typo"}]
    jl = _write_jsonl(tmp_path / "bad.jsonl", recs)
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(jl),))
    with pytest.raises(KeyError) as e:
        sources.load_split(cfg, "train")
    msg = str(e.value)
    assert f"{jl}:3" in msg and "'text'" in msg and "config.data.text_key" in msg


def test_jsonl_missing_label_and_bad_json(tmp_path):
    jl = _write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(jl),))
    with pytest.raises(KeyError, match=rf"{jl}:2: missing label field 'label'"):
        sources.load_split(cfg, "train")
    bad = tmp_path / "j.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(bad),))
    with pytest.raises(ValueError, match=rf"{bad}:2: invalid JSON"):
        sources.load_split(cfg, "train")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    cfg = data_config(tmp_path / "tfds", source="local", local_files=(str(missing),))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sources.load_split(cfg, "train")
    cfg = data_config(tmp_path / "tfds", source="local", local_files=())
    with pytest.raises(ValueError, match="local_files"):
        sources.load_split(cfg, "train")
