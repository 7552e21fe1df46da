"""The lifetime tracker folds samples into one record per entity."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from fastsock.lifetimes import LifetimeTracker


def rows(*names):
    return pa.table({"name": list(names)})


def observe(tracker, keys, names, time_us):
    return tracker.observe(np.array(keys, dtype=np.int64), rows(*names), time_us)


def test_entity_lives_across_samples():
    tracker = LifetimeTracker()
    observe(tracker, [1, 2], ["a", "b"], 100)
    observe(tracker, [1], ["a"], 200)

    records = tracker.drain().to_pylist()
    by_name = {record["name"]: record for record in records}

    assert by_name["a"]["first_seen_us"] == 100
    assert by_name["a"]["last_seen_us"] == 200
    assert by_name["a"]["closed"] is False
    assert by_name["b"]["closed"] is True
    assert by_name["b"]["last_seen_us"] == 100


def test_repeated_key_in_sample_counts_once():
    tracker = LifetimeTracker()

    opened = observe(tracker, [7, 7, 8], ["first", "second", "other"], 100)
    observe(tracker, [7, 8], ["first", "other"], 200)
    records = tracker.drain().to_pylist()

    assert opened == 2
    assert len(records) == 2
    assert not any(record["closed"] for record in records)
    assert {record["name"] for record in records} == {"first", "other"}


def test_closed_records_drained_once():
    tracker = LifetimeTracker()
    observe(tracker, [1], ["a"], 100)
    observe(tracker, [], [], 200)

    first = tracker.drain()
    second = tracker.drain()

    assert first.num_rows == 1
    assert second.num_rows == 0


def names_by_key(table):
    return dict(zip(table.column("key").to_pylist(), table.column("name").to_pylist()))


def test_reopened_key_is_new_entity():
    tracker = LifetimeTracker()
    observe(tracker, [1, 2], ["a", "b"], 100)
    observe(tracker, [2], ["b"], 200)
    opened = observe(tracker, [1, 2], ["a again", "b"], 300)

    records = tracker.drain().to_pylist()
    ones = sorted((r["first_seen_us"], r["closed"], r["name"]) for r in records
                  if r["key"] == 1)
    assert opened == 1
    assert ones == [(100, True, "a"), (300, False, "a again")]


def test_many_closes_keep_open_rows_and_records_right():
    # Enough closes to pass the compaction threshold more than once, with
    # sockets opening in every sample, as on a busy host.
    tracker = LifetimeTracker()
    alive = {}
    closed_names = {}
    next_key = 0
    for sample in range(40):
        for _ in range(500):
            alive[next_key] = f"n{next_key}"
            next_key += 1
        for key in list(alive)[: 300 if sample % 3 else 0]:
            closed_names[key] = alive.pop(key)
        keys = np.array(list(alive), dtype=np.int64)
        tracker.observe(keys, rows(*alive.values()), sample)
        assert len(tracker) == len(alive)
        assert tracker.null_count("name") == 0

    # Rows of closed entities were dropped along the way.
    assert len(tracker.all_rows()[0]) < next_key
    drained = tracker.drain()
    closed = drained.filter(drained.column("closed"))
    still = drained.filter(pc.invert(drained.column("closed")))
    assert names_by_key(closed) == closed_names
    assert names_by_key(still) == alive
    keys, open_rows = tracker.open_rows()
    assert dict(zip(keys.tolist(), open_rows.column("name").to_pylist())) == alive


def test_close_keys_rejects_closed_key():
    tracker = LifetimeTracker()
    observe(tracker, [1, 2], ["a", "b"], 100)

    with pytest.raises(ValueError, match=r"keys \[9\] are not open"):
        tracker.close_keys(np.array([9]), np.array([150]))

    tracker.close_keys(np.array([2]), np.array([150]))
    records = {r["key"]: r for r in tracker.drain().to_pylist()}
    assert records[2]["closed"] and records[2]["last_seen_us"] == 150
    assert not records[1]["closed"]
    assert len(tracker) == 1


def test_null_count_counts_open_rows_only():
    tracker = LifetimeTracker()
    table = pa.table({"name": ["a", None, None]})
    tracker.observe(np.array([1, 2, 3], dtype=np.int64), table, 100)
    assert tracker.null_count("name") == 2

    tracker.observe(np.array([1, 2], dtype=np.int64), table.slice(0, 2), 200)
    assert tracker.null_count("name") == 1


def test_checkpoint_does_not_change_with_later_samples():
    tracker = LifetimeTracker()
    observe(tracker, [1], ["a"], 100)
    checkpoint = tracker.drain()
    observe(tracker, [1], ["a"], 200)

    assert checkpoint.column("last_seen_us").to_pylist() == [100]


def test_close_keys_rejects_a_repeated_key():
    tracker = LifetimeTracker()
    observe(tracker, [1, 2], ["a", "b"], 100)

    with pytest.raises(ValueError, match="keys repeat"):
        tracker.close_keys(np.array([1, 1]), np.array([150, 160]))
    assert len(tracker) == 2


def test_update_rows_replaces_columns_of_chosen_positions():
    tracker = LifetimeTracker()
    # Three samples make parts of different sizes; positions span two of them.
    observe(tracker, [1, 2, 3, 4], ["a", "b", "c", "d"], 100)
    observe(tracker, [1, 2, 3, 4, 5, 6], ["a", "b", "c", "d", "e", "f"], 200)
    observe(tracker, [1, 2, 3, 4, 5, 6, 7], list("abcdefg"), 300)
    positions = tracker.find(np.array([2, 6], dtype=np.int64))

    tracker.update_rows(positions, pa.table({"name": ["B", "F"]}))
    records = tracker.drain().to_pylist()

    names = {record["key"]: record["name"] for record in records}
    assert names == {1: "a", 2: "B", 3: "c", 4: "d", 5: "e", 6: "F", 7: "g"}
    assert {record["first_seen_us"] for record in records if record["key"] == 6} == {200}


def test_update_rows_counts_nulls_again():
    tracker = LifetimeTracker()
    names = pa.table({"name": pa.array([None, "b"], pa.string())})
    tracker.observe(np.array([1, 2], dtype=np.int64), names, 100)
    assert tracker.null_count("name") == 1
    assert tracker.null_positions("name").tolist() == [0]

    tracker.update_rows(np.array([0]), pa.table({"name": ["a"]}))

    assert tracker.null_count("name") == 0
    assert tracker.find(np.array([1, 2], dtype=np.int64)).tolist() == [0, 1]
