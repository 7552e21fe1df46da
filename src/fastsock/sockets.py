"""Read the kernel's TCP and UDP socket tables into an Arrow table.

The Cython core parses each file into NumPy columns; this module names the
columns, decodes state codes and reports skipped rows.
"""

import errno
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.core import load_extension
from fastsock.errors import ProcReadError

_socktable = load_extension("_socktable")

log = logging.getLogger(__name__)

# (file under <proc root>/net, protocol, socket family)
SOCKET_FILES = (
    ("tcp", "tcp", 4),
    ("tcp6", "tcp", 6),
    ("udp", "udp", 4),
    ("udp6", "udp", 6),
)

# TCP state names by the kernel's code (include/net/tcp_states.h).
TCP_STATES = (
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
)
TCP_LISTEN = 10
TCP_TIME_WAIT = 6

# UDP reuses TCP_CLOSE (7) for a socket that is bound but not connected, which
# `ss` prints as UNCONN. It is a UDP server or an unconnected client, never a
# closed socket.
UDP_UNCONNECTED = 7
STATE_NAMES = pa.array(list(TCP_STATES) + ["UNCONN"])
UNCONN_INDEX = len(TCP_STATES)

FAMILY_NAMES = {4: "inet", 6: "inet6"}

# Arrow scalars of the text that each sample repeats. pyarrow 26 tries to
# import dateutil each time it infers the Arrow type of a Python value, which
# costs about 0.1 ms per call when dateutil is not installed (measured with
# cProfile), so the sample path passes Arrow scalars.
PROTOCOL_SCALARS = {name: pa.scalar(name) for name in ("tcp", "udp")}
FAMILY_SCALARS = {number: pa.scalar(name) for number, name in FAMILY_NAMES.items()}
# Family name by the parser's family number (4 or 6).
FAMILY_BY_NUMBER = pa.array(
    [None, None, None, None, "inet", None, "inet6"], pa.string()
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("protocol", pa.string()),
        pa.field("family", pa.string()),
        pa.field("socket_family", pa.string()),
        pa.field("local_addr", pa.string()),
        pa.field("local_port", pa.int32()),
        pa.field("remote_addr", pa.string()),
        pa.field("remote_port", pa.int32()),
        pa.field("state", pa.string()),
        pa.field("state_code", pa.int8()),
        pa.field("tx_queue", pa.int64()),
        pa.field("rx_queue", pa.int64()),
        pa.field("uid", pa.int64()),
        pa.field("inode", pa.int64()),
    ]
)


@dataclass
class TableReport:
    """Counts from one read of the socket tables: rows, read calls, bytes, skips."""

    rows: int = 0
    reads: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class SkipLogger:
    """Log malformed rows: a warning the first time per file and reason, then debug.

    A sampler reads the same tables many times a second, so a bad row that
    stays in the table would otherwise flood the log.
    """

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()

    def report(self, path: str, bad_rows: list, counts: list) -> None:
        for line_number, reason, raw in bad_rows:
            level = logging.DEBUG
            if (path, reason) not in self._warned:
                self._warned.add((path, reason))
                level = logging.WARNING
            log.log(
                level,
                "skipped row of %s: %s at line %d: %s (later rows of this "
                "kind are counted in collector stats and logged at debug)",
                path,
                reason,
                line_number,
                _quoted(raw),
            )
        hidden = sum(counts) - len(bad_rows)
        if hidden > 0:
            log.debug("skipped %d more rows of %s", hidden, path)


class EarlyStopCheck:
    """Decide per file whether a read may skip the final 0-byte read.

    The early-stop rule (see ``_socktable.read_whole_file``) held in every
    measured run on Linux 6.18, but it depends on how the kernel fills each
    read. So the first reads of each file, and one in every
    ``FULL_READ_EVERY`` after them, read to the end and check the rule
    against the full content. One mismatch turns early stops off for good.

    NOTE: a socket that opens while a table is being read can also show up as
    data after a short read. On a host with many short connections the check
    may therefore turn early stops off although the kernel keeps the rule.
    """

    FULL_READS_FIRST = 3
    FULL_READ_EVERY = 64

    def __init__(self) -> None:
        self._reads: Counter = Counter()
        self.enabled = True

    def may_stop_early(self, path: str) -> bool:
        count = self._reads[path]
        self._reads[path] += 1
        if not self.enabled or count < self.FULL_READS_FIRST:
            return False
        return count % self.FULL_READ_EVERY != 0

    def check(self, path: str, buffer) -> None:
        """Turn early stops off if a full read shows the rule would cut data."""
        if buffer.stopped_early or buffer.early_stop_size < 0:
            return
        if buffer.early_stop_size != buffer.size and self.enabled:
            self.enabled = False
            log.warning(
                "reads of %s returned more data after a short read (%d of %d "
                "bytes); reading every socket table to the end from now on",
                path,
                buffer.early_stop_size,
                buffer.size,
            )


# One check per process: the rule is a property of the running kernel.
EARLY_STOP = EarlyStopCheck()


# Characters of a malformed row that a log message quotes; a well-formed row
# of /proc/net/tcp6 has about 180.
LOGGED_ROW_CHARS = 240


def _quoted(raw: "bytes | str") -> str:
    """Return raw quoted, cut to LOGGED_ROW_CHARS, saying how much was left out."""
    if len(raw) <= LOGGED_ROW_CHARS:
        return repr(raw)
    return f"{raw[:LOGGED_ROW_CHARS]!r}... ({len(raw) - LOGGED_ROW_CHARS} more)"


def _string_column(offsets: np.ndarray, text: np.ndarray) -> pa.Array:
    return pa.StringArray.from_buffers(
        len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(text)
    )


def decode_states(codes: np.ndarray, is_udp: np.ndarray | bool) -> pa.Array:
    """Return the state name of each code; UDP's code 7 is UNCONN."""
    indices = codes.astype(np.int16)
    indices = np.where(is_udp & (codes == UDP_UNCONNECTED), UNCONN_INDEX, indices)
    indices = np.where((indices < 0) | (indices > UNCONN_INDEX), 0, indices)
    return pc.take(STATE_NAMES, pa.array(indices.astype(np.int16)))


def is_listening(codes: np.ndarray, is_udp: np.ndarray) -> np.ndarray:
    """Return which sockets listen: TCP in LISTEN, UDP bound but unconnected."""
    return np.where(is_udp, codes == UDP_UNCONNECTED, codes == TCP_LISTEN)


def parsed_to_table(parsed, protocol: str, socket_family: int) -> pa.Table:
    """Build the Arrow table of one parsed socket file."""
    rows = parsed.rows
    # parsed.family is 4 or 6 for each row; index a small lookup array by it.
    family = pc.take(FAMILY_BY_NUMBER, pa.array(parsed.family))
    columns = [
        pa.repeat(PROTOCOL_SCALARS[protocol], rows),
        family,
        pa.repeat(FAMILY_SCALARS[socket_family], rows),
        _string_column(parsed.local_offsets, parsed.local_text),
        pa.array(parsed.local_port),
        _string_column(parsed.remote_offsets, parsed.remote_text),
        pa.array(parsed.remote_port),
        decode_states(parsed.state_code, protocol == "udp"),
        pa.array(parsed.state_code),
        pa.array(parsed.tx_queue),
        pa.array(parsed.rx_queue),
        pa.array(parsed.uid),
        pa.array(parsed.inode),
    ]
    return pa.Table.from_arrays(columns, schema=SAMPLE_SCHEMA)


def read_socket_tables(
    proc_root: str,
    report: TableReport,
    skip_logger: SkipLogger | None = None,
    files=SOCKET_FILES,
    early_stop: EarlyStopCheck = EARLY_STOP,
) -> pa.Table:
    """Read and parse the socket tables under ``<proc_root>/net``.

    A missing file (no IPv6 in the kernel, a fixture tree with only some
    tables) reads as empty. Malformed rows are skipped, counted in report and
    logged through skip_logger.
    """
    tables = []
    for name, protocol, socket_family in files:
        path = f"{proc_root}/net/{name}"
        try:
            buffer = _socktable.read_file(path, early_stop.may_stop_early(path))
        except FileNotFoundError:
            log.debug("%s does not exist; reading it as empty", path)
            continue
        except OSError as error:
            hint = "check the path given as --proc-root"
            if error.errno in (errno.EACCES, errno.EPERM):
                hint = "run fastsock as a user that may read the socket tables"
            raise ProcReadError(
                error.errno, f"cannot read {path}: {error.strerror}; {hint}"
            ) from error

        early_stop.check(path, buffer)
        parsed = _socktable.parse_buffer(buffer, socket_family)
        report.rows += parsed.rows
        report.reads += parsed.reads
        report.bytes += parsed.size
        for reason, count in zip(_socktable.SKIP_REASONS, parsed.skipped):
            if count:
                report.skipped[(name, reason)] += count
        if parsed.bad_rows and skip_logger is not None:
            skip_logger.report(path, parsed.bad_rows, parsed.skipped)

        tables.append(parsed_to_table(parsed, protocol, socket_family))

    if not tables:
        return SAMPLE_SCHEMA.empty_table()
    return pa.concat_tables(tables)
