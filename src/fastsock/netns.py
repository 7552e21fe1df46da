"""Read the socket tables of every network namespace on the host.

``<proc root>/<pid>/net/tcp`` lists the sockets of the network namespace that
process <pid> runs in. Reading it through one process per namespace therefore
covers every namespace that at least one process runs in. A namespace without
processes, such as one that ``ip netns add`` created and that only a bind mount
under /run/netns keeps alive, is not seen.

A namespace is named by the inode of ``<proc root>/<pid>/ns/net``, read with
stat: lstat would return the inode of the symlink itself.
"""

import logging
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from fastsock.sockets import SkipLogger, TableReport, read_socket_tables

log = logging.getLogger(__name__)

# Seconds between scans of every /proc/<pid>/ns/net for namespaces that appeared.
# A scan costs one stat per process (about 1 ms per 500 processes, an estimate),
# and a namespace created in between is missed for at most this long.
NETNS_RESCAN_SECONDS = 2.0


@dataclass(frozen=True)
class Namespace:
    """One network namespace and the proc directory that shows its tables.

    pid is None for the collector's own namespace, which is read through
    ``<proc root>/net``.
    """

    inode: int | None
    pid: int | None
    proc_dir: str


def namespace_inode(proc_root: str, pid: int) -> int | None:
    """Return the netns inode of pid, or None when it exited or is not readable."""
    path = f"{proc_root}/{pid}/ns/net"
    try:
        return os.stat(path).st_ino
    except (FileNotFoundError, ProcessLookupError):
        # The process exited, or it is a zombie, which has no namespaces.
        return None
    except PermissionError:
        # Another user's process, when fastsock does not run as root.
        log.debug("reading %s was denied", path)
        return None


def find_namespaces(proc_root: str, own_inode: int | None) -> list[Namespace]:
    """Return the collector's own namespace and one process of every other one.

    The process with the lowest pid represents each namespace.
    """
    found = [Namespace(own_inode, None, proc_root)]
    if own_inode is None:
        # A proc tree without ns links (a fixture) shows only its own tables.
        return found

    seen = {own_inode}
    for pid in _pids(proc_root):
        inode = namespace_inode(proc_root, pid)
        if inode is None or inode in seen:
            continue
        seen.add(inode)
        found.append(Namespace(inode, pid, f"{proc_root}/{pid}"))
    return found


def _pids(proc_root: str) -> list[int]:
    with os.scandir(proc_root) as entries:
        return sorted(int(entry.name) for entry in entries if entry.name.isdigit())


class NamespaceTables:
    """Read the socket tables of every network namespace, each one once per call."""

    def __init__(
        self,
        proc_root: str,
        own_inode: int | None,
        rescan_seconds: float = NETNS_RESCAN_SECONDS,
    ) -> None:
        self.proc_root = proc_root
        self.own_inode = own_inode
        self.rescan_seconds = rescan_seconds
        self.namespaces: list[Namespace] = []
        # The latest read's counts per namespace inode, for collector_stats.
        self.reports: dict[int | None, TableReport] = {}
        self._next_rescan = 0.0

    def read(self, report: TableReport, skip_logger: SkipLogger | None) -> pa.Table:
        """Return the sockets of every namespace, with a netns column of its inode."""
        if time.monotonic() >= self._next_rescan:
            self._rescan()

        tables = []
        self.reports = {}
        for namespace in list(self.namespaces):
            table = self._read_namespace(namespace, report, skip_logger)
            if table is None:
                table = self._read_after_rescan(namespace, report, skip_logger)
            if table is not None:
                tables.append(with_netns(table, namespace.inode))
        return pa.concat_tables(tables)

    def _rescan(self) -> None:
        before = {namespace.inode for namespace in self.namespaces}
        self.namespaces = find_namespaces(self.proc_root, self.own_inode)
        self._next_rescan = time.monotonic() + self.rescan_seconds

        after = {namespace.inode for namespace in self.namespaces}
        for namespace in self.namespaces:
            if namespace.inode not in before:
                log.info(
                    "reading network namespace %s through pid %s",
                    namespace.inode,
                    namespace.pid if namespace.pid is not None else "self",
                )
        for inode in before - after:
            log.info(
                "network namespace %s has no process left; stopped reading it", inode
            )

    def _read_after_rescan(
        self, namespace: Namespace, report: TableReport, skip_logger
    ) -> pa.Table | None:
        # The process read for the namespace exited. Another process of the
        # same namespace replaces it, so its sockets do not look closed.
        self._rescan()
        for candidate in self.namespaces:
            if candidate.inode == namespace.inode:
                return self._read_namespace(candidate, report, skip_logger)
        return None

    def _read_namespace(
        self, namespace: Namespace, report: TableReport, skip_logger
    ) -> pa.Table | None:
        """Read one namespace's tables; return None when its process left mid-read.

        A file of an exited process reads as missing, which read_socket_tables
        treats as empty. Checking the namespace before and after the read
        separates an empty table from a vanished process.
        """
        own_report = TableReport()
        if namespace.pid is None:
            table = read_socket_tables(namespace.proc_dir, own_report, skip_logger)
        else:
            if namespace_inode(self.proc_root, namespace.pid) != namespace.inode:
                return None
            table = read_socket_tables(namespace.proc_dir, own_report, skip_logger)
            if namespace_inode(self.proc_root, namespace.pid) != namespace.inode:
                log.debug(
                    "pid %d left network namespace %s while its tables were read",
                    namespace.pid,
                    namespace.inode,
                )
                return None

        self.reports[namespace.inode] = own_report
        report.rows += own_report.rows
        report.reads += own_report.reads
        report.bytes += own_report.bytes
        report.skipped.update(own_report.skipped)
        return table


NETNS_FIELD = pa.field("netns", pa.int64())


def with_netns(sockets: pa.Table, inode: int | None) -> pa.Table:
    """Append a netns column holding inode to every row of sockets."""
    return sockets.append_column(NETNS_FIELD, netns_column(inode, sockets.num_rows))


def netns_column(inode: int | None, rows: int) -> pa.Array:
    """Return rows values of inode (NULL for None), a slice of a cached array.

    Every sample repeats the inode of each namespace it reads, so the array
    is kept per inode. It grows to 1/8 more rows than the largest sample
    seen, so that a table that grows by a few rows does not rebuild it.
    """
    cached = _NETNS_COLUMNS.get(inode)
    if cached is None or len(cached) < rows:
        if len(_NETNS_COLUMNS) >= MAX_CACHED_NETNS_COLUMNS:
            _NETNS_COLUMNS.clear()
        cached = pa.repeat(pa.scalar(inode, pa.int64()), rows + rows // 8)
        _NETNS_COLUMNS[inode] = cached
    return cached.slice(0, rows)


# Namespaces whose netns column netns_column keeps. More are rare, and the
# cache starts over when a new one would exceed this.
MAX_CACHED_NETNS_COLUMNS = 64
_NETNS_COLUMNS: dict[int | None, pa.Array] = {}


def namespaces_read(snapshotter) -> list[Namespace]:
    """Return the namespaces whose tables the snapshotter's latest snapshot read.

    Without --all-netns that is its own namespace, read through the directory
    that snapshot.table_root picks.
    """
    if snapshotter.namespaces is not None:
        return list(snapshotter.namespaces.namespaces)

    # Imported here because fastsock.snapshot imports this module.
    from fastsock.snapshot import table_root

    return [Namespace(snapshotter.netns, None, table_root(snapshotter.proc_root))]


def reports_by_namespace(
    snapshotter, report: TableReport
) -> dict[int | None, TableReport]:
    """Return the table counts of the latest snapshot per namespace inode.

    report contains the counts of the whole snapshot, which are the own
    namespace's when the snapshotter reads only that one.
    """
    if snapshotter.namespaces is not None:
        return dict(snapshotter.namespaces.reports)
    return {snapshotter.netns: report}


def read_namespace_file(proc_root: str, namespace: Namespace, name: str) -> str | None:
    """Return the text of ``net/<name>`` of namespace, or None when unreadable.

    For a namespace read through a process, None also when that process left
    the namespace during the read: its pid may then show another namespace.
    """
    path = f"{namespace.proc_dir}/net/{name}"
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except OSError as error:
        log.debug("cannot read %s: %s", path, error)
        return None

    if namespace.pid is not None:
        if namespace_inode(proc_root, namespace.pid) != namespace.inode:
            log.debug(
                "pid %d left network namespace %s while %s was read",
                namespace.pid,
                namespace.inode,
                path,
            )
            return None
    return text
