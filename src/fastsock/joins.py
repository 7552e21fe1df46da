"""Inner joins of two tables on key columns, in NumPy.

pyarrow's Table.join runs Acero's hash join, which keeps a temporary stack of
tens of megabytes per thread that used it for as long as the process lives.
A collector joins its connections with listeners at every flush; doing it
here keeps its resident memory at what its tables hold (docs/performance.md,
"Memory").

As in SQL, a NULL key matches nothing.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.identity import combine


def inner_join_rows(
    left: pa.Table, right: pa.Table, left_keys: list[str], right_keys: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Return (left row, right row) of every pair whose keys are all equal.

    Pairs come in the order of the left rows, and for one left row in the
    order of the right rows.
    """
    if len(left_keys) != len(right_keys):
        raise ValueError(
            f"{len(left_keys)} left keys and {len(right_keys)} right keys; "
            "pass one right key per left key"
        )
    empty = np.empty(0, dtype=np.int64)
    if left.num_rows == 0 or right.num_rows == 0:
        return empty, empty

    left_codes, right_codes = [], []
    for left_name, right_name in zip(left_keys, right_keys):
        codes_left, codes_right = _shared_codes(
            left.column(left_name), right.column(right_name)
        )
        left_codes.append(codes_left)
        right_codes.append(codes_right)
    left_valid = np.logical_and.reduce([codes >= 0 for codes in left_codes])
    right_valid = np.logical_and.reduce([codes >= 0 for codes in right_codes])

    left_hash = combine(*left_codes)
    right_rows = np.flatnonzero(right_valid)
    right_hash = combine(*right_codes)[right_rows]
    order = np.argsort(right_hash, kind="stable")
    right_rows, right_hash = right_rows[order], right_hash[order]

    low = np.searchsorted(right_hash, left_hash, side="left")
    high = np.searchsorted(right_hash, left_hash, side="right")
    counts = np.where(left_valid, high - low, 0)
    pair_left = np.repeat(np.arange(left.num_rows), counts)
    starts = np.repeat(low, counts)
    offsets = np.arange(len(pair_left)) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_right = right_rows[starts + offsets]

    # Equal hashes of unequal keys are rare but possible: compare the codes.
    same = np.ones(len(pair_left), dtype=bool)
    for codes_left, codes_right in zip(left_codes, right_codes):
        same &= codes_left[pair_left] == codes_right[pair_right]
    return pair_left[same], pair_right[same]


def _shared_codes(
    left: "pa.Array | pa.ChunkedArray", right: "pa.Array | pa.ChunkedArray"
) -> tuple[np.ndarray, np.ndarray]:
    """Return int64 codes of two columns, equal where the values are, -1 for NULL.

    Integers are their own codes, unless either column has negative values:
    then the values of both are ranked, so that -1 stays free for NULL.
    Other types are dictionary-encoded together.
    """
    if pa.types.is_integer(left.type) and pa.types.is_integer(right.type):
        codes = [
            column.cast(pa.int64()).to_numpy(zero_copy_only=False)
            for column in (left, right)
        ]
        nulls = [_null_mask(column) for column in (left, right)]
        if any((values[~null] < 0).any() for values, null in zip(codes, nulls)):
            # Keep -1 for NULL only: rank the values of both columns instead.
            distinct = np.unique(np.concatenate([v[~n] for v, n in zip(codes, nulls)]))
            codes = [np.searchsorted(distinct, values) for values in codes]
        return tuple(
            np.where(null, -1, values).astype(np.int64)
            for values, null in zip(codes, nulls)
        )

    both = pa.concat_arrays(_chunks(left) + _chunks(right.cast(left.type)))
    indices = pc.dictionary_encode(both).indices
    codes = indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes[: len(left)], codes[len(left):]


def _null_mask(column: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    return column.is_null().to_numpy(zero_copy_only=False)


def _chunks(column: "pa.Array | pa.ChunkedArray") -> list[pa.Array]:
    if isinstance(column, pa.ChunkedArray):
        return list(column.chunks)
    return [column]
