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
