"""Collector statistics per flush, with the completeness meter behind `fastsock status`.

The kernel counts every TCP open of a network namespace in
``<proc_root>/net/snmp``: ``ActiveOpens`` (connect calls) and ``PassiveOpens``
(connections a listener created). Each open makes one local socket, so
between two flushes their sum is the number of TCP connections that a
complete recorder would have recorded. The collector compares it with the
TCP connections it first recorded in the same period, from samples and from
close events, and stores both in the ``collector_stats`` table.
"""

import logging
import os
import statistics
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsock import schema
from fastsock.identity import combine, text_id
from fastsock.sockets import TCP_LISTEN

log = logging.getLogger(__name__)


def parse_tcp_opens(text: str) -> tuple[int, int]:
    """Return (ActiveOpens, PassiveOpens) from the text of /proc/net/snmp.

    The file has a header line and a value line per protocol, both starting
    with the protocol name. Raises ValueError naming what is missing.
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
    return active, passive


def read_tcp_opens(snmp_path: str) -> tuple[int, int] | None:
    """Return the kernel's TCP open counters, or None when the file is unreadable."""
    try:
        with open(snmp_path, encoding="ascii") as file:
            return parse_tcp_opens(file.read())
    except (OSError, ValueError) as error:
        log.debug("cannot read TCP open counters from %s: %s", snmp_path, error)
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

    snmp_path is the ``net/snmp`` file of the namespace that the collector
    samples: ``<proc_root>/net/snmp`` for its own namespace, or
    ``/proc/<pid>/net/snmp`` for a process inside another one.
    """

    def __init__(
        self,
        host: str,
        netns: int | None,
        snmp_path: str,
        source: str,
        close_events: bool,
    ) -> None:
        self.host = host
        self.netns = netns
        self.snmp_path = snmp_path
        self.source = source
        self.close_events = close_events
        self._period: Period | None = None
        self._opens: tuple[int, int] | None = None
        self._baseline: dict[str, int] = {}
        self._warned_snmp = False

    def add_sample(
        self,
        time_us: int,
        duration_s: float,
        rows_parsed: int,
        rows_skipped: int,
        tcp_opens_recorded: int,
    ) -> None:
        """Add one sample. The first sample only sets the baseline of the opens.

        Connections in the first sample were open before the collector
        started, so they are not opens of the period.
        """
        if self._period is None:
            self._period = Period(start_us=time_us)
            self._opens = read_tcp_opens(self.snmp_path)
            tcp_opens_recorded = 0
            if self._opens is None and not self._warned_snmp:
                self._warned_snmp = True
                log.warning(
                    "the completeness meter is off: %s has no TCP open counters",
                    self.snmp_path,
                )

        period = self._period
        period.sample_ms.append(duration_s * 1000)
        period.rows_parsed += rows_parsed
        period.rows_skipped += rows_skipped
        period.tcp_opens_recorded += tcp_opens_recorded

    def add_opens(self, tcp_opens_recorded: int) -> None:
        """Add TCP connections recorded outside a sample (close events)."""
        if self._period is not None:
            self._period.tcp_opens_recorded += tcp_opens_recorded

    def flush_row(self, time_us: int, counters: dict[str, int]) -> pa.Table | None:
        """Return the period's row of collector_stats and start the next period.

        counters contains running totals (attribution_misses, events_received,
        events_overruns, events_dropped); the row stores their change over
        the period. Returns None before the first sample.
        """
        period = self._period
        if period is None:
            return None

        opens = read_tcp_opens(self.snmp_path) if self._opens is not None else None
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


def count_tcp_connections(rows: pa.Table, indices: np.ndarray) -> int:
    """Return how many of the rows at indices are TCP sockets that do not listen."""
    if len(indices) == 0:
        return 0
    picked = rows.take(pa.array(indices, pa.int64()))
    is_tcp = pc.equal(picked.column("protocol"), "tcp").to_numpy(zero_copy_only=False)
    listening = picked.column("state_code").to_numpy() == TCP_LISTEN
    return int((is_tcp & ~listening).sum())


def miss_rate(active: int | None, passive: int | None, recorded: int) -> float | None:
    """Estimate the share of TCP opens not recorded; None when the kernel counted none.

    An open recorded in one period whose kernel count fell in the previous
    one makes recorded exceed the count, so the estimate is clamped at 0.
    """
    if active is None or passive is None or active + passive <= 0:
        return None
    return max(0.0, 1.0 - recorded / (active + passive))


# The latest row per collector and namespace, and the miss rate over every
# stored flush of it.
STATUS_SQL = """
WITH totals AS (
    SELECT host, netns,
           count(*) AS flushes,
           sum(tcp_active_opens + tcp_passive_opens) AS kernel_opens,
           sum(tcp_opens_recorded) AS recorded_opens,
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
FROM collector_stats s JOIN totals t USING (host, netns)
QUALIFY row_number() OVER (PARTITION BY s.host, s.netns ORDER BY s.last_seen DESC) = 1
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
