"""`fastsock deps` on a small real topology: web -> api -> db on loopback."""

import json
import subprocess
from datetime import datetime, timedelta, timezone

import pyarrow.dataset as ds
import pytest

from fastsock.deps import (
    InvalidTimeError,
    UnknownTargetError,
    build_graph,
    dependency_tree,
    deps,
    parse_endpoint,
    parse_time,
)
from fastsock.depsformat import render
from harness import run_fastsock
from special_peers import Process, launch, unused_port  # noqa: F401 (a fixture)
from test_netns import namespace_pair, run_in_namespace  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """Start db, api (a relay to db) and web (two clients of api); collect once.

    db and api listen below the ephemeral range, so that the connections of
    earlier tests cannot share their ports.
    """
    started = []
    try:
        db = Process(
            "peers.py",
            "server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(unused_port()),
            "--name",
            "fs-dp-db",
        )
        started.append(db)
        api = Process(
            "special_peers.py",
            "relay",
            "--port",
            str(unused_port()),
            "--connect",
            "127.0.0.1",
            str(db.info["port"]),
            "--name",
            "fs-dp-api",
        )
        started.append(api)
        web = Process(
            "peers.py",
            "client",
            "--connect",
            "127.0.0.1",
            str(api.info["port"]),
            "--count",
            "2",
            "--name",
            "fs-dp-web",
        )
        started.append(web)

        data = tmp_path_factory.mktemp("deps")
        run_fastsock("collect", "--once", "--data-dir", str(data))
        yield data, {"db": db, "api": api, "web": web}
    finally:
        for process in reversed(started):
            process.stop()


def deps_output(data, *args: str) -> str:
    return run_fastsock("deps", "--data-dir", str(data), *args).stdout


def test_tree_shows_both_directions(topology):
    data, peers = topology

    text = deps_output(data, "fs-dp-api")
    lines = text.splitlines()

    assert lines[0] == f"fs-dp-api (pid {peers['api'].pid})"
    (inbound,) = [line for line in lines if "<--" in line]
    assert f"fs-dp-web (pid {peers['web'].pid})" in inbound
    assert f"to 127.0.0.1:{peers['api'].info['port']}/tcp" in inbound
    assert "2 connections" in inbound
    (outbound,) = [line for line in lines if "-->" in line]
    assert f"fs-dp-db (pid {peers['db'].pid})" in outbound
    assert f"at 127.0.0.1:{peers['db'].info['port']}/tcp" in outbound
    assert "1 connection," in outbound


def test_depth_follows_chain(topology):
    data, _ = topology

    two = deps_output(data, "fs-dp-web", "--direction", "out", "--depth", "2")
    one = deps_output(data, "fs-dp-web", "--direction", "out", "--depth", "1")

    assert "fs-dp-api" in two
    assert "fs-dp-db" in two
    assert "fs-dp-api" in one
    assert "fs-dp-db" not in one
    assert "<--" not in two


def test_inbound_chain_reaches_client(topology):
    data, _ = topology

    text = deps_output(data, "fs-dp-db", "--direction", "in", "--depth", "2")

    assert [
        line.split("<-- ")[1].split(" ")[0]
        for line in text.splitlines()
        if "<--" in line
    ] == ["fs-dp-api", "fs-dp-web"]


def test_json_format(topology):
    data, peers = topology

    document = json.loads(deps_output(data, "fs-dp-api", "--format", "json"))

    (root,) = document["roots"]
    assert root["node"]["comm"] == "fs-dp-api"
    assert root["node"]["pids"] == [peers["api"].pid]
    (inbound,) = root["inbound"]
    assert inbound["peer"]["node"]["comm"] == "fs-dp-web"
    assert inbound["edge"]["connections"] == 2
    assert inbound["edge"]["server_port"] == peers["api"].info["port"]
    (outbound,) = root["outbound"]
    assert outbound["peer"]["node"]["comm"] == "fs-dp-db"
    assert outbound["edge"]["server_port"] == peers["db"].info["port"]
    assert document["depth"] == 2
    assert document["direction"] == "both"


def test_dot_format(topology):
    data, peers = topology

    text = deps_output(data, "fs-dp-web", "--format", "dot", "--direction", "out")
    labels = dict(
        (line.split()[0], line.split('label="')[1].split(" (")[0])
        for line in text.splitlines()
        if "[label=" in line and "->" not in line
    )
    edges = [
        (line.split()[0], line.split()[2])
        for line in text.splitlines()
        if " -> " in line
    ]

    assert text.startswith("digraph dependencies {")
    assert text.rstrip().endswith("}")
    assert sorted((labels[client], labels[server]) for client, server in edges) == [
        ("fs-dp-api", "fs-dp-db"),
        ("fs-dp-web", "fs-dp-api"),
    ]
    assert f"127.0.0.1:{peers['api'].info['port']}: 2 conn." in text


def test_mermaid_format(topology):
    data, _ = topology

    text = deps_output(data, "fs-dp-db", "--format", "mermaid", "--direction", "in")
    lines = text.splitlines()

    assert lines[0] == "flowchart LR"
    assert sum("-->|" in line for line in lines) == 2
    assert any('"fs-dp-db (pid' in line for line in lines)


def test_targets_by_pid_and_endpoint(topology):
    data, peers = topology
    api_port = peers["api"].info["port"]

    by_pid = deps_output(data, str(peers["api"].pid), "--depth", "1")
    by_endpoint = deps_output(data, f"127.0.0.1:{api_port}", "--depth", "1")

    assert by_pid.splitlines()[0].startswith("fs-dp-api")
    assert by_endpoint == by_pid


def test_address_target_includes_service(topology):
    data, _ = topology

    text = deps_output(data, "127.0.0.1", "--depth", "1")

    roots = [line for line in text.splitlines() if line and line[0] not in "│├└ "]
    assert any(root.startswith("fs-dp-api") for root in roots)


def test_unknown_target_lists_close_matches(topology):
    data, _ = topology

    result = run_fastsock("deps", "--data-dir", str(data), "fs-dp-apx", check=False)

    assert result.returncode == 2
    assert "close matches: " in result.stderr
    assert "fs-dp-api" in result.stderr.split("close matches: ")[1]
    assert "Traceback" not in result.stderr


def test_window_options(topology):
    data, _ = topology
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()

    recent = deps_output(data, "fs-dp-api", "--since", "1h")
    empty = run_fastsock(
        "deps", "--data-dir", str(data), "--since", future, check=False
    )
    invalid = run_fastsock(
        "deps", "--data-dir", str(data), "--since", "yesterday", check=False
    )

    assert "fs-dp-web" in recent
    assert empty.returncode == 1
    assert "no flows" in empty.stderr
    assert invalid.returncode == 2
    assert "invalid time 'yesterday'" in invalid.stderr


def test_library_on_arrow_tables(topology):
    data, _ = topology
    flows = ds.dataset(data / "flows", format="parquet", partitioning="hive").to_table()
    listeners = ds.dataset(
        data / "listeners", format="parquet", partitioning="hive"
    ).to_table()

    graph = build_graph(flows, listeners)
    from_tables = dependency_tree(graph, "fs-dp-api", depth=1)
    from_data_dir = deps(data, "fs-dp-api", depth=1)

    assert render(from_tables, "json") == render(from_data_dir, "json")
    with pytest.raises(UnknownTargetError, match="fs-dp-api"):
        dependency_tree(graph, "fs-dp-apj")
    with pytest.raises(UnknownTargetError, match="invalid port 99999"):
        dependency_tree(graph, "127.0.0.1:99999")


def test_clients_sharing_address_keep_counts(peers, tmp_path):
    server = peers("server", "--port", str(unused_port()), "--name", "fs-dp-shared")
    port = str(server.info["port"])
    peers(
        "client", "--connect", "127.0.0.1", port, "--count", "2", "--name", "fs-dp-two"
    )
    peers(
        "client",
        "--connect",
        "127.0.0.1",
        port,
        "--count",
        "3",
        "--name",
        "fs-dp-three",
    )
    run_fastsock("collect", "--once", "--data-dir", str(tmp_path))

    document = json.loads(deps_output(tmp_path, "fs-dp-shared", "--format", "json"))

    (root,) = document["roots"]
    counts = {
        branch["peer"]["node"]["comm"]: branch["edge"]["connections"]
        for branch in root["inbound"]
    }
    assert counts == {"fs-dp-two": 2, "fs-dp-three": 3}


def test_parse_time_forms():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

    assert parse_time("45s", now) == now - timedelta(seconds=45)
    assert parse_time("30m", now) == now - timedelta(minutes=30)
    assert parse_time("1h", now) == now - timedelta(hours=1)
    assert parse_time("2d", now) == now - timedelta(days=2)
    assert parse_time("2024-05-01T10:00:00", now) == now - timedelta(hours=2)
    assert parse_time("2024-05-01T10:00:00+02:00", now) == now - timedelta(hours=4)
    with pytest.raises(InvalidTimeError, match="ISO timestamp"):
        parse_time("10 minutes ago", now)


def test_parse_endpoint_forms():
    assert parse_endpoint("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_endpoint("[::1]:8080") == ("::1", 8080)
    assert parse_endpoint("::1") is None
    assert parse_endpoint("nginx:80") is None


def test_two_hosts_in_one_data_dir(namespace_pair, launch, tmp_path):  # noqa: F811
    pair = namespace_pair
    db = launch(
        "peers.py", "server", "--bind", "127.0.0.1", "--name", "fs-mh-db", netns=pair.a
    )
    api = launch(
        "special_peers.py",
        "relay",
        "--bind",
        "0.0.0.0",
        "--connect",
        "127.0.0.1",
        str(db.info["port"]),
        "--name",
        "fs-mh-api",
        netns=pair.a,
    )
    launch(
        "peers.py",
        "client",
        "--connect",
        pair.address_a,
        str(api.info["port"]),
        "--count",
        "3",
        "--name",
        "fs-mh-web",
        netns=pair.b,
    )

    collectors = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                *run_prefix(),
                "collect",
                "--quiet",
                "--no-close-events",
                "--node-name",
                host,
                "--interval",
                "0.2",
                "--duration",
                "0.6",
                "--data-dir",
                str(tmp_path),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, host in ((pair.a, "host-a"), (pair.b, "host-b"))
    ]
    for collector in collectors:
        _, stderr = collector.communicate(timeout=60)
        assert collector.returncode == 0, stderr

    down = run_in_namespace(
        pair.b, "deps", "fs-mh-web", "--direction", "out", "--data-dir", str(tmp_path)
    ).stdout
    up = run_in_namespace(
        pair.a, "deps", "fs-mh-db", "--direction", "in", "--data-dir", str(tmp_path)
    ).stdout

    assert down.splitlines()[0].endswith(" on host-b")
    assert "--> fs-mh-api (pid" in down
    assert "on host-a" in down
    assert f"at {pair.address_a}:{api.info['port']}/tcp, 3 connections" in down
    assert "--> fs-mh-db" in down
    assert "<-- fs-mh-api" in up
    assert "<-- fs-mh-web" in up
    assert "on host-b" in up


def run_prefix() -> list[str]:
    import sys

    return [sys.executable, "-m", "fastsock"]


def flow_rows(rows: list[dict]):
    """Build a flows table from partial rows, with the other columns NULL."""
    import pyarrow as pa

    from fastsock import schema

    seen = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    defaults = {
        "host": "h",
        "netns": 1,
        "protocol": "tcp",
        "opened": 1,
        "max_concurrent": 1,
        "first_seen": seen,
        "last_seen": seen,
        "bucket_start": seen,
        "bucket_seconds": 60,
    }
    full = [{**defaults, **row} for row in rows]
    return pa.Table.from_pylist(full, schema=schema.FLOWS)


def test_cycle_marked_not_expanded():
    def process(comm, pid):
        return {"comm": comm, "pid": pid, "service": f"/bin/{comm}"}

    flows = flow_rows(
        [
            {
                **process("alpha", 1),
                "direction": "outbound",
                "local_addr": "127.0.0.1",
                "remote_addr": "127.0.0.1",
                "remote_port": 2000,
            },
            {
                **process("beta", 2),
                "direction": "inbound",
                "local_addr": "127.0.0.1",
                "local_port": 2000,
                "remote_addr": "127.0.0.1",
            },
            {
                **process("beta", 2),
                "direction": "outbound",
                "local_addr": "127.0.0.1",
                "remote_addr": "127.0.0.1",
                "remote_port": 1000,
            },
            {
                **process("alpha", 1),
                "direction": "inbound",
                "local_addr": "127.0.0.1",
                "local_port": 1000,
                "remote_addr": "127.0.0.1",
            },
        ]
    )

    tree = dependency_tree(build_graph(flows), "alpha", depth=5, direction="out")
    lines = render(tree, "tree").splitlines()

    assert lines[0] == "alpha (pid 1)"
    assert "--> beta (pid 2)" in lines[1]
    assert "--> alpha (pid 1)" in lines[2]
    assert lines[2].endswith("(cycle, shown above)")
    assert len(lines) == 3


def test_unknown_direction_listed():
    flows = flow_rows(
        [
            {
                "comm": "odd",
                "pid": 5,
                "service": "/bin/odd",
                "direction": "unknown",
                "local_addr": "10.0.0.1",
                "local_port": 8000,
                "remote_addr": "10.0.0.2",
                "remote_port": 9000,
                "opened": 4,
            },
        ]
    )

    text = render(dependency_tree(build_graph(flows), "odd"), "tree")

    assert "--- direction unknown: 10.0.0.1:8000 and 10.0.0.2:9000/tcp" in text
    assert "4 connections" in text


def test_external_server_is_address_node():
    flows = flow_rows(
        [
            {
                "comm": "app",
                "pid": 5,
                "service": "/bin/app",
                "direction": "outbound",
                "local_addr": "10.0.0.1",
                "remote_addr": "203.0.113.9",
                "remote_port": 5432,
                "opened": 7,
            },
        ]
    )
    graph = build_graph(flows)

    text = render(dependency_tree(graph, "app"), "tree")
    clients = render(dependency_tree(graph, "203.0.113.9:5432"), "tree")

    assert "--> 203.0.113.9:5432 (not in the data)" in text
    assert "7 connections" in text
    assert clients.startswith("203.0.113.9:5432 (not in the data)")
    assert "<-- app (pid 5)" in clients


def test_connections_without_process_stay_apart():
    """Unattributed ends are leaves named by endpoint, never one shared node."""
    web = {"comm": "web", "pid": 1, "service": "/bin/web"}
    db = {"comm": "db", "pid": 3, "service": "/bin/db"}
    flows = flow_rows(
        [
            {**web, "direction": "outbound", "local_addr": "127.0.0.1",
             "remote_addr": "127.0.0.1", "remote_port": 9502},
            {"direction": "inbound", "local_addr": "127.0.0.1", "local_port": 9502,
             "remote_addr": "127.0.0.1"},
            {"direction": "outbound", "local_addr": "127.0.0.1",
             "remote_addr": "127.0.0.1", "remote_port": 9503},
            {**db, "direction": "inbound", "local_addr": "127.0.0.1", "local_port": 9503,
             "remote_addr": "127.0.0.1"},
        ]
    )
    graph = build_graph(flows)

    text = render(dependency_tree(graph, "web", depth=5, direction="out"), "tree")
    dot = render(dependency_tree(graph, "web", depth=5, direction="out"), "dot")

    assert "--> (no process) at 127.0.0.1:9502" in text
    assert "db" not in text
    assert "cycle" not in text
    assert "n0 -> n0" not in dot


def test_parse_time_rejects_out_of_range_and_empty():
    from fastsock.timespec import InvalidTimeError

    with pytest.raises(InvalidTimeError, match="99999999d"):
        parse_time("99999999d")
    with pytest.raises(InvalidTimeError):
        parse_time("")


def test_inverted_window_rejected(topology):
    data, _ = topology

    result = run_fastsock("deps", "--since", "1h", "--until", "2h",
                          "--data-dir", str(data), check=False)

    assert result.returncode == 2
    assert "swap them" in result.stderr


def test_server_without_process_not_a_second_server():
    web = {"comm": "web", "pid": 1, "service": "/bin/web"}
    srv = {"comm": "srv", "pid": 2, "service": "/bin/srv"}
    flows = flow_rows(
        [
            {**web, "direction": "outbound", "local_addr": "127.0.0.1",
             "remote_addr": "127.0.0.1", "remote_port": 18080, "opened": 3},
            {**srv, "direction": "inbound", "local_addr": "127.0.0.1",
             "local_port": 18080, "remote_addr": "127.0.0.1", "opened": 3},
            {"direction": "inbound", "local_addr": "127.0.0.1", "local_port": 18080,
             "remote_addr": "127.0.0.1", "opened": 1},
        ]
    )

    text = render(dependency_tree(build_graph(flows), "web", direction="out"), "tree")

    assert "--> srv (pid 2)" in text
    assert "(no process)" not in text
