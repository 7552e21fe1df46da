"""Late owners, flushes that run while sampling goes on, and rows taken as runs."""

import socket
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from fastsock.collector import Collector
from fastsock.errors import NoDataError
from fastsock.query import run_query
from fastsock.rowruns import take_rows
from fastsock.snapshot import Snapshotter
from fastsock.store import ParquetStore
from proctree import write_process
from test_direction import (
    CLIENT,
    ESTABLISHED,
    LISTEN,
    SERVER,
    TreeCollector,
    tcp_row,
)

from test_store import tmpfs  # noqa: F401 (a fixture)

TIME_WAIT = 0x06


def owners_by_inode(data_dir) -> dict[int, tuple]:
    rows = run_query(data_dir, "SELECT inode, pid, comm FROM connections").to_pylist()
    return {row["inode"]: (row["pid"], row["comm"]) for row in rows}


def test_owner_found_after_first_sample(tmp_path):
    tree = TreeCollector(tmp_path)
    first = tcp_row(1, CLIENT, SERVER, ESTABLISHED, 501)
    tree.sample(tcp=[first])

    # The process shows up later, holding that socket and a new one, whose
    # lookup walks the fd links again.
    write_process(
        tree.root,
        {
            "pid": 700,
            "comm": "late-owner",
            "fds": {"3": "socket:[501]", "4": "socket:[502]"},
        },
    )
    second = tcp_row(2, (CLIENT[0], 50001), SERVER, ESTABLISHED, 502)
    tree.sample(tcp=[first, second])
    tree.collector.flush()

    owners = owners_by_inode(tree.data)
    assert owners[501] == (700, "late-owner")
    assert owners[502] == (700, "late-owner")
    assert tree.collector.status.unattributed == 0


def test_owner_stays_null_without_holder(tmp_path):
    tree = TreeCollector(tmp_path)
    first = tcp_row(1, CLIENT, SERVER, ESTABLISHED, 501)
    tree.sample(tcp=[first])
    write_process(
        tree.root, {"pid": 700, "comm": "other", "fds": {"4": "socket:[502]"}}
    )
    second = tcp_row(2, (CLIENT[0], 50001), SERVER, ESTABLISHED, 502)
    tree.sample(tcp=[first, second])
    tree.collector.flush()

    owners = owners_by_inode(tree.data)
    assert owners[501] == (None, None)
    assert owners[502] == (700, "other")
    assert tree.collector.status.unattributed == 1


def sampled_connection(collector: Collector, listener: socket.socket) -> int:
    """Open, sample, close and sample a loopback connection; return its port."""
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    port = client.getsockname()[1]
    collector.sample()
    client.close()
    accepted.close()
    collector.sample()
    return port


def stored_ports(data_dir, port: int) -> list[int]:
    sql = (
        "SELECT local_port FROM connections "
        f"WHERE remote_port = {port} AND closed ORDER BY local_port"
    )
    return run_query(data_dir, sql).column("local_port").to_pylist()


def test_samples_during_background_flush(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    collector = Collector(Snapshotter(), ParquetStore(tmp_path), auto_compact=False)

    before_port = sampled_connection(collector, listener)
    collector.flush_in_background()
    # A connection that lives only while the flush runs is sampled too.
    during_port = sampled_connection(collector, listener)
    assert collector.flush()
    listener.close()

    assert stored_ports(tmp_path, port) == sorted([before_port, during_port])
    assert collector.status.flushes == 2
    assert collector.status.failed_flushes == 0


@pytest.mark.root
def test_failed_background_write_keeps_rows(tmpfs):  # noqa: F811
    data_dir = tmpfs("size=8m")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    collector = Collector(Snapshotter(), ParquetStore(data_dir), auto_compact=False)
    client_port = sampled_connection(collector, listener)

    tmpfs.remount_read_only()
    collector.flush_in_background()
    assert not collector.flush()
    subprocess.run(["mount", "-o", "remount,rw", str(data_dir)], check=True)
    assert collector.flush()
    listener.close()

    assert stored_ports(data_dir, port) == [client_port]
    assert collector.status.failed_flushes == 2


@pytest.mark.parametrize(
    "indices",
    [
        [],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [0, 1, 3, 6, 7, 8],
        [9],
        [5, 3, 4],
        [7, 8, 0, 1],
    ],
)
def test_take_rows_as_runs(indices):
    table = pa.table({"n": list(range(10)), "text": [str(n) for n in range(10)]})

    selected = take_rows(table, np.array(indices, dtype=np.int64))

    assert selected.column("n").to_pylist() == indices
    assert selected.column("text").to_pylist() == [str(n) for n in indices]


def test_take_rows_copies_many_runs():
    table = pa.table({"n": list(range(1000))})
    every_other = np.arange(0, 1000, 2)

    selected = take_rows(table, every_other)

    assert selected.column("n").to_pylist() == every_other.tolist()
    assert selected.column("n").num_chunks == 1


def test_restart_keeps_flows_and_time_wait(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    # Two runs within one bucket, as after a restart. Each client closes
    # first, so its side stays in TIME_WAIT for the second run to see.
    for closes in (3, 2):
        collector = Collector(
            Snapshotter(),
            ParquetStore(tmp_path),
            bucket_seconds=3600,
            auto_compact=False,
        )
        for _ in range(closes):
            sampled_connection(collector, listener)
        assert collector.flush()
    listener.close()

    inbound = run_query(
        tmp_path,
        "SELECT sum(opened) AS opened FROM flows "
        f"WHERE direction = 'inbound' AND local_port = {port}",
    )
    detected = run_query(
        tmp_path,
        "SELECT count(*) AS n FROM connections "
        f"WHERE detected_by = 'time_wait' AND remote_port = {port}",
    )
    assert inbound.column("opened").to_pylist() == [5]
    assert detected.column("n").to_pylist() == [0]


@pytest.mark.parametrize(
    ("holders", "expected"),
    [([700], (700, "listener")), ([700, 701], (None, "no_holder"))],
)
def test_unowned_inbound_gets_listener_owner(tmp_path, holders, expected):
    tree = TreeCollector(tmp_path)
    for pid in holders:
        write_process(
            tree.root, {"pid": pid, "comm": "fs-server", "fds": {"3": "socket:[500]"}}
        )
    listener = tcp_row(0, SERVER, ("0.0.0.0", 0), LISTEN, 500)
    # No process has inode 501 open: its socket closed before the fd walk.
    accepted = tcp_row(1, SERVER, CLIENT, ESTABLISHED, 501)
    tree.sample(tcp=[listener, accepted])
    tree.collector.flush()

    rows = run_query(
        tree.data,
        "SELECT pid, attribution, direction FROM connections WHERE inode = 501",
    ).to_pylist()

    assert [(row["pid"], row["attribution"]) for row in rows] == [expected]
    assert rows[0]["direction"] == "inbound"


def test_periodic_flush_holds_new_time_wait_rows(tmp_path):
    tree = TreeCollector(tmp_path)
    closing = tcp_row(1, CLIENT, SERVER, TIME_WAIT, 0)
    tree.sample(tcp=[closing])

    # A close event of the same connection may still arrive, so a periodic
    # flush leaves a detection younger than HOLD_SECONDS for the next flush.
    # The second periodic flush waits for the first to be written.
    tree.collector.flush_in_background()
    tree.collector.flush_in_background()
    before_last_flush = time_wait_count(tree.data)
    tree.collector.flush()

    assert before_last_flush == 0
    assert time_wait_count(tree.data) == 1
    assert tree.collector.status.flushes == 3


def time_wait_count(data_dir) -> int:
    sql = (
        "SELECT count(*) AS n FROM connections_records WHERE detected_by = 'time_wait'"
    )
    try:
        return run_query(data_dir, sql).column("n").to_pylist()[0]
    except NoDataError:
        return 0


def test_restart_skips_connection_open_at_stop(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    first = Collector(Snapshotter(), ParquetStore(tmp_path), auto_compact=False)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    port = client.getsockname()[1]
    first.sample()
    assert first.flush()

    # Closed while no collector runs: the client side stays in TIME_WAIT.
    client.close()
    accepted.close()
    second = Collector(Snapshotter(), ParquetStore(tmp_path), auto_compact=False)
    second.sample()
    assert second.flush()
    listener.close()

    sql = (
        "SELECT count(*) AS n FROM connections_records "
        f"WHERE detected_by = 'time_wait' AND local_port = {port}"
    )
    assert run_query(tmp_path, sql).column("n").to_pylist() == [0]
