"""Both socket sources against `ss`, on loopback sockets the tests open."""

import os
import re
import shutil
import socket
import subprocess

import pytest

from fastsock.netlink import read_netlink_tables
from fastsock.snapshot import Snapshotter
from fastsock.sockets import TableReport, read_socket_tables

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")

# `ss` prints states with dashes and its own names for a few of them.
SS_STATES = {
    "ESTAB": "ESTABLISHED",
    "SYN-SENT": "SYN_SENT",
    "SYN-RECV": "SYN_RECV",
    "FIN-WAIT-1": "FIN_WAIT1",
    "FIN-WAIT-2": "FIN_WAIT2",
    "TIME-WAIT": "TIME_WAIT",
    "CLOSE-WAIT": "CLOSE_WAIT",
    "LAST-ACK": "LAST_ACK",
    "LISTEN": "LISTEN",
    "CLOSING": "CLOSING",
    "UNCONN": "UNCONN",
}


def split_endpoint(text: str) -> tuple[str, int]:
    """Split ss's 'ADDR:PORT' (IPv6 in brackets, maybe with %iface) into parts."""
    address, _, port = text.rpartition(":")
    address = address.strip("[]").split("%")[0]
    if address.startswith("::ffff:") and "." in address:
        address = address[len("::ffff:") :]
    if address == "*":
        address = None
    return address, int(port) if port != "*" else 0


def ss_sockets(protocol: str) -> list[dict]:
    """Return every socket that `ss -H -a -n -e` lists for tcp or udp."""
    flag = "-t" if protocol == "tcp" else "-u"
    output = subprocess.run(
        ["ss", "-H", "-a", "-n", "-e", flag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sockets = []
    for line in output.splitlines():
        fields = line.split()
        local_addr, local_port = split_endpoint(fields[3])
        remote_addr, remote_port = split_endpoint(fields[4])
        inode = re.search(r"\bino:(\d+)", line)
        sockets.append(
            {
                "state": SS_STATES.get(fields[0], fields[0]),
                "local_addr": local_addr,
                "local_port": local_port,
                "remote_addr": remote_addr,
                "remote_port": remote_port,
                "inode": int(inode.group(1)) if inode else 0,
            }
        )
    return sockets


def open_tcp_pair(address: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((address, 0))
    server.listen()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.fixture
def loopback_sockets():
    """Open TCP over IPv4 and IPv6, a connected UDP socket and a UDP server."""
    opened = []
    for address in ("127.0.0.1", "::1"):
        opened.extend(open_tcp_pair(address))
    udp_server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp_server.bind(("::1", 0))
    udp_client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_client.connect(("127.0.0.1", 9))
    opened += [udp_server, udp_client]
    yield opened
    for sock in opened:
        sock.close()


def inodes_of(sockets) -> set[int]:
    return {os.fstat(sock.fileno()).st_ino for sock in sockets}


def rows_by_inode(table, inodes: set[int]) -> dict[int, dict]:
    rows = {}
    for row in table.to_pylist():
        if row["inode"] in inodes:
            rows[row["inode"]] = row
    return rows


def read_proc_source():
    return read_socket_tables("/proc", TableReport())


def read_netlink_source():
    return read_netlink_tables()


@needs_ss
@pytest.mark.parametrize("read", [read_proc_source, read_netlink_source])
def test_source_matches_ss(read, loopback_sockets):
    inodes = inodes_of(loopback_sockets)
    table = read()
    ss_rows = {
        row["inode"]: row for protocol in ("tcp", "udp") for row in ss_sockets(protocol)
    }
    found = rows_by_inode(table, inodes)

    assert set(found) == inodes
    for inode, row in found.items():
        expected = ss_rows[inode]
        assert row["state"] == expected["state"], row
        assert row["local_port"] == expected["local_port"], row
        assert row["remote_port"] == expected["remote_port"], row
        assert row["local_addr"] == expected["local_addr"], row
        if expected["remote_addr"] is not None:
            assert row["remote_addr"] == expected["remote_addr"], row


def test_netlink_and_proc_list_same_sockets(loopback_sockets):
    inodes = inodes_of(loopback_sockets)
    columns = ["protocol", "family", "socket_family", "local_addr", "local_port",
               "remote_addr", "remote_port", "state", "inode"]

    from_proc = rows_by_inode(read_proc_source().select(columns), inodes)
    from_netlink = rows_by_inode(read_netlink_source().select(columns), inodes)

    assert from_netlink == from_proc


def test_netlink_counts_bytes_of_tcp(loopback_sockets):
    _server, client, accepted = loopback_sockets[:3]
    client.sendall(b"x" * 5000)
    received = 0
    while received < 5000:
        received += len(accepted.recv(65536))

    rows = rows_by_inode(read_netlink_source(), inodes_of([client, accepted]))
    sent = rows[os.fstat(client.fileno()).st_ino]
    got = rows[os.fstat(accepted.fileno()).st_ino]

    assert sent["bytes_acked"] >= 5000
    assert got["bytes_received"] >= 5000
    assert sent["rtt_us"] is not None
    assert sent["retransmits"] == 0
    assert sent["cookie"] != got["cookie"]


def test_netlink_leaves_udp_counters_null(loopback_sockets):
    udp_client = loopback_sockets[-1]
    rows = rows_by_inode(read_netlink_source(), inodes_of([udp_client]))
    (row,) = rows.values()

    assert row["protocol"] == "udp"
    assert row["state"] == "ESTABLISHED"
    assert row["cookie"] is not None
    assert row["bytes_acked"] is None
    assert row["rtt_us"] is None


def test_netlink_snapshot_attributes_owner(peers):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-nl-srv")
    client = peers("client", "--connect", "127.0.0.1", str(server.info["port"]),
                   "--name", "fs-nl-cli")

    table = Snapshotter(source="netlink").take()
    rows = [row for row in table.to_pylist() if row["inode"] in client.info["inodes"]]

    (row,) = rows
    assert row["pid"] == client.pid
    assert row["comm"] == "fs-nl-cli"
    assert row["remote_port"] == server.info["port"]


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="unknown socket source 'ebpf'"):
        Snapshotter(source="ebpf")
