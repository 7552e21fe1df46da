"""Connections seen only after they closed: socket rows with inode 0 in a closing state.

When a program closes a TCP socket, the kernel keeps the connection listed without
an fd, so with inode 0. It is in FIN_WAIT1, FIN_WAIT2, CLOSING or LAST_ACK while
the close handshake runs, and then in TIME_WAIT for about 60 s on the side that
closed first. A connection that opened and closed between two samples shows up only as
such a row, and is recorded as a closed connection with ``detected_by`` set to
``time_wait``.

A row is keyed by its namespace and four-tuple. It stays listed across many
samples (and FIN_WAIT2 turns into TIME_WAIT in place), so a detection is a key
that the previous sample did not list. A row whose four-tuple belongs to a
connection that was tracked live is that connection's afterlife and is dropped.

Inode 0 is never matched to a process. A detection is attributed only when it is
certain: an inbound connection whose port has exactly one covering listener, held
by exactly one process.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock import schema
from fastsock.direction import INBOUND, ListenerHistory
from fastsock.identity import combine, text_id
from fastsock.joins import inner_join_rows
from fastsock.records import NO_HOLDER
from fastsock.sockets import PROTOCOL_SCALARS, decode_states
from fastsock.textids import TextIds

DETECTED_BY = "time_wait"

# Values of the connections column `attribution` for detections: the pid is the
# owner of the only listener, or there is no process because inode 0 has none.
ATTRIBUTED_BY_LISTENER = "listener"

# TCP states (include/net/tcp_states.h) of a connection whose program closed it.
# SYN_RECV (3) and NEW_SYN_RECV (12) rows also have inode 0, but they are
# handshakes not accepted yet, which show up live once accepted.
CLOSING_STATES = pa.array(
    [
        4,  # FIN_WAIT1
        5,  # FIN_WAIT2
        6,  # TIME_WAIT
        7,  # CLOSE
        9,  # LAST_ACK
        11,  # CLOSING
    ],
    pa.int8(),
)

# Seconds that a detection waits before it is recorded. The close event of
# the same connection can arrive after its TIME_WAIT row is listed (the
# kernel sends it from a work queue), and it must find the detection still
# unrecorded to replace it.
HOLD_SECONDS = 1.0

FOUR_TUPLE = [
    "netns",
    "protocol",
    "local_addr",
    "local_port",
    "remote_addr",
    "remote_port",
]

# Owner columns that an attributed detection copies from its listener.
OWNER_COLUMNS = ("uid", "pid", "pids", "comm", "exe", "cmdline", "process_start")


def closing_rows(sockets: pa.Table) -> pa.Table:
    """Return the TCP rows of a snapshot that have inode 0 and a closing state."""
    mask = pc.and_(
        pc.and_(
            pc.equal(sockets.column("inode"), pa.scalar(0, pa.int64())),
            pc.equal(sockets.column("protocol"), PROTOCOL_SCALARS["tcp"]),
        ),
        pc.is_in(sockets.column("state_code"), value_set=CLOSING_STATES),
    )
    return sockets.filter(mask)


class ClosedConnectionDetector:
    """Find connections in closing rows that the previous sample did not list."""

    def __init__(self) -> None:
        self._listed = np.empty(0, dtype=np.int64)
        self._pending: list[pa.Table] = []
        # Detections that the last drain held back for the next one.
        self._deferred: pa.Table | None = None
        self._recently_live: pa.Table | None = None
        self._text_ids = TextIds()

    def observe(self, sockets: pa.Table, time_us: int) -> int:
        """Record the closing rows of one snapshot; return how many are new."""
        rows = closing_rows(sockets)
        if rows.num_rows == 0:
            # Nothing is closing, so nothing is new and nothing stays listed.
            self._listed = self._listed[:0]
            return 0
        keys = self._keys(rows)
        keys, first = np.unique(keys, return_index=True)
        rows = rows.take(pa.array(first, pa.int64()))

        new = ~np.isin(keys, self._listed)
        self._listed = keys
        if not new.any():
            return 0

        detected = rows.filter(pa.array(new))
        times = pa.array(np.full(detected.num_rows, time_us, dtype=np.int64))
        self._pending.append(
            detected.append_column("key", pa.array(keys[new]))
            .append_column("first_seen_us", times)
            .append_column("last_seen_us", times)
            # The connection may have opened before collection started.
            .append_column("opened_after_us", pa.array(np.zeros(len(times), np.int64)))
        )
        return int(new.sum())

    def take_pending(self) -> list[pa.Table]:
        """Hand over the detections found since the last call, and those held back."""
        pending, self._pending = self._pending, []
        if self._deferred is not None:
            pending.insert(0, self._deferred)
            self._deferred = None
        return pending

    def drain(
        self,
        live: pa.Table,
        pending: list[pa.Table] | None = None,
        hold_from_us: int | None = None,
    ) -> pa.Table | None:
        """Return the detections since the last drain, minus connections tracked live.

        live contains the drained live connections (open and closed), with the
        FOUR_TUPLE columns. Their four-tuples are also kept until the next drain,
        for a row that is listed just after a drain. pending is what
        take_pending() returned, for a drain in another thread than observe();
        by default the pending detections are taken here. Detections first
        seen at hold_from_us or later wait for the next drain (see
        HOLD_SECONDS); with None, every detection is returned, as the last
        drain needs.
        """
        if pending is None:
            pending = self.take_pending()
        if not pending:
            self._recently_live = _tuples(live)
            return None

        # One table per sample that found detections, merged into one chunk.
        detected = pa.concat_tables(pending).combine_chunks()
        for tracked in (self._recently_live, _tuples(live)):
            if tracked is not None and detected.num_rows:
                detected = _without(detected, tracked)
        self._recently_live = _tuples(live)
        if hold_from_us is not None and detected.num_rows:
            young = detected.column("first_seen_us").to_numpy() >= hold_from_us
            if young.any():
                self._deferred = detected.filter(pa.array(young))
                detected = detected.filter(pa.array(~young))
        return detected

    def forget_stored(self, stored: pa.Table) -> None:
        """Drop later detections of stored connections, given their FOUR_TUPLE columns.

        A restarted collector finds the closing rows of the connections that
        its previous run recorded, and would record them again. Pass the
        connections stored since the oldest such row could have closed.
        """
        tuples = _tuples(stored)
        if tuples is None:
            return
        if self._recently_live is not None:
            tuples = pa.concat_tables([self._recently_live, tuples])
        self._recently_live = tuples

    def restore(self, detected: pa.Table) -> None:
        """Put back detections that a failed flush could not store."""
        if detected.num_rows:
            self._pending.insert(0, detected)

    def _keys(self, rows: pa.Table) -> np.ndarray:
        netns = rows.column("netns").fill_null(0).to_numpy(zero_copy_only=False)
        return combine(
            netns,
            self._text_ids.ids(rows.column("local_addr")),
            rows.column("local_port").to_numpy(),
            self._text_ids.ids(rows.column("remote_addr")),
            rows.column("remote_port").to_numpy(),
        )


def _tuples(connections: pa.Table) -> pa.Table | None:
    if connections is None or connections.num_rows == 0:
        return None
    tuples = connections.select(FOUR_TUPLE)
    return tuples.set_column(0, "netns", tuples.column("netns").fill_null(0))


def _without(detected: pa.Table, tracked: pa.Table) -> pa.Table:
    """Drop the detections whose namespace and four-tuple appear in tracked."""
    keys = ["netns", *FOUR_TUPLE[1:]]
    detected_keys = detected.select(keys)
    detected_keys = detected_keys.set_column(
        0, "netns", detected_keys.column("netns").fill_null(0)
    )
    matched, _ = inner_join_rows(
        detected_keys, tracked, keys, list(tracked.column_names)
    )
    untracked = np.ones(detected.num_rows, dtype=bool)
    untracked[matched] = False
    return detected.filter(pa.array(untracked))


def detection_records(
    detected: pa.Table,
    directions: pa.Array,
    sole_listener: np.ndarray,
    history: ListenerHistory,
    host: str,
) -> pa.Table:
    """Build connections rows for detections, with the owner where it is certain.

    sole_listener is, per detection, the row in history.table of the only listener
    that covers it, or -1 (see direction.classify).
    """
    rows = detected.num_rows
    first_seen = detected.column("first_seen_us").to_numpy()
    netns = detected.column("netns").fill_null(0).to_numpy(zero_copy_only=False)
    conn_id = combine(
        np.full(rows, text_id(host), dtype=np.int64),
        netns,
        detected.column("key").to_numpy(),
        first_seen,
    )
    seen = pa.array(first_seen, pa.int64()).cast(schema.TIMESTAMP)
    columns = {
        "host": pa.repeat(pa.scalar(host), rows),
        "conn_id": pa.array(conn_id, pa.int64()),
        "state": decode_states(detected.column("state_code").to_numpy(), False),
        "first_seen": seen,
        "last_seen": seen,
        "closed": pa.repeat(pa.scalar(True), rows),
        "detected_by": pa.repeat(pa.scalar(DETECTED_BY), rows),
        "direction": directions,
    }
    columns.update(listener_owners(directions, sole_listener, history))

    columns["attribution"] = pc.if_else(
        pc.is_valid(columns["pid"]), ATTRIBUTED_BY_LISTENER, NO_HOLDER
    )

    arrays = []
    for field in schema.CONNECTIONS:
        if field.name in columns:
            arrays.append(columns[field.name].cast(field.type))
        elif field.name in detected.column_names:
            arrays.append(detected.column(field.name).cast(field.type))
        else:
            # Columns that other sources fill, such as TCP counters.
            arrays.append(pa.nulls(rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema.CONNECTIONS)


def listener_owners(
    directions: pa.Array, sole_listener: np.ndarray, history: ListenerHistory
) -> dict[str, pa.Array]:
    """Return the OWNER_COLUMNS of each connection: its listener's, else NULL.

    Only where it is certain: an inbound connection whose port has exactly
    one covering listener, held by exactly one process.
    """
    inbound = pc.equal(directions, INBOUND).to_numpy(zero_copy_only=False)
    has_listener = sole_listener >= 0
    certain = inbound & has_listener

    if certain.any():
        pids = history.table.column("pids").take(pa.array(np.maximum(sole_listener, 0)))
        holders = pc.list_value_length(pids).fill_null(0).to_numpy(zero_copy_only=False)
        certain &= holders == 1

    indices = pa.array(np.maximum(sole_listener, 0), mask=~certain)
    if history.table.num_rows == 0:
        return {
            name: pa.nulls(len(sole_listener), history.table.schema.field(name).type)
            for name in OWNER_COLUMNS
        }
    owners = history.table.take(indices)
    return {name: owners.column(name).combine_chunks() for name in OWNER_COLUMNS}
