"""The flows table: fixture cases C18 and C19, live loopback edges, buckets."""

import pyarrow as pa
import pytest

from caseload import case_dir, expected
from fastsock import schema
from fastsock.flows import FlowAggregator, service_keys
from harness import query_json, run_fastsock
from proctree import build_proc_tree, load_processes

DIRECTIONS = {"passive": "inbound", "active": "outbound"}
FLOW_COLUMNS = "direction, pid, comm, local_addr, local_port, remote_addr, remote_port"


def collect_case(case: str, tmp_path, *extra: str):
    spec = load_processes(case_dir(case) / "proc_fd.json")
    net = {"tcp": (case_dir(case) / "tcp").read_text()}
    root = build_proc_tree(tmp_path / "proc", spec, net=net)
    data = tmp_path / "data"
    run_fastsock(
        "collect", "--once", "--proc-root", str(root), "--data-dir", str(data), *extra
    )
    return data


def endpoint(text: str) -> tuple[str, int | None]:
    """Split an expected.json endpoint; the port "many" is the NULL ephemeral port."""
    address, port = text.rsplit(":", 1)
    return address, None if port == "many" else int(port)


def expected_flow(entry: dict, with_process: bool = True) -> tuple:
    local, remote = endpoint(entry["local"]), endpoint(entry["peer"])
    flow = (DIRECTIONS[entry["direction"]], *local, *remote, entry["connections"])
    if with_process:
        flow += (entry["process"]["pid"], entry["process"]["comm"])
    return flow


def stored_flow(row: dict, with_process: bool = True) -> tuple:
    flow = (
        row["direction"],
        row["local_addr"],
        row["local_port"],
        row["remote_addr"],
        row["remote_port"],
        row["opened"],
    )
    if with_process:
        flow += (row["pid"], row["comm"])
    return flow


def test_c18_forked_listener_flows(tmp_path):
    data = collect_case("C18", tmp_path)
    rows = query_json(data, f"SELECT {FLOW_COLUMNS}, opened FROM flows")

    want = sorted(
        expected_flow(entry) for entry in expected("C18")["expected"]["flows"]
    )
    assert sorted(stored_flow(row) for row in rows) == want


def test_c19_reuseport_flows_per_process(tmp_path):
    data = collect_case("C19", tmp_path)
    rows = query_json(data, f"SELECT {FLOW_COLUMNS}, opened FROM flows")

    cases = expected("C19")["expected"]["flows_per_process"]
    assert sorted(stored_flow(row) for row in rows) == sorted(map(expected_flow, cases))


def test_c19_flows_per_host_by_sum(tmp_path):
    data = collect_case("C19", tmp_path)
    rows = query_json(
        data,
        "SELECT direction, local_addr, local_port, remote_addr, remote_port, "
        "sum(opened) AS opened FROM flows GROUP BY ALL",
    )

    cases = expected("C19")["expected"]["flows_per_host"]
    want = sorted(expected_flow(entry, with_process=False) for entry in cases)
    assert sorted(stored_flow(row, with_process=False) for row in rows) == want


def test_ephemeral_port_is_null_not_text(tmp_path):
    data = collect_case("C18", tmp_path)

    (outbound,) = query_json(
        data,
        "SELECT local_port, typeof(local_port) AS type FROM flows "
        "WHERE direction = 'outbound'",
    )
    assert outbound["local_port"] is None
    assert outbound["type"] == "INTEGER"


def test_c18_listener_stored_once(tmp_path):
    data = collect_case("C18", tmp_path)

    rows = query_json(data, "SELECT pids FROM listeners")
    assert [sorted(row["pids"]) for row in rows] == [[8111, 8152, 8153, 8154]]


def test_live_edges_and_service(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-f-srv")
    client = peers(
        "client",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        "--count",
        "3",
        "--name",
        "fs-f-cli",
    )

    run_fastsock(
        "collect",
        "--quiet",
        "--no-close-events",
        "--interval",
        "0.1",
        "--duration",
        "0.6",
        "--data-dir",
        str(tmp_path),
    )
    rows = query_json(tmp_path, "SELECT * FROM flows WHERE comm LIKE 'fs-f-%'")
    by_pid = {row["pid"]: row for row in rows}

    assert len(rows) == 2
    inbound, outbound = by_pid[server.pid], by_pid[client.pid]
    assert inbound["direction"] == "inbound"
    assert inbound["local_port"] == server.info["port"]
    assert inbound["remote_port"] is None
    assert outbound["direction"] == "outbound"
    assert outbound["local_port"] is None
    assert outbound["remote_port"] == server.info["port"]
    for row in rows:
        assert row["opened"] == 3
        assert row["max_concurrent"] == 3
        assert row["bucket_seconds"] == 60
        assert row["service"].startswith(row["exe"] + " ")
        assert "peers.py" in row["service"]


def test_bucket_option_splits_long_connection(peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-f-bsrv")
    client = peers(
        "client",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        "--name",
        "fs-f-bcli",
    )

    run_fastsock(
        "collect",
        "--quiet",
        "--no-close-events",
        "--interval",
        "0.2",
        "--duration",
        "2.5",
        "--flush-interval",
        "0.5",
        "--bucket",
        "1",
        "--data-dir",
        str(tmp_path),
    )
    rows = query_json(
        tmp_path,
        f"SELECT bucket_start, opened, max_concurrent, bucket_seconds, first_seen, "
        f"last_seen FROM flows WHERE pid = {client.pid} ORDER BY bucket_start",
    )

    assert len(rows) >= 2
    assert sum(row["opened"] for row in rows) == 1
    assert {row["max_concurrent"] for row in rows} == {1}
    assert {row["bucket_seconds"] for row in rows} == {1}
    assert len({row["bucket_start"] for row in rows}) == len(rows)
    for row in rows:
        assert row["bucket_start"] <= row["first_seen"] <= row["last_seen"]


def test_bucket_not_dividing_hour_rejected(tmp_path):
    result = run_fastsock(
        "collect", "--once", "--bucket", "7", "--data-dir", str(tmp_path), check=False
    )

    assert result.returncode == 2
    assert "divisor of 3600" in result.stderr
    assert "Traceback" not in result.stderr


# FlowAggregator on connection records built in memory.

SECOND = 1_000_000
BASE = 1_700_000_040 * SECOND  # a multiple of 60 s


def connection_records(rows: list[dict]) -> pa.Table:
    """Build connections records; each row gives conn_id, first, last, closed."""
    defaults = {
        "host": "h",
        "netns": 1,
        "protocol": "tcp",
        "direction": "outbound",
        "local_addr": "10.0.0.1",
        "remote_addr": "10.0.0.2",
        "remote_port": 443,
        "pid": 7,
        "comm": "cli",
        "exe": "/usr/bin/cli",
        "cmdline": "cli -v",
        "uid": 1000,
        "detected_by": "live",
    }
    columns = {field.name: [] for field in schema.CONNECTIONS}
    for number, row in enumerate(rows):
        full = {**defaults, "local_port": 40000 + number, **row}
        full["first_seen"] = full.pop("first")
        full["last_seen"] = full.pop("last")
        for name in columns:
            columns[name].append(full.get(name))
    arrays = [
        pa.array(columns[field.name], pa.int64()).cast(field.type)
        if field.type == schema.TIMESTAMP
        else pa.array(columns[field.name], field.type)
        for field in schema.CONNECTIONS
    ]
    return pa.Table.from_arrays(arrays, schema=schema.CONNECTIONS)


def test_aggregator_max_concurrent_and_opened():
    aggregator = FlowAggregator(60)
    records = connection_records(
        [
            {
                "conn_id": 1,
                "first": BASE + 1 * SECOND,
                "last": BASE + 10 * SECOND,
                "closed": True,
            },
            {
                "conn_id": 2,
                "first": BASE + 5 * SECOND,
                "last": BASE + 20 * SECOND,
                "closed": True,
            },
            # Opens just after conn 1 was last seen: never open at the same time.
            {
                "conn_id": 3,
                "first": BASE + 10 * SECOND + 1,
                "last": BASE + 30 * SECOND,
                "closed": True,
            },
        ]
    )

    (flow,) = aggregator.update(records, BASE + 30 * SECOND).to_pylist()

    assert flow["opened"] == 3
    assert flow["max_concurrent"] == 2
    assert flow["local_port"] is None
    assert flow["remote_port"] == 443
    assert flow["service"] == "/usr/bin/cli cli -v"


def test_aggregator_rewrites_open_bucket_only_when_changed():
    aggregator = FlowAggregator(60)
    open_record = {"conn_id": 1, "first": BASE + 1 * SECOND, "closed": False}

    first = aggregator.update(
        connection_records([{**open_record, "last": BASE + 5 * SECOND}]),
        BASE + 5 * SECOND,
    )
    unchanged = aggregator.update(
        connection_records([{**open_record, "last": BASE + 5 * SECOND}]),
        BASE + 5 * SECOND,
    )
    later = aggregator.update(
        connection_records([{**open_record, "last": BASE + 65 * SECOND}]),
        BASE + 65 * SECOND,
    )

    assert first.num_rows == 1
    assert unchanged.num_rows == 0
    by_bucket = {row["bucket_start"].timestamp(): row for row in later.to_pylist()}
    assert sorted(by_bucket) == [BASE // SECOND, BASE // SECOND + 60]
    assert by_bucket[BASE // SECOND]["opened"] == 1
    assert by_bucket[BASE // SECOND + 60]["opened"] == 0
    assert by_bucket[BASE // SECOND + 60]["max_concurrent"] == 1
    assert later.column("flow_id")[0] == first.column("flow_id")[0]


def test_aggregator_detection_counts_once():
    aggregator = FlowAggregator(60)
    records = connection_records(
        [
            {
                "conn_id": 9,
                "first": BASE + 2 * SECOND,
                "last": BASE + 2 * SECOND,
                "closed": True,
                "detected_by": "time_wait",
                "pid": None,
                "comm": None,
                "exe": None,
                "cmdline": None,
                "uid": None,
            },
        ]
    )

    (flow,) = aggregator.update(records, BASE + 3 * SECOND).to_pylist()

    assert flow["opened"] == 1
    assert flow["max_concurrent"] == 1
    assert flow["service"] is None


@pytest.mark.parametrize("seconds", [0, 7, 7200])
def test_aggregator_rejects_bucket(seconds):
    with pytest.raises(ValueError, match=f"invalid flow bucket width {seconds}"):
        FlowAggregator(seconds)


def test_service_key_fallbacks():
    keys = service_keys(
        pa.array(["/bin/a", None, None, None]),
        pa.array(["a -x", "b -y", None, None]),
        pa.array(["a", "b", "c", None]),
    )

    assert keys.to_pylist() == ["/bin/a a -x", "b -y", "c", None]


def test_schema_doc_lists_flows_columns():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "schema.md").read_text()
    flows_section = text.split("\n## flows\n")[1].split("\n## ")[0]

    for field in schema.FLOWS:
        assert f"\n| {field.name} |" in flows_section, field.name
    assert "\n| direction | string |" in text.split("\n## flows\n")[0]
