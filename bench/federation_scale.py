"""Scaling figures of federated queries, from many in-process agents on loopback.

Each simulated node is an AgentServer in this process, on its own loopback
port, over a data directory of synthetic connections. Node i has the
address 127.2.x.y, which exists only as text in the data: a peers map sends
every such address to 127.0.0.1:<port of node i>, so no traffic leaves
loopback. The entry is a separate `fastsock query --federated` process,
so its peak memory (VmHWM) is its own.

Three experiments:

- chain: nodes 0 -> 1 -> ... -> L-1, a few rows each. The time per extra hop
  is the per-hop latency of the recursion.
- graph: N nodes, node 0 reaches every other through a random tree, and each
  node has OUT_DEGREE random extra outbound peers (so cycles and nodes
  reached by several paths are common). Reports the time, rows, calls and
  entry memory for count(*) (one key column pulled) and SELECT * (all rows).
- star: the entry with many direct peers of many rows each: the rate at
  which the entry takes in rows, and its memory while it does.

All agents share this process and its GIL, so the simulated work of all
nodes is serialized on the cores of one machine. On a real fleet each node
works in parallel, so graph times here are upper bounds.

    python bench/federation_scale.py                # the default sizes
    python bench/federation_scale.py --quick        # small sizes, for a smoke run
    python bench/federation_scale.py --only chain   # one experiment
"""

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))

from fastsock.endpoints import Endpoint  # noqa: E402
from fastsock.federation import NodeSettings  # noqa: E402
from fastsock.flight_server import AgentServer  # noqa: E402
from fastsock.node import node_identity  # noqa: E402
from fastsock.schema import TABLES  # noqa: E402
from fastsock.store import ParquetStore  # noqa: E402

OUT_DEGREE = 2

# The entry's log line with the time of the pull alone, without process start.
PULLED = re.compile(r"pulled (\d+) rows from (\d+) nodes in (\d+) ms")
SERVICE_PORT = 8080
NOW = datetime.now(timezone.utc)


def address(index: int) -> str:
    return f"127.2.{index // 250}.{index % 250 + 1}"


def write_node(data_dir: Path, index: int, peers: list[int], rows: int) -> None:
    """Store one outbound connection per peer, then filler rows up to ``rows``."""
    records = []
    for number, peer in enumerate(peers):
        records.append(_row(index, number, address(peer), SERVICE_PORT))
    for number in range(len(peers), rows):
        # 127.0.9.x is loopback and not in the peers map, so never a peer.
        records.append(_row(index, number, f"127.0.9.{number % 250 + 1}", 9000))

    schema, _key = TABLES["connections"]
    table = pa.Table.from_pylist(records, schema=schema)
    ParquetStore(data_dir).write("connections", table)


def _row(index: int, number: int, remote: str, remote_port: int) -> dict:
    return {
        "host": f"n{index}",
        "conn_id": index * 1_000_000 + number,
        "protocol": "tcp",
        "local_addr": address(index),
        "local_port": 30000 + number % 30000,
        "remote_addr": remote,
        "remote_port": remote_port,
        "state": "ESTABLISHED",
        "pid": 1000 + number % 50,
        "comm": f"svc{number % 20}",
        "exe": f"/usr/bin/svc{number % 20}",
        "cmdline": f"/usr/bin/svc{number % 20} --flag {number}",
        "first_seen": NOW - timedelta(minutes=5),
        "last_seen": NOW,
        "closed": False,
    }


class SimulatedFleet:
    """AgentServers over synthetic data, one per node of an edge list."""

    def __init__(
        self,
        root: Path,
        edges: dict[int, list[int]],
        rows: int,
        entry_rows: "int | None" = None,
    ) -> None:
        self.servers = []
        self.peers = {}
        for index in sorted(edges):
            data_dir = root / f"n{index}"
            own_rows = entry_rows if index == 0 and entry_rows is not None else rows
            write_node(data_dir, index, edges[index], own_rows)
            # The entry process reads n0's data directory too, so it has the
            # node id of n0's agent, as a CLI next to an agent would.
            identity = node_identity(data_dir, f"n{index}")
            server = AgentServer(
                NodeSettings(identity=identity, data_dir=data_dir),
                Endpoint("127.0.0.1", 0),
            )
            self.servers.append(server)
            self.peers[address(index)] = f"127.0.0.1:{server.port}"
        self.root = root

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()


# Runs the CLI and prints its peak resident set (VmHWM, in kB) on exit. VmHWM
# belongs to the process image after exec, unlike ru_maxrss, which also counts
# the pages the child shared with this large process between fork and exec.
ENTRY_WRAPPER = """
import atexit, sys
def report():
    status = open("/proc/self/status").read()
    print("VmHWM", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
atexit.register(report)
sys.argv = ["fastsock", *sys.argv[1:]]
from fastsock.cli import main
main()
"""
PEAK = re.compile(r"^VmHWM (\d+)$", re.M)


def run_entry(
    fleet: SimulatedFleet, sql: str, timeout: float = 600, max_depth: int = 1000
) -> dict:
    """Run `fastsock query --federated` from node 0; return time and peak RSS."""
    peers_file = fleet.root / "peers.json"
    peers_file.write_text(json.dumps(fleet.peers))
    command = [
        sys.executable,
        "-c",
        ENTRY_WRAPPER,
        "--log-level",
        "info",
        "query",
        "--federated",
        "--data-dir",
        str(fleet.root / "n0"),
        "--peers",
        str(peers_file),
        "--timeout",
        str(timeout),
        "--max-depth",
        str(max_depth),
        "--format",
        "json",
        sql,
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started

    if result.returncode != 0:
        raise RuntimeError(f"entry failed:\n{result.stderr}")
    pulled = PULLED.search(result.stderr)
    return {
        "seconds": seconds,
        "pull_seconds": int(pulled.group(3)) / 1000,
        "max_rss_mb": int(PEAK.search(result.stderr).group(1)) / 1024,
        "result": json.loads(result.stdout),
    }


def random_graph(nodes: int, seed: int) -> dict[int, list[int]]:
    """Node 0 reaches all through a random tree; each node adds random peers."""
    rng = random.Random(seed)
    edges = {index: [] for index in range(nodes)}
    for index in range(1, nodes):
        edges[rng.randrange(index)].append(index)
    for index in range(nodes):
        for _ in range(OUT_DEGREE):
            peer = rng.randrange(nodes)
            if peer != index and peer not in edges[index]:
                edges[index].append(peer)
    return edges


def depth_of(edges: dict[int, list[int]]) -> int:
    """Return the largest shortest-path distance from node 0."""
    distance = {0: 0}
    frontier = [0]
    while frontier:
        following = []
        for node in frontier:
            for peer in edges[node]:
                if peer not in distance:
                    distance[peer] = distance[node] + 1
                    following.append(peer)
        frontier = following
    return max(distance.values())


def chain(root: Path, lengths: list[int]) -> None:
    print("chain: SELECT count(*) FROM connections, 10 rows per node")
    for length in lengths:
        edges = {
            index: [index + 1] if index + 1 < length else [] for index in range(length)
        }
        fleet = SimulatedFleet(root / f"chain{length}", edges, rows=10)
        try:
            run_entry(fleet, "SELECT 1")  # warm the page cache and imports
            figures = run_entry(fleet, "SELECT count(*) AS n FROM connections")
        finally:
            fleet.close()
        print(
            f"  length {length:4d}: pull {figures['pull_seconds']:6.3f} s "
            f"(process {figures['seconds']:5.2f} s), rows {figures['result'][0]['n']}, "
            f"entry RSS {figures['max_rss_mb']:.0f} MB"
        )


def graph(root: Path, sizes: list[int], rows: int) -> None:
    print(f"graph: random, out-degree {OUT_DEGREE} plus a tree, {rows} rows per node")
    for nodes in sizes:
        edges = random_graph(nodes, seed=nodes)
        calls = sum(len(peers) for peers in edges.values())
        fleet = SimulatedFleet(root / f"graph{nodes}", edges, rows=rows)
        try:
            count = run_entry(fleet, "SELECT count(*) AS n FROM connections")
            everything = run_entry(fleet, "SELECT * FROM connections")
            reached = run_entry(
                fleet, "SELECT count(*) AS n FROM federation_nodes WHERE reached"
            )
        finally:
            fleet.close()
        print(
            f"  {nodes:5d} nodes, depth {depth_of(edges)}, {calls} edges: "
            f"count(*) pull {count['pull_seconds']:6.2f} s "
            f"(entry RSS {count['max_rss_mb']:.0f} MB), "
            f"SELECT * pull {everything['pull_seconds']:6.2f} s "
            f"({len(everything['result'])} rows, entry RSS "
            f"{everything['max_rss_mb']:.0f} MB), "
            f"nodes reached {reached['result'][0]['n']}"
        )


def star(root: Path, peers: int, rows: int) -> None:
    edges = {0: list(range(1, peers + 1))}
    edges.update({index: [] for index in range(1, peers + 1)})
    # The entry stores only its peer connections, so its peak memory is that
    # of taking in the peers' rows, not of reading a large table of its own.
    fleet = SimulatedFleet(root / "star", edges, rows=rows, entry_rows=peers)
    try:
        figures = run_entry(
            fleet, "SELECT count(*) AS n, count(DISTINCT cmdline) AS c FROM connections"
        )
    finally:
        fleet.close()
    total = figures["result"][0]["n"]
    seconds = figures["pull_seconds"]
    print(
        f"star: {peers} peers x {rows} rows: {total} rows pulled in {seconds:.2f} s "
        f"({total / seconds:,.0f} rows/s), entry RSS {figures['max_rss_mb']:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument(
        "--only",
        choices=["chain", "graph", "star"],
        help="run one experiment; default: all three",
    )
    args = parser.parse_args()
    run = {args.only} if args.only else {"chain", "graph", "star"}

    # Each agent opens sockets and pipes, so raise the soft limit on open files.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="fastsock-bench-") as directory:
        root = Path(directory)
        quick = args.quick
        if "chain" in run:
            chain(root, [2, 4] if quick else [2, 8, 16, 32])
        if "graph" in run:
            graph(
                root,
                [10] if quick else [25, 50, 100, 200],
                rows=100 if quick else 1_000,
            )
        if "star" in run:
            star(root, 4 if quick else 16, 10_000 if quick else 100_000)


if __name__ == "__main__":
    main()
