"""The sampler: snapshot the sockets on an interval, store lifetimes as Parquet."""

import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

import numpy as np
import pyarrow as pa

from fastsock.dependencies import DependencyModel
from fastsock.errors import FastsockError
from fastsock.flows import DEFAULT_BUCKET_SECONDS
from fastsock.lifetimes import LifetimeTracker
from fastsock.memory import release_unused
from fastsock.netlink import COUNTER_COLUMNS
from fastsock.netns import namespaces_read, reports_by_namespace
from fastsock.records import (
    process_keys,
    process_records,
    socket_keys,
    socket_records,
    with_owner_text_encoded,
)
from fastsock.snapshot import OWNER_COLUMNS, SnapshotStats, Snapshotter, join_owners
from fastsock.stats import NamespaceMeters, tcp_connections_by_netns
from fastsock.store import ParquetStore
from fastsock.timewait import FOUR_TUPLE
from fastsock.writer import BackgroundWriter, WriteResult, write_tables

log = logging.getLogger(__name__)

# Default seconds between snapshots. A sample with a few hundred sockets costs
# 6 to 10 ms of CPU, flushes included (docs/performance.md, "Default
# interval"). So 0.2 s keeps the collector at 3 to 5% of one core and samples
# every connection that lives 0.2 s or more. Close events record shorter ones.
DEFAULT_INTERVAL = 0.2

# Default seconds between flushes to Parquet: what a crash can lose at most.
DEFAULT_FLUSH_INTERVAL = 10.0

# Closed records that wait in memory before a flush is due anyway. At
# thousands of connections per second a 10 s flush interval would otherwise
# hold hundreds of thousands of them.
FLUSH_AT_RECORDS = 100_000

# Seconds back from the start that the stored connections are read, so that
# their closing rows are not recorded again. A TIME_WAIT row lasts 60 s on
# Linux, FIN_WAIT2 up to tcp_fin_timeout (60 s by default) before it.
STORED_CLOSES_SECONDS = 180

# Seconds that a thread may hold the GIL while another waits for it, during
# run() (see sys.setswitchinterval).
SWITCH_INTERVAL = 0.0005

# A sample that opens this many sockets (the first one on a busy host) gives
# the memory of its temporary tables back to the kernel (see fastsock.memory).
RELEASE_AFTER_OPENED = 10_000


@dataclass
class DrainedFlush:
    """The records of one flush, taken from the trackers, and what it counts."""

    sockets: pa.Table
    processes: pa.Table | None
    # Running totals for collector_stats, per namespace (see _counters).
    counters: dict[int | None, dict[str, int]]
    # perf_counter() when the flush began, for the log.
    started: float


@dataclass
class CollectorStatus:
    """Running totals of one collector, for the status line and logs."""

    samples: int = 0
    overruns: int = 0
    sockets: int = 0
    open_connections: int = 0
    opened: int = 0
    last_sample_ms: float = 0.0
    skipped_rows: int = 0
    unattributed: int = 0
    flushes: int = 0
    files_written: int = 0
    rows_written: int = 0
    failed_flushes: int = 0

    def line(self) -> str:
        """Return a one-line summary for a terminal."""
        return (
            f"samples {self.samples} ({self.overruns} late) | "
            f"sockets {self.sockets} | sockets opened {self.opened} | "
            f"last sample {self.last_sample_ms:.1f} ms | "
            f"files {self.files_written} ({self.rows_written} rows) | "
            f"skipped rows {self.skipped_rows}"
        )


class Collector:
    """Sample one proc root and flush connection, listener and process lifetimes."""

    def __init__(
        self,
        snapshotter: Snapshotter,
        store: ParquetStore,
        closes=None,
        bucket_seconds: int = DEFAULT_BUCKET_SECONDS,
        auto_compact: bool = True,
    ) -> None:
        """Set up a collector; closes is a closes.NamespaceCloses, or None to poll only.

        bucket_seconds is the width of a flow bucket (see fastsock.flows). With
        auto_compact, the first successful flush in a new UTC hour compacts the
        partitions of every earlier hour (see fastsock.compaction).
        """
        self.snapshotter = snapshotter
        self.store = store
        self.dependencies = DependencyModel(snapshotter, bucket_seconds)
        self._forget_stored_connections()
        self.sockets = LifetimeTracker()
        self.processes = LifetimeTracker()
        self.status = CollectorStatus()
        self.closes = closes
        self.meters = NamespaceMeters(
            snapshotter.host,
            snapshotter.proc_root,
            getattr(snapshotter, "source", "proc"),
        )
        self._unwritten_stats = []

        # Processes holding the latest sample's sockets, and the attributor's
        # generation when they were found (see _observe_processes).
        self._holders: pa.Table | None = None
        self._holder_keys = np.empty(0, dtype=np.int64)
        self._holders_generation = -1
        # The attributor's generation when _attribute_again last looked.
        self._reattributed_generation = -1

        self._writer = BackgroundWriter()
        self._background_flush: DrainedFlush | None = None

        self.auto_compact = auto_compact
        # UTC hour of the last successful flush; None before the first one.
        self.flush_hour: datetime | None = None

    def _forget_stored_connections(self) -> None:
        """Make TIME_WAIT detection skip the connections that an earlier run stored."""
        since = datetime.now(timezone.utc) - timedelta(seconds=STORED_CLOSES_SECONDS)
        stored = self.store.read_recent(
            "connections", FOUR_TUPLE, since, self.snapshotter.host
        )
        if stored.num_rows:
            log.debug("%d connections stored since %s", stored.num_rows, since)
            self.dependencies.time_wait.forget_stored(stored)

    def sample(self) -> None:
        """Take one snapshot and fold it into the lifetimes (see _sample).

        A sample that opened many sockets gives the memory of its temporary
        tables back to the kernel afterwards (see fastsock.memory).
        """
        opened_before = self.status.opened
        self._sample()
        if self.status.opened - opened_before >= RELEASE_AFTER_OPENED:
            release_unused()

    def _sample(self) -> None:
        """Take one snapshot and fold it into the lifetimes.

        Only the rows of sockets that were not open in the previous sample are
        attributed, joined to their owners and handed to the lifetime tracker,
        because a socket's record keeps the columns of its first sight. The
        state and counters of open sockets are read from NumPy columns.
        """
        stats = SnapshotStats()
        started = time.perf_counter()
        stats.time_us = time.time_ns() // 1000
        sockets = self.snapshotter.read_sockets(stats)

        # Rows with inode 0 (TIME_WAIT, SYN_RECV) have no socket of their own.
        inodes = sockets.column("inode").to_numpy()
        live_rows = np.flatnonzero(inodes != 0)
        keys = socket_keys(sockets)[live_rows]
        positions = self.sockets.find(keys)
        new = np.flatnonzero(positions < 0)

        # The snapshot of this sample: rows with inode 0 and new sockets.
        # Each copy of the rows is skipped where it would keep every row, as in
        # the first sample.
        if len(new) == len(live_rows):
            picked_sockets = sockets
        else:
            picked = np.sort(
                np.concatenate([np.flatnonzero(inodes == 0), live_rows[new]])
            )
            picked_sockets = sockets.take(pa.array(picked))
        table = self.snapshotter.attribute(picked_sockets)
        fresh = table
        if len(live_rows) < len(inodes):
            fresh = table.filter(pa.array(table.column("inode").to_numpy() != 0))
        fresh = self.dependencies.observe(table, fresh, stats.time_us)

        def fresh_rows(indices: np.ndarray) -> pa.Table:
            # indices are positions in keys, all among new, in fresh's order.
            if len(indices) == fresh.num_rows:
                return fresh
            return fresh.take(pa.array(np.searchsorted(new, indices), pa.int64()))

        opened = self.sockets.observe(
            keys,
            fresh_rows,
            stats.time_us,
            state=sockets.column("state_code").to_numpy()[live_rows],
            latest=latest_counters(sockets, live_rows),
            positions=positions,
        )
        self._observe_processes(inodes[live_rows], stats.time_us, opened)
        self._attribute_again()

        stats.duration_s = time.perf_counter() - started
        opened_rows = np.searchsorted(new, self.sockets.opened_in_last_observe)
        self._follow_namespaces()
        self.meters.add_sample(
            stats.time_us,
            stats.duration_s,
            reports_by_namespace(self.snapshotter, stats.tables),
            tcp_connections_by_netns(fresh, opened_rows),
        )
        if self.closes is not None:
            unseen = self.closes.process(self.sockets, stats.time_us)
            self.meters.add_opens(unseen)
            opened += sum(unseen.values())

        status = self.status
        status.samples += 1
        status.sockets = sockets.num_rows
        status.opened += opened
        status.open_connections = len(self.sockets)
        status.last_sample_ms = stats.duration_s * 1000
        status.skipped_rows += stats.tables.skipped_total
        status.unattributed = len(inodes) - len(live_rows) + self._unattributed_open()

    def _observe_processes(self, inodes: np.ndarray, time_us: int, opened: int) -> None:
        """Fold the processes that hold the sample's sockets into their lifetimes.

        The holders change only when a socket opens or closes or when the
        attributor's pairs change, so other samples reuse the last table.
        """
        attributor = self.snapshotter.attributor
        changed = (
            opened
            or self.sockets.closed_in_last_observe is not None
            or attributor.generation != self._holders_generation
            or self._holders is None
        )
        if changed:
            self._holders = attributor.processes_of(inodes)
            self._holder_keys = process_keys(self._holders)
            self._holders_generation = attributor.generation
        self.processes.observe(self._holder_keys, self._holders, time_us)

    def _attribute_again(self) -> None:
        """Give open sockets first seen without an owner the one a later walk found.

        A socket first seen while its process was not readable, or between
        the table read and the fd walk of a busy sample, would otherwise keep
        a NULL pid for its whole life. The cached pairs are looked up only
        after a walk changed them.
        """
        attributor = self.snapshotter.attributor
        if attributor.generation == self._reattributed_generation:
            return
        self._reattributed_generation = attributor.generation
        if not self.sockets.null_count("pid"):
            return
        positions = self.sockets.null_positions("pid")
        _, rows, _ = self.sockets.all_rows()
        unowned = rows.select(["inode"]).take(pa.array(positions))
        owners = attributor.known_owners(unowned.column("inode").to_numpy())
        found = join_owners(unowned, owners)
        owned = found.column("pid").is_valid().to_numpy(zero_copy_only=False)
        if owned.any():
            log.debug(
                "found the owners of %d sockets after their first sample",
                int(owned.sum()),
            )
            self.sockets.update_rows(
                positions[owned],
                found.filter(pa.array(owned)).select(list(OWNER_COLUMNS)),
            )

    def records_waiting(self) -> int:
        """Return how many closed records wait in memory for the next flush."""
        waiting = self.sockets.closed_waiting()
        if self.closes is not None:
            waiting += self.closes.waiting()
        return waiting

    def _unattributed_open(self) -> int:
        """Return how many open sockets had no owner at their first sight."""
        return self.sockets.null_count("pid")

    def flush(self, final: bool = False) -> bool:
        """Store what closed and a checkpoint of what is open; True on success.

        Waits for a flush that flush_in_background started, then flushes in
        this thread. With final, no flush follows this one, and a failure is
        logged as records lost.

        On a write error the closed records stay in memory for the next flush,
        and no stored file is touched. The memory that the flush's tables used
        is given back to the kernel afterwards (see fastsock.memory).
        """
        try:
            self._settle_background_flush()
            drained = self._drain_for_flush()
            if drained is None:
                return True
            result = self._build_and_write(drained, final)
            self._settle(drained, result)
            return result.ok
        finally:
            release_unused()

    def flush_in_background(self) -> None:
        """Drain the records here, and build and write them while sampling goes on.

        A flush builds and writes its tables for tens of milliseconds, longer
        on a busy disk, and connections that open and close meanwhile would
        be missed. The result is settled at the next flush: on a write error
        the records go back into memory then.
        """
        self._settle_background_flush()
        drained = self._drain_for_flush(periodic=True)
        if drained is None:
            return

        def build_and_write() -> WriteResult:
            try:
                return self._build_and_write(drained, final=False)
            finally:
                release_unused()

        self._background_flush = drained
        self._writer.start(build_and_write)

    def _settle_background_flush(self) -> None:
        """Wait for the flush that runs in the background, if any, and settle it."""
        result = self._writer.wait()
        drained, self._background_flush = self._background_flush, None
        if result is not None and drained is not None:
            self._settle(drained, result)

    def _drain_for_flush(self, periodic: bool = False) -> "DrainedFlush | None":
        """Take a flush's records from the sampling side; None before any sample.

        Runs in the sampling thread. What follows (_build_and_write) touches
        nothing that a sample changes, so it may run in another thread. A
        periodic flush leaves the newest TIME_WAIT detections for the next
        one (see DependencyModel.start_flush); any other flush takes them all.
        """
        if self.closes is not None:
            # Events received since the last sample close their records now.
            now_us = time.time_ns() // 1000
            self.meters.add_opens(self.closes.process(self.sockets, now_us))
        sockets = self.sockets.drain()
        processes = self.processes.drain()
        if sockets is None:
            return None
        if self.closes is not None:
            sockets = merge_records(sockets, self.closes.drain())
        self.dependencies.start_flush(final=not periodic)
        return DrainedFlush(sockets, processes, self._counters(), time.perf_counter())

    def _build_and_write(self, drained: "DrainedFlush", final: bool) -> WriteResult:
        """Build the flush's tables, write them, and count and log the result."""
        tables = self._build_tables(drained)
        result = write_tables(self.store, tables)
        self._report_write(drained, tables, result, final)
        return result

    def _build_tables(self, drained: "DrainedFlush") -> list[tuple[str, pa.Table]]:
        """Return the (table name, rows) pairs that one flush stores."""
        host, netns = self.snapshotter.host, self.snapshotter.netns
        sockets = self.dependencies.classify(drained.sockets)
        connections, listeners = socket_records(sockets, host, netns)
        detected = self.dependencies.detections(sockets, host)
        if detected is not None:
            detected = with_owner_text_encoded(detected)
            connections = pa.concat_tables([connections, detected])
            self.meters.add_detections(detected)
        tables = [("connections", connections), ("listeners", listeners)]
        tables.append(("flows", self.dependencies.flows(connections)))
        if drained.processes is not None:
            tables.append(("processes", process_records(drained.processes, host)))
        stats_row = self.meters.flush_rows(time.time_ns() // 1000, drained.counters)
        if stats_row is not None:
            self._unwritten_stats.append(stats_row)
        if self._unwritten_stats:
            tables.append(("collector_stats", pa.concat_tables(self._unwritten_stats)))
        return tables

    def _report_write(
        self,
        drained: "DrainedFlush",
        tables: list[tuple[str, pa.Table]],
        result: WriteResult,
        final: bool,
    ) -> None:
        """Count and log one flush's write; on success, compact a finished hour."""
        self.status.files_written += result.files
        self.status.rows_written += result.rows
        if not result.ok:
            self.status.failed_flushes += 1
            if final:
                log.error(
                    "the last flush failed, so %d records were not stored: %s",
                    drained.sockets.num_rows,
                    result.error,
                )
            else:
                log.error(
                    "flush failed, keeping rows in memory for the next one: %s",
                    result.error,
                )
            return
        self.status.flushes += 1
        rows = dict(tables)
        log.info(
            "flushed %d connection and %d listener records to %s in %.0f ms",
            rows["connections"].num_rows,
            rows["listeners"].num_rows,
            self.store.data_dir,
            (time.perf_counter() - drained.started) * 1000,
        )
        self._compact_after_new_hour()

    def _settle(self, drained: "DrainedFlush", result: WriteResult) -> None:
        """Forget what a flush stored, or put its records back after an error."""
        if result.ok:
            self._unwritten_stats = []
            return
        self.sockets.restore(drained.sockets)
        self.dependencies.restore()
        if drained.processes is not None:
            self.processes.restore(drained.processes)

    def _compact_after_new_hour(self) -> None:
        """Compact the earlier hours when this flush is the first of a new hour.

        The first flush of a process does not compact: the hours before it are
        compacted at the first hour change. Compaction runs in this thread, so
        samples wait while it merges a past hour's files.
        """
        now = datetime.now(timezone.utc)
        hour = now.replace(minute=0, second=0, microsecond=0)
        previous, self.flush_hour = self.flush_hour, hour
        if not self.auto_compact or previous is None or previous == hour:
            return

        # Imported here: compaction loads duckdb, about 20 MB of resident memory
        # that a collector needs only at the first flush of each hour.
        from fastsock.compaction import compact

        try:
            report = compact(self.store.data_dir, before=hour, wait=False)
        except (FastsockError, OSError) as error:
            log.error("compaction of the hours before %s failed: %s", hour, error)
            return
        if not report.locked_out:
            log.info("%s, hours before %s", report.line(), hour)

    def close(self) -> None:
        """Stop listening for close events; call after the last flush."""
        if self.closes is not None:
            self.closes.stop()

    def _counters(self) -> dict[int | None, dict[str, int]]:
        """Return the running totals that collector_stats stores, per namespace.

        Attribution covers every namespace at once, so its misses go to the
        row of the collector's own namespace.
        """
        counters = {} if self.closes is None else self.closes.counters()
        counters.setdefault(self.snapshotter.netns, {})["attribution_misses"] = (
            self.snapshotter.attributor.stats["inodes_unowned"]
        )
        return counters

    def _follow_namespaces(self) -> None:
        """Give each namespace the latest snapshot read a meter and close events."""
        namespaces = namespaces_read(self.snapshotter)
        if self.closes is not None:
            self.closes.follow(namespaces)
            self.meters.follow(namespaces, set(self.closes.recorders))
        else:
            self.meters.follow(namespaces, set())

    def run(
        self,
        interval: float,
        flush_interval: float,
        stop: threading.Event,
        duration: float | None = None,
        on_status: Callable[[CollectorStatus], None] | None = None,
    ) -> CollectorStatus:
        """Sample every interval seconds until stop is set or duration passes."""
        # While a background flush runs, the sampling thread waits up to the
        # switch interval (5 ms by default) each time it needs the GIL, which
        # would stretch the samples taken during a flush several times over.
        sys.setswitchinterval(SWITCH_INTERVAL)
        started = time.monotonic()
        next_sample = started
        next_flush = started + flush_interval
        next_status = started

        while not stop.is_set():
            self.sample()
            if self.status.samples == 1:
                log.info(
                    "first sample: %d sockets in %.1f ms",
                    self.status.sockets,
                    self.status.last_sample_ms,
                )
            now = time.monotonic()
            if on_status is not None and now >= next_status:
                on_status(self.status)
                next_status = now + 1.0
            if duration is not None and now - started >= duration:
                break
            if now >= next_flush or self.records_waiting() >= FLUSH_AT_RECORDS:
                self.flush_in_background()
                next_flush = now + flush_interval

            next_sample += interval
            if next_sample < time.monotonic():
                self.status.overruns += 1
                next_sample = time.monotonic()
            stop.wait(max(0.0, next_sample - time.monotonic()))

        self.flush()
        if on_status is not None:
            on_status(self.status)
        return self.status


def merge_records(drained: pa.Table, extra: pa.Table | None) -> pa.Table:
    """Append the records of close events to the drained lifetimes."""
    if extra is None:
        return drained
    return pa.concat_tables([drained, extra], promote_options="default")


def latest_counters(sockets: pa.Table, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Return the counter columns at rows as int64 arrays, with -1 for NULL.

    The proc source has no counters: its all-NULL columns cost no conversion.
    """
    counters = {}
    for name in COUNTER_COLUMNS:
        if name not in sockets.column_names:
            continue
        column = sockets.column(name)
        if column.null_count == len(column):
            counters[name] = np.full(len(rows), -1, dtype=np.int64)
        else:
            counters[name] = column.fill_null(-1).to_numpy()[rows]
    return counters
