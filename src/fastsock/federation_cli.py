"""Command line options of `fastsock serve`, `fastsock agent` and federated
queries, defined once, and the steps that turn them into library objects."""

import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fastsock.endpoints import DEFAULT_AGENT_PORT


class Direction(str, Enum):
    downstream = "downstream"
    upstream = "upstream"
    both = "both"


FederatedOption = Annotated[
    bool,
    typer.Option(
        "--federated",
        help="Run the SQL over the rows of this node and of every node its flows "
        "reach, recursively, through their agents. Without --agent the walk "
        "starts from the local data directory; no local agent is needed.",
    ),
]
AgentOption = Annotated[
    Optional[str],
    typer.Option(
        "--agent",
        help="Start the walk at this agent (HOST, HOST:PORT or grpc+tls://HOST:PORT; "
        f"port {DEFAULT_AGENT_PORT} by default), which runs the SQL and sends the "
        "result.",
        show_default=False,
    ),
]
DirectionOption = Annotated[
    Direction,
    typer.Option(
        "--direction",
        help="Which peers to follow: downstream (nodes this node connects to), "
        "upstream (nodes that connect to it) or both.",
    ),
]
MaxDepthOption = Annotated[
    int,
    typer.Option(
        "--max-depth",
        min=0,
        help="Hops from the entry node to walk at most; 0 reads only the entry.",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=0.001,
        help="Seconds the walk may take; nodes that have not sent all their rows by "
        "then are reported missed.",
    ),
]
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Fail when a node is unreachable, times out, rejects the token or "
        "sends only part of its rows. Default: answer from the nodes reached.",
    ),
]
PeersOption = Annotated[
    Optional[Path],
    typer.Option(
        "--peers",
        help="JSON or TOML file mapping peer addresses to agent endpoints, for "
        'peers behind NAT or on other ports: {"10.0.0.5": "gw.example:7500"}.',
        show_default=False,
    ),
]
TokenFileOption = Annotated[
    Optional[Path],
    typer.Option(
        "--token-file",
        help="File with the fleet's bearer token (16 characters or more). "
        "Default: $FASTSOCK_TOKEN.",
        show_default=False,
    ),
]
TlsCaOption = Annotated[
    Optional[Path],
    typer.Option(
        "--tls-ca",
        help="PEM file of the CA certificates that agents' TLS certificates must "
        "chain to; with it, every agent is reached over TLS.",
        show_default=False,
    ),
]
ListenOption = Annotated[
    str,
    typer.Option(
        "--listen",
        help="ADDR:PORT to serve on; port 0 picks a free port. An address other than "
        "loopback needs a token.",
    ),
]
TlsCertOption = Annotated[
    Optional[Path],
    typer.Option(
        "--tls-cert", help="PEM certificate to serve TLS with.", show_default=False
    ),
]
TlsKeyOption = Annotated[
    Optional[Path],
    typer.Option(
        "--tls-key", help="PEM private key of --tls-cert.", show_default=False
    ),
]
MaxRowsOption = Annotated[
    int,
    typer.Option(
        "--max-rows", min=1, help="Rows this node sends per table and query at most."
    ),
]
MaxQuerySecondsOption = Annotated[
    float,
    typer.Option(
        "--max-query-seconds",
        min=0.001,
        help="Seconds one request may run on this node at most, pulls and SQL alike.",
    ),
]


def node_settings(
    data_dir: Path,
    node_name: "str | None",
    token_file: "Path | None",
    tls_ca: "Path | None",
    peers_file: "Path | None",
    max_rows: "int | None" = None,
    max_query_seconds: "float | None" = None,
    agent_port: int = DEFAULT_AGENT_PORT,
):
    """Return the NodeSettings of this node from command line options.

    Raises FastsockError subclasses naming the file or value that is invalid.
    """
    from fastsock.endpoints import load_peers_map
    from fastsock.federation import NodeSettings
    from fastsock.limits import DEFAULT_MAX_QUERY_SECONDS, DEFAULT_MAX_ROWS
    from fastsock.node import node_identity

    credentials = client_credentials(token_file, tls_ca)
    return NodeSettings(
        identity=node_identity(data_dir, node_name),
        data_dir=data_dir,
        credentials=credentials,
        peers=load_peers_map(peers_file) if peers_file is not None else {},
        agent_ports=frozenset({DEFAULT_AGENT_PORT, agent_port}),
        max_rows=DEFAULT_MAX_ROWS if max_rows is None else max_rows,
        max_query_seconds=(
            DEFAULT_MAX_QUERY_SECONDS
            if max_query_seconds is None
            else max_query_seconds
        ),
    )


def run_federated(
    sql: str,
    data_dir: Path,
    agent: "str | None",
    direction: Direction,
    max_depth: int,
    timeout: float,
    strict: bool,
    peers_file: "Path | None",
    token_file: "Path | None",
    tls_ca: "Path | None",
):
    """Run a federated query from the CLI; return (result table, node reports)."""
    from fastsock.endpoints import load_peers_map, parse_endpoint
    from fastsock.federated_query import (
        FederationOptions,
        query_agent,
        run_federated_query,
    )

    options = FederationOptions(
        direction=direction.value,
        max_depth=max_depth,
        timeout=timeout,
        strict=strict,
        peers=load_peers_map(peers_file) if peers_file is not None else {},
    )
    if agent is None:
        name = stored_node_name(data_dir)
        node = node_settings(data_dir, name, token_file, tls_ca, None)
        return run_federated_query(node, sql, options)

    credentials = client_credentials(token_file, tls_ca)
    endpoint = parse_endpoint(agent, tls=credentials.tls_root_certs is not None)
    return query_agent(endpoint, sql, options, credentials)


def client_credentials(token_file: "Path | None", tls_ca: "Path | None"):
    """Return the Credentials that the token and CA options name."""
    from fastsock.auth import Credentials, load_token, read_pem

    return Credentials(load_token(token_file), read_pem(tls_ca, "CA file"))


def stored_node_name(data_dir: Path) -> "str | None":
    """Return the host name most of the stored connections carry, or None."""
    from fastsock.errors import NoDataError
    from fastsock.query import run_query

    # run_query, unlike a bare connection, skips damaged Parquet files.
    sql = "SELECT host FROM connections GROUP BY host ORDER BY count(*) DESC LIMIT 1"
    try:
        hosts = run_query(data_dir, sql, sandboxed=True).column("host").to_pylist()
    except NoDataError:
        return None
    return hosts[0] if hosts else None


def serve_config(
    listen: str,
    data_dir: Path,
    node_name: "str | None",
    token_file: "Path | None",
    tls_cert: "Path | None",
    tls_key: "Path | None",
    tls_ca: "Path | None",
    peers_file: "Path | None",
    max_rows: "int | None",
    max_query_seconds: "float | None",
):
    """Return the ServeConfig of `fastsock serve` or `fastsock agent`."""
    from fastsock.agent import ServeConfig
    from fastsock.auth import load_certificate_pair
    from fastsock.endpoints import parse_endpoint

    certificate = load_certificate_pair(tls_cert, tls_key)
    endpoint = parse_endpoint(listen, tls=certificate is not None)
    node = node_settings(
        data_dir,
        node_name,
        token_file,
        tls_ca,
        peers_file,
        max_rows,
        max_query_seconds,
        agent_port=endpoint.port,
    )
    return ServeConfig(endpoint, node, node.credentials.token, certificate)


def ready_printer(config):
    """Return an on_ready callback that prints where the agent listens."""

    def show(server) -> None:
        identity = config.node.identity
        typer.echo(
            f"agent {identity.name} (node id {identity.node_id}) listening on "
            f"{server.endpoint.location()}; Ctrl-C stops",
            err=True,
        )

    return show


def stop_on_signals() -> threading.Event:
    """Return an event that SIGINT and SIGTERM set."""
    import signal

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop
