"""Read the socket tables over NETLINK_SOCK_DIAG, the interface that `ss` uses.

A dump returns the same sockets as ``/proc/net/{tcp,tcp6,udp,udp6}`` and
more about each: the socket cookie (a 64-bit id that the kernel never reuses
while it runs) and, for TCP, counters from ``struct tcp_info``. The reader
sees the network namespace of the calling thread, whatever the proc root.
"""

import errno
import logging
import socket

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.core import load_extension
from fastsock.sockets import (
    FAMILY_TEXT_BY_NUMBER,
    SAMPLE_SCHEMA,
    STATE_TEXT,
    TableReport,
    text_column,
)

_netlink = load_extension("_netlink")

log = logging.getLogger(__name__)

# Protocol number of the socket diagnostics family (linux/netlink.h).
NETLINK_SOCK_DIAG = 4

IPPROTO_TCP = 6
IPPROTO_UDP = 17

# Bit n requests TCP state n. States 0 to 11 are every state that /proc/net/tcp
# shows; the kernel adds request sockets (NEW_SYN_RECV) when SYN_RECV is
# requested. This is also `ss -a`'s mask, and it dumped about 25% faster than
# 0xFFFFFFFF with 10,000 and 50,000 connections (docs/performance.md).
ALL_STATES = 0xFFF

# (name as under /proc/net, family, protocol), in the order of SOCKET_FILES.
DUMPS = (
    ("tcp", 4, IPPROTO_TCP),
    ("tcp6", 6, IPPROTO_TCP),
    ("udp", 4, IPPROTO_UDP),
    ("udp6", 6, IPPROTO_UDP),
)

# Columns that only the netlink source fills; the proc source leaves them NULL.
DIAG_FIELDS = [
    pa.field("cookie", pa.int64()),
    pa.field("bytes_acked", pa.int64()),
    pa.field("bytes_received", pa.int64()),
    pa.field("rtt_us", pa.int64()),
    pa.field("retransmits", pa.int64()),
]
DIAG_COLUMNS = tuple(field.name for field in DIAG_FIELDS)
# The columns of DIAG_FIELDS that grow while a socket lives.
COUNTER_COLUMNS = ("bytes_acked", "bytes_received", "rtt_us", "retransmits")
NETLINK_SCHEMA = pa.schema([*SAMPLE_SCHEMA, *DIAG_FIELDS])

PROTOCOL_NAMES = pa.array([None] * 6 + ["tcp"] + [None] * 10 + ["udp"], pa.string())


def open_diag_socket() -> socket.socket:
    """Open a NETLINK_SOCK_DIAG socket, or raise OSError naming what to check."""
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot open a NETLINK_SOCK_DIAG socket ({error.strerror}); the kernel "
            "needs CONFIG_INET_DIAG, else use --source proc",
        ) from error


def string_column(offsets: np.ndarray, text: np.ndarray) -> pa.Array:
    return pa.StringArray.from_buffers(
        len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(text)
    )


def columns_to_table(columns) -> pa.Table:
    """Build a NETLINK_SCHEMA table from a DiagColumns; counters NULL if absent."""
    rows = columns.rows
    no_counters = ~columns.has_counters

    arrays = [
        pc.take(PROTOCOL_NAMES, pa.array(columns.protocol)),
        text_column(columns.family, FAMILY_TEXT_BY_NUMBER),
        text_column(columns.socket_family, FAMILY_TEXT_BY_NUMBER),
        string_column(columns.local_offsets, columns.local_text),
        pa.array(columns.local_port),
        string_column(columns.remote_offsets, columns.remote_text),
        pa.array(columns.remote_port),
        text_column(columns.state_index, STATE_TEXT),
        pa.array(columns.state_code),
        pa.array(columns.tx_queue),
        pa.array(columns.rx_queue),
        pa.array(columns.uid),
        pa.array(columns.inode),
        pa.array(columns.cookie),
        pa.array(columns.bytes_acked, mask=no_counters),
        pa.array(columns.bytes_received, mask=no_counters),
        pa.array(columns.rtt_us, mask=no_counters),
        pa.array(columns.retransmits, mask=no_counters),
    ]
    assert len(arrays) == len(NETLINK_SCHEMA), "one array per NETLINK_SCHEMA field"
    if rows == 0:
        return NETLINK_SCHEMA.empty_table()
    return pa.Table.from_arrays(arrays, schema=NETLINK_SCHEMA)


def with_diag_columns(table: pa.Table) -> pa.Table:
    """Append the DIAG_FIELDS that table lacks, as NULL columns."""
    names = table.column_names
    for field in DIAG_FIELDS:
        if field.name not in names:
            table = table.append_column(field, null_int64_column(table.num_rows))
    return table


def diag_null_columns(rows: int) -> list[pa.Array]:
    """Return one NULL column of rows values per DIAG_FIELDS, for the proc source."""
    column = null_int64_column(rows)
    return [column] * len(DIAG_FIELDS)


def null_int64_column(rows: int) -> pa.Array:
    """Return rows NULL int64 values, a slice of a cached array.

    A sample of the proc source needs five such columns, so slicing one
    array saves allocating and zeroing them at every sample.
    """
    global _NULLS
    if len(_NULLS) < rows:
        _NULLS = pa.nulls(rows + rows // 8, pa.int64())
    return _NULLS.slice(0, rows)


# All-NULL int64 array that null_int64_column slices. It grows to 1/8 more
# rows than the largest sample seen, about 9 bytes per row of that sample.
_NULLS = pa.nulls(0, pa.int64())


def counter_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """Return the counter columns of table as int64 arrays, with -1 for NULL."""
    return {
        name: table.column(name).fill_null(-1).to_numpy()
        for name in COUNTER_COLUMNS
        if name in table.column_names
    }


class NetlinkReader:
    """Dump TCP and UDP sockets of the current network namespace over netlink.

    One socket is kept open across reads. TCP sockets of both families come
    from one TCPDIAG_GETSOCK dump, which walks the kernel's TCP hash once in
    place of once per family. A kernel that rejects that request is logged
    once and dumped per family from then on. A protocol whose diag module the
    kernel lacks (ENOENT, common for UDP) is logged once and read as empty,
    as a missing /proc file is.
    """

    def __init__(self, with_tcp_info: bool = True) -> None:
        self.with_tcp_info = with_tcp_info
        self._socket = open_diag_socket()
        self._sequence = 0
        self._unsupported: set[str] = set()
        self.tcp_in_one_dump = True

    def close(self) -> None:
        self._socket.close()

    def read(self, report: TableReport) -> pa.Table:
        """Return every TCP and UDP socket as a NETLINK_SCHEMA table."""
        buffer = _netlink.DiagBuffer()
        if self.tcp_in_one_dump:
            self._dump_tcp(buffer)
        # DUMPS lists tcp and tcp6 first; _dump_tcp covered both unless it
        # fell back to per-family dumps.
        dumps = DUMPS[2:] if self.tcp_in_one_dump else DUMPS
        for name, family, protocol in dumps:
            if name in self._unsupported:
                continue
            try:
                _netlink.dump(
                    buffer,
                    self._socket.fileno(),
                    family,
                    protocol,
                    ALL_STATES,
                    self.with_tcp_info and protocol == IPPROTO_TCP,
                    self._next_sequence(),
                )
            except OSError as error:
                self._handle_dump_error(name, error)

        report.rows += len(buffer)
        report.reads += buffer.receives
        if buffer.skipped:
            report.skipped[("netlink", "unknown_family")] += buffer.skipped
        return columns_to_table(_netlink.to_columns(buffer))

    def _next_sequence(self) -> int:
        self._sequence = self._sequence % 0xFFFFFFFF + 1
        return self._sequence

    def _dump_tcp(self, buffer) -> None:
        """Dump the TCP sockets of both families, or switch to per-family dumps."""
        try:
            _netlink.dump_tcp(
                buffer,
                self._socket.fileno(),
                ALL_STATES,
                self.with_tcp_info,
                self._next_sequence(),
            )
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
                raise
            self.tcp_in_one_dump = False
            log.info(
                "the kernel rejected a TCPDIAG_GETSOCK dump of TCP sockets (%s); "
                "dumping them per family from now on, which walks its TCP hash "
                "once more per read",
                error.strerror,
            )

    def _handle_dump_error(self, name: str, error: OSError) -> None:
        if error.errno not in (errno.ENOENT, errno.EOPNOTSUPP):
            raise error
        self._unsupported.add(name)
        log.warning(
            "the kernel has no sock_diag support for %s sockets (%s); the netlink "
            "source reads them as empty. Load the module (modprobe %s_diag) or "
            "use --source proc",
            name,
            error.strerror,
            "udp" if name.startswith("udp") else "tcp",
        )


def read_netlink_tables(report: TableReport | None = None) -> pa.Table:
    """Return the sockets of this network namespace, read once over netlink."""
    reader = NetlinkReader()
    try:
        return reader.read(report if report is not None else TableReport())
    finally:
        reader.close()
