"""Direction of each connection: inbound (passive open), outbound (active open).

A connection whose direction cannot be determined is unknown. A connection is inbound
when a listener accepted it. The rules, first match wins:

1. inbound: a listener of the same network namespace, protocol and socket family
   serves the local port and covers the local address. A listener covers its own
   address, and the wildcard ``0.0.0.0`` (or ``::``) covers every address of its
   socket family. An IPv4 client of a dual-stack ``::`` listener is accepted on an
   IPv6 socket whose addresses are stored as IPv4 (family ``inet``, socket_family
   ``inet6``), so the socket family, not the address family, is compared. The
   listener must have been open during the connection's life, or at sample k-1
   or later for a connection first seen at sample k; a listener first seen at
   sample j may have opened at any time after sample j-1. So a listener that
   closed before the connection opened does not cover it, even on the same
   port. A connection seen only after it closed needs more (see
   _certainly_accepted).
2. outbound: TCP in SYN_SENT, which only an active open passes through.
3. outbound: the other end of the connection is a socket of the same namespace
   whose direction is inbound (two local processes talking).
4. outbound: connected UDP that no unconnected UDP socket on the port covers.
5. outbound: TCP first seen after the collector's first sample of its namespace.
   Its listener, had it been accepted, would have been seen in that sample or a
   later one. NOTE: a listener that opened and closed between two samples is never
   seen, so its connections count as outbound.
6. outbound: TCP whose local port is in the kernel's ephemeral port range, for a
   connection that was already open when collection started, or was seen only
   after it closed. Its listener may have closed before collection started, so
   this rule is the one that can be wrong: a server listening on an ephemeral port
   whose listener closed before collection started.
7. inbound: a connection that a listener might have accepted, but rule 1 could
   not prove it, whose other end in the same namespace is outbound by the rules
   above (a burst of short connections to a listener first sampled after them).
8. unknown: everything else, including a connection seen only after it closed
   that a listener might have accepted but rule 1 could not prove it.
"""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.identity import combine
from fastsock.joins import inner_join_rows
from fastsock.schema import TIMESTAMP

log = logging.getLogger(__name__)

INBOUND = "inbound"
OUTBOUND = "outbound"
UNKNOWN = "unknown"

# Direction codes in the order of DIRECTION_NAMES.
UNKNOWN_CODE, INBOUND_CODE, OUTBOUND_CODE = 0, 1, 2
DIRECTION_NAMES = pa.array([UNKNOWN, INBOUND, OUTBOUND])

# The wildcard address of a listener of each socket family.
WILDCARDS = {"inet": "0.0.0.0", "inet6": "::"}

# Linux's default net.ipv4.ip_local_port_range, used when the file is missing.
DEFAULT_EPHEMERAL_PORTS = (32768, 60999)

TCP_SYN_SENT = 2

# Seconds a closed listener stays in ListenerHistory when no open connection
# needs it. A TIME_WAIT row (listed about 60 s) or a FIN_WAIT2 orphan (60 s more
# by default) of a connection that it accepted can show up that long after.
CLOSED_LISTENER_SECONDS = 150

# Columns of ListenerHistory.table. Times are Unix microseconds.
HISTORY_SCHEMA = pa.schema(
    [
        pa.field("listener", pa.int64()),
        pa.field("netns", pa.int64()),
        pa.field("protocol", pa.string()),
        pa.field("socket_family", pa.string()),
        pa.field("local_addr", pa.string()),
        pa.field("local_port", pa.int32()),
        pa.field("first_seen_us", pa.int64()),
        # The sample before the first sight (0 at the collector's start): the
        # listener may have opened at any time since.
        pa.field("opened_after_us", pa.int64()),
        pa.field("last_seen_us", pa.int64()),
        pa.field("closed", pa.bool_()),
        pa.field("uid", pa.int64()),
        pa.field("pid", pa.int32()),
        pa.field("pids", pa.list_(pa.int32())),
        pa.field("comm", pa.string()),
        pa.field("exe", pa.string()),
        pa.field("cmdline", pa.string()),
        pa.field("process_start", TIMESTAMP),
    ]
)

# Columns that identify a listener's port; ListenerHistory joins on them.
PORT_KEYS = ["netns", "protocol", "socket_family", "local_port"]

def read_ephemeral_ports(proc_root: str) -> tuple[int, int]:
    """Return the kernel's ephemeral port range, low and high, both included.

    NOTE: the range is a per-namespace setting, but only the collector's own
    namespace's value is read, and it is used for every namespace.
    """
    path = f"{proc_root}/sys/net/ipv4/ip_local_port_range"
    try:
        with open(path, "rb") as file:
            low, high = (int(value) for value in file.read().split())
    except (OSError, ValueError) as error:
        log.debug(
            "cannot read %s (%s); using the default range %d-%d",
            path,
            error,
            *DEFAULT_EPHEMERAL_PORTS,
        )
        return DEFAULT_EPHEMERAL_PORTS
    return low, high


class ListenerHistory:
    """Every listener seen since the collector started, with its lifetime.

    A closed listener is kept while an open connection on its port could have
    been accepted by it, and for CLOSED_LISTENER_SECONDS after it closed.
    """

    def __init__(self) -> None:
        self.table = HISTORY_SCHEMA.empty_table()

    def __len__(self) -> int:
        return self.table.num_rows

    def update(self, listeners: pa.Table) -> None:
        """Add or refresh listeners from drained lifetime rows of listening sockets.

        listeners has the tracker's columns: ``key`` (the socket key),
        ``first_seen_us``, ``last_seen_us``, ``closed`` and the socket and owner
        columns of a snapshot.
        """
        if listeners.num_rows == 0:
            return

        ids = combine(
            listeners.column("key").to_numpy(),
            listeners.column("first_seen_us").to_numpy(),
        )
        arrays = [pa.array(ids, pa.int64())]
        for field in HISTORY_SCHEMA.remove(0):
            if field.name == "opened_after_us":
                arrays.append(_opened_after(listeners))
                continue
            arrays.append(listeners.column(field.name).cast(field.type))
        fresh = pa.Table.from_arrays(arrays, schema=HISTORY_SCHEMA)

        old_ids = self.table.column("listener").to_numpy()
        kept = ~np.isin(old_ids, ids)
        self.table = pa.concat_tables([self.table.filter(pa.array(kept)), fresh])

    def covering(self, connections: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Return (connection row, listener row) pairs where the listener covers it.

        connections needs the columns netns, protocol, socket_family, local_addr,
        local_port, last_seen_us and opened_after_us (0 when the connection may
        have opened before collection started). Listener rows index self.table.
        """
        if connections.num_rows == 0 or self.table.num_rows == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty

        wildcard = pc.if_else(
            pc.equal(connections.column("socket_family"), "inet"),
            WILDCARDS["inet"],
            WILDCARDS["inet6"],
        )
        conns = pa.table(
            {
                "netns": _netns(connections),
                "protocol": connections.column("protocol"),
                "socket_family": connections.column("socket_family"),
                "local_port": connections.column("local_port"),
                "local_addr": connections.column("local_addr"),
                "wildcard": wildcard,
            }
        )
        listeners = pa.table(
            {
                "netns": _netns(self.table),
                "protocol": self.table.column("protocol"),
                "socket_family": self.table.column("socket_family"),
                "local_port": self.table.column("local_port"),
                "listener_addr": self.table.column("local_addr"),
            }
        )
        listener_keys = PORT_KEYS + ["listener_addr"]
        exact = inner_join_rows(conns, listeners, PORT_KEYS + ["local_addr"], listener_keys)
        wild = inner_join_rows(conns, listeners, PORT_KEYS + ["wildcard"], listener_keys)
        rows = np.concatenate([exact[0], wild[0]])
        listener_rows = np.concatenate([exact[1], wild[1]])

        # The listener was open at some time while the connection may have
        # been. A listener opens before the connections it accepts, and may
        # have opened at any time since the sample before its first sight,
        # so a connection that closed before that first sight is covered too.
        conn_last = connections.column("last_seen_us").to_numpy()[rows]
        opened_after = (
            connections.column("opened_after_us").to_numpy(zero_copy_only=False)[rows]
        )
        history = self.table
        listener_opened = history.column("opened_after_us").to_numpy()[listener_rows]
        last_seen = history.column("last_seen_us").to_numpy()[listener_rows]
        alive = (listener_opened <= conn_last) & (last_seen >= opened_after)
        return rows[alive], listener_rows[alive]

    def prune(self, open_connections: pa.Table, now_us: int) -> int:
        """Forget closed listeners that no open connection can need; return how many.

        open_connections has the columns that covering() reads.
        """
        closed = self.table.column("closed").to_numpy(zero_copy_only=False)
        last_seen = self.table.column("last_seen_us").to_numpy()
        candidates = closed & (last_seen < now_us - CLOSED_LISTENER_SECONDS * 1_000_000)
        if not candidates.any():
            return 0

        needed = np.zeros(self.table.num_rows, dtype=bool)
        _, listener_rows = self.covering(open_connections)
        needed[listener_rows] = True

        forget = candidates & ~needed
        self.table = self.table.filter(pa.array(~forget))
        return int(forget.sum())


def classify(
    connections: pa.Table,
    history: ListenerHistory,
    ephemeral_ports: tuple[int, int] = DEFAULT_EPHEMERAL_PORTS,
) -> tuple[pa.Array, np.ndarray]:
    """Return the direction of each connection and its sole covering listener.

    connections needs the columns that ListenerHistory.covering reads, plus
    remote_addr, remote_port, state_code (the first state seen), first_seen_us
    and seen_closed (true for a connection first seen after it closed). The
    second value is, per connection, the row in history.table of the only
    listener that covers it, or -1 when none or several do.
    """
    rows = connections.num_rows
    codes = np.full(rows, UNKNOWN_CODE, dtype=np.int8)
    low, high = ephemeral_ports
    conn_rows, listener_rows = history.covering(connections)
    certain = _certainly_accepted(
        connections, history, conn_rows, listener_rows, ephemeral_ports
    )
    ambiguous = np.zeros(rows, dtype=bool)
    ambiguous[conn_rows[~certain]] = True
    conn_rows, listener_rows = conn_rows[certain], listener_rows[certain]
    codes[conn_rows] = INBOUND_CODE
    ambiguous &= codes == UNKNOWN_CODE

    is_udp = pc.equal(connections.column("protocol"), "udp").to_numpy(
        zero_copy_only=False
    )
    state = connections.column("state_code").to_numpy(zero_copy_only=False)
    local_port = connections.column("local_port").to_numpy(zero_copy_only=False)
    opened_after = connections.column("opened_after_us").to_numpy(zero_copy_only=False)

    evidence_rules = [
        ~is_udp & (state == TCP_SYN_SENT),
        _peer_is_inbound(connections, codes),
    ]
    # A connection that a listener may have accepted stays unknown unless
    # evidence shows otherwise.
    fallback_rules = [
        is_udp & ~ambiguous,
        ~is_udp & (opened_after > 0) & ~ambiguous,
        ~is_udp & (local_port >= low) & (local_port <= high) & ~ambiguous,
    ]
    for rule in evidence_rules + fallback_rules:
        codes[(codes == UNKNOWN_CODE) & rule] = OUTBOUND_CODE

    # A listener that may have accepted a connection did when the other end
    # of that connection connected out (a listener first sampled after a
    # burst of short connections to it had closed).
    accepted = ambiguous & (codes == UNKNOWN_CODE)
    if accepted.any():
        accepted &= _peer_has(connections, codes, OUTBOUND_CODE)
        codes[accepted] = INBOUND_CODE

    directions = pc.take(DIRECTION_NAMES, pa.array(codes))
    return directions, _sole_listener(rows, conn_rows, listener_rows)


def _certainly_accepted(
    connections: pa.Table,
    history: ListenerHistory,
    conn_rows: np.ndarray,
    listener_rows: np.ndarray,
    ephemeral_ports: tuple[int, int],
) -> np.ndarray:
    """Return which covering pairs prove that the listener accepted the connection.

    A live connection keeps its local port bound, so a covering listener
    accepted it. A connection seen only after it closed (a TIME_WAIT row) no
    longer has its port bound, and bind() with SO_REUSEADDR can give the port to
    a new listener while the row is listed. connect() skips ports that bind()
    took (__inet_hash_connect in Linux's net/ipv4/inet_hashtables.c), so the pair
    is certain when the listener was seen in an earlier sample than the row, or
    when its port is outside the ephemeral range.
    """
    seen_closed = connections.column("seen_closed").to_numpy(zero_copy_only=False)
    if conn_rows.size == 0 or not seen_closed[conn_rows].any():
        return np.ones(conn_rows.size, dtype=bool)

    low, high = ephemeral_ports
    row_first = connections.column("first_seen_us").to_numpy()[conn_rows]
    listener_first = history.table.column("first_seen_us").to_numpy()[listener_rows]
    port = connections.column("local_port").to_numpy(zero_copy_only=False)[conn_rows]
    return (
        ~seen_closed[conn_rows]
        | (listener_first < row_first)
        | (port < low)
        | (port > high)
    )


def _peer_is_inbound(connections: pa.Table, codes: np.ndarray) -> np.ndarray:
    """Return which connections have their other end, inbound, in the same table."""
    return _peer_has(connections, codes, INBOUND_CODE)


def _peer_has(connections: pa.Table, codes: np.ndarray, code: int) -> np.ndarray:
    """Return which connections have their other end, of direction code, in the table."""
    rows = connections.num_rows
    ends_of_code = np.flatnonzero(codes == code)
    result = np.zeros(rows, dtype=bool)
    if rows == 0 or ends_of_code.size == 0:
        return result

    ends = pa.table(
        {
            "netns": _netns(connections),
            "protocol": connections.column("protocol"),
            "local_addr": connections.column("local_addr"),
            "local_port": connections.column("local_port"),
            "remote_addr": connections.column("remote_addr"),
            "remote_port": connections.column("remote_port"),
        }
    )
    servers = ends.take(pa.array(ends_of_code))
    keys = ["netns", "protocol", "local_addr", "local_port", "remote_addr", "remote_port"]
    # A server end's local side is its peer's remote side.
    swapped = ["netns", "protocol", "remote_addr", "remote_port", "local_addr", "local_port"]
    matched, _ = inner_join_rows(ends, servers, keys, swapped)
    result[matched] = True
    return result


def _opened_after(listeners: pa.Table) -> pa.Array:
    """Return each listener's opened_after_us, or its first sight where unknown."""
    first_seen = listeners.column("first_seen_us").cast(pa.int64())
    if "opened_after_us" not in listeners.column_names:
        return first_seen.combine_chunks()
    opened_after = listeners.column("opened_after_us").cast(pa.int64())
    return pc.coalesce(opened_after, first_seen).combine_chunks()


def _sole_listener(
    rows: int, conn_rows: np.ndarray, listener_rows: np.ndarray
) -> np.ndarray:
    sole = np.full(rows, -1, dtype=np.int64)
    if conn_rows.size == 0:
        return sole

    pairs = np.unique(np.column_stack([conn_rows, listener_rows]), axis=0)
    counted, counts = np.unique(pairs[:, 0], return_counts=True)
    single = counted[counts == 1]
    first_pair = np.searchsorted(pairs[:, 0], single)
    sole[single] = pairs[first_pair, 1]
    return sole


def _netns(table: pa.Table) -> pa.ChunkedArray:
    # NULL (a proc tree without namespace links) joins as namespace 0.
    return table.column("netns").fill_null(0)
