"""Exact vs ScaNN search at the knowledge base's size: build time, queries/s, recall@k.

Synthetic corpus by default: 117,000 unit vectors of dimension 384 (MiniLM's), drawn
around 1,000 topic centres that themselves sit around 50 broader themes, plus a shared
mean direction (real sentence embeddings are anisotropic), so neighbourhoods look like
embeddings' rather than uniform noise. Queries come from the same process and are not
corpus rows. With `--vectors file.npy` ([n, dim], real embeddings) a random
`--queries` rows are held out of the corpus as queries; with `--query_vectors q.npy` too,
those are the queries (real ones: questions embedded by the same encoder, which sit
farther from the passages than passages from each other) and every row is corpus.

Both searchers get `--threads` threads (ScaNN's batched search threads; XLA's CPU
thread pool for the exact matmul is capped the same way through XLA_FLAGS, set before
jax is imported). Times are medians of `--repeats` runs: the machine may be shared.
Prints one JSON line per measurement.

    python -m launch.benchmark_index                        # synthetic, 117k x 384
    python -m launch.benchmark_index --vectors kb.npy --threads 2
    python -m launch.benchmark_index --vectors W/index/vectors.npy --query_vectors q.npy
    python -m launch.benchmark_index --sweep 8,16,28,40     # leaves_to_search at query time
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vectors", default="", help="[n, dim] .npy of embeddings (else synthetic)")
    p.add_argument("--query_vectors", default="",
                   help="[q, dim] .npy of real queries (e.g. embedded questions): the whole "
                        "--vectors file is then the corpus")
    p.add_argument("--n", type=int, default=117_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--topics", type=int, default=1_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", default="", help="comma-separated leaves_to_search to try")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", action="append", default=[],
                   help="IndexConfig override key=value (repeatable), e.g. reorder=200")
    return p.parse_args(argv)


def synthetic(n, queries, dim, topics, seed):
    """Unit vectors, corpus [n, dim] and queries [q, dim], from nested topics.

    50 themes > `topics` topics > n/10 subtopics of lognormal sizes > points. Measured
    at the default size (median over queries): top-1 cosine 0.62, top-10 0.56, top-100
    0.38, a random pair 0.15 — graded neighbourhoods, as with sentence embeddings.
    """
    import numpy as np

    from retrieval.vectors import l2_normalize

    rng = np.random.default_rng(seed)

    def around(centres, count, spread):
        picked = centres[rng.integers(0, len(centres), count)]
        return l2_normalize(picked + spread * l2_normalize(rng.normal(size=(count, dim))))

    mean = l2_normalize(rng.normal(size=(1, dim)))  # Embeddings share a direction.
    themes = l2_normalize(rng.normal(size=(50, dim)))
    subtopics = around(around(themes, topics, 0.8), max(1, n // 10), 0.9)
    weights = rng.lognormal(0.0, 1.0, len(subtopics))  # Uneven sizes, no giant topic.
    weights /= weights.sum()

    def draw(count):
        picked = subtopics[rng.choice(len(subtopics), count, p=weights)]
        noise = l2_normalize(rng.normal(size=(count, dim)))
        return l2_normalize(0.6 * mean + picked + 1.0 * noise).astype(np.float32)

    return draw(n), draw(queries)


def _overrides(items) -> dict:
    """["reorder=200", "spherical=true"] -> {"reorder": 200, "spherical": True}."""
    from retrieval.index_config import IndexConfig

    defaults, values = IndexConfig(), {}
    for item in items:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"--index {item!r}: unknown IndexConfig field {key!r}")
        kind = type(getattr(defaults, key))
        values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return values


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def measure(name, index, queries, k, single, repeats, **search_kwargs):
    """Batched and single-query throughput of `index` on queries [q, dim]."""
    index.search(queries, k, **search_kwargs)  # Warm-up: compiles / touches memory.
    index.search(queries[:1], k, **search_kwargs)
    (_, ids), batched_s = timed(lambda: index.search(queries, k, **search_kwargs), repeats)
    _, single_s = timed(lambda: [index.search(queries[i : i + 1], k, **search_kwargs)
                                 for i in range(single)], repeats)
    row = dict(index=name, batched_qps=round(len(queries) / batched_s, 1),
               single_qps=round(single / single_s, 1), batch=len(queries),
               batched_ms=round(1e3 * batched_s, 2),
               single_ms_per_query=round(1e3 * single_s / single, 3))
    return ids, row


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "jax" not in sys.modules:  # XLA's CPU thread pool is sized when jax starts.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=true"
                                   + f" intra_op_parallelism_threads={args.threads}")
    import numpy as np

    from retrieval.exact import ExactIndex
    from retrieval.index_config import IndexConfig
    from retrieval.scann_index import ScannIndex
    from retrieval.vectors import l2_normalize, recall_at_k

    if args.query_vectors and not args.vectors:
        sys.exit("FATAL: --query_vectors needs --vectors (the corpus they search)")
    if args.query_vectors:
        corpus = l2_normalize(np.load(args.vectors, allow_pickle=False))
        queries = l2_normalize(np.load(args.query_vectors, allow_pickle=False))[: args.queries]
        if queries.shape[1:] != corpus.shape[1:]:
            sys.exit(f"FATAL: --query_vectors {args.query_vectors} has dimension "
                     f"{queries.shape[1:]}, the corpus {corpus.shape[1:]}")
    elif args.vectors:
        vectors = l2_normalize(np.load(args.vectors, allow_pickle=False))
        order = np.random.default_rng(args.seed).permutation(len(vectors))
        queries, corpus = vectors[order[: args.queries]], vectors[order[args.queries :]]
    else:
        corpus, queries = synthetic(args.n, args.queries, args.dim, args.topics, args.seed)
    ids = [str(i) for i in range(len(corpus))]
    config = IndexConfig.from_config(
        _overrides(args.index), num_threads=args.threads, training_threads=args.threads,
        recall_k=args.k)
    print(json.dumps(dict(corpus=list(corpus.shape), queries=len(queries), k=args.k,
                          threads=args.threads, cpus=os.cpu_count(),
                          source=args.vectors or "synthetic",
                          queries_from=args.query_vectors or "corpus rows held out")),
          flush=True)

    exact, build_s = timed(lambda: ExactIndex.build(corpus, ids, config), 1)
    exact_ids, row = measure("exact", exact, queries, args.k, args.single, args.repeats)
    print(json.dumps(dict(row, build_s=round(build_s, 2))), flush=True)

    scann, build_s = timed(lambda: ScannIndex.build(corpus, ids, config, queries=queries), 1)
    scann_ids, row = measure("scann", scann, queries, args.k, args.single, args.repeats)
    print(json.dumps(dict(row, build_s=round(build_s, 2),
                          recall=round(recall_at_k(scann_ids, exact_ids), 4),
                          plan=scann.plan)), flush=True)

    for leaves in filter(None, args.sweep.split(",")):
        swept_ids, row = measure(f"scann leaves_to_search={leaves}", scann, queries, args.k,
                                 args.single, args.repeats, leaves_to_search=int(leaves))
        print(json.dumps(dict(row, recall=round(recall_at_k(swept_ids, exact_ids), 4))),
              flush=True)


if __name__ == "__main__":
    main()
