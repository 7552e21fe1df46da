"""Direction of connections: live loopback topologies, then fixture proc trees.

The live topologies are all started before one `fastsock collect` run, so every
connection in them was already open when collection started.
"""

import socket
import sys
import time

import pytest

from fastsock.collector import Collector
from fastsock.query import run_query
from fastsock.snapshot import Snapshotter
from fastsock.store import ParquetStore
from harness import query_json, run_fastsock
from proctree import build_proc_tree
from special_peers import Process

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)
UDP_HEADER = (
    "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode ref pointer drops\n"
)
LISTEN, ESTABLISHED, SYN_SENT, UNCONN = 0x0A, 0x01, 0x02, 0x07


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """Start every live case, collect once, and return (data dir, processes)."""
    started = {}

    def start(label, script, *args):
        started[label] = Process(script, *args)
        return started[label]

    try:
        specific = start(
            "specific",
            "peers.py",
            "server",
            "--bind",
            "127.0.0.2",
            "--name",
            "fs-d-specific",
        )
        start(
            "specific_client",
            "peers.py",
            "client",
            "--connect",
            "127.0.0.2",
            str(specific.info["port"]),
            "--name",
            "fs-d-spec-cli",
        )
        wildcard = start(
            "wildcard", "peers.py", "server", "--bind", "0.0.0.0", "--name", "fs-d-wild"
        )
        start(
            "wildcard_client",
            "peers.py",
            "client",
            "--connect",
            "127.0.0.1",
            str(wildcard.info["port"]),
            "--count",
            "2",
            "--name",
            "fs-d-wild-cli",
        )
        # Bound to the port of the 127.0.0.2 listener, on an address it does not
        # cover: an outbound connection despite the port.
        start(
            "collider",
            "special_peers.py",
            "bound-client",
            "--bind",
            "127.0.0.3",
            "--port",
            str(specific.info["port"]),
            "--connect",
            "127.0.0.1",
            str(wildcard.info["port"]),
            "--name",
            "fs-d-collide",
        )
        dual = start(
            "dual",
            "peers.py",
            "server",
            "--bind",
            "::",
            "--dual-stack",
            "--name",
            "fs-d-dual",
        )
        start(
            "dual_client",
            "peers.py",
            "client",
            "--connect",
            "127.0.0.1",
            str(dual.info["port"]),
            "--name",
            "fs-d-dual-cli",
        )
        loop6 = start(
            "loop6", "peers.py", "server", "--bind", "::1", "--name", "fs-d-loop6"
        )
        start(
            "loop6_client",
            "peers.py",
            "client",
            "--connect",
            "::1",
            str(loop6.info["port"]),
            "--name",
            "fs-d-loop6-cli",
        )
        first = start(
            "reuse_a", "peers.py", "server", "--reuseport", "--name", "fs-d-reuse-a"
        )
        start(
            "reuse_b",
            "peers.py",
            "server",
            "--reuseport",
            "--port",
            str(first.info["port"]),
            "--name",
            "fs-d-reuse-b",
        )
        start(
            "reuse_client",
            "peers.py",
            "client",
            "--connect",
            "127.0.0.1",
            str(first.info["port"]),
            "--count",
            "16",
            "--name",
            "fs-d-reuse-cli",
        )
        forked = start(
            "forked",
            "special_peers.py",
            "forking-server",
            "--workers",
            "3",
            "--name",
            "fs-d-fork",
        )
        start(
            "forked_client",
            "peers.py",
            "client",
            "--connect",
            "127.0.0.1",
            str(forked.info["port"]),
            "--count",
            "6",
            "--name",
            "fs-d-fork-cli",
        )
        udp = start("udp", "peers.py", "server", "--proto", "udp", "--name", "fs-d-udp")
        start(
            "udp_client",
            "peers.py",
            "client",
            "--proto",
            "udp",
            "--connect",
            "127.0.0.1",
            str(udp.info["port"]),
            "--name",
            "fs-d-udp-cli",
        )

        # Let the forked workers accept before the first sample.
        time.sleep(0.3)
        data = tmp_path_factory.mktemp("direction")
        run_fastsock(
            "collect",
            "--quiet",
            "--no-close-events",
            "--interval",
            "0.1",
            "--duration",
            "1",
            "--data-dir",
            str(data),
        )
        yield data, started
    finally:
        for process in reversed(list(started.values())):
            process.stop()


def connections_of(data, pid):
    return query_json(data, f"SELECT * FROM connections WHERE pid = {pid}")


def directions_of(data, pid):
    return sorted(row["direction"] for row in connections_of(data, pid))


def test_specific_address_listener(topology):
    data, peers = topology

    assert directions_of(data, peers["specific"].pid) == ["inbound"]
    assert directions_of(data, peers["specific_client"].pid) == ["outbound"]


def test_port_collision_on_uncovered_address(topology):
    data, peers = topology

    (row,) = connections_of(data, peers["collider"].pid)
    assert row["local_addr"] == "127.0.0.3"
    assert row["local_port"] == peers["specific"].info["port"]
    assert row["direction"] == "outbound"


def test_wildcard_ipv4_listener(topology):
    data, peers = topology
    accepted = connections_of(data, peers["wildcard"].pid)

    # Two connections of wildcard_client and one of the collider.
    assert sorted(row["direction"] for row in accepted) == ["inbound"] * 3
    assert {row["local_addr"] for row in accepted} == {"127.0.0.1"}
    assert directions_of(data, peers["wildcard_client"].pid) == ["outbound"] * 2


def test_dual_stack_listener_ipv4_client(topology):
    data, peers = topology

    (accepted,) = connections_of(data, peers["dual"].pid)
    assert accepted["family"] == "inet"
    assert accepted["socket_family"] == "inet6"
    assert accepted["direction"] == "inbound"
    assert directions_of(data, peers["dual_client"].pid) == ["outbound"]


def test_ipv6_loopback_listener(topology):
    data, peers = topology

    (accepted,) = connections_of(data, peers["loop6"].pid)
    assert accepted["local_addr"] == "::1"
    assert accepted["direction"] == "inbound"
    assert directions_of(data, peers["loop6_client"].pid) == ["outbound"]


def test_reuseport_listeners_keep_owners(topology):
    data, peers = topology
    first = directions_of(data, peers["reuse_a"].pid)
    second = directions_of(data, peers["reuse_b"].pid)

    assert len(first) + len(second) == 16
    assert first and second, "the kernel spread 16 connections over one listener"
    assert set(first) == {"inbound"}
    assert set(second) == {"inbound"}
    assert directions_of(data, peers["reuse_client"].pid) == ["outbound"] * 16


def test_forked_listener_workers(topology):
    data, peers = topology
    workers = peers["forked"].info["workers"]
    accepted = query_json(
        data,
        f"SELECT pid, direction FROM connections "
        f"WHERE pid IN ({', '.join(map(str, workers))})",
    )
    (listener,) = query_json(
        data, f"SELECT pids FROM listeners WHERE pid = {peers['forked'].pid}"
    )

    assert sorted(listener["pids"]) == sorted([peers["forked"].pid, *workers])
    assert len(accepted) == 6
    assert {row["direction"] for row in accepted} == {"inbound"}
    assert not connections_of(data, peers["forked"].pid)


def test_connected_udp_is_outbound(topology):
    data, peers = topology

    (connected,) = connections_of(data, peers["udp_client"].pid)
    assert connected["protocol"] == "udp"
    assert connected["direction"] == "outbound"
    (unconnected,) = query_json(
        data, f"SELECT state FROM listeners WHERE pid = {peers['udp'].pid}"
    )
    assert unconnected["state"] == "UNCONN"


def test_connections_open_before_collect(topology):
    data, peers = topology
    (first_sample,) = query_json(data, "SELECT min(first_seen) AS t FROM connections")
    rows = connections_of(data, peers["wildcard_client"].pid)

    assert {row["first_seen"] for row in rows} == {first_sample["t"]}
    assert {row["direction"] for row in rows} == {"outbound"}


# Fixture proc trees: the tables change between samples of the library API.


def hex_endpoint(address: str, port: int) -> str:
    raw = socket.inet_aton(address)
    if sys.byteorder == "little":
        raw = raw[::-1]
    return f"{raw.hex().upper()}:{port:04X}"


def tcp_row(slot, local, remote, state, inode) -> str:
    return (
        f"{slot:4d}: {hex_endpoint(*local)} {hex_endpoint(*remote)} {state:02X} "
        f"00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 "
        f"0000000000000000 20 4 30 10 -1\n"
    )


def udp_row(slot, local, remote, state, inode) -> str:
    return (
        f"{slot:5d}: {hex_endpoint(*local)} {hex_endpoint(*remote)} {state:02X} "
        f"00000000:00000000 00:00000000 00000000  1000        0 {inode} 2 "
        f"0000000000000000 0\n"
    )


class TreeCollector:
    """A Collector over a fixture proc tree whose tables a test rewrites."""

    def __init__(self, tmp_path):
        self.root = build_proc_tree(
            tmp_path / "proc",
            {"processes": []},
            net={"tcp": TCP_HEADER, "udp": UDP_HEADER},
        )
        self.data = tmp_path / "data"
        self.collector = Collector(Snapshotter(self.root), ParquetStore(self.data))

    def sample(self, tcp=(), udp=()):
        (self.root / "net" / "tcp").write_text(TCP_HEADER + "".join(tcp))
        (self.root / "net" / "udp").write_text(UDP_HEADER + "".join(udp))
        self.collector.sample()
        time.sleep(0.002)

    def directions(self) -> dict[int, str]:
        self.collector.flush()
        rows = run_query(self.data, "SELECT inode, direction FROM connections")
        return dict(
            zip(rows.column("inode").to_pylist(), rows.column("direction").to_pylist())
        )


SERVER = ("127.0.0.1", 8080)
CLIENT = ("127.0.0.1", 50000)
WILDCARD = ("0.0.0.0", 0)


def test_listener_sampled_after_connection(tmp_path):
    tree = TreeCollector(tmp_path)
    accepted = tcp_row(1, SERVER, ("10.9.9.9", 1234), ESTABLISHED, 501)

    tree.sample(tcp=[accepted])
    before = tree.directions()
    tree.sample(tcp=[tcp_row(0, (SERVER[0], 8080), WILDCARD, LISTEN, 500), accepted])
    after = tree.directions()

    assert before[501] == "unknown"
    assert after[501] == "inbound"


def test_listener_closed_since(tmp_path):
    tree = TreeCollector(tmp_path)
    accepted = tcp_row(1, SERVER, ("10.9.9.9", 1234), ESTABLISHED, 501)

    tree.sample(tcp=[tcp_row(0, SERVER, WILDCARD, LISTEN, 500), accepted])
    tree.sample(tcp=[accepted])
    tree.sample(tcp=[accepted])

    assert tree.directions()[501] == "inbound"


def test_port_reused_after_listener_closed(tmp_path):
    tree = TreeCollector(tmp_path)
    listener = tcp_row(0, ("0.0.0.0", 40000), WILDCARD, LISTEN, 500)
    reused = tcp_row(1, ("127.0.0.1", 40000), ("10.9.9.9", 443), ESTABLISHED, 502)

    tree.sample(tcp=[listener])
    tree.sample()
    tree.sample(tcp=[reused])

    assert tree.directions()[502] == "outbound"


def test_first_sample_fixed_port_unknown(tmp_path):
    tree = TreeCollector(tmp_path)

    tree.sample(tcp=[tcp_row(1, SERVER, ("10.9.9.9", 1234), ESTABLISHED, 501)])

    assert tree.directions()[501] == "unknown"


def test_later_sample_without_listener_outbound(tmp_path):
    tree = TreeCollector(tmp_path)

    tree.sample()
    tree.sample(tcp=[tcp_row(1, SERVER, ("10.9.9.9", 1234), ESTABLISHED, 501)])

    assert tree.directions()[501] == "outbound"


def test_syn_sent_outbound(tmp_path):
    tree = TreeCollector(tmp_path)

    tree.sample(tcp=[tcp_row(1, SERVER, ("10.9.9.9", 1234), SYN_SENT, 501)])

    assert tree.directions()[501] == "outbound"


def test_listener_of_other_address_not_covering(tmp_path):
    tree = TreeCollector(tmp_path)

    tree.sample(
        tcp=[
            tcp_row(0, ("127.0.0.2", 8080), WILDCARD, LISTEN, 500),
            tcp_row(1, SERVER, ("10.9.9.9", 1234), ESTABLISHED, 501),
        ]
    )

    assert tree.directions()[501] == "unknown"


def test_udp_on_server_port_inbound(tmp_path):
    tree = TreeCollector(tmp_path)

    tree.sample(
        udp=[
            udp_row(0, ("0.0.0.0", 5353), WILDCARD, UNCONN, 600),
            udp_row(1, ("127.0.0.1", 5353), ("127.0.0.1", 41000), ESTABLISHED, 601),
            udp_row(2, ("127.0.0.1", 41000), ("127.0.0.1", 9999), ESTABLISHED, 602),
        ]
    )
    directions = tree.directions()

    assert directions[601] == "inbound"
    assert directions[602] == "outbound"
