"""The steady-state sample: known sockets skip attribution and row building."""

import time

import numpy as np
import pyarrow as pa
import pytest

from fastsock import _keyindex
from fastsock.collector import Collector
from fastsock.lifetimes import LifetimeTracker
from fastsock.snapshot import Snapshotter
from fastsock.store import ParquetStore


def test_key_index_finds_positions():
    keys = np.array([7, -3, 2**62, 0, 7], dtype=np.int64)
    index = _keyindex.KeyIndex(keys)

    found = index.find(np.array([0, 7, 2**62, -3, 5, -7], dtype=np.int64))

    assert found.tolist() == [3, 0, 2, 1, -1, -1]
    assert index.size == 5


def test_key_index_empty():
    index = _keyindex.KeyIndex(np.empty(0, dtype=np.int64))

    assert index.find(np.array([0, 1], dtype=np.int64)).tolist() == [-1, -1]


def test_tracker_asks_rows_of_new_keys_only():
    tracker = LifetimeTracker()
    requested = []

    def rows_of(keys):
        def take(indices):
            requested.append(keys[indices].tolist())
            names = [f"k{key}" for key in keys[indices]]
            return pa.table({"name": pa.array(names, pa.string())})

        return take

    first = np.array([10, 20, 30], dtype=np.int64)
    second = np.array([30, 40, 10], dtype=np.int64)
    assert tracker.observe(first, rows_of(first), 1) == 3
    assert tracker.observe(second, rows_of(second), 2) == 1

    assert requested == [[], [10, 20, 30], [40]]
    drained = tracker.drain().to_pydict()
    closed = dict(zip(drained["key"], drained["closed"]))
    assert closed == {20: True, 10: False, 30: False, 40: False}
    names = dict(zip(drained["key"], drained["name"]))
    assert names[40] == "k40"


def test_steady_sample_resolves_new_inodes_only(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-steady-s")
    collector = Collector(Snapshotter(), ParquetStore(tmp_path))
    collector.sample()
    attributor = collector.snapshotter.attributor
    requested_before = attributor.stats["inodes_requested"]
    opened_before = collector.status.opened

    # Other processes on the machine may open sockets meanwhile: only those
    # are resolved, never the ones the first sample knew.
    collector.sample()
    requested = attributor.stats["inodes_requested"] - requested_before
    assert requested == collector.status.opened - opened_before

    client = peers("client", "--connect", "127.0.0.1", str(server.info["port"]),
                   "--name", "fs-steady-c")
    client_port = client.info["ports"][0]
    server_side = (server.info["port"], client_port)
    # The server process accepts in its own time; until then its side of the
    # connection has no socket of its own (inode 0).
    for _ in range(100):
        collector.sample()
        by_port = open_comms(collector)
        if server_side in by_port:
            break
        time.sleep(0.02)
    assert attributor.stats["inodes_requested"] > requested_before

    assert by_port[(client_port, server.info["port"])] == "fs-steady-c"
    assert by_port[server_side] == "fs-steady-s"

    holders = collector.processes.open_rows()[1].column("pid").to_pylist()
    assert server.pid in holders
    assert client.pid in holders


def open_comms(collector: Collector) -> dict[tuple[int, int], str]:
    """Return the comm of each open socket by (local port, remote port)."""
    _keys, rows = collector.sockets.open_rows()
    columns = rows.select(["local_port", "remote_port", "comm"]).to_pylist()
    return {(row["local_port"], row["remote_port"]): row["comm"] for row in columns}


def test_key_index_leaves_out_flagged_positions():
    keys = np.array([5, 6, 5, 7], dtype=np.int64)
    index = _keyindex.KeyIndex(keys, left_out=np.array([True, False, False, False]))

    assert index.find(np.array([5, 6, 7, 8], dtype=np.int64)).tolist() == [2, 1, 3, -1]
    with pytest.raises(ValueError, match="left_out has 1 values for 4 keys"):
        _keyindex.KeyIndex(keys, left_out=np.array([True]))
