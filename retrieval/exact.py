"""Exact maximum-inner-product search: the reference every approximate index is held to.

Scores are a jitted matmul over the corpus in fixed-size blocks under `lax.scan`,
keeping a running top-k, so memory is [queries, block] rather than [queries, n]
whatever the corpus size. Queries go in chunks padded to a power of two, so a
workload compiles a handful of shapes, not one per batch size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from retrieval import vectors as vec
from retrieval.doc_table import DocTable, TableBacked
from retrieval.index_config import IndexConfig

_QUERY_CHUNK = 1024  # Largest query batch per compiled call.


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_blocks(queries, blocks, valid, k):
    """queries [q, d], blocks [nb, b, d], valid [nb, b] -> (scores [q, k], rows [q, k])."""
    num_queries, block = queries.shape[0], blocks.shape[1]

    def step(carry, xs):
        best_scores, best_rows = carry
        corpus, ok, offset = xs
        # HIGHEST: the reference must not drop to bfloat16 passes on TPU.
        scores = jnp.dot(queries, corpus.T, precision=jax.lax.Precision.HIGHEST)
        scores = jnp.where(ok[None, :], scores, -jnp.inf)
        top_scores, top_rows = jax.lax.top_k(scores, k)
        # Earlier blocks come first, so ties keep the lower row (like a stable sort).
        scores = jnp.concatenate([best_scores, top_scores], axis=1)
        rows = jnp.concatenate([best_rows, top_rows + offset], axis=1)
        merged_scores, pick = jax.lax.top_k(scores, k)
        return (merged_scores, jnp.take_along_axis(rows, pick, axis=1)), None

    init = (jnp.full((num_queries, k), -jnp.inf, jnp.float32),
            jnp.full((num_queries, k), -1, jnp.int32))
    offsets = jnp.arange(blocks.shape[0], dtype=jnp.int32) * block
    (scores, rows), _ = jax.lax.scan(step, init, (blocks, valid, offsets))
    return scores, rows


class ExactIndex(TableBacked):
    """Exact top-k by dot product over L2-normalised vectors [n, dim] with string ids."""

    kind = "exact"

    def __init__(self, vectors, ids, config: IndexConfig | None = None):
        self.config = config or IndexConfig()
        self.table = DocTable(vectors, ids)
        self._device_blocks = None  # (blocks, valid) on device; rebuilt after mutations.

    @classmethod
    def build(cls, vectors, ids, config: IndexConfig | None = None):
        return cls(vectors, ids, config)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [q, dim] -> (scores float32 [q, k], doc ids str [q, k]), best first."""
        queries = vec.check_vectors(queries, "queries", dim=self.dim, normalized=False)
        k = vec.check_k(k, len(self))
        scores, rows = self.search_rows(queries, k)
        return scores, self.table.id_array()[rows]

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Checked queries [q, dim] -> (scores [q, k], rows [q, k]) into `self.vectors`."""
        blocks, valid = self._blocks(k)
        out_scores, out_rows = [], []
        for start in range(0, queries.shape[0], _QUERY_CHUNK):
            chunk = queries[start : start + _QUERY_CHUNK]
            padded = np.zeros((_bucket(chunk.shape[0]), self.dim), np.float32)
            padded[: chunk.shape[0]] = chunk
            scores, rows = _top_k_blocks(padded, blocks, valid, k)
            out_scores.append(np.asarray(scores)[: chunk.shape[0]])
            out_rows.append(np.asarray(rows)[: chunk.shape[0]])
        return np.concatenate(out_scores), np.concatenate(out_rows)

    def upsert(self, ids, vectors) -> None:
        """Add new ids, replace the vectors of known ones; visible to the next search."""
        self.table.upsert(ids, vectors)
        self._device_blocks = None

    def delete(self, ids) -> None:
        self.table.delete(ids)
        self._device_blocks = None

    def _blocks(self, k):
        block = max(min(self.config.exact_block_size, len(self)), k)
        if self._device_blocks is None or self._device_blocks[0].shape[1] != block:
            n = len(self)
            num_blocks = -(-n // block)
            padded = np.zeros((num_blocks * block, self.dim), np.float32)
            padded[:n] = self.vectors
            valid = np.arange(num_blocks * block) < n
            self._device_blocks = (jnp.asarray(padded.reshape(num_blocks, block, self.dim)),
                                   jnp.asarray(valid.reshape(num_blocks, block)))
        return self._device_blocks


def _bucket(count: int) -> int:
    return 1 << max(count - 1, 0).bit_length()
