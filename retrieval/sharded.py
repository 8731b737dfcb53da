"""A corpus split into shards built independently, searched in parallel, top-k merged.

On a pod each host builds (and saves) the shard of the corpus it encoded; a searcher
then holds them all. Each shard returns its own top-k, so the merged top-k is exactly
the top-k over the union: for exact shards (or brute-force ScaNN shards) it equals one
index over the whole corpus.
"""

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from retrieval import vectors as vec
from retrieval.index import build_index
from retrieval.index_config import IndexConfig


class ShardedIndex:
    """Shards: indexes over disjoint id sets and one dimension; searched as one."""

    kind = "sharded"

    def __init__(self, shards):
        if not shards:
            raise ValueError("A sharded index needs at least one shard")
        dims = {shard.dim for shard in shards}
        if len(dims) != 1:
            raise ValueError(f"Shards have different dimensions {sorted(dims)}")
        seen = set()
        for shard in shards:
            overlap = seen.intersection(shard.ids)
            if overlap:
                raise ValueError(f"Shards share document ids, e.g. {sorted(overlap)[:3]}")
            seen.update(shard.ids)
        self.shards = list(shards)
        self.config = shards[0].config
        self._pool = ThreadPoolExecutor(len(shards), thread_name_prefix="index-shard")

    @classmethod
    def build(cls, vectors, ids, num_shards: int, config: IndexConfig | None = None,
              queries=None):
        """Splits vectors [n, dim] / ids [n] into `num_shards` contiguous shards."""
        vectors = vec.check_vectors(vectors, "corpus vectors")
        ids = vec.check_ids(ids, vectors.shape[0])
        if not 1 <= num_shards <= len(ids):
            raise ValueError(f"num_shards={num_shards} must be in [1, {len(ids)}] (corpus size)")
        bounds = np.linspace(0, len(ids), num_shards + 1).round().astype(int)
        return cls([build_index(vectors[lo:hi], ids[lo:hi], config, queries=queries)
                    for lo, hi in zip(bounds[:-1], bounds[1:])])

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def ids(self) -> list[str]:
        return [doc_id for shard in self.shards for doc_id in shard.ids]

    @property
    def vectors(self) -> np.ndarray:
        return np.concatenate([shard.vectors for shard in self.shards])

    def __len__(self):
        return sum(len(shard) for shard in self.shards)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [q, dim] -> (scores float32 [q, k], doc ids str [q, k]), best first."""
        queries = vec.check_vectors(queries, "queries", dim=self.dim, normalized=False)
        k = vec.check_k(k, len(self))
        live = [shard for shard in self.shards if len(shard)]
        results = list(self._pool.map(lambda s: s.search(queries, min(k, len(s))), live))
        scores = np.concatenate([r[0] for r in results], axis=1)
        doc_ids = np.concatenate([r[1].astype(object) for r in results], axis=1)
        # Stable: among equal scores the earlier shard wins, as in one index over the
        # shards' concatenation.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(scores, order, axis=1),
                np.take_along_axis(doc_ids, order, axis=1).astype(str))

    def upsert(self, ids, vectors) -> None:
        """Known ids are updated in their shard; new ids go to a shard by a hash of the id."""
        vectors = vec.check_vectors(vectors, "upserted vectors", dim=self.dim)
        ids = vec.check_ids(ids, vectors.shape[0], "upserted ids")
        for shard, rows in self._route(ids, new_ok=True).items():
            shard.upsert([ids[r] for r in rows], vectors[rows])

    def delete(self, ids) -> None:
        ids = vec.check_ids(ids, what="deleted ids")
        for shard, rows in self._route(ids, new_ok=False).items():
            shard.delete([ids[r] for r in rows])

    def _route(self, ids, new_ok: bool) -> dict:
        """{shard: [positions in ids]} by which shard holds each id."""
        routes, missing = {}, []
        for position, doc_id in enumerate(ids):
            owner = next((s for s in self.shards if doc_id in s.table.row_of), None)
            if owner is None:
                if not new_ok:
                    missing.append(doc_id)
                    continue
                owner = self.shards[zlib.crc32(doc_id.encode()) % len(self.shards)]
            routes.setdefault(owner, []).append(position)
        if missing:
            raise ValueError(f"Cannot delete unknown document ids {missing[:5]} "
                             f"({len(missing)} of {len(ids)})")
        return routes
