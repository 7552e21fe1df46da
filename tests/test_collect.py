"""`fastsock collect` and `fastsock query` end to end, on real loopback sockets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness import query_json, run_fastsock


def collect(data_dir, seconds=1.5, *extra):
    return run_fastsock(
        "collect", "--quiet", "--interval", "0.1", "--duration", str(seconds),
        "--data-dir", str(data_dir), *extra,
    )


def wait_for_files(data_dir, timeout=60.0):
    """Wait until the collector has renamed at least one Parquet file into place."""
    deadline = time.monotonic() + timeout
    while not list(data_dir.rglob("*.parquet")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no Parquet file in {data_dir} after {timeout} s")
        time.sleep(0.05)


def connections_of(rows, pid):
    return [row for row in rows if row["pid"] == pid]


def test_tcp_over_ipv4_and_ipv6(peers, tmp_path):
    server4 = peers("server", "--bind", "127.0.0.1", "--name", "fs-srv4")
    client4 = peers("client", "--connect", "127.0.0.1", str(server4.info["port"]),
                    "--name", "fs-cli4")
    server6 = peers("server", "--bind", "::1", "--name", "fs-srv6")
    client6 = peers("client", "--connect", "::1", str(server6.info["port"]),
                    "--name", "fs-cli6")

    collect(tmp_path)
    rows = query_json(tmp_path, "SELECT * FROM connections WHERE protocol = 'tcp'")

    (out4,) = connections_of(rows, client4.pid)
    assert out4["comm"] == "fs-cli4"
    assert out4["local_addr"] == "127.0.0.1"
    assert out4["local_port"] == client4.info["ports"][0]
    assert out4["remote_addr"] == "127.0.0.1"
    assert out4["remote_port"] == server4.info["port"]
    assert out4["family"] == "inet"
    assert out4["state"] == "ESTABLISHED"

    (in4,) = connections_of(rows, server4.pid)
    assert in4["comm"] == "fs-srv4"
    assert in4["local_port"] == server4.info["port"]
    assert in4["remote_port"] == client4.info["ports"][0]

    (out6,) = connections_of(rows, client6.pid)
    assert out6["comm"] == "fs-cli6"
    assert out6["local_addr"] == "::1"
    assert out6["remote_addr"] == "::1"
    assert out6["remote_port"] == server6.info["port"]
    assert out6["family"] == "inet6"


def test_dual_stack_listener_with_ipv4_client(peers, tmp_path):
    server = peers("server", "--bind", "::", "--dual-stack", "--name", "fs-dual")
    client = peers("client", "--connect", "127.0.0.1", str(server.info["port"]),
                   "--name", "fs-cli-dual")

    collect(tmp_path)
    rows = query_json(tmp_path, "SELECT * FROM connections")
    listeners = query_json(tmp_path, "SELECT * FROM listeners")

    (accepted,) = connections_of(rows, server.pid)
    assert accepted["local_addr"] == "127.0.0.1"
    assert accepted["remote_addr"] == "127.0.0.1"
    assert accepted["remote_port"] == client.info["ports"][0]
    assert accepted["family"] == "inet"
    assert accepted["socket_family"] == "inet6"

    (listener,) = [row for row in listeners if row["pid"] == server.pid]
    assert listener["local_addr"] == "::"
    assert listener["local_port"] == server.info["port"]
    assert listener["state"] == "LISTEN"


def test_connected_udp(peers, tmp_path):
    server = peers("server", "--proto", "udp", "--bind", "127.0.0.1", "--name", "fs-udp-srv")
    client = peers("client", "--proto", "udp", "--connect", "127.0.0.1",
                   str(server.info["port"]), "--name", "fs-udp-cli")

    collect(tmp_path)
    rows = query_json(tmp_path, "SELECT * FROM connections WHERE protocol = 'udp'")
    listeners = query_json(tmp_path, "SELECT * FROM listeners WHERE protocol = 'udp'")

    (connected,) = connections_of(rows, client.pid)
    assert connected["comm"] == "fs-udp-cli"
    assert connected["remote_port"] == server.info["port"]
    assert connected["state"] == "ESTABLISHED"
    (unconnected,) = [row for row in listeners if row["pid"] == server.pid]
    assert unconnected["state"] == "UNCONN"
    assert unconnected["local_port"] == server.info["port"]


def test_closed_connection_has_lifetime(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-srv")
    collector = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--quiet", "--interval", "0.05",
         "--duration", "4", "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    client = peers("client", "--connect", "127.0.0.1", str(server.info["port"]),
                   "--name", "fs-short")
    time.sleep(0.8)
    client.stop()
    _, stderr = collector.communicate(timeout=30)
    assert collector.returncode == 0, stderr

    (row,) = query_json(
        tmp_path,
        f"SELECT *, epoch_ms(last_seen) - epoch_ms(first_seen) AS lived_ms "
        f"FROM connections WHERE pid = {client.pid}",
    )
    assert row["closed"] is True
    assert 300 <= row["lived_ms"] <= 1600


def test_comm_with_spaces_and_parentheses(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "a) (b c")

    collect(tmp_path, 0.5)
    rows = query_json(tmp_path, f"SELECT comm FROM listeners WHERE pid = {server.pid}")

    assert rows == [{"comm": "a) (b c"}]


def test_once_writes_partitioned_files(peers, tmp_path):
    peers("server", "--bind", "127.0.0.1", "--name", "fs-once")

    run_fastsock("collect", "--once", "--data-dir", str(tmp_path))

    files = sorted(tmp_path.glob("listeners/date=*/hour=*/*.parquet"))
    assert files
    assert pq.read_table(files[0]).num_rows > 0


def test_kill_9_leaves_readable_files(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-kill")
    peers("client", "--connect", "127.0.0.1", str(server.info["port"]), "--count", "20")
    collector = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--quiet", "--interval", "0.01",
         "--flush-interval", "0.1", "--data-dir", str(tmp_path)],
        stderr=subprocess.DEVNULL,
    )
    wait_for_files(tmp_path)
    time.sleep(0.5)
    os.kill(collector.pid, signal.SIGKILL)
    collector.wait()

    files = list(tmp_path.rglob("*.parquet"))
    assert files
    for path in files:
        pq.read_table(path)
    rows = query_json(tmp_path, f"SELECT count(*) AS n FROM connections WHERE pid = {server.pid}")
    assert rows == [{"n": 20}]


def test_sigterm_flushes(peers, tmp_path):
    peers("server", "--bind", "127.0.0.1", "--name", "fs-term")
    collector = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--quiet", "--flush-interval",
         "3600", "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    collector.send_signal(signal.SIGTERM)
    _, stderr = collector.communicate(timeout=30)

    assert collector.returncode == 0, stderr
    rows = query_json(tmp_path, "SELECT count(*) AS n FROM listeners WHERE comm = 'fs-term'")
    assert rows == [{"n": 1}]


def test_query_on_empty_dir_says_how_to_collect(tmp_path):
    result = run_fastsock("query", "--data-dir", str(tmp_path), "SELECT 1", check=False)

    assert result.returncode != 0
    assert "fastsock collect" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_sql_exits_2_without_traceback(peers, tmp_path):
    peers("server", "--bind", "127.0.0.1")
    run_fastsock("collect", "--once", "--data-dir", str(tmp_path))

    result = run_fastsock("query", "--data-dir", str(tmp_path), "SELEC * FROM x", check=False)

    assert result.returncode == 2
    assert "SELEC * FROM x" in result.stderr
    assert "Traceback" not in result.stderr


def test_query_formats(peers, tmp_path):
    peers("server", "--bind", "127.0.0.1", "--name", "fs-fmt")
    run_fastsock("collect", "--once", "--data-dir", str(tmp_path))
    sql = "SELECT comm, local_port FROM listeners WHERE comm = 'fs-fmt'"

    table = run_fastsock("query", "--data-dir", str(tmp_path), sql).stdout
    csv = run_fastsock("query", "--data-dir", str(tmp_path), "--format", "csv", sql).stdout
    out = tmp_path / "result.parquet"
    run_fastsock("query", "--data-dir", str(tmp_path), "--format", "parquet",
                 "--output", str(out), sql)

    assert "fs-fmt" in table
    assert csv.splitlines()[0] == "comm,local_port"
    assert pq.read_table(out).column("comm").to_pylist() == ["fs-fmt"]


def test_proc_root_env_reads_fixture(tmp_path):
    from caseload import proc_tree

    root = proc_tree("C04", tmp_path / "proc")
    data = tmp_path / "data"
    run_fastsock("collect", "--once", "--data-dir", str(data),
                 env={"FASTSOCK_PROC_ROOT": str(root)})

    rows = query_json(data, "SELECT inode FROM connections ORDER BY inode")
    assert [row["inode"] for row in rows] == [24003, 24004, 24007]


def test_proc_root_without_tables_rejected(tmp_path):
    root = tmp_path / "notproc"
    (root / "net").mkdir(parents=True)
    (root / "net" / "snmp").write_text(Path("/proc/net/snmp").read_text())
    data = tmp_path / "data"

    result = run_fastsock("collect", "--once", "--proc-root", str(root),
                          "--data-dir", str(data), check=False)

    assert result.returncode == 1
    assert "has no net/tcp, net/tcp6, net/udp or net/udp6" in result.stderr
    assert f"under '{root}'" in result.stderr
    assert "root of a proc filesystem" in result.stderr
    assert "Traceback" not in result.stderr
    assert not data.exists()


def test_empty_pid_1_net_rejected(tmp_path):
    root = tmp_path / "hostproc"
    (root / "1" / "net").mkdir(parents=True)
    (root / "net").mkdir()
    (root / "net" / "tcp").write_text(Path("/proc/net/tcp").read_text())

    result = run_fastsock("collect", "--once", "--proc-root", str(root),
                          "--data-dir", str(tmp_path / "data"), check=False)

    assert result.returncode == 1
    assert f"under '{root}/1'" in result.stderr


@pytest.mark.parametrize("name", ["tcp", "tcp6", "udp", "udp6"])
def test_proc_root_one_table_accepted(tmp_path, name):
    root = tmp_path / "proc"
    (root / "net").mkdir(parents=True)
    header = Path(f"/proc/net/{name}").read_text().splitlines()[0]
    (root / "net" / name).write_text(header + "\n")

    result = run_fastsock("collect", "--once", "--proc-root", str(root),
                          "--data-dir", str(tmp_path / "data"), check=False)

    assert result.returncode == 0, result.stderr
    assert "has no net/tcp" not in result.stderr


def test_sample_rejects_proc_root_without_tables(tmp_path):
    import fastsock
    from fastsock.errors import ProcReadError

    with pytest.raises(ProcReadError, match="has no net/tcp, net/tcp6"):
        fastsock.sample(tmp_path)


def test_sample_api_sees_own_socket():
    import socket

    import fastsock

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        inode = os.fstat(listener.fileno()).st_ino
        port = listener.getsockname()[1]
        table = fastsock.sample()

    rows = [row for row in table.to_pylist() if row["inode"] == inode]
    assert len(rows) == 1
    assert rows[0]["pid"] == os.getpid()
    assert rows[0]["local_port"] == port


@pytest.mark.parametrize(
    "option, value",
    [("--interval", "inf"), ("--interval", "nan"), ("--duration", "-5"),
     ("--flush-interval", "inf")],
)
def test_invalid_seconds_rejected(tmp_path, option, value):
    result = run_fastsock("collect", option, value, "--data-dir", str(tmp_path), check=False)

    assert result.returncode == 2
    assert option in result.stderr
    assert "Traceback" not in result.stderr


def test_data_dir_file_rejected(tmp_path):
    target = tmp_path / "afile"
    target.write_text("")

    result = run_fastsock("collect", "--once", "--data-dir", str(target), check=False)

    assert result.returncode == 1
    assert "is a file" in result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_flushes(peers, tmp_path):
    peers("server", "--bind", "127.0.0.1", "--name", "fs-hup")
    collector = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--quiet", "--flush-interval",
         "3600", "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    collector.send_signal(signal.SIGHUP)
    _, stderr = collector.communicate(timeout=30)

    assert collector.returncode == 0, stderr
    rows = query_json(tmp_path, "SELECT count(*) AS n FROM listeners WHERE comm = 'fs-hup'")
    assert rows == [{"n": 1}]


def test_vanished_proc_root_keeps_collected_rows(tmp_path):
    import shutil

    from caseload import proc_tree

    root = proc_tree("C04", tmp_path / "proc")
    data = tmp_path / "data"
    collector = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--quiet", "--flush-interval",
         "0.2", "--proc-root", str(root), "--data-dir", str(data)],
        stderr=subprocess.PIPE, text=True,
    )
    wait_for_files(data)
    shutil.rmtree(root)
    _, stderr = collector.communicate(timeout=30)

    assert collector.returncode == 1
    assert "collection stopped" in stderr
    rows = query_json(data, "SELECT count(*) AS n FROM connections")
    assert rows == [{"n": 3}]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount and unshare")
def test_foreign_proc_root_reads_host_namespace(peers, tmp_path):
    """A host's /proc mounted elsewhere, read from another namespace, shows the host."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-host-srv")
    host_proc = tmp_path / "hostproc"
    host_proc.mkdir()
    subprocess.run(["mount", "--bind", "/proc", str(host_proc)], check=True)
    code = (
        "import fastsock, json, sys; t = fastsock.sample(sys.argv[1]); "
        "print(json.dumps(sorted(set(t.column('local_port').to_pylist()))))"
    )

    try:
        result = subprocess.run(
            ["unshare", "--net", sys.executable, "-c", code, str(host_proc)],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        subprocess.run(["umount", str(host_proc)], check=True)

    assert result.returncode == 0, result.stderr
    assert server.info["port"] in json.loads(result.stdout)


def test_second_collector_of_host_rejected(tmp_path):
    first = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--quiet", "--node-name", "same",
         "--flush-interval", "0.2", "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_files(tmp_path)
        second = run_fastsock("collect", "--once", "--node-name", "same",
                              "--data-dir", str(tmp_path), check=False)
        other = run_fastsock("collect", "--once", "--node-name", "other",
                             "--data-dir", str(tmp_path), check=False)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)

    assert second.returncode == 1
    assert f"pid {first.pid}" in second.stderr
    assert other.returncode == 0, other.stderr


def test_quiet_prints_no_status(tmp_path):
    result = run_fastsock("collect", "--once", "--quiet", "--data-dir", str(tmp_path))

    assert "samples" not in result.stderr
    assert "collecting to" not in result.stderr


def test_status_of_a_proc_root_without_namespace(tmp_path):
    from caseload import proc_tree

    root = proc_tree("C01", tmp_path / "proc")
    data = tmp_path / "data"
    run_fastsock("collect", "--proc-root", str(root), "--duration", "1.2",
                 "--flush-interval", "0.5", "--data-dir", str(data))

    status = run_fastsock("status", "--data-dir", str(data)).stdout

    assert "no collector_stats" not in status
    assert "samples" in status


def test_netlink_source_with_another_proc_root_rejected(tmp_path):
    result = run_fastsock("collect", "--once", "--source", "netlink", "--proc-root",
                          str(tmp_path), "--data-dir", str(tmp_path / "d"), check=False)

    assert result.returncode == 2
    assert "use --source proc with --proc-root" in result.stderr


@pytest.mark.parametrize("command", ["collect", "query", "status", "deps", "agent"])
def test_help_fits_80_columns(command):
    result = run_fastsock(command, "--help", env={"COLUMNS": "80"})

    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    assert "$FASTSOCK_DATA_DIR, else /var/lib/fastsock" in " ".join(result.stdout.split())
