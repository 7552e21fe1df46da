"""Turn the kernel's close events into connection records.

A :class:`CloseRecorder` folds the events that a
:class:`~fastsock.closelisten.CloseListener` received into the lifetime
tracker at each sample: a socket that sampling already tracks gets its
close time and final counters, and a socket that lived less than one sample
gets a record of its own with ``detected_by = 'close_event'``.

An aborted connection's event lacks what tcp_disconnect() cleared (see
fastsock.aborts). It closes the sampled socket it belongs to without
touching the sampled endpoints and counters. An aborted connection that no
sample showed gets a record with ``detected_by = 'close_event_abort'`` and
NULL in place of the cleared values.
"""

import logging
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.aborts import (
    AMBIGUOUS,
    NO_ROWS,
    aborted_connections,
    assign_rows,
    clear_reset_values,
    disconnected,
    has_address,
    is_tcp,
    rows_in_window,
    sampled_counters_where_reset,
)
from fastsock.closelisten import (
    CloseEventsUnavailable,
    CloseListener,
    NamespaceMoved,
    subscribe_in_namespace,
)
from fastsock.lifetimes import LifetimeTracker
from fastsock.netlink import (
    DIAG_COLUMNS,
    _netlink,
)
from fastsock.netns import Namespace
from fastsock.sockets import is_listening

log = logging.getLogger(__name__)

# Seconds a record that sampling closed stays matchable by a late event. The
# kernel sends the event from a work queue after the socket left the table,
# so it can arrive just after the sample that no longer showed the socket.
RECENT_SECONDS = 5.0

OWNER_COLUMNS = ("pid", "pids", "comm", "exe", "cmdline", "process_start")

# Values of the `attribution` column for records made from close events.
ATTRIBUTED_BY_LISTENER = "listener"
NEVER_SAMPLED = "unseen"

# Values of the `detected_by` column for records made from close events. The
# second is for an aborted connection, whose event lacks what tcp_disconnect()
# cleared.
DETECTED_BY_CLOSE_EVENT = "close_event"
DETECTED_BY_ABORT = "close_event_abort"


def string_buffers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Return the offsets and data of a string column as NumPy arrays."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    _validity, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32)[
        array.offset : array.offset + len(array) + 1
    ]
    if data is None:
        return offsets, np.empty(0, dtype=np.uint8)
    text = np.frombuffer(data, dtype=np.uint8)
    return offsets, text


def four_tuple_keys(table: pa.Table) -> np.ndarray:
    """Return a 64-bit key per row of (protocol, addresses, ports)."""
    if table.num_rows == 0:
        return np.empty(0, dtype=np.int64)
    is_udp = pc.equal(table.column("protocol"), "udp").to_numpy(zero_copy_only=False)
    local_offsets, local_text = string_buffers(table.column("local_addr"))
    remote_offsets, remote_text = string_buffers(table.column("remote_addr"))
    return _netlink.four_tuple_keys(
        is_udp.astype(np.uint8),
        local_offsets,
        local_text,
        table.column("local_port").to_numpy().astype(np.int32),
        remote_offsets,
        remote_text,
        table.column("remote_port").to_numpy().astype(np.int32),
    )


class KeyIndex:
    """Sorted match keys of a table's rows, without the keys of several rows.

    Two rows with one key (SO_REUSEPORT listeners with the same four-tuple)
    are indistinguishable, so an event with that key matches neither.
    """

    def __init__(self, keys: np.ndarray, left_out: np.ndarray | None = None) -> None:
        """Index keys by row; rows where the bool array left_out is True are not indexed."""
        rows = np.arange(len(keys)) if left_out is None else np.flatnonzero(~left_out)
        keys = keys[rows]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        unique = np.ones(len(sorted_keys), dtype=bool)
        if len(sorted_keys) > 1:
            repeated = sorted_keys[1:] == sorted_keys[:-1]
            unique[1:] &= ~repeated
            unique[:-1] &= ~repeated
        self.keys = sorted_keys[unique]
        self.rows = rows[order[unique]]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Return the row of each key, or -1 where no single row has it."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        position = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[position] == keys
        return np.where(found, self.rows[position], -1)


class ListenerOwners:
    """The process of each (protocol, port) on which exactly one process listens."""

    def __init__(self, sockets: pa.Table, is_open: np.ndarray | None = None) -> None:
        """Find the listeners among sockets, only among the rows is_open marks if given."""
        is_udp = pc.equal(sockets.column("protocol"), "udp").to_numpy(
            zero_copy_only=False
        )
        codes = sockets.column("state_code").to_numpy()
        listening = is_listening(codes, is_udp)
        if is_open is not None:
            listening &= is_open
        listening = np.flatnonzero(listening)
        self.rows = sockets.take(pa.array(listening, pa.int64()))

        port_keys = self._port_keys(self.rows)
        pids = self.rows.column("pid").fill_null(-1).to_numpy()
        if len(port_keys) == 0:
            self._index = KeyIndex(port_keys)
            self._row_of_port = np.empty(0, dtype=np.int64)
            return

        # A port qualifies when all its listening sockets (IPv4 and IPv6, say)
        # have one holder; an unattributed listener (-1) makes it ambiguous.
        pairs = np.unique(np.stack([port_keys, pids]), axis=1)
        ports, holders = np.unique(pairs[0], return_counts=True)
        single = ports[holders == 1]
        owned_rows = np.flatnonzero(np.isin(port_keys, single) & (pids >= 0))

        owned_ports, first = np.unique(port_keys[owned_rows], return_index=True)
        self._index = KeyIndex(owned_ports)
        self._row_of_port = owned_rows[first]

    @staticmethod
    def _port_keys(table: pa.Table) -> np.ndarray:
        is_udp = pc.equal(table.column("protocol"), "udp")
        is_udp = is_udp.to_numpy(zero_copy_only=False)
        ports = table.column("local_port").to_numpy().astype(np.int64)
        return is_udp.astype(np.int64) * 65536 + ports

    def find(self, events: pa.Table) -> np.ndarray:
        """Return the row in self.rows owning each event's local port, or -1."""
        port = self._index.find(self._port_keys(events))
        if len(self._row_of_port) == 0:
            return port
        return np.where(port >= 0, self._row_of_port[np.maximum(port, 0)], -1)


class CloseRecorder:
    """Turn close events into socket records, matched to what sampling saw.

    An event is matched by cookie when match_by_cookie (the netlink source
    stores cookies), else by protocol and four-tuple, first to the sockets
    that sampling tracks as open and then to those it closed in the last
    RECENT_SECONDS. Without cookies, an event whose remote port
    tcp_disconnect() cleared is matched by the rest of its four-tuple (see
    _close_by_endpoints). An event for a socket without a peer (a listener,
    an unconnected UDP socket, a failed connect) that matches nothing is only
    counted.
    """

    def __init__(
        self, listener: CloseListener, match_by_cookie: bool, netns: int | None = None
    ) -> None:
        """Set up matching for the events of listener.

        netns is the inode of the network namespace that the listener's socket
        reports. Four-tuples are matched only to rows of that namespace, and
        records of unseen sockets carry it.
        """
        self.listener = listener
        self.match_by_cookie = match_by_cookie
        self.netns = netns
        self.counts: Counter = Counter()
        self._recent: list[pa.Table] = []
        self._last_remembered: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._reported_losses = (0, 0)
        # Events of _close_by_endpoints that wait for the next sample.
        self._waiting: pa.Table | None = None
        # The tracker's opened_in_last_observe at the last process(), and the
        # start times of the samples of the last RECENT_SECONDS and the one
        # before, in Unix microseconds, oldest first.
        self._last_opened: np.ndarray | None = None
        self._sample_starts = np.zeros(1, dtype=np.int64)

    def process(self, tracker: LifetimeTracker, now_us: int) -> int:
        """Fold the events received so far into tracker and pending records.

        Call it after each tracker.observe with the time the sample began,
        and before each drain. A received event waits for a later call only
        when _close_by_endpoints needs the next sample to match it. A socket
        that no sample showed is linked to the only process listening on its
        port among the tracker's open rows. Returns how many TCP connections
        the events added that no sample showed.
        """
        self._note_sample(tracker, now_us)
        self._remember_closed(tracker, now_us)
        events = self.listener.take()
        self._report_losses()
        self.counts["events"] += events.num_rows
        if events.num_rows == 0 and self._waiting is None:
            return 0

        unmatched = self._close_open(events, tracker)
        unmatched = self._close_recent(unmatched)
        if not self.match_by_cookie:
            unmatched = self._close_by_endpoints(unmatched, tracker)
        return self._record_unseen(unmatched, tracker)

    def waiting(self) -> int:
        """Return how many records wait for the next drain."""
        return sum(part.num_rows for part in self._pending)

    def drain(self) -> pa.Table | None:
        """Return the records made since the last drain, or None."""
        parts, self._pending = self._pending, []
        if not parts:
            return None
        return pa.concat_tables(parts, promote_options="default")

    def stop(self) -> None:
        self.listener.stop()
        log.debug(
            "close events of network namespace %s: %s", self.netns, dict(self.counts)
        )
        if self._waiting is not None:
            log.info(
                "%d close events of network namespace %s with a cleared remote port "
                "were still waiting for a sample, so they are not recorded",
                self._waiting.num_rows,
                self.netns,
            )
            self._waiting = None

    def _note_sample(self, tracker: LifetimeTracker, now_us: int) -> None:
        """Keep now_us as a sample's start if a sample came since the last call.

        observe() assigns a new opened_in_last_observe array at every sample,
        while the call before a flush follows no sample.
        """
        opened = tracker.opened_in_last_observe
        if opened is self._last_opened:
            return
        self._last_opened = opened
        _keys, rows, _is_open = tracker.all_rows()
        if rows is None:
            return
        # Keep one start before the horizon too, because the window of an
        # event begins at the last sample that started before it.
        horizon = now_us - int(RECENT_SECONDS * 1_000_000)
        first = max(0, int(np.searchsorted(self._sample_starts, horizon)) - 1)
        self._sample_starts = np.append(self._sample_starts[first:], now_us)

    def _match_keys(self, table: pa.Table) -> np.ndarray:
        """Return the key of each row: its cookie, or its four-tuple in self.netns.

        Cookies are unique across namespaces. A four-tuple is not, so rows of
        another namespace get key 0, which KeyIndex drops as repeated.
        """
        if self.match_by_cookie:
            return table.column("cookie").fill_null(0).to_numpy()
        keys = four_tuple_keys(table)
        if self.netns is not None and "netns" in table.column_names:
            netns = table.column("netns").fill_null(-1).to_numpy()
            keys = np.where(netns == self.netns, keys, 0)
        return keys

    def _own_row_mask(self, rows: pa.Table) -> np.ndarray | bool:
        """Return which rows are of self.netns: True when either has no netns."""
        if self.netns is None or "netns" not in rows.column_names:
            return True
        return rows.column("netns").fill_null(-1).to_numpy() == self.netns

    def _own_rows(self, rows: pa.Table) -> pa.Table:
        """Return the rows of self.netns, or all rows when either has no netns."""
        own = self._own_row_mask(rows)
        return rows if own is True else rows.filter(pa.array(own))

    def _remember_closed(self, tracker: LifetimeTracker, now_us: int) -> None:
        """Keep the rows that the latest sample closed, stamped with its start time."""
        closed = tracker.closed_in_last_observe
        if closed is not None and closed is not self._last_remembered:
            closed_at = pa.repeat(pa.scalar(now_us, pa.int64()), closed.num_rows)
            closed_at = closed.append_column("closed_at_us", closed_at)
            self._recent.append(self._own_rows(closed_at))
            self._last_remembered = closed
        if not self._recent:
            return

        # Expire row by row: a part that _close_recent merged spans samples.
        # The close, not the last sight, starts the time, so that rows stay
        # matchable when samples are more than RECENT_SECONDS apart.
        horizon = now_us - int(RECENT_SECONDS * 1_000_000)
        recent = pa.concat_tables(self._recent, promote_options="default")
        keep = recent.column("closed_at_us").to_numpy() >= horizon
        self._recent = [recent.filter(pa.array(keep))] if keep.any() else []

    def _close_open(self, events: pa.Table, tracker: LifetimeTracker) -> pa.Table:
        keys, rows, is_open = tracker.all_rows()
        if events.num_rows == 0 or rows is None or rows.num_rows == 0:
            return events

        index = KeyIndex(self._match_keys(rows), left_out=~is_open)
        row_of_event = index.find(self._match_keys(events))
        matched = np.flatnonzero(row_of_event >= 0)
        # A four-tuple reused within one batch of events closes its open
        # socket once; the later events are of sockets no sample showed.
        _, first = np.unique(row_of_event[matched], return_index=True)
        if len(first) < len(matched):
            repeated = np.setdiff1d(matched, matched[first])
            row_of_event[repeated] = -1
            matched = np.sort(matched[first])
        if len(matched):
            picked = events.take(pa.array(matched, pa.int64()))
            close_tracked(tracker, keys[row_of_event[matched]], picked, rows.schema)
            self.counts["matched_open"] += len(matched)
        return events.filter(pa.array(row_of_event < 0))

    def _close_recent(self, events: pa.Table) -> pa.Table:
        if events.num_rows == 0 or not self._recent:
            return events
        recent = pa.concat_tables(self._recent, promote_options="default")
        row_of_event = KeyIndex(self._match_keys(recent)).find(self._match_keys(events))
        matched = np.flatnonzero(row_of_event >= 0)
        if len(matched):
            picked = events.take(pa.array(matched, pa.int64()))
            self._close_recent_rows(picked, recent, row_of_event[matched])
            self.counts["matched_closed"] += len(matched)
        return events.filter(pa.array(row_of_event < 0))

    def _close_recent_rows(
        self, events: pa.Table, recent: pa.Table, rows: np.ndarray
    ) -> None:
        """Record the close of recent's rows at rows, one per event, and forget them."""
        records = recent.take(pa.array(rows, pa.int64()))
        records = records.drop_columns(["closed_at_us"])
        values = {
            "last_seen_us": events.column("time_us"),
            **final_values(events, records.schema),
            **sampled_counters_where_reset(events, records),
        }
        self._pending.append(replace_columns(records, values))

        # An event matches a record once.
        keep = np.ones(recent.num_rows, dtype=bool)
        keep[rows] = False
        self._recent = [recent.filter(pa.array(keep))]

    def _close_by_endpoints(
        self, events: pa.Table, tracker: LifetimeTracker
    ) -> pa.Table:
        """Match events whose remote port tcp_disconnect() cleared, without cookies.

        What is left to match is the local port, the remote address, and the
        local address of a socket bound to one. While an open row has those
        endpoints, its socket may be the event's, so the event waits for the
        first sample that starts after it. Then the event's socket, if
        sampled, is a row that the last sample started before the event, or
        the one after, found closed. Returns the events left for
        _record_unseen.
        """
        partial = disconnected(events) & has_address(events, "remote_addr")
        parts = [events.filter(pa.array(partial))]
        if self._waiting is not None:
            parts.insert(0, self._waiting)
            self._waiting = None
        todo = pa.concat_tables(parts)
        rest = events.filter(pa.array(~partial))
        if todo.num_rows == 0:
            return rest

        with_local = has_address(todo, "local_addr")
        event_keys = endpoint_keys(todo, with_local)
        times = todo.column("time_us").to_numpy()
        ports = todo.column("local_port").to_numpy()
        open_count = self._count_open_endpoints(tracker, event_keys, with_local, ports)
        recent = (
            pa.concat_tables(self._recent, promote_options="default")
            if self._recent
            else None
        )
        wait = (open_count > 0) & (times >= self._sample_starts[-1])
        candidates = self._find_recent_endpoints(recent, event_keys, with_local, times)
        recent_row = assign_rows(candidates, times, ~wait)
        single = recent_row >= 0
        ambiguous = recent_row == AMBIGUOUS

        if single.any():
            self._close_recent_rows(
                todo.filter(pa.array(single)), recent, recent_row[single]
            )
            self.counts["matched_endpoints"] += int(single.sum())
        if wait.any():
            self._waiting = todo.filter(pa.array(wait))
        self.counts["ambiguous_endpoints"] += int(ambiguous.sum())
        unmatched = todo.filter(pa.array(~(wait | single | ambiguous)))
        return pa.concat_tables([rest, unmatched])

    def _count_open_endpoints(
        self,
        tracker: LifetimeTracker,
        event_keys: np.ndarray,
        with_local: np.ndarray,
        ports: np.ndarray,
    ) -> np.ndarray:
        """Return, per endpoint key of an event, how many open connections have it.

        ports are the events' local ports. Only rows on them are hashed.
        """
        _keys, rows, is_open = tracker.all_rows()
        counts = np.zeros(len(event_keys), dtype=np.int64)
        if rows is None:
            return counts
        on_ports = np.isin(rows.column("local_port").to_numpy(), ports)
        rows = rows.filter(pa.array(is_open & self._own_row_mask(rows) & on_ports))
        rows = tcp_connections(rows)
        for local in (True, False):
            keys = np.sort(endpoint_keys(rows, np.full(rows.num_rows, local)))
            chosen = with_local == local
            left = np.searchsorted(keys, event_keys[chosen], "left")
            counts[chosen] = np.searchsorted(keys, event_keys[chosen], "right") - left
        return counts

    def _find_recent_endpoints(
        self,
        recent: pa.Table | None,
        event_keys: np.ndarray,
        with_local: np.ndarray,
        times: np.ndarray,
    ) -> list[np.ndarray]:
        """Return, per endpoint key of an event, the recent rows the event can close.

        Such a row was last seen before the event's time, and found closed by
        the last sample that started before that time or by a later one.
        """
        found = [NO_ROWS] * len(event_keys)
        if recent is None:
            return found
        connection_rows = np.flatnonzero(is_tcp_connection(recent))
        if len(connection_rows) == 0:
            return found

        candidates = recent.take(pa.array(connection_rows, pa.int64()))
        last_seen = candidates.column("last_seen_us").to_numpy()
        closed_at = candidates.column("closed_at_us").to_numpy()
        starts = self._sample_starts
        before = np.searchsorted(starts, times, "right") - 1
        window_starts = np.where(before >= 0, starts[np.maximum(before, 0)], 0)
        for local in (True, False):
            keys = endpoint_keys(candidates, np.full(candidates.num_rows, local))
            chosen = np.flatnonzero(with_local == local)
            rows = rows_in_window(
                keys,
                last_seen,
                closed_at,
                event_keys[chosen],
                times[chosen],
                window_starts[chosen],
            )
            for position, fitting in zip(chosen.tolist(), rows):
                found[position] = connection_rows[fitting]
        return found

    def _record_unseen(self, events: pa.Table, tracker: LifetimeTracker) -> int:
        connected = events.column("remote_port").to_numpy() != 0
        aborted = aborted_connections(events)
        recorded = connected | aborted
        self.counts["unconnected"] += int((~recorded).sum())
        events = events.filter(pa.array(recorded))
        if events.num_rows == 0:
            return 0

        _keys, rows, is_open = tracker.all_rows()
        if rows is None:
            return 0
        # A listener covers the connections of its own namespace only.
        owners = ListenerOwners(rows, is_open & self._own_row_mask(rows))
        owner_row = owners.find(events)
        linked = owner_row >= 0
        self.counts["unseen"] += events.num_rows
        self.counts["aborted_unseen"] += int(aborted.sum())
        self.counts["linked_to_listener"] += int(linked.sum())

        events = events.append_column(
            pa.field("netns", pa.int64()),
            pa.repeat(pa.scalar(self.netns, pa.int64()), events.num_rows),
        )
        records = unseen_records(events, rows.schema, owners.rows, owner_row)
        self._pending.append(records)

        is_tcp = pc.equal(events.column("protocol"), "tcp")
        is_tcp = is_tcp.to_numpy(zero_copy_only=False)
        return int(is_tcp.sum())

    def _report_losses(self) -> None:
        losses = (self.listener.overruns, self.listener.dropped())
        if losses == self._reported_losses:
            return
        log.warning(
            "close events were lost: %d receive-buffer overruns (ENOBUFS) and %d "
            "events dropped by the kernel since the start; sockets that closed "
            "then are recorded only if a sample showed them",
            losses[0],
            losses[1],
        )
        self._reported_losses = losses


class NamespaceCloses:
    """One CloseRecorder per network namespace that the collector reads.

    The recorder of the collector's own namespace is made by the caller and
    stays. follow() subscribes in each other namespace when it first appears
    and stops the recorder of a namespace that is no longer read, after one
    last process() of the events it received.
    """

    def __init__(
        self,
        own: CloseRecorder,
        proc_root: str,
        subscribe: Callable[[str, Namespace], CloseListener] = subscribe_in_namespace,
    ) -> None:
        self.own = own
        self.proc_root = proc_root
        self.subscribe = subscribe
        self.recorders: dict[int | None, CloseRecorder] = {own.netns: own}
        self._leaving: list[CloseRecorder] = []
        self._stopped: list[CloseRecorder] = []
        self._failed: set[int] = set()

    def follow(self, namespaces: list[Namespace]) -> None:
        """Subscribe in the namespaces not seen before; retire those not listed."""
        listed = {namespace.inode for namespace in namespaces}
        for namespace in namespaces:
            if namespace.pid is None or namespace.inode in self.recorders:
                continue
            if namespace.inode in self._failed:
                continue
            self._add(namespace)

        for inode in set(self.recorders) - listed - {self.own.netns}:
            self._leaving.append(self.recorders.pop(inode))

    def _add(self, namespace: Namespace) -> None:
        try:
            listener = self.subscribe(self.proc_root, namespace)
        except NamespaceMoved as error:
            # The next scan of the namespaces finds another process of it.
            log.debug(
                "subscribing to network namespace %s later: %s", namespace.inode, error
            )
            return
        except CloseEventsUnavailable as error:
            self._failed.add(namespace.inode)
            log.warning(
                "close events of network namespace %s are off, so its sockets "
                "that open and close between two samples are missed: %s",
                namespace.inode,
                error,
            )
            return

        listener.start()
        self.recorders[namespace.inode] = CloseRecorder(
            listener, self.own.match_by_cookie, namespace.inode
        )

    def process(self, tracker: LifetimeTracker, now_us: int) -> dict[int | None, int]:
        """Run CloseRecorder.process for every namespace.

        Returns, per namespace inode, how many TCP connections the events
        added that no sample showed.
        """
        # Stopping first joins the reader thread, so no received event is left.
        for recorder in self._leaving:
            recorder.stop()

        added = {}
        for recorder in [*self.recorders.values(), *self._leaving]:
            added[recorder.netns] = recorder.process(tracker, now_us)
        self._stopped.extend(self._leaving)
        self._leaving = []
        return added

    def waiting(self) -> int:
        """Return how many records of every namespace wait for the next drain."""
        recorders = [*self.recorders.values(), *self._leaving, *self._stopped]
        return sum(recorder.waiting() for recorder in recorders)

    def drain(self) -> pa.Table | None:
        """Return the records of every namespace made since the last drain, or None."""
        recorders = [*self.recorders.values(), *self._leaving, *self._stopped]
        self._stopped = []
        parts = [table for table in (r.drain() for r in recorders) if table is not None]
        if not parts:
            return None
        return pa.concat_tables(parts, promote_options="default")

    def counters(self) -> dict[int | None, dict[str, int]]:
        """Return the running event totals of each namespace's listener."""
        return {
            inode: {
                "events_received": recorder.listener.received,
                "events_overruns": recorder.listener.overruns,
                "events_dropped": recorder.listener.dropped(),
            }
            for inode, recorder in self.recorders.items()
        }

    def stop(self) -> None:
        for recorder in [*self.recorders.values(), *self._leaving]:
            recorder.stop()
        self._leaving = []


def final_values(
    events: pa.Table, schema: pa.Schema, with_counters: bool = True
) -> dict[str, pa.Array]:
    """Return the cookie and counters of events, for the columns schema has.

    Without with_counters, only the cookie.
    """
    names = DIAG_COLUMNS if with_counters else ("cookie",)
    return {
        name: events.column(name).combine_chunks()
        for name in names
        if name in schema.names
    }


def close_tracked(
    tracker: LifetimeTracker, keys: np.ndarray, events: pa.Table, schema: pa.Schema
) -> None:
    """Close the open sockets of keys, one event each, at the events' times.

    A socket whose event has the counters that tcp_disconnect() reset keeps
    those of its last sample.
    """
    reset = disconnected(events)
    for chosen, with_counters in ((~reset, True), (reset, False)):
        if not chosen.any():
            continue
        part = events.filter(pa.array(chosen))
        tracker.close_keys(
            keys[chosen],
            part.column("time_us").to_numpy(),
            final_values(part, schema, with_counters),
        )


def replace_columns(table: pa.Table, values: dict) -> pa.Table:
    for name, column in values.items():
        position = table.schema.get_field_index(name)
        field = table.schema.field(position)
        table = table.set_column(position, field, column.cast(field.type))
    return table


def is_tcp_connection(table: pa.Table) -> np.ndarray:
    return is_tcp(table) & (table.column("remote_port").to_numpy() != 0)


def tcp_connections(table: pa.Table) -> pa.Table:
    return table.filter(pa.array(is_tcp_connection(table)))


def endpoint_keys(table: pa.Table, with_local: np.ndarray) -> np.ndarray:
    """Return a key per row of what tcp_disconnect() leaves of the four-tuple.

    That is the protocol, the local port and the remote address, and the
    local address of the rows where with_local is True.
    """
    local = pc.if_else(
        pa.array(with_local), table.column("local_addr").combine_chunks(), ""
    )
    partial = pa.table(
        {
            "protocol": table.column("protocol"),
            "local_addr": local,
            "local_port": table.column("local_port"),
            "remote_addr": table.column("remote_addr"),
            "remote_port": pa.array(np.zeros(table.num_rows, dtype=np.int32)),
        }
    )
    return four_tuple_keys(partial)


def unseen_records(
    events: pa.Table, template: pa.Schema, owners: pa.Table, owner_row: np.ndarray
) -> pa.Table:
    """Build records, with the columns of template, for sockets no sample showed.

    The process columns come from the listener in owner_row, or are NULL
    where it is -1. The inode is NULL because the kernel reports 0 at close.
    An aborted connection has NULL where tcp_disconnect() cleared a value
    (see clear_reset_values) and its own detected_by.
    """
    events = events.combine_chunks()
    rows = events.num_rows
    linked = owner_row >= 0
    take_owner = pa.array(np.where(linked, owner_row, 0), mask=~linked)
    time_us = events.column("time_us")

    columns = {}
    for field in template:
        if field.name in OWNER_COLUMNS and field.name in owners.column_names:
            column = owners.column(field.name).take(take_owner)
        elif field.name == "inode":
            column = pa.nulls(rows, field.type)
        elif field.name in events.column_names:
            column = events.column(field.name)
        else:
            column = pa.nulls(rows, field.type)
        columns[field.name] = column.cast(field.type)
    aborted = aborted_connections(events)
    columns = clear_reset_values(columns, aborted)

    key = four_tuple_keys(events) ^ events.column("cookie").fill_null(0).to_numpy()
    attribution = np.where(linked, ATTRIBUTED_BY_LISTENER, NEVER_SAMPLED)
    detected_by = np.where(aborted, DETECTED_BY_ABORT, DETECTED_BY_CLOSE_EVENT)
    extra = {
        "key": pa.array(key, pa.int64()),
        "state_code_last": events.column("state_code"),
        "first_seen_us": time_us,
        "last_seen_us": time_us,
        "closed": pa.array(np.ones(rows, dtype=bool)),
        "detected_by": pa.array(detected_by, pa.string()),
        "attribution": pa.array(attribution, pa.string()),
    }
    table = pa.Table.from_arrays(list(columns.values()), schema=template)
    for name, column in extra.items():
        table = table.append_column(name, column)
    return table
