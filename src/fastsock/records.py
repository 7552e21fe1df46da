"""Build the stored tables (connections, listeners, processes) from lifetimes."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock import schema
from fastsock.identity import combine, text_id
from fastsock.sockets import decode_states, is_listening


def socket_keys(sockets: pa.Table) -> np.ndarray:
    """Return one key per socket row: its inode and protocol.

    Socket inodes are unique among live sockets of one kernel, so the inode
    names a socket for as long as it lives. Rows with inode 0 have no
    socket of their own and must be filtered out before.
    """
    inode = sockets.column("inode").to_numpy()
    is_udp = pc.equal(sockets.column("protocol"), "udp").to_numpy(zero_copy_only=False)
    return inode * 2 + is_udp


def _timestamps(micros: pa.Array | np.ndarray) -> pa.Array:
    return pa.array(np.asarray(micros), pa.int64()).cast(schema.TIMESTAMP)


def _constant(value, type_, rows: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), rows)


def socket_records(
    drained: pa.Table, host: str, netns: int | None
) -> tuple[pa.Table, pa.Table]:
    """Split drained socket lifetimes into (connections, listeners) tables."""
    rows = drained.num_rows
    is_udp = pc.equal(drained.column("protocol"), "udp").to_numpy(zero_copy_only=False)
    codes = drained.column("state_code_last").to_numpy()
    first_seen = drained.column("first_seen_us").to_numpy()

    record_id = combine(
        np.full(rows, text_id(host), dtype=np.int64),
        np.full(rows, netns or 0, dtype=np.int64),
        drained.column("key").to_numpy(),
        first_seen,
    )
    columns = {
        "host": _constant(host, pa.string(), rows),
        "netns": _constant(netns, pa.int64(), rows),
        "state": decode_states(codes, is_udp),
        "first_seen": _timestamps(first_seen),
        "last_seen": _timestamps(drained.column("last_seen_us").to_numpy()),
        "detected_by": _constant("live", pa.string(), rows),
    }
    listening = is_listening(codes, is_udp)

    connections = _assemble(
        drained, columns, "conn_id", record_id, schema.CONNECTIONS
    ).filter(pa.array(~listening))
    listeners = _assemble(
        drained, columns, "listener_id", record_id, schema.LISTENERS
    ).filter(pa.array(listening))
    return connections, listeners


def _assemble(drained, columns, id_name, record_id, target: pa.Schema) -> pa.Table:
    arrays = []
    for field in target:
        if field.name == id_name:
            arrays.append(pa.array(record_id, pa.int64()))
        elif field.name in columns:
            arrays.append(columns[field.name])
        else:
            arrays.append(drained.column(field.name).cast(field.type))
    return pa.Table.from_arrays(arrays, schema=target)


def process_keys(processes: pa.Table) -> np.ndarray:
    """Return one key per process: its pid and start time, so a reused pid differs."""
    pid = processes.column("pid").to_numpy(zero_copy_only=False)
    start = (
        processes.column("start_time")
        .cast(pa.int64())
        .fill_null(0)
        .to_numpy(zero_copy_only=False)
    )
    return combine(pid, start)


def process_records(drained: pa.Table, host: str) -> pa.Table:
    """Build the processes table from drained process lifetimes."""
    rows = drained.num_rows
    columns = {
        "host": _constant(host, pa.string(), rows),
        "first_seen": _timestamps(drained.column("first_seen_us").to_numpy()),
        "last_seen": _timestamps(drained.column("last_seen_us").to_numpy()),
    }
    record_id = combine(
        np.full(rows, text_id(host), dtype=np.int64), drained.column("key").to_numpy()
    )
    return _assemble(drained, columns, "process_id", record_id, schema.PROCESSES)
