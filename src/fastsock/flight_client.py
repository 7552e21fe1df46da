"""Calls to agents over Arrow Flight: pulls between nodes, queries and describe.

Every call carries the token and a timeout. A Flight error becomes an
AgentError whose ``status`` names how the call failed (unreachable, timeout,
rejected or error) and whose message is the agent's own text.
"""

import json
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from fastsock.auth import Credentials
from fastsock.endpoints import Endpoint
from fastsock.errors import QueryError
from fastsock.federation_errors import AgentError, FederationError
from fastsock.reports import ERROR, REJECTED, TIMEOUT, UNREACHABLE

# gRPC channel options. Agents talk to each other directly: an HTTP proxy from
# the environment would send node-to-node traffic elsewhere.
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]

# Key of the JSON object in the last message's app_metadata that carries the
# node reports of a stream.
REPORTS_KEY = "reports"

# extra_info of a FlightServerError, so that clients can tell a bad query or a
# --strict failure from a failing agent.
QUERY_ERROR = b"query-error"
STRICT_ERROR = b"strict-error"

# Flight puts its own text around the server's message: a prefix ending in
# "with message: " for errors raised by gRPC itself, and ". Detail: ..." or
# ". gRPC client debug context: ..." after it. This keeps the message alone.
_MESSAGE_PREFIX = "with message: "
_MESSAGE_ENDS = (". Detail: ", ". gRPC client debug context: ")


class FlightAgentError(AgentError):
    """An agent call failed; ``status`` is one of the report statuses."""

    def __init__(self, endpoint: Endpoint, status: str, message: str) -> None:
        super().__init__(f"agent {endpoint} {_status_text(status)}: {message}")
        self.endpoint = endpoint
        self.status = status
        self.detail = message


def connect(endpoint: Endpoint, credentials: Credentials) -> flight.FlightClient:
    """Open a Flight client to ``endpoint``, with TLS when its scheme or a CA requires it."""
    tls = endpoint.tls or credentials.tls_root_certs is not None
    target = Endpoint(endpoint.host, endpoint.port, tls)
    kwargs = {"generic_options": GRPC_OPTIONS}
    if tls and credentials.tls_root_certs is not None:
        kwargs["tls_root_certs"] = credentials.tls_root_certs
    return flight.FlightClient(target.location(), **kwargs)


def call_options(
    credentials: Credentials, timeout: "float | None"
) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(timeout=timeout, headers=credentials.headers())


def stream(
    endpoint: Endpoint,
    ticket: bytes,
    credentials: Credentials,
    timeout: "float | None",
    cancel: "threading.Event | None" = None,
) -> Iterator[tuple["pa.RecordBatch | None", "list[dict] | None"]]:
    """Yield (batch, reports) for each message of a do_get stream.

    ``reports`` is None except in the last message. The stream is cancelled
    when ``cancel`` is set. Raises FlightAgentError when the call fails.
    """
    client = connect(endpoint, credentials)
    try:
        reader = _call(
            endpoint,
            lambda: client.do_get(
                flight.Ticket(ticket), call_options(credentials, timeout)
            ),
        )
        while True:
            if cancel is not None and cancel.is_set():
                reader.cancel()
                return
            try:
                chunk = _call(endpoint, reader.read_chunk)
            except StopIteration:
                return
            yield chunk.data, _reports(chunk.app_metadata)
    finally:
        client.close()


def describe(
    endpoint: Endpoint, credentials: Credentials, timeout: float = 5.0
) -> dict:
    """Return an agent's node id, name and stored tables."""
    client = connect(endpoint, credentials)
    try:
        results = _call(
            endpoint,
            lambda: list(
                client.do_action(
                    flight.Action("describe", b""), call_options(credentials, timeout)
                )
            ),
        )
    finally:
        client.close()
    return json.loads(results[0].body.to_pybytes())


def _call(endpoint: Endpoint, function):
    try:
        return function()
    except flight.FlightUnauthenticatedError as error:
        raise FlightAgentError(endpoint, REJECTED, _message(error)) from error
    except flight.FlightUnauthorizedError as error:
        raise FlightAgentError(endpoint, REJECTED, _message(error)) from error
    except flight.FlightTimedOutError as error:
        raise FlightAgentError(endpoint, TIMEOUT, _message(error)) from error
    except flight.FlightUnavailableError as error:
        raise FlightAgentError(endpoint, UNREACHABLE, _message(error)) from error
    except flight.FlightCancelledError as error:
        raise FlightAgentError(endpoint, TIMEOUT, _message(error)) from error
    except flight.FlightServerError as error:
        if error.extra_info == QUERY_ERROR:
            raise QueryError(_message(error)) from error
        if error.extra_info == STRICT_ERROR:
            raise FederationError(_message(error)) from error
        raise FlightAgentError(endpoint, ERROR, _message(error)) from error
    except (flight.FlightError, pa.ArrowException) as error:
        raise FlightAgentError(endpoint, ERROR, _message(error)) from error


def _message(error: Exception) -> str:
    text = str(error)
    if text.startswith("Flight returned") and _MESSAGE_PREFIX in text:
        text = text.split(_MESSAGE_PREFIX, 1)[1]
    for end in _MESSAGE_ENDS:
        text = text.split(end, 1)[0]
    return text.strip()


def _reports(metadata: "pa.Buffer | None") -> "list[dict] | None":
    if metadata is None or metadata.size == 0:
        return None
    return json.loads(metadata.to_pybytes())[REPORTS_KEY]


def reports_metadata(reports: list[dict]) -> bytes:
    """Return the app_metadata of a stream's last message."""
    return json.dumps({REPORTS_KEY: reports}).encode()


def _status_text(status: str) -> str:
    return {
        REJECTED: "rejected the request",
        TIMEOUT: "timed out",
        UNREACHABLE: "is unreachable",
    }.get(status, "failed")
