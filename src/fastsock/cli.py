"""The `fastsock` command line: a thin layer over the library modules."""

import logging
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from fastsock.cli_options import (
    AllNetnsOption,
    BucketOption,
    CloseEventsOption,
    CompactOption,
    DataDirOption,
    DepsDirection,
    DepsFormat,
    FlushIntervalOption,
    IntervalOption,
    NodeNameOption,
    OutputFormat,
    ProcRootOption,
    SocketSource,
    SourceOption,
)
from fastsock.endpoints import DEFAULT_LISTEN
from fastsock.errors import FastsockError, NoDataError, QueryError
from fastsock.federation_cli import (
    AgentOption,
    Direction,
    DirectionOption,
    FederatedOption,
    ListenOption,
    MaxDepthOption,
    MaxQuerySecondsOption,
    MaxRowsOption,
    PeersOption,
    StrictOption,
    TimeoutOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenFileOption,
)
from fastsock.limits import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_QUERY_SECONDS,
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT,
)

if TYPE_CHECKING:
    from fastsock.collector import Collector

app = typer.Typer(
    help="Record which processes talk to which over TCP and UDP, and query the history.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help wraps each option's text in full; rich's tables cut long
    # defaults off at 80 columns.
    rich_markup_mode=None,
)

log = logging.getLogger("fastsock")

# Smallest --interval and --flush-interval, in seconds.
MIN_INTERVAL = 0.001
MIN_FLUSH_INTERVAL = 0.1

def _data_dir(data_dir: Optional[Path]) -> Path:
    from fastsock.store import default_data_dir

    return data_dir if data_dir is not None else default_data_dir()


def _fail(message: str, code: int = 1) -> "typer.Exit":
    typer.echo(f"fastsock: error: {message}", err=True)
    return typer.Exit(code)


@app.callback()
def main_options(
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            envvar="FASTSOCK_LOG_LEVEL",
            help="Logging level: debug, info, warning or error.",
        ),
    ] = "warning",
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise _fail(
            f"invalid --log-level {log_level!r}; use debug, info, warning or error", 2
        )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def collect(
    interval: IntervalOption = None,
    duration: Annotated[
        Optional[float],
        typer.Option(help="Stop after this many seconds. Default: run until Ctrl-C."),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Take one snapshot, store it and exit.")
    ] = False,
    flush_interval: FlushIntervalOption = None,
    data_dir: DataDirOption = None,
    proc_root: ProcRootOption = None,
    node_name: NodeNameOption = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Print no status line; errors and the log still print."
        ),
    ] = False,
    source: SourceOption = SocketSource.proc,
    close_events: CloseEventsOption = True,
    all_netns: AllNetnsOption = False,
    bucket: BucketOption = 60,
    auto_compact: CompactOption = True,
) -> None:
    """Record this machine's sockets and their processes to Parquet.

    Example: fastsock collect --interval 0.1 --duration 10 --data-dir ./data
    """
    settings = _collect_settings(
        interval, flush_interval, duration, data_dir, proc_root, node_name, source,
        close_events and not once, all_netns, bucket, auto_compact=auto_compact,
    )
    collector, directory = settings.collector, settings.directory
    interval, flush_interval = settings.interval, settings.flush_interval
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())

    show = None if quiet else _status_printer()
    if not quiet:
        typer.echo(f"collecting to {directory} (Ctrl-C stops and flushes)", err=True)
    try:
        if once:
            collector.sample()
            collector.flush()
            status = collector.status
        else:
            status = collector.run(interval, flush_interval, stop, duration, show)
    except (FastsockError, OSError) as error:
        # Store what was collected before the failure, then report it.
        collector.flush()
        collector.close()
        raise _fail(f"collection stopped: {error}")
    collector.close()
    if show is not None and sys.stderr.isatty():
        typer.echo("", err=True)
    elif not quiet:
        typer.echo(status.line(), err=True)
    if status.failed_flushes and not collector.flush(final=True):
        raise _fail(f"could not store every record in {directory}; see the log above")


@dataclass
class CollectSettings:
    """A collector ready to run, with the resolved options of collect and agent."""

    collector: "Collector"
    directory: Path
    interval: float
    flush_interval: float


def _collect_settings(
    interval, flush_interval, duration, data_dir, proc_root, node_name, source,
    close_events, all_netns, bucket, auto_compact=True,
) -> CollectSettings:
    """Check the collection options and build the collector, or exit with the error."""
    from fastsock.collector import DEFAULT_FLUSH_INTERVAL, DEFAULT_INTERVAL, Collector
    from fastsock.flows import validate_bucket_seconds
    from fastsock.memory import use_returning_allocator
    from fastsock.snapshot import Snapshotter
    from fastsock.store import ParquetStore

    use_returning_allocator()

    interval = DEFAULT_INTERVAL if interval is None else interval
    flush_interval = DEFAULT_FLUSH_INTERVAL if flush_interval is None else flush_interval
    _check_seconds("--interval", interval, MIN_INTERVAL)
    _check_seconds("--flush-interval", flush_interval, MIN_FLUSH_INTERVAL)
    if duration is not None:
        _check_seconds("--duration", duration)
    if data_dir is not None and not str(data_dir).strip():
        raise _fail("--data-dir is empty; pass a directory path", 2)
    directory = _data_dir(data_dir)
    try:
        validate_bucket_seconds(bucket)
    except ValueError as error:
        raise _fail(str(error), 2)

    try:
        snapshotter = Snapshotter(proc_root, host=node_name, source=source.value)
        if all_netns:
            snapshotter.read_all_netns()
        store = ParquetStore(directory)
        store.check_writable()
        store.lock_for_host(snapshotter.host)
        removed = store.remove_stale_temp_files()
    except (FastsockError, OSError) as error:
        raise _fail(str(error))
    except ValueError as error:
        raise _fail(str(error), 2)
    if removed:
        log.warning("removed %d temporary files left by an interrupted writer", removed)

    closes = _close_recorder(
        close_events and _reads_own_namespace(snapshotter), source, snapshotter
    )
    collector = Collector(
        snapshotter, store, closes, bucket_seconds=bucket, auto_compact=auto_compact
    )
    return CollectSettings(collector, directory, interval, flush_interval)


def _warn_if_after_this_hour(before: "str | None", cutoff) -> None:
    """Say so when --before names a time that compaction caps to this hour's start."""
    if cutoff is None:
        return
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    aware = cutoff if cutoff.tzinfo is not None else cutoff.replace(tzinfo=timezone.utc)
    if aware > hour:
        typer.echo(
            f"--before {before} is after the start of the current hour; "
            f"compacting the hours before {hour:%Y-%m-%d %H:%M} UTC, whose files "
            f"no collector writes any more",
            err=True,
        )


def _check_seconds(option: str, seconds: float, minimum: float = 0.0) -> None:
    if not math.isfinite(seconds) or seconds <= 0 or seconds < minimum:
        least = f"at least {minimum:g}" if minimum else "a positive number of"
        raise _fail(f"invalid {option} {seconds:g}: give {least} seconds", 2)


def _reads_own_namespace(snapshotter) -> bool:
    """Return whether the snapshots read this process's own network namespace.

    Close events come from the namespace fastsock runs in, so they would not
    match sockets read from another proc root (a fixture tree, for one).
    """
    try:
        own = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False
    if snapshotter.netns != own:
        log.info("close events are off: the proc root shows another namespace")
        return False
    return True


def _close_recorder(enabled: bool, source: "SocketSource", snapshotter):
    """Return the close-event recorders of the snapshots' namespaces, or None.

    This subscribes in the namespace fastsock runs in. With --all-netns, the
    collector subscribes in each other namespace when a snapshot first reads
    it. None when disabled or when this namespace's subscription fails.
    """
    if not enabled:
        return None
    from fastsock.closelisten import open_close_listener
    from fastsock.closes import CloseRecorder, NamespaceCloses

    netns = snapshotter.netns
    listener = open_close_listener(netns)
    if listener is None:
        return None
    own = CloseRecorder(
        listener, match_by_cookie=source == SocketSource.netlink, netns=netns
    )
    return NamespaceCloses(own, snapshotter.proc_root)


def _status_printer():
    tty = sys.stderr.isatty()

    def show(status) -> None:
        if tty:
            sys.stderr.write("\r\033[K" + status.line())
            sys.stderr.flush()

    return show


@app.command()
def query(
    sql: Annotated[
        str,
        typer.Argument(
            help="SQL over the views connections, listeners, processes, flows and "
            "collector_stats (newest record per key), their <table>_records views "
            "(every stored record) and, with --federated, federation_nodes."
        ),
    ],
    data_dir: DataDirOption = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="Output format.")
    ] = OutputFormat.table,
    output: Annotated[
        Optional[Path],
        typer.Option(help="Write the result to this file instead of standard output."),
    ] = None,
    federated: FederatedOption = False,
    agent: AgentOption = None,
    direction: DirectionOption = Direction.downstream,
    max_depth: MaxDepthOption = DEFAULT_MAX_DEPTH,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    strict: StrictOption = False,
    peers: PeersOption = None,
    token_file: TokenFileOption = None,
    tls_ca: TlsCaOption = None,
) -> None:
    """Run SQL with DuckDB over the stored history.

    With --federated the SQL also reads the rows of the peers' agents, each row
    with the node and node_id it came from, and a federation_nodes table of the
    nodes reached and missed (also summed up on standard error).

    Example: fastsock query "SELECT comm, remote_addr, remote_port, count(*) AS n
    FROM connections GROUP BY ALL ORDER BY n DESC"

    Example: fastsock query --federated --agent 127.0.0.1:7433 --timeout 10
    "SELECT node, count(*) FROM connections GROUP BY node"
    """
    from fastsock.output import write_result
    from fastsock.query import run_query

    directory = _data_dir(data_dir)
    federated_only = {
        "--agent": agent is not None,
        "--strict": strict,
        "--peers": peers is not None,
        "--direction": direction != Direction.downstream,
        "--max-depth": max_depth != DEFAULT_MAX_DEPTH,
        "--timeout": timeout != DEFAULT_TIMEOUT,
        "--token-file": token_file is not None,
        "--tls-ca": tls_ca is not None,
    }
    given = [option for option, is_set in federated_only.items() if is_set]
    if not federated and given:
        raise _fail(f"{', '.join(given)} only apply with --federated", 2)
    try:
        if federated:
            result = _federated_result(
                sql, directory, agent, direction, max_depth, timeout, strict, peers,
                token_file, tls_ca,
            )
        else:
            result = run_query(directory, sql)
    except NoDataError as error:
        raise _fail(str(error))
    except QueryError as error:
        raise _fail(str(error), 2)

    try:
        write_result(result, output_format.value, output, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (head, less) closed the pipe: stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as error:
        if output is None:
            raise _fail(str(error), 2)
        raise _fail(_output_error_text(output, error), 2)
    except ValueError as error:
        raise _fail(str(error), 2)


def _output_error_text(output: Path, error: OSError) -> str:
    """Return the message for an --output file that could not be written."""
    directory = output.parent
    if not directory.exists():
        reason = f"its directory {directory} does not exist"
        fix = "create it or choose another --output"
    elif not directory.is_dir():
        reason = f"{directory} is not a directory"
        fix = "choose another --output"
    elif output.is_dir():
        reason = "it is a directory"
        fix = "give a file path to --output"
    else:
        reason = error.strerror or str(error)
        fix = "choose another --output"
    return f"cannot write {output}: {reason}; {fix}"


@app.command()
def status(data_dir: DataDirOption = None) -> None:
    """Show the collector's latest figures and its estimated miss rate.

    For each host and network namespace it shows the last flush period's
    samples, sample durations in milliseconds, rows parsed and skipped,
    attribution misses and close events received and lost. It also shows the
    TCP opens that the kernel counted (ActiveOpens + PassiveOpens of net/snmp)
    against those recorded. The miss rate is 1 - recorded / counted, for the
    last period and over all flushes.

    Example: fastsock status --data-dir ./data
    """
    from fastsock.stats import format_status, status as read_status

    directory = _data_dir(data_dir)
    try:
        table = read_status(directory)
    except NoDataError as error:
        raise _fail(str(error))
    except QueryError as error:
        raise _fail(str(error), 2)
    if table.num_rows == 0:
        raise _fail(
            f"no collector_stats in {directory} yet; they are written at each flush "
            f"of `fastsock collect`"
        )
    typer.echo(format_status(table))


@app.command(short_help="Merge each past hour's Parquet files into one per table.")
def compact(
    data_dir: DataDirOption = None,
    table: Annotated[
        Optional[str],
        typer.Option(
            help="Compact only this table: connections, listeners, processes, "
            "flows or collector_stats. Default: every table.",
            show_default=False,
        ),
    ] = None,
    before: Annotated[
        Optional[str],
        typer.Option(
            help="Compact only the hours that end at or before this time: an ISO "
            "timestamp (UTC unless it has an offset) or a time back from now: "
            "45s, 30m, 1h, 2d. Default and latest allowed: the start of the "
            "current UTC hour.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Merge the Parquet files of each past hour into one file per table and hour.

    Keeps the newest record of each key, the one that the views of `fastsock
    query` select, so queries return the same rows from fewer files. Files of
    the current hour and files that cannot be read are left as they are. Prints
    the partitions merged and their files and rows before and after.

    Example: fastsock compact --data-dir ./data --before 1h
    """
    from fastsock.compaction import compact as compact_history
    from fastsock.timespec import parse_time

    directory = _data_dir(data_dir)
    try:
        cutoff = parse_time(before) if before is not None else None
        _warn_if_after_this_hour(before, cutoff)
        report = compact_history(directory, table, cutoff)
    except NoDataError as error:
        raise _fail(str(error))
    except ValueError as error:
        raise _fail(str(error), 2)
    except (FastsockError, OSError) as error:
        raise _fail(str(error))

    typer.echo(f"partitions compacted: {report.partitions}")
    typer.echo(f"files: {report.files_before} -> {report.files_after}")
    typer.echo(f"rows: {report.rows_before} -> {report.rows_after}")
    for path in report.skipped_files:
        typer.echo(f"skipped, left in place (see the log): {path}", err=True)
    for path in report.unremoved_files:
        typer.echo(f"could not remove merged file: {path}", err=True)


@app.command(short_help="Show the services a process or address uses, and its users.")
def deps(
    target: Annotated[
        Optional[str],
        typer.Argument(
            help="An address (127.0.0.1), address:port ([::1]:8080 for IPv6), a "
            "process name or a pid. Default: every service in the flows.",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        Optional[str],
        typer.Option(
            help="Start of the window: an ISO timestamp (UTC unless it has an "
            "offset) or a time back from now: 45s, 30m, 1h, 2d. Default: the first "
            "flow.",
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        Optional[str],
        typer.Option(
            help="End of the window, in the same forms as --since. Default: the "
            "last flow.",
            show_default=False,
        ),
    ] = None,
    depth: Annotated[
        int, typer.Option(min=1, help="Edges to follow from the target, in hops.")
    ] = 2,
    direction: Annotated[
        DepsDirection,
        typer.Option(
            help="in: clients that connected to the target; out: servers the "
            "target connected to; both."
        ),
    ] = DepsDirection.both,
    output_format: Annotated[
        DepsFormat, typer.Option("--format", help="Output format.")
    ] = DepsFormat.tree,
    data_dir: DataDirOption = None,
    federated: Annotated[
        bool,
        typer.Option(
            "--federated",
            help="Read the flows and listeners of this node and of every node its "
            "flows reach, recursively, through their agents. Without --agent the "
            "walk starts from the local data directory; no local agent is needed.",
        ),
    ] = False,
    agent: AgentOption = None,
    max_depth: MaxDepthOption = DEFAULT_MAX_DEPTH,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
    strict: StrictOption = False,
    peers: PeersOption = None,
    token_file: TokenFileOption = None,
    tls_ca: TlsCaOption = None,
) -> None:
    """Show which services a process or address depends on, and which depend on it.

    Reads the flows table. Inbound edges (<--) are clients that connected to the
    node; outbound edges (-->) are servers that it connected to, followed to the
    host whose listener serves the address when that host's data is in the same
    data directory. Counts are connections opened in the window.

    Example: fastsock deps nginx --since 1h --depth 2 --data-dir ./data
    """
    from fastsock.deps import deps as build_deps, parse_time
    from fastsock.depsformat import render

    directory = _data_dir(data_dir)
    try:
        window_start = parse_time(since) if since is not None else None
        window_end = parse_time(until) if until is not None else None
        if federated:
            walk = {"in": Direction.upstream, "out": Direction.downstream}.get(
                direction.value, Direction.both
            )
            tree = _federated_deps(
                target, window_start, window_end, depth, direction.value,
                (directory, agent, walk, max_depth, timeout, strict, peers,
                 token_file, tls_ca),
            )
        else:
            tree = build_deps(
                directory, target, window_start, window_end, depth, direction.value
            )
    except NoDataError as error:
        raise _fail(str(error))
    except (FastsockError, ValueError) as error:
        raise _fail(str(error), 2)
    typer.echo(render(tree, output_format.value), nl=False)


def _federated_deps(target, since, until, depth, direction, federation):
    """Build the dependency tree from the flows and listeners of the whole fleet.

    The walk follows outbound peers for --direction out, inbound ones for in,
    and both for both. Each table is one federated query, so the node summary
    is printed twice.
    """
    from fastsock.depgraph import build_graph
    from fastsock.deps import check_window, dependency_tree, window_condition

    check_window(since, until)
    where = window_condition(since, until)
    flows = _federated_result(f"SELECT * FROM flows {where}", *federation)
    listeners = _federated_result(
        "SELECT host, netns, protocol, local_addr, local_port, pid, comm, exe, "
        f"cmdline FROM listeners {where}",
        *federation,
    )
    if flows.num_rows == 0:
        raise NoDataError("no flows in the window on any node reached")
    return dependency_tree(
        build_graph(flows, listeners), target, depth, direction, since, until
    )


def _federated_result(
    sql, directory, agent, direction, max_depth, timeout, strict, peers, token_file,
    tls_ca,
):
    """Run a federated query, print its node summary on stderr, return the rows."""
    from fastsock.federation_cli import run_federated
    from fastsock.federation_errors import FederationError
    from fastsock.reports import summary_lines

    try:
        result, reports = run_federated(
            sql, directory, agent, direction, max_depth, timeout, strict, peers,
            token_file, tls_ca,
        )
    except FederationError as error:
        raise _fail(str(error))
    except QueryError:
        raise
    except FastsockError as error:
        raise _fail(str(error))

    for line in summary_lines(reports):
        typer.echo(line, err=True)
    return result


@app.command(short_help="Serve the stored tables to federated queries (Flight).")
def serve(
    listen: ListenOption = DEFAULT_LISTEN,
    data_dir: DataDirOption = None,
    node_name: Annotated[
        Optional[str],
        typer.Option(help="Name shown in the node column. Default: the hostname."),
    ] = None,
    token_file: TokenFileOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
    peers: PeersOption = None,
    max_rows: MaxRowsOption = DEFAULT_MAX_ROWS,
    max_query_seconds: MaxQuerySecondsOption = DEFAULT_MAX_QUERY_SECONDS,
) -> None:
    """Serve this node's stored tables to federated queries over Arrow Flight.

    Peers pull the rows of each table they need, filtered as their SQL allows,
    and this node pulls in turn from the peers its flows show (see
    docs/federation.md). SQL from clients runs read-only in a sandboxed DuckDB.
    Listening on an address other than loopback needs a token.

    Example: fastsock serve --listen 127.0.0.1:7433 --data-dir ./data
    """
    _run_agent(
        listen, data_dir, node_name, token_file, tls_cert, tls_key, tls_ca, peers,
        max_rows, max_query_seconds, collect=None,
    )


@app.command()
def agent(
    listen: ListenOption = DEFAULT_LISTEN,
    data_dir: DataDirOption = None,
    proc_root: ProcRootOption = None,
    node_name: NodeNameOption = None,
    interval: IntervalOption = None,
    flush_interval: FlushIntervalOption = None,
    source: SourceOption = SocketSource.proc,
    close_events: CloseEventsOption = True,
    all_netns: AllNetnsOption = False,
    bucket: BucketOption = 60,
    auto_compact: CompactOption = True,
    token_file: TokenFileOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
    peers: PeersOption = None,
    max_rows: MaxRowsOption = DEFAULT_MAX_ROWS,
    max_query_seconds: MaxQuerySecondsOption = DEFAULT_MAX_QUERY_SECONDS,
) -> None:
    """Collect this machine's sockets and serve them, in one process.

    Runs `fastsock collect` in a thread, with the same collection options, and
    `fastsock serve` on --listen, until SIGINT or SIGTERM; then it stops
    serving and flushes what the collector holds.

    Example: fastsock agent --listen 127.0.0.1:7433 --data-dir ./data --interval 0.2
    """
    from fastsock.agent import CollectConfig

    settings = _collect_settings(
        interval, flush_interval, None, data_dir, proc_root, node_name, source,
        close_events, all_netns, bucket, auto_compact=auto_compact,
    )
    collect = CollectConfig(
        settings.collector, settings.interval, settings.flush_interval
    )
    _run_agent(
        listen, settings.directory, settings.collector.snapshotter.host, token_file,
        tls_cert, tls_key, tls_ca, peers, max_rows, max_query_seconds,
        collect=collect,
    )


def _run_agent(
    listen, data_dir, node_name, token_file, tls_cert, tls_key, tls_ca, peers,
    max_rows, max_query_seconds, collect,
) -> None:
    from fastsock.agent import run_agent
    from fastsock.federation_cli import ready_printer, serve_config, stop_on_signals

    directory = _data_dir(data_dir)
    try:
        config = serve_config(
            listen, directory, node_name, token_file, tls_cert, tls_key, tls_ca, peers,
            max_rows, max_query_seconds,
        )
        stop = stop_on_signals()
        run_agent(config, stop, collect, on_ready=ready_printer(config))
    except (FastsockError, OSError) as error:
        raise _fail(str(error))


def main() -> None:
    """Run the command line; errors of fastsock print one line, not a traceback."""
    try:
        app()
    except FastsockError as error:
        typer.echo(f"fastsock: error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
