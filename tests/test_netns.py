"""`collect --all-netns` across two network namespaces joined by a veth pair."""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from harness import query_json, run_fastsock
from special_peers import launch  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="creating network namespaces needs root and the ip command (iproute2)",
)


@dataclass
class NamespacePair:
    """Two namespaces; a has address_a and b has address_b on one veth link."""

    a: str
    b: str
    address_a: str
    address_b: str

    def inode(self, name: str) -> int:
        return os.stat(f"/run/netns/{name}").st_ino


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespace_pair():
    """Create two namespaces with a veth pair between them; delete both after."""
    tag = f"{os.getpid() % 100000}"
    pair = NamespacePair(f"fsc-a-{tag}", f"fsc-b-{tag}", "10.231.7.1", "10.231.7.2")
    created = []
    try:
        for name in (pair.a, pair.b):
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", f"fsca{tag}", "type", "veth", "peer", "name", f"fscb{tag}")
        ip("link", "set", f"fsca{tag}", "netns", pair.a)
        ip("link", "set", f"fscb{tag}", "netns", pair.b)
        for name, device, address in (
            (pair.a, f"fsca{tag}", pair.address_a),
            (pair.b, f"fscb{tag}", pair.address_b),
        ):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", device)
            ip("-n", name, "link", "set", device, "up")
        yield pair
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def collect_all(data_dir, *extra: str):
    run_fastsock(
        "collect",
        "--quiet",
        "--no-close-events",
        "--interval",
        "0.1",
        "--duration",
        "0.8",
        "--data-dir",
        str(data_dir),
        *extra,
    )


def test_server_and_client_in_two_namespaces(namespace_pair, launch, tmp_path):
    pair = namespace_pair
    server = launch(
        "peers.py", "server", "--bind", "0.0.0.0", "--name", "fs-ns-srv", netns=pair.a
    )
    port = str(server.info["port"])
    client = launch(
        "peers.py",
        "client",
        "--connect",
        pair.address_a,
        port,
        "--count",
        "2",
        "--name",
        "fs-ns-cli",
        netns=pair.b,
    )
    # Bound in b to the port that a's wildcard listener serves: outbound, because
    # a listener covers only its own namespace.
    collider = launch(
        "special_peers.py",
        "bound-client",
        "--bind",
        pair.address_b,
        "--port",
        port,
        "--connect",
        pair.address_a,
        port,
        "--name",
        "fs-ns-collide",
        netns=pair.b,
    )

    collect_all(tmp_path, "--all-netns")

    accepted = query_json(
        tmp_path, f"SELECT * FROM connections WHERE pid = {server.pid}"
    )
    assert len(accepted) == 3
    for row in accepted:
        assert row["netns"] == pair.inode(pair.a)
        assert row["direction"] == "inbound"
        assert row["local_addr"] == pair.address_a
    outgoing = query_json(
        tmp_path,
        f"SELECT * FROM connections WHERE pid IN ({client.pid}, {collider.pid})",
    )
    assert len(outgoing) == 3
    for row in outgoing:
        assert row["netns"] == pair.inode(pair.b)
        assert row["direction"] == "outbound"
        assert row["remote_addr"] == pair.address_a
    (listener,) = query_json(
        tmp_path, f"SELECT * FROM listeners WHERE pid = {server.pid}"
    )
    assert listener["netns"] == pair.inode(pair.a)


def test_default_reads_own_namespace_only(namespace_pair, launch, tmp_path):
    pair = namespace_pair
    server = launch(
        "peers.py", "server", "--bind", "127.0.0.1", "--name", "fs-ns-own", netns=pair.a
    )
    launch(
        "peers.py",
        "client",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        netns=pair.a,
    )

    collect_all(tmp_path)

    rows = query_json(
        tmp_path, f"SELECT count(*) AS n FROM listeners WHERE pid = {server.pid}"
    )
    assert rows == [{"n": 0}]
    namespaces = query_json(tmp_path, "SELECT DISTINCT netns FROM listeners")
    assert namespaces == [{"netns": os.stat("/proc/self/ns/net").st_ino}]


def test_same_four_tuple_in_two_namespaces(namespace_pair, launch, tmp_path):
    pair = namespace_pair
    pids = []
    for name in (pair.a, pair.b):
        launch(
            "peers.py", "server", "--bind", "127.0.0.1", "--port", "47611", netns=name
        )
        client = launch(
            "special_peers.py",
            "bound-client",
            "--bind",
            "127.0.0.1",
            "--port",
            "47612",
            "--connect",
            "127.0.0.1",
            "47611",
            "--name",
            "fs-ns-twin",
            netns=name,
        )
        pids.append(client.pid)

    collect_all(tmp_path, "--all-netns")

    rows = query_json(
        tmp_path,
        "SELECT conn_id, netns, direction FROM connections WHERE local_port = 47612 "
        "AND remote_port = 47611 AND local_addr = '127.0.0.1'",
    )
    assert sorted(row["netns"] for row in rows) == sorted(
        [pair.inode(pair.a), pair.inode(pair.b)]
    )
    assert len({row["conn_id"] for row in rows}) == 2
    assert {row["direction"] for row in rows} == {"outbound"}


def test_namespace_reader_finds_both(namespace_pair, launch):
    from fastsock.netns import find_namespaces

    pair = namespace_pair
    launch("peers.py", "server", "--bind", "127.0.0.1", netns=pair.a)
    launch("peers.py", "server", "--bind", "127.0.0.1", netns=pair.b)

    own = os.stat("/proc/self/ns/net").st_ino
    found = {namespace.inode for namespace in find_namespaces("/proc", own)}

    assert {own, pair.inode(pair.a), pair.inode(pair.b)} <= found


def run_in_namespace(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run the fastsock command line inside namespace name."""
    result = subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, "-m", "fastsock", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result
