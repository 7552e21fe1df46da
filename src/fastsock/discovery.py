"""Peers of a node: the remote addresses that its stored flows talk to.

Downstream peers are the remote ends of outbound flows (this node opened the
connection), upstream peers the remote ends of inbound flows. The source is
chosen at run time from the views the connection has:

1. the ``flows`` table when it has rows, through its ``direction`` column;
2. else ``connections``, through its ``direction`` column where that is set;
3. where it is not (no such column, or files written before it existed), a
   connection counts as inbound when its local port and protocol match a
   stored listener in the same netns, and as outbound otherwise.
"""

import ipaddress
import logging

import duckdb

from fastsock.endpoints import canonical_address

log = logging.getLogger(__name__)

DIRECTIONS = ("downstream", "upstream", "both")

# Flow directions that each walk direction follows.
FLOW_DIRECTIONS = {
    "downstream": ("outbound",),
    "upstream": ("inbound",),
    "both": ("outbound", "inbound", "unknown"),
}

# Local addresses listed per node, enough for the multi-homed hosts seen in
# practice while keeping the federation report small.
MAX_LOCAL_ADDRESSES = 64


def peer_addresses(
    connection: duckdb.DuckDBPyConnection,
    direction: str,
    *,
    exclude_ports: "frozenset[int] | set[int]" = frozenset(),
    mapped: "frozenset[str] | set[str]" = frozenset(),
    own_addresses: "list[str] | None" = None,
) -> list[str]:
    """Return the sorted remote addresses of this node's flows in ``direction``.

    ``direction`` is downstream, upstream or both. Loopback, unspecified,
    multicast and link-local addresses and this node's own addresses are left
    out, except addresses in ``mapped`` (those of the peers map). Flows to or
    from a port in ``exclude_ports`` (the agent port) are ignored, so
    federation traffic does not make peers. ``own_addresses`` saves a query
    when the caller already has local_addresses().
    """
    if direction not in DIRECTIONS:
        raise ValueError(
            f"invalid direction {direction!r}; use one of {', '.join(DIRECTIONS)}"
        )

    sql = _peer_sql(connection, direction, sorted(exclude_ports))
    if sql is None:
        return []

    if own_addresses is None:
        own_addresses = local_addresses(connection)
    own = set(own_addresses)
    peers = set()
    for (text,) in connection.execute(sql).fetchall():
        address = canonical_address(text) if text else None
        if address in mapped:
            peers.add(address)
        elif address is not None and address not in own and _is_peer_address(address):
            peers.add(address)
    return sorted(peers)


def local_addresses(connection: duckdb.DuckDBPyConnection) -> list[str]:
    """Return up to MAX_LOCAL_ADDRESSES addresses that this node's flows used.

    These are the addresses by which peers reach the node. Loopback and
    unspecified addresses are left out.
    """
    views = _view_names(connection)
    sources = [_records(name, views) for name in ("flows", "connections")]
    sources = [name for name in sources if name in views]
    if not sources:
        return []

    union = " UNION ".join(
        f"SELECT DISTINCT local_addr FROM {name}" for name in sources
    )
    rows = connection.execute(f"SELECT local_addr FROM ({union}) ORDER BY 1").fetchall()

    addresses = []
    for (text,) in rows:
        address = canonical_address(text) if text else None
        if address is not None and _is_peer_address(address):
            addresses.append(address)
    return sorted(set(addresses))[:MAX_LOCAL_ADDRESSES]


def _peer_sql(
    connection: duckdb.DuckDBPyConnection, direction: str, exclude_ports: list[int]
) -> "str | None":
    views = _view_names(connection)
    directions = ", ".join(f"'{value}'" for value in FLOW_DIRECTIONS[direction])
    ports = ", ".join(str(port) for port in exclude_ports) or "NULL"

    # Inbound flows are excluded by the port they arrived on, outbound flows by
    # the port they went to.
    not_agent = (
        f"NOT (coalesce(direction = 'inbound' AND local_port IN ({ports}), false) "
        f"OR coalesce(direction = 'outbound' AND remote_port IN ({ports}), false))"
    )

    flows = _records("flows", views)
    if flows in views and _has_rows(connection, flows):
        source = f"SELECT * FROM {flows}"
    elif _records("connections", views) in views:
        source = _connections_with_direction(connection, views)
    else:
        return None

    return (
        f"SELECT DISTINCT remote_addr FROM ({source}) "
        f"WHERE direction IN ({directions}) AND {not_agent}"
    )


def _connections_with_direction(
    connection: duckdb.DuckDBPyConnection, views: set[str]
) -> str:
    """Return SQL of the connections with a direction column filled in."""
    connections = _records("connections", views)
    listeners = _records("listeners", views)
    if listeners in views:
        guessed = (
            f"CASE WHEN EXISTS (SELECT 1 FROM {listeners} l "
            "WHERE l.protocol = c.protocol AND l.local_port = c.local_port "
            "AND l.netns IS NOT DISTINCT FROM c.netns) "
            "THEN 'inbound' ELSE 'outbound' END"
        )
    else:
        guessed = "'outbound'"

    if "direction" in _column_names(connection, connections):
        return (
            f"SELECT c.* REPLACE (coalesce(c.direction, {guessed}) AS direction) "
            f"FROM {connections} c"
        )

    log.debug("connections has no direction column; guessing it from listeners")
    return f"SELECT c.*, {guessed} AS direction FROM {connections} c"


def _records(table: str, views: set[str]) -> str:
    # Every record of a table lists the same addresses as its newest records,
    # and the _records view skips the per-key window of the plain view.
    records = f"{table}_records"
    return records if records in views else table


def _has_rows(connection: duckdb.DuckDBPyConnection, view: str) -> bool:
    (found,) = connection.execute(f"SELECT EXISTS (SELECT 1 FROM {view})").fetchone()
    return bool(found)


def _view_names(connection: duckdb.DuckDBPyConnection) -> set[str]:
    rows = connection.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal"
    ).fetchall()
    return {name for (name,) in rows}


def _column_names(connection: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    rows = connection.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = ?", [view]
    ).fetchall()
    return {name for (name,) in rows}


def _is_peer_address(text: str) -> bool:
    address = ipaddress.ip_address(text)
    return not (
        address.is_loopback
        or address.is_unspecified
        or address.is_multicast
        or address.is_link_local
    )
