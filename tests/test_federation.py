"""Federated queries over Arrow Flight: pushdown, recursion, security, real hosts.

Most tests run in-process Flight servers on loopback ports over synthetic
Parquet data, with a peers map that sends each node's 127.0.1.x address to
its server. The last tests build real hosts as network namespaces (root and
the ip command needed) and run `fastsock agent` in each.
"""

import json
import logging
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from fastsock.agent import check_listen
from fastsock.auth import Credentials, load_token, token_problem
from fastsock.discovery import local_addresses, peer_addresses
from fastsock.endpoints import (
    DEFAULT_AGENT_PORT,
    Endpoint,
    load_peers_map,
    parse_endpoint,
)
from fastsock.errors import NoDataError, QueryError
from fastsock.federated_query import (
    FederationOptions,
    federated_table,
    query_agent,
    run_federated_query,
)
from fastsock.federation import AnswerRegistry, NodeSettings, PullAnswer, PullRequest
from fastsock.federation_errors import AuthError, FederationError, EndpointError
from fastsock.flight_client import FlightAgentError, describe, stream
from fastsock.flight_server import AgentServer
from fastsock.node import node_identity
from fastsock.pushdown import plan_tables, validate_select
from fastsock.query import open_database, run_query
from fastsock.reports import summary_lines
from fastsock.schema import TABLES
from fastsock.store import ParquetStore
from harness import run_fastsock
from netns_hosts import Network, skip_reason

NOW = datetime.now(timezone.utc).replace(microsecond=0)
LONG_AGO = NOW - timedelta(hours=3)
TOKEN = "fleet-token-0123456789abcdef"
SERVICE_PORT = 8080

# web calls app, app calls db and cache, cache calls app (a cycle), db calls
# old, whose agent is not running.
EDGES = {"web": ["app"], "app": ["db", "cache"], "cache": ["app"], "db": ["old"]}
NAMES = ["web", "app", "db", "cache", "old"]
ADDRESSES = {name: f"127.0.1.{index + 1}" for index, name in enumerate(NAMES)}


# -- synthetic data -----------------------------------------------------------


def make_rows(table_name: str, rows: list[dict]) -> pa.Table:
    schema, _key = TABLES[table_name]
    return pa.Table.from_pylist(rows, schema=schema)


def connection(host, conn_id, local, remote, comm, last_seen=NOW, **columns) -> dict:
    return {
        "host": host,
        "conn_id": conn_id,
        "protocol": "tcp",
        "family": "inet",
        "local_addr": local[0],
        "local_port": local[1],
        "remote_addr": remote[0],
        "remote_port": remote[1],
        "state": "ESTABLISHED",
        "pid": 100 + conn_id % 7,
        "comm": comm,
        "first_seen": last_seen - timedelta(seconds=30),
        "last_seen": last_seen,
        "closed": False,
        **columns,
    }


def write_node_data(data_dir: Path, name: str, edges: dict, addresses: dict) -> None:
    """Store each node's connections: one out per edge, one in per caller, one old."""
    callers = defaultdict(list)
    for source, targets in edges.items():
        for target in targets:
            callers[target].append(source)

    index = NAMES.index(name) if name in NAMES else 90
    address = addresses[name]
    rows = []
    for number, target in enumerate(edges.get(name, [])):
        local = (address, 40000 + number)
        remote = (addresses[target], SERVICE_PORT)
        rows.append(
            connection(name, index * 100 + number, local, remote, f"{name}-cli")
        )
    for number, caller in enumerate(callers[name]):
        local = (address, SERVICE_PORT)
        remote = (addresses[caller], 41000 + number)
        rows.append(
            connection(name, index * 100 + 50 + number, local, remote, f"{name}-srv")
        )
    old = connection(
        name,
        index * 100 + 99,
        (address, 42000),
        ("127.0.9.9", 9999),
        f"{name}-old",
        last_seen=LONG_AGO,
    )
    rows.append(old)

    listener = {
        "host": name,
        "listener_id": index,
        "protocol": "tcp",
        "local_addr": address,
        "local_port": SERVICE_PORT,
        "remote_addr": "0.0.0.0",
        "remote_port": 0,
        "state": "LISTEN",
        "comm": f"{name}-srv",
        "last_seen": NOW,
    }
    store = ParquetStore(data_dir)
    store.write("connections", make_rows("connections", rows))
    store.write("listeners", make_rows("listeners", [listener]))


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackFleet:
    """In-process agents on loopback ports, one data directory each."""

    def __init__(self, root: Path, edges=EDGES, down=("old",), token=None, **limits):
        self.servers: dict[str, AgentServer] = {}
        self.peers: dict[str, str] = {}
        names = sorted({*edges, *(t for targets in edges.values() for t in targets)})
        for name in names:
            data_dir = root / name
            write_node_data(data_dir, name, edges, ADDRESSES)
            if name in down:
                self.peers[ADDRESSES[name]] = f"127.0.0.1:{closed_port()}"
                continue
            settings = NodeSettings(
                identity=node_identity(data_dir, name),
                data_dir=data_dir,
                credentials=Credentials(token),
                **limits,
            )
            server = AgentServer(settings, Endpoint("127.0.0.1", 0), token)
            self.servers[name] = server
            self.peers[ADDRESSES[name]] = f"127.0.0.1:{server.port}"

    def endpoint(self, name: str) -> Endpoint:
        return self.servers[name].endpoint

    def node(self, name: str) -> NodeSettings:
        return self.servers[name].node

    def options(self, **overrides) -> FederationOptions:
        return FederationOptions(peers=self.peers, **{"timeout": 10.0, **overrides})

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()


@pytest.fixture
def fleet(tmp_path):
    fleet = LoopbackFleet(tmp_path)
    yield fleet
    fleet.close()


def nodes_by_name(reports) -> dict:
    return {report.node: report for report in reports if report.node}


def missed(reports) -> list:
    return [report for report in reports if not report.reached]


# -- node identity ------------------------------------------------------------


def test_node_id_ignores_name_and_depends_on_dir(tmp_path):
    first = node_identity(tmp_path / "a", "one")
    renamed = node_identity(tmp_path / "a", "two")
    other_dir = node_identity(tmp_path / "b", "one")

    assert first.node_id == renamed.node_id
    assert first.node_id != other_dir.node_id
    assert len(first.node_id) == 32


def test_node_id_follows_symlinked_dir(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")

    assert (
        node_identity(tmp_path / "link").node_id
        == node_identity(tmp_path / "real").node_id
    )


def test_node_id_generated_without_machine_id(tmp_path):
    missing = (tmp_path / "no-machine-id",)
    data_dir = tmp_path / "data"

    first = node_identity(data_dir, machine_id_files=missing)
    second = node_identity(data_dir, machine_id_files=missing)

    assert (data_dir / "node-id").read_text().strip()
    assert first.node_id == second.node_id


def test_node_id_uses_machine_id(tmp_path):
    machine_a = tmp_path / "machine-a"
    machine_b = tmp_path / "machine-b"
    machine_a.write_text("aaaa\n")
    machine_b.write_text("bbbb\n")

    on_a = node_identity(tmp_path / "d", machine_id_files=(machine_a,))
    on_b = node_identity(tmp_path / "d", machine_id_files=(machine_b,))

    assert on_a.node_id != on_b.node_id
    assert not (tmp_path / "d" / "node-id").exists()


# -- endpoints, peers map, tokens ---------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.5", Endpoint("10.0.0.5", DEFAULT_AGENT_PORT)),
        ("10.0.0.5:9000", Endpoint("10.0.0.5", 9000)),
        ("[::1]:9000", Endpoint("::1", 9000)),
        ("::1", Endpoint("::1", DEFAULT_AGENT_PORT)),
        ("grpc+tls://gw.internal:7500", Endpoint("gw.internal", 7500, True)),
        ("grpc+tcp://gw.internal", Endpoint("gw.internal", DEFAULT_AGENT_PORT)),
    ],
)
def test_parse_endpoint(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["http://x:1", "10.0.0.5:port", "::1::2"])
def test_parse_endpoint_rejects(text):
    with pytest.raises(EndpointError, match="invalid endpoint"):
        parse_endpoint(text)


def test_peers_map_json_and_toml(tmp_path):
    as_json = tmp_path / "peers.json"
    as_json.write_text(
        json.dumps({"peers": {"10.0.0.5": "gw:7500", "::ffff:10.0.0.6": "10.0.0.6:1"}})
    )
    as_toml = tmp_path / "peers.toml"
    as_toml.write_text('"10.0.0.5" = "gw:7500"\n"10.0.0.6" = "10.0.0.6:1"\n')

    expected = {"10.0.0.5": "gw:7500", "10.0.0.6": "10.0.0.6:1"}
    assert load_peers_map(as_json) == expected
    assert load_peers_map(as_toml) == expected


def test_peers_map_rejects_bad_entry(tmp_path):
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"not-an-address": "gw:7500"}))

    with pytest.raises(EndpointError, match="not-an-address"):
        load_peers_map(path)


def test_token_check():
    header = {"authorization": [f"Bearer {TOKEN}"]}

    assert token_problem(None, {}) is None
    assert token_problem(TOKEN, header) is None
    assert token_problem(TOKEN, {}) == "the request carried no token"
    wrong = {"authorization": ["Bearer " + "x" * len(TOKEN)]}
    assert token_problem(TOKEN, wrong) == "the request carried a wrong token"


def test_short_token_rejected(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text("short\n")
    monkeypatch.setenv("FASTSOCK_TOKEN", TOKEN)

    with pytest.raises(AuthError, match="has 5 characters"):
        load_token(path)
    assert load_token(None) == TOKEN


def test_credentials_repr_hides_token():
    assert TOKEN not in repr(Credentials(TOKEN))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "agent.example"])
def test_non_loopback_listen_needs_token(host):
    with pytest.raises(EndpointError, match="without a token"):
        check_listen(Endpoint(host, DEFAULT_AGENT_PORT), None, tls=False)
    check_listen(Endpoint(host, DEFAULT_AGENT_PORT), TOKEN, tls=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "localhost"])
def test_loopback_listen_needs_no_token(host):
    check_listen(Endpoint(host, DEFAULT_AGENT_PORT), None, tls=False)


# -- peer discovery -----------------------------------------------------------


def test_peers_from_listener_ports(tmp_path):
    write_node_data(tmp_path, "app", EDGES, ADDRESSES)
    database = open_database(tmp_path, sandboxed=True)
    mapped = frozenset(ADDRESSES.values())

    downstream = peer_addresses(database, "downstream", mapped=mapped)
    upstream = peer_addresses(database, "upstream", mapped=mapped)
    both = peer_addresses(database, "both", mapped=mapped)

    assert downstream == sorted([ADDRESSES["db"], ADDRESSES["cache"]])
    assert upstream == sorted([ADDRESSES["web"], ADDRESSES["cache"]])
    assert both == sorted(set(downstream) | set(upstream))


def test_peers_skip_unmapped_loopback(tmp_path):
    write_node_data(tmp_path, "app", EDGES, ADDRESSES)
    database = open_database(tmp_path, sandboxed=True)

    assert peer_addresses(database, "both") == []
    assert local_addresses(database) == []


def test_peers_skip_loopback_and_agent_port(tmp_path):
    rows = [
        connection("n", 1, ("10.0.0.1", 40000), ("10.0.0.2", 80), "cli"),
        connection(
            "n", 2, ("10.0.0.1", 40001), ("10.0.0.3", DEFAULT_AGENT_PORT), "fastsock"
        ),
        connection("n", 3, ("127.0.0.1", 40002), ("127.0.0.53", 53), "cli"),
        connection("n", 4, ("10.0.0.1", 40003), ("10.0.0.1", 22), "self"),
    ]
    ParquetStore(tmp_path).write("connections", make_rows("connections", rows))
    database = open_database(tmp_path, sandboxed=True)

    peers = peer_addresses(database, "downstream", exclude_ports={DEFAULT_AGENT_PORT})

    assert peers == ["10.0.0.2"]


def test_peers_from_direction_column(tmp_path):
    if "direction" not in TABLES["connections"][0].names:
        pytest.skip("connections has no direction column in this version")
    rows = [
        connection(
            "n", 1, ("10.0.0.1", 40000), ("10.0.0.2", 80), "cli", direction="outbound"
        ),
        connection(
            "n", 2, ("10.0.0.1", 80), ("10.0.0.3", 5000), "srv", direction="inbound"
        ),
    ]
    ParquetStore(tmp_path).write("connections", make_rows("connections", rows))
    database = open_database(tmp_path, sandboxed=True)

    assert peer_addresses(database, "downstream") == ["10.0.0.2"]
    assert peer_addresses(database, "upstream") == ["10.0.0.3"]
    assert peer_addresses(database, "both") == ["10.0.0.2", "10.0.0.3"]


def test_peers_from_flows_table(tmp_path):
    if "flows" not in TABLES:
        pytest.skip("no flows table in this version")
    flow = {
        "host": "n",
        "flow_id": 1,
        "direction": "outbound",
        "protocol": "tcp",
        "local_addr": "10.0.0.1",
        "remote_addr": "10.0.0.7",
        "remote_port": 5432,
        "last_seen": NOW,
    }
    ParquetStore(tmp_path).write("flows", make_rows("flows", [flow]))
    rows = [connection("n", 1, ("10.0.0.1", 40000), ("10.0.0.2", 80), "cli")]
    ParquetStore(tmp_path).write("connections", make_rows("connections", rows))
    database = open_database(tmp_path, sandboxed=True)

    assert peer_addresses(database, "downstream") == ["10.0.0.7"]


# -- pushdown -----------------------------------------------------------------


def schemas():
    from fastsock.federated_query import table_schemas

    return table_schemas()


def test_plan_finds_tables_and_filters():
    sql = (
        "SELECT c.comm, l.pid FROM connections c JOIN listeners l "
        "ON c.local_port = l.local_port WHERE c.remote_port = 443 "
        "AND l.state = 'LISTEN' AND (c.pid = 1 OR l.pid = 2)"
    )
    plans = plan_tables(sql, schemas())

    assert set(plans) == {"connections", "listeners"}
    assert plans["connections"].where == "(remote_port = 443)"
    assert plans["listeners"].where == "(state = 'LISTEN')"
    assert set(plans["connections"].columns) == {
        "comm",
        "local_port",
        "remote_port",
        "pid",
        "state",
    }


def test_plan_replaces_now_with_entry_time():
    plans = plan_tables(
        "SELECT * FROM connections WHERE last_seen > now() - INTERVAL 1 HOUR", schemas()
    )

    where = plans["connections"].where
    assert "now()" not in where
    assert "TIMESTAMPTZ" in where
    assert plans["connections"].columns is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM connections WHERE random() < 0.5",
        "SELECT * FROM connections WHERE pid IN (SELECT pid FROM processes)",
        "SELECT * FROM connections c LEFT JOIN listeners l USING (local_port) "
        "WHERE l.pid IS NULL",
        "SELECT * FROM connections WHERE pid = 1 UNION ALL SELECT * FROM connections",
        "SELECT * FROM connections TABLESAMPLE 10% WHERE pid = 1",
    ],
)
def test_plan_keeps_unsafe_filters_at_entry(sql):
    assert plan_tables(sql, schemas())["connections"].where is None


def test_plan_ors_filters_of_two_references():
    sql = (
        "SELECT comm FROM connections WHERE pid = 1 "
        "UNION SELECT comm FROM connections WHERE pid = 2"
    )

    assert (
        plan_tables(sql, schemas())["connections"].where == "((pid = 1)) OR ((pid = 2))"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 1) TO '/tmp/x.csv'",
        "ATTACH '/tmp/x.db'",
        "INSTALL httpfs",
        "SELECT 1; SELECT 2",
    ],
)
def test_validate_select_rejects(sql):
    with pytest.raises(QueryError, match="one SELECT statement"):
        validate_select(sql)


PUSHDOWN_QUERIES = [
    "SELECT comm, count(*) AS n FROM connections "
    "WHERE last_seen >= now() - INTERVAL 1 HOUR GROUP BY ALL",
    "SELECT conn_id, comm FROM connections "
    "WHERE remote_port = 8080 AND comm LIKE '%cli'",
    "SELECT c.conn_id, l.comm FROM connections c "
    "JOIN listeners l ON c.local_port = l.local_port "
    "WHERE c.last_seen > TIMESTAMPTZ '2000-01-01 00:00:00+00' AND l.state = 'LISTEN'",
    "SELECT count(*) AS n FROM connections WHERE last_seen::DATE = current_date",
    "SELECT conn_id FROM connections "
    "WHERE NOT closed AND local_port BETWEEN 40000 AND 41000",
    "SELECT date, hour, count(*) AS n FROM connections_records "
    "WHERE hour >= 0 GROUP BY ALL",
]


@pytest.mark.parametrize("sql", PUSHDOWN_QUERIES)
def test_pushdown_keeps_results(tmp_path, sql):
    data_dir = tmp_path / "app"
    write_node_data(data_dir, "app", EDGES, ADDRESSES)
    node = NodeSettings(identity=node_identity(data_dir, "app"), data_dir=data_dir)

    local = run_query(data_dir, sql)
    federated, _reports = run_federated_query(node, sql, FederationOptions(max_depth=0))

    assert sorted(federated.to_pylist(), key=repr) == sorted(
        local.to_pylist(), key=repr
    )


def test_time_filter_sends_fewer_rows(fleet):
    sql = "SELECT comm FROM connections WHERE last_seen > now() - INTERVAL 1 HOUR"
    result, reports = query_agent(
        fleet.endpoint("web"), sql, fleet.options(), Credentials()
    )

    rows_sent = sum(report.rows for report in reports)
    assert rows_sent == result.num_rows
    comms = result.column("comm").to_pylist()
    assert comms
    assert not [comm for comm in comms if comm.endswith("-old")]
    everything, _ = query_agent(
        fleet.endpoint("web"),
        "SELECT * FROM connections",
        fleet.options(),
        Credentials(),
    )
    assert everything.num_rows > result.num_rows


# -- recursion over loopback agents -------------------------------------------


def test_each_node_once_despite_cycle(fleet):
    sql = "SELECT node, node_id, conn_id, comm FROM connections"
    result, reports = query_agent(
        fleet.endpoint("web"), sql, fleet.options(), Credentials()
    )

    rows = result.to_pylist()
    keys = [(row["node_id"], row["conn_id"]) for row in rows]
    assert len(keys) == len(set(keys))
    for name in ["web", "app", "db", "cache"]:
        local = run_query(fleet.node(name).data_dir, "SELECT conn_id FROM connections")
        got = sorted(row["conn_id"] for row in rows if row["node"] == name)
        assert got == sorted(local.column("conn_id").to_pylist()), name
    assert {row["node"] for row in rows} == {"web", "app", "db", "cache"}

    by_name = nodes_by_name(reports)
    assert by_name["app"].paths == 2
    assert by_name["web"].depth == 0
    assert by_name["db"].depth == 2


def test_down_node_is_missed(fleet):
    sql = "SELECT * FROM federation_nodes"
    result, reports = query_agent(
        fleet.endpoint("web"), sql, fleet.options(), Credentials()
    )

    (down,) = missed(reports)
    assert down.endpoint == fleet.peers[ADDRESSES["old"]]
    assert down.status == "unreachable"
    assert down.via == "db"
    table_rows = {row["endpoint"]: row for row in result.to_pylist()}
    assert table_rows[down.endpoint]["reached"] is False
    assert sum(row["reached"] for row in result.to_pylist()) == 4


def test_max_depth_skips_deeper_nodes(fleet):
    sql = "SELECT DISTINCT node FROM connections"
    result, reports = query_agent(
        fleet.endpoint("web"), sql, fleet.options(max_depth=1), Credentials()
    )

    assert sorted(result.column("node").to_pylist()) == ["app", "web"]
    skipped = {report.endpoint for report in reports if report.status == "skipped"}
    assert skipped == {fleet.peers[ADDRESSES["db"]], fleet.peers[ADDRESSES["cache"]]}


def test_max_depth_zero_reads_entry_only(fleet):
    result, _ = query_agent(
        fleet.endpoint("app"),
        "SELECT DISTINCT node FROM connections",
        fleet.options(max_depth=0),
        Credentials(),
    )

    assert result.column("node").to_pylist() == ["app"]


def test_upstream_follows_callers(fleet):
    result, _ = query_agent(
        fleet.endpoint("db"),
        "SELECT DISTINCT node FROM connections ORDER BY node",
        fleet.options(direction="upstream"),
        Credentials(),
    )

    assert result.column("node").to_pylist() == ["app", "cache", "db", "web"]


def test_strict_fails_on_missed_node(fleet):
    with pytest.raises(FederationError, match="unreachable"):
        query_agent(
            fleet.endpoint("web"),
            "SELECT count(*) FROM connections",
            fleet.options(strict=True),
            Credentials(),
        )


def test_strict_error_counts_one_node(fleet):
    with pytest.raises(FederationError) as caught:
        query_agent(
            fleet.endpoint("web"),
            "SELECT count(*) FROM connections",
            fleet.options(strict=True),
            Credentials(),
        )

    assert "--strict: 1 node did not send every row" in str(caught.value)


def test_summary_counts_one_node(fleet, caplog):
    caplog.set_level(logging.INFO, logger="fastsock.flight_server")

    _, reports = query_agent(
        fleet.endpoint("app"),
        "SELECT count(*) FROM connections",
        fleet.options(max_depth=0),
        Credentials(),
    )

    assert summary_lines(reports)[0].startswith("federation: 1 node reached (app),")
    assert ", 1 node reached," in caplog.text


def test_summary_counts_nodes(fleet):
    _, reports = query_agent(
        fleet.endpoint("web"),
        "SELECT count(*) FROM connections",
        fleet.options(),
        Credentials(),
    )

    assert summary_lines(reports)[0].startswith("federation: 4 nodes reached (")


def test_deps_federated_help_names_no_sql():
    deps_help = " ".join(run_fastsock("deps", "--help").stdout.split())
    query_help = " ".join(run_fastsock("query", "--help").stdout.split())

    assert "--federated Read the flows and listeners of this node" in deps_help
    assert "Run the SQL over" not in deps_help
    assert "--federated Run the SQL over the rows of this node" in query_help


def test_local_entry_matches_agent_entry(fleet):
    sql = "SELECT node, conn_id FROM connections ORDER BY ALL"
    via_agent, _ = query_agent(
        fleet.endpoint("web"), sql, fleet.options(), Credentials()
    )
    local, reports = run_federated_query(fleet.node("web"), sql, fleet.options())

    assert local.equals(via_agent)
    assert len(missed(reports)) == 1


def test_node_reached_by_two_endpoints_counts_once(tmp_path):
    fleet = LoopbackFleet(tmp_path, edges={"web": ["app", "db"]}, down=())
    # db's address leads to app's agent too, through another endpoint: app is
    # then reached twice, as a multi-homed node would be.
    fleet.peers[ADDRESSES["db"]] = f"localhost:{fleet.servers['app'].port}"
    try:
        sql = "SELECT node, conn_id FROM connections"
        result, reports = query_agent(
            fleet.endpoint("web"), sql, fleet.options(), Credentials()
        )
    finally:
        fleet.close()

    app_rows = [row for row in result.to_pylist() if row["node"] == "app"]
    local = run_query(tmp_path / "app", "SELECT conn_id FROM connections")
    assert len(app_rows) == local.num_rows
    assert nodes_by_name(reports)["app"].paths == 2
    assert missed(reports) == []


class SlowServer(AgentServer):
    """An agent that waits before it responds, to stand for a slow peer."""

    delay = 2.0

    def do_get(self, context, ticket):
        time.sleep(self.delay)
        return super().do_get(context, ticket)


def test_slow_peer_times_out_without_failing_query(tmp_path):
    fleet = LoopbackFleet(tmp_path, edges={"web": ["app"]}, down=("app",))
    app_dir = tmp_path / "app"
    slow = SlowServer(
        NodeSettings(identity=node_identity(app_dir, "app"), data_dir=app_dir),
        Endpoint("127.0.0.1", 0),
    )
    fleet.peers[ADDRESSES["app"]] = f"127.0.0.1:{slow.port}"
    try:
        result, reports = run_federated_query(
            fleet.node("web"),
            "SELECT DISTINCT node FROM connections",
            fleet.options(timeout=1.0),
        )
    finally:
        fleet.close()
        slow.shutdown()

    assert result.column("node").to_pylist() == ["web"]
    (late,) = missed(reports)
    assert late.status == "timeout"


def test_row_limit_marks_node_partial(tmp_path):
    fleet = LoopbackFleet(tmp_path, edges={"web": ["app"]}, down=(), max_rows=1)
    try:
        result, reports = query_agent(
            fleet.endpoint("web"),
            "SELECT node FROM connections",
            fleet.options(),
            Credentials(),
        )
    finally:
        fleet.close()

    assert result.num_rows == 2
    assert {report.status for report in reports} == {"partial"}
    assert "row limit of 1" in nodes_by_name(reports)["app"].reason


def test_federated_table_returns_arrow(fleet):
    table, reports = federated_table(
        fleet.node("web"), "listeners", fleet.options(), where="state = 'LISTEN'"
    )

    assert table.schema.names[:2] == ["node", "node_id"]
    assert sorted(table.column("node").to_pylist()) == ["app", "cache", "db", "web"]
    assert len(missed(reports)) == 1


def test_describe_action(fleet):
    body = describe(fleet.endpoint("db"), Credentials())

    assert body["node"] == "db"
    assert body["node_id"] == fleet.node("db").identity.node_id
    assert "connections" in body["tables"]


# -- security -----------------------------------------------------------------


@pytest.fixture
def token_fleet(tmp_path):
    fleet = LoopbackFleet(tmp_path, edges={"web": ["app"]}, down=(), token=TOKEN)
    yield fleet
    fleet.close()


@pytest.mark.parametrize(
    "token, problem", [(None, "carried no token"), ("x" * 28, "carried a wrong token")]
)
def test_agent_rejects_bad_token(token_fleet, caplog, token, problem):
    caplog.set_level(logging.WARNING, logger="fastsock.auth")

    with pytest.raises(FlightAgentError) as caught:
        query_agent(
            token_fleet.endpoint("web"),
            "SELECT 1",
            token_fleet.options(),
            Credentials(token),
        )

    assert caught.value.status == "rejected"
    assert problem in str(caught.value)
    assert problem in caplog.text
    assert TOKEN not in caplog.text
    assert "x" * 28 not in caplog.text


def test_agent_with_token_answers_and_forwards_it(token_fleet):
    result, reports = query_agent(
        token_fleet.endpoint("web"),
        "SELECT DISTINCT node FROM connections ORDER BY node",
        token_fleet.options(),
        Credentials(TOKEN),
    )

    assert result.column("node").to_pylist() == ["app", "web"]
    assert missed(reports) == []


def test_describe_rejects_bad_token(token_fleet):
    with pytest.raises(FlightAgentError, match="wrong token"):
        describe(token_fleet.endpoint("app"), Credentials("y" * 20))


@pytest.mark.parametrize(
    "sql, message",
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
        ("SELECT * FROM read_text('/etc/passwd')", "disabled by configuration"),
        ("COPY (SELECT 1) TO '{tmp}/out.csv'", "one SELECT statement"),
        ("ATTACH '{tmp}/x.db' AS other", "one SELECT statement"),
        ("INSTALL httpfs", "one SELECT statement"),
        ("SELECT * FROM connections; COPY connections TO '{tmp}/c.csv'", "one SELECT"),
    ],
)
def test_agent_rejects_unsafe_sql(fleet, tmp_path, sql, message):
    before = sorted(tmp_path.rglob("*"))

    with pytest.raises(QueryError, match=message):
        query_agent(
            fleet.endpoint("web"),
            sql.format(tmp=tmp_path),
            fleet.options(),
            Credentials(),
        )

    assert sorted(tmp_path.rglob("*")) == before


def test_pull_filter_cannot_escape_sandbox(fleet):
    schema = pa.schema([pa.field("conn_id", pa.int64())])
    request = PullRequest(
        query_id="attack",
        table="connections",
        schema=schema,
        where="true) UNION ALL SELECT 1 FROM read_text('/etc/passwd') --",
        direction="downstream",
        depth=0,
        max_depth=0,
        timeout=5.0,
    )
    rows = 0
    reports = None
    for batch, batch_reports in stream(
        fleet.endpoint("db"), request.to_ticket(), Credentials(), 5.0
    ):
        rows += batch.num_rows
        reports = batch_reports or reports

    assert rows == 0
    (report,) = reports
    assert report["status"] == "failed"


# -- TLS ----------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    result = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {result.stderr.strip()}")
    return cert, key


def test_tls_agent(tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed, so no test certificate can be made")
    cert, key = make_certificate(tmp_path)
    write_node_data(tmp_path / "web", "web", {}, ADDRESSES)
    settings = NodeSettings(
        identity=node_identity(tmp_path / "web", "web"), data_dir=tmp_path / "web"
    )
    pair = flight.CertKeyPair(cert=cert.read_bytes(), key=key.read_bytes())
    server = AgentServer(settings, Endpoint("127.0.0.1", 0), TOKEN, pair)
    try:
        secure = Credentials(TOKEN, cert.read_bytes())
        result, _ = query_agent(
            server.endpoint,
            "SELECT DISTINCT node FROM connections",
            FederationOptions(),
            secure,
        )
        with pytest.raises(FlightAgentError):
            describe(Endpoint("127.0.0.1", server.port), Credentials(TOKEN), timeout=3)
    finally:
        server.shutdown()

    assert server.endpoint.location().startswith("grpc+tls://")
    assert result.column("node").to_pylist() == ["web"]


# -- the registry and the pull protocol ---------------------------------------


def test_registry_answers_once_and_relays_shallower():
    registry = AnswerRegistry(capacity=2)

    assert registry.claim("q", "connections", 3) == "rows"
    assert registry.claim("q", "connections", 3) == "duplicate"
    assert registry.claim("q", "connections", 1) == "relay"
    assert registry.claim("q", "listeners", 1) == "rows"
    assert registry.claim("r", "connections", 0) == "rows"
    # The oldest query was forgotten to stay within capacity.
    assert registry.claim("q", "connections", 5) == "rows"


def test_pull_request_round_trip():
    schema = pa.schema([pa.field("conn_id", pa.int64())])
    request = PullRequest(
        "q1",
        "connections",
        schema,
        "pid = 1",
        "both",
        2,
        5,
        3.5,
        ("a", "b"),
        "app",
        {"10.0.0.1": "h:1"},
        "UTC",
    )

    decoded = PullRequest.from_dict(json.loads(request.to_ticket()))

    assert decoded == request


def test_node_on_path_answers_without_rows(tmp_path):
    write_node_data(tmp_path, "app", EDGES, ADDRESSES)
    settings = NodeSettings(identity=node_identity(tmp_path, "app"), data_dir=tmp_path)
    request = PullRequest(
        "q",
        "connections",
        pa.schema([pa.field("conn_id", pa.int64())]),
        None,
        "downstream",
        2,
        5,
        5.0,
        visited=(settings.identity.node_id,),
    )

    answer = PullAnswer(settings, request, AnswerRegistry())
    batches = list(answer)

    assert batches == []
    assert [report.status for report in answer.reports] == ["duplicate"]


# -- real hosts in network namespaces -----------------------------------------


NETNS_SKIP = skip_reason()
AGENT_INTERVAL = "0.5"

# Processes each host runs, as comm names, so that the test can wait for them.
HOST_COMMS = {
    "web": {"fs-web-cli"},
    "app": {"fs-app-srv", "fs-app-cli"},
    "db": {"fs-db-srv", "fs-db-cli"},
    "cache": {"fs-cache-srv", "fs-cache-cli"},
    "old": {"fs-old-srv"},
}


class NetnsFleet:
    """web, app, db, cache and old as namespaces, each with services and an agent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token_file = root / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.network = Network("fsk")
        self.hosts = {name: self.network.add_host(name) for name in NAMES}
        self.agents = {}
        self.logs = {}
        self._log_files = []

    def start(self) -> None:
        for name in ["app", "db", "cache", "old"]:
            host = self.hosts[name]
            host.start_peer(
                "server",
                "--bind",
                host.address,
                "--port",
                str(SERVICE_PORT),
                "--name",
                f"fs-{name}-srv",
            )
        for source, targets in EDGES.items():
            for target in targets:
                self.hosts[source].start_peer(
                    "client",
                    "--connect",
                    self.hosts[target].address,
                    str(SERVICE_PORT),
                    "--name",
                    f"fs-{source}-cli",
                )
        for name in NAMES:
            self.start_agent(name)
        self.wait_for_data()
        # old's agent collected its data and then stopped, as a crashed or
        # stopped agent would.
        self.hosts["old"].stop(self.agents["old"])

    def start_agent(self, name: str) -> None:
        host = self.hosts[name]
        log = open(self.root / f"{name}.log", "w")
        self._log_files.append(log)
        self.logs[name] = self.root / f"{name}.log"
        self.agents[name] = host.popen(
            sys.executable,
            "-m",
            "fastsock",
            "--log-level",
            "info",
            "agent",
            "--listen",
            f"{host.address}:{DEFAULT_AGENT_PORT}",
            "--token-file",
            str(self.token_file),
            "--data-dir",
            str(self.data_dir(name)),
            "--node-name",
            name,
            "--interval",
            AGENT_INTERVAL,
            "--flush-interval",
            "1",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )

    def data_dir(self, name: str) -> Path:
        return self.root / "data" / name

    def wait_for_data(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = dict(HOST_COMMS)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                if waiting[name] <= self.stored_comms(name):
                    del waiting[name]
            for name, process in self.agents.items():
                if process.poll() is not None:
                    raise AssertionError(
                        f"agent {name} exited {process.returncode}:\n"
                        f"{self.logs[name].read_text()}"
                    )
            time.sleep(0.3)
        assert not waiting, f"agents stored no rows of {waiting} in {timeout} s"

    def stored_comms(self, name: str) -> set:
        try:
            result = run_query(
                self.data_dir(name), "SELECT DISTINCT comm FROM connections"
            )
        except NoDataError:
            # Nothing flushed yet.
            return set()
        return set(result.column("comm").to_pylist())

    def query(
        self, *args: str, token_file=None, host="web"
    ) -> subprocess.CompletedProcess:
        token = str(token_file or self.token_file)
        return self.hosts[host].run(
            sys.executable,
            "-m",
            "fastsock",
            "query",
            "--federated",
            "--token-file",
            token,
            "--timeout",
            "15",
            *args,
        )

    def close(self) -> None:
        self.network.close()
        for log in self._log_files:
            log.close()


@pytest.fixture(scope="module")
def netns_fleet(tmp_path_factory):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    fleet = NetnsFleet(tmp_path_factory.mktemp("netns-fleet"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


SERVICE_SQL = (
    "SELECT node, node_id, conn_id, comm FROM connections WHERE comm LIKE 'fs-%' "
    "ORDER BY node, conn_id"
)


@pytest.mark.root
@pytest.mark.netns
def test_netns_query_from_web_reaches_each_host_once(netns_fleet):
    web = netns_fleet.hosts["web"]
    result = netns_fleet.query(
        "--agent",
        f"{web.address}:{DEFAULT_AGENT_PORT}",
        "--format",
        "json",
        SERVICE_SQL,
    )
    assert result.returncode == 0, result.stderr

    rows = json.loads(result.stdout)
    keys = [(row["node_id"], row["conn_id"]) for row in rows]
    assert len(keys) == len(set(keys))
    assert {row["node"] for row in rows} == {"web", "app", "db", "cache"}
    for name in ["web", "app", "db", "cache"]:
        stored = run_query(
            netns_fleet.data_dir(name),
            "SELECT conn_id FROM connections WHERE comm LIKE 'fs-%'",
        )
        got = sorted(row["conn_id"] for row in rows if row["node"] == name)
        assert got == sorted(stored.column("conn_id").to_pylist()), name

    old = netns_fleet.hosts["old"]
    assert f"{old.address}:{DEFAULT_AGENT_PORT}" in result.stderr
    assert "unreachable" in result.stderr


@pytest.mark.root
@pytest.mark.netns
def test_netns_nodes_table_names_missed_host(netns_fleet):
    web = netns_fleet.hosts["web"]
    result = netns_fleet.query(
        "--agent",
        f"{web.address}:{DEFAULT_AGENT_PORT}",
        "--format",
        "json",
        "SELECT node, endpoint, via, reached, status, paths FROM federation_nodes",
    )
    assert result.returncode == 0, result.stderr

    rows = json.loads(result.stdout)
    reached = {row["node"]: row for row in rows if row["reached"]}
    missed_rows = [row for row in rows if not row["reached"]]
    assert set(reached) == {"web", "app", "db", "cache"}
    assert reached["app"]["paths"] >= 2
    old = netns_fleet.hosts["old"]
    assert [row["endpoint"] for row in missed_rows] == [
        f"{old.address}:{DEFAULT_AGENT_PORT}"
    ]
    assert missed_rows[0]["status"] == "unreachable"
    assert missed_rows[0]["via"] == "db"


@pytest.mark.root
@pytest.mark.netns
def test_netns_max_depth_from_local_data(netns_fleet):
    result = netns_fleet.query(
        "--data-dir",
        str(netns_fleet.data_dir("web")),
        "--max-depth",
        "1",
        "--format",
        "json",
        "SELECT DISTINCT node FROM connections ORDER BY node",
    )
    assert result.returncode == 0, result.stderr

    assert [row["node"] for row in json.loads(result.stdout)] == ["app", "web"]
    assert "skipped" in result.stderr


@pytest.mark.root
@pytest.mark.netns
def test_netns_wrong_token_rejected(netns_fleet):
    wrong = netns_fleet.root / "wrong-token"
    wrong.write_text("w" * 32)
    web = netns_fleet.hosts["web"]

    result = netns_fleet.query(
        "--agent", f"{web.address}:{DEFAULT_AGENT_PORT}", "SELECT 1", token_file=wrong
    )

    assert result.returncode == 1
    assert "wrong token" in result.stderr
    log = netns_fleet.logs["web"].read_text()
    assert "rejected do_get" in log
    assert "w" * 32 not in log
    assert TOKEN not in log


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.parametrize(
    "sql, message",
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
        ("COPY (SELECT 1) TO '/tmp/fastsock-netns-copy.csv'", "one SELECT statement"),
        ("ATTACH '/tmp/fastsock-netns.db' AS other", "one SELECT statement"),
        ("INSTALL httpfs", "one SELECT statement"),
    ],
)
def test_netns_agent_rejects_unsafe_sql(netns_fleet, sql, message):
    web = netns_fleet.hosts["web"]

    result = netns_fleet.query("--agent", f"{web.address}:{DEFAULT_AGENT_PORT}", sql)

    assert result.returncode == 2
    assert message in result.stderr
    assert not Path("/tmp/fastsock-netns-copy.csv").exists()
    assert not Path("/tmp/fastsock-netns.db").exists()


@pytest.mark.root
@pytest.mark.netns
def test_netns_stopped_agent_logged_stop(netns_fleet):
    log = netns_fleet.logs["old"].read_text()

    assert "agent old stopping" in log
    assert "agent old stopped" in log
    assert netns_fleet.agents["old"].returncode == 0


@pytest.mark.root
@pytest.mark.netns
def test_netns_deps_federated_crosses_hosts(netns_fleet):
    web = netns_fleet.hosts["web"]

    def deps(target):
        return web.run(
            sys.executable, "-m", "fastsock", "deps", target, "--federated",
            "--agent", f"{web.address}:{DEFAULT_AGENT_PORT}",
            "--token-file", str(netns_fleet.token_file), "--timeout", "15",
            "--direction", "out", "--depth", "3",
        )

    from_web = deps("fs-web-cli")
    from_app = deps("fs-app-cli")

    assert from_web.returncode == 0, from_web.stderr
    assert from_web.stdout.startswith("fs-web-cli")
    assert "--> fs-app-srv" in from_web.stdout
    assert " on app" in from_web.stdout
    assert from_app.returncode == 0, from_app.stderr
    assert "--> fs-db-srv" in from_app.stdout
    assert " on db" in from_app.stdout
