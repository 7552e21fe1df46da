"""Attribute socket inodes to the processes that hold them.

The kernel's socket tables give an inode per socket but no process. A process
holds a socket when one of its ``/proc/<pid>/fd/<n>`` links points to
``socket:[<inode>]``. Forked workers share a listener, so one inode can have
several holders, and every holder is kept.

Walking every fd of every process is the expensive step, so an
:class:`Attributor` keeps the (inode, pid) pairs of its last walk and walks
again only when a requested inode is missing from them. On Linux 6.2 and
later the st_size of ``/proc/<pid>/fd`` is the number of open fds, and a
rescan then reads only the processes whose count changed.

A process is identified by its pid and its start time (field 22 of
``/proc/<pid>/stat``), so a pid that the kernel reuses for a new process gets
new process info.
"""

import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fastsock import schema
from fastsock.core import load_extension
from fastsock.errors import CoreNotBuiltError
from fastsock.procfs import resolve_proc_root
from fastsock.schema import TIMESTAMP

try:
    from fastsock import _fdscan
except ImportError as error:
    raise CoreNotBuiltError(
        "the compiled fd walk fastsock._fdscan cannot be imported. Build it with "
        "'python setup.py build_ext --inplace' in the source tree"
    ) from error

_keyindex = load_extension("_keyindex")

logger = logging.getLogger(__name__)

# Since Linux 6.2, the st_size of /proc/<pid>/fd is the number of open fds
# (kernel docs, Documentation/filesystems/proc.rst, section "/proc/<pid>/fd").
# Older kernels report 0.
FD_COUNT_KERNEL = (6, 2)

# Unparsable /proc/<pid>/stat files logged per Attributor. Later ones are only
# counted in stats["stat_parse_errors"].
MAX_LOGGED_PARSE_ERRORS = 10

# Field 22 of /proc/<pid>/stat, counted from the fields after the comm: the
# text after the last ')' starts at field 3 (state).
STAT_PPID_INDEX = 4 - 3
STAT_STARTTIME_INDEX = 22 - 3

RESOLVED_SCHEMA = pa.schema([pa.field("inode", pa.int64()), *schema.PROCESS_FIELDS])

PROCESS_SCHEMA = pa.schema(
    [
        schema.PROCESSES.field(name)
        for name in ("pid", "ppid", "comm", "exe", "cmdline", "uid", "start_time")
    ]
)

# Counters of Attributor.stats, summed over the Attributor's life.
STAT_COUNTERS = {
    "resolves": "calls to resolve()",
    "inodes_requested": "distinct non-zero inodes passed to resolve()",
    "inodes_unowned": "requested inodes that no readable process holds",
    "full_walks": "walks of the fd links of every process",
    "partial_walks": "rescans of only the processes whose fd count changed",
    "fallback_walks": "full walks after a partial walk left inodes unknown",
    "processes_unchanged": "processes that a partial walk skipped",
    "processes_scanned": "pid directories whose fd directory a walk looked at",
    "processes_vanished": "processes that exited during a walk (ENOENT, ESRCH)",
    "fd_dirs_denied": "fd directories or fd links denied (EACCES, EPERM)",
    "fd_dirs_failed": "fd directories that failed to open for another reason",
    "fds_read": "fd links read",
    "fds_vanished": "fds closed between listing and readlink",
    "fds_denied": "fd links whose readlink was denied",
    "process_reads_vanished": "processes that exited before their stat was read",
    "process_reads_denied": "processes whose stat file was denied",
    "stat_parse_errors": "/proc/<pid>/stat files that failed to parse",
}


@dataclass(frozen=True)
class StatFields:
    """The fields of /proc/<pid>/stat that fastsock uses."""

    comm: str
    ppid: int
    start_ticks: int


@dataclass(frozen=True)
class ProcessInfo:
    """One process, identified by (pid, start_ticks)."""

    pid: int
    ppid: int
    comm: str | None
    exe: str | None
    cmdline: str | None
    uid: int | None
    start_ticks: int
    start_time_us: int | None


# Stands in for a holder that exited before its stat file was read.
UNKNOWN_PROCESS = ProcessInfo(
    pid=0,
    ppid=0,
    comm=None,
    exe=None,
    cmdline=None,
    uid=None,
    start_ticks=0,
    start_time_us=None,
)


def decode_text(raw: bytes) -> str:
    """Decode kernel text, keeping undecodable bytes visible as \\xNN escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


def parse_stat(text: bytes) -> StatFields:
    """Parse the comm, ppid and start time out of a /proc/<pid>/stat line.

    The comm is whatever the process named itself, so it can contain spaces
    and ')'. It runs from the first '(' to the last ')'. Raise ValueError on
    any other shape.
    """
    open_paren = text.find(b"(")
    close_paren = text.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"no '(comm)' in stat line {text!r}")

    fields = text[close_paren + 1 :].split()
    if len(fields) <= STAT_STARTTIME_INDEX:
        raise ValueError(
            f"stat line has {len(fields) + 2} fields, expected at least 22: {text!r}"
        )

    return StatFields(
        comm=decode_text(text[open_paren + 1 : close_paren]),
        ppid=int(fields[STAT_PPID_INDEX]),
        start_ticks=int(fields[STAT_STARTTIME_INDEX]),
    )


def parse_cmdline(raw: bytes) -> str | None:
    """Join the NUL-separated arguments of /proc/<pid>/cmdline with spaces.

    Return None for an empty cmdline, which is what kernel threads and zombies
    show. A process that rewrote its argv into one string with spaces comes
    out unchanged.
    """
    arguments = raw.rstrip(b"\0").split(b"\0")
    joined = b" ".join(arguments)
    if not joined:
        return None
    return decode_text(joined)


def parse_real_uid(status: bytes) -> int | None:
    """Return the real uid from the 'Uid:' line of /proc/<pid>/status."""
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1])
    return None


def parse_btime(stat: bytes) -> int | None:
    """Return the boot time in Unix seconds from the 'btime' line of /proc/stat."""
    for line in stat.splitlines():
        if line.startswith(b"btime "):
            value = line.split()[1]
            if value.isdigit():
                return int(value)
    return None


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def kernel_version() -> tuple[int, int]:
    """Return (major, minor) of the running kernel, or (0, 0) if unparsable."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if match is None:
        return (0, 0)
    return (int(match.group(1)), int(match.group(2)))


def fd_counts_available(proc_root: str) -> bool:
    """Check whether stat() of <proc_root>/<pid>/fd gives the number of open fds.

    That needs Linux 6.2 or later and a real procfs at proc_root. A fixture
    tree has no 'self' link, and an older kernel reports st_size 0.
    """
    if kernel_version() < FD_COUNT_KERNEL:
        return False
    try:
        return os.stat(f"{proc_root}/self/fd").st_size > 0
    except OSError:
        return False


def as_inode_array(inodes: object) -> np.ndarray:
    """Convert the caller's inodes to a 1-D int64 array, or raise ValueError."""
    array = np.asarray(inodes)
    if array.ndim != 1:
        raise ValueError(
            f"inodes must be a 1-D array, got shape {array.shape}. Pass the inode "
            f"column of the socket table"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"inodes must be integers, got dtype {array.dtype}. Pass the int64 "
            f"inode column of the socket table"
        )
    return array.astype(np.int64, copy=False)


def _unowned_table(inodes: list[int]) -> pa.Table:
    """Return a RESOLVED_SCHEMA table of inodes whose process columns are all NULL."""
    columns = [pa.array(inodes, type=pa.int64())]
    columns += [pa.nulls(len(inodes), field.type) for field in RESOLVED_SCHEMA][1:]
    return pa.Table.from_arrays(columns, schema=RESOLVED_SCHEMA)


# The tables that resolve() returns when no inode, or only inode 0, is requested.
UNOWNED_NONE = _unowned_table([])
UNOWNED_ZERO = _unowned_table([0])


class HolderTable:
    """(inode, pid) pairs from the fd walks, sorted by inode and then pid.

    A pair means that the process had an fd link to ``socket:[inode]`` when
    its fd directory was last read. Each pair appears once, even when a
    process holds the socket through several fds.
    """

    def __init__(self) -> None:
        self.inodes = np.empty(0, dtype=np.int64)
        self.pids = np.empty(0, dtype=np.int32)
        self.distinct_pids = np.empty(0, dtype=np.int32)

    def replace_all(self, inodes: np.ndarray, pids: np.ndarray) -> None:
        self._store(inodes, pids)

    def replace_pids(
        self, rescanned: np.ndarray, inodes: np.ndarray, pids: np.ndarray
    ) -> None:
        """Drop the pairs of the rescanned pids, then add the pairs of their rescan."""
        kept = ~np.isin(self.pids, rescanned)
        self._store(
            np.concatenate([self.inodes[kept], inodes]),
            np.concatenate([self.pids[kept], pids]),
        )

    def drop_pids(self, pids: np.ndarray) -> None:
        if pids.size:
            self.replace_pids(pids, self.inodes[:0], self.pids[:0])

    def contains(self, inodes: np.ndarray) -> np.ndarray:
        """Return a boolean mask of the inodes that have at least one holder."""
        _, counts = self.find(inodes)
        return counts > 0

    def find(self, inodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return, per inode, the index of its first pair and its number of pairs."""
        first = np.searchsorted(self.inodes, inodes, side="left")
        end = np.searchsorted(self.inodes, inodes, side="right")
        return first, end - first

    def _store(self, inodes: np.ndarray, pids: np.ndarray) -> None:
        order = np.lexsort((pids, inodes))
        inodes = inodes[order]
        pids = pids[order]

        # Sorted pairs are duplicates exactly when they equal their predecessor.
        unique = np.ones(inodes.size, dtype=bool)
        unique[1:] = (inodes[1:] != inodes[:-1]) | (pids[1:] != pids[:-1])

        self.inodes = inodes[unique]
        self.pids = pids[unique]
        self.distinct_pids = np.unique(self.pids)


class FdCounts:
    """The fd count of every process at its last scan, sorted by pid."""

    def __init__(self, pids: np.ndarray, counts: np.ndarray) -> None:
        order = np.argsort(pids, kind="stable")
        self.pids = pids[order]
        self.counts = counts[order]

    def changed(self, pids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Return the pids that are new, or whose count differs or is unknown (-1)."""
        if self.pids.size == 0:
            return pids

        position = np.minimum(np.searchsorted(self.pids, pids), self.pids.size - 1)
        known = self.pids[position] == pids
        same = known & (self.counts[position] == counts) & (counts >= 0)
        return pids[~same]

    def gone(self, pids: np.ndarray) -> np.ndarray:
        """Return the pids of this table that are missing from pids."""
        return np.setdiff1d(self.pids, pids)

    def updated(
        self, removed: np.ndarray, pids: np.ndarray, counts: np.ndarray
    ) -> "FdCounts":
        """Return a copy without the removed pids and with the given counts added."""
        kept = ~np.isin(self.pids, removed)
        return FdCounts(
            np.concatenate([self.pids[kept], pids]),
            np.concatenate([self.counts[kept], counts]),
        )


class ProcessReader:
    """Reader of the per-process files under a proc root.

    A process that exits or denies access is normal: its read returns None
    and adds to a counter in ``stats``, which the caller owns.
    """

    def __init__(self, proc_root: str, stats: dict[str, int]) -> None:
        self.proc_root = proc_root
        self.stats = stats
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        self._boot_time: int | None = None
        self._boot_time_read = False

    def read_stat(self, pid: int) -> StatFields | None:
        path = f"{self.proc_root}/{pid}/stat"
        try:
            text = read_bytes(path)
        except (FileNotFoundError, ProcessLookupError):
            logger.debug("pid %d exited before %s was read", pid, path)
            self.stats["process_reads_vanished"] += 1
            return None
        except PermissionError:
            logger.debug("reading %s was denied", path)
            self.stats["process_reads_denied"] += 1
            return None

        try:
            return parse_stat(text)
        except ValueError as error:
            self._report_parse_error(path, error)
            return None

    def read_process(self, pid: int, fields: StatFields) -> ProcessInfo:
        """Read the rest of a process's info, given its parsed stat line."""
        return ProcessInfo(
            pid=pid,
            ppid=fields.ppid,
            comm=fields.comm,
            exe=self._read_exe(pid),
            cmdline=self._read_cmdline(pid),
            uid=self._read_uid(pid),
            start_ticks=fields.start_ticks,
            start_time_us=self._start_time_us(fields.start_ticks),
        )

    def _read_exe(self, pid: int) -> str | None:
        # ENOENT for kernel threads and zombies, EACCES for other users' processes.
        try:
            return decode_text(os.readlink(os.fsencode(f"{self.proc_root}/{pid}/exe")))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            return None

    def _read_cmdline(self, pid: int) -> str | None:
        try:
            return parse_cmdline(read_bytes(f"{self.proc_root}/{pid}/cmdline"))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            return None

    def _read_uid(self, pid: int) -> int | None:
        try:
            return parse_real_uid(read_bytes(f"{self.proc_root}/{pid}/status"))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            return None

    def _start_time_us(self, start_ticks: int) -> int | None:
        """Convert clock ticks after boot to Unix microseconds (None without btime)."""
        boot_time = self._read_boot_time()
        if boot_time is None:
            return None
        return boot_time * 1_000_000 + start_ticks * 1_000_000 // self.clock_ticks

    def _read_boot_time(self) -> int | None:
        if self._boot_time_read:
            return self._boot_time
        self._boot_time_read = True

        path = f"{self.proc_root}/stat"
        try:
            self._boot_time = parse_btime(read_bytes(path))
        except OSError as error:
            logger.warning(
                "process_start is NULL for every process: reading %s failed (%s)",
                path,
                error,
            )
            return None
        if self._boot_time is None:
            logger.warning(
                "process_start is NULL for every process: %s has no 'btime' line", path
            )
        return self._boot_time

    def _report_parse_error(self, path: str, error: ValueError) -> None:
        self.stats["stat_parse_errors"] += 1
        count = self.stats["stat_parse_errors"]
        if count <= MAX_LOGGED_PARSE_ERRORS:
            logger.warning("skipping the process of %s: %s", path, error)
        if count == MAX_LOGGED_PARSE_ERRORS:
            logger.warning(
                "logged %d unparsable stat files, counting further ones silently",
                count,
            )


class Attributor:
    """Map socket inodes to the processes holding them, with a cache across calls.

    The cached (inode, pid) pairs cover every socket that the walks saw, not
    only the requested ones, so a socket requested later needs no walk. The
    inodes that a full walk found no holder for are remembered only while
    they are requested, so pass every inode of one sample in one resolve()
    call. An Attributor is not thread-safe.

    NOTE: a known inode is not looked up again, so a process that gains a
    known socket (a new forked worker inheriting a listener) is added to the
    holders only at the next walk, which the next unknown inode triggers.
    """

    def __init__(
        self,
        proc_root: "str | os.PathLike[str] | None" = None,
        *,
        rescan_changed_only: bool | None = None,
    ) -> None:
        """Set up attribution for the processes under proc_root.

        proc_root: see resolve_proc_root.

        rescan_changed_only: rescan only the processes whose fd count changed,
        when a requested inode is unknown. None enables it when the st_size of
        <proc_root>/<pid>/fd is the fd count (Linux 6.2 and later).
        """
        self.proc_root = resolve_proc_root(proc_root)
        if rescan_changed_only is None:
            rescan_changed_only = fd_counts_available(self.proc_root)
        self.rescan_changed_only = rescan_changed_only

        self._holders = HolderTable()
        self._fd_counts: FdCounts | None = None
        self._unowned = np.empty(0, dtype=np.int64)
        # The latest listing of the proc root's pids (as bytes of the int32
        # array), and the generation after its exits were handled (see
        # _forget_exited).
        self._listing = b""
        self._listed_generation = -1

        # Process info by pid. A pid in _verified had its start time checked
        # since its fd directory was last read, so the info is still its own.
        self._processes: dict[int, ProcessInfo] = {}
        self._verified: set[int] = set()
        self._last_holders: list[ProcessInfo] = []

        self._stats = dict.fromkeys(STAT_COUNTERS, 0)
        self._reader = ProcessReader(self.proc_root, self._stats)
        self._warned_partial = False

        # Counts changes of the cached pairs: walks and the exits of holders.
        self.generation = 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over this Attributor's life (see STAT_COUNTERS)."""
        return dict(self._stats)

    def resolve(self, inodes: "np.ndarray | list[int]") -> pa.Table:
        """Return the holders of each distinct inode, as a RESOLVED_SCHEMA table.

        Rows are sorted by inode. ``pid`` and the process columns describe the
        lowest pid that holds the socket, and ``pids`` lists every holder. An
        inode that no readable process holds gets NULLs, and so does inode 0,
        which TIME_WAIT and request sockets show and which is never matched.
        Walk the fd links only when a requested inode is not cached.
        """
        inodes = as_inode_array(inodes)
        self._stats["resolves"] += 1
        if inodes.size == 0 or not inodes.any():
            # No inode or only inode 0 (TIME_WAIT rows), as in most samples of
            # a collector once every open socket is known.
            self._forget_exited()
            self._unowned = self._unowned[:0]
            self._last_holders = []
            return UNOWNED_ZERO if inodes.size else UNOWNED_NONE

        distinct = np.unique(inodes)
        requested = distinct[distinct != 0]
        self._stats["inodes_requested"] += int(requested.size)
        self._forget_exited()
        self._rescan_if_unknown(requested)
        return self._build_table(distinct)

    def known_owners(self, inodes: np.ndarray) -> pa.Table:
        """Return the holders of inodes as resolve() does, from the cached pairs only.

        Walks no fd links and leaves processes() as it was, so a caller can
        look again for sockets that the last walks found no holder for.
        """
        last_holders = self._last_holders
        try:
            return self._build_table(np.unique(as_inode_array(inodes)))
        finally:
            self._last_holders = last_holders

    def processes(self) -> pa.Table:
        """Return the processes that held the inodes of the last resolve().

        The table has PROCESS_SCHEMA, one row per process sorted by pid. A
        holder that exited before its stat file was read is left out.
        """
        rows = self._last_holders
        start_times = pa.array([info.start_time_us for info in rows], type=TIMESTAMP)
        return pa.table(
            [
                pa.array([info.pid for info in rows], type=pa.int32()),
                pa.array([info.ppid for info in rows], type=pa.int32()),
                pa.array([info.comm for info in rows], type=pa.string()),
                pa.array([info.exe for info in rows], type=pa.string()),
                pa.array([info.cmdline for info in rows], type=pa.string()),
                pa.array([info.uid for info in rows], type=pa.int64()),
                start_times,
            ],
            schema=PROCESS_SCHEMA,
        )

    def processes_of(self, inodes: np.ndarray) -> pa.Table:
        """Return the processes that hold any of inodes, as processes() does.

        Reads the cached pairs and walks no fd links, so call resolve() first
        for inodes that may be new. Makes the result the next processes().
        """
        inodes = as_inode_array(inodes)
        held = _keyindex.KeyIndex(inodes).find(self._holders.inodes) >= 0
        self._lookup_processes(np.unique(self._holders.pids[held]))
        return self.processes()

    def _build_table(self, distinct: np.ndarray) -> pa.Table:
        first, counts = self._holders.find(distinct)
        counts[distinct == 0] = 0
        owned = counts > 0

        offsets = np.zeros(distinct.size + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        # Index of every holder pair: row i takes first[i] .. first[i] + counts[i].
        pair_index = np.repeat(first - offsets[:-1], counts) + np.arange(offsets[-1])
        holder_pids = self._holders.pids[pair_index]
        lowest = holder_pids[offsets[:-1][owned]]

        infos = self._lookup_processes(np.unique(holder_pids))
        distinct_lowest, lowest_index = np.unique(lowest, return_inverse=True)
        row_index = np.zeros(distinct.size, dtype=np.int64)
        row_index[owned] = lowest_index
        take = pa.array(row_index, mask=~owned)
        process_columns = self._process_columns(distinct_lowest, infos)

        pid_column = np.zeros(distinct.size, dtype=np.int32)
        pid_column[owned] = lowest
        return pa.table(
            [
                pa.array(distinct, type=pa.int64()),
                pa.array(pid_column, type=pa.int32(), mask=~owned),
                pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(holder_pids), mask=pa.array(~owned)
                ),
                *(column.take(take) for column in process_columns),
            ],
            schema=RESOLVED_SCHEMA,
        )

    def _lookup_processes(self, pids: np.ndarray) -> dict[int, ProcessInfo]:
        """Return the info of each pid that is still readable, keyed by pid."""
        infos = {}
        for pid in pids.tolist():
            info = self._process_info(pid)
            if info is not None:
                infos[pid] = info
        self._last_holders = list(infos.values())
        return infos

    def _process_columns(
        self, pids: np.ndarray, infos: dict[int, ProcessInfo]
    ) -> list[pa.Array]:
        """Return comm, exe, cmdline and process_start, one row per pid."""
        comms, exes, cmdlines, start_times = [], [], [], []
        for pid in pids.tolist():
            info = infos.get(pid)
            if info is None:
                info = UNKNOWN_PROCESS
            comms.append(info.comm)
            exes.append(info.exe)
            cmdlines.append(info.cmdline)
            start_times.append(info.start_time_us)

        return [
            pa.array(comms, type=pa.string()),
            pa.array(exes, type=pa.string()),
            pa.array(cmdlines, type=pa.string()),
            pa.array(start_times, type=TIMESTAMP),
        ]

    def _process_info(self, pid: int) -> ProcessInfo | None:
        """Return the info of the process now running as pid, or None if it exited.

        The stat file is read again after each rescan of the pid, and a start
        time that differs from the cached one means a new process that reuses
        the pid.

        NOTE: between rescans the cached info is trusted, so a pid reused
        without a rescan keeps the info of its previous process until then.
        """
        if pid in self._verified:
            return self._processes.get(pid)

        fields = self._reader.read_stat(pid)
        if fields is None:
            self._processes.pop(pid, None)
            return None

        cached = self._processes.get(pid)
        if cached is None or cached.start_ticks != fields.start_ticks:
            if cached is not None:
                logger.debug(
                    "pid %d now belongs to a process started at tick %d, not %d",
                    pid,
                    fields.start_ticks,
                    cached.start_ticks,
                )
            cached = self._reader.read_process(pid, fields)
            self._processes[pid] = cached

        self._verified.add(pid)
        return cached

    def _forget_exited(self) -> None:
        """Drop the pairs and the process info of pids no longer under the root.

        When the listing equals the previous one (same pids in the same
        directory order) and no walk changed the pairs since, no cached
        process exited, so the rest is skipped.
        """
        live = _fdscan.list_pids(self.proc_root)
        listing = live.tobytes()
        unchanged = (
            self.generation == self._listed_generation and listing == self._listing
        )
        self._listing = listing
        if unchanged:
            return

        exited = np.setdiff1d(self._holders.distinct_pids, live)
        if exited.size:
            logger.debug("forgetting the sockets of exited pids %s", exited.tolist())
            self._holders.drop_pids(exited)
            self.generation += 1

        cached = np.fromiter(self._processes, dtype=np.int64)
        for pid in cached[~np.isin(cached, live)].tolist():
            del self._processes[pid]
            self._verified.discard(pid)
        self._listed_generation = self.generation

    def _rescan_if_unknown(self, requested: np.ndarray) -> None:
        self._unowned = self._unowned[np.isin(self._unowned, requested)]
        unknown = requested[~self._holders.contains(requested)]
        unknown = np.setdiff1d(unknown, self._unowned, assume_unique=True)
        if unknown.size == 0:
            self._stats["inodes_unowned"] += int(self._unowned.size)
            return

        if self.rescan_changed_only and self._fd_counts is not None:
            self._walk_changed()
            unknown = unknown[~self._holders.contains(unknown)]
            if unknown.size == 0:
                self._stats["inodes_unowned"] += int(self._unowned.size)
                return
            # A process that closed one socket and opened another keeps its
            # fd count, so only a full walk finds the new socket.
            logger.debug(
                "%d inodes still unknown after rescanning changed processes, "
                "walking all processes",
                unknown.size,
            )
            self._stats["fallback_walks"] += 1

        self._walk_all()
        self._unowned = requested[~self._holders.contains(requested)]
        self._stats["inodes_unowned"] += int(self._unowned.size)

    def _walk_all(self) -> None:
        scan = _fdscan.scan_fds(self.proc_root)
        self._holders.replace_all(scan.inodes, scan.pids)
        self._fd_counts = FdCounts(scan.scanned_pids, scan.fd_counts)
        self._verified.clear()

        self._stats["full_walks"] += 1
        self.generation += 1
        self._count_scan(scan)
        self._warn_if_partial(scan)

    def _walk_changed(self) -> None:
        pids, counts = _fdscan.count_fds(self.proc_root)
        changed = self._fd_counts.changed(pids, counts)
        gone = self._fd_counts.gone(pids)

        scan = _fdscan.scan_fds(self.proc_root, changed)
        self._holders.replace_pids(
            np.concatenate([changed, gone]), scan.inodes, scan.pids
        )
        self._fd_counts = FdCounts(pids, counts).updated(
            changed, scan.scanned_pids, scan.fd_counts
        )
        self._verified.difference_update(changed.tolist())

        self._stats["partial_walks"] += 1
        self.generation += 1
        self._stats["processes_unchanged"] += int(pids.size - changed.size)
        self._count_scan(scan)
        self._warn_if_partial(scan)

    def _count_scan(self, scan: "_fdscan.FdScan") -> None:
        counters = scan.counters()
        for name, count in counters.items():
            self._stats[name] += count
        logger.debug(
            "walked the fd links under %s: %d socket links, %s",
            self.proc_root,
            scan.inodes.size,
            counters,
        )

    def _warn_if_partial(self, scan: "_fdscan.FdScan") -> None:
        """Log once per Attributor that some processes could not be read."""
        if self._warned_partial:
            return
        euid = os.geteuid()
        if euid == 0 and scan.fd_dirs_denied == 0:
            return

        self._warned_partial = True
        if euid != 0:
            logger.warning(
                "attribution is partial: running as uid %d, which may read only its "
                "own processes' fd links (%d fd directories under %s were denied, "
                "and a hidepid mount hides other users' processes). Run as root, or "
                "with CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE, to attribute them",
                euid,
                scan.fd_dirs_denied,
                self.proc_root,
            )
        else:
            logger.warning(
                "attribution is partial: %d fd directories under %s were denied "
                "to root, as happens for processes of another user namespace or "
                "under a security module policy",
                scan.fd_dirs_denied,
                self.proc_root,
            )
