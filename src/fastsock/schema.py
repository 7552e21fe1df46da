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
        # inbound, outbound or unknown (fastsock.direction has the rules).
        pa.field("direction", pa.string()),
        # From the netlink source and close events; NULL from /proc alone.
        pa.field("cookie", pa.int64()),
        pa.field("bytes_acked", pa.int64()),
        pa.field("bytes_received", pa.int64()),
        pa.field("rtt_us", pa.int64()),
        pa.field("retransmits", pa.int64()),
        pa.field("attribution", pa.string()),
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

# One row per flush of a collector and network namespace: what it sampled,
# and how many TCP opens the kernel counted against how many it recorded.
COLLECTOR_STATS = pa.schema(
    [
        pa.field("host", pa.string()),
        pa.field("netns", pa.int64()),
        pa.field("stats_id", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("close_events", pa.bool_()),
        pa.field("period_start", TIMESTAMP),
        pa.field("last_seen", TIMESTAMP),
        pa.field("samples", pa.int64()),
        pa.field("sample_ms_median", pa.float64()),
        pa.field("sample_ms_max", pa.float64()),
        pa.field("sample_ms_total", pa.float64()),
        pa.field("rows_parsed", pa.int64()),
        pa.field("rows_skipped", pa.int64()),
        pa.field("attribution_misses", pa.int64()),
        pa.field("events_received", pa.int64()),
        pa.field("events_overruns", pa.int64()),
        pa.field("events_dropped", pa.int64()),
        pa.field("tcp_active_opens", pa.int64()),
        pa.field("tcp_passive_opens", pa.int64()),
        pa.field("tcp_opens_recorded", pa.int64()),
        pa.field("miss_rate", pa.float64()),
    ]
)

# Dependency edges per time bucket (fastsock.flows). A NULL port is the
# ephemeral side of the edge.
FLOWS = pa.schema(
    [
        pa.field("host", pa.string()),
        pa.field("netns", pa.int64()),
        pa.field("flow_id", pa.int64()),
        pa.field("bucket_start", TIMESTAMP),
        pa.field("bucket_seconds", pa.int32()),
        pa.field("direction", pa.string()),
        pa.field("protocol", pa.string()),
        pa.field("pid", pa.int32()),
        pa.field("comm", pa.string()),
        pa.field("exe", pa.string()),
        pa.field("uid", pa.int64()),
        pa.field("service", pa.string()),
        pa.field("local_addr", pa.string()),
        pa.field("local_port", pa.int32()),
        pa.field("remote_addr", pa.string()),
        pa.field("remote_port", pa.int32()),
        pa.field("opened", pa.int64()),
        pa.field("max_concurrent", pa.int64()),
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
    "collector_stats": (COLLECTOR_STATS, "stats_id"),
    "flows": (FLOWS, "flow_id"),
}
