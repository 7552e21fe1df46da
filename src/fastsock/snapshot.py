"""Take one snapshot: every TCP and UDP socket with the processes that hold it."""

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fastsock.netlink import with_diag_columns
from fastsock.netns import NamespaceTables, with_netns
from fastsock.procfs import DEFAULT_PROC_ROOT, resolve_proc_root
from fastsock.processes import Attributor
from fastsock.sockets import SkipLogger, TableReport, read_socket_tables

log = logging.getLogger(__name__)

# Sources of the socket tables that a Snapshotter reads (see Snapshotter.__init__).
SOURCES = ("proc", "netlink")

# Columns that attribution adds to each socket row, after the socket columns.
OWNER_COLUMNS = ("pid", "pids", "comm", "exe", "cmdline", "process_start")


def table_root(proc_root: str) -> str:
    """Return the directory whose ``net/`` holds the socket tables to read.

    ``/proc/net`` shows the namespace of the reading process, which is what
    the default proc root should read. Another proc root is a host's /proc
    mounted into a container, where ``<proc_root>/net`` would still show the
    container's namespace: there the tables of pid 1, the host's init, are
    read. A fixture tree without ``1/net`` is read as it is.
    """
    if proc_root == DEFAULT_PROC_ROOT:
        return proc_root
    if os.path.isdir(f"{proc_root}/1/net"):
        return f"{proc_root}/1"
    return proc_root


def read_netns(proc_root: str) -> int | None:
    """Return the inode of the network namespace whose tables proc_root shows.

    This is stat (not lstat) of the namespace link of the process whose
    tables are read (see table_root). A fixture tree without that link has
    no namespace: None.
    """
    root = table_root(proc_root)
    link = f"{root}/ns/net" if root != proc_root else f"{proc_root}/self/ns/net"
    try:
        return os.stat(link).st_ino
    except OSError:
        return None


@dataclass
class SnapshotStats:
    """Cost and counts of one snapshot."""

    time_us: int = 0
    duration_s: float = 0.0
    sockets: int = 0
    unattributed: int = 0
    tables: TableReport = field(default_factory=TableReport)


class Snapshotter:
    """Take snapshots of one proc root, reusing attribution between them."""

    def __init__(
        self, proc_root=None, host: str | None = None, source: str = "proc"
    ) -> None:
        """Set up snapshots of proc_root's sockets, read from source.

        source is ``proc`` (the text tables under ``<proc_root>/net``) or
        ``netlink`` (sock_diag dumps of the namespace this process runs in,
        which add the socket cookie and TCP counters). Processes are always
        read under proc_root.
        """
        if source not in SOURCES:
            raise ValueError(
                f"unknown socket source {source!r}; use one of {', '.join(SOURCES)}"
            )
        self.proc_root = resolve_proc_root(proc_root)
        if source == "netlink" and self.proc_root != DEFAULT_PROC_ROOT:
            raise ValueError(
                f"the netlink source dumps the sockets of the kernel namespace "
                f"fastsock runs in, which would be joined with the processes of "
                f"proc root {self.proc_root}; use --source proc with --proc-root"
            )
        self.host = host or socket.gethostname()
        self.netns = read_netns(self.proc_root)
        self.attributor = Attributor(self.proc_root)
        self.skip_logger = SkipLogger()
        self.source = source
        self.netlink = None
        if source == "netlink":
            from fastsock.netlink import NetlinkReader

            self.netlink = NetlinkReader()

        # Set by read_all_netns(); None reads only this process's namespace.
        self.namespaces = None

    def read_all_netns(self) -> None:
        """Read every network namespace's tables, through one process in each.

        Without this, a Snapshotter reads the namespace of the process it runs
        in. Raises ValueError with the netlink source, which dumps only the
        namespace that this process runs in.
        """
        if self.netlink is not None:
            raise ValueError(
                "reading every network namespace needs the proc source, because "
                "netlink dumps only this process's namespace; use --source proc"
            )
        self.namespaces = NamespaceTables(self.proc_root, self.netns)

    def take(self, stats: SnapshotStats | None = None) -> pa.Table:
        """Return the current sockets with their owners, one row per socket."""
        stats = stats if stats is not None else SnapshotStats()
        started = time.perf_counter()
        stats.time_us = time.time_ns() // 1000

        table = self.attribute(self.read_sockets(stats))

        stats.sockets = table.num_rows
        stats.unattributed = table.column("pid").null_count
        stats.duration_s = time.perf_counter() - started
        return table

    def read_sockets(self, stats: SnapshotStats) -> pa.Table:
        """Return the current sockets without owners, counting the read in stats.

        The table has the socket columns, the netlink columns (NULL with the
        proc source) and netns. Its string columns point into the parser's
        buffers, so building it copies no text.
        """
        if self.netlink is not None:
            sockets = self.netlink.read(stats.tables)
        elif self.namespaces is not None:
            sockets = self.namespaces.read(stats.tables, self.skip_logger)
            sockets = with_diag_columns(sockets)
        else:
            sockets = read_socket_tables(
                table_root(self.proc_root), stats.tables, self.skip_logger
            )
            sockets = with_diag_columns(sockets)
        if "netns" not in sockets.column_names:
            sockets = with_netns(sockets, self.netns)
        return sockets

    def attribute(self, sockets: pa.Table) -> pa.Table:
        """Append the OWNER_COLUMNS of each row's inode to sockets."""
        owners = self.attributor.resolve(sockets.column("inode").to_numpy())
        return join_owners(sockets, owners)


def join_owners(sockets: pa.Table, owners: pa.Table) -> pa.Table:
    """Append the owner columns of each socket's inode to the socket rows.

    owners has one row per inode. Inode 0 (TIME_WAIT and request sockets) is
    never matched to a process.
    """
    inodes = sockets.column("inode").to_numpy()
    owner_inodes = owners.column("inode").to_numpy()
    order = np.argsort(owner_inodes, kind="stable")
    sorted_inodes = owner_inodes[order]

    position = np.searchsorted(sorted_inodes, inodes)
    in_range = np.minimum(position, max(len(sorted_inodes) - 1, 0))
    if len(sorted_inodes):
        found = (sorted_inodes[in_range] == inodes) & (inodes != 0)
    else:
        found = np.zeros(len(inodes), dtype=bool)
    indices = pa.array(order[in_range] if len(order) else in_range, mask=~found)

    for name in OWNER_COLUMNS:
        column = owners.column(name)
        if len(order):
            values = column.take(indices)
        else:
            values = pa.nulls(len(inodes), column.type)
        sockets = sockets.append_column(owners.schema.field(name), values)
    return sockets


def sample(proc_root=None) -> pa.Table:
    """Return the sockets of this machine now, with their owners, as an Arrow table.

    proc_root defaults to ``$FASTSOCK_PROC_ROOT``, else ``/proc``.
    """
    snapshotter = Snapshotter(proc_root)
    stats = SnapshotStats()
    table = snapshotter.take(stats)
    rows = table.num_rows

    time_us = pa.scalar(stats.time_us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    table = table.add_column(0, "ts", pa.repeat(time_us, rows))
    table = table.add_column(1, "host", pa.repeat(pa.scalar(snapshotter.host), rows))
    # take() puts netns after the socket columns; the API shows it third.
    netns = table.column("netns")
    table = table.drop_columns(["netns"])
    return table.add_column(2, pa.field("netns", pa.int64()), netns)
