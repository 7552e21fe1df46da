"""The lifetime tracker folds samples into one record per entity."""

import numpy as np
import pyarrow as pa

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
