"""Take one snapshot: every TCP and UDP socket with the processes that hold it."""

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fastsock.errors import ProcReadError
from fastsock.netlink import DIAG_FIELDS, diag_null_columns, with_diag_columns
from fastsock.netns import NETNS_FIELD, NamespaceTables, netns_column, with_netns
from fastsock.processes import RESOLVED_SCHEMA, Attributor
from fastsock.procfs import DEFAULT_PROC_ROOT, PROC_ROOT_ENV, resolve_proc_root
from fastsock.sockets import (
    SAMPLE_SCHEMA,
    SOCKET_FILES,
    SkipLogger,
    TableReport,
    parsed_to_table,
    read_socket_columns,
)

log = logging.getLogger(__name__)

# Sources of the socket tables that a Snapshotter reads (see Snapshotter.__init__).
SOURCES = ("proc", "netlink")

# Columns of Snapshotter.read_sockets with the proc source of one namespace.
PROC_SOCKETS_SCHEMA = pa.schema([*SAMPLE_SCHEMA, *DIAG_FIELDS, NETNS_FIELD])

# Columns that attribution adds to each socket row, after the socket columns.
OWNER_COLUMNS = ("pid", "pids", "comm", "exe", "cmdline", "process_start")

# The inodes of an empty sample, passed to Attributor.resolve.
NO_INODES = np.empty(0, dtype=np.int64)


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


def check_socket_tables(proc_root: str) -> None:
    """Raise ProcReadError unless proc_root shows at least one socket table.

    The tables are read under table_root(proc_root). One of net/tcp, net/tcp6,
    net/udp and net/udp6 is enough, because a kernel without IPv6 and a fixture
    tree have only some. A directory with none of them is not a proc tree, and
    reading it would record no socket.
    """
    root = table_root(proc_root)
    paths = [f"net/{name}" for name, _protocol, _family in SOCKET_FILES]
    if any(os.path.exists(f"{root}/{path}") for path in paths):
        return
    expected = ", ".join(paths[:-1]) + f" or {paths[-1]}"
    raise ProcReadError(
        f"proc root {proc_root!r} has no {expected} under {root!r}; pass "
        f"--proc-root or set {PROC_ROOT_ENV} to the root of a proc filesystem, "
        f"such as /proc or a host's /proc mounted in a container"
    )


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
        if source == "proc":
            check_socket_tables(self.proc_root)
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
            parsed = read_socket_columns(
                table_root(self.proc_root), stats.tables, self.skip_logger
            )
            # One table with every column, so each column is one chunk and
            # no column is appended afterwards.
            extra = diag_null_columns(parsed.rows)
            extra.append(netns_column(self.netns, parsed.rows))
            return parsed_to_table(parsed, SOCKET_FILES, extra, PROC_SOCKETS_SCHEMA)
        if "netns" not in sockets.column_names:
            sockets = with_netns(sockets, self.netns)
        return sockets

    def attribute(self, sockets: pa.Table) -> pa.Table:
        """Append the OWNER_COLUMNS of each row's inode to sockets."""
        if sockets.num_rows == 0:
            # A collector's sample with no new socket and no TIME_WAIT row.
            # resolve() still runs, because it notices exited processes.
            self.attributor.resolve(NO_INODES)
            return _with_null_owners(sockets, RESOLVED_SCHEMA)
        owners = self.attributor.resolve(sockets.column("inode").to_numpy())
        return join_owners(sockets, owners)


def join_owners(sockets: pa.Table, owners: pa.Table) -> pa.Table:
    """Append the owner columns of each socket's inode to the socket rows.

    owners has one row per inode. Inode 0 (TIME_WAIT and request sockets) is
    never matched to a process.
    """
    if owners.column("pid").null_count == owners.num_rows:
        # No inode has an owner (a sample of only TIME_WAIT rows, say).
        return _with_null_owners(sockets, owners.schema)

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


def _with_null_owners(sockets: pa.Table, owner_schema: pa.Schema) -> pa.Table:
    """Append the OWNER_COLUMNS of owner_schema to sockets, all NULL, in one step."""
    schema, empty = _owned_schema(sockets.schema, owner_schema)
    if sockets.num_rows == 0:
        return empty
    owner_types = schema.types[sockets.num_columns :]
    nulls = [null_column(type_, sockets.num_rows) for type_ in owner_types]
    return pa.Table.from_arrays([*sockets.columns, *nulls], schema=schema)


def _owned_schema(
    socket_schema: pa.Schema, owner_schema: pa.Schema
) -> tuple[pa.Schema, pa.Table]:
    """Return socket_schema followed by the OWNER_COLUMNS fields of owner_schema.

    The empty table of that schema comes with it. A collector joins the same
    two schemas at every sample, so the latest result is kept. Schema.equals
    compares in C++, which costs less than hashing the schemas for a
    dictionary.
    """
    cached = _OWNED_SCHEMA
    if (
        cached is not None
        and cached[0].equals(socket_schema)
        and cached[1].equals(owner_schema)
    ):
        return cached[2], cached[3]
    fields = [owner_schema.field(name) for name in OWNER_COLUMNS]
    schema = pa.schema([*socket_schema, *fields], metadata=socket_schema.metadata)
    empty = schema.empty_table()
    _set_owned_schema((socket_schema, owner_schema, schema, empty))
    return schema, empty


def _set_owned_schema(entry: tuple[pa.Schema, pa.Schema, pa.Schema, pa.Table]) -> None:
    global _OWNED_SCHEMA
    _OWNED_SCHEMA = entry


# The latest (socket schema, owner schema, joined schema, its empty table) of
# _owned_schema.
_OWNED_SCHEMA: tuple[pa.Schema, pa.Schema, pa.Schema, pa.Table] | None = None


def null_column(type_: pa.DataType, rows: int) -> pa.Array:
    """Return rows NULL values of type_, a slice of a cached array.

    Samples with no owned socket append the same NULL owner columns each
    time, so the arrays are kept per type. Requests of more than
    MAX_CACHED_NULL_ROWS rows get an array of their own.
    """
    if rows > MAX_CACHED_NULL_ROWS:
        return pa.nulls(rows, type_)
    cached = _NULL_COLUMNS.get(type_)
    if cached is None:
        cached = pa.nulls(MAX_CACHED_NULL_ROWS, type_)
        _NULL_COLUMNS[type_] = cached
    return cached.slice(0, rows)


# Rows of the all-NULL arrays by type that null_column slices.
MAX_CACHED_NULL_ROWS = 4096
_NULL_COLUMNS: dict[pa.DataType, pa.Array] = {}


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
