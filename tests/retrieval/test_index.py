"""Indexes against an independent reference: numpy's full sort of every dot product."""

import json
import logging
import os
import sys

import numpy as np
import pytest

from configs.common import base_config
from retrieval import index as index_lib
from retrieval.exact import ExactIndex
from retrieval.index import build_index
from retrieval.index_config import IndexConfig, plan_scann
from retrieval.index_store import (
    CorruptIndexError,
    encoder_fingerprint,
    load_index,
    save_index,
)
from retrieval.scann_index import ScannIndex
from retrieval.sharded import ShardedIndex
from retrieval.vectors import l2_normalize, recall_at_k

FP = "sha256:test-encoder"


def clustered(n, dim, clusters, seed=0, noise=0.35):
    """Unit vectors around `clusters` random centres: [n, dim] corpus, [n] ids, centres."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(clusters, dim)))
    points = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)) / np.sqrt(
        dim / 4)
    return l2_normalize(points), [f"doc{i}" for i in range(n)], centres


def near(centres, count, dim, seed=1, noise=0.35):
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, len(centres), count)]
    return l2_normalize(points + noise * rng.normal(size=(count, dim)) / np.sqrt(dim / 4))


def numpy_top_k(corpus, ids, queries, k):
    """The reference: every dot product in float64, fully sorted."""
    scores = queries.astype(np.float64) @ np.asarray(corpus, np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.asarray(ids)[order]


def assert_exact_top_k(result, corpus, ids, queries, k):
    """`result` is a true top-k: ids match the reference up to float32 near-ties."""
    scores, doc_ids = result
    ref_scores, ref_ids = numpy_top_k(corpus, ids, queries, k)
    assert doc_ids.shape == (len(queries), k) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    row_of = {doc_id: row for row, doc_id in enumerate(ids)}
    rows = np.vectorize(row_of.__getitem__)(doc_ids)
    true = np.einsum("qd,qkd->qk", queries.astype(np.float64), np.asarray(corpus)[rows])
    np.testing.assert_allclose(true, ref_scores, atol=1e-5)  # Each id scores as reported.
    assert all(len(set(row)) == k for row in doc_ids.tolist())
    assert (doc_ids == ref_ids).mean() > 0.99  # Only near-ties may swap.


def assert_same_results(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def small():
    corpus, ids, centres = clustered(3000, 32, 20)
    return corpus, ids, near(centres, 37, 32)


def test_config_defaults_match_base_config():
    assert IndexConfig.from_config(base_config().index) == IndexConfig()
    with pytest.raises(ValueError, match="num_leafs"):
        IndexConfig.from_config({"num_leafs": 3})
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="faiss")


def test_scann_layout_follows_corpus_size():
    config = IndexConfig()
    assert plan_scann(config, 1_000)["mode"] == "brute_force"
    assert plan_scann(config, 5_000)["mode"] == "ah"
    plan = plan_scann(config, 117_000)
    assert plan["mode"] == "tree_ah" and plan["num_leaves"] == 342
    assert plan["leaves_to_search"] == 103  # ceil(0.3 * 342)
    plan = plan_scann(IndexConfig(num_leaves=50, leaves_to_search=7), 117_000)
    assert (plan["num_leaves"], plan["leaves_to_search"]) == (50, 7)


def test_exact_matches_numpy_argsort(small):
    corpus, ids, queries = small
    index = ExactIndex(corpus, ids, IndexConfig(exact_block_size=512))  # 6 blocks, padded.
    for k in (1, 7, 600):
        assert_exact_top_k(index.search(queries, k), corpus, ids, queries, k)
    assert_exact_top_k(index.search(queries[:1], 5), corpus, ids, queries[:1], 5)
    scores, doc_ids = index.search(queries[:2], len(ids))  # k = n: every document.
    assert sorted(doc_ids[0]) == sorted(ids) and np.all(np.diff(scores, axis=1) <= 0)


def test_scann_tree_ah_recall_on_clustered_vectors(caplog):
    # Noise 0.6: clusters overlap (top-1 cosine 0.62, top-100 0.42), so one leaf is not
    # enough (recall ~0.83) and the floor below says something about the config.
    corpus, ids, centres = clustered(20_000, 64, 100, noise=0.6)
    queries = near(centres, 300, 64, noise=0.6)
    with caplog.at_level(logging.INFO, logger="strata"):
        index = ScannIndex.build(corpus, ids, IndexConfig(kind="scann"), queries=queries)
    assert index.plan["mode"] == "tree_ah"
    assert "recall@10 vs exact" in caplog.text
    _, exact_ids = numpy_top_k(corpus, ids, queries, 10)
    _, approx_ids = index.search(queries, 10)
    recall = recall_at_k(approx_ids, exact_ids)
    assert recall >= 0.95 and index.build_recall == pytest.approx(recall)
    one_leaf = recall_at_k(index.search(queries, 10, leaves_to_search=1)[1], exact_ids)
    assert one_leaf < recall


def test_scann_pads_when_searched_leaves_hold_fewer_than_k():
    corpus, ids, centres = clustered(20_000, 16, 100, noise=0.6)
    queries = near(centres, 5, 16, noise=0.6)
    index = ScannIndex.build(corpus, ids, IndexConfig(kind="scann", recall_queries=0))
    for batch in (queries, queries[:1]):  # Batched and single search pad differently.
        scores, doc_ids = index.search(batch, 2_000, leaves_to_search=1)
        missing = doc_ids == ""
        assert missing[:, -1].all() and not missing[:, 0].any()
        assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()
        assert all(len(set(row[row != ""])) == (row != "").sum() for row in doc_ids)


def test_scann_brute_force_is_exact(small):
    corpus, ids, queries = small
    index = ScannIndex.build(corpus, ids, IndexConfig(brute_force_below=10_000))
    assert index.plan["mode"] == "brute_force" and index.build_recall == 1.0
    assert_exact_top_k(index.search(queries, 10), corpus, ids, queries, 10)


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_sharded_equals_unsharded(small, kind):
    corpus, ids, queries = small
    # 3 shards of 1,000 vectors: ScaNN shards are brute force, hence exact.
    sharded = ShardedIndex.build(corpus, ids, 3, IndexConfig(kind=kind))
    assert [s.kind for s in sharded.shards] == [kind] * 3 and len(sharded) == len(ids)
    for k in (1, 10, 1500):  # 1,500 > a shard's 1,000: every shard gives all it has.
        assert_exact_top_k(sharded.search(queries, k), corpus, ids, queries, k)
    unsharded = build_index(corpus, ids, IndexConfig(kind=kind, brute_force_below=10_000))
    assert_same_results(sharded.search(queries, 10), unsharded.search(queries, 10))


@pytest.mark.parametrize("make", ["exact", "scann_brute_force", "scann_ah", "sharded"])
def test_upsert_and_delete_visible_in_search(small, make):
    corpus, ids, queries = small
    config = IndexConfig(kind="exact" if make == "exact" else "scann", brute_force_below=(
        10_000 if make in ("scann_brute_force", "sharded") else 100))
    index = (ShardedIndex.build(corpus, ids, 3, config) if make == "sharded"
             else build_index(corpus, ids, config))
    assert index.kind == make.split("_")[0]
    index.upsert(["new-a", "doc5"], queries[:2])  # A new document and a moved one.
    scores, doc_ids = index.search(queries[:2], 1)
    assert doc_ids[:, 0].tolist() == ["new-a", "doc5"]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-3)
    index.delete(["new-a", "doc0", "doc1", "doc2999"])
    _, doc_ids = index.search(queries, 20)
    assert not {"new-a", "doc0", "doc1", "doc2999"} & set(doc_ids.ravel())
    assert len(index) == len(ids) - 3
    with pytest.raises(ValueError, match="unknown document ids"):
        index.delete(["doc0"])
    # Against a reference built from scratch over what should remain.
    remaining = {i: v for i, v in zip(ids, corpus)}
    remaining["doc5"] = queries[1]
    for gone in ("doc0", "doc1", "doc2999"):
        del remaining[gone]
    assert sorted(index.ids) == sorted(remaining)
    vectors, doc_ids = np.stack(list(remaining.values())), list(remaining)
    if make == "scann_ah":
        expected = numpy_top_k(vectors, doc_ids, queries, 10)[1]
        assert recall_at_k(index.search(queries, 10)[1], expected) >= 0.9
    else:
        assert_exact_top_k(index.search(queries, 10), vectors, doc_ids, queries, 10)


def _build(kind, corpus, ids):
    if kind == "sharded":
        return ShardedIndex.build(corpus, ids, 2, IndexConfig(kind="scann"))
    return build_index(corpus, ids, IndexConfig(kind=kind, brute_force_below=100))


@pytest.mark.parametrize("kind", ["exact", "scann", "sharded"])
def test_save_load_round_trip(tmp_path, small, kind):
    corpus, ids, queries = small
    index = _build(kind, corpus, ids)
    index.upsert(["new-a"], queries[:1])
    index.delete(["doc3"])  # Mutations survive the round trip.
    texts = {doc_id: f"text of {doc_id}" for doc_id in index.ids}
    save_index(tmp_path / "idx", index, encoder_fingerprint=FP, passages=texts,
               passages_source={"tfds": "wordnet", "split": "train"})
    assert not list(tmp_path.rglob("*.pkl"))
    saved = load_index(tmp_path / "idx", expected_fingerprint=FP)
    assert saved.index.kind == kind and saved.index.ids == index.ids
    assert saved.passages == texts and saved.passages_source["tfds"] == "wordnet"
    assert saved.encoder_fingerprint == FP
    assert_same_results(saved.index.search(queries, 10), index.search(queries, 10))
    saved.index.upsert(["new-b"], queries[1:2])  # A loaded index stays mutable.
    assert saved.index.search(queries[1:2], 1)[1][0, 0] == "new-b"


def test_save_replaces_an_index_only_when_complete(tmp_path, small, monkeypatch):
    corpus, ids, queries = small
    save_index(tmp_path / "idx", ExactIndex(corpus, ids), encoder_fingerprint=FP)
    smaller = ExactIndex(corpus[:10], ids[:10])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_index(tmp_path / "idx", smaller, encoder_fingerprint=FP)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # No temp dir left behind.
    assert len(load_index(tmp_path / "idx", expected_fingerprint=FP).index) == len(ids)
    save_index(tmp_path / "idx", smaller, encoder_fingerprint=FP)
    assert len(load_index(tmp_path / "idx", expected_fingerprint=FP).index) == 10
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="not an index directory"):
        save_index(tmp_path / "notes", smaller, encoder_fingerprint=FP)


def test_encoder_fingerprint():
    params = {"encoder": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3)}}
    same = {"encoder": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3)}}
    assert encoder_fingerprint(params) == encoder_fingerprint(same)
    assert encoder_fingerprint(params).startswith("sha256:")
    changed = {"encoder": {"kernel": np.ones((2, 3), np.float32), "bias": np.full(3, 1e-6)}}
    renamed = {"encoder": {"w": np.ones((2, 3), np.float32), "bias": np.zeros(3)}}
    assert len({encoder_fingerprint(t) for t in (params, changed, renamed)}) == 3


def test_fingerprint_mismatch_refused(tmp_path, small):
    corpus, ids, _ = small
    save_index(tmp_path / "idx", ExactIndex(corpus, ids), encoder_fingerprint="sha256:old")
    with pytest.raises(ValueError, match="sha256:old.*sha256:new"):
        load_index(tmp_path / "idx", expected_fingerprint="sha256:new")


def test_pickle_file_refused(tmp_path, small):
    corpus, ids, _ = small
    save_index(tmp_path / "idx", _build("scann", corpus, ids), encoder_fingerprint=FP)
    (tmp_path / "idx" / "scann" / "scann_docids.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="pickle"):
        load_index(tmp_path / "idx", expected_fingerprint=FP)


def _drop(path):
    path.unlink()


def _rewrite_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


CORRUPTIONS = {
    "missing vectors": lambda d: _drop(d / "vectors.npy"),
    "missing meta": lambda d: _drop(d / "index.json"),
    "ids count": lambda d: _rewrite_json(d / "ids.json", lambda ids: ids[:-1]),
    "duplicate ids": lambda d: _rewrite_json(d / "ids.json", lambda ids: ids[:-1] + ids[:1]),
    "count in meta": lambda d: _rewrite_json(d / "index.json", lambda m: {**m, "count": 5}),
    "vector shape": lambda d: np.save(d / "vectors.npy", np.ones((3, 2), np.float32)),
    "object array": lambda d: np.save(d / "vectors.npy", np.array([{}], dtype=object),
                                      allow_pickle=True),
    "truncated meta": lambda d: (d / "index.json").write_text('{"format": "str'),
    "scann asset": lambda d: _drop(d / "scann" / "hashed_dataset.npy"),
    "scann config": lambda d: _drop(d / "scann" / "scann_config.pb"),
    "scann rows": lambda d: np.save(d / "scann" / "dataset.npy", np.ones((7, 32), np.float32)),
    "passages": lambda d: (d / "passages.jsonl").write_text('{"id": "doc0"}\n'),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_index_refused(tmp_path, small, corruption):
    corpus, ids, _ = small
    index = _build("scann", corpus, ids)
    save_index(tmp_path / "idx", index, encoder_fingerprint=FP, passages=list(ids))
    CORRUPTIONS[corruption](tmp_path / "idx")
    with pytest.raises(CorruptIndexError):
        load_index(tmp_path / "idx", expected_fingerprint=FP)


def test_falls_back_to_exact_without_scann(tmp_path, small, monkeypatch, caplog):
    corpus, ids, queries = small
    save_index(tmp_path / "idx", _build("scann", corpus, ids), encoder_fingerprint=FP)
    monkeypatch.setitem(sys.modules, "scann", None)  # `import scann` now fails.
    monkeypatch.setattr(index_lib, "_fallback_noticed", False)
    with caplog.at_level(logging.WARNING, logger="strata"):
        index = build_index(corpus, ids, IndexConfig(kind="auto"))
        sharded = ShardedIndex.build(corpus, ids, 3, IndexConfig(kind="scann"))
        loaded = load_index(tmp_path / "idx", expected_fingerprint=FP).index
    assert index.kind == "exact" and loaded.kind == "exact"
    assert {s.kind for s in sharded.shards} == {"exact"}
    assert caplog.text.count("ScaNN is not importable") == 1
    assert_exact_top_k(loaded.search(queries, 10), corpus, ids, queries, 10)


def test_bad_input_is_a_clear_error(small):
    corpus, ids, queries = small
    with pytest.raises(ValueError, match="empty"):
        ExactIndex(np.zeros((0, 32), np.float32), [])
    index = build_index(corpus, ids, IndexConfig(kind="scann", brute_force_below=100))
    for bad, match in [
        (lambda: index.search(np.zeros((0, 32), np.float32), 5), "queries is empty"),
        (lambda: index.search(queries, len(ids) + 1), "exceeds the number"),
        (lambda: index.search(queries, 0), "positive integer"),
        (lambda: index.search(queries[:, :16], 5), "dimension 16, the index has 32"),
        (lambda: index.search(np.full((2, 32), np.nan), 5), "non-finite"),
        (lambda: index.upsert(["x"], np.full((1, 32), np.inf)), "non-finite"),
        (lambda: index.upsert(["x"], np.ones((1, 32))), "L2-normalised"),
        (lambda: index.upsert([7], corpus[:1]), "must be strings"),
        (lambda: index.upsert(["x", "x"], corpus[:2]), "duplicates"),
        (lambda: index.upsert(["x"], corpus[:2]), "1 upserted ids for 2 vectors"),
        (lambda: ScannIndex.build(corpus[:, :8], ids), "L2-normalised"),
        (lambda: ShardedIndex.build(corpus[:2], ids[:2], 3), "num_shards"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    assert len(index) == len(ids)  # Failed calls changed nothing.
