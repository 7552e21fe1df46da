"""Close events: sockets that close between samples, and runs without privilege."""

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

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


# SO_LINGER on with a zero timeout: close() aborts the connection with a RST,
# and the kernel's tcp_disconnect() clears the remote port, the counters and
# an unbound local address before the close event is built.
LINGER_ABORT = struct.pack("ii", 1, 0)
# SO_COOKIE of asm-generic/socket.h (Linux 4.12 and later): the socket's
# 64-bit cookie, which fastsock stores as a signed int64.
SO_COOKIE = 57


def ipv6_available(address: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


@dataclass
class Loopback:
    """Sockets of one family on one loopback address, and how fastsock stores it."""

    socket_family: int
    address: str
    stored_address: str
    stored_family: str


FAMILIES = [
    pytest.param(Loopback(socket.AF_INET, "127.0.0.1", "127.0.0.1", "inet"), id="inet"),
    pytest.param(
        Loopback(socket.AF_INET6, "::1", "::1", "inet6"),
        id="inet6",
        marks=pytest.mark.skipif(
            not ipv6_available("::1"), reason="::1 is not available"
        ),
    ),
    # Dual-stack sockets: IPv6 sockets whose addresses are IPv4-mapped.
    pytest.param(
        Loopback(socket.AF_INET6, "::ffff:127.0.0.1", "127.0.0.1", "inet"),
        id="inet6-mapped",
        marks=pytest.mark.skipif(
            not ipv6_available("::ffff:127.0.0.1"),
            reason="IPv6 sockets cannot bind IPv4-mapped addresses here",
        ),
    ),
]


def cookie_of(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    return struct.unpack("q", raw)[0]


def abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    sock.close()


def listening_socket(family: int, address: str) -> socket.socket:
    sock = socket.socket(family)
    sock.bind((address, 0))
    sock.listen()
    return sock


def connected_pair(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    """Connect to server and exchange 300 bytes out and 200 bytes back."""
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    client.sendall(b"c" * 300)
    accepted.recv(300)
    accepted.sendall(b"s" * 200)
    client.recv(200)
    return client, accepted


def unix_seconds(timestamp: str) -> float:
    """Parse a stored timestamp such as 2024-01-02T03:04:05.123456+00:00."""
    seconds = time.mktime(time.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S"))
    return seconds + float("0." + timestamp[20:26]) - time.timezone


def rows_with_cookies(data_dir, *cookies: int) -> list[dict]:
    """Return the connection rows of the sockets with these cookies.

    Loopback ports repeat across the connections of other programs, and an
    aborted socket's record may lack its remote port, so the cookie is the
    one reliable name of a socket here.
    """
    listed = ", ".join(str(cookie) for cookie in cookies)
    return query_json(
        data_dir,
        f"SELECT * FROM connections WHERE cookie IN ({listed}) ORDER BY cookie",
    )


@pytest.mark.parametrize("loopback", FAMILIES)
@pytest.mark.parametrize("source", SOURCES)
def test_aborted_sampled_connection_keeps_endpoints(source, loopback, tmp_path):
    server = listening_socket(loopback.socket_family, loopback.address)
    server_port = server.getsockname()[1]
    collector = Collector(tmp_path, "--interval", "0.2", "--duration", "2",
                          "--source", source)
    # The client aborts the first connection, the server the second.
    client, accepted = connected_pair(server)
    served, server_aborts = connected_pair(server)
    expected = {
        cookie_of(client): (client.getsockname()[1], server_port, 300),
        cookie_of(server_aborts): (server_port, served.getsockname()[1], 200),
    }
    time.sleep(1.0)
    closing_at = time.time()
    abort(client)
    accepted.close()
    abort(server_aborts)
    served.close()
    collector.wait()
    server.close()

    rows = rows_with_cookies(tmp_path, *expected)

    assert sorted(row["cookie"] for row in rows) == sorted(expected)
    for row in rows:
        local_port, remote_port, sent = expected[row["cookie"]]
        assert row["detected_by"] == "live"
        assert row["family"] == loopback.stored_family
        assert row["local_addr"] == loopback.stored_address
        assert row["local_port"] == local_port
        assert row["remote_addr"] == loopback.stored_address
        assert row["remote_port"] == remote_port
        assert row["closed"] is True
        assert row["pid"] == os.getpid()
        # Polling alone would leave last_seen at the sample before the close.
        assert unix_seconds(row["last_seen"]) >= closing_at - 0.005, row
        assert unix_seconds(row["last_seen"]) <= closing_at + 0.5, row
        if source == "netlink":
            # The event's counters are reset, so those of the last sample stay.
            assert row["bytes_acked"] >= sent, row


@pytest.mark.parametrize("loopback", FAMILIES)
@pytest.mark.parametrize("source", SOURCES)
def test_aborted_unseen_connection_recorded(source, loopback, tmp_path):
    family, address = loopback.socket_family, loopback.address
    server = listening_socket(family, address)
    server_port = server.getsockname()[1]
    closed_port = socket.socket(family)
    closed_port.bind((address, 0))
    collector = Collector(tmp_path, "--interval", "2", "--duration", "3",
                          "--source", source)
    # Both connections open and close between two samples: the client aborts
    # the first, the server the second.
    client, accepted = connected_pair(server)
    served, server_aborts = connected_pair(server)
    client_port = client.getsockname()[1]
    served_port = served.getsockname()[1]
    aborting = {"client": cookie_of(client), "server": cookie_of(server_aborts)}
    peers = {"client": cookie_of(accepted), "server": cookie_of(served)}
    abort(client)
    accepted.close()
    abort(server_aborts)
    served.close()
    # A refused connect and a socket that never connected are not connections.
    refused = socket.socket(family)
    refused.bind((address, 0))
    refused.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    never_connected = socket.socket(family)
    never_connected.bind((address, 0))
    failed = [cookie_of(refused), cookie_of(never_connected)]
    with pytest.raises(ConnectionRefusedError):
        refused.connect(closed_port.getsockname()[:2])
    refused.close()
    abort(never_connected)
    collector.wait()
    server.close()
    closed_port.close()

    rows = {
        row["cookie"]: row for row in rows_with_cookies(tmp_path, *aborting.values())
    }
    peer_rows = {
        row["cookie"]: row for row in rows_with_cookies(tmp_path, *peers.values())
    }
    failed_rows = rows_with_cookies(tmp_path, *failed)

    assert sorted(rows) == sorted(aborting.values())
    for row in rows.values():
        assert row["detected_by"] == "close_event_abort"
        assert row["closed"] is True
        assert row["inode"] is None
        assert row["family"] == loopback.stored_family
        assert row["remote_addr"] == loopback.stored_address
        assert row["remote_port"] is None
        # tcp_disconnect() reset the counters.
        assert row["bytes_acked"] is None
        assert row["bytes_received"] is None
    # An unbound client loses its local address. The server's accepted socket
    # keeps the address of its listener, which was bound to one.
    client_row = rows[aborting["client"]]
    assert client_row["local_addr"] is None
    assert client_row["local_port"] == client_port
    assert client_row["attribution"] == "unseen"
    assert client_row["direction"] == "outbound"
    server_row = rows[aborting["server"]]
    assert server_row["local_addr"] == loopback.stored_address
    assert server_row["local_port"] == server_port
    assert server_row["attribution"] == "listener"
    assert server_row["pid"] == os.getpid()
    assert server_row["direction"] == "inbound"
    # The other end of each connection received the RST and kept its four-tuple.
    assert sorted(peer_rows) == sorted(peers.values())
    assert peer_rows[peers["client"]]["remote_port"] == client_port
    assert peer_rows[peers["server"]]["remote_port"] == server_port
    assert peer_rows[peers["server"]]["local_port"] == served_port
    for row in peer_rows.values():
        assert row["detected_by"] == "close_event"
    assert failed_rows == []


def connect_from_port(port: int, server: socket.socket):
    """Connect to server from local port port, which other sockets may share."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind(("127.0.0.1", port))
    client.connect(server.getsockname())
    accepted, _ = server.accept()
    return client, accepted


@pytest.mark.parametrize("source", SOURCES)
def test_aborted_connections_sharing_a_port(source, tmp_path):
    # Three connections from one local port to three servers differ only in
    # the remote port, which the close event of an abortive close lacks.
    servers = [listening_socket(socket.AF_INET, "127.0.0.1") for _ in range(3)]
    server_ports = [server.getsockname()[1] for server in servers]
    # A bound socket that never connects keeps the port for the others.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    collector = Collector(tmp_path, "--interval", "0.2", "--duration", "2.5",
                          "--source", source)
    sampled, sampled_peer = connect_from_port(port, servers[1])
    still_open, open_peer = connect_from_port(port, servers[2])
    sampled_cookie = cookie_of(sampled)
    time.sleep(1.0)
    closing_at = time.time()
    unseen, unseen_peer = connect_from_port(port, servers[0])
    abort(unseen)
    unseen_peer.close()
    abort(sampled)
    sampled_peer.close()
    collector.wait()
    for sock in (still_open, open_peer, holder, *servers):
        sock.close()

    rows = query_json(
        tmp_path,
        f"SELECT * FROM connections WHERE protocol = 'tcp' "
        f"AND local_addr = '127.0.0.1' AND local_port = {port} "
        f"AND (remote_port IN ({', '.join(map(str, server_ports))}) "
        f"OR remote_port IS NULL) ORDER BY remote_port NULLS LAST",
    )
    by_port = {row["remote_port"]: row for row in rows}

    assert sorted(by_port, key=str) == sorted([server_ports[1], server_ports[2], None],
                                              key=str)
    sampled_row = by_port[server_ports[1]]
    assert sampled_row["detected_by"] == "live"
    assert sampled_row["closed"] is True
    assert unix_seconds(sampled_row["last_seen"]) >= closing_at - 0.005
    assert by_port[server_ports[2]]["closed"] is False
    unseen_row = by_port[None]
    assert unseen_row["detected_by"] == "close_event_abort"
    assert unseen_row["remote_addr"] == "127.0.0.1"
    assert unseen_row["attribution"] == "unseen"
    if source == "netlink":
        # Cookies tell the two aborted sockets apart. Without them, the two
        # close events may have swapped which record each one closed.
        assert sampled_row["cookie"] == sampled_cookie


# Opens COUNT loopback connections one after another: the client aborts the
# even ones, the server the odd ones. REFUSED connects to a closed port, each
# from a socket with SO_LINGER {1, 0}, come first.
ABORT_CONNECTIONS = """
import socket, struct, sys
count, refused = int(sys.argv[1]), int(sys.argv[2])
linger = struct.pack("ii", 1, 0)
closed_port = socket.socket()
closed_port.bind(("127.0.0.1", 0))
for _ in range(refused):
    failing = socket.socket()
    failing.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    try:
        failing.connect(closed_port.getsockname())
    except ConnectionRefusedError:
        pass
    failing.close()
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(128)
for i in range(count):
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    aborting, other = (client, accepted) if i % 2 == 0 else (accepted, client)
    aborting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    aborting.close()
    other.close()
"""


@pytest.mark.parametrize("source", SOURCES)
def test_meter_counts_aborted_connections(source, netns, tmp_path):
    in_netns = ["ip", "netns", "exec", netns]
    collector = Collector(tmp_path, "--interval", "1", "--duration", "2.5",
                          "--source", source, command_prefix=in_netns)
    subprocess.run(
        [*in_netns, sys.executable, "-c", ABORT_CONNECTIONS, "20", "30"],
        check=True, timeout=60,
    )
    collector.wait()

    (row,) = query_json(
        tmp_path,
        "SELECT sum(tcp_active_opens) AS active, sum(tcp_passive_opens) AS passive, "
        "sum(tcp_opens_recorded) AS recorded, max(miss_rate) AS worst "
        "FROM collector_stats",
    )

    assert row["active"] == 20
    assert row["passive"] == 20
    assert row["recorded"] == 40
    assert row["worst"] == 0.0
