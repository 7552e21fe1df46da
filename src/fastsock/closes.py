"""Record every socket that closes, from the kernel's sock_diag destroy events.

When a process subscribes to the sock_diag destroy multicast groups, the
kernel sends one inet_diag message for each TCP or UDP socket it destroys,
with the socket's four-tuple, cookie and final ``struct tcp_info``. The
socket's inode is already 0 by then. netlink_bind() in the kernel source
lets only CAP_NET_ADMIN join the groups of a netlink family without
NL_CFG_F_NONROOT_RECV, yet Linux 6.18 as tested (docs/performance.md) let
an unprivileged process subscribe and receive every socket's events.
SO_RCVBUFFORCE, for the large buffer, always needs CAP_NET_ADMIN.

A :class:`CloseListener` receives those events on a reader thread into a
large socket buffer, so none is lost while the sampling loop is busy. A
:class:`CloseRecorder` turns them into connection records at each sample: a
socket that sampling already tracks gets its close time and final counters,
and a socket that lived less than one sample gets a record of its own with
``detected_by = 'close_event'``.
"""

import ctypes
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.errors import FastsockError
from fastsock.lifetimes import LifetimeTracker
from fastsock.netns import Namespace
from fastsock.netlink import (
    DIAG_COLUMNS,
    _netlink,
    columns_to_table,
    open_diag_socket,
)
from fastsock.sockets import is_listening

log = logging.getLogger(__name__)

# Multicast groups of linux/sock_diag.h: SKNLGRP_INET_TCP_DESTROY (1),
# SKNLGRP_INET_UDP_DESTROY (2), SKNLGRP_INET6_TCP_DESTROY (3) and
# SKNLGRP_INET6_UDP_DESTROY (4). bind(2) takes group n as bit n - 1.
DESTROY_GROUPS = (1, 2, 3, 4)
DESTROY_GROUP_MASK = sum(1 << (group - 1) for group in DESTROY_GROUPS)

SO_RCVBUFFORCE = 33
SO_MEMINFO = 55
# SO_MEMINFO returns SK_MEMINFO_VARS (9) u32 values; SK_MEMINFO_DROPS is the
# last, the number of messages the kernel dropped for a full buffer.
MEMINFO_FORMAT = "9I"
MEMINFO_DROPS = 8

# Receive buffer requested for events, in bytes; the kernel doubles it for
# its own overhead. One event takes about 1.5 KiB of buffer (a ~400-byte
# message in its skb), so 16 MiB holds over 20,000 events queued while the
# reader thread waits for the GIL.
RECEIVE_BUFFER_BYTES = 16 * 1024 * 1024

# How long the reader thread waits for an event before checking whether it
# should stop, in milliseconds, and how many datagrams it reads per wait.
POLL_TIMEOUT_MS = 100
MAX_DATAGRAMS_PER_READ = 4096

# The reader thread hands received events over in batches, once this many
# seconds have passed since a batch's first event or it contains this many.
# At thousands of closes per second each read returns a few events, and a
# table per read made the collector spend seconds per sample building and
# concatenating them.
BATCH_SECONDS = 0.02
BATCH_EVENTS = 65536

# Seconds a record that sampling closed stays matchable by a late event. The
# kernel sends the event from a work queue after the socket left the table,
# so it can arrive just after the sample that no longer showed the socket.
RECENT_SECONDS = 5.0

# Read errors of the reader thread logged before it only counts them.
MAX_LOGGED_READ_ERRORS = 10

OWNER_COLUMNS = ("pid", "pids", "comm", "exe", "cmdline", "process_start")

# Values of the `attribution` column for records made from close events.
ATTRIBUTED_BY_LISTENER = "listener"
NEVER_SAMPLED = "unseen"


class CloseEventsUnavailable(FastsockError, OSError):
    """The kernel or the privileges do not allow subscribing to close events."""


class CloseListener:
    """Receive sock_diag close events on a reader thread until stopped.

    The socket may come from :meth:`subscribe` or be opened by the caller, for
    instance after entering another network namespace: a netlink socket
    reports the namespace it was created in.
    """

    def __init__(self, sock: socket.socket, netns: int | None = None) -> None:
        """Wrap sock; netns is the inode of its namespace, for the log only."""
        self._socket = sock
        self.netns = netns
        self._dropped_at_stop: int | None = None
        self._lock = threading.Lock()
        self._pending: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="fastsock-close-events", daemon=True
        )
        self.received = 0
        self.overruns = 0
        self.read_errors = 0

    @classmethod
    def subscribe(
        cls, receive_buffer: int = RECEIVE_BUFFER_BYTES, netns: int | None = None
    ) -> "CloseListener":
        """Open a socket bound to the destroy groups of this thread's namespace.

        Raises CloseEventsUnavailable when the kernel has no sock_diag, or
        rejects the subscription (EPERM where it requires CAP_NET_ADMIN).
        """
        try:
            sock = open_diag_socket()
        except OSError as error:
            raise CloseEventsUnavailable(error.errno, str(error)) from error

        try:
            sock.bind((0, DESTROY_GROUP_MASK))
        except OSError as error:
            sock.close()
            hint = "the kernel needs CONFIG_INET_DIAG for them"
            if isinstance(error, PermissionError):
                hint = (
                    "this kernel allows it only with CAP_NET_ADMIN, so run fastsock "
                    "as root or grant it with setcap cap_net_admin+ep"
                )
            raise CloseEventsUnavailable(
                error.errno,
                f"cannot subscribe to the sock_diag destroy groups "
                f"({error.strerror}); {hint}",
            ) from error

        set_receive_buffer(sock, receive_buffer)
        return cls(sock, netns)

    def start(self) -> None:
        self._thread.start()
        log.info(
            "listening for close events of network namespace %s on the sock_diag "
            "destroy groups",
            self.netns,
        )

    def stop(self) -> None:
        """Stop the reader thread and close the socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._dropped_at_stop = self.dropped()
        self._socket.close()
        log.info(
            "stopped listening for close events of network namespace %s: %d "
            "received, %d overruns, %d read errors",
            self.netns,
            self.received,
            self.overruns,
            self.read_errors,
        )

    def take(self) -> pa.Table:
        """Return the events received since the last call, oldest first.

        The table has the columns of the netlink source plus ``time_us``, the
        Unix time in microseconds at which the event was received.
        """
        with self._lock:
            buffers, self._pending = self._pending, []

        tables = []
        for buffer in buffers:
            columns = _netlink.to_columns(buffer)
            table = columns_to_table(columns)
            tables.append(table.append_column("time_us", pa.array(columns.time_us)))
        if not tables:
            empty = columns_to_table(_netlink.to_columns(_netlink.DiagBuffer()))
            return empty.append_column("time_us", pa.array([], pa.int64()))
        return pa.concat_tables(tables)

    def dropped(self) -> int:
        """Return how many events the kernel dropped for a full receive buffer."""
        if self._dropped_at_stop is not None:
            return self._dropped_at_stop
        try:
            raw = self._socket.getsockopt(
                socket.SOL_SOCKET, SO_MEMINFO, struct.calcsize(MEMINFO_FORMAT)
            )
        except OSError:
            # Closed socket, or a kernel without SO_MEMINFO (before 4.6).
            return 0
        return struct.unpack(MEMINFO_FORMAT, raw)[MEMINFO_DROPS]

    def _run(self) -> None:
        fd = self._socket.fileno()
        buffer = _netlink.DiagBuffer()
        deadline = None
        while not self._stop.is_set():
            # Wait no longer than the handover time of the events held.
            timeout_ms = POLL_TIMEOUT_MS
            if deadline is not None:
                timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
            overruns = buffer.overruns
            try:
                _netlink.read_events(buffer, fd, timeout_ms, MAX_DATAGRAMS_PER_READ)
            except OSError as error:
                self._report_read_error(error)
                self._stop.wait(POLL_TIMEOUT_MS / 1000)
                continue
            if buffer.overruns != overruns:
                with self._lock:
                    self.overruns += buffer.overruns - overruns

            if len(buffer) and deadline is None:
                deadline = time.monotonic() + BATCH_SECONDS
            if deadline is not None and (
                len(buffer) >= BATCH_EVENTS or time.monotonic() >= deadline
            ):
                self._hand_over(buffer)
                buffer = _netlink.DiagBuffer()
                deadline = None
        self._hand_over(buffer)

    def _hand_over(self, buffer) -> None:
        """Make the events of buffer available to take()."""
        if not len(buffer):
            return
        with self._lock:
            self._pending.append(buffer)
            self.received += len(buffer)

    def _report_read_error(self, error: OSError) -> None:
        self.read_errors += 1
        if self.read_errors <= MAX_LOGGED_READ_ERRORS:
            log.error("reading close events failed, retrying: %s", error)
        if self.read_errors == MAX_LOGGED_READ_ERRORS:
            log.error("logged %d read errors, counting further ones silently",
                      self.read_errors)


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """Ask for a receive buffer of size bytes, past rmem_max when privileged."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        return
    except PermissionError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    log.warning(
        "the close-event receive buffer is %d bytes, not %d: SO_RCVBUFFORCE needs "
        "CAP_NET_ADMIN, and net.core.rmem_max caps SO_RCVBUF. Bursts of closes "
        "may overrun it; overruns are counted in collector_stats",
        granted,
        size * 2,
    )


def open_close_listener(netns: int | None = None) -> CloseListener | None:
    """Start a CloseListener, or log once why close events are off and return None.

    The listener receives the events of the namespace this process runs in,
    whose inode netns is.
    """
    try:
        listener = CloseListener.subscribe(netns=netns)
    except CloseEventsUnavailable as error:
        log.warning(
            "close events are off, so sockets that open and close between two "
            "samples are missed; polling goes on: %s",
            error,
        )
        return None
    listener.start()
    return listener


# CLONE_NEWNET of linux/sched.h, the namespace type that setns(2) checks.
CLONE_NEWNET = 0x40000000


class NamespaceMoved(FastsockError, LookupError):
    """The process that showed a network namespace exited or left it."""


def enter_network_namespace(fd: int) -> None:
    """Move the calling thread into the network namespace that fd refers to.

    Raises OSError from setns(2): EPERM without CAP_SYS_ADMIN.
    """
    if hasattr(os, "setns"):
        # Python 3.12 and later.
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns(CLONE_NEWNET) failed: {os.strerror(errno)}")


def subscribe_in_namespace(
    proc_root: str, namespace: Namespace, receive_buffer: int = RECEIVE_BUFFER_BYTES
) -> CloseListener:
    """Subscribe to the close events of a namespace that a process of it shows.

    A netlink socket reports the namespace it was created in, so a thread made
    for this enters the namespace with setns(2), subscribes and exits. setns
    moves only the calling thread, and the thread ends there, so the other
    threads stay in their namespace. Raises NamespaceMoved when namespace.pid
    exited or runs in another namespace by now, and CloseEventsUnavailable
    when entering the namespace or subscribing fails.
    """
    path = f"{proc_root}/{namespace.pid}/ns/net"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as error:
        raise NamespaceMoved(f"{path} is gone: {error}") from error
    except OSError as error:
        raise CloseEventsUnavailable(
            error.errno, f"cannot open {path} ({error.strerror}); run fastsock as root"
        ) from error

    try:
        found = os.fstat(fd).st_ino
        if found != namespace.inode:
            raise NamespaceMoved(
                f"{path} is network namespace {found} now, not {namespace.inode}"
            )
        outcome: dict = {}
        thread = threading.Thread(
            target=_subscribe_in,
            args=(fd, namespace.inode, receive_buffer, outcome),
            name=f"fastsock-subscribe-{namespace.inode}",
        )
        thread.start()
        thread.join()
    finally:
        os.close(fd)

    if "error" in outcome:
        raise outcome["error"]
    return outcome["listener"]


def _subscribe_in(fd: int, inode: int, receive_buffer: int, outcome: dict) -> None:
    """Enter the namespace of fd and subscribe there; the caller's thread body."""
    try:
        enter_network_namespace(fd)
    except OSError as error:
        outcome["error"] = CloseEventsUnavailable(
            error.errno,
            f"cannot enter network namespace {inode} ({error.strerror}); setns "
            "needs CAP_SYS_ADMIN, so run fastsock as root",
        )
        return
    try:
        outcome["listener"] = CloseListener.subscribe(receive_buffer, inode)
    except CloseEventsUnavailable as error:
        outcome["error"] = error


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
    RECENT_SECONDS. An event for a socket without a peer (a listener, an
    unconnected UDP socket) that matches nothing is only counted.
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

    def process(self, tracker: LifetimeTracker, now_us: int) -> int:
        """Fold the events received so far into tracker and pending records.

        Call it after each tracker.observe, and before each drain so that no
        received event waits for the next sample. A socket that no sample
        showed is linked to the only process listening on its port among
        the tracker's open rows. Returns how many TCP connections the events
        added that no sample showed.
        """
        self._remember_closed(tracker, now_us)
        events = self.listener.take()
        self._report_losses()
        if events.num_rows == 0:
            return 0
        self.counts["events"] += events.num_rows

        unmatched = self._close_open(events, tracker)
        unmatched = self._close_recent(unmatched)
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
        closed = tracker.closed_in_last_observe
        if closed is not None and closed is not self._last_remembered:
            self._recent.append(self._own_rows(closed))
            self._last_remembered = closed
        if not self._recent:
            return

        # Expire row by row: a part that _close_recent merged spans samples.
        horizon = now_us - int(RECENT_SECONDS * 1_000_000)
        recent = pa.concat_tables(self._recent, promote_options="default")
        keep = recent.column("last_seen_us").to_numpy() >= horizon
        self._recent = [recent.filter(pa.array(keep))] if keep.any() else []

    def _close_open(self, events: pa.Table, tracker: LifetimeTracker) -> pa.Table:
        keys, rows, is_open = tracker.all_rows()
        if rows is None or rows.num_rows == 0:
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
            tracker.close_keys(
                keys[row_of_event[matched]],
                picked.column("time_us").to_numpy(),
                final_values(picked, rows.schema),
            )
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
            records = recent.take(pa.array(row_of_event[matched], pa.int64()))
            records = replace_columns(
                records,
                {
                    "last_seen_us": picked.column("time_us"),
                    **final_values(picked, records.schema),
                },
            )
            self._pending.append(records)
            self.counts["matched_closed"] += len(matched)

            # An event matches a record once.
            keep = np.ones(recent.num_rows, dtype=bool)
            keep[row_of_event[matched]] = False
            self._recent = [recent.filter(pa.array(keep))]
        return events.filter(pa.array(row_of_event < 0))

    def _record_unseen(self, events: pa.Table, tracker: LifetimeTracker) -> int:
        connected = events.column("remote_port").to_numpy() != 0
        self.counts["unconnected"] += int((~connected).sum())
        events = events.filter(pa.array(connected))
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
        self.counts["linked_to_listener"] += int(linked.sum())

        events = events.append_column(
            pa.field("netns", pa.int64()), pa.repeat(pa.scalar(self.netns, pa.int64()),
                                                     events.num_rows)
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


def final_values(events: pa.Table, schema: pa.Schema) -> dict[str, pa.Array]:
    """Return the cookie and counters of events, for the columns schema has."""
    return {
        name: events.column(name).combine_chunks()
        for name in DIAG_COLUMNS
        if name in schema.names
    }


def replace_columns(table: pa.Table, values: dict) -> pa.Table:
    for name, column in values.items():
        position = table.schema.get_field_index(name)
        field = table.schema.field(position)
        table = table.set_column(position, field, column.cast(field.type))
    return table


def unseen_records(
    events: pa.Table, template: pa.Schema, owners: pa.Table, owner_row: np.ndarray
) -> pa.Table:
    """Build records, with the columns of template, for sockets no sample showed.

    The process columns come from the listener in owner_row, or are NULL
    where it is -1. The inode is NULL because the kernel reports 0 at close.
    """
    rows = events.num_rows
    linked = owner_row >= 0
    take_owner = pa.array(np.where(linked, owner_row, 0), mask=~linked)
    time_us = events.column("time_us")

    arrays, fields = [], []
    for field in template:
        if field.name in OWNER_COLUMNS and field.name in owners.column_names:
            column = owners.column(field.name).take(take_owner)
        elif field.name == "inode":
            column = pa.nulls(rows, field.type)
        elif field.name in events.column_names:
            column = events.column(field.name)
        else:
            column = pa.nulls(rows, field.type)
        arrays.append(column.cast(field.type))
        fields.append(field)

    key = four_tuple_keys(events) ^ events.column("cookie").fill_null(0).to_numpy()
    attribution = np.where(linked, ATTRIBUTED_BY_LISTENER, NEVER_SAMPLED)
    extra = {
        "key": pa.array(key, pa.int64()),
        "state_code_last": events.column("state_code"),
        "first_seen_us": time_us,
        "last_seen_us": time_us,
        "closed": pa.array(np.ones(rows, dtype=bool)),
        "detected_by": pa.repeat(pa.scalar("close_event"), rows),
        "attribution": pa.array(attribution, pa.string()),
    }
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    for name, column in extra.items():
        table = table.append_column(name, column)
    return table
