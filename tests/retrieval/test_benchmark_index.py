"""The index benchmark runs end to end on a tiny corpus and reports what it promises."""

import json

from launch import benchmark_index


def test_benchmark_index_smoke(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # main() may add thread flags; keep them local.
    benchmark_index.main(["--n", "3000", "--dim", "16", "--topics", "20", "--queries", "40",
                          "--single", "3", "--repeats", "1", "--sweep", "2",
                          "--index", "brute_force_below=100", "--index", "tree_min_size=1000"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["corpus"] == [3000, 16]
    assert [r["index"] for r in rows[1:]] == ["exact", "scann", "scann leaves_to_search=2"]
    scann = rows[2]
    assert scann["plan"]["mode"] == "tree_ah" and 0.0 <= scann["recall"] <= 1.0
    assert all(r["batched_qps"] > 0 and r["single_qps"] > 0 for r in rows[1:])


def test_benchmark_index_with_real_queries_searches_the_whole_corpus(
        capsys, monkeypatch, tmp_path):
    """--query_vectors: those rows are the queries and every --vectors row is corpus; a
    query file of another dimension is refused by name."""
    import numpy as np
    import pytest

    monkeypatch.setenv("XLA_FLAGS", "")
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(1500, 16)).astype(np.float32)
    np.save(tmp_path / "kb.npy", corpus)
    np.save(tmp_path / "q.npy", corpus[:30] + 1e-3 * rng.normal(size=(30, 16)))
    np.save(tmp_path / "bad.npy", corpus[:5, :8])
    common = ["--vectors", str(tmp_path / "kb.npy"), "--single", "2", "--repeats", "1",
              "--index", "brute_force_below=100", "--index", "tree_min_size=1000"]
    benchmark_index.main([*common, "--query_vectors", str(tmp_path / "q.npy")])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["corpus"] == [1500, 16] and rows[0]["queries"] == 30
    assert rows[1]["index"] == "exact" and rows[1]["batch"] == 30
    with pytest.raises(SystemExit, match="dimension"):
        benchmark_index.main([*common, "--query_vectors", str(tmp_path / "bad.npy")])
