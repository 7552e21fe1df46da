"""Tests of socket attribution: fixture proc trees, then the live /proc."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import fastsock
from fastsock import _fdscan
from fastsock.processes import (
    PROCESS_SCHEMA,
    RESOLVED_SCHEMA,
    Attributor,
    fd_counts_available,
    parse_cmdline,
    parse_stat,
)
from proctree import build_proc_tree, load_processes, stat_line, write_fds

FIXTURES = Path(__file__).parent / "fixtures"

# An unprivileged uid and gid ("nobody" on Debian). setpriv needs no passwd
# entry to switch to them.
NOBODY = 65534


def case_tree(tmp_path: Path, case: str, spec: dict | None = None) -> Path:
    """Build the proc tree of a case folder, optionally with an edited spec."""
    folder = FIXTURES / case
    if spec is None:
        spec = load_processes(folder / "proc_fd.json")
    return build_proc_tree(
        tmp_path / "proc", spec, net={"tcp": (folder / "tcp").read_text()}
    )


def case_inodes(case: str) -> list[int]:
    expected = json.loads((FIXTURES / case / "expected.json").read_text())
    return [row["inode"] for row in expected["sockets"]]


def rows_by_inode(table) -> dict[int, dict]:
    return {row["inode"]: row for row in table.to_pylist()}


def test_c18_shared_listener_keeps_every_holder(tmp_path):
    attributor = Attributor(case_tree(tmp_path, "C18"))

    table = attributor.resolve(np.array(case_inodes("C18"), dtype=np.int64))
    rows = rows_by_inode(table)

    assert table.schema == RESOLVED_SCHEMA
    assert table.num_rows == 3
    assert rows[33894]["pids"] == [8111, 8152, 8153, 8154]
    assert rows[33894]["pid"] == 8111
    assert rows[33894]["comm"] == "gunicorn"
    assert rows[33950]["pids"] == [8153]
    assert rows[33950]["pid"] == 8153
    assert rows[33949]["pids"] == [8200]
    assert rows[33949]["comm"] == "curl"


def test_c18_process_table_lists_every_holder(tmp_path):
    attributor = Attributor(case_tree(tmp_path, "C18"))
    attributor.resolve(case_inodes("C18"))

    processes = attributor.processes()

    assert processes.schema == PROCESS_SCHEMA
    assert processes.column("pid").to_pylist() == [8111, 8152, 8153, 8154, 8200]
    assert processes.column("uid").to_pylist() == [1000] * 5
    assert processes.column("ppid").to_pylist() == [1] * 5


def test_c19_reuseport_listeners_keep_own_owner(tmp_path):
    attributor = Attributor(case_tree(tmp_path, "C19"))

    rows = rows_by_inode(attributor.resolve(case_inodes("C19")))

    assert rows[24501]["pids"] == [7627]
    assert rows[28565]["pids"] == [7628]
    assert rows[31001]["pid"] == 7627
    assert rows[31002]["pid"] == 7628
    assert rows[31003]["pid"] == 7700
    assert rows[31004]["pid"] == 7700
    assert rows[31004]["comm"] == "loadgen"


def test_c05_inode_zero_never_matched(tmp_path):
    spec = load_processes(FIXTURES / "C05" / "proc_fd.json")
    fetcher = next(p for p in spec["processes"] if p["comm"] == "fetcher")
    fetcher["fds"]["9"] = "socket:[0]"
    root = case_tree(tmp_path, "C05", spec)
    attributor = Attributor(root)

    table = attributor.resolve(case_inodes("C05"))
    rows = rows_by_inode(table)

    # The fixture must offer the false match, or this test could not fail.
    scan = _fdscan.scan_fds(str(root))
    assert 0 in scan.inodes.tolist()
    assert table.num_rows == 3
    assert rows[0]["pid"] is None
    assert rows[0]["pids"] is None
    assert rows[0]["comm"] is None
    assert rows[25001]["comm"] == "websrv"
    assert rows[25002]["pid"] == 3101
    assert rows[25002]["comm"] == "fetcher"


def test_inode_zero_alone_does_not_walk(tmp_path):
    attributor = Attributor(case_tree(tmp_path, "C05"))

    table = attributor.resolve([0, 0])

    assert table.num_rows == 1
    assert attributor.stats["full_walks"] == 0


@pytest.mark.parametrize(
    "comm",
    ["a) (b c", "tmux: server", ")", "((", "x) S 1 2 3"],
)
def test_parse_stat_comm_with_parentheses(comm):
    fields = parse_stat(stat_line(42, comm, ppid=7, starttime=123456))

    assert fields.comm == comm
    assert fields.ppid == 7
    assert fields.start_ticks == 123456


def test_parse_stat_rejects_truncated_line():
    with pytest.raises(ValueError, match="fields"):
        parse_stat(b"42 (sh) S 1 42 42 0")


def test_comm_with_spaces_and_parentheses(tmp_path):
    spec = {"processes": [{"pid": 300, "comm": "a) (b c", "fds": {"3": "socket:[5]"}}]}
    attributor = Attributor(build_proc_tree(tmp_path / "proc", spec))

    row = attributor.resolve([5]).to_pylist()[0]

    assert row["comm"] == "a) (b c"
    assert row["pid"] == 300


def test_cmdline_nul_separators():
    assert parse_cmdline(b"python3\0-m\0http.server\0" b"8000\0") == (
        "python3 -m http.server 8000"
    )
    assert parse_cmdline(b"nginx: worker process\0\0\0") == "nginx: worker process"
    assert parse_cmdline(b"") is None


def test_process_columns_from_fixture(tmp_path):
    spec = {
        "processes": [
            {
                "pid": 410,
                "comm": "server",
                "starttime": 4200,
                "cmdline": ["/usr/bin/server", "--port", "80"],
                "exe": "/usr/bin/server",
                "fds": {"3": "socket:[11]"},
            },
            {"pid": 411, "comm": "kworker/0:1", "fds": {"3": "socket:[12]"}},
        ]
    }
    root = build_proc_tree(tmp_path / "proc", spec, btime=1_700_000_000)
    attributor = Attributor(root)

    rows = rows_by_inode(attributor.resolve([11, 12]))
    start = rows[11]["process_start"]

    assert rows[11]["cmdline"] == "/usr/bin/server --port 80"
    assert rows[11]["exe"] == "/usr/bin/server"
    assert rows[12]["exe"] is None
    assert start.timestamp() == 1_700_000_000 + 4200 / os.sysconf("SC_CLK_TCK")
    assert start.tzinfo is not None


def test_missing_btime_gives_null_start(tmp_path, caplog):
    spec = {"processes": [{"pid": 420, "comm": "app", "fds": {"3": "socket:[21]"}}]}
    root = build_proc_tree(tmp_path / "proc", spec)
    (root / "stat").write_text("cpu  1 2 3 4\n")
    attributor = Attributor(root)

    with caplog.at_level(logging.WARNING, logger="fastsock.processes"):
        row = attributor.resolve([21]).to_pylist()[0]

    assert row["pid"] == 420
    assert row["process_start"] is None
    assert "btime" in caplog.text


def test_vanished_fd_dir_counted_not_fatal(tmp_path):
    spec = {
        "processes": [
            {"pid": 500, "comm": "gone", "fd_dir": False},
            {"pid": 501, "comm": "stays", "fds": {"3": "socket:[31]"}},
        ]
    }
    attributor = Attributor(build_proc_tree(tmp_path / "proc", spec))

    rows = rows_by_inode(attributor.resolve([31, 32]))

    assert attributor.stats["processes_vanished"] == 1
    assert attributor.stats["processes_scanned"] == 2
    assert rows[31]["pid"] == 501
    assert rows[32]["pid"] is None


def test_holder_without_stat_keeps_pid(tmp_path):
    spec = {"processes": [{"pid": 510, "comm": "brief", "fds": {"3": "socket:[41]"}}]}
    root = build_proc_tree(tmp_path / "proc", spec)
    (root / "510" / "stat").unlink()
    attributor = Attributor(root)

    row = attributor.resolve([41]).to_pylist()[0]

    assert row["pid"] == 510
    assert row["comm"] is None
    assert attributor.stats["process_reads_vanished"] == 1
    assert attributor.processes().num_rows == 0


def test_missing_proc_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="proc root"):
        Attributor(tmp_path / "absent")


def test_resolve_rejects_bad_input(tmp_path):
    attributor = Attributor(build_proc_tree(tmp_path / "proc", {"processes": []}))

    with pytest.raises(ValueError, match="1-D"):
        attributor.resolve(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        attributor.resolve(np.array([1.5]))


def test_cached_resolve_does_no_walk(tmp_path):
    root = case_tree(tmp_path, "C18")
    attributor = Attributor(root)
    attributor.resolve(case_inodes("C18"))
    after_first = attributor.stats

    rows = rows_by_inode(attributor.resolve(case_inodes("C18")))
    after_second = attributor.stats

    assert after_first["full_walks"] == 1
    assert after_second["full_walks"] == 1
    assert after_second["partial_walks"] == 0
    assert after_second["processes_scanned"] == after_first["processes_scanned"]
    assert after_second["fds_read"] == after_first["fds_read"]
    assert rows[33894]["pids"] == [8111, 8152, 8153, 8154]


def test_new_socket_triggers_rescan(tmp_path):
    root = case_tree(tmp_path, "C18")
    attributor = Attributor(root)
    attributor.resolve(case_inodes("C18"))
    write_fds(root / "8154", {"3": "socket:[33894]", "8": "socket:[33960]"})

    rows = rows_by_inode(attributor.resolve([*case_inodes("C18"), 33960]))

    assert attributor.stats["full_walks"] == 2
    assert rows[33960]["pids"] == [8154]


def test_unowned_inode_walks_once(tmp_path):
    attributor = Attributor(case_tree(tmp_path, "C18"))

    attributor.resolve([33894, 99999])
    attributor.resolve([33894, 99999])

    assert attributor.stats["full_walks"] == 1
    assert attributor.stats["inodes_unowned"] == 2


def test_unowned_inode_forgotten_when_not_requested(tmp_path):
    root = case_tree(tmp_path, "C18")
    attributor = Attributor(root)
    attributor.resolve([99999])
    attributor.resolve([33894])
    write_fds(root / "8200", {"5": "socket:[33949]", "6": "socket:[99999]"})

    row = attributor.resolve([99999]).to_pylist()[0]

    assert attributor.stats["full_walks"] == 2
    assert row["pid"] == 8200


def test_exited_holder_forgotten_without_walk(tmp_path):
    root = case_tree(tmp_path, "C18")
    attributor = Attributor(root)
    attributor.resolve(case_inodes("C18"))
    shutil.rmtree(root / "8152")

    rows = rows_by_inode(attributor.resolve(case_inodes("C18")))

    assert attributor.stats["full_walks"] == 1
    assert rows[33894]["pids"] == [8111, 8153, 8154]
    assert 8152 not in attributor.processes().column("pid").to_pylist()


def test_pid_reuse_gives_new_process_info(tmp_path):
    old = {"pid": 600, "comm": "old", "starttime": 1000, "fds": {"3": "socket:[51]"}}
    root = build_proc_tree(tmp_path / "proc", {"processes": [old]})
    attributor = Attributor(root)
    first = attributor.resolve([51]).to_pylist()[0]

    shutil.rmtree(root / "600")
    new = {"pid": 600, "comm": "new", "starttime": 9000, "fds": {"3": "socket:[52]"}}
    build_proc_tree(root, {"processes": [new]})
    second = attributor.resolve([52]).to_pylist()[0]
    processes = attributor.processes().to_pylist()

    assert first["comm"] == "old"
    assert second["pid"] == 600
    assert second["comm"] == "new"
    assert second["process_start"] > first["process_start"]
    assert [p["comm"] for p in processes] == ["new"]


def test_same_pid_and_start_reuses_info(tmp_path):
    process = {"pid": 610, "comm": "app", "fds": {"3": "socket:[61]"}}
    root = build_proc_tree(tmp_path / "proc", {"processes": [process]})
    attributor = Attributor(root)
    attributor.resolve([61])

    # A changed cmdline under the same (pid, start time) is the same process,
    # so the cached info stays after the rescan that inode 62 triggers.
    (root / "610" / "cmdline").write_bytes(b"changed\0")
    write_fds(root / "610", {"3": "socket:[61]", "4": "socket:[62]"})
    row = attributor.resolve([62]).to_pylist()[0]

    assert attributor.stats["full_walks"] == 2
    assert row["cmdline"] == "app"


def test_forced_partial_walk_falls_back_to_full(tmp_path):
    process = {"pid": 620, "comm": "pool", "fds": {"3": "socket:[71]"}}
    root = build_proc_tree(tmp_path / "proc", {"processes": [process]})
    attributor = Attributor(root, rescan_changed_only=True)
    attributor.resolve([71])

    # Closing one socket and opening another keeps the fd count, so the
    # partial walk skips the process and only the full walk finds inode 72.
    write_fds(root / "620", {"3": "socket:[72]"})
    row = attributor.resolve([72]).to_pylist()[0]

    assert attributor.stats["partial_walks"] == 1
    assert attributor.stats["fallback_walks"] == 1
    assert attributor.stats["full_walks"] == 2
    assert row["pid"] == 620


def test_non_root_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    root = case_tree(tmp_path, "C18")
    attributor = Attributor(root)

    with caplog.at_level(logging.WARNING, logger="fastsock.processes"):
        attributor.resolve([33894])
        write_fds(root / "8200", {"5": "socket:[33949]", "6": "socket:[33970]"})
        attributor.resolve([33894, 33970])

    warnings = [r for r in caplog.records if "partial" in r.getMessage()]
    assert attributor.stats["full_walks"] == 2
    assert len(warnings) == 1
    assert "uid 1000" in warnings[0].getMessage()


# Opens a TCP listener, a client connected to it and the accepted socket on
# 127.0.0.1, then prints its pid and the three socket inodes. Each line read
# from stdin opens one more UDP socket and prints its inode. EOF ends it.
CHILD_SCRIPT = r"""
import json, os, socket, sys

def inode(sock):
    return os.fstat(sock.fileno()).st_ino

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
client = socket.create_connection(listener.getsockname())
accepted, _ = listener.accept()
print(json.dumps({
    "pid": os.getpid(),
    "listener": inode(listener),
    "client": inode(client),
    "accepted": inode(accepted),
}), flush=True)

extra = []
for line in sys.stdin:
    extra.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    extra[-1].bind(("127.0.0.1", 0))
    print(json.dumps({"inode": inode(extra[-1])}), flush=True)
"""


class Child:
    """The CHILD_SCRIPT process, stopped by closing its stdin."""

    def __init__(self) -> None:
        self.started = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.process.stdout.readline())
        self.pid = self.info["pid"]

    def open_socket(self) -> int:
        self.process.stdin.write("open\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["inode"]

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def child():
    started = Child()
    yield started
    started.stop()


def test_live_proc_attributes_child_sockets(child):
    inodes = [child.info["listener"], child.info["client"], child.info["accepted"]]
    attributor = Attributor("/proc")

    rows = rows_by_inode(attributor.resolve(inodes))

    for inode in inodes:
        assert rows[inode]["pid"] == child.pid
        assert rows[inode]["pids"] == [child.pid]
    row = rows[child.info["listener"]]
    assert row["comm"].startswith("python")
    assert row["exe"] == os.path.realpath(sys.executable)
    assert row["cmdline"].startswith(f"{sys.executable} -c")
    assert abs(row["process_start"].timestamp() - child.started) < 5


def test_live_proc_process_table(child):
    attributor = Attributor("/proc")
    attributor.resolve([child.info["listener"]])

    processes = attributor.processes().to_pylist()

    assert [p["pid"] for p in processes] == [child.pid]
    assert processes[0]["ppid"] == os.getpid()
    assert processes[0]["uid"] == os.getuid()


def test_live_proc_cached_then_rescanned(child):
    inodes = [child.info["listener"], child.info["client"], child.info["accepted"]]
    attributor = Attributor("/proc")
    attributor.resolve(inodes)
    after_first = attributor.stats

    attributor.resolve(inodes)
    after_cached = attributor.stats
    new_inode = child.open_socket()
    rows = rows_by_inode(attributor.resolve([*inodes, new_inode]))
    after_rescan = attributor.stats

    assert after_cached["processes_scanned"] == after_first["processes_scanned"]
    assert after_cached["full_walks"] + after_cached["partial_walks"] == 1
    walks = after_rescan["full_walks"] + after_rescan["partial_walks"]
    assert walks == 2
    assert rows[new_inode]["pid"] == child.pid


@pytest.mark.skipif(
    not fd_counts_available("/proc"), reason="needs Linux 6.2+ fd counts in st_size"
)
def test_live_proc_rescans_only_changed(child):
    inodes = [child.info["listener"]]
    attributor = Attributor("/proc")
    attributor.resolve(inodes)
    scanned_by_full_walk = attributor.stats["processes_scanned"]

    new_inode = child.open_socket()
    rows = rows_by_inode(attributor.resolve([*inodes, new_inode]))
    stats = attributor.stats

    assert attributor.rescan_changed_only
    assert stats["partial_walks"] == 1
    assert stats["full_walks"] == 1
    assert stats["processes_unchanged"] > 0
    assert stats["processes_scanned"] - scanned_by_full_walk < scanned_by_full_walk
    assert rows[new_inode]["pid"] == child.pid


# Holds a UDP socket, resolves it and inode 1 (held by no process, so the
# walk covers all of /proc) and prints the result and the stats.
NOBODY_SCRIPT = r"""
import json, os, socket, sys
from fastsock.processes import Attributor

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
inode = os.fstat(sock.fileno()).st_ino
attributor = Attributor(sys.argv[1])
rows = {row["inode"]: row for row in attributor.resolve([inode, 1]).to_pylist()}
print(json.dumps({
    "pid": os.getpid(),
    "row_pid": rows[inode]["pid"],
    "stats": attributor.stats,
}))
"""


def run_as_nobody(command: list[str]) -> subprocess.CompletedProcess:
    package_parent = Path(fastsock.__file__).resolve().parent.parent
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(package_parent)},
    )


def drop_to_nobody() -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        sys.executable,
    ]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_denied_fd_dirs_counted_not_fatal():
    result = run_as_nobody([*drop_to_nobody(), "-c", NOBODY_SCRIPT, "/proc"])

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["row_pid"] == output["pid"]
    assert output["stats"]["fd_dirs_denied"] > 0
    assert result.stderr.count("attribution is partial") == 1


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount procfs")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_hidepid_mount_hides_others_not_fatal():
    # pytest's tmp_path sits in a directory that only root may enter.
    with tempfile.TemporaryDirectory(prefix="fastsock-hidepid-") as mount_point:
        os.chmod(mount_point, 0o755)
        # The mount lives in a private mount namespace and ends with it.
        script = (
            f"mount -t proc -o hidepid=invisible proc {mount_point} && "
            f"exec {' '.join(drop_to_nobody())} -c \"$0\" {mount_point}"
        )
        result = run_as_nobody(["unshare", "-m", "sh", "-c", script, NOBODY_SCRIPT])

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["row_pid"] == output["pid"]
    assert output["stats"]["processes_scanned"] == 1
