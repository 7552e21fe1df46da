"""The agent's Arrow Flight service.

do_get takes a JSON ticket of one of two kinds:

- ``pull``: a federated pull from another node (fastsock.federation). The
  stream is the rows of this node and its subtree, then an empty batch whose
  app_metadata contains the node reports.
- ``query``: a federated query with this agent as the entry
  (fastsock.federated_query). The stream is the SQL result, then an empty
  batch whose app_metadata contains the node reports.

do_action ``describe`` returns the node id, name and tables with files as JSON.
Every call must pass the token check (fastsock.auth) first.
"""

import json
import logging
import time

import pyarrow as pa
import pyarrow.flight as flight

from fastsock.auth import MIDDLEWARE_KEY, TokenCheckFactory, authorize
from fastsock.endpoints import Endpoint
from fastsock.errors import QueryError
from fastsock.federated_query import FederatedQuery, FederationOptions
from fastsock.federation import AnswerRegistry, NodeSettings, PullAnswer, PullRequest
from fastsock.federation_errors import AgentStartError, FederationError
from fastsock.flight_client import QUERY_ERROR, STRICT_ERROR, reports_metadata
from fastsock.query import tables_with_files
from fastsock.reports import count_nodes

log = logging.getLogger(__name__)

ACTIONS = [("describe", "Return the node id, name and tables with files, as JSON.")]


class AgentServer(flight.FlightServerBase):
    """A Flight server over one node's data directory; serving starts at init."""

    def __init__(
        self,
        node: NodeSettings,
        listen: Endpoint,
        token: "str | None" = None,
        certificate: "flight.CertKeyPair | None" = None,
    ) -> None:
        location = Endpoint(listen.host, listen.port, certificate is not None)
        try:
            super().__init__(
                location.location(),
                tls_certificates=[certificate] if certificate is not None else None,
                middleware={MIDDLEWARE_KEY: TokenCheckFactory(token)},
            )
        except pa.ArrowException as error:
            # gRPC reports a busy port or an address not on this host only as
            # "Server did not start properly".
            raise AgentStartError(
                f"cannot listen on {listen.host}:{listen.port}: {error}; the port "
                "may be in use or the address not on this host. Pick another "
                "--listen address or port"
            ) from error
        self.node = node
        self.endpoint = Endpoint(listen.host, self.port, certificate is not None)
        self.registry = AnswerRegistry()

    def do_get(self, context, ticket):
        authorize(context, "do_get")
        data = _decode_ticket(ticket.ticket)

        kind = data.get("kind")
        if kind == "pull":
            return self._pull(context, data)
        if kind == "query":
            return self._query(context, data)
        raise flight.FlightServerError(
            f"invalid ticket kind {kind!r}; expected 'pull' or 'query'"
        )

    def do_action(self, context, action):
        authorize(context, "do_action")
        if action.type != "describe":
            raise flight.FlightServerError(
                f"unknown action {action.type!r}; the actions are "
                f"{', '.join(name for name, _ in ACTIONS)}"
            )

        identity = self.node.identity
        body = {
            "node_id": identity.node_id,
            "node": identity.name,
            "tables": tables_with_files(self.node.data_dir),
        }
        return [json.dumps(body).encode()]

    def list_actions(self, context):
        authorize(context, "list_actions")
        return ACTIONS

    def _pull(self, context, data: dict) -> flight.GeneratorStream:
        try:
            request = PullRequest.from_dict(data)
        except ValueError as error:
            raise flight.FlightServerError(str(error)) from error

        answer = PullAnswer(self.node, request, self.registry)
        requester = f"{request.via or 'a client'} at {context.peer()}"
        return flight.GeneratorStream(
            answer.schema, _pull_stream(answer, request, requester)
        )

    def _query(self, context, data: dict) -> flight.GeneratorStream:
        sql, options = self._query_options(data)
        started = time.monotonic()
        query = FederatedQuery(self.node, sql, options, self.registry)
        requester = context.peer()

        try:
            reader = query.run()
        except QueryError as error:
            query.close()
            log.info("query %s from %s rejected: %s", query.query_id, requester, error)
            raise flight.FlightServerError(
                str(error), extra_info=QUERY_ERROR
            ) from error
        except FederationError as error:
            query.close()
            log.warning("query %s from %s failed: %s", query.query_id, requester, error)
            raise flight.FlightServerError(
                str(error), extra_info=STRICT_ERROR
            ) from error
        except BaseException:
            query.close()
            raise

        return flight.GeneratorStream(
            reader.schema, _query_stream(query, reader, requester, started)
        )

    def _query_options(self, data: dict) -> tuple[str, FederationOptions]:
        try:
            sql = str(data["sql"])
            options = FederationOptions(
                direction=str(data["direction"]),
                max_depth=int(data["max_depth"]),
                timeout=min(float(data["timeout"]), self.node.max_query_seconds),
                strict=bool(data["strict"]),
                peers={str(key): str(value) for key, value in data["peers"].items()},
            )
            options.check()
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise flight.FlightServerError(
                f"invalid query request: {error!r}", extra_info=QUERY_ERROR
            ) from error
        return sql, options


def _stream_with_reports(batches, schema: pa.Schema, reports, on_end):
    """Yield the batches, then an empty batch whose metadata carries the reports.

    reports is called after the last batch, since a federated query fills its
    node reports while it streams. on_end(rows, outcome) runs however the
    stream ends: "done", or "cancelled" when the client stopped reading.
    """
    rows = 0
    outcome = "cancelled"
    try:
        for batch in batches:
            rows += batch.num_rows
            yield batch

        metadata = reports_metadata([report.to_dict() for report in reports()])
        yield _empty_batch(schema), metadata
        outcome = "done"
    finally:
        on_end(rows, outcome)


def _pull_stream(answer: PullAnswer, request: PullRequest, requester: str):
    started = time.monotonic()

    def log_pull(rows: int, outcome: str) -> None:
        log.info(
            "pull %s of %s from %s: %d rows in %.0f ms, %s",
            request.query_id,
            request.table or "no table",
            requester,
            rows,
            (time.monotonic() - started) * 1000,
            outcome,
        )

    return _stream_with_reports(
        answer, answer.schema, lambda: answer.reports, log_pull
    )


def _query_stream(query: FederatedQuery, reader, requester: str, started: float):
    def log_query(rows: int, outcome: str) -> None:
        query.close()
        reached = sum(report.reached for report in query.reports)
        log.info(
            "query %s from %s: %d rows in %.0f ms, %s reached, %d missed, %s",
            query.query_id,
            requester,
            rows,
            (time.monotonic() - started) * 1000,
            count_nodes(reached),
            len(query.reports) - reached,
            outcome,
        )

    return _stream_with_reports(
        reader, reader.schema, lambda: query.reports, log_query
    )


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    arrays = [pa.array([], type=schema_field.type) for schema_field in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _decode_ticket(ticket: bytes) -> dict:
    try:
        data = json.loads(ticket)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise flight.FlightServerError(f"invalid ticket: not JSON ({error})") from error
    if not isinstance(data, dict):
        raise flight.FlightServerError("invalid ticket: expected a JSON object")
    return data
