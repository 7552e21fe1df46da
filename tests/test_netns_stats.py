"""collector_stats rows and close events per network namespace with --all-netns."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from harness import query_json, run_fastsock
from special_peers import launch  # noqa: F401 (a fixture)
from test_netns import namespace_pair  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="creating network namespaces needs root and the ip command (iproute2)",
)

# Opens COUNT loopback connections one after another, each living HOLD seconds
# and closed by the client first; prints the server port and the client ports.
OPEN_CONNECTIONS = """
import json, socket, sys, time
count, hold = int(sys.argv[1]), float(sys.argv[2])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(128)
ports = []
for _ in range(count):
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    ports.append(client.getsockname()[1])
    time.sleep(hold)
    client.close()
    accepted.close()
print(json.dumps({"server": server.getsockname()[1], "clients": ports}))
"""


def connect_in(namespace: str, count: int, hold: float) -> dict:
    """Open and close count connections inside namespace; return their ports."""
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", OPEN_CONNECTIONS,
         str(count), str(hold)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return json.loads(result.stdout)


class AllNetnsCollector:
    """`fastsock collect --all-netns` in a subprocess, returned after its first sample.

    The first sample reads every namespace and subscribes to its close events
    before the collector logs it.
    """

    def __init__(self, data_dir, *args: str, command_prefix=()) -> None:
        self.process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "fastsock", "--log-level", "info",
             "collect", "--quiet", "--all-netns", "--data-dir", str(data_dir), *args],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        self.read_until("first sample:")

    def read_until(self, text: str) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"collect exited before {text!r}:\n{''.join(self.lines)}")

    def wait(self) -> str:
        _, rest = self.process.communicate(timeout=60)
        stderr = "".join(self.lines) + rest
        assert self.process.returncode == 0, stderr
        return stderr


def stats_rows(data_dir, inode: int) -> list[dict]:
    return query_json(
        data_dir,
        f"SELECT * FROM collector_stats WHERE netns = {inode} ORDER BY last_seen",
    )


def test_stats_row_per_namespace_and_flush(namespace_pair, launch, tmp_path):
    pair = namespace_pair
    counts = {pair.a: 6, pair.b: 4}
    for name in counts:
        # A process keeps each namespace visible to --all-netns.
        launch("peers.py", "server", "--bind", "127.0.0.1", netns=name)
    # TIME_WAIT rows of connections that closed before collection started.
    connect_in(pair.a, 3, 0)

    collector = AllNetnsCollector(
        tmp_path, "--interval", "0.2", "--flush-interval", "1.5", "--duration", "4"
    )
    # Opening right after a flush keeps every open and its record in one period.
    collector.read_until("flushed")
    for name, count in counts.items():
        connect_in(name, count, 0.005)
    collector.wait()

    status = run_fastsock("status", "--data-dir", str(tmp_path)).stdout
    own = os.stat("/proc/self/ns/net").st_ino
    flush_times = {row["last_seen"] for row in stats_rows(tmp_path, own)}
    assert len(flush_times) >= 3
    for name, count in counts.items():
        rows = stats_rows(tmp_path, pair.inode(name))
        assert [row["last_seen"] for row in rows] == sorted(flush_times), name
        assert sum(row["tcp_active_opens"] for row in rows) == count, name
        assert sum(row["tcp_passive_opens"] for row in rows) == count, name
        assert sum(row["tcp_opens_recorded"] for row in rows) == 2 * count, name
        assert max(row["miss_rate"] or 0.0 for row in rows) == 0.0, name
        assert all(row["close_events"] for row in rows), name
        assert sum(row["events_received"] for row in rows) >= 2 * count, name
        assert all(row["attribution_misses"] is None for row in rows), name

        block = status.split(f"netns {pair.inode(name)} ")[1].split("\n\n")[0]
        assert "0.0% over" in block, status


def test_short_connection_in_namespace_recorded(namespace_pair, launch, tmp_path):
    pair = namespace_pair
    for name in (pair.a, pair.b):
        launch("peers.py", "server", "--bind", "127.0.0.1", netns=name)

    collector = AllNetnsCollector(tmp_path, "--interval", "2", "--duration", "3")
    ports = connect_in(pair.b, 1, 0.02)
    collector.wait()

    (client_port,) = ports["clients"]
    rows = query_json(
        tmp_path,
        f"SELECT * FROM connections WHERE local_addr = '127.0.0.1' AND "
        f"local_port IN ({client_port}, {ports['server']}) AND "
        f"remote_port IN ({client_port}, {ports['server']})",
    )

    assert len(rows) == 2
    for row in rows:
        assert row["detected_by"] == "close_event"
        assert row["netns"] == pair.inode(pair.b)
        assert row["closed"] is True


def test_listener_per_namespace_follows_scans(namespace_pair, launch):
    from fastsock.closelisten import CloseListener
    from fastsock.closes import CloseRecorder, NamespaceCloses
    from fastsock.lifetimes import LifetimeTracker
    from fastsock.netns import Namespace

    pair = namespace_pair
    server = launch("peers.py", "server", "--bind", "127.0.0.1", netns=pair.a)
    own_inode = os.stat("/proc/self/ns/net").st_ino
    own_namespace = Namespace(own_inode, None, "/proc")
    other = Namespace(pair.inode(pair.a), server.pid, f"/proc/{server.pid}")

    listener = CloseListener.subscribe(netns=own_inode)
    listener.start()
    closes = NamespaceCloses(CloseRecorder(listener, False, own_inode), "/proc")
    try:
        closes.follow([own_namespace, other])
        assert os.stat("/proc/thread-self/ns/net").st_ino == own_inode
        recorder = closes.recorders[other.inode]

        ports = connect_in(pair.a, 1, 0)
        deadline = time.monotonic() + 10
        while recorder.listener.received < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        events = recorder.listener.take().to_pylist()
        assert {event["local_port"] for event in events} >= {
            ports["server"], *ports["clients"]
        }

        closes.follow([own_namespace])
        closes.process(LifetimeTracker(), time.time_ns() // 1000)
        assert other.inode not in closes.recorders
        assert not recorder.listener._thread.is_alive()
    finally:
        closes.stop()


needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"
)
# setns(2) needs CAP_SYS_ADMIN; the own namespace's subscription does not.
DROP_SYS_ADMIN = ("setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin", "--")


@needs_setpriv
def test_failed_subscription_logged_once(namespace_pair, launch, tmp_path):
    pair = namespace_pair
    servers = {}
    for name in (pair.a, pair.b):
        servers[name] = launch("peers.py", "server", "--bind", "127.0.0.1", netns=name)

    collector = AllNetnsCollector(
        tmp_path, "--interval", "0.2", "--duration", "1.5",
        command_prefix=DROP_SYS_ADMIN,
    )
    stderr = collector.wait()

    for name, server in servers.items():
        inode = pair.inode(name)
        assert stderr.count(f"close events of network namespace {inode} are off") == 1
        (listener,) = query_json(
            tmp_path, f"SELECT netns FROM listeners WHERE pid = {server.pid}"
        )
        assert listener["netns"] == inode
        rows = stats_rows(tmp_path, inode)
        assert rows
        assert not any(row["close_events"] for row in rows)
