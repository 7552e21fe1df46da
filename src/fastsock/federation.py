"""Federated pulls: a node sends its own rows of a table and relays its peers'.

A pull request names a query id, a table, and the columns and filter to
apply. It also carries the walk direction, the depth of the receiving node,
the maximum depth, the seconds left and the ids of the nodes on the path
from the entry.

A node that receives a pull:

1. sends no rows when its id is on the path (a cycle), or when it
   already sent its rows for this query and table through another path and
   this request allows no deeper walk than the earlier one;
2. finds its peers in its stored flows (fastsock.discovery) and sends each
   the same request, one hop deeper, with this node added to the path, at
   most MAX_PARALLEL_PEERS at a time;
3. streams its own rows, then its peers' batches as they arrive, through a
   queue of RELAY_QUEUE_BATCHES batches, so a relay keeps a bounded number of
   batches whatever the size of its subtree;
4. ends with one report per node of its subtree (fastsock.reports).

A peer that fails, or has not finished when the seconds run out, is reported
as missed; the rows it already sent are kept.
"""

import base64
import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import pyarrow as pa

from fastsock.auth import Credentials
from fastsock.damaged import find_damaged_files
from fastsock.discovery import local_addresses, peer_addresses
from fastsock.endpoints import DEFAULT_AGENT_PORT, Endpoint, parse_endpoint
from fastsock.errors import QueryError
from fastsock.federation_errors import AgentError
from fastsock.flight_client import FlightAgentError, stream
from fastsock.limits import DEFAULT_MAX_QUERY_SECONDS, DEFAULT_MAX_ROWS
from fastsock.node import NodeIdentity
from fastsock.pushdown import validate_select
from fastsock.query import open_database, quote_identifier
from fastsock.reports import (
    DUPLICATE,
    ERROR,
    FAILED,
    OK,
    PARTIAL,
    SKIPPED,
    TIMEOUT,
    NodeReport,
)

log = logging.getLogger(__name__)

# Seconds each hop keeps for itself: a peer gets the seconds left minus this,
# so that it times out and reports before its caller gives up on it.
HOP_MARGIN = 0.2

# Peers pulled at the same time by one node.
MAX_PARALLEL_PEERS = 16

# Batches waiting between a node's peer streams and its own stream.
RELAY_QUEUE_BATCHES = 4

# Rows per batch of a node's own rows. At about 300 bytes per connection row
# this is about 5 MB, so a relay keeps some tens of MB at most.
ROWS_PER_BATCH = 16_384

# Queries remembered per node, so that each is served once.
MAX_REMEMBERED_QUERIES = 10_000

# Columns added in front of every pulled row.
NODE_FIELDS = [pa.field("node", pa.string()), pa.field("node_id", pa.string())]


@dataclass(frozen=True)
class NodeSettings:
    """A node's identity, data directory and limits, for serving pulls.

    ``credentials`` are sent to peers, ``peers`` maps peer addresses to agent
    endpoints, and flows to or from ``agent_ports`` do not make peers.
    """

    identity: NodeIdentity
    data_dir: Path
    credentials: Credentials = field(default_factory=Credentials)
    peers: dict = field(default_factory=dict)
    agent_ports: frozenset = frozenset({DEFAULT_AGENT_PORT})
    max_rows: int = DEFAULT_MAX_ROWS
    max_query_seconds: float = DEFAULT_MAX_QUERY_SECONDS


@dataclass(frozen=True)
class PullRequest:
    """One hop of a federated pull, as sent in a Flight ticket.

    ``schema`` is the schema of the rows without the node columns; ``table``
    None walks the nodes without pulling rows. ``timeout`` is in seconds.
    """

    query_id: str
    table: "str | None"
    schema: "pa.Schema | None"
    where: "str | None"
    direction: str
    depth: int
    max_depth: int
    timeout: float
    visited: tuple = ()
    via: "str | None" = None
    peers: dict = field(default_factory=dict)
    time_zone: "str | None" = None

    def to_ticket(self) -> bytes:
        data = {
            "kind": "pull",
            "query_id": self.query_id,
            "table": self.table,
            "schema": _encode_schema(self.schema),
            "where": self.where,
            "direction": self.direction,
            "depth": self.depth,
            "max_depth": self.max_depth,
            "timeout": self.timeout,
            "visited": list(self.visited),
            "via": self.via,
            "peers": self.peers,
            "time_zone": self.time_zone,
        }
        return json.dumps(data).encode()

    @classmethod
    def from_dict(cls, data: dict) -> "PullRequest":
        """Build a request from a decoded ticket; raises ValueError when invalid."""
        try:
            return cls(
                query_id=str(data["query_id"]),
                table=data["table"],
                schema=_decode_schema(data["schema"]),
                where=data["where"],
                direction=str(data["direction"]),
                depth=int(data["depth"]),
                max_depth=int(data["max_depth"]),
                timeout=float(data["timeout"]),
                visited=tuple(str(item) for item in data["visited"]),
                via=data["via"],
                peers={str(key): str(value) for key, value in data["peers"].items()},
                time_zone=data["time_zone"],
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"invalid pull request: {error!r}") from error

    def child(self, identity: NodeIdentity, timeout: float) -> "PullRequest":
        """Return the request that this node sends to its peers."""
        return replace(
            self,
            depth=self.depth + 1,
            timeout=timeout,
            visited=(*self.visited, identity.node_id),
            via=identity.name,
        )

    def rows_schema(self) -> pa.Schema:
        """Return the schema of the streamed rows: node columns, then the table's."""
        fields = list(self.schema) if self.schema is not None else []
        return pa.schema(NODE_FIELDS + fields)


class AnswerRegistry:
    """The queries a node has served, so that each is served once.

    For each (query id, table) it keeps the smallest depth it served at. A
    later request from a smaller depth may walk further under --max-depth, so
    it is relayed to the peers again, without the node's own rows.
    """

    ROWS = "rows"
    RELAY = "relay"
    DUPLICATE = "duplicate"

    def __init__(self, capacity: int = MAX_REMEMBERED_QUERIES) -> None:
        self._capacity = capacity
        self._depths: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def claim(self, query_id: str, table: "str | None", depth: int) -> str:
        """Return ROWS, RELAY or DUPLICATE for a request at ``depth``."""
        key = (query_id, table)
        with self._lock:
            known = self._depths.get(key)
            if known is None:
                self._remember(key, depth)
                return self.ROWS
            if depth < known:
                self._depths[key] = depth
                return self.RELAY
            return self.DUPLICATE

    def _remember(self, key: tuple, depth: int) -> None:
        # Dicts keep insertion order, so the first key is the oldest query.
        if len(self._depths) >= self._capacity:
            del self._depths[next(iter(self._depths))]
        self._depths[key] = depth


class PullAnswer:
    """One node's response to a pull request, iterated as record batches.

    After iteration, ``reports`` contains one report per node of the subtree.
    """

    def __init__(
        self, node: NodeSettings, request: PullRequest, registry: AnswerRegistry
    ) -> None:
        self.node = node
        self.request = request
        self.registry = registry
        self.schema = request.rows_schema()
        self.reports: list[NodeReport] = []
        self.rows = 0
        self._database: "duckdb.DuckDBPyConnection | None" = None

    def __iter__(self):
        started = time.monotonic()
        request = self.request
        deadline = started + min(request.timeout, self.node.max_query_seconds)

        role = self._claim()
        if role == AnswerRegistry.DUPLICATE:
            self.reports = [self._own_report(DUPLICATE, "", started, [])]
            return

        try:
            self._database = self._open_database()
        except (duckdb.Error, OSError, QueryError) as error:
            log.warning(
                "query %s: cannot open the data directory: %s", request.query_id, error
            )
            reason = f"cannot open the data directory: {error}"
            self.reports = [self._own_report(FAILED, reason, started, [])]
            return

        fanout = None
        try:
            try:
                addresses, targets, skipped, problem = self._find_peers()
                fanout = PeerFanout(self.node, request, targets, deadline, self.schema)
                fanout.start()

                status, reason = DUPLICATE, ""
                if role == AnswerRegistry.ROWS:
                    status, reason = yield from self._own_rows(deadline)
            finally:
                self._database.close()

            yield from fanout.batches()
        finally:
            if fanout is not None:
                fanout.close()

        if problem and status == OK:
            status, reason = PARTIAL, problem
        own = self._own_report(status, reason, started, addresses)
        self.reports = [own, *fanout.reports, *skipped]

    def _claim(self) -> str:
        request = self.request
        if self.node.identity.node_id in request.visited:
            return AnswerRegistry.DUPLICATE
        return self.registry.claim(request.query_id, request.table, request.depth)

    def _own_report(
        self, status: str, reason: str, started: float, addresses: list[str]
    ) -> NodeReport:
        identity = self.node.identity
        return NodeReport(
            node=identity.name,
            node_id=identity.node_id,
            endpoint=None,
            via=self.request.via,
            depth=self.request.depth,
            status=status,
            reason=reason,
            rows=self.rows,
            duration_ms=(time.monotonic() - started) * 1000,
            addresses=addresses,
        )

    def _open_database(self) -> duckdb.DuckDBPyConnection:
        return open_database(
            self.node.data_dir, sandboxed=True, time_zone=self.request.time_zone
        )

    def _reopen_without_damaged(self, error: Exception) -> bool:
        """Reopen the database if ``error`` came from damaged Parquet files.

        The new database's views skip the files that find_damaged_files
        recorded. Returns False, and keeps the database, for any other error.
        """
        damaged = find_damaged_files(self.node.data_dir, error)
        if not damaged:
            return False

        log.info(
            "query %s: reading %s again without %d damaged files",
            self.request.query_id,
            self.node.data_dir,
            len(damaged),
        )
        self._database.close()
        self._database = self._open_database()
        return True

    def _find_peers(self) -> tuple:
        """Return (own addresses, targets, skipped reports, problem) of this node.

        ``problem`` is why discovery failed, or an empty string.
        """
        request = self.request
        try:
            try:
                own_addresses, targets = self._discover()
            except duckdb.Error as error:
                if not self._reopen_without_damaged(error):
                    raise
                own_addresses, targets = self._discover()
        except (duckdb.Error, ValueError) as error:
            # ValueError includes EndpointError, for a bad peers map entry.
            log.warning("query %s: peer discovery failed: %s", request.query_id, error)
            return [], [], [], f"peer discovery failed: {error}"

        if request.depth < request.max_depth:
            return own_addresses, targets, [], ""

        skipped = [
            NodeReport(
                node=None,
                node_id=None,
                endpoint=str(target.endpoint),
                via=self.node.identity.name,
                depth=request.depth + 1,
                status=SKIPPED,
                reason=f"deeper than --max-depth {request.max_depth}",
                rows=0,
            )
            for target in targets
        ]
        return own_addresses, [], skipped, ""

    def _discover(self) -> tuple[list[str], list]:
        """Return this node's own addresses and the peers to send the pull to."""
        request = self.request
        merged_map = {**self.node.peers, **request.peers}
        own_addresses = local_addresses(self._database)
        addresses = peer_addresses(
            self._database,
            request.direction,
            exclude_ports=self.node.agent_ports,
            mapped=frozenset(merged_map),
            own_addresses=own_addresses,
        )
        return own_addresses, _targets(addresses, merged_map, self.node.credentials)

    def _own_rows(self, deadline: float, retry: bool = True):
        """Yield this node's rows; return (status, reason) when done.

        A query that fails on a damaged Parquet file before any row is sent
        runs once more over views that skip the damaged files.
        """
        request = self.request
        database = self._database
        if request.table is None or not _has_view(database, request.table):
            return OK, ""

        seconds = max(0.0, deadline - time.monotonic())
        timer = threading.Timer(seconds, database.interrupt)
        timer.start()
        try:
            sql = self._own_rows_sql(database)
            reader = database.sql(sql).to_arrow_reader(ROWS_PER_BATCH)
            for batch in reader:
                room = self.node.max_rows - self.rows
                part = batch.slice(0, room)
                if part.num_rows:
                    self.rows += part.num_rows
                    yield conform_batch(part, self.schema, self.node.identity)

                if batch.num_rows > room:
                    return PARTIAL, f"stopped at the row limit of {self.node.max_rows}"
                if time.monotonic() > deadline:
                    return PARTIAL, "stopped at the time limit"
        except duckdb.InterruptException:
            return (PARTIAL if self.rows else FAILED), "stopped at the time limit"
        except (duckdb.Error, OSError, QueryError) as error:
            # In DuckDB 2.0.1 a read error that comes while batches stream
            # arrives as OSError. Damaged files are recorded even when rows
            # were sent, so later pulls skip them.
            reopened = retry and self._reopen_without_damaged(error)
            if reopened and not self.rows:
                timer.cancel()
                return (yield from self._own_rows(deadline, retry=False))
            log.warning("query %s: own rows failed: %s", request.query_id, error)
            return (PARTIAL if self.rows else FAILED), f"query failed: {error}"
        finally:
            timer.cancel()
        return OK, ""

    def _own_rows_sql(self, database) -> str:
        request = self.request
        available = _column_names(database, request.table)
        selected = [name for name in request.schema.names if name in available]
        columns = ", ".join(quote_identifier(name) for name in selected) or "NULL AS _"

        sql = f"SELECT {columns} FROM {quote_identifier(request.table)}"
        if request.where:
            sql += f" WHERE ({request.where})"
        validate_select(sql)
        return sql


class PeerFanout:
    """Pulls from a node's peers in threads, relayed through a bounded queue.

    Each worker sends its peer's batches, then exactly one ("done", target,
    reports) message, unless the fan-out was cancelled first.
    """

    def __init__(
        self,
        node: NodeSettings,
        request: PullRequest,
        targets: list["PeerTarget"],
        deadline: float,
        schema: pa.Schema,
    ) -> None:
        self.node = node
        self.request = request
        self.targets = targets
        self.deadline = deadline
        self.schema = schema
        self.reports: list[NodeReport] = []
        self._queue: queue.Queue = queue.Queue(maxsize=RELAY_QUEUE_BATCHES)
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._rows: dict[PeerTarget, int] = {target: 0 for target in targets}
        self._done: set[PeerTarget] = set()
        self._started = time.monotonic()
        self._executor: "ThreadPoolExecutor | None" = None

    def start(self) -> None:
        if not self.targets:
            return
        workers = min(MAX_PARALLEL_PEERS, len(self.targets))
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fastsock-peer")
        for target in self.targets:
            self._executor.submit(self._pull, target)

    def batches(self):
        """Yield peer batches until every peer is done or the deadline passes."""
        while len(self._done) < len(self.targets):
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._expire()
                return
            try:
                message = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue

            if message[0] == "batch":
                yield message[1]
            else:
                _kind, target, reports = message
                self._done.add(target)
                self.reports.extend(reports)

    def close(self) -> None:
        self._cancel.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _pull(self, target: "PeerTarget") -> None:
        started = time.monotonic()
        timeout = self.deadline - started - HOP_MARGIN
        if timeout <= 0:
            self._fail(target, TIMEOUT, "no time left for this hop", started)
            return

        ticket = self.request.child(self.node.identity, timeout).to_ticket()
        credentials = self.node.credentials
        reports = None
        try:
            for batch, batch_reports in stream(
                target.endpoint, ticket, credentials, timeout, self._cancel
            ):
                if batch is not None and batch.num_rows:
                    with self._lock:
                        self._rows[target] += batch.num_rows
                    conformed = conform_batch(batch, self.schema, None)
                    if not self._put(("batch", conformed)):
                        return
                if batch_reports is not None:
                    reports = [NodeReport.from_dict(item) for item in batch_reports]
        except FlightAgentError as error:
            self._fail(target, error.status, error.detail, started)
            return
        except (AgentError, pa.ArrowException, ValueError, TypeError) as error:
            self._fail(target, ERROR, str(error), started)
            return

        if reports is None and not self._cancel.is_set():
            self._fail(target, ERROR, "the stream ended without node reports", started)
            return
        self._put(("done", target, reports))

    def _fail(
        self, target: "PeerTarget", status: str, reason: str, started: float
    ) -> None:
        if self._cancel.is_set():
            return
        log.warning(
            "query %s: peer %s at %s %s: %s",
            self.request.query_id,
            target.address,
            target.endpoint,
            status,
            reason,
        )
        self._put(("done", target, [self._missed(target, status, reason, started)]))

    def _missed(
        self, target: "PeerTarget", status: str, reason: str, started: float
    ) -> NodeReport:
        with self._lock:
            rows = self._rows[target]
        return NodeReport(
            node=None,
            node_id=None,
            endpoint=str(target.endpoint),
            via=self.node.identity.name,
            depth=self.request.depth + 1,
            status=status,
            reason=reason,
            rows=rows,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    def _put(self, message: tuple) -> bool:
        """Queue a message; False when the fan-out was cancelled first."""
        while not self._cancel.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _expire(self) -> None:
        self._cancel.set()
        for target in self.targets:
            if target in self._done:
                continue
            log.warning(
                "query %s: peer %s at %s timed out",
                self.request.query_id,
                target.address,
                target.endpoint,
            )
            report = self._missed(target, TIMEOUT, "no answer in time", self._started)
            self.reports.append(report)


@dataclass(frozen=True)
class PeerTarget:
    """A peer address and the agent endpoint that serves it."""

    address: str
    endpoint: Endpoint


def _targets(
    addresses: list[str], peers_map: dict, credentials: Credentials
) -> list[PeerTarget]:
    tls = credentials.tls_root_certs is not None
    targets = {}
    for address in addresses:
        mapped = peers_map.get(address)
        if mapped is not None:
            endpoint = parse_endpoint(mapped, tls=tls)
        else:
            endpoint = Endpoint(address, DEFAULT_AGENT_PORT, tls)
        # Two addresses may map to one endpoint; it is called once.
        targets.setdefault(endpoint, PeerTarget(address, endpoint))
    return list(targets.values())


def conform_batch(
    batch: pa.RecordBatch, schema: pa.Schema, identity: "NodeIdentity | None"
) -> pa.RecordBatch:
    """Return ``batch`` with exactly the fields of ``schema``.

    With ``identity`` the node columns are filled in from it; without, they
    are taken from the batch. A missing column is filled with nulls, and a
    column of another type is cast. Raises pa.ArrowInvalid when a cast fails.
    """
    if identity is None and batch.schema.equals(schema):
        return batch

    rows = batch.num_rows
    names = batch.schema.names
    arrays = []
    for schema_field in schema:
        if identity is not None and schema_field.name == "node":
            arrays.append(pa.array([identity.name] * rows, pa.string()))
        elif identity is not None and schema_field.name == "node_id":
            arrays.append(pa.array([identity.node_id] * rows, pa.string()))
        elif schema_field.name in names:
            column = batch.column(names.index(schema_field.name))
            arrays.append(
                column
                if column.type == schema_field.type
                else column.cast(schema_field.type)
            )
        else:
            arrays.append(pa.nulls(rows, schema_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _has_view(database, name: str) -> bool:
    rows = database.execute(
        "SELECT 1 FROM duckdb_views() WHERE view_name = ?", [name]
    ).fetchall()
    return bool(rows)


def _column_names(database, view: str) -> set[str]:
    rows = database.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = ?", [view]
    ).fetchall()
    return {name for (name,) in rows}


def _encode_schema(schema: "pa.Schema | None") -> "str | None":
    if schema is None:
        return None
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _decode_schema(text: "str | None") -> "pa.Schema | None":
    if text is None:
        return None
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
    except (pa.ArrowInvalid, ValueError) as error:
        raise ValueError(f"invalid schema in pull request: {error}") from error


def check_direction(direction: str) -> None:
    """Raise QueryError unless ``direction`` is downstream, upstream or both."""
    if direction not in ("downstream", "upstream", "both"):
        raise QueryError(
            f"invalid direction {direction!r}; use downstream, upstream or both"
        )
