"""Reports of the nodes a federated query reached or missed.

Every node sends, after its rows, one report per node of its subtree. The
entry merges them into the ``federation_nodes`` table: one row per node
reached (keyed by node id) and one per endpoint missed.
"""

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa

# Statuses of a node that responded. "duplicate" marks a second request for the
# same query, to which a node sends no rows, and is merged away.
OK = "ok"
PARTIAL = "partial"
FAILED = "failed"
DUPLICATE = "duplicate"
REACHED = frozenset({OK, PARTIAL, FAILED, DUPLICATE})

# Statuses of an endpoint that did not respond, set by the node that called it.
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
REJECTED = "rejected"
ERROR = "error"
SKIPPED = "skipped"

# Statuses that fail a query run with --strict. A node skipped because of
# --max-depth was left out on purpose, so it does not.
STRICT_FAILURES = frozenset({PARTIAL, FAILED, UNREACHABLE, TIMEOUT, REJECTED, ERROR})

# When one node has several statuses (one per table), the worst one is shown.
SEVERITY = [
    OK,
    DUPLICATE,
    SKIPPED,
    PARTIAL,
    FAILED,
    ERROR,
    TIMEOUT,
    UNREACHABLE,
    REJECTED,
]

FEDERATION_NODES = pa.schema(
    [
        pa.field("node", pa.string()),
        pa.field("node_id", pa.string()),
        pa.field("endpoint", pa.string()),
        pa.field("via", pa.string()),
        pa.field("depth", pa.int32()),
        pa.field("reached", pa.bool_()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("paths", pa.int32()),
        pa.field("duration_ms", pa.float64()),
    ]
)


@dataclass
class NodeReport:
    """The status and row count of one node for one table, or of a missed endpoint.

    ``paths`` counts the requests that reached the node for this table; the
    node sent its rows for the first one only. ``addresses`` lists the node's
    own addresses, so that a miss of one of them is known to be this node.
    """

    node: "str | None"
    node_id: "str | None"
    endpoint: "str | None"
    via: "str | None"
    depth: int
    status: str
    reason: str = ""
    rows: int = 0
    paths: int = 1
    duration_ms: float = 0.0
    addresses: list[str] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.status in REACHED

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NodeReport":
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in names})


def merge_paths(reports: Iterable[NodeReport]) -> list[NodeReport]:
    """Merge the reports of one table's pull: one per node id or missed endpoint.

    The report of the response with rows wins over duplicates, rows and paths
    add up, and the smallest depth is kept.
    """
    merged: dict[tuple, NodeReport] = {}
    for report in reports:
        key = _key(report)
        if key not in merged:
            merged[key] = replace(report, addresses=list(report.addresses))
            continue

        existing = merged[key]
        first = report if _rank(report) < _rank(existing) else existing
        merged[key] = replace(
            first,
            rows=existing.rows + report.rows,
            paths=existing.paths + report.paths,
            depth=min(existing.depth, report.depth),
            addresses=sorted(set(existing.addresses) | set(report.addresses)),
        )
    return list(merged.values())


def merge_tables(per_table: list[list[NodeReport]]) -> list[NodeReport]:
    """Merge the reports of several tables' pulls of one query, then drop misses
    of endpoints that belong to a node reached through another address.

    Rows add up, paths and depth take the largest and smallest value, and the
    worst status is kept with the reasons of every table.
    """
    merged: dict[tuple, NodeReport] = {}
    for reports in per_table:
        for report in merge_paths(reports):
            key = _key(report)
            merged[key] = (
                _combine_tables(merged[key], report) if key in merged else report
            )

    return _without_known_misses(list(merged.values()))


def _combine_tables(existing: NodeReport, report: NodeReport) -> NodeReport:
    worst = max(existing, report, key=lambda item: SEVERITY.index(item.status))
    reasons = [reason for reason in (existing.reason, report.reason) if reason]
    return replace(
        worst,
        rows=existing.rows + report.rows,
        paths=max(existing.paths, report.paths),
        depth=min(existing.depth, report.depth),
        reason="; ".join(dict.fromkeys(reasons)),
        duration_ms=max(existing.duration_ms, report.duration_ms),
    )


def _without_known_misses(reports: list[NodeReport]) -> list[NodeReport]:
    reached_addresses = set()
    for report in reports:
        if report.reached:
            reached_addresses.update(report.addresses)

    kept = []
    for report in reports:
        host = _endpoint_host(report.endpoint)
        if not report.reached and host in reached_addresses:
            continue
        if report.status == DUPLICATE:
            # Only a second request reached the node: the response that carried
            # its rows was lost on a path that failed.
            report = replace(
                report, status=PARTIAL, reason="the path that carried its rows failed"
            )
        kept.append(report)
    return sorted(
        kept, key=lambda item: (item.depth, item.node or "", item.endpoint or "")
    )


def nodes_table(reports: Iterable[NodeReport]) -> pa.Table:
    """Return the ``federation_nodes`` table of merged reports."""
    rows = []
    for report in reports:
        row = report.to_dict()
        row["reached"] = report.reached
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=FEDERATION_NODES)


def strict_failures(reports: Iterable[NodeReport]) -> list[NodeReport]:
    """Return the reports that make a --strict query fail."""
    return [report for report in reports if report.status in STRICT_FAILURES]


def count_nodes(count: int) -> str:
    """Return ``count`` with the noun node, singular for one: "1 node", "2 nodes"."""
    return f"{count} node" if count == 1 else f"{count} nodes"


def summary_lines(reports: list[NodeReport]) -> list[str]:
    """Return a short text summary for standard error: totals, then each miss."""
    reached = [report for report in reports if report.reached]
    missed = [report for report in reports if not report.reached]
    rows = sum(report.rows for report in reports)

    names = ", ".join(report.node or report.node_id or "?" for report in reached)
    lines = [
        f"federation: {count_nodes(len(reached))} reached ({names}), "
        f"{len(missed)} missed, {rows} rows"
    ]
    for report in reports:
        if report.status not in (OK, DUPLICATE):
            label = report.node or report.endpoint or "?"
            where = f" at {report.endpoint}" if report.endpoint and report.node else ""
            via = f" via {report.via}" if report.via else ""
            lines.append(f"  {label}{where}{via}: {report.status}: {report.reason}")
    return lines


def _key(report: NodeReport) -> tuple:
    if report.reached and report.node_id:
        return ("node", report.node_id)
    return ("endpoint", report.endpoint)


def _rank(report: NodeReport) -> int:
    # The report of the response that carried the node's own rows comes first.
    return 1 if report.status == DUPLICATE else 0


def _endpoint_host(endpoint: "str | None") -> "str | None":
    if endpoint is None:
        return None
    host, _, _port = endpoint.rpartition(":")
    return host.strip("[]") or None
