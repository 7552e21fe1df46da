"""Build the stored tables (connections, listeners, processes) from lifetimes."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock import schema
from fastsock.identity import combine, text_id
from fastsock.rowruns import rows_where
from fastsock.sockets import PROTOCOL_SCALARS, decode_states, is_listening

# Text of a socket's owner, the same for every socket of a process. Flush
# tables keep these columns dictionary-encoded, so that selecting 100,000
# records copies 4-byte indices, not the text; the store writes them as text.
OWNER_TEXT_COLUMNS = ("comm", "exe", "cmdline")


def with_owner_text_encoded(table: pa.Table) -> pa.Table:
    """Return table with its OWNER_TEXT_COLUMNS dictionary-encoded."""
    for name in OWNER_TEXT_COLUMNS:
        if name not in table.column_names:
            continue
        position = table.schema.get_field_index(name)
        field = table.schema.field(position)
        if pa.types.is_dictionary(field.type):
            continue
        encoded = pc.dictionary_encode(table.column(name).combine_chunks())
        table = table.set_column(position, field.with_type(encoded.type), encoded)
    return table


def socket_keys(sockets: pa.Table) -> np.ndarray:
    """Return one key per socket row: its inode and protocol.

    Socket inodes are unique among live sockets of one kernel, so the inode
    names a socket for as long as it lives. Rows with inode 0 have no
    socket of their own and must be filtered out before. When sockets has a
    netns column, the key mixes it in too, so rows read from several network
    namespaces stay apart even if an inode repeated.
    """
    inode = sockets.column("inode").to_numpy()
    udp = PROTOCOL_SCALARS["udp"]
    is_udp = pc.equal(sockets.column("protocol"), udp).to_numpy(zero_copy_only=False)
    key = inode * 2 + is_udp
    if "netns" not in sockets.column_names:
        return key
    netns = sockets.column("netns").fill_null(0).to_numpy(zero_copy_only=False)
    return combine(netns, key)


def _netns_column(drained: pa.Table, netns: int | None) -> pa.ChunkedArray:
    """Return each row's namespace inode: the drained column, else netns for all."""
    if "netns" in drained.column_names:
        return drained.column("netns").cast(pa.int64())
    return pa.chunked_array([_constant(netns, pa.int64(), drained.num_rows)])


def _direction(drained: pa.Table) -> pa.Array:
    """Return the drained direction column, or NULL where nothing classified it."""
    if "direction" in drained.column_names:
        return drained.column("direction")
    return _constant(None, pa.string(), drained.num_rows)


def _timestamps(micros: pa.Array | np.ndarray) -> pa.Array:
    return pa.array(np.asarray(micros), pa.int64()).cast(schema.TIMESTAMP)


def _constant(value, type_, rows: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), rows)


def boot_id() -> int:
    """Return a number derived from this boot's id, read once per process.

    Containers share the kernel and so its boot id, which is why this reads
    /proc and not the proc root.
    """
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as file:
                _BOOT_ID = text_id(file.read().strip())
        except OSError:
            _BOOT_ID = 0
    return _BOOT_ID


_BOOT_ID: int | None = None


def _lifetime_marks(detected_by, first_seen: np.ndarray) -> np.ndarray:
    """Return, per row, the value that distinguishes two lifetimes of one key.

    A live socket's key is its inode, unique while the kernel runs, so the
    boot id is enough and a restarted collector keeps the same record id.
    Other keys (the four-tuple of a TIME_WAIT entry) recur over time, so
    first_seen is part of their id.

    NOTE: a TIME_WAIT entry stays listed about 60 s, so two collector runs
    within that time (or two `collect --once`) each record it, with two ids.
    """
    live = pc.equal(detected_by, "live").to_numpy(zero_copy_only=False)
    return np.where(live, boot_id(), first_seen)


def socket_records(
    drained: pa.Table, host: str, netns: int | None
) -> tuple[pa.Table, pa.Table]:
    """Split drained socket lifetimes into (connections, listeners) tables.

    Their OWNER_TEXT_COLUMNS are dictionary-encoded (see with_owner_text_encoded).
    """
    drained = with_owner_text_encoded(drained)
    rows = drained.num_rows
    is_udp = pc.equal(drained.column("protocol"), "udp").to_numpy(zero_copy_only=False)
    codes = drained.column("state_code_last").to_numpy()
    first_seen = drained.column("first_seen_us").to_numpy()

    netns_column = _netns_column(drained, netns)
    detected_by = _detected_by(drained)
    record_id = combine(
        np.full(rows, text_id(host), dtype=np.int64),
        netns_column.fill_null(0).to_numpy(zero_copy_only=False),
        drained.column("key").to_numpy(),
        _lifetime_marks(detected_by, first_seen),
    )
    columns = {
        "host": _constant(host, pa.string(), rows),
        "netns": netns_column,
        "direction": _direction(drained),
        "state": decode_states(codes, is_udp),
        "first_seen": _timestamps(first_seen),
        "last_seen": _timestamps(drained.column("last_seen_us").to_numpy()),
        "detected_by": detected_by,
        "attribution": _attribution(drained),
        **_missing_nullable(drained, schema.CONNECTIONS, OPTIONAL_COLUMNS),
    }
    listening = is_listening(codes, is_udp)

    connections = rows_where(
        _assemble(drained, columns, "conn_id", record_id, schema.CONNECTIONS),
        ~listening,
    )
    listeners = _assemble(
        drained, columns, "listener_id", record_id, schema.LISTENERS
    ).filter(pa.array(listening))
    return connections, listeners


# Connection columns that only some sources fill (netlink, close events).
OPTIONAL_COLUMNS = ("cookie", "bytes_acked", "bytes_received", "rtt_us", "retransmits")

# Values of `attribution` for sampled sockets; closes.py adds those of
# sockets that only a close event showed.
HELD_BY_PROCESS = "socket"
NO_HOLDER = "no_holder"


def _detected_by(drained: pa.Table) -> pa.Array:
    """Return `live` for sampled rows, or the drained column where it is set."""
    if "detected_by" not in drained.column_names:
        return _constant("live", pa.string(), drained.num_rows)
    return drained.column("detected_by").fill_null("live")


def _attribution(drained: pa.Table) -> pa.Array:
    """Return how each row's pid was found, or why it is NULL."""
    has_pid = drained.column("pid").is_valid().to_numpy(zero_copy_only=False)
    derived = pa.array(np.where(has_pid, HELD_BY_PROCESS, NO_HOLDER), pa.string())
    if "attribution" not in drained.column_names:
        return derived
    return pc.coalesce(drained.column("attribution"), derived)


def _missing_nullable(drained: pa.Table, target: pa.Schema, names) -> dict:
    return {
        name: pa.nulls(drained.num_rows, target.field(name).type)
        for name in names
        if name not in drained.column_names
    }


def _assemble(drained, columns, id_name, record_id, target: pa.Schema) -> pa.Table:
    arrays, fields = [], []
    for field in target:
        if field.name == id_name:
            array = pa.array(record_id, pa.int64())
        elif field.name in columns:
            array = columns[field.name]
        elif field.name in OWNER_TEXT_COLUMNS:
            array = drained.column(field.name)
            field = field.with_type(array.type)
        else:
            array = drained.column(field.name).cast(field.type)
        arrays.append(array)
        fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


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
