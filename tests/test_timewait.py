"""Connections seen only after they closed (inode 0), from fixtures and live sockets."""

import signal
import subprocess
import sys
import time


from caseload import case_dir
from fastsock.collector import Collector
from fastsock.query import run_query
from fastsock.snapshot import Snapshotter
from fastsock.store import ParquetStore
from harness import query_json, run_fastsock
from proctree import build_proc_tree, load_processes
from special_peers import launch  # noqa: F401 (a fixture)
from test_direction import LISTEN, TCP_HEADER, WILDCARD, tcp_row

TIME_WAIT, SYN_RECV = 0x06, 0x03


def start_collector(data_dir, interval: str, duration: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastsock",
            "collect",
            "--quiet",
            "--no-close-events",
            "--interval",
            interval,
            "--duration",
            duration,
            "--flush-interval",
            "0.2",
            "--data-dir",
            str(data_dir),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_first_flush(data_dir, collector: subprocess.Popen) -> None:
    """Wait until the collector has sampled and written its first files."""
    deadline = time.monotonic() + 30
    while not list(data_dir.glob("listeners/*/*/*.parquet")):
        assert collector.poll() is None, collector.stderr.read()
        assert time.monotonic() < deadline, "the collector wrote no files in 30 s"
        time.sleep(0.05)


def finish(collector: subprocess.Popen) -> None:
    _, stderr = collector.communicate(timeout=60)
    assert collector.returncode == 0, stderr


def test_c05_closing_rows_recorded(tmp_path):
    spec = load_processes(case_dir("C05") / "proc_fd.json")
    root = build_proc_tree(
        tmp_path / "proc", spec, net={"tcp": (case_dir("C05") / "tcp").read_text()}
    )
    run_fastsock(
        "collect",
        "--once",
        "--proc-root",
        str(root),
        "--data-dir",
        str(tmp_path / "data"),
    )

    rows = query_json(
        tmp_path / "data",
        "SELECT * FROM connections WHERE detected_by = 'time_wait' "
        "ORDER BY local_port, remote_port",
    )

    # The SYN_RECV row is a handshake, not a closed connection.
    assert sorted(row["state"] for row in rows) == [
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "TIME_WAIT",
    ]
    for row in rows:
        assert row["inode"] == 0
        assert row["closed"] is True
        assert row["first_seen"] == row["last_seen"]
    inbound = [row for row in rows if row["local_port"] == 8080]
    assert len(inbound) == 3
    for row in inbound:
        assert row["direction"] == "inbound"
        assert row["pid"] == 3100
        assert row["comm"] == "websrv"
        assert row["uid"] == 1000
    (outbound,) = [row for row in rows if row["local_port"] != 8080]
    assert outbound["direction"] == "outbound"
    assert outbound["pid"] is None
    assert outbound["uid"] is None


def test_short_connections_seen_in_time_wait(launch, tmp_path):
    server = launch(
        "special_peers.py", "closing-server", "--close-on-eof", "--name", "fs-tw-srv"
    )
    # Whether the clients run before the first sample or between two, their
    # connections close before any sample shows them with an fd.
    collector = start_collector(tmp_path, "1", "60")
    time.sleep(0.3)
    clients = launch(
        "special_peers.py",
        "short-clients",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        "--count",
        "20",
        "--name",
        "fs-tw-cli",
    )
    # The clients have closed every connection. On a loaded machine that can
    # take longer than a fixed duration, so stop only after one more sample.
    time.sleep(1.5)
    collector.send_signal(signal.SIGTERM)
    finish(collector)

    ports = ", ".join(str(port) for port in clients.info["ports"])
    rows = query_json(
        tmp_path,
        f"SELECT * FROM connections WHERE remote_port = {server.info['port']} "
        f"AND local_port IN ({ports})",
    )
    time_wait = [row for row in rows if row["detected_by"] == "time_wait"]

    # A sample that happens to fall inside one client's short life sees it
    # live, with its process, so every port is recorded once either way.
    # Rows of earlier tests whose server had the same port number can still
    # be in TIME_WAIT, hence the filter on the clients' ports.
    assert sorted(row["local_port"] for row in rows) == sorted(clients.info["ports"])
    assert len(time_wait) >= len(rows) - 2
    for row in time_wait:
        assert row["state"] == "TIME_WAIT"
        assert row["direction"] == "outbound"
        assert row["pid"] is None
    flows = query_json(
        tmp_path,
        f"SELECT sum(opened) AS opened FROM flows WHERE remote_port = "
        f"{server.info['port']} AND direction = 'outbound'",
    )
    assert flows[0]["opened"] >= 20


def test_tracked_connection_not_counted_twice(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-tw-held")
    collector = start_collector(tmp_path, "0.1", "2")
    time.sleep(0.8)
    client = peers(
        "client",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        "--name",
        "fs-tw-once",
    )
    time.sleep(0.6)
    # The client closes first, so its end stays in TIME_WAIT after this.
    client.stop()
    finish(collector)

    port = client.info["ports"][0]
    rows = query_json(
        tmp_path,
        f"SELECT detected_by, closed FROM connections WHERE local_port = {port} "
        f"AND remote_port = {server.info['port']}",
    )
    assert rows == [{"detected_by": "live", "closed": True}]


def test_server_closing_first_attributed(launch, tmp_path):
    server = launch("special_peers.py", "closing-server", "--name", "fs-tw-close")
    # The listener must be sampled before the rows of the connections it
    # accepted, since its port is in the ephemeral range (see
    # test_ephemeral_listener_same_sample_unknown).
    collector = start_collector(tmp_path, "1", "2")
    wait_for_first_flush(tmp_path, collector)
    clients = launch(
        "special_peers.py",
        "short-clients",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        "--count",
        "10",
        "--wait-eof",
        "--name",
        "fs-tw-eof",
    )
    finish(collector)

    rows = query_json(
        tmp_path,
        f"SELECT * FROM connections WHERE local_port = {server.info['port']} "
        f"AND detected_by = 'time_wait'",
    )

    assert sorted(row["remote_port"] for row in rows) == sorted(clients.info["ports"])
    for row in rows:
        assert row["direction"] == "inbound"
        assert row["pid"] == server.pid
        assert row["comm"] == "fs-tw-close"


def test_listener_with_several_holders_not_attributed(tmp_path):
    holders = [
        {"pid": pid, "comm": "prefork", "fds": {"3": "socket:[700]"}}
        for pid in (41, 42)
    ]
    root = build_proc_tree(
        tmp_path / "proc", {"processes": holders}, net={"tcp": TCP_HEADER}
    )
    collector = Collector(Snapshotter(root), ParquetStore(tmp_path / "data"))
    (root / "net" / "tcp").write_text(
        TCP_HEADER
        + tcp_row(0, ("0.0.0.0", 8080), WILDCARD, LISTEN, 700)
        + tcp_row(1, ("127.0.0.1", 8080), ("127.0.0.1", 50001), TIME_WAIT, 0)
        + tcp_row(2, ("127.0.0.1", 8080), ("127.0.0.1", 50002), SYN_RECV, 0)
    )

    collector.sample()
    collector.flush()
    rows = run_query(tmp_path / "data", "SELECT * FROM connections").to_pylist()

    (row,) = rows
    assert row["direction"] == "inbound"
    assert row["detected_by"] == "time_wait"
    assert row["pid"] is None
    assert row["remote_port"] == 50001


def test_time_wait_row_counted_once(tmp_path):
    root = build_proc_tree(
        tmp_path / "proc", {"processes": []}, net={"tcp": TCP_HEADER}
    )
    collector = Collector(Snapshotter(root), ParquetStore(tmp_path / "data"))
    row = tcp_row(0, ("127.0.0.1", 45000), ("127.0.0.1", 8080), TIME_WAIT, 0)
    (root / "net" / "tcp").write_text(TCP_HEADER + row)

    for _ in range(3):
        collector.sample()
        collector.flush()
    (root / "net" / "tcp").write_text(TCP_HEADER)
    collector.sample()
    (root / "net" / "tcp").write_text(TCP_HEADER + row)
    collector.sample()
    collector.flush()

    stored = (
        run_query(tmp_path / "data", "SELECT first_seen FROM connections_records")
        .column("first_seen")
        .to_pylist()
    )
    # Listed in three samples, then gone, then listed again: two connections.
    assert len(stored) == 2
    assert len(set(stored)) == 2


def test_ephemeral_listener_same_sample_unknown(tmp_path):
    root = build_proc_tree(
        tmp_path / "proc",
        {"processes": [{"pid": 41, "comm": "srv", "fds": {"3": "socket:[700]"}}]},
        net={"tcp": TCP_HEADER},
    )
    collector = Collector(Snapshotter(root), ParquetStore(tmp_path / "data"))
    listener = tcp_row(0, ("0.0.0.0", 40000), WILDCARD, LISTEN, 700)
    closed = tcp_row(1, ("127.0.0.1", 40000), ("127.0.0.1", 50001), TIME_WAIT, 0)
    later = tcp_row(2, ("127.0.0.1", 40000), ("127.0.0.1", 50002), TIME_WAIT, 0)

    # A TIME_WAIT row listed with a new listener on its ephemeral port may be
    # an earlier outbound connection whose port the listener reused.
    (root / "net" / "tcp").write_text(TCP_HEADER + listener + closed)
    collector.sample()
    time.sleep(0.002)
    (root / "net" / "tcp").write_text(TCP_HEADER + listener + closed + later)
    collector.sample()
    collector.flush()
    rows = run_query(
        tmp_path / "data", "SELECT remote_port, direction, pid FROM connections"
    ).to_pylist()

    by_port = {row["remote_port"]: row for row in rows}
    assert by_port[50001]["direction"] == "unknown"
    assert by_port[50001]["pid"] is None
    assert by_port[50002]["direction"] == "inbound"
    assert by_port[50002]["pid"] == 41
