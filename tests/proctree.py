"""Build fake proc trees for tests.

A tree has the files that fastsock reads from /proc, laid out the same way, so
the product reads it through the same code path as a live /proc:

    <root>/stat              btime line
    <root>/net/tcp           socket table text, copied as given
    <root>/<pid>/stat        stat line with comm, ppid and starttime
    <root>/<pid>/status      Uid line
    <root>/<pid>/cmdline     NUL-separated arguments
    <root>/<pid>/exe         symlink, only when an exe is given
    <root>/<pid>/fd/<n>      symlink to a target such as socket:[33894]

The fd links dangle, which is fine, because readlink does not follow them.
"""

import json
from pathlib import Path

DEFAULT_BTIME = 1_700_000_000
DEFAULT_STARTTIME = 4_200
DEFAULT_UID = 1000


def load_processes(path: Path) -> dict:
    """Load a proc_fd.json file: {"processes": [{"pid", "comm", "fds"}, ...]}."""
    return json.loads(path.read_text())


def build_proc_tree(
    root: Path,
    spec: dict,
    *,
    net: dict[str, str] | None = None,
    btime: int = DEFAULT_BTIME,
) -> Path:
    """Write a proc tree under root and return root.

    spec is {"processes": [...]}. Each process has "pid" and "comm", and may
    have "fds" ({"3": "socket:[33894]"}), "ppid", "starttime" (clock ticks
    after boot), "uid", "cmdline" (a list of arguments), "exe" (a link
    target) and "fd_dir": false to leave out the fd directory, as if the
    process exited mid-scan. Other keys, such as "role", are ignored.
    net maps a table name ("tcp", "udp6") to its text.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(system_stat_text(btime))

    for name, text in (net or {}).items():
        (root / "net").mkdir(exist_ok=True)
        (root / "net" / name).write_text(text)

    for process in spec["processes"]:
        write_process(root, process)
    return root


def write_process(root: Path, process: dict) -> Path:
    """Write the files of one process and return its directory."""
    pid = process["pid"]
    directory = root / str(pid)
    directory.mkdir(parents=True, exist_ok=True)

    (directory / "stat").write_bytes(
        stat_line(
            pid,
            process["comm"],
            ppid=process.get("ppid", 1),
            starttime=process.get("starttime", DEFAULT_STARTTIME),
        )
    )
    (directory / "status").write_text(status_text(process))
    arguments = process.get("cmdline", [process["comm"]])
    (directory / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in arguments))
    if "exe" in process:
        (directory / "exe").symlink_to(process["exe"])

    if process.get("fd_dir", True):
        write_fds(directory, process.get("fds", {}))
    return directory


def write_fds(directory: Path, fds: dict[str, str]) -> None:
    """Replace the fd directory of a process with links to the given targets."""
    fd_dir = directory / "fd"
    if fd_dir.exists():
        for link in fd_dir.iterdir():
            link.unlink()
    fd_dir.mkdir(exist_ok=True)
    for number, target in fds.items():
        (fd_dir / str(number)).symlink_to(target)


def stat_line(pid: int, comm: str, *, ppid: int, starttime: int) -> bytes:
    """Return a /proc/<pid>/stat line with 52 fields, as Linux 6.18 prints it."""
    after_comm = [
        "S",  # 3 state
        str(ppid),  # 4 ppid
        str(pid),  # 5 pgrp
        str(pid),  # 6 session
        "0",  # 7 tty_nr
        "-1",  # 8 tpgid
        "4194560",  # 9 flags
        "1523",  # 10 minflt
        "0",  # 11 cminflt
        "3",  # 12 majflt
        "0",  # 13 cmajflt
        "12",  # 14 utime
        "4",  # 15 stime
        "0",  # 16 cutime
        "0",  # 17 cstime
        "20",  # 18 priority
        "0",  # 19 nice
        "1",  # 20 num_threads
        "0",  # 21 itrealvalue
        str(starttime),  # 22 starttime
        "25247744",  # 23 vsize
        "2716",  # 24 rss
        "18446744073709551615",  # 25 rsslim
    ]
    # Fields 26 to 52 (addresses, signal masks, exit code) are zero here
    # because fastsock does not read them.
    after_comm += ["0"] * 27
    return f"{pid} ({comm}) {' '.join(after_comm)}\n".encode()


def status_text(process: dict) -> str:
    uid = process.get("uid", DEFAULT_UID)
    return (
        f"Name:\t{process['comm']}\n"
        f"State:\tS (sleeping)\n"
        f"Tgid:\t{process['pid']}\n"
        f"Pid:\t{process['pid']}\n"
        f"PPid:\t{process.get('ppid', 1)}\n"
        f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        f"Gid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
    )


def system_stat_text(btime: int) -> str:
    return (
        "cpu  2255 34 2290 22625563 6290 127 456 0 0 0\n"
        "cpu0 1132 34 1441 11311718 3675 127 438 0 0 0\n"
        "intr 114930548 113199788 3 0 5 263 0 4\n"
        "ctxt 1990473\n"
        f"btime {btime}\n"
        "processes 2915\n"
        "procs_running 1\n"
        "procs_blocked 0\n"
    )
