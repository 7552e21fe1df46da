"""Subscribe to the kernel's sock_diag destroy events and receive them on a thread.

When a process subscribes to the sock_diag destroy multicast groups, the
kernel sends one inet_diag message for each TCP or UDP socket it destroys,
with the socket's four-tuple, cookie and final ``struct tcp_info``. The
socket's inode is already 0 by then. netlink_bind() in the kernel source
lets only CAP_NET_ADMIN join the groups of a netlink family without
NL_CFG_F_NONROOT_RECV, yet Linux 6.18 as tested (docs/performance.md) let
an unprivileged process subscribe and receive every socket's events.
SO_RCVBUFFORCE, for the large buffer, always needs CAP_NET_ADMIN.

A :class:`CloseListener` receives those events on a reader thread into a
large socket buffer, so none is lost while the sampling loop is busy.
"""

import ctypes
import logging
import os
import socket
import struct
import threading
import time

import pyarrow as pa

from fastsock.errors import FastsockError
from fastsock.netlink import _netlink, columns_to_table, open_diag_socket
from fastsock.netns import Namespace

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

# Read errors of the reader thread logged before it only counts them.
MAX_LOGGED_READ_ERRORS = 10


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

        The table has the columns of the netlink source plus ``rcv_space``
        (tcpi_rcv_space, NULL without tcp_info) and ``time_us``, the Unix
        time in microseconds at which the event was received.
        """
        with self._lock:
            buffers, self._pending = self._pending, []

        tables = [events_table(buffer) for buffer in buffers]
        if not tables:
            return events_table(_netlink.DiagBuffer())
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
            log.error(
                "logged %d read errors, counting further ones silently",
                self.read_errors,
            )


def events_table(buffer) -> pa.Table:
    """Build the table of take() from one DiagBuffer of events."""
    columns = _netlink.to_columns(buffer)
    table = columns_to_table(columns)
    rcv_space = pa.array(columns.rcv_space, mask=~columns.has_counters)
    table = table.append_column("rcv_space", rcv_space)
    return table.append_column("time_us", pa.array(columns.time_us))


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
