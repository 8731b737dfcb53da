"""Checks every index runs on its inputs, and the recall measure.

Indexes hold L2-normalised float32 vectors, so a dot product is a cosine similarity.
Document ids are strings (WordNet synset ids, passage keys): one type avoids `1` and
`"1"` silently naming two documents, and they round-trip through JSON unchanged.
"""

from collections.abc import Sequence

import numpy as np

_NORM_TOLERANCE = 1e-2  # bfloat16-computed embeddings normalise to ~3 significant digits.


def l2_normalize(vectors) -> np.ndarray:
    """[n, dim] -> float32 rows of unit L2 norm (zero rows stay zero)."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def check_vectors(vectors, what: str = "vectors", dim: int | None = None,
                  normalized: bool = True) -> np.ndarray:
    """[n, dim] float -> float32 array; ValueError on shape, dim, non-finite or norm."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [n, dim] array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be floating point, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, np.float32)
    if array.shape[0] == 0:
        raise ValueError(f"{what} is empty: shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]}, the index has {dim}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{what} hold non-finite values (NaN/inf) in {bad.size} rows, "
                         f"first row {bad[0]}")
    if normalized:
        norms = np.linalg.norm(array, axis=1)
        off = np.abs(norms - 1.0) > _NORM_TOLERANCE
        if off.any():
            row = int(np.flatnonzero(off)[0])
            raise ValueError(
                f"{what} must be L2-normalised (dot product = cosine): {int(off.sum())} rows "
                f"are not, e.g. row {row} has norm {norms[row]:.4f}; use "
                f"retrieval.vectors.l2_normalize")
    return array


def check_ids(ids, count: int | None = None, what: str = "ids") -> list[str]:
    """A sequence of unique strings (as many as `count`) -> list[str]."""
    if isinstance(ids, str | bytes):
        raise ValueError(f"{what} must be a sequence of strings, got a single {type(ids)}")
    ids = list(ids)
    bad = next((i for i in ids if not isinstance(i, str)), None)
    if bad is not None:
        raise ValueError(f"{what} must be strings (document ids are str), got {bad!r} of "
                         f"type {type(bad).__name__}; convert with str() if intended")
    if count is not None and len(ids) != count:
        raise ValueError(f"{len(ids)} {what} for {count} vectors")
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise ValueError(f"{what} hold duplicates, e.g. {dup!r}")
    return ids


def check_k(k: int, size: int) -> int:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > size:
        raise ValueError(f"k={k} exceeds the number of indexed documents ({size})")
    return int(k)


def recall_at_k(approx_ids: Sequence, exact_ids: Sequence) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k; both [q, k]."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"recall: shapes differ {approx_ids.shape} vs {exact_ids.shape}")
    hits = [len(set(a) & set(e)) for a, e in zip(approx_ids.tolist(), exact_ids.tolist())]
    return float(np.sum(hits) / exact_ids.size)
