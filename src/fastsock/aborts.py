"""Close events of connections that tcp_disconnect() aborted.

An abortive close (SO_LINGER {1, 0}, connect(AF_UNSPEC), or a listener that
closes with connections not yet accepted) and a failed connect run the
kernel's tcp_disconnect() before the close event is built. It sets the
remote port to 0, clears the local address of a socket not bound to one,
and resets the tcp_info counters. The local port, the remote address and
the cookie stay (seen on Linux 6.18, IPv4 and IPv6). These functions
tell such events apart and match them to sampled sockets by what is left.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.netlink import COUNTER_COLUMNS

# Address text of an unset address, as the event reader writes it.
WILDCARD_ADDRESSES = pa.array(["0.0.0.0", "::"])

# Row of an event that several sampled rows could be (see assign_rows).
AMBIGUOUS = -2
NO_ROWS = np.empty(0, dtype=np.int64)


def sampled_counters_where_reset(
    events: pa.Table, records: pa.Table
) -> dict[str, pa.Array]:
    """Return the final counters of records that events close, one event each.

    Where tcp_disconnect() reset an event's counters, the record keeps its own.
    """
    reset = pa.array(disconnected(events))
    values = {}
    for name in COUNTER_COLUMNS:
        if name not in records.column_names:
            continue
        sampled = records.column(name).combine_chunks()
        final = events.column(name).combine_chunks().cast(sampled.type)
        values[name] = pc.if_else(reset, sampled, final)
    return values


def is_tcp(table: pa.Table) -> np.ndarray:
    return pc.equal(table.column("protocol"), "tcp").to_numpy(zero_copy_only=False)


def disconnected(events: pa.Table) -> np.ndarray:
    """Return which events are of TCP sockets with remote port 0.

    tcp_disconnect() sets the remote port to 0 on a failed connect and on an
    abortive close, before the kernel builds the event. A listener and a
    socket that never connected have remote port 0 too.
    """
    return is_tcp(events) & (events.column("remote_port").to_numpy() == 0)


def aborted_connections(events: pa.Table) -> np.ndarray:
    """Return which events are of connections that tcp_disconnect() aborted.

    tcp_init_buffer_space() sets tcpi_rcv_space when the handshake completes,
    and tcp_disconnect() leaves it, so it is above 0 for an aborted
    connection. It is 0 for a failed or abandoned connect, a listener and a
    socket that never connected (Linux 6.18).
    """
    rcv_space = events.column("rcv_space").fill_null(0).to_numpy()
    return disconnected(events) & (rcv_space > 0)


def has_address(table: pa.Table, name: str) -> np.ndarray:
    """Return which rows have a set (not wildcard) address in column name."""
    wildcard = pc.is_in(table.column(name), WILDCARD_ADDRESSES)
    return ~wildcard.to_numpy(zero_copy_only=False)


def rows_in_window(
    keys: np.ndarray,
    last_seen: np.ndarray,
    closed_at: np.ndarray,
    event_keys: np.ndarray,
    times: np.ndarray,
    window_starts: np.ndarray,
) -> list[np.ndarray]:
    """Find, per event key, the rows with that key seen open before and closed since.

    A row fits event_keys[i] when its last_seen is below times[i] and its
    closed_at at least window_starts[i]. Returns the indices into keys of
    the fitting rows, per event key.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    left = np.searchsorted(sorted_keys, event_keys, "left")
    right = np.searchsorted(sorted_keys, event_keys, "right")

    found = [NO_ROWS] * len(event_keys)
    # Few events have a candidate row at all, so this loop stays short.
    for i in np.flatnonzero(right > left).tolist():
        rows = order[left[i] : right[i]]
        fits = (last_seen[rows] < times[i]) & (closed_at[rows] >= window_starts[i])
        found[i] = rows[fits]
    return found


def assign_rows(
    candidates: list[np.ndarray], times: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """Give each allowed event the one candidate row left to it, oldest event first.

    An event whose candidates other events took gets none (-1), so it is
    recorded as unseen. An event left with several candidates is AMBIGUOUS
    and not recorded, because the rows' records already stand for its socket
    if it was sampled.

    NOTE: events with the same endpoints differ only in time, so of two that
    come within one sample interval, each may take the other's row.
    """
    assigned = np.full(len(candidates), -1, dtype=np.int64)
    claimed: set[int] = set()
    for i in np.argsort(times, kind="stable").tolist():
        if not allowed[i] or len(candidates[i]) == 0:
            continue
        free = [row for row in candidates[i].tolist() if row not in claimed]
        if len(free) == 1:
            assigned[i] = free[0]
            claimed.add(free[0])
        elif len(free) > 1:
            assigned[i] = AMBIGUOUS
    return assigned


def null_where(column: pa.Array, mask: pa.Array) -> pa.Array:
    return pc.if_else(mask, pa.scalar(None, column.type), column)


def clear_reset_values(
    columns: dict[str, pa.Array], aborted: np.ndarray
) -> dict[str, pa.Array]:
    """Put NULL in the columns whose values tcp_disconnect() cleared.

    Only in the rows where aborted is True: their remote port and counters,
    and the local and remote address where it is the wildcard.
    """
    if not aborted.any():
        return columns
    cleared = pa.array(aborted)
    columns = dict(columns)
    for name in ("remote_port", *COUNTER_COLUMNS):
        if name in columns:
            columns[name] = null_where(columns[name], cleared)
    for name in ("local_addr", "remote_addr"):
        if name in columns:
            wildcard = pc.is_in(columns[name], WILDCARD_ADDRESSES)
            columns[name] = null_where(columns[name], pc.and_(cleared, wildcard))
    return columns
