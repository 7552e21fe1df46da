"""Collector statistics per flush, with the completeness meter behind `fastsock status`.

The kernel counts every TCP open of a network namespace in
``<proc_root>/net/snmp``: ``ActiveOpens`` (connect calls) and ``PassiveOpens``
(connections a listener created). ``AttemptFails`` counts the opens that
failed, refused connects among them, and is taken off the active opens:
a failed connect leaves no connection to record. Each open makes one local
socket, so
between two flushes their sum is the number of TCP connections that a
complete recorder would have recorded. The collector compares it with the
TCP connections of that namespace it first recorded in the same period, from
samples, close events and TIME_WAIT rows, and stores both in the
``collector_stats`` table: one row per flush and namespace read. Another
namespace's counters are read through ``/proc/<pid>/net/snmp`` of a process
inside it.
"""

import functools
import logging
import os
import statistics
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock import schema
from fastsock.identity import combine, text_id
from fastsock.netns import Namespace, read_namespace_file
from fastsock.sockets import TCP_LISTEN, TableReport

log = logging.getLogger(__name__)


def parse_tcp_opens(text: str) -> tuple[int, int]:
    """Return (ActiveOpens - AttemptFails, PassiveOpens) from /proc/net/snmp's text.

    The file has a header line and a value line per protocol, both starting
    with the protocol name. AttemptFails also counts handshakes a listener
    saw fail, which never counted as passive opens, so the active opens
    can come out a little low; without the column, nothing is taken off.
    Raises ValueError naming what is missing.
    """
    tcp_lines = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    if len(tcp_lines) < 2:
        raise ValueError(
            f"found {len(tcp_lines)} 'Tcp:' lines, expected a header and values"
        )
    header, values = tcp_lines[0], tcp_lines[1]
    try:
        active = int(values[header.index("ActiveOpens")])
        passive = int(values[header.index("PassiveOpens")])
    except (ValueError, IndexError) as error:
        raise ValueError(
            f"no ActiveOpens and PassiveOpens in the Tcp lines {header} {values}"
        ) from error
    if "AttemptFails" in header:
        active = max(0, active - int(values[header.index("AttemptFails")]))
    return active, passive


def read_tcp_opens(proc_root: str, namespace: Namespace) -> tuple[int, int] | None:
    """Return the TCP open counters of namespace, or None when they are unreadable."""
    text = read_namespace_file(proc_root, namespace, "snmp")
    if text is None:
        return None
    try:
        return parse_tcp_opens(text)
    except ValueError as error:
        log.debug("no TCP open counters in %s/net/snmp: %s", namespace.proc_dir, error)
        return None


@dataclass
class Period:
    """Counts of the collector's work between two flushes."""

    start_us: int = 0
    sample_ms: list = field(default_factory=list)
    rows_parsed: int = 0
    rows_skipped: int = 0
    tcp_opens_recorded: int = 0


class StatsMeter:
    """Collect the figures of one collector and network namespace, per flush.

    The kernel's counters are read from ``net/snmp`` of namespace.proc_dir:
    ``<proc_root>/net`` for the collector's own namespace, or
    ``/proc/<pid>/net`` of a process inside another one.
    """

    def __init__(
        self,
        host: str,
        proc_root: str,
        namespace: Namespace,
        source: str,
        close_events: bool,
    ) -> None:
        self.host = host
        self.proc_root = proc_root
        self.namespace = namespace
        self.source = source
        self.close_events = close_events
        self._period: Period | None = None
        self._opens: tuple[int, int] | None = None
        # Time of the sample at which _opens was read: opens count after it.
        self._baseline_us = 0
        self._rebase = False
        self._baseline: dict[str, int] = {}
        self._warned_snmp = False

    @property
    def netns(self) -> int | None:
        return self.namespace.inode

    @property
    def unflushed_samples(self) -> int:
        return 0 if self._period is None else len(self._period.sample_ms)

    def add_sample(
        self,
        time_us: int,
        duration_s: float,
        rows_parsed: int,
        rows_skipped: int,
        tcp_opens_recorded: int,
    ) -> None:
        """Add one sample of this namespace.

        The first sample only reads the kernel's counters, because its
        connections opened before that read. The first sample after a flush
        that could not read the counters does the same.
        """
        if self._period is None:
            self._period = Period(start_us=time_us)
            tcp_opens_recorded = self._read_baseline(time_us)
            if self._opens is None and not self._warned_snmp:
                self._warned_snmp = True
                log.warning(
                    "the completeness meter is off for %s: %s/net/snmp has no "
                    "TCP open counters",
                    "this proc root"
                    if self.netns is None
                    else f"network namespace {self.netns}",
                    self.namespace.proc_dir,
                )
        elif self._rebase:
            tcp_opens_recorded = self._read_baseline(time_us)

        period = self._period
        period.sample_ms.append(duration_s * 1000)
        period.rows_parsed += rows_parsed
        period.rows_skipped += rows_skipped
        period.tcp_opens_recorded += tcp_opens_recorded

    def _read_baseline(self, time_us: int) -> int:
        """Read the counters that the period's opens count from; return 0."""
        self._opens = read_tcp_opens(self.proc_root, self.namespace)
        self._baseline_us = time_us
        self._rebase = False
        return 0

    def add_opens(self, tcp_opens_recorded: int) -> None:
        """Add TCP connections recorded outside a sample (close events)."""
        if self._period is not None:
            self._period.tcp_opens_recorded += tcp_opens_recorded

    def add_detections(self, first_seen_us: np.ndarray) -> None:
        """Add TIME_WAIT detections of this namespace, by their first sight.

        A closing row listed in the sample that read the counters belongs to
        a connection that opened before them, so it is not an open of the
        period.
        """
        if self._period is not None:
            self._period.tcp_opens_recorded += int(
                (first_seen_us > self._baseline_us).sum()
            )

    def flush_row(self, time_us: int, counters: dict[str, int]) -> pa.Table | None:
        """Return the period's row of collector_stats and start the next period.

        counters contains running totals (attribution_misses, events_received,
        events_overruns, events_dropped); the row stores their change over
        the period. Returns None before the first sample.
        """
        period = self._period
        if period is None:
            return None

        opens = None
        if self._opens is not None:
            opens = read_tcp_opens(self.proc_root, self.namespace)
            # Without counters now, the next sample reads a new baseline.
            self._rebase = opens is None
        active = passive = None
        if opens is not None and self._opens is not None:
            active = opens[0] - self._opens[0]
            passive = opens[1] - self._opens[1]
        deltas = {
            name: value - self._baseline.get(name, 0)
            for name, value in counters.items()
        }

        row = self._row(period, time_us, active, passive, deltas)
        self._period = Period(start_us=time_us)
        self._opens = opens
        self._baseline = dict(counters)
        return row

    def _row(self, period, time_us, active, passive, deltas) -> pa.Table:
        durations = period.sample_ms
        stats_id = combine(
            [text_id(self.host)], [self.netns or 0], [period.start_us], [os.getpid()]
        )
        values = {
            "host": self.host,
            "netns": self.netns,
            "stats_id": int(stats_id[0]),
            "source": self.source,
            "close_events": self.close_events,
            "period_start": period.start_us,
            "last_seen": time_us,
            "samples": len(durations),
            "sample_ms_median": statistics.median(durations) if durations else None,
            "sample_ms_max": max(durations) if durations else None,
            "sample_ms_total": sum(durations),
            "rows_parsed": period.rows_parsed,
            "rows_skipped": period.rows_skipped,
            "attribution_misses": deltas.get("attribution_misses"),
            "events_received": deltas.get("events_received"),
            "events_overruns": deltas.get("events_overruns"),
            "events_dropped": deltas.get("events_dropped"),
            "tcp_active_opens": active,
            "tcp_passive_opens": passive,
            "tcp_opens_recorded": period.tcp_opens_recorded,
            "miss_rate": miss_rate(active, passive, period.tcp_opens_recorded),
        }
        arrays = []
        for target in schema.COLLECTOR_STATS:
            value = values[target.name]
            if target.type == schema.TIMESTAMP:
                arrays.append(pa.array([value], pa.int64()).cast(target.type))
            else:
                arrays.append(pa.array([value], target.type))
        return pa.Table.from_arrays(arrays, schema=schema.COLLECTOR_STATS)


def _locked(method):
    """Run a NamespaceMeters method while holding the instance's lock."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


class NamespaceMeters:
    """One StatsMeter per network namespace that the collector reads.

    A meter is made when a namespace is first read. When the namespace is no
    longer read, its meter and unflushed period are dropped, because with no
    process left in it its counters cannot be read for a last row.

    Samples add to the meters while a flush may read them in another thread,
    so each public method holds a lock.
    """

    def __init__(self, host: str, proc_root: str, source: str) -> None:
        self.host = host
        self.proc_root = proc_root
        self.source = source
        self.meters: dict[int | None, StatsMeter] = {}
        self._lock = threading.Lock()

    @_locked
    def follow(self, namespaces: list[Namespace], close_events: set) -> None:
        """Make a meter per namespace and drop those of namespaces not listed.

        close_events contains the inodes of the namespaces whose close events
        the collector receives.
        """
        listed = set()
        for namespace in namespaces:
            listed.add(namespace.inode)
            meter = self.meters.get(namespace.inode)
            if meter is None:
                meter = StatsMeter(
                    self.host, self.proc_root, namespace, self.source, False
                )
                self.meters[namespace.inode] = meter
            # The process that shows the namespace may change between scans.
            meter.namespace = namespace
            meter.close_events = namespace.inode in close_events

        for inode in set(self.meters) - listed:
            meter = self.meters.pop(inode)
            if meter.unflushed_samples:
                log.info(
                    "dropped %d unflushed samples of collector_stats for network "
                    "namespace %s: no process is left to read its counters",
                    meter.unflushed_samples,
                    inode,
                )

    @_locked
    def add_sample(
        self,
        time_us: int,
        duration_s: float,
        reports: dict[int | None, TableReport],
        opened: dict[int | None, int],
    ) -> None:
        """Add one sample to every meter; duration_s is the whole sample's."""
        for inode, meter in self.meters.items():
            report = reports.get(inode, TableReport())
            meter.add_sample(
                time_us,
                duration_s,
                report.rows,
                report.skipped_total,
                opened.get(inode, 0),
            )

    @_locked
    def add_opens(self, opened: dict[int | None, int]) -> None:
        """Add TCP connections recorded outside a sample, per namespace inode."""
        for inode, count in opened.items():
            meter = self.meters.get(inode)
            if meter is not None:
                meter.add_opens(count)

    @_locked
    def add_detections(self, detected: pa.Table | None) -> None:
        """Add connections records of TIME_WAIT detections to their namespaces."""
        if detected is None or detected.num_rows == 0:
            return
        netns = detected.column("netns").fill_null(NO_NETNS).to_numpy()
        first_seen = detected.column("first_seen").cast(pa.int64()).to_numpy()
        for inode, meter in self.meters.items():
            rows = netns == (NO_NETNS if inode is None else inode)
            meter.add_detections(first_seen[rows])

    @_locked
    def flush_rows(
        self, time_us: int, counters: dict[int | None, dict[str, int]]
    ) -> pa.Table | None:
        """Return one collector_stats row per namespace, or None before a sample.

        counters contains each namespace's running totals (see
        StatsMeter.flush_row).
        """
        rows = []
        for inode, meter in self.meters.items():
            row = meter.flush_row(time_us, counters.get(inode, {}))
            if row is not None:
                rows.append(row)
        return pa.concat_tables(rows) if rows else None


# The value of a NULL netns (a proc tree without ns links) in NumPy arrays.
# Namespace inodes are positive.
NO_NETNS = -1


def tcp_connections_by_netns(
    rows: pa.Table, indices: np.ndarray
) -> dict[int | None, int]:
    """Count the TCP sockets that do not listen among the rows at indices.

    Returns the count per netns inode, with None for rows without one.
    """
    if len(indices) == 0:
        return {}
    picked = rows.take(pa.array(indices, pa.int64()))
    is_tcp = pc.equal(picked.column("protocol"), "tcp").to_numpy(zero_copy_only=False)
    listening = picked.column("state_code").to_numpy() == TCP_LISTEN
    netns = picked.column("netns").fill_null(NO_NETNS).to_numpy()

    inodes, counts = np.unique(netns[is_tcp & ~listening], return_counts=True)
    return {
        (None if inode == NO_NETNS else int(inode)): int(count)
        for inode, count in zip(inodes, counts)
    }


def miss_rate(active: int | None, passive: int | None, recorded: int) -> float | None:
    """Estimate the share of TCP opens not recorded; None when the kernel counted none.

    An open recorded in one period whose kernel count fell in the previous
    one makes recorded exceed the count, so the estimate is clamped at 0.
    """
    if active is None or passive is None or active + passive <= 0:
        return None
    return max(0.0, 1.0 - recorded / (active + passive))


# The latest row per collector and namespace, and the miss rate over every
# stored flush of it that has the kernel's counts.
STATUS_SQL = """
WITH totals AS (
    SELECT host, netns,
           count(*) AS flushes,
           sum(tcp_active_opens + tcp_passive_opens) AS kernel_opens,
           sum(tcp_opens_recorded) FILTER (
               WHERE tcp_active_opens IS NOT NULL AND tcp_passive_opens IS NOT NULL
           ) AS recorded_opens,
           sum(events_overruns) AS all_overruns,
           sum(events_dropped) AS all_dropped
    FROM collector_stats GROUP BY host, netns
)
SELECT s.host, s.netns, s.source, s.close_events,
       s.period_start, s.last_seen AS period_end,
       s.samples, s.sample_ms_median, s.sample_ms_max,
       s.rows_parsed, s.rows_skipped, s.attribution_misses,
       s.events_received, s.events_overruns, s.events_dropped,
       s.tcp_active_opens, s.tcp_passive_opens, s.tcp_opens_recorded,
       s.miss_rate,
       t.flushes,
       CASE WHEN t.kernel_opens > 0
            THEN greatest(0.0, 1.0 - t.recorded_opens / t.kernel_opens) END
           AS miss_rate_all_flushes,
       t.all_overruns, t.all_dropped
FROM collector_stats s
JOIN totals t ON s.host = t.host AND s.netns IS NOT DISTINCT FROM t.netns
-- The latest period that had samples: the final flush of a stopped collector
-- can come after its last sample.
QUALIFY row_number() OVER (
    PARTITION BY s.host, s.netns ORDER BY s.samples > 0 DESC, s.last_seen DESC
) = 1
ORDER BY s.host, s.netns
"""


def status(data_dir: "str | os.PathLike[str]") -> pa.Table:
    """Return the latest collector_stats row per host and namespace, with totals.

    Raises NoDataError when nothing was collected in data_dir.
    """
    from fastsock.query import run_query

    return run_query(data_dir, STATUS_SQL)


def format_status(table: pa.Table) -> str:
    """Render the rows of status() as a short block of lines per namespace."""
    blocks = []
    for row in table.to_pylist():
        blocks.append("\n".join(_status_lines(row)))
    return "\n\n".join(blocks)


def _status_lines(row: dict) -> list[str]:
    start, end = row["period_start"], row["period_end"]
    seconds = (end - start).total_seconds()
    events = "on" if row["close_events"] else "off"
    lines = [
        f"host {row['host']}  netns {_text(row['netns'])}  source {row['source']}  "
        f"close events {events}",
        f"  last period    {start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC "
        f"({seconds:.1f} s)",
        f"  samples        {row['samples']}, median {_ms(row['sample_ms_median'])}, "
        f"max {_ms(row['sample_ms_max'])}",
        f"  rows           parsed {row['rows_parsed']}, skipped {row['rows_skipped']}",
        f"  attribution    {_text(row['attribution_misses'])} misses (socket inodes "
        "that no readable process held, summed over samples)",
    ]
    if row["close_events"]:
        lines.append(
            f"  close events   received {_text(row['events_received'])}, lost "
            f"{_text(row['events_overruns'])} overruns and "
            f"{_text(row['events_dropped'])} drops (all flushes: "
            f"{_text(row['all_overruns'])} and {_text(row['all_dropped'])})"
        )
    lines += [
        f"  TCP opens      kernel {_text(_sum(row))} (active "
        f"{_text(row['tcp_active_opens'])}, passive {_text(row['tcp_passive_opens'])})"
        f", recorded {row['tcp_opens_recorded']}",
        f"  miss rate      {_percent(row['miss_rate'])} last period, "
        f"{_percent(row['miss_rate_all_flushes'])} over {row['flushes']} flushes "
        "(estimate)",
    ]
    return lines


def _sum(row: dict) -> int | None:
    if row["tcp_active_opens"] is None or row["tcp_passive_opens"] is None:
        return None
    return row["tcp_active_opens"] + row["tcp_passive_opens"]


def _text(value) -> str:
    return "n/a" if value is None else str(value)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _percent(value: float | None) -> str:
    return "n/a (no TCP opens)" if value is None else f"{value * 100:.1f}%"
