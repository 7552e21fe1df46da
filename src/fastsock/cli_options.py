"""Option types and choices shared by the commands of the `fastsock` command line.

Each option is an ``Annotated`` type, so a command that takes it declares one
parameter and every command shows the same help text.
"""

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

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


class SocketSource(str, Enum):
    proc = "proc"
    netlink = "netlink"


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


IntervalOption = Annotated[
    Optional[float],
    typer.Option(
        help="Seconds between snapshots; fractions allowed (0.05 is 20 per "
        "second), at least 0.001. Default: 0.2.",
    ),
]
FlushIntervalOption = Annotated[
    Optional[float],
    typer.Option(
        help="Seconds between writes of Parquet files, at least 0.1; a crash "
        "loses at most this. Default: 10.",
    ),
]
NodeNameOption = Annotated[
    Optional[str],
    typer.Option(
        help="Name stored in the host column and shown in the node column of "
        "federated results. Default: the hostname."
    ),
]
SourceOption = Annotated[
    SocketSource,
    typer.Option(
        help="Where snapshots read the sockets: proc (/proc/net text tables) or "
        "netlink (sock_diag dumps, which add the socket cookie and TCP byte, "
        "RTT and retransmit counters)."
    ),
]
CloseEventsOption = Annotated[
    bool,
    typer.Option(
        "--close-events/--no-close-events",
        help="Also record every socket the kernel reports closed, even one that "
        "lived less than one interval (needs CAP_NET_ADMIN; without it fastsock "
        "says so once and polls on).",
    ),
]
AllNetnsOption = Annotated[
    bool,
    typer.Option(
        "--all-netns",
        help="Read the sockets of every network namespace that a process runs "
        "in, through /proc/<pid>/net of one process per namespace; each "
        "namespace adds one read of the socket tables to every snapshot. "
        "Default: only the namespace fastsock runs in.",
    ),
]
BucketOption = Annotated[
    int,
    typer.Option(
        "--bucket",
        help="Width of a flows bucket in seconds: dependency edges are counted "
        "per bucket. Must divide 3600 (10, 60, 300, ...).",
        show_default=True,
    ),
]
CompactOption = Annotated[
    bool,
    typer.Option(
        "--compact/--no-compact",
        help="At the first flush in a new UTC hour, merge the Parquet files of "
        "each earlier hour into one file per table and hour (see `fastsock "
        "compact`). --no-compact leaves the files as written.",
    ),
]


class DepsDirection(str, Enum):
    inbound = "in"
    outbound = "out"
    both = "both"


class DepsFormat(str, Enum):
    tree = "tree"
    json = "json"
    dot = "dot"
    mermaid = "mermaid"
