"""Arrow schemas of the tables that fastsock stores, and their record keys.

A table's files may hold several records of one entity: a connection that is
still open is written again at every flush with a later ``last_seen``. The
key column names the entity; readers keep the record with the latest
``last_seen`` per key (the DuckDB views do this).

Only signed integer types are used, because Spark and Trino have no unsigned
ones. Ports are ``int32`` and inodes ``int64``.
"""

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

# Columns that name a process; connections and listeners carry them too.
PROCESS_FIELDS = [
    pa.field("pid", pa.int32()),
    pa.field("pids", pa.list_(pa.int32())),
    pa.field("comm", pa.string()),
    pa.field("exe", pa.string()),
    pa.field("cmdline", pa.string()),
    pa.field("process_start", TIMESTAMP),
]

SOCKET_FIELDS = [
    pa.field("protocol", pa.string()),
    pa.field("family", pa.string()),
    pa.field("socket_family", pa.string()),
    pa.field("local_addr", pa.string()),
    pa.field("local_port", pa.int32()),
    pa.field("remote_addr", pa.string()),
    pa.field("remote_port", pa.int32()),
    pa.field("state", pa.string()),
    pa.field("inode", pa.int64()),
    pa.field("uid", pa.int64()),
]

LIFETIME_FIELDS = [
    pa.field("first_seen", TIMESTAMP),
    pa.field("last_seen", TIMESTAMP),
    pa.field("closed", pa.bool_()),
]

CONNECTIONS = pa.schema(
    [
        pa.field("host", pa.string()),
        pa.field("netns", pa.int64()),
        pa.field("conn_id", pa.int64()),
        *SOCKET_FIELDS,
        *PROCESS_FIELDS,
        *LIFETIME_FIELDS,
        pa.field("detected_by", pa.string()),
    ]
)

LISTENERS = pa.schema(
    [
        pa.field("host", pa.string()),
        pa.field("netns", pa.int64()),
        pa.field("listener_id", pa.int64()),
        *SOCKET_FIELDS,
        *PROCESS_FIELDS,
        *LIFETIME_FIELDS,
    ]
)

PROCESSES = pa.schema(
    [
        pa.field("host", pa.string()),
        pa.field("process_id", pa.int64()),
        pa.field("pid", pa.int32()),
        pa.field("ppid", pa.int32()),
        pa.field("comm", pa.string()),
        pa.field("exe", pa.string()),
        pa.field("cmdline", pa.string()),
        pa.field("uid", pa.int64()),
        pa.field("start_time", TIMESTAMP),
        pa.field("first_seen", TIMESTAMP),
        pa.field("last_seen", TIMESTAMP),
    ]
)

# Table name -> (schema, key column). Files of a table live under
# <data dir>/<table>/date=YYYY-MM-DD/hour=HH/, by the hour of last_seen.
TABLES = {
    "connections": (CONNECTIONS, "conn_id"),
    "listeners": (LISTENERS, "listener_id"),
    "processes": (PROCESSES, "process_id"),
}
