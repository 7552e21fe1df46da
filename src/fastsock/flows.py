"""Dependency edges per time bucket: the rows of the flows table.

A flow is one edge during one bucket: one process of one host and namespace that
connects out to one remote address and port (outbound), or that accepts on one
local address and port from one remote address (inbound). The ephemeral side of
an edge is NULL: the local port of an outbound edge and the remote port of an
inbound one. An edge of direction unknown keeps both ports, because which one is
ephemeral is not known.

Buckets start at multiples of the bucket width after the Unix epoch. A bucket's
flows are computed from the lifetimes of the connections that were open during
it, and rewritten at every flush while new samples change them. Each record is
keyed by flow_id (host, bucket, edge and collector run), so the latest record
of a key is the current one. A collector restarted within a bucket writes
records of its own for it, so the bucket's counts are the sums over runs.

NOTE: a connection whose direction changes after its flow was written (a
listener sampled after the connection) moves to another edge. The record of the
edge it left is rewritten only while that edge has other connections in the
bucket, so a stale record with the old count can remain.
"""

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock import schema
from fastsock.direction import INBOUND, OUTBOUND
from fastsock.identity import combine
from fastsock.textids import TextIds, integer_ids

# Default width of a flow bucket, in seconds.
DEFAULT_BUCKET_SECONDS = 60

# Bucket widths must divide an hour evenly up to this, so that a bucket never
# spans two hourly partitions.
MAX_BUCKET_SECONDS = 3600

# Columns that define an edge; flows of one edge in one bucket are one row.
EDGE_COLUMNS = [
    "host",
    "netns",
    "direction",
    "protocol",
    "pid",
    "comm",
    "exe",
    "uid",
    "service",
    "local_addr",
    "local_port",
    "remote_addr",
    "remote_port",
]


def validate_bucket_seconds(seconds: int) -> int:
    """Return seconds if it is a valid bucket width, else raise ValueError."""
    if not 1 <= seconds <= MAX_BUCKET_SECONDS or MAX_BUCKET_SECONDS % seconds:
        raise ValueError(
            f"invalid flow bucket width {seconds} s; use a divisor of "
            f"{MAX_BUCKET_SECONDS} such as 10, 60 or 300, so that a bucket never "
            f"spans two hourly partitions"
        )
    return seconds


def service_keys(exe, cmdline, comm) -> pa.Array:
    """Return the service of each process: exe and cmdline, which survive restarts.

    The key is ``<exe> <cmdline>``. Without exe (another user's process, a kernel
    thread) it is the cmdline alone, without either it is the comm, and it is NULL
    for a connection without a process.
    """
    if any(pa.types.is_dictionary(column.type) for column in (exe, cmdline, comm)):
        return _service_keys_of_distinct(exe, cmdline, comm)
    both = pc.binary_join_element_wise(exe, cmdline, " ")
    return pc.coalesce(both, cmdline, exe, comm)


def _service_keys_of_distinct(exe, cmdline, comm) -> pa.DictionaryArray:
    """Return service_keys as a dictionary array, one join per distinct process.

    The text of each distinct (exe, cmdline, comm) is joined once, not once
    per row.
    """
    columns = [_combined(column) for column in (exe, cmdline, comm)]
    codes = [
        pc.dictionary_encode(column)
        .indices.fill_null(-1)
        .to_numpy(zero_copy_only=False)
        for column in columns
    ]
    _, first, inverse = np.unique(
        np.column_stack(codes), axis=0, return_index=True, return_inverse=True
    )
    picked = pa.array(first, pa.int64())
    text = [column.take(picked) for column in columns]
    text = [_plain(column) for column in text]
    services = service_keys(*text)
    inverse = inverse.ravel()
    missing = services.is_null().to_numpy(zero_copy_only=False)[inverse]
    return pa.DictionaryArray.from_arrays(
        pa.array(inverse.astype(np.int32), mask=missing), services.fill_null("")
    )


def _combined(column: "pa.Array | pa.ChunkedArray") -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column


def _plain(column: pa.Array) -> pa.Array:
    """Return a dictionary array's values as a plain array; others as they are."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def edge_columns(connections: pa.Table) -> dict[str, pa.ChunkedArray]:
    """Return the EDGE_COLUMNS of connection rows, with ephemeral ports as NULL."""
    direction = connections.column("direction")
    null_port = pa.scalar(None, pa.int32())
    columns = {}
    for name in EDGE_COLUMNS:
        if name != "service":
            columns[name] = connections.column(name)

    columns["local_port"] = pc.if_else(
        pc.equal(direction, OUTBOUND), null_port, connections.column("local_port")
    )
    columns["remote_port"] = pc.if_else(
        pc.equal(direction, INBOUND), null_port, connections.column("remote_port")
    )
    columns["service"] = service_keys(
        connections.column("exe"),
        connections.column("cmdline"),
        connections.column("comm"),
    )
    return {name: columns[name] for name in EDGE_COLUMNS}


class FlowAggregator:
    """Aggregate connection lifetimes into flows, bucket by bucket.

    update() takes the connection records of one flush and returns the flow
    records that are new or changed. The lifetimes of connections that closed
    are kept until their buckets can no longer change: the current bucket and
    the one before it, which a late direction fix can still rewrite.
    """

    def __init__(
        self, bucket_seconds: int = DEFAULT_BUCKET_SECONDS, run_id: int | None = None
    ) -> None:
        """Set up a run's aggregation; run_id is mixed into every flow_id.

        A collector that restarts within a bucket has seen only the connections
        of its own run, so its records of the bucket must not replace those
        of the run before. run_id defaults to the time of this call in
        microseconds.
        """
        self.bucket_us = validate_bucket_seconds(bucket_seconds) * 1_000_000
        self.run_id = time.time_ns() // 1000 if run_id is None else run_id
        self._text_ids = TextIds()
        # Numbers only: conn_id, edge_id, first_us, last_us, live, closed.
        self._intervals: pa.Table | None = None
        # The EDGE_COLUMNS of each edge_id that an interval names, once each:
        # many connections share an edge, so their text is kept once.
        self._edges: pa.Table | None = None
        self._written = np.empty((0, 5), dtype=np.int64)
        self._unwritten: pa.Table | None = None
        self._updated_until_us: int | None = None
        self._horizon_us = 0

    def update(self, connections: pa.Table, now_us: int) -> pa.Table:
        """Fold one flush's connection records in; return the changed flow records.

        connections has the columns of schema.CONNECTIONS. now_us is the time of
        the latest sample.
        """
        incoming = _latest_per_connection(self._intervals_of(connections))
        dirty_from = self._dirty_from(incoming)
        self._upsert(incoming)

        flows = schema.FLOWS.empty_table()
        if dirty_from is not None:
            flows = self._changed(self._aggregate(dirty_from))
        flows = self._with_unwritten(flows)

        self._updated_until_us = now_us
        self._prune(now_us)
        return flows

    def restore(self, flows: pa.Table) -> None:
        """Keep flow records that a failed flush could not store, for the next one."""
        if flows.num_rows:
            self._unwritten = flows

    def _intervals_of(self, connections: pa.Table) -> pa.Table:
        edges = edge_columns(connections)
        ids = self._text_ids.ids
        edge_id = combine(
            ids(edges["host"]),
            integer_ids(edges["netns"], 0),
            ids(edges["direction"]),
            ids(edges["protocol"]),
            integer_ids(edges["pid"]),
            ids(edges["comm"]),
            ids(edges["exe"]),
            integer_ids(edges["uid"]),
            ids(edges["service"]),
            ids(edges["local_addr"]),
            integer_ids(edges["local_port"]),
            ids(edges["remote_addr"]),
            integer_ids(edges["remote_port"]),
        )
        self._remember_edges(edge_id, edges)
        live = pc.equal(connections.column("detected_by"), "live").fill_null(False)
        return pa.table(
            {
                "conn_id": connections.column("conn_id"),
                "edge_id": pa.array(edge_id, pa.int64()),
                "first_us": connections.column("first_seen").cast(pa.int64()),
                "last_us": connections.column("last_seen").cast(pa.int64()),
                "live": live,
                "closed": connections.column("closed"),
            }
        )

    def _remember_edges(self, edge_id: np.ndarray, edges: dict) -> None:
        """Keep the edge columns of each edge_id not kept yet."""
        ids, first = np.unique(edge_id, return_index=True)
        if self._edges is not None:
            first = first[~np.isin(ids, self._edges.column("edge_id").to_numpy())]
        if len(first) == 0:
            return
        new = pa.table(edges).take(pa.array(np.sort(first), pa.int64()))
        # Edges of all flushes go into one table: keep text as plain strings.
        new = pa.table(
            {name: _plain(_combined(new.column(name))) for name in new.column_names}
        )
        new = new.append_column(
            "edge_id", pa.array(edge_id[np.sort(first)], pa.int64())
        )
        if self._edges is None:
            self._edges = new.combine_chunks()
        else:
            self._edges = pa.concat_tables([self._edges, new]).combine_chunks()

    def _edges_of(self, edge_ids: np.ndarray) -> pa.Table:
        """Return the EDGE_COLUMNS of each edge id, all of them kept."""
        kept = self._edges.column("edge_id").to_numpy()
        order = np.argsort(kept)
        rows = order[np.searchsorted(kept[order], edge_ids)]
        return self._edges.select(EDGE_COLUMNS).take(pa.array(rows, pa.int64()))

    def _dirty_from(self, incoming: pa.Table) -> int | None:
        """Return the earliest time whose bucket the incoming records change."""
        earliest = []
        if self._updated_until_us is not None:
            earliest.append(self._updated_until_us)

        first_us = incoming.column("first_us").to_numpy()
        changed = np.ones(incoming.num_rows, dtype=bool)
        if self._intervals is not None and self._intervals.num_rows:
            old_ids = self._intervals.column("conn_id").to_numpy()
            old_edges = self._intervals.column("edge_id").to_numpy()
            order = np.argsort(old_ids)
            new_ids = incoming.column("conn_id").to_numpy()
            position = np.minimum(
                np.searchsorted(old_ids[order], new_ids), len(order) - 1
            )
            known = old_ids[order][position] == new_ids
            same_edge = (
                old_edges[order][position] == incoming.column("edge_id").to_numpy()
            )
            changed = ~(known & same_edge)
        if changed.any():
            earliest.append(int(first_us[changed].min()))

        if not earliest:
            return None
        return max(min(earliest), self._horizon_us)

    def _upsert(self, incoming: pa.Table) -> None:
        if self._intervals is None:
            self._intervals = incoming
            return
        new_ids = incoming.column("conn_id").to_numpy()
        kept = ~np.isin(self._intervals.column("conn_id").to_numpy(), new_ids)
        self._intervals = pa.concat_tables(
            [self._intervals.filter(pa.array(kept)), incoming]
        )

    def _aggregate(self, dirty_from: int) -> pa.Table:
        """Return the flows of every bucket from the one holding dirty_from onwards."""
        width = self.bucket_us
        start_bucket = dirty_from // width
        intervals = self._intervals.filter(
            pc.greater_equal(self._intervals.column("last_us"), start_bucket * width)
        )
        if intervals.num_rows == 0:
            return schema.FLOWS.empty_table()

        first_us = intervals.column("first_us").to_numpy()
        last_us = intervals.column("last_us").to_numpy()
        first_bucket = np.maximum(first_us // width, start_bucket)
        counts = last_us // width - first_bucket + 1

        # One entry per (connection, bucket it was open in).
        source = np.repeat(np.arange(len(counts)), counts)
        offsets = np.arange(len(source)) - np.repeat(np.cumsum(counts) - counts, counts)
        bucket = first_bucket[source] + offsets
        edge = intervals.column("edge_id").to_numpy()[source]

        pairs, group = np.unique(
            np.column_stack([bucket, edge]), axis=0, return_inverse=True
        )
        group = group.ravel()
        groups = len(pairs)
        bucket_start = pairs[:, 0] * width

        entry_first = first_us[source]
        entry_last = last_us[source]
        opened = np.bincount(
            group,
            weights=(entry_first >= bucket_start[group])
            & (entry_first < bucket_start[group] + width),
            minlength=groups,
        ).astype(np.int64)
        seen_from = np.full(groups, np.iinfo(np.int64).max)
        np.minimum.at(seen_from, group, np.maximum(entry_first, bucket_start[group]))
        seen_until = np.full(groups, np.iinfo(np.int64).min)
        np.maximum.at(
            seen_until, group, np.minimum(entry_last, bucket_start[group] + width - 1)
        )

        live = intervals.column("live").to_numpy(zero_copy_only=False)[source]
        concurrent = _max_concurrent(
            group[live],
            np.maximum(entry_first, bucket_start[group])[live],
            np.minimum(entry_last, bucket_start[group] + width - 1)[live],
            groups,
        )

        return self._flow_table(
            self._edges_of(pairs[:, 1]),
            pairs,
            bucket_start,
            opened,
            np.maximum(concurrent, 1),
            seen_from,
            seen_until,
        )

    def _flow_table(self, edges, pairs, bucket_start, opened, concurrent, first, last):
        flow_id = combine(
            pairs[:, 1],
            bucket_start,
            np.full(len(pairs), self.bucket_us),
            np.full(len(pairs), self.run_id),
        )
        columns = {
            "flow_id": pa.array(flow_id, pa.int64()),
            "bucket_start": pa.array(bucket_start).cast(schema.TIMESTAMP),
            "bucket_seconds": pa.repeat(
                pa.scalar(self.bucket_us // 1_000_000, pa.int32()), len(pairs)
            ),
            "opened": pa.array(opened, pa.int64()),
            "max_concurrent": pa.array(concurrent, pa.int64()),
            "first_seen": pa.array(first).cast(schema.TIMESTAMP),
            "last_seen": pa.array(last).cast(schema.TIMESTAMP),
        }
        arrays = []
        for field in schema.FLOWS:
            column = (
                columns[field.name]
                if field.name in columns
                else edges.column(field.name)
            )
            arrays.append(column.cast(field.type))
        return pa.Table.from_arrays(arrays, schema=schema.FLOWS)

    def _changed(self, flows: pa.Table) -> pa.Table:
        """Return the flows whose values differ from the last ones returned."""
        values = np.column_stack(
            [
                flows.column("flow_id").to_numpy(),
                flows.column("opened").to_numpy(),
                flows.column("max_concurrent").to_numpy(),
                flows.column("first_seen").cast(pa.int64()).to_numpy(),
                flows.column("last_seen").cast(pa.int64()).to_numpy(),
            ]
        )
        written = self._written
        changed = np.ones(len(values), dtype=bool)
        if len(written):
            order = np.argsort(written[:, 0])
            position = np.minimum(
                np.searchsorted(written[order, 0], values[:, 0]), len(order) - 1
            )
            previous = written[order][position]
            changed = ~(previous == values).all(axis=1)

        kept = ~np.isin(written[:, 0], values[:, 0])
        self._written = np.concatenate([written[kept], values])
        return flows.filter(pa.array(changed))

    def _with_unwritten(self, flows: pa.Table) -> pa.Table:
        if self._unwritten is None:
            return flows
        stale = pc.is_in(
            self._unwritten.column("flow_id"),
            value_set=flows.column("flow_id").combine_chunks(),
        )
        earlier = self._unwritten.filter(pc.invert(stale))
        self._unwritten = None
        return pa.concat_tables([earlier, flows])

    def _prune(self, now_us: int) -> None:
        """Forget what can no longer change: buckets before the previous one."""
        self._horizon_us = (now_us // self.bucket_us - 1) * self.bucket_us
        intervals = self._intervals
        if intervals is not None and intervals.num_rows:
            finished = pc.or_(
                pc.invert(intervals.column("live")), intervals.column("closed")
            )
            old = pc.less(intervals.column("last_us"), self._horizon_us)
            self._intervals = intervals.filter(pc.invert(pc.and_(finished, old)))
        if self._edges is not None:
            named = self._intervals.column("edge_id").to_numpy()
            used = np.isin(self._edges.column("edge_id").to_numpy(), named)
            if not used.all():
                self._edges = self._edges.filter(pa.array(used))

        written = self._written
        if len(written):
            first = written[:, 3]
            self._written = written[first >= self._horizon_us]


def _latest_per_connection(intervals: pa.Table) -> pa.Table:
    """Keep one interval per conn_id, the one last seen latest.

    One flush can carry two records of a connection, for instance its sampled
    record and the same record closed again by a close event.
    """
    conn_id = intervals.column("conn_id").to_numpy()
    last_us = intervals.column("last_us").to_numpy()
    order = np.lexsort((last_us, conn_id))
    is_last = np.ones(len(order), dtype=bool)
    is_last[:-1] = conn_id[order][1:] != conn_id[order][:-1]
    if is_last.all():
        return intervals
    return intervals.take(pa.array(np.sort(order[is_last])))


def _max_concurrent(
    group: np.ndarray, start: np.ndarray, end: np.ndarray, groups: int
) -> np.ndarray:
    """Return, per group, the maximum number of intervals [start, end] open at once.

    Interval ends are sample times, so a connection last seen at t and one first
    seen after t never overlap: an interval's -1 event is placed just after end.
    """
    result = np.zeros(groups, dtype=np.int64)
    if group.size == 0:
        return result

    event_group = np.concatenate([group, group])
    event_time = np.concatenate([start, end + 1])
    delta = np.concatenate([np.ones_like(start), -np.ones_like(end)])
    # At one time the -1 events sort first; lexsort sorts by the last key first.
    order = np.lexsort((delta, event_time, event_group))
    running = np.cumsum(delta[order])

    # Each group's events sum to 0, so the running count restarts at every group.
    sorted_group = event_group[order]
    np.maximum.at(result, sorted_group, running)
    return result
