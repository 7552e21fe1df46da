"""Stable 64-bit ids of the values of string columns, for building record keys.

A key such as a four-tuple mixes addresses, which are strings, with ports. The id
of a string is ``identity.text_id`` of its UTF-8 text, so it is the same in every
process and every run. Each distinct value is hashed once per call through a
dictionary encoding, and the ids of recent values are cached, because addresses
and process names repeat from one sample to the next.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.identity import text_id

# Id of a NULL string. text_id returns 63-bit values, so -1 is never one of them.
NULL_ID = -1

# Cached ids per TextIds. The cache is cleared when it grows past this, which
# bounds its memory to a few megabytes.
MAX_CACHED = 100_000


class TextIds:
    """Map string columns to int64 ids, caching the ids of values already seen."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def ids(self, column: "pa.Array | pa.ChunkedArray") -> np.ndarray:
        """Return the id of each value of column, NULL_ID for NULL."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if len(column) == 0:
            return np.empty(0, dtype=np.int64)

        encoded = pc.dictionary_encode(column)
        distinct = encoded.dictionary.to_pylist()
        distinct_ids = np.fromiter(
            (self._id(value) for value in distinct), dtype=np.int64, count=len(distinct)
        )

        indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        result = np.full(len(indices), NULL_ID, dtype=np.int64)
        present = indices >= 0
        result[present] = distinct_ids[indices[present]]
        return result

    def _id(self, value: str) -> int:
        known = self._cache.get(value)
        if known is not None:
            return known

        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        new = text_id(value)
        self._cache[value] = new
        return new


def integer_ids(
    column: "pa.Array | pa.ChunkedArray", null_id: int = NULL_ID
) -> np.ndarray:
    """Return an integer column as int64 with NULL replaced by null_id."""
    return column.fill_null(null_id).to_numpy(zero_copy_only=False).astype(np.int64)
