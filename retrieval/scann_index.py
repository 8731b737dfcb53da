"""A ScaNN index whose layout follows the corpus size (`index_config.plan_scann`).

Small corpora: brute force (float32, exact). Medium: 4-bit asymmetric hashing (AH,
score-aware/anisotropic loss) over every vector, the best `reorder` rescored exactly.
Large: a k-means tree of ~sqrt(n) leaves, AH within the `leaves_to_search` leaves
closest to the query, then the exact reorder. Recall@k against exact search is measured
whenever an index is built, so a config that loses neighbours says so in the log.

We drive ScaNN's pybind searcher directly with row numbers and keep the ids ourselves
(`DocTable`): ScaNN's Python wrapper would pickle them when serialised.
"""

import logging
import os

import numpy as np

from retrieval import vectors as vec
from retrieval.doc_table import DocTable, TableBacked
from retrieval.exact import ExactIndex
from retrieval.index_config import IndexConfig, plan_scann

log = logging.getLogger("strata")


def scann_ops():
    """ScaNN's pybind module, or None where `import scann` fails (e.g. not Linux)."""
    try:
        import scann  # noqa: F401  (the package itself: submodules may be cached)
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError:
        return None
    return scann_ops_pybind


def _threads(count: int) -> int:
    return count if count > 0 else (os.cpu_count() or 1)


class ScannIndex(TableBacked):
    """Approximate top-k by dot product over L2-normalised vectors [n, dim] with str ids."""

    kind = "scann"

    def __init__(self, searcher, table: DocTable, config: IndexConfig, plan: dict):
        self.searcher, self.table, self.config, self.plan = searcher, table, config, plan
        self.build_recall = None  # Recall@k vs exact measured at build: float or None.
        searcher.set_num_threads(_threads(config.num_threads))

    @classmethod
    def build(cls, vectors, ids, config: IndexConfig | None = None, queries=None):
        """Builds over vectors [n, dim]; measures recall@k on `queries` [q, dim] (default:
        a sample of corpus vectors, which includes each query's self-match)."""
        config = config or IndexConfig()
        ops = scann_ops()
        if ops is None:
            raise ImportError("ScaNN is not importable here; use kind='auto' to fall back "
                              "to exact search")
        table = DocTable(vectors, ids)
        plan = plan_scann(config, len(table))
        builder = ops.builder(table.vectors, config.num_neighbors, "dot_product")
        builder = _configure(builder, plan).set_n_training_threads(
            _threads(config.training_threads))
        index = cls(builder.build().searcher, table, config, plan)
        index.build_recall = index.measure_recall(queries)
        return index

    def search(self, queries, k: int, leaves_to_search: int = -1):
        """queries [q, dim] -> (scores float32 [q, k], doc ids str [q, k]), best first.

        `leaves_to_search` (tree layouts) overrides the built setting for this call. If
        the searched leaves hold fewer than k documents the tail is padded with score
        -inf and id "".
        """
        queries = vec.check_vectors(queries, "queries", dim=self.dim, normalized=False)
        k = vec.check_k(k, len(self))
        pre_reorder = max(self.plan["reorder"], k) if "reorder" in self.plan else -1
        if queries.shape[0] == 1:  # Skips the batched path's thread hand-off.
            rows, scores = self.searcher.search(queries[0], k, pre_reorder, leaves_to_search)
            rows, scores = rows[None], scores[None]
        else:
            threads = _threads(self.config.num_threads)
            rows, scores = self.searcher.search_batched(
                queries, k, pre_reorder, leaves_to_search, threads > 1,
                max(1, -(-queries.shape[0] // threads)))
        rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
        # Where the searched leaves hold fewer than k documents, single search returns
        # fewer columns and batched search pads with row 0 and a NaN score.
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        missing = np.isnan(scores)
        rows, scores = np.where(missing, -1, rows), np.where(missing, -np.inf, scores)
        doc_ids = np.where(rows >= 0, self.table.id_array()[np.maximum(rows, 0)], "")
        return scores, doc_ids

    def upsert(self, ids, vectors) -> None:
        """Add new ids, replace known ones' vectors; no rebuild (new rows join the nearest
        leaf with the trained codebook, so a rebuild pays off after large drift)."""
        rows = self.table.upsert(ids, vectors)
        new_vectors = vec.check_vectors(vectors, "upserted vectors", dim=self.dim)
        self.searcher.upsert(rows, new_vectors, max(1, len(rows)))

    def delete(self, ids) -> None:
        rows = self.table.delete(ids)
        self.searcher.delete(rows)

    def measure_recall(self, queries=None) -> float | None:
        """Recall@k of this index against exact search on `queries` (or sampled rows)."""
        k = min(self.config.recall_k, len(self))
        if queries is None:
            if self.config.recall_queries <= 0:
                return None
            rng = np.random.default_rng(self.config.seed)
            count = min(self.config.recall_queries, len(self))
            queries = self.vectors[rng.choice(len(self), count, replace=False)]
        queries = vec.check_vectors(queries, "recall queries", dim=self.dim, normalized=False)
        exact = ExactIndex(self.vectors, self.ids, self.config)
        _, exact_ids = exact.search(queries, k)
        _, approx_ids = self.search(queries, k)
        recall = vec.recall_at_k(approx_ids, exact_ids)
        log.info("ScaNN %s index of %d x %d: recall@%d vs exact = %.4f on %d queries (%s)",
                 self.plan["mode"], len(self), self.dim, k, recall, queries.shape[0],
                 self.plan)
        return recall


def _configure(builder, plan: dict):
    if plan["mode"] == "brute_force":
        return builder.score_brute_force()
    if plan["mode"] == "tree_ah":
        builder = builder.tree(
            num_leaves=plan["num_leaves"], num_leaves_to_search=plan["leaves_to_search"],
            training_sample_size=plan["training_sample"], spherical=plan["spherical"])
    return builder.score_ah(
        plan["ah_dims_per_block"],
        anisotropic_quantization_threshold=plan["anisotropic_threshold"],
        training_sample_size=plan["ah_training_sample"]).reorder(
            plan["reorder"])
