"""Run an agent: the Flight service over a data directory, and optionally the
collector that fills it, in one process until it is stopped.

An agent listens on loopback unless --listen names another address. On any
other address it needs a token, because its port then faces a network.
"""

import logging
import threading
from dataclasses import dataclass

import pyarrow.flight as flight

from fastsock.collector import Collector
from fastsock.endpoints import Endpoint
from fastsock.federation import NodeSettings
from fastsock.federation_errors import EndpointError
from fastsock.flight_server import AgentServer

log = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class ServeConfig:
    """The listen endpoint, token, TLS pair and node settings of an agent."""

    listen: Endpoint
    node: NodeSettings
    token: "str | None" = None
    certificate: "flight.CertKeyPair | None" = None


@dataclass(frozen=True)
class CollectConfig:
    """The collector an agent runs, and its intervals in seconds."""

    collector: Collector
    interval: float
    flush_interval: float


def check_listen(listen: Endpoint, token: "str | None", tls: bool) -> None:
    """Raise EndpointError when ``listen`` is not loopback and no token is set.

    Logs a warning when a token would cross a network without TLS.
    """
    if listen.is_loopback():
        return
    if token is None:
        raise EndpointError(
            f"cannot listen on {listen} without a token, because that address is "
            f"not loopback; pass --token-file FILE or set $FASTSOCK_TOKEN, or "
            f"listen on 127.0.0.1"
        )
    if not tls:
        log.warning(
            "listening on %s without TLS: tokens and rows cross the network in "
            "clear text; pass --tls-cert and --tls-key",
            listen,
        )


def start_server(config: ServeConfig) -> AgentServer:
    """Check the listen address and start serving; return the running server."""
    check_listen(config.listen, config.token, config.certificate is not None)
    server = AgentServer(config.node, config.listen, config.token, config.certificate)

    identity = config.node.identity
    log.info(
        "agent %s (node id %s) serving %s on %s",
        identity.name,
        identity.node_id,
        config.node.data_dir,
        server.endpoint.location(),
    )
    return server


def run_agent(
    config: ServeConfig,
    stop: threading.Event,
    collect: "CollectConfig | None" = None,
    on_ready=None,
) -> None:
    """Serve, and collect when ``collect`` is given, until ``stop`` is set.

    ``on_ready`` is called with the running server, for example to print its
    port. On stop the server stops taking calls first, then the collector
    flushes what it holds. When the collector fails, the agent stops and the
    collector's exception is raised.
    """
    server = start_server(config)
    failures: list[BaseException] = []
    collector_thread = None
    try:
        if collect is not None:
            collector_thread = _start_collector(collect, stop, failures)
        if on_ready is not None:
            on_ready(server)
        stop.wait()
    finally:
        log.info("agent %s stopping", config.node.identity.name)
        stop.set()
        server.shutdown()
        if collector_thread is not None:
            collector_thread.join()
        log.info("agent %s stopped", config.node.identity.name)

    if failures:
        raise failures[0]


def _start_collector(
    collect: CollectConfig, stop: threading.Event, failures: list
) -> threading.Thread:
    def run() -> None:
        log.info(
            "collector started: a snapshot every %.3f s, a flush every %.1f s",
            collect.interval,
            collect.flush_interval,
        )
        try:
            status = collect.collector.run(
                collect.interval, collect.flush_interval, stop
            )
            log.info("collector stopped: %s", status.line())
        except Exception as error:
            # The agent must not serve stale data as if it were collecting.
            log.exception("collector failed, stopping the agent: %s", error)
            failures.append(error)
            stop.set()
        finally:
            collect.collector.close()

    thread = threading.Thread(target=run, name="fastsock-collector")
    thread.start()
    return thread
