"""Read the kernel's TCP and UDP socket tables into an Arrow table.

The Cython core parses the files into NumPy columns and writes the text of the
constant and state columns. This module builds the Arrow table and reports
skipped rows; fastsock.readskips decides which reads may do less.
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
from fastsock.readskips import EARLY_STOP, EMPTY_SKIP, EarlyStopCheck, EmptyTableSkip

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


def text_column(codes: np.ndarray, names: tuple[bytes, ...]) -> pa.Array:
    """Return names[code] for each code as a string array, built in one C pass."""
    offsets, text = _socktable.text_column(codes, names)
    return _string_column(offsets, text)


def decode_states(codes: np.ndarray, is_udp: np.ndarray | bool) -> pa.Array:
    """Return the state name of each code; UDP's code 7 is UNCONN."""
    indices = codes.astype(np.int16)
    indices = np.where(is_udp & (codes == UDP_UNCONNECTED), UNCONN_INDEX, indices)
    indices = np.where((indices < 0) | (indices > UNCONN_INDEX), 0, indices)
    return pc.take(STATE_NAMES, pa.array(indices.astype(np.int16)))


def is_listening(codes: np.ndarray, is_udp: np.ndarray) -> np.ndarray:
    """Return which sockets listen: TCP in LISTEN, UDP bound but unconnected."""
    return np.where(is_udp, codes == UDP_UNCONNECTED, codes == TCP_LISTEN)


def _file_texts(files) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Return the protocol and socket family text of each file, by table index."""
    files = tuple(files)
    texts = _FILE_TEXTS.get(files)
    if texts is None:
        protocols = tuple(protocol.encode() for _name, protocol, _family in files)
        families = tuple(
            FAMILY_NAMES[socket_family].encode()
            for _name, _protocol, socket_family in files
        )
        texts = (protocols, families)
        _FILE_TEXTS[files] = texts
    return texts


def _file_columns(parsed, files) -> tuple[pa.Array, pa.Array]:
    """Return the protocol and socket_family columns of parsed, from its files.

    Both depend only on the files and their row counts, which rarely change
    between samples, so the latest pair is kept and reused.
    """
    key = (tuple(files), tuple(parsed.file_rows))
    cached = _FILE_COLUMNS.get(key)
    if cached is None:
        protocols, families = _file_texts(files)
        cached = (
            text_column(parsed.table_index, protocols),
            text_column(parsed.table_index, families),
        )
        _FILE_COLUMNS.clear()
        _FILE_COLUMNS[key] = cached
    return cached


# The latest protocol and socket_family columns (see _file_columns).
_FILE_COLUMNS: dict[tuple, tuple[pa.Array, pa.Array]] = {}

# Protocol and socket family texts per tuple of files read (see _file_texts).
_FILE_TEXTS: dict[tuple, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = {}

# Family text by the parser's family number (4 or 6), and state text by the
# parser's state index: the TCP state names, then UNCONN.
FAMILY_TEXT_BY_NUMBER = (b"", b"", b"", b"", b"inet", b"", b"inet6")
STATE_TEXT = tuple(name.encode() for name in (*TCP_STATES, "UNCONN"))
if _socktable.UNCONNECTED_STATE_INDEX != UNCONN_INDEX:
    raise ImportError(
        f"fastsock._socktable marks UNCONN as state index "
        f"{_socktable.UNCONNECTED_STATE_INDEX}, not {UNCONN_INDEX}; rebuild it "
        "with 'python setup.py build_ext --inplace'"
    )


def parsed_to_table(
    parsed,
    files=SOCKET_FILES,
    extra_columns: list[pa.Array] | None = None,
    schema: pa.Schema = SAMPLE_SCHEMA,
) -> pa.Table:
    """Build the Arrow table of parsed socket files, one chunk per column.

    files are the files that parsed was read from, in order (see
    read_socket_columns). extra_columns are appended after the
    SAMPLE_SCHEMA columns, and schema is then SAMPLE_SCHEMA followed by
    their fields. The address columns point into the parser's arrays, so
    no text is copied.
    """
    protocol, socket_family = _file_columns(parsed, files)
    columns = [
        protocol,
        text_column(parsed.family, FAMILY_TEXT_BY_NUMBER),
        socket_family,
        _string_column(parsed.local_offsets, parsed.local_text),
        pa.array(parsed.local_port),
        _string_column(parsed.remote_offsets, parsed.remote_text),
        pa.array(parsed.remote_port),
        text_column(parsed.state_index, STATE_TEXT),
        pa.array(parsed.state_code),
        pa.array(parsed.tx_queue),
        pa.array(parsed.rx_queue),
        pa.array(parsed.uid),
        pa.array(parsed.inode),
    ]
    if extra_columns:
        columns.extend(extra_columns)
    return pa.Table.from_arrays(columns, schema=schema)


def read_socket_columns(
    proc_root: str,
    report: TableReport,
    skip_logger: SkipLogger | None = None,
    files=SOCKET_FILES,
    early_stop: EarlyStopCheck = EARLY_STOP,
    empty_skip: EmptyTableSkip | None = EMPTY_SKIP,
):
    """Read and parse the socket tables under ``<proc_root>/net`` into columns.

    Returns a ``_socktable.ParsedTable`` whose table_index is each row's
    position in files. A missing file (no IPv6 in the kernel, a fixture tree
    with only some tables) reads as empty, and so does a table that
    empty_skip finds empty by the kernel's counters (None reads every
    table). Malformed rows are skipped, counted in report and logged
    through skip_logger.
    """
    names = [name for name, _protocol, _socket_family in files]
    empty = frozenset()
    if empty_skip is not None:
        empty = empty_skip.empty_tables(proc_root, names)
    buffers = []
    verify = []
    for index, name in enumerate(names):
        path = f"{proc_root}/net/{name}"
        stop_early = early_stop.may_stop_early(path)
        if name in empty:
            if stop_early:
                empty_skip.skipped_reads += 1
                buffers.append(_socktable.FileBuffer())
                continue
            # A full read checks the counters too.
            verify.append(index)
        buffers.append(_read_table_file(path, stop_early, early_stop))

    parsed = _socktable.parse_buffers(
        buffers,
        [socket_family for _name, _protocol, socket_family in files],
        [protocol == "udp" for _name, protocol, _socket_family in files],
    )
    for index in verify:
        empty_skip.verify(proc_root, names[index], parsed.file_rows[index])
    _count_read(proc_root, report, skip_logger, files, buffers, parsed)
    return parsed


def _count_read(proc_root, report, skip_logger, files, buffers, parsed) -> None:
    """Add a read's rows, reads, bytes and skipped rows to report."""
    report.rows += parsed.rows
    for (name, _protocol, _family), buffer, skipped, bad_rows in zip(
        files, buffers, parsed.skipped, parsed.bad_rows
    ):
        report.reads += buffer.reads
        report.bytes += buffer.size
        if not any(skipped):
            continue
        for reason, count in zip(_socktable.SKIP_REASONS, skipped):
            if count:
                report.skipped[(name, reason)] += count
        if bad_rows and skip_logger is not None:
            skip_logger.report(f"{proc_root}/net/{name}", bad_rows, skipped)


def _read_table_file(path: str, stop_early: bool, early_stop: EarlyStopCheck):
    """Return a FileBuffer of path, empty when the file does not exist."""
    try:
        buffer = _socktable.read_file(path, stop_early)
    except FileNotFoundError:
        log.debug("%s does not exist; reading it as empty", path)
        return _socktable.FileBuffer()
    except OSError as error:
        hint = "check the path given as --proc-root"
        if error.errno in (errno.EACCES, errno.EPERM):
            hint = "run fastsock as a user that may read the socket tables"
        raise ProcReadError(
            error.errno, f"cannot read {path}: {error.strerror}; {hint}"
        ) from error
    early_stop.check(path, buffer)
    return buffer


def read_socket_tables(
    proc_root: str,
    report: TableReport,
    skip_logger: SkipLogger | None = None,
    files=SOCKET_FILES,
    early_stop: EarlyStopCheck = EARLY_STOP,
    empty_skip: EmptyTableSkip | None = EMPTY_SKIP,
) -> pa.Table:
    """Read and parse the socket tables under ``<proc_root>/net`` into a table.

    See read_socket_columns. The table has SAMPLE_SCHEMA.
    """
    parsed = read_socket_columns(
        proc_root, report, skip_logger, files, early_stop, empty_skip
    )
    return parsed_to_table(parsed, files)
