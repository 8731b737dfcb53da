"""`build_index`: the one way to get an index from a config, and the interface all share.

Every index (`ExactIndex`, `ScannIndex`, `ShardedIndex`) holds L2-normalised float32
vectors [n, dim] under unique string ids and offers:

    search(queries [q, dim], k) -> (scores float32 [q, k], doc_ids str [q, k]), best first
    upsert(ids, vectors [m, dim])   # new ids added, known ids' vectors replaced; no rebuild
    delete(ids)
    ids (list[str] [n]), vectors ([n, dim]), dim, len(index), kind, config

Where ScaNN cannot be imported (it ships Linux wheels only) `kind="auto"` and
`kind="scann"` fall back to exact search with one logged notice.
"""

import logging
from typing import Protocol

import numpy as np

from retrieval.exact import ExactIndex
from retrieval.index_config import IndexConfig
from retrieval.scann_index import ScannIndex, scann_ops

log = logging.getLogger("strata")
_fallback_noticed = False  # The notice is logged once per process, not per shard.


class Index(Protocol):
    kind: str
    config: IndexConfig
    dim: int
    ids: list[str]
    vectors: np.ndarray

    def __len__(self) -> int: ...
    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def upsert(self, ids, vectors) -> None: ...
    def delete(self, ids) -> None: ...


def resolve_kind(config: IndexConfig) -> str:
    """"exact" or "scann": what `config.kind` means on this machine."""
    if config.kind == "exact":
        return "exact"
    if scann_ops() is None:
        global _fallback_noticed
        if not _fallback_noticed:
            log.warning("ScaNN is not importable here (index kind %r): using exact search "
                        "instead (correct, slower on large corpora). To install it (Linux "
                        "x86-64 / aarch64, Python 3.11+): pip install scann; or set "
                        "config.index.kind='exact' to silence this.", config.kind)
            _fallback_noticed = True
        return "exact"
    return "scann"


def build_index(vectors, ids, config: IndexConfig | None = None, queries=None) -> Index:
    """vectors [n, dim] (L2-normalised), ids [n] str -> an index chosen by `config.kind`.

    `queries` [q, dim], optional, are the ones ScaNN's build-time recall is measured on.
    """
    config = config if isinstance(config, IndexConfig) else IndexConfig.from_config(config)
    if resolve_kind(config) == "exact":
        return ExactIndex.build(vectors, ids, config)
    return ScannIndex.build(vectors, ids, config, queries=queries)
