"""The NumPy inner join gives the pairs that Acero's hash join gives."""

import numpy as np
import pyarrow as pa
import pytest

from fastsock.joins import inner_join_rows


def acero_pairs(left, right, left_keys, right_keys):
    left = left.append_column("left_row", pa.array(np.arange(left.num_rows)))
    right = right.append_column("right_row", pa.array(np.arange(right.num_rows)))
    joined = left.join(right, keys=left_keys, right_keys=right_keys, join_type="inner")
    return sorted(zip(joined.column("left_row").to_pylist(),
                      joined.column("right_row").to_pylist()))


def test_matches_acero_on_strings_integers_repeats_and_nulls():
    rng = np.random.default_rng(7)
    addresses = ["127.0.0.1", "::1", "0.0.0.0", None]
    left = pa.table({
        "addr": pa.chunked_array([
            [addresses[i] for i in rng.integers(0, 4, 300)],
            [addresses[i] for i in rng.integers(0, 4, 200)],
        ]),
        "port": pa.array(rng.integers(-2, 6, 500), pa.int64()),
    })
    right = pa.table({
        "listener_addr": [addresses[i] for i in rng.integers(0, 4, 40)],
        "listener_port": pa.array(
            [None if i == 0 else int(i) - 2 for i in rng.integers(0, 8, 40)], pa.int64()
        ),
    })
    keys, right_keys = ["addr", "port"], ["listener_addr", "listener_port"]

    rows, right_rows = inner_join_rows(left, right, keys, right_keys)

    expected = acero_pairs(left, right, keys, right_keys)
    assert len(expected) > 100
    assert sorted(zip(rows.tolist(), right_rows.tolist())) == expected


def test_empty_side_and_key_count_mismatch():
    table = pa.table({"a": [1, 2]})
    rows, other = inner_join_rows(table, table.slice(0, 0), ["a"], ["a"])
    assert rows.tolist() == []
    assert other.tolist() == []

    with pytest.raises(ValueError, match="2 left keys and 1 right keys"):
        inner_join_rows(table, table, ["a", "a"], ["a"])
