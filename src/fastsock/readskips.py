"""Shortcuts of the socket-table reads, and the checks that keep them safe.

Each read of a TCP table walks the kernel's whole TCP hash, and so does the
final read(2) that returns 0 bytes. EarlyStopCheck decides when a read may
stop after a short read, without that final one; EmptyTableSkip skips the
tables that the kernel's socket counters show empty. Both check themselves
against full reads and turn themselves off on a kernel that breaks their rule.
"""

import logging
import os
from collections import Counter

from fastsock.core import load_extension

_socktable = load_extension("_socktable")

log = logging.getLogger(__name__)


class EarlyStopCheck:
    """Decide per file whether a read may skip the final 0-byte read.

    The early-stop rule (see ``_socktable.add_read``) held in every measured
    run on Linux 6.18, but it depends on how the kernel fills each read. So
    the first ``FULL_READS_FIRST`` reads of each file, and one in every
    ``FULL_READ_EVERY`` after them, read to the end and check the rule. The
    periodic full reads of different files fall on different samples.

    Data after the point where the rule would have stopped has two causes:

    - Churn. The final read of a table walks the kernel's hash again. When
      sockets opened during the read, it can return rows again: the last
      rows of the earlier reads, shifted by the new sockets. It can also
      return some sockets that opened in buckets already read. On a 2-core machine with
      Linux 6.18, about 30,000 connections opened per second next to 300 or
      2,000 held ones gave 1 to 5 such rows in a quarter to a third of the
      full reads of /proc/net/tcp, and in all but 4 of about 370 of those
      reads every such row repeated a row before the stop. With about 25,000
      connections opened per second beside 30,000 rows that other processes
      were adding and removing, one read returned about 1,750 rows after the
      stop, about 1,090 of them repeated.
    - A kernel that fills reads differently, so the rule stops too soon. The
      rows it cuts follow the stop without repeating rows before it, at
      every check, and often many.

    So a check splits the rows after the stop into repeated and new ones
    (``count_rows_after``). More repeated than new rows is churn, counted in
    ``repeats`` and otherwise a pass. Else the read is a mismatch, counted
    in ``mismatches``, after which the file is read to the end until a check
    passes. Early stops are turned off when ``MISMATCHES_IN_A_ROW`` checks of
    one file in a row are mismatches, or at once when the data after the
    stop exceeds ``max_tolerated_bytes`` (one page, or a quarter of the file
    for files over 4 pages), more than churn explains. Turning off lasts for
    the life of the check (for the shared ``EARLY_STOP``, the process) and
    is logged once, as a warning.
    """

    FULL_READS_FIRST = 3
    FULL_READ_EVERY = 64
    MISMATCHES_IN_A_ROW = 3
    # Share of a file's bytes that the data after the stop may reach before
    # early stops are turned off without looking at the rows.
    TOLERATED_SHARE = 4

    def __init__(self, page_size: int = os.sysconf("SC_PAGESIZE")) -> None:
        self.page_size = page_size
        self.enabled = True
        self.checks = 0
        self.repeats = 0
        self.mismatches = 0
        self._reads: Counter = Counter()
        self._offsets: dict[str, int] = {}
        self._in_a_row: Counter = Counter()
        self._recheck: set[str] = set()

    def may_stop_early(self, path: str) -> bool:
        """Return whether this read of path may end at the early stop."""
        count = self._reads[path]
        self._reads[path] = count + 1
        if not self.enabled or count < self.FULL_READS_FIRST or path in self._recheck:
            return False
        offset = self._offsets.get(path)
        if offset is None:
            # Spread the periodic full reads of the files over the period.
            offset = len(self._offsets) * (self.FULL_READ_EVERY // 4)
            self._offsets[path] = offset
        return (count + offset) % self.FULL_READ_EVERY != 0

    def max_tolerated_bytes(self, size: int) -> int:
        """Return the maximum bytes after the stop that churn explains in a file of size bytes."""
        return max(self.page_size, size // self.TOLERATED_SHARE)

    def check(self, path: str, buffer) -> None:
        """Compare a full read of path with where the early stop would have ended it.

        buffer is a ``_socktable.FileBuffer``. A read that stopped early, or
        in which the rule never fired, has nothing to compare.
        """
        if not self.enabled or buffer.stopped_early or buffer.early_stop_size < 0:
            return
        self.checks += 1
        extra = buffer.size - buffer.early_stop_size
        if extra == 0:
            self._passed(path)
            return
        if extra > self.max_tolerated_bytes(buffer.size):
            self.mismatches += 1
            self._turn_off(
                f"a read of {path} returned {extra} more bytes after a short read "
                f"({buffer.early_stop_size} of {buffer.size} bytes), more than "
                f"the {self.max_tolerated_bytes(buffer.size)} that sockets opening "
                "during the read explain"
            )
            return

        repeated, new = count_rows_after(buffer.to_bytes(), buffer.early_stop_size)
        if repeated > new:
            self.repeats += 1
            self._passed(path)
            log.debug(
                "a read of %s returned %d rows again and %d new rows after a "
                "short read, as sockets opening during the read cause",
                path,
                repeated,
                new,
            )
            return

        self.mismatches += 1
        self._in_a_row[path] += 1
        if self._in_a_row[path] >= self.MISMATCHES_IN_A_ROW:
            self._turn_off(
                f"{self._in_a_row[path]} reads of {path} in a row returned new "
                f"rows after a short read (the latest {new} new and {repeated} "
                f"repeated rows, {extra} bytes)"
            )
            return
        self._recheck.add(path)
        log.debug(
            "a read of %s returned %d new and %d repeated rows after a short "
            "read (%d bytes), as a socket opening during the read can cause; "
            "reading it to the end until a read passes (%d mismatches in %d "
            "checks)",
            path,
            new,
            repeated,
            extra,
            self.mismatches,
            self.checks,
        )

    def _passed(self, path: str) -> None:
        self._in_a_row[path] = 0
        self._recheck.discard(path)

    def _turn_off(self, reason: str) -> None:
        self.enabled = False
        log.warning(
            "%s; reading every socket table to the end from now on, which costs "
            "one more walk of the kernel's socket hash per table",
            reason,
        )


def count_rows_after(text: bytes, stop: int) -> tuple[int, int]:
    """Return how many rows of text after offset stop repeat a row before it, and how many do not.

    Rows are compared by local address, remote address and inode (fields 2,
    3 and 10 of a /proc/net/tcp row), because the slot number and timers of
    a row change from one read to the next. Rows that churn repeats are
    mostly the last ones before the stop, so they are looked for there
    first, and in all of the text before the stop only when not found.
    """
    extra = len(text) - stop
    recent = text[max(0, stop - 4 * extra - 4096) : stop]
    head = None
    repeated = new = 0
    for line in text[stop:].splitlines():
        fields = line.split()
        if len(fields) < 10:
            new += 1
            continue
        key = (fields[1], fields[2], fields[9])
        if _row_before(recent, *key):
            repeated += 1
            continue
        if head is None:
            head = text[:stop]
        if _row_before(head, *key):
            repeated += 1
        else:
            new += 1
    return repeated, new


def _row_before(head: bytes, local: bytes, remote: bytes, inode: bytes) -> bool:
    """Return whether head has a row with these addresses and inode."""
    addresses = b" " + local + b" " + remote + b" "
    start = head.find(addresses)
    while start >= 0:
        line_end = head.find(b"\n", start)
        fields = head[start : line_end if line_end >= 0 else len(head)].split()
        # fields: local, remote, state, queues, timer, retransmits, uid,
        # timeout, inode.
        if len(fields) > 8 and fields[8] == inode:
            return True
        start = head.find(addresses, start + 1)
    return False


# One check per process: the rule is a property of the running kernel.
EARLY_STOP = EarlyStopCheck()


# The sockstat line that counts each table's sockets, and whether the table
# also lists TIME_WAIT sockets, which the "TCP:" line counts as tw.
SOCKSTAT_LINES = {
    "tcp": ("TCP:", True),
    "tcp6": ("TCP6:", True),
    "udp": ("UDP:", False),
    "udp6": ("UDP6:", False),
}


class EmptyTableSkip:
    """Skip reading the socket tables that the kernel's socket counters show empty.

    Every read of a TCP table walks the kernel's whole TCP hash, even when
    the table lists nothing: an empty /proc/net/tcp6 cost 0.66 ms per read
    next to 2,000 IPv4 rows on the machine of docs/performance.md.
    ``net/sockstat`` and ``net/sockstat6`` count the sockets of the namespace
    whose tables are read. ``inuse`` counts the hashed sockets of one
    protocol and family, which are the rows of its table apart from TIME_WAIT
    and request sockets. ``tw`` counts the TIME_WAIT sockets of TCP in both
    families. So a TCP table is empty when its inuse and tw are 0, and a UDP
    table when its inuse is 0. Request sockets need a listener of their
    family, which inuse counts.

    The reads that EarlyStopCheck makes full (the first ones of each file and
    one in FULL_READ_EVERY) read a table that the counters call empty anyway.
    A table with rows while the counters read before and after it both call
    it empty is a mismatch: a socket that opens and closes between the two
    counter reads can cause one. ``MISMATCHES_IN_A_ROW`` of them in a row
    for one table turn the skip off for the life of this object, logged
    once.
    """

    MISMATCHES_IN_A_ROW = 3

    def __init__(self) -> None:
        self.enabled = True
        self.skipped_reads = 0
        self.mismatches = 0
        self._in_a_row: Counter = Counter()

    def empty_tables(self, proc_root: str, names) -> frozenset[str]:
        """Return which of the table names the counters under proc_root show empty."""
        if not self.enabled:
            return frozenset()
        counters = read_sockstat(proc_root)
        return frozenset(name for name in names if self._is_empty(name, counters))

    def _is_empty(self, name: str, counters: dict[str, dict[str, int]]) -> bool:
        spec = SOCKSTAT_LINES.get(name)
        if spec is None:
            return False
        prefix, with_time_wait = spec
        protocol = counters.get(prefix)
        if protocol is None or protocol.get("inuse") != 0:
            return False
        if not with_time_wait:
            return True
        return counters.get("TCP:", {}).get("tw") == 0

    def verify(self, proc_root: str, name: str, rows: int) -> None:
        """Check a read of a table that the counters called empty, which listed rows."""
        if not self.enabled:
            return
        if rows == 0 or not self._is_empty(name, read_sockstat(proc_root)):
            # Empty as counted, or a socket opened since the counters were read.
            self._in_a_row[name] = 0
            return
        self.mismatches += 1
        self._in_a_row[name] += 1
        if self._in_a_row[name] < self.MISMATCHES_IN_A_ROW:
            log.debug(
                "%s/net/%s listed %d rows although net/sockstat counted none",
                proc_root,
                name,
                rows,
            )
            return
        self.enabled = False
        log.warning(
            "%s/net/%s listed %d rows although net/sockstat counted none, %d "
            "times in a row; reading every socket table from now on",
            proc_root,
            name,
            rows,
            self._in_a_row[name],
        )


def read_sockstat(proc_root: str) -> dict[str, dict[str, int]]:
    """Return the counters of ``<proc_root>/net/sockstat`` and ``sockstat6`` by line prefix.

    For the line ``TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1`` that is
    ``{"TCP:": {"inuse": 5, "orphan": 0, "tw": 2, ...}}``. A missing or
    unreadable file adds nothing, so its tables are never called empty.
    """
    counters: dict[str, dict[str, int]] = {}
    for file_name in ("sockstat", "sockstat6"):
        try:
            with open(f"{proc_root}/net/{file_name}", "rb") as file:
                text = file.read()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split()
            if not fields:
                continue
            values = {}
            for key, value in zip(fields[1::2], fields[2::2]):
                if value.isdigit():
                    values[key.decode()] = int(value)
            counters[fields[0].decode()] = values
    return counters


# One skip per process, beside EARLY_STOP.
EMPTY_SKIP = EmptyTableSkip()
