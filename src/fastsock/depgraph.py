"""The dependency graph of services, built from flows rows.

A node is a service on one host and network namespace: the service key of the
flows (exe and cmdline), which stays the same across restarts. An edge joins a
client to a server endpoint (address and port). A client's outbound flows are
matched to the server's inbound flows, then to a listener, on the host that owns
the address. A peer that no host in the data owns is an address node.

build_graph works on Arrow tables, so rows read from a local data directory and
rows gathered from elsewhere take the same path.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa

from fastsock.addresses import WILDCARDS, format_endpoint, is_loopback
from fastsock.flows import service_keys

# Columns that define one aggregated flow row in the graph.
FLOW_KEYS = [
    "host",
    "netns",
    "service",
    "comm",
    "exe",
    "direction",
    "protocol",
    "local_addr",
    "local_port",
    "remote_addr",
    "remote_port",
]


@dataclass(frozen=True)
class Node:
    """A service on one host and namespace, or a peer address outside the data.

    service and comm are NULL for connections without a process (TIME_WAIT
    detections, close events of unseen sockets). Such a node is named by its
    local endpoint, so unrelated connections without a process do not merge
    into one node. address is set only for a peer that no host in the data
    owns.
    """

    host: str | None = None
    netns: int | None = None
    service: str | None = None
    comm: str | None = None
    address: str | None = None
    endpoint: str | None = None

    @property
    def is_process(self) -> bool:
        return self.address is None

    @property
    def has_process(self) -> bool:
        """Return whether the node is a known process."""
        return self.is_process and (self.service is not None or self.comm is not None)


@dataclass
class Edge:
    """Connections from a client node to one server endpoint of a server node.

    client_connections and server_connections are the connections opened as
    each side's flows count them, None when that side has no flows. Each side
    can miss connections that lived less than a sample, and a client of several
    SO_REUSEPORT servers counts them together, so ``connections`` prefers the
    server's count.
    """

    client: Node
    server: Node
    protocol: str
    server_addr: str
    server_port: int | None
    client_addr: str | None = None
    client_connections: int | None = None
    server_connections: int | None = None
    max_concurrent: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None

    @property
    def connections(self) -> int:
        if self.server_connections is not None:
            return self.server_connections
        return self.client_connections or 0

    @property
    def key(self) -> tuple:
        return (
            self.client,
            self.server,
            self.protocol,
            self.server_addr,
            self.server_port,
        )


@dataclass
class TreeNode:
    """A node of the dependency tree; repeated is True for a cycle, not expanded."""

    node: Node
    pids: list[int]
    inbound: list["TreeBranch"] = field(default_factory=list)
    outbound: list["TreeBranch"] = field(default_factory=list)
    unknown: list[dict] = field(default_factory=list)
    repeated: bool = False


@dataclass
class TreeBranch:
    edge: Edge
    peer: TreeNode


@dataclass
class DependencyTree:
    """The result of deps(): one tree per target node, and what was asked."""

    roots: list[TreeNode]
    depth: int
    direction: str
    since: datetime | None
    until: datetime | None
    hosts: list[str]


class DependencyGraph:
    """Nodes and edges built from aggregated flows (see build_graph)."""

    def __init__(self) -> None:
        self.edges: dict[tuple, Edge] = {}
        self.pids: dict[Node, set[int]] = defaultdict(set)
        self.exes: dict[Node, set[str]] = defaultdict(set)
        self.local_addresses: dict[Node, set[str]] = defaultdict(set)
        self.unknown: dict[Node, list[dict]] = defaultdict(list)
        self.listener_nodes: dict[tuple, set[Node]] = defaultdict(set)
        self._inbound: dict[Node, list[Edge]] | None = None
        self._outbound: dict[Node, list[Edge]] | None = None

    @property
    def nodes(self) -> list[Node]:
        found = set(self.pids) | set(self.unknown)
        for edge in self.edges.values():
            found.add(edge.client)
            found.add(edge.server)
        return sorted(found, key=node_sort_key)

    @property
    def hosts(self) -> list[str]:
        return sorted({node.host for node in self.nodes if node.host is not None})

    def add_edge(self, edge: Edge) -> None:
        """Add edge, or add its counts to the edge of the same key."""
        self._inbound = self._outbound = None
        known = self.edges.get(edge.key)
        if known is None:
            self.edges[edge.key] = edge
            return

        known.client_connections = _add(
            known.client_connections, edge.client_connections
        )
        known.server_connections = _add(
            known.server_connections, edge.server_connections
        )
        known.max_concurrent = max(known.max_concurrent, edge.max_concurrent)
        known.first_seen = _earliest(known.first_seen, edge.first_seen)
        known.last_seen = _latest(known.last_seen, edge.last_seen)

    def inbound(self, node: Node) -> list[Edge]:
        """Return the edges whose server is node, largest first."""
        self._index()
        return self._inbound.get(node, [])

    def outbound(self, node: Node) -> list[Edge]:
        """Return the edges whose client is node, largest first."""
        self._index()
        return self._outbound.get(node, [])

    def tree(self, root: Node, depth: int, direction: str) -> TreeNode:
        """Expand root's edges to depth: inbound to clients, outbound to servers."""
        return self._expand(
            root,
            depth,
            {root},
            direction in ("in", "both"),
            direction in ("out", "both"),
        )

    def _expand(self, node, depth, path, inbound, outbound) -> TreeNode:
        result = TreeNode(node, sorted(self.pids.get(node, ())))
        if inbound and outbound:
            result.unknown = self.unknown.get(node, [])
        if depth <= 0:
            return result

        if inbound:
            for edge in self.inbound(node):
                peer = self._child(edge.client, depth, path, inbound=True)
                result.inbound.append(TreeBranch(edge, peer))
        if outbound:
            for edge in self.outbound(node):
                peer = self._child(edge.server, depth, path, inbound=False)
                result.outbound.append(TreeBranch(edge, peer))
        return result

    def _child(self, node, depth, path, inbound: bool) -> TreeNode:
        if node in path:
            return TreeNode(node, sorted(self.pids.get(node, ())), repeated=True)
        if not node.has_process:
            # An address or a connection without a process is a leaf: its
            # other edges belong to unrelated processes.
            return TreeNode(node, sorted(self.pids.get(node, ())))
        return self._expand(node, depth - 1, path | {node}, inbound, not inbound)

    def _index(self) -> None:
        if self._inbound is not None:
            return
        self._inbound, self._outbound = defaultdict(list), defaultdict(list)
        for edge in self.edges.values():
            self._inbound[edge.server].append(edge)
            self._outbound[edge.client].append(edge)
        for edges in (*self._inbound.values(), *self._outbound.values()):
            edges.sort(key=lambda edge: (-edge.connections, _edge_sort_key(edge)))


def build_graph(flows: pa.Table, listeners: pa.Table | None = None) -> DependencyGraph:
    """Build the dependency graph from flows rows and, optionally, listeners rows.

    flows has the columns of schema.FLOWS; several buckets of one edge are
    summed. listeners (schema.LISTENERS) resolve an outbound edge to the server
    whose listener serves its address and port when the server's own flows do
    not show it.
    """
    graph = DependencyGraph()
    rows = aggregate_flows(flows)
    owners = _address_owners(rows, listeners)
    if listeners is not None:
        _index_listeners(graph, listeners)

    inbound = defaultdict(list)
    for row in rows:
        node = _process_node(row)
        graph.local_addresses[node].add(row["local_addr"])
        graph.pids[node].update(row["pids"])
        if row["exe"]:
            graph.exes[node].add(row["exe"])
        if row["direction"] == "inbound":
            inbound[(row["protocol"], row["local_addr"], row["local_port"])].append(row)
        elif row["direction"] == "unknown":
            graph.unknown[node].append(_unknown_entry(row))

    outbound = [row for row in rows if row["direction"] == "outbound"]
    servers_of = {id(row): _servers_in_scope(row, inbound, owners) for row in outbound}
    clients_of = Counter(
        id(server)
        for row in outbound
        for server in _from_client(row, servers_of[id(row)])
    )
    for row in outbound:
        _add_outbound(graph, row, servers_of[id(row)], clients_of, owners)

    for rows_of_endpoint in inbound.values():
        for row in rows_of_endpoint:
            if id(row) not in clients_of:
                _add_unpaired_inbound(graph, row)
    return graph


def aggregate_flows(flows: pa.Table) -> list[dict]:
    """Sum the flows of each edge over its buckets; return one dict per edge."""
    if "service" not in flows.column_names:
        flows = flows.append_column(
            "service",
            service_keys(
                flows.column("exe"), flows.column("cmdline"), flows.column("comm")
            ),
        )
    grouped = flows.group_by(FLOW_KEYS, use_threads=False).aggregate(
        [
            ("opened", "sum"),
            ("max_concurrent", "max"),
            ("first_seen", "min"),
            ("last_seen", "max"),
            ("pid", "distinct"),
        ]
    )
    rows = grouped.to_pylist()
    for row in rows:
        row["opened"] = row.pop("opened_sum") or 0
        row["max_concurrent"] = row.pop("max_concurrent_max") or 0
        row["first_seen"] = row.pop("first_seen_min")
        row["last_seen"] = row.pop("last_seen_max")
        row["pids"] = [pid for pid in row.pop("pid_distinct") if pid is not None]
    return rows


def _process_node(row: dict) -> Node:
    if row["service"] is None and row["comm"] is None:
        port = row["local_port"]
        endpoint = row["local_addr"]
        if port is not None:
            endpoint = format_endpoint(row["local_addr"], port)
        return Node(row["host"], row["netns"], endpoint=endpoint)
    return Node(row["host"], row["netns"], row["service"], row["comm"])


def _address_owners(rows: list[dict], listeners: pa.Table | None) -> dict[str, set]:
    """Map each local address to the (host, netns) pairs that use it."""
    owners = defaultdict(set)
    for row in rows:
        owners[row["local_addr"]].add((row["host"], row["netns"]))
    if listeners is not None:
        for row in listeners.select(["host", "netns", "local_addr"]).to_pylist():
            if row["local_addr"] not in WILDCARDS:
                owners[row["local_addr"]].add((row["host"], row["netns"]))
    return owners


def _index_listeners(graph: DependencyGraph, listeners: pa.Table) -> None:
    services = service_keys(
        listeners.column("exe"), listeners.column("cmdline"), listeners.column("comm")
    )
    columns = ["host", "netns", "protocol", "local_addr", "local_port", "comm", "pid"]
    rows = listeners.select(columns).to_pylist()
    for row, service in zip(rows, services.to_pylist(), strict=True):
        node = Node(row["host"], row["netns"], service, row["comm"])
        key = (row["host"], row["netns"], row["protocol"], row["local_port"])
        graph.listener_nodes[key].add((row["local_addr"], node))
        if row["pid"] is not None:
            graph.pids[node].add(row["pid"])


def _scope(address: str, host: str, netns, owners: dict[str, set]) -> set:
    """Return the (host, netns) pairs that a connection to address can reach."""
    if is_loopback(address):
        return {(host, netns)}
    return owners.get(address, set())


def _servers_in_scope(row: dict, inbound: dict, owners: dict) -> list[dict]:
    """Return the inbound rows that serve an outbound row's remote endpoint."""
    scope = _scope(row["remote_addr"], row["host"], row["netns"], owners)
    key = (row["protocol"], row["remote_addr"], row["remote_port"])
    return [
        server
        for server in inbound.get(key, [])
        if (server["host"], server["netns"]) in scope
    ]


def _from_client(row: dict, servers: list[dict]) -> list[dict]:
    """Return the servers' inbound rows whose remote address is row's address."""
    return [server for server in servers if server["remote_addr"] == row["local_addr"]]


def _add_outbound(graph, row, servers, clients_of: Counter, owners) -> None:
    client = _process_node(row)
    address, port, protocol = row["remote_addr"], row["remote_port"], row["protocol"]

    # A server row without a process (a connection seen only after it closed)
    # is the same listener's traffic, so it must not become a second server.
    with_process = [server for server in servers if _process_node(server).has_process]
    if with_process:
        servers = with_process

    from_client = _from_client(row, servers)
    for server in from_client:
        # A server's row counts every connection from one address. When several
        # client processes share the address, that count cannot be split, so
        # the edge keeps only the client's count.
        shared = clients_of[id(server)] > 1
        server_side = None if shared else server
        graph.add_edge(_edge(client, _process_node(server), row, server_side))
    if from_client:
        return

    scope = _scope(address, row["host"], row["netns"], owners)
    server_nodes = {_process_node(server) for server in servers}
    if not server_nodes:
        server_nodes = _listening_nodes(graph, scope, protocol, address, port)
    if not server_nodes:
        server_nodes = {Node(address=format_endpoint(address, port))}
    for server_node in server_nodes:
        graph.add_edge(_edge(client, server_node, row, None))


def _add_unpaired_inbound(graph, row) -> None:
    client = Node(address=row["remote_addr"])
    graph.add_edge(_edge(client, _process_node(row), None, row))


def _listening_nodes(graph, scope, protocol, address, port) -> set[Node]:
    nodes = set()
    for host, netns in scope:
        for listener_addr, node in graph.listener_nodes.get(
            (host, netns, protocol, port), ()
        ):
            if listener_addr == address or listener_addr in WILDCARDS:
                nodes.add(node)
    return nodes


def _edge(client: Node, server: Node, client_row, server_row) -> Edge:
    """Build an edge from the client's and the server's aggregated rows (or None)."""
    sides = [side for side in (client_row, server_row) if side is not None]
    if client_row is not None:
        server_addr, server_port = client_row["remote_addr"], client_row["remote_port"]
        client_addr = client_row["local_addr"]
    else:
        server_addr, server_port = server_row["local_addr"], server_row["local_port"]
        client_addr = server_row["remote_addr"]
    return Edge(
        client=client,
        server=server,
        protocol=sides[0]["protocol"],
        server_addr=server_addr,
        server_port=server_port,
        client_addr=client_addr,
        client_connections=client_row["opened"] if client_row is not None else None,
        server_connections=server_row["opened"] if server_row is not None else None,
        max_concurrent=max(side["max_concurrent"] for side in sides),
        first_seen=min(side["first_seen"] for side in sides),
        last_seen=max(side["last_seen"] for side in sides),
    )


def _unknown_entry(row: dict) -> dict:
    return {
        "protocol": row["protocol"],
        "local": format_endpoint(row["local_addr"], row["local_port"]),
        "remote": format_endpoint(row["remote_addr"], row["remote_port"]),
        "connections": row["opened"],
    }


def node_sort_key(node: Node) -> tuple:
    return (
        node.host or "",
        node.netns or 0,
        node.address or "",
        node.comm or "",
        node.service or "",
    )


def _edge_sort_key(edge: Edge) -> tuple:
    return (
        edge.protocol,
        edge.server_addr or "",
        edge.server_port or 0,
        node_sort_key(edge.client),
        node_sort_key(edge.server),
    )


def _add(first: int | None, second: int | None) -> int | None:
    if first is None:
        return second
    if second is None:
        return first
    return first + second


def _earliest(first, second):
    known = [value for value in (first, second) if value is not None]
    return min(known) if known else None


def _latest(first, second):
    known = [value for value in (first, second) if value is not None]
    return max(known) if known else None
