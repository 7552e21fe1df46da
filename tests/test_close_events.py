"""Close events: sockets that close between samples, and runs without privilege."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from harness import query_json

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="subscribing to close events needs CAP_NET_ADMIN (root)"
)

SOURCES = ["proc", "netlink"]


class Collector:
    """`fastsock collect` in a subprocess, started once it subscribed and sampled."""

    def __init__(self, data_dir, *args: str, command_prefix=()) -> None:
        self.process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "fastsock", "--log-level", "info",
             "collect", "--quiet", "--data-dir", str(data_dir), *args],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        # The subscription happens before the first sample, which is logged.
        while True:
            line = self.process.stderr.readline()
            if not line:
                raise AssertionError(f"collect exited early:\n{''.join(self.lines)}")
            self.lines.append(line)
            if "first sample:" in line:
                break

    def wait(self) -> str:
        _, rest = self.process.communicate(timeout=60)
        stderr = "".join(self.lines) + rest
        assert self.process.returncode == 0, stderr
        return stderr


def tcp_pair(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    return client, accepted


@pytest.fixture
def server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def rows_of(data_dir, view: str, client_port: int, server_port: int) -> list[dict]:
    """Return both ends of the loopback connection between the two ports."""
    return query_json(
        data_dir,
        f"SELECT * FROM {view} WHERE protocol = 'tcp' AND local_addr = '127.0.0.1' "
        f"AND ((local_port = {client_port} AND remote_port = {server_port}) OR "
        f"(local_port = {server_port} AND remote_port = {client_port})) "
        f"ORDER BY local_port",
    )


@pytest.mark.parametrize("source", SOURCES)
def test_connection_shorter_than_sample(source, server, tmp_path):
    collector = Collector(tmp_path, "--interval", "2", "--duration", "3",
                          "--source", source)
    client, accepted = tcp_pair(server)
    client_port = client.getsockname()[1]
    client.sendall(b"x" * 100)
    accepted.recv(100)
    time.sleep(0.02)
    client.close()
    accepted.close()
    collector.wait()

    server_port = server.getsockname()[1]
    rows = {
        row["local_port"]: row
        for row in rows_of(tmp_path, "connections", client_port, server_port)
    }
    outbound = rows[client_port]
    inbound = rows[server.getsockname()[1]]

    assert len(rows) == 2
    for row in (outbound, inbound):
        assert row["detected_by"] == "close_event"
        assert row["closed"] is True
        assert row["cookie"] is not None
        assert row["inode"] is None
    assert outbound["pid"] is None
    assert outbound["attribution"] == "unseen"
    assert outbound["bytes_acked"] >= 100
    assert inbound["pid"] == os.getpid()
    assert inbound["attribution"] == "listener"
    assert inbound["bytes_received"] >= 100


@pytest.mark.parametrize("source", SOURCES)
def test_sampled_connection_gets_close_time(source, server, tmp_path):
    collector = Collector(tmp_path, "--interval", "0.2", "--duration", "2",
                          "--source", source)
    client, accepted = tcp_pair(server)
    client_port = client.getsockname()[1]
    client.sendall(b"y" * 300)
    accepted.recv(300)
    time.sleep(1.0)
    closing_at = time.time()
    client.close()
    accepted.close()
    collector.wait()

    rows = rows_of(tmp_path, "connections", client_port, server.getsockname()[1])

    assert len(rows) == 2
    for row in rows:
        assert row["detected_by"] == "live"
        assert row["closed"] is True
        assert row["cookie"] is not None
        assert row["attribution"] == "socket"
        assert row["pid"] == os.getpid()
        last_seen = time.mktime(time.strptime(row["last_seen"][:19],
                                              "%Y-%m-%dT%H:%M:%S"))
        last_seen += float("0." + row["last_seen"][20:26]) - time.timezone
        # Polling alone would leave last_seen at the sample before the close.
        assert last_seen >= closing_at - 0.005, row
        assert last_seen <= closing_at + 0.5, row
    (outbound,) = [row for row in rows if row["local_port"] == client_port]
    assert outbound["bytes_acked"] >= 300


needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"
)
DROP_NET_ADMIN = ("setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--")

# Joins the destroy groups and prints whether the kernel allowed it.
PROBE_SUBSCRIPTION = """
import socket
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
try:
    sock.bind((0, 0xF))
    print("allowed")
except PermissionError:
    print("denied")
"""


def subscription_without_net_admin() -> str:
    result = subprocess.run(
        [*DROP_NET_ADMIN, sys.executable, "-c", PROBE_SUBSCRIPTION],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


@needs_setpriv
def test_without_net_admin_polling_goes_on(peers, server, tmp_path):
    """Some kernels deny the subscription without CAP_NET_ADMIN, others allow it.

    Either way fastsock logs one warning (close events off, or a receive
    buffer smaller than asked, since SO_RCVBUFFORCE needs the capability)
    and keeps polling.
    """
    kernel_allows = subscription_without_net_admin() == "allowed"
    peer_server = peers("server", "--bind", "127.0.0.1", "--name", "fs-nocap-srv")
    collector = Collector(tmp_path, "--interval", "2", "--duration", "3",
                          command_prefix=DROP_NET_ADMIN)
    client = peers("client", "--connect", "127.0.0.1",
                   str(peer_server.info["port"]), "--name", "fs-nocap-cli")
    short_client, short_accepted = tcp_pair(server)
    short_port = short_client.getsockname()[1]
    time.sleep(0.02)
    short_client.close()
    short_accepted.close()
    stderr = collector.wait()

    live = query_json(tmp_path, f"SELECT * FROM connections WHERE pid = {client.pid}")
    short = rows_of(tmp_path, "connections", short_port, server.getsockname()[1])

    (row,) = live
    assert row["detected_by"] == "live"
    assert row["comm"] == "fs-nocap-cli"
    if kernel_allows:
        assert stderr.count("close-event receive buffer is") == 1, stderr
        assert "close events are off" not in stderr
        assert {row["detected_by"] for row in short} == {"close_event"}
    else:
        assert stderr.count("close events are off") == 1, stderr
        assert "CAP_NET_ADMIN" in stderr
        assert short == []


def test_burst_of_short_connections_is_recorded_whole(server, tmp_path):
    # A burst of closes arrives a few per read, and the reader thread hands
    # them over in batches. None may be lost on the way to the store.
    collector = Collector(tmp_path, "--interval", "0.5", "--duration", "4",
                          "--flush-interval", "3600")
    ports = []
    # Kept to hundreds of connections, so that the TIME_WAIT rows they leave
    # for the next 60 s stay few for the tests that follow.
    for _ in range(600):
        client, accepted = tcp_pair(server)
        ports.append(client.getsockname()[1])
        client.close()
        accepted.close()
    collector.wait()

    server_port = server.getsockname()[1]
    rows = query_json(
        tmp_path,
        f"SELECT local_port FROM connections WHERE protocol = 'tcp' "
        f"AND remote_port = {server_port} AND local_addr = '127.0.0.1'",
    )
    assert {row["local_port"] for row in rows} >= set(ports)


def test_waiting_records_flush_before_the_interval(server, tmp_path, monkeypatch):
    import threading

    from fastsock import collector as collector_module
    from fastsock.snapshot import Snapshotter
    from fastsock.store import ParquetStore

    monkeypatch.setattr(collector_module, "FLUSH_AT_RECORDS", 100)
    collector = collector_module.Collector(Snapshotter(), ParquetStore(tmp_path))

    def open_then_close():
        pairs = [tcp_pair(server) for _ in range(100)]
        time.sleep(0.5)
        for client, accepted in pairs:
            client.close()
            accepted.close()

    churn = threading.Thread(target=open_then_close)
    churn.start()
    status = collector.run(0.05, 3600, threading.Event(), duration=1.5)
    churn.join()

    # The 200 closed ends (100 connections) made one flush before the last.
    assert status.flushes >= 2


def test_late_sampled_listener_makes_inbound(tmp_path):
    collector = Collector(tmp_path, "--interval", "1", "--duration", "2.5")
    # The listener opens after the first sample and its connections close
    # before the next one, which is the first to show the listener.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    port = listener.getsockname()[1]
    for _ in range(100):
        client, accepted = tcp_pair(listener)
        client.close()
        accepted.close()
    collector.wait()
    listener.close()

    rows = query_json(
        tmp_path,
        f"SELECT local_port = {port} AS server_side, direction, count(*) AS n "
        f"FROM connections WHERE local_addr = '127.0.0.1' "
        f"AND (local_port = {port} OR remote_port = {port}) GROUP BY ALL",
    )
    counts = {(row["server_side"], row["direction"]): row["n"] for row in rows}
    assert counts == {(True, "inbound"): 100, (False, "outbound"): 100}
