"""The `fastsock` command line: a thin layer over the library modules."""

import logging
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fastsock.errors import FastsockError, NoDataError, QueryError

app = typer.Typer(
    help="Record which processes talk to which over TCP and UDP, and query the history.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("fastsock")

DataDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Directory of the Parquet history. Default: $FASTSOCK_DATA_DIR, else "
        "/var/lib/fastsock as root, else $XDG_DATA_HOME/fastsock.",
        show_default=False,
    ),
]
ProcRootOption = Annotated[
    Optional[Path],
    typer.Option(
        "--proc-root",
        help="Read /proc from this directory instead: a host's /proc mounted in a "
        "container, or a fixture tree. Default: $FASTSOCK_PROC_ROOT, else /proc.",
        show_default=False,
    ),
]


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


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
    interval: Annotated[
        float,
        typer.Option(
            help="Seconds between snapshots; fractions allowed (0.05 is 20 per second).",
            min=0.001,
        ),
    ] = None,
    duration: Annotated[
        Optional[float],
        typer.Option(help="Stop after this many seconds. Default: run until Ctrl-C."),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Take one snapshot, store it and exit.")
    ] = False,
    flush_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between writes of Parquet files; a crash loses at most this.",
            min=0.1,
        ),
    ] = None,
    data_dir: DataDirOption = None,
    proc_root: ProcRootOption = None,
    node_name: Annotated[
        Optional[str],
        typer.Option(help="Name stored in the host column. Default: the hostname."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print no status line.")
    ] = False,
) -> None:
    """Record this machine's sockets and their processes to Parquet.

    Example: fastsock collect --interval 0.1 --duration 10 --data-dir ./data
    """
    from fastsock.collector import DEFAULT_FLUSH_INTERVAL, DEFAULT_INTERVAL, Collector
    from fastsock.snapshot import Snapshotter
    from fastsock.store import ParquetStore

    interval = DEFAULT_INTERVAL if interval is None else interval
    flush_interval = DEFAULT_FLUSH_INTERVAL if flush_interval is None else flush_interval
    directory = _data_dir(data_dir)
    try:
        snapshotter = Snapshotter(proc_root, host=node_name)
        store = ParquetStore(directory)
        removed = store.remove_stale_temp_files()
    except (FastsockError, OSError) as error:
        raise _fail(str(error))
    if removed:
        log.warning("removed %d temporary files left by an interrupted writer", removed)

    collector = Collector(snapshotter, store)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    show = None if quiet else _status_printer()
    typer.echo(f"collecting to {directory} (Ctrl-C stops and flushes)", err=True)
    if once:
        collector.sample()
        collector.flush()
        status = collector.status
    else:
        status = collector.run(interval, flush_interval, stop, duration, show)
    if show is not None and sys.stderr.isatty():
        typer.echo("", err=True)
    typer.echo(status.line(), err=True)
    if status.failed_flushes and not collector.flush():
        raise _fail(f"could not store every record in {directory}; see the log above")


def _status_printer():
    tty = sys.stderr.isatty()

    def show(status) -> None:
        if tty:
            sys.stderr.write("\r\033[K" + status.line())
            sys.stderr.flush()

    return show


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the tables connections, listeners, processes.")],
    data_dir: DataDirOption = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="Output format.")
    ] = OutputFormat.table,
    output: Annotated[
        Optional[Path],
        typer.Option(help="Write the result to this file instead of standard output."),
    ] = None,
) -> None:
    """Run SQL with DuckDB over the stored history.

    Example: fastsock query "SELECT comm, remote_addr, remote_port, count(*) AS n
    FROM connections GROUP BY ALL ORDER BY n DESC"
    """
    from fastsock.output import write_result
    from fastsock.query import run_query

    directory = _data_dir(data_dir)
    try:
        result = run_query(directory, sql)
    except NoDataError as error:
        raise _fail(str(error))
    except QueryError as error:
        raise _fail(str(error), 2)

    try:
        write_result(result, output_format.value, output, sys.stdout)
    except (ValueError, OSError) as error:
        raise _fail(str(error), 2)


def main() -> None:
    """Run the command line; errors of fastsock print one line, not a traceback."""
    try:
        app()
    except FastsockError as error:
        typer.echo(f"fastsock: error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
