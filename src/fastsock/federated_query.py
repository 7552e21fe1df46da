"""The entry of a federated query: pull each table from the fleet, then run SQL.

The entry is the node where the query starts: the `fastsock query --federated`
process over its local data directory, or the agent named by ``--agent``. It

1. checks that the SQL is one SELECT and binds it against empty tables, so a
   bad query fails before any peer is called;
2. pulls each table the SQL reads from itself and, recursively, its peers,
   with the filters and columns from fastsock.pushdown. The tables are pulled
   at the same time. Batches go to Arrow IPC files in a temporary directory,
   so memory keeps only the batches in flight;
3. runs the SQL in a sandboxed DuckDB over those files and a
   ``federation_nodes`` table of the nodes reached and missed.
"""

import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from fastsock.auth import Credentials
from fastsock.endpoints import Endpoint
from fastsock.errors import QueryError
from fastsock.federation import (
    ROWS_PER_BATCH,
    AnswerRegistry,
    NodeSettings,
    PullAnswer,
    PullRequest,
    check_direction,
)
from fastsock.federation_errors import FederationError
from fastsock.flight_client import stream
from fastsock.limits import DEFAULT_MAX_DEPTH, DEFAULT_TIMEOUT
from fastsock.pushdown import TablePlan, plan_tables, validate_select
from fastsock.query import PARTITION_SCHEMA, open_arrow_database
from fastsock.reports import (
    NodeReport,
    count_nodes,
    merge_tables,
    nodes_table,
    strict_failures,
    summary_lines,
)
from fastsock.schema import TABLES

log = logging.getLogger(__name__)

NODES_VIEW = "federation_nodes"

# Seconds an agent may take to run the SQL and send the result, on top of the
# pull's --timeout, before `fastsock query --agent` gives up on it.
RESULT_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class FederationOptions:
    """How far and how long a federated query walks, and what it tolerates.

    ``timeout`` is in seconds; ``peers`` maps peer addresses to endpoints for
    every node of the walk, over each node's own peers map.
    """

    direction: str = "downstream"
    max_depth: int = DEFAULT_MAX_DEPTH
    timeout: float = DEFAULT_TIMEOUT
    strict: bool = False
    peers: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise QueryError naming the option that is out of range."""
        check_direction(self.direction)
        if self.max_depth < 0:
            raise QueryError(f"invalid --max-depth {self.max_depth}; use 0 or more")
        if self.timeout <= 0:
            raise QueryError(f"invalid --timeout {self.timeout}; use seconds above 0")


def table_schemas() -> dict[str, pa.Schema]:
    """Return the schema of every view a federated query can pull.

    Each table of TABLES has a view of the newest record per key and a
    ``_records`` view of every record, both with the hive partition columns.
    """
    schemas = {}
    for name, (schema, _key) in TABLES.items():
        full = pa.unify_schemas([schema, PARTITION_SCHEMA])
        schemas[name] = full
        schemas[f"{name}_records"] = full
    return schemas


class FederatedQuery:
    """One federated query at its entry; use as a context manager.

    ``run()`` pulls and returns a RecordBatchReader of the result, which stays
    readable until ``close()``. ``reports`` then contains the merged node reports.
    """

    def __init__(
        self,
        node: NodeSettings,
        sql: str,
        options: FederationOptions,
        registry: "AnswerRegistry | None" = None,
        query_id: "str | None" = None,
    ) -> None:
        self.node = node
        self.sql = sql
        self.options = options
        self.registry = registry if registry is not None else AnswerRegistry()
        self.query_id = query_id or uuid.uuid4().hex
        self.reports: list[NodeReport] = []
        self.rows_pulled = 0
        self._spill: "Path | None" = None
        self._database: "duckdb.DuckDBPyConnection | None" = None
        self._timer: "threading.Timer | None" = None
        self._lock = threading.Lock()

    def __enter__(self) -> "FederatedQuery":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(self) -> pa.RecordBatchReader:
        """Pull the tables and run the SQL; return the result as batches.

        Raises QueryError for SQL that is invalid or fails, and FederationError
        when ``strict`` is set and a node was missed.
        """
        self.options.check()
        if not self.sql.strip():
            raise QueryError("the query is empty; pass a SQL statement such as SELECT")

        schemas = table_schemas()
        plans = plan_tables(self.sql, schemas)
        requests = self._requests(plans, schemas)
        self._bind_empty(requests)

        started = time.monotonic()
        self._spill = Path(tempfile.mkdtemp(prefix="fastsock-federation-"))
        sources, per_table = self._pull_all(requests)
        self.reports = merge_tables(per_table)
        log.info(
            "query %s pulled %d rows from %d nodes in %.0f ms",
            self.query_id,
            self.rows_pulled,
            sum(report.reached for report in self.reports),
            (time.monotonic() - started) * 1000,
        )

        if self.options.strict:
            self._check_strict()
        sources[NODES_VIEW] = nodes_table(self.reports)
        return self._execute(sources)

    def result_table(self) -> pa.Table:
        """Run the query and return the whole result as one table."""
        return self.run().read_all()

    def summary(self) -> list[str]:
        return summary_lines(self.reports)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._database is not None:
            self._database.close()
            self._database = None
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def _requests(
        self, plans: dict[str, TablePlan], schemas: dict[str, pa.Schema]
    ) -> list[PullRequest]:
        common = dict(
            query_id=self.query_id,
            direction=self.options.direction,
            depth=0,
            max_depth=self.options.max_depth,
            timeout=self.options.timeout,
            peers=dict(self.options.peers),
            time_zone=entry_time_zone(),
        )
        if not plans:
            # The SQL reads no fleet table, but federation_nodes still lists
            # the nodes: walk them without pulling rows.
            return [PullRequest(table=None, schema=None, where=None, **common)]

        requests = []
        for name, plan in sorted(plans.items()):
            schema = _projected_schema(name, schemas[name], plan.columns)
            requests.append(
                PullRequest(table=name, schema=schema, where=plan.where, **common)
            )
        return requests

    def _bind_empty(self, requests: list[PullRequest]) -> None:
        """Raise QueryError when the SQL does not bind against empty tables."""
        sources = {
            request.table: request.rows_schema().empty_table()
            for request in requests
            if request.table is not None
        }
        sources[NODES_VIEW] = nodes_table([])
        database = open_arrow_database(sources)
        try:
            database.sql(self.sql)
        except duckdb.Error as error:
            raise QueryError(f"query failed: {error}\nquery: {self.sql}") from error
        finally:
            database.close()

    def _pull_all(self, requests: list[PullRequest]) -> tuple[dict, list]:
        with ThreadPoolExecutor(
            len(requests), thread_name_prefix="fastsock-pull"
        ) as pool:
            results = list(pool.map(self._pull_one, requests))

        sources = {}
        per_table = []
        for request, (path, reports) in zip(requests, results):
            per_table.append(reports)
            if request.table is not None:
                sources[request.table] = ds.dataset(str(path), format="ipc")
        return sources, per_table

    def _pull_one(self, request: PullRequest) -> tuple[Path, list[NodeReport]]:
        answer = PullAnswer(self.node, request, self.registry)
        path = self._spill / f"{request.table or 'walk'}.arrow"

        rows = 0
        with pa.OSFile(str(path), "wb") as sink:
            with pa.ipc.new_file(sink, answer.schema) as writer:
                for batch in answer:
                    writer.write_batch(batch)
                    rows += batch.num_rows

        with self._lock:
            self.rows_pulled += rows
        return path, answer.reports

    def _check_strict(self) -> None:
        failures = strict_failures(self.reports)
        if not failures:
            return
        missed = "; ".join(
            f"{report.node or report.endpoint}: {report.status}: {report.reason}"
            for report in failures
        )
        raise FederationError(
            f"--strict: {count_nodes(len(failures))} did not send every row "
            f"({missed}); drop --strict to accept partial results"
        )

    def _execute(self, sources: dict) -> pa.RecordBatchReader:
        self._database = open_arrow_database(sources)
        self._timer = threading.Timer(
            self.node.max_query_seconds, self._database.interrupt
        )
        self._timer.start()
        try:
            return self._database.sql(self.sql).to_arrow_reader(ROWS_PER_BATCH)
        except duckdb.Error as error:
            raise QueryError(f"query failed: {error}\nquery: {self.sql}") from error


def run_federated_query(
    node: NodeSettings, sql: str, options: FederationOptions
) -> tuple[pa.Table, list[NodeReport]]:
    """Run ``sql`` federated from ``node``; return the result and node reports."""
    with FederatedQuery(node, sql, options) as query:
        try:
            table = query.result_table()
        except duckdb.Error as error:
            raise QueryError(f"query failed: {error}\nquery: {sql}") from error
        return table, query.reports


def federated_table(
    node: NodeSettings,
    table: str,
    options: FederationOptions,
    where: "str | None" = None,
) -> tuple[pa.Table, list[NodeReport]]:
    """Return the union of ``table`` over the fleet, with node columns, as Arrow.

    ``where`` is a SQL condition over the table's columns; it is pushed down to
    every node. Raises QueryError for a table that cannot be pulled.
    """
    if table not in table_schemas():
        raise QueryError(
            f"unknown table {table!r}; use one of {', '.join(sorted(table_schemas()))}"
        )
    sql = f'SELECT * FROM "{table}"'
    if where:
        sql += f" WHERE {where}"
    validate_select(sql)
    return run_federated_query(node, sql, options)


def query_agent(
    endpoint: Endpoint, sql: str, options: FederationOptions, credentials: Credentials
) -> tuple[pa.Table, list[NodeReport]]:
    """Run ``sql`` federated with the agent at ``endpoint`` as the entry.

    Raises QueryError when the agent rejects the SQL, FederationError for a
    --strict failure and AgentError when the agent cannot be used.
    """
    options.check()
    ticket = query_ticket(sql, options)
    timeout = options.timeout + RESULT_GRACE_SECONDS

    batches = []
    reports = None
    schema = None
    for batch, batch_reports in stream(endpoint, ticket, credentials, timeout):
        schema = batch.schema
        if batch.num_rows:
            batches.append(batch)
        if batch_reports is not None:
            reports = [NodeReport.from_dict(item) for item in batch_reports]

    if reports is None or schema is None:
        raise FederationError(
            f"agent {endpoint} ended the result without node reports; check its log"
        )
    return pa.Table.from_batches(batches, schema=schema), reports


def query_ticket(sql: str, options: FederationOptions) -> bytes:
    """Return the do_get ticket of a federated query with an agent as entry."""
    data = {
        "kind": "query",
        "sql": sql,
        "direction": options.direction,
        "max_depth": options.max_depth,
        "timeout": options.timeout,
        "strict": options.strict,
        "peers": options.peers,
    }
    return json.dumps(data).encode()


def entry_time_zone() -> str:
    """Return the TimeZone setting of a fresh DuckDB connection in this process."""
    database = duckdb.connect(":memory:")
    try:
        (zone,) = database.execute("SELECT current_setting('TimeZone')").fetchone()
    finally:
        database.close()
    return zone


def _projected_schema(
    name: str, schema: pa.Schema, columns: "tuple[str, ...] | None"
) -> pa.Schema:
    if columns is None:
        return schema
    if not columns:
        # The query reads no column, as in count(*). The key column keeps one
        # small value per row so the row count is right.
        base = name.removesuffix("_records")
        columns = (TABLES[base][1],)
    return pa.schema([schema.field(column) for column in columns])
