"""The collector's dependency model: directions, TIME_WAIT detections and flows.

The collector calls observe() at every sample and, at every flush, classify()
on the drained lifetimes, detections() for connections seen only after they
closed, and flows() on the resulting connection records.
"""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock.direction import ListenerHistory, classify, read_ephemeral_ports
from fastsock.flows import DEFAULT_BUCKET_SECONDS, FlowAggregator
from fastsock.rowruns import replace_rows, rows_where
from fastsock.snapshot import OWNER_COLUMNS, Snapshotter
from fastsock.sockets import is_listening
from fastsock.timewait import (
    ATTRIBUTED_BY_LISTENER,
    FOUR_TUPLE,
    HOLD_SECONDS,
    ClosedConnectionDetector,
    detection_records,
    listener_owners,
)

log = logging.getLogger(__name__)

# Columns that direction.classify reads.
CLASSIFY_COLUMNS = [
    "netns",
    "protocol",
    "socket_family",
    "local_addr",
    "local_port",
    "remote_addr",
    "remote_port",
    "state_code",
    "first_seen_us",
    "last_seen_us",
    "opened_after_us",
    "seen_closed",
]

# Columns that _seen_closed and _prune read, besides CLASSIFY_COLUMNS.
SEEN_CLOSED_COLUMNS = ["detected_by", "key", "inode", "closed"]


class DependencyModel:
    """State that outlives one flush: listeners seen, closing rows, recent flows."""

    def __init__(
        self, snapshotter: Snapshotter, bucket_seconds: int = DEFAULT_BUCKET_SECONDS
    ) -> None:
        self.snapshotter = snapshotter
        self.listeners = ListenerHistory()
        self.time_wait = ClosedConnectionDetector()
        self.flow_aggregator = FlowAggregator(bucket_seconds)
        self.ephemeral_ports = read_ephemeral_ports(snapshotter.proc_root)
        self.latest_sample_us = 0
        self._sampled_us: dict[int, int] = {}

        # What the latest flush drained, for restore() when its write fails.
        self._drained_detections: pa.Table | None = None
        self._drained_flows: pa.Table | None = None

        # What start_flush() took from the sampling side for the flush; None
        # when the flush runs in the sampling thread without it.
        self._flush_detections: list[pa.Table] | None = None
        self._flush_us: int | None = None
        self._flush_final = True

    def observe(self, snapshot: pa.Table, live: pa.Table, time_us: int) -> pa.Table:
        """Record one sample's closing rows; return live with opened_after_us.

        opened_after_us is the time of the previous sample of the row's network
        namespace, or 0 in the first sample that read the namespace: the
        connection may then have opened before collection started.
        """
        self.time_wait.observe(snapshot, time_us)
        self.latest_sample_us = time_us

        netns = live.column("netns").fill_null(0).to_numpy(zero_copy_only=False)
        opened_after = np.zeros(len(netns), dtype=np.int64)
        for inode in np.unique(netns):
            opened_after[netns == inode] = self._sampled_us.get(int(inode), 0)

        for inode in self._namespaces_read():
            self._sampled_us[inode] = time_us
        return live.append_column("opened_after_us", pa.array(opened_after))

    def _namespaces_read(self) -> list[int]:
        """Return the namespaces that the latest snapshot read, NULL as 0."""
        tables = self.snapshotter.namespaces
        if tables is None:
            return [self.snapshotter.netns or 0]
        return [namespace.inode or 0 for namespace in tables.namespaces]

    def start_flush(self, final: bool = False) -> None:
        """Take what a flush reads of the sampling side; call in the sampling thread.

        classify(), detections() and flows() read only what this took and
        state that samples do not touch, so they may run in another thread
        while observe() goes on, one flush at a time. Unless final, the
        newest TIME_WAIT detections wait for the next flush (see
        timewait.HOLD_SECONDS).
        """
        self._flush_detections = self.time_wait.take_pending()
        self._flush_us = self.latest_sample_us
        self._flush_final = final

    def classify(self, drained: pa.Table) -> pa.Table:
        """Return drained lifetimes with a direction column (NULL for listeners).

        The listeners among them refresh the listener history first, so a
        connection seen before its listener gets its direction once both are.
        """
        if "direction" in drained.column_names:
            # Records that a failed flush put back were classified before.
            drained = drained.drop_columns(["direction"])
        listening = _listening(drained)
        self.listeners.update(drained.filter(pa.array(listening)))

        # Only the columns that classification reads are filtered, so the
        # owner and counter columns of every drained row are not copied.
        connections = _classify_input(_select_read(drained))
        connections = rows_where(connections, ~listening)
        directions, sole = classify(connections, self.listeners, self.ephemeral_ports)
        del connections

        # Row i of drained takes direction number (connections before i); a
        # listener's index is masked, so its direction is NULL.
        position = np.cumsum(~listening) - 1
        column = directions.take(pa.array(position, mask=listening))
        drained = drained.append_column("direction", column)
        return self._owned_by_listener(
            drained, np.flatnonzero(~listening), directions, sole
        )

    def _owned_by_listener(
        self,
        drained: pa.Table,
        connection_rows: np.ndarray,
        directions: pa.Array,
        sole: np.ndarray,
    ) -> pa.Table:
        """Give sampled connections without an owner their listener's process.

        A socket that closed before any fd walk found its process has no
        owner, while the close event or TIME_WAIT row of the same connection
        gets its listener's. The same rule applies here (see listener_owners),
        with attribution 'listener'. connection_rows are the rows of drained
        that directions and sole describe, in order.
        """
        valid = drained.column("pid").is_valid().to_numpy(zero_copy_only=False)
        unowned = ~valid[connection_rows]
        if not unowned.any():
            return drained
        owners = listener_owners(directions, sole, self.listeners)
        certain = unowned & owners["pid"].is_valid().to_numpy(zero_copy_only=False)
        if not certain.any():
            return drained

        if "attribution" not in drained.column_names:
            drained = drained.append_column(
                "attribution", pa.nulls(drained.num_rows, pa.string())
            )
        chosen = pa.array(certain)
        values = {
            name: owners[name].filter(chosen)
            for name in OWNER_COLUMNS
            if name in drained.column_names
        }
        values["attribution"] = pa.repeat(
            pa.scalar(ATTRIBUTED_BY_LISTENER), int(certain.sum())
        )
        return replace_rows(drained, connection_rows[certain], values)

    def detections(self, drained: pa.Table, host: str) -> pa.Table | None:
        """Return connections records of TIME_WAIT detections since the last flush.

        drained is the output of classify(). Detections of connections that are
        among its rows are dropped. The listener history is pruned afterwards.
        """
        live = _select_read(drained)
        live = rows_where(live, _valid(drained.column("direction")))
        hold_from_us = None
        if not self._flush_final:
            hold_from_us = self._flush_time_us() - int(HOLD_SECONDS * 1_000_000)
        detected = self.time_wait.drain(live, self._flush_detections, hold_from_us)
        self._flush_detections = None
        self._drained_detections = detected
        self._prune(live)
        if detected is None or detected.num_rows == 0:
            return None

        # The live rows take part so that rule 3 (the other end is inbound) can
        # match both ends of a connection whose server side is still open.
        both = pa.concat_tables([_classify_input(live), _classify_input(detected)])
        directions, sole = classify(both, self.listeners, self.ephemeral_ports)
        tail = slice(live.num_rows, both.num_rows)
        return detection_records(
            detected,
            directions[tail],
            sole[tail],
            self.listeners,
            host,
        )

    def flows(self, connections: pa.Table) -> pa.Table:
        """Return the flow records that the flush's connection records change."""
        self._drained_flows = self.flow_aggregator.update(
            connections, self._flush_time_us()
        )
        return self._drained_flows

    def _flush_time_us(self) -> int:
        """Return the time of the latest sample that the flush includes."""
        return self.latest_sample_us if self._flush_us is None else self._flush_us

    def restore(self) -> None:
        """Keep the detections and flows of a flush that failed to store them."""
        if self._drained_detections is not None:
            self.time_wait.restore(self._drained_detections)
        if self._drained_flows is not None:
            self.flow_aggregator.restore(self._drained_flows)
        self._drained_detections = None
        self._drained_flows = None

    def _prune(self, live: pa.Table) -> None:
        still_open = rows_where(live, ~_valid(live.column("closed"), values=True))
        forgotten = self.listeners.prune(
            _classify_input(still_open), self._flush_time_us()
        )
        if forgotten:
            log.debug(
                "forgot %d closed listeners; %d remain", forgotten, len(self.listeners)
            )


def _valid(column: pa.ChunkedArray, values: bool = False) -> np.ndarray:
    """Return which rows of column are not NULL, or with values, which are true."""
    if values:
        return column.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    return column.is_valid().to_numpy(zero_copy_only=False)


def _select_read(drained: pa.Table) -> pa.Table:
    """Return the columns of drained that classification and detection read.

    Selecting them before a filter keeps the flush from copying the owner
    columns (cmdline, exe, pids) of every drained record.
    """
    names = set(CLASSIFY_COLUMNS) | set(FOUR_TUPLE) | set(SEEN_CLOSED_COLUMNS)
    return drained.select([name for name in drained.column_names if name in names])


def _listening(drained: pa.Table) -> np.ndarray:
    is_udp = pc.equal(drained.column("protocol"), "udp").to_numpy(zero_copy_only=False)
    codes = (
        drained.column("state_code_last").fill_null(0).to_numpy(zero_copy_only=False)
    )
    return is_listening(codes, is_udp)


def _classify_input(rows: pa.Table) -> pa.Table:
    """Select CLASSIFY_COLUMNS, with 0 for a missing opened_after_us or state_code.

    Records of other sources (close events) may lack those two columns.
    seen_closed is true for every row that no snapshot showed with an fd.
    """
    columns = {}
    for name in CLASSIFY_COLUMNS:
        if name == "seen_closed":
            columns[name] = _seen_closed(rows)
            continue
        if name in rows.column_names:
            column = rows.column(name)
        else:
            column = pa.nulls(rows.num_rows, pa.int64())
        if name == "opened_after_us":
            column = column.cast(pa.int64()).fill_null(0)
        if name == "state_code":
            column = column.cast(pa.int8()).fill_null(0)
        columns[name] = column
    return pa.table(columns)


def _seen_closed(rows: pa.Table) -> pa.Array:
    if "detected_by" in rows.column_names:
        live = pc.equal(rows.column("detected_by"), "live").fill_null(True)
        return pc.invert(live)
    if "key" in rows.column_names and "inode" in rows.column_names:
        # Lifetimes of sampled sockets, with close-event records merged in.
        return pc.equal(rows.column("inode").fill_null(0), 0)
    return pa.array(np.zeros(rows.num_rows, dtype=bool))
