"""grain pipelines: determinism, resumption, sharding, eval padding, packing."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
from data_helpers import data_config, make_texts
from jax.sharding import Mesh, PartitionSpec

from train.data import pipeline, sources, tokenizer

L = 24


@pytest.fixture(scope="module")
def texts():
    return make_texts(64, seed=2, max_words=20)  # Some exceed L tokens (truncation).


@pytest.fixture(scope="module")
def source(texts):
    """Plain list source; `label` = the example's index, so batches name their examples."""
    return [{"text": t, "label": i} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def short_source():
    """Short texts (~4-12 pieces): several fit in one packed row."""
    return [{"text": t, "label": i} for i, t in enumerate(make_texts(64, seed=12, max_words=4))]


def _cfg(**kw):
    return data_config("/unused", **{"seq_len": L, "batch_size": 8, "eval_batch_size": 8, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _encoded(tok, text):
    return [tok.cls_id, *tok.encode(text)[: L - 2], tok.sep_id]


def test_padded_batch_format(source, tiny_tokenizer):
    it = pipeline.make_train_iterator(
        source, tiny_tokenizer, _cfg(), seed=0, process_index=0, process_count=1
    )
    b = next(it)
    assert set(b) == {"tokens", "segment_ids", "positions", "labels", "example_weight"}
    for k in ("tokens", "segment_ids", "positions"):
        assert b[k].shape == (8, L) and b[k].dtype == np.int32
    assert b["labels"].shape == (8,) and b["labels"].dtype == np.int32
    assert b["example_weight"].dtype == np.float32 and (b["example_weight"] == 1).all()
    for row in range(8):
        want = _encoded(tiny_tokenizer, source[b["labels"][row]]["text"])
        n = len(want)
        assert b["tokens"][row, :n].tolist() == want and (b["tokens"][row, n:] == 0).all()
        assert b["segment_ids"][row].tolist() == [1] * n + [0] * (L - n)
        assert b["positions"][row].tolist() == list(range(n)) + [0] * (L - n)


def test_seed_determinism_and_epochs(source, tiny_tokenizer):
    def run(seed, n=16):
        it = pipeline.make_train_iterator(
            source, tiny_tokenizer, _cfg(), seed=seed, process_index=0, process_count=1
        )
        return _take(it, n)

    a, b, c = run(0), run(0), run(1)
    assert _same(a, b)
    labels = lambda bs: np.concatenate([x["labels"] for x in bs])
    assert not np.array_equal(labels(a), labels(c))
    epoch1, epoch2 = labels(a)[:64], labels(a)[64:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(64))  # Whole epochs, each once.
    assert not np.array_equal(epoch1, epoch2)  # Reshuffled per epoch.
    assert not np.array_equal(epoch1, np.arange(64))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_json_state(source, tiny_tokenizer, packing):
    cfg = _cfg(packing=packing)
    make = lambda: pipeline.make_train_iterator(
        source, tiny_tokenizer, cfg, seed=3, process_index=0, process_count=1
    )
    it = make()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # Must survive orbax's JSON round trip.
    expected = _take(it, 7)
    resumed = make()
    resumed.set_state(state)
    assert _same(_take(resumed, 7), expected)


def test_processes_read_disjoint_shards(source, tiny_tokenizer):
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(
            source, tiny_tokenizer, _cfg(), seed=5, process_index=p, process_count=2
        )
        batches = _take(it, 8)  # 8 x 4 rows = half an epoch each.
        assert batches[0]["tokens"].shape == (4, L)
        seen.append(np.concatenate([b["labels"] for b in batches]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(64))


def test_eval_every_example_once_with_exact_weights(source, tiny_tokenizer):
    src = source[:37]
    cfg = _cfg()
    per_process = []
    for p in range(2):
        it = pipeline.make_eval_iterator(src, tiny_tokenizer, cfg, process_index=p, process_count=2)
        batches = list(it)
        assert len(batches) == pipeline.num_eval_batches(37, 8, 2) == 5
        for b in batches:
            assert b["tokens"].shape == (4, L) and b["example_weight"].dtype == np.float32
            assert set(np.unique(b["example_weight"])) <= {0.0, 1.0}
        w = np.concatenate([b["example_weight"] for b in batches])
        labels = np.concatenate([b["labels"] for b in batches])
        assert w[: int(w.sum())].all() and not w[int(w.sum()) :].any()  # Filler at the end.
        per_process.append(labels[w == 1])
    assert per_process[0].tolist() == list(range(0, 37, 2))  # In order.
    assert per_process[1].tolist() == list(range(1, 37, 2))
    assert sorted(np.concatenate(per_process)) == list(range(37))  # Each exactly once.


def _first_fit(sequences, bins, length):
    """Reference first-fit packer (grain's algorithm, bins not shuffled) -> rows."""
    rows, open_bins = [], [[] for _ in range(bins)]
    for seq in sequences:
        for b in open_bins:
            if sum(map(len, b)) + len(seq) <= length:
                b.append(seq)
                break
        else:
            rows += [b for b in open_bins if b]
            open_bins = [[seq]] + [[] for _ in range(bins - 1)]
    return rows


def test_packing_segments_positions_and_no_token_lost(short_source, tiny_tokenizer):
    source = short_source
    cfg = _cfg(packing=True)
    packed = _take(
        pipeline.make_train_iterator(
            source, tiny_tokenizer, cfg, seed=7, process_index=0, process_count=1
        ),
        10,
    )
    assert set(packed[0]) == {"tokens", "segment_ids", "positions", "example_weight"}
    # The example order: same seed, unpacked, with labels naming the examples.
    order = np.concatenate(
        [
            b["labels"]
            for b in _take(
                pipeline.make_train_iterator(
                    source, tiny_tokenizer, _cfg(), seed=7, process_index=0, process_count=1
                ),
                30,
            )
        ]
    )
    sequences = [_encoded(tiny_tokenizer, source[i]["text"]) for i in order]
    want_rows = _first_fit(sequences, bins=8, length=L)
    got_rows = list(itertools.chain.from_iterable(zip(*(b[k] for k in b)) for b in packed))
    keys = list(packed[0])
    assert len(want_rows) >= len(got_rows) == 80
    multi = 0
    for got, want in zip(got_rows, want_rows):
        got = dict(zip(keys, got))
        flat = [t for seq in want for t in seq]
        n = len(flat)
        assert got["tokens"].tolist() == flat + [0] * (L - n)  # Every token, in order.
        seg = [i + 1 for i, seq in enumerate(want) for _ in seq]
        assert got["segment_ids"].tolist() == seg + [0] * (L - n)
        pos = [j for seq in want for j in range(len(seq))]
        assert got["positions"].tolist() == pos + [0] * (L - n)
        assert got["example_weight"] == 1
        multi += len(want) > 1
    assert multi >= 20  # Rows really hold several sequences.


def test_config_errors(source, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"config\.data\.batch_size=8 .*3 processes"):
        pipeline.make_train_iterator(
            source, tiny_tokenizer, _cfg(), seed=0, process_index=0, process_count=3
        )
    with pytest.raises(ValueError, match=r"config\.data\.eval_batch_size"):
        pipeline.make_eval_iterator(
            source, tiny_tokenizer, _cfg(eval_batch_size=9), process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match="packing=False"):
        pipeline.make_train_iterator(
            source, tiny_tokenizer, _cfg(packing=True), seed=0, process_index=0,
            process_count=1, with_labels=True,
        )  # fmt: skip


def test_to_global_batch(source, tiny_tokenizer):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    local = next(
        pipeline.make_train_iterator(
            source, tiny_tokenizer, _cfg(), seed=0, process_index=0, process_count=1
        )
    )
    spec = PartitionSpec(("data", "fsdp"))
    out = pipeline.to_global_batch(local, mesh, spec)
    assert set(out) == set(local)
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.sharding.spec == spec
        np.testing.assert_array_equal(np.asarray(v), local[k])


def test_local_corpus_end_to_end(tmp_path):
    f = tmp_path / "c.jsonl"
    recs = [{"text": t, "label": ["a", "b"][i % 2]} for i, t in enumerate(make_texts(400, seed=8))]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = data_config(
        tmp_path / "tfds", source="local", local_files=(str(f),), seq_len=L, vocab_size=200,
        batch_size=16, eval_batch_size=16, tokenizer_sample=1000,
    )  # fmt: skip
    tok = tokenizer.get_tokenizer(cfg)
    train = sources.load_split(cfg, "train")
    b = next(
        pipeline.make_train_iterator(train, tok, cfg, seed=0, process_index=0, process_count=1)
    )
    assert b["tokens"].shape == (16, L) and set(b["labels"].tolist()) <= {0, 1}
    test = sources.load_split(cfg, "test")
    batches = list(pipeline.make_eval_iterator(test, tok, cfg, process_index=0, process_count=1))
    assert sum(float(x["example_weight"].sum()) for x in batches) == len(test)
