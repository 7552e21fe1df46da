"""Dependencies of a service, from the flows table: ``fastsock deps`` as a library.

deps() reads the flows and listeners of a data directory and builds the graph
(fastsock.depgraph). It then resolves a target to nodes: an address,
address:port, a process name or a pid. Each node's edges are expanded to a depth,
inbound edges towards clients and outbound edges towards servers.
dependency_tree() does the same on a graph built from rows of any source.
"""

import difflib
import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from fastsock.addresses import (
    WILDCARDS,
    address_part,
    canonical_address,
    format_endpoint,
    is_address,
    out_of_range_port,
    parse_endpoint,
)
from fastsock.depgraph import (
    DependencyGraph,
    DependencyTree,
    Node,
    build_graph,
    node_sort_key,
)
from fastsock.errors import FastsockError, NoDataError
from fastsock.timespec import InvalidTimeError, parse_time

__all__ = [
    "DependencyTree",
    "InvalidTimeError",
    "UnknownTargetError",
    "build_graph",
    "dependency_tree",
    "deps",
    "find_targets",
    "load_tables",
    "parse_endpoint",
    "parse_time",
]

DIRECTIONS = ("in", "out", "both")
DEFAULT_DEPTH = 2


class UnknownTargetError(FastsockError, LookupError):
    """No node of the graph matches the requested target."""


def find_targets(graph: DependencyGraph, target: str) -> list[Node]:
    """Return the nodes that target names, or raise UnknownTargetError.

    target is a pid, an address:port (``[::1]:8080`` for IPv6), an address, or a
    process name (comm, or the file name of the executable).
    """
    nodes = graph.nodes
    bad_port = out_of_range_port(target)
    if bad_port is not None:
        raise UnknownTargetError(
            f"invalid port {bad_port} in {target!r}; ports run from 0 to 65535"
        )
    endpoint = parse_endpoint(target)
    if target.isdigit():
        pid = int(target)
        found = [node for node in nodes if pid in graph.pids.get(node, ())]
    elif endpoint is not None:
        found = _serving(graph, *endpoint)
    elif is_address(target):
        address = canonical_address(target)
        found = [
            node
            for node in nodes
            if address in graph.local_addresses.get(node, ())
            or (node.address is not None and address_part(node.address) == address)
        ]
    else:
        found = [
            node
            for node in nodes
            if node.comm == target
            or target in {os.path.basename(exe) for exe in graph.exes.get(node, ())}
        ]

    if not found:
        raise UnknownTargetError(_unknown_target_message(graph, target))
    return found


def _serving(graph: DependencyGraph, address: str, port: int) -> list[Node]:
    servers = {
        edge.server
        for edge in graph.edges.values()
        if edge.server_addr == address and edge.server_port == port
    }
    for (
        _host,
        _netns,
        _protocol,
        listen_port,
    ), entries in graph.listener_nodes.items():
        if listen_port != port:
            continue
        for listener_addr, node in entries:
            if listener_addr == address or (
                listener_addr in WILDCARDS
                and address in graph.local_addresses.get(node, ())
            ):
                servers.add(node)
    return sorted(servers, key=node_sort_key)


def _unknown_target_message(graph: DependencyGraph, target: str) -> str:
    candidates = set()
    for node in graph.nodes:
        if node.comm:
            candidates.add(node.comm)
        if node.address:
            candidates.add(node.address)
        candidates.update(str(pid) for pid in graph.pids.get(node, ()))
        candidates.update(graph.local_addresses.get(node, ()))
    for edge in graph.edges.values():
        candidates.add(format_endpoint(edge.server_addr, edge.server_port))

    close = difflib.get_close_matches(target, sorted(candidates), n=5, cutoff=0.5)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else "run `fastsock deps` without a target to list every service"
    )
    return (
        f"no process name, pid, address or address:port in the flows matches "
        f"{target!r}; {hint}"
    )


def deps(
    data_dir: "str | os.PathLike[str]",
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    depth: int = DEFAULT_DEPTH,
    direction: str = "both",
) -> DependencyTree:
    """Return the dependency tree of target, or of every service, from a data dir.

    Raises NoDataError when data_dir has no flows in the window and
    UnknownTargetError when target matches nothing.
    """
    check_window(since, until)
    flows, listeners = load_tables(data_dir, since, until)
    graph = build_graph(flows, listeners)
    return dependency_tree(graph, target, depth, direction, since, until)


def dependency_tree(
    graph: DependencyGraph,
    target: str | None,
    depth: int = DEFAULT_DEPTH,
    direction: str = "both",
    since: datetime | None = None,
    until: datetime | None = None,
) -> DependencyTree:
    """Expand the nodes that target names (every process node without one)."""
    if direction not in DIRECTIONS:
        raise ValueError(
            f"invalid direction {direction!r}; use one of {', '.join(DIRECTIONS)}"
        )
    if depth < 1:
        raise ValueError(f"invalid depth {depth}; use 1 or more")

    if target is None:
        roots = [node for node in graph.nodes if node.is_process and node.service]
    else:
        roots = find_targets(graph, target)
    trees = [graph.tree(root, depth, direction) for root in roots]
    return DependencyTree(trees, depth, direction, since, until, graph.hosts)


def load_tables(
    data_dir: "str | os.PathLike[str]",
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[pa.Table, pa.Table | None]:
    """Read the flows and listeners of data_dir that overlap [since, until].

    Raises NoDataError when data_dir has no flows table or none in the window.
    """
    from fastsock.query import open_database, tables_with_files

    root = Path(data_dir)
    present = tables_with_files(root)
    if "flows" not in present:
        raise NoDataError(
            f"no flows in {root}; record some with `fastsock collect --data-dir {root}`"
        )

    where, parameters = _window_sql(since, until)
    connection = open_database(root)
    try:
        flows = connection.sql(
            f"SELECT * EXCLUDE (date, hour) FROM flows {where}", params=parameters
        ).to_arrow_table()
        listeners = None
        if "listeners" in present:
            listeners = connection.sql(
                f"SELECT host, netns, protocol, local_addr, local_port, pid, comm, "
                f"exe, cmdline FROM listeners {where}",
                params=parameters,
            ).to_arrow_table()
    finally:
        connection.close()

    if flows.num_rows == 0:
        raise NoDataError(f"no flows in {root} between {_window_text(since, until)}")
    return flows, listeners


def _window_sql(since, until) -> tuple[str, list]:
    conditions, parameters = [], []
    if since is not None:
        conditions.append("last_seen >= ?")
        parameters.append(since)
    if until is not None:
        conditions.append("first_seen <= ?")
        parameters.append(until)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return where, parameters


def check_window(since, until) -> None:
    """Raise ValueError when the window ends before it starts."""
    if since is not None and until is not None and since > until:
        raise ValueError(
            f"invalid window: --since {since.isoformat()} is after --until "
            f"{until.isoformat()}; swap them"
        )


def window_condition(since, until) -> str:
    """Return the WHERE clause of the window with literal UTC timestamps.

    Federated queries carry their SQL to other nodes as text, so the window
    cannot be a bound parameter there.
    """
    conditions = []
    if since is not None:
        conditions.append(f"last_seen >= TIMESTAMPTZ '{since.isoformat()}'")
    if until is not None:
        conditions.append(f"first_seen <= TIMESTAMPTZ '{until.isoformat()}'")
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def _window_text(since, until) -> str:
    start = since.isoformat() if since else "the first record"
    end = until.isoformat() if until else "the last record"
    return f"{start} and {end}"
