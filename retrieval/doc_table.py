"""Rows of an index: document ids and their vectors, in the index's own row order.

Deleting moves the last row into the freed slot (swap-with-last), which is what ScaNN's
searcher does internally: keeping the same order here lets a ScaNN result (a row
number) map straight to an id, and lets saved ids/vectors line up with ScaNN's assets.
"""

import numpy as np

from retrieval import vectors as vec


class DocTable:
    """ids: list[str] [n]; vectors: float32 [n, dim]; row_of: id -> row."""

    def __init__(self, vectors, ids):
        data = vec.check_vectors(vectors, "corpus vectors")
        self.ids = vec.check_ids(ids, data.shape[0])
        self.row_of = {doc_id: row for row, doc_id in enumerate(self.ids)}
        self._data = data.copy()  # Upserts write rows in place: never into the caller's array.
        self.dim = data.shape[1]
        self._id_array = None  # ids as a numpy str array, to map result rows in one take.

    def __len__(self):
        return len(self.ids)

    @property
    def vectors(self) -> np.ndarray:
        """[n, dim] float32, a view valid until the next mutation."""
        return self._data[: len(self.ids)]

    def id_array(self) -> np.ndarray:
        """ids as a numpy str array [n] (cached until the next mutation)."""
        if self._id_array is None:
            self._id_array = np.asarray(self.ids, dtype=str)
        return self._id_array

    def upsert(self, ids, vectors) -> list[int | None]:
        """Replace rows of known ids, append new ones; returns each id's old row or None."""
        data = vec.check_vectors(vectors, "upserted vectors", dim=self.dim)
        ids = vec.check_ids(ids, data.shape[0], "upserted ids")
        rows = [self.row_of.get(doc_id) for doc_id in ids]
        self._id_array = None
        new = sum(row is None for row in rows)
        self._reserve(len(self.ids) + new)
        for doc_id, row, vector in zip(ids, rows, data):
            if row is None:
                row = len(self.ids)
                self.ids.append(doc_id)
                self.row_of[doc_id] = row
            self._data[row] = vector
        return rows

    def delete(self, ids) -> list[int]:
        """Remove ids (all must exist); returns the row each was deleted from, in order."""
        ids = vec.check_ids(ids, what="deleted ids")
        missing = [doc_id for doc_id in ids if doc_id not in self.row_of]
        if missing:
            raise ValueError(f"Cannot delete unknown document ids {missing[:5]} "
                             f"({len(missing)} of {len(ids)})")
        rows, self._id_array = [], None
        for doc_id in ids:
            row, last = self.row_of.pop(doc_id), len(self.ids) - 1
            if row != last:  # The last row fills the hole, as in ScaNN.
                moved = self.ids[last]
                self.ids[row], self.row_of[moved] = moved, row
                self._data[row] = self._data[last]
            self.ids.pop()
            rows.append(row)
        return rows

    def _reserve(self, count):
        if count > self._data.shape[0]:  # Amortised growth: upserts one at a time stay O(1).
            grown = np.empty((max(count, 2 * self._data.shape[0]), self.dim), np.float32)
            grown[: len(self.ids)] = self.vectors
            self._data = grown


class TableBacked:
    """What every index reads from its `self.table` (a DocTable): dim, ids, vectors, size."""

    @property
    def dim(self) -> int:
        return self.table.dim

    @property
    def ids(self) -> list[str]:
        return self.table.ids

    @property
    def vectors(self) -> np.ndarray:
        return self.table.vectors

    def __len__(self):
        return len(self.table)
