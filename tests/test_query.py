"""Tests of the DuckDB views, the sandboxed connection and the output formats."""

import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

import fastsock
from fastsock.errors import NoDataError, QueryError
from fastsock.output import iso_duration, write_result
from fastsock.query import open_database, run_query, tables_with_files
from fastsock.schema import TABLES
from fastsock.store import ParquetStore
from harness import run_fastsock


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, 1, hour, minute, tzinfo=timezone.utc)


def make_table(table_name: str, rows: list[dict]) -> pa.Table:
    """Build a table with the schema of ``table_name``, null where a row has no key."""
    schema, _key = TABLES[table_name]
    return pa.Table.from_pylist(rows, schema=schema)


def connection(conn_id: int, state: str, last_seen: datetime, **columns) -> dict:
    return {
        "host": "node-a",
        "conn_id": conn_id,
        "protocol": "tcp",
        "local_port": 40000 + conn_id,
        "remote_port": 443,
        "state": state,
        "last_seen": last_seen,
        **columns,
    }


def store_connections(data_dir: Path, *rows: dict) -> None:
    ParquetStore(data_dir).write("connections", make_table("connections", list(rows)))


def count_rows(database: duckdb.DuckDBPyConnection, view: str) -> int:
    [(count,)] = database.execute(f"select count(*) from {view}").fetchall()
    return count


@pytest.fixture
def data_dir(tmp_path):
    """A data directory with three records of connection 1 and one of connection 2."""
    root = tmp_path / "data"
    store_connections(root, connection(1, "SYN_SENT", at(10, 0)))
    store_connections(
        root,
        connection(1, "ESTABLISHED", at(10, 30)),
        connection(2, "LISTEN", at(10, 45)),
    )
    store_connections(root, connection(1, "CLOSE_WAIT", at(11, 5), closed=True))
    return root


def test_view_keeps_latest_record(data_dir):
    result = run_query(
        data_dir, "select conn_id, state, closed from connections order by conn_id"
    )

    assert result.to_pylist() == [
        {"conn_id": 1, "state": "CLOSE_WAIT", "closed": True},
        {"conn_id": 2, "state": "LISTEN", "closed": None},
    ]


def test_records_view_keeps_all(data_dir):
    result = run_query(
        data_dir,
        "select conn_id, state from connections_records order by conn_id, last_seen",
    )

    assert result.to_pylist() == [
        {"conn_id": 1, "state": "SYN_SENT"},
        {"conn_id": 1, "state": "ESTABLISHED"},
        {"conn_id": 1, "state": "CLOSE_WAIT"},
        {"conn_id": 2, "state": "LISTEN"},
    ]


def test_views_have_partition_columns(data_dir):
    result = run_query(
        data_dir, "select date, hour from connections_records order by last_seen"
    )

    assert result.schema.field("date").type == pa.date32()
    assert result.schema.field("hour").type == pa.int32()
    assert result.column("hour").to_pylist() == [10, 10, 10, 11]


def test_views_see_files_written_later(data_dir):
    database = open_database(data_dir)
    store_connections(data_dir, connection(3, "ESTABLISHED", at(12)))

    assert count_rows(database, "connections") == 3


def test_table_without_files_has_empty_view(data_dir):
    assert tables_with_files(data_dir) == ["connections"]

    result = run_query(data_dir, "select * from listeners")

    assert result.num_rows == 0
    assert "listener_id" in result.column_names
    assert "hour" in result.column_names


def test_invalid_sql_raises_query_error(data_dir):
    sql = "selec conn_id from connections"

    with pytest.raises(QueryError) as caught:
        run_query(data_dir, sql)

    message = str(caught.value)
    assert "syntax error" in message
    assert sql in message
    assert isinstance(caught.value.__cause__, duckdb.Error)
    assert isinstance(caught.value, ValueError)


def test_unknown_column_raises_query_error(data_dir):
    with pytest.raises(QueryError, match="no_such_column"):
        run_query(data_dir, "select no_such_column from connections")


def test_empty_query_raises_query_error(data_dir):
    with pytest.raises(QueryError, match="empty"):
        run_query(data_dir, "  \n")


def test_empty_dir_raises_no_data(tmp_path):
    with pytest.raises(NoDataError) as caught:
        run_query(tmp_path, "select 1")

    message = str(caught.value)
    assert str(tmp_path) in message
    assert f"fastsock collect --data-dir {tmp_path}" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_dir_raises_no_data(tmp_path):
    with pytest.raises(NoDataError):
        run_query(tmp_path / "never-created", "select 1")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("never-created", None, "nothing collected in {path} yet"),
        ("empty", "", "nothing collected in {path} yet"),
        ("afile", "text", "data directory {path} is a file"),
    ],
)
def test_open_history_rejects_bad_dir(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    expected = re.escape(message.format(path=path))

    with pytest.raises(NoDataError, match=expected):
        fastsock.open_history(path)


def test_open_history_matches_query_command(tmp_path):
    target = tmp_path / "afile"
    target.write_text("")

    with pytest.raises(NoDataError) as caught:
        fastsock.open_history(target)
    result = run_fastsock("query", "--data-dir", str(target), "select 1", check=False)

    assert result.returncode == 1
    assert result.stderr.strip() == f"fastsock: error: {caught.value}"


def test_open_history_reads_collected_rows(data_dir):
    history = fastsock.open_history(data_dir)

    assert count_rows(history, "connections") == 2


@pytest.mark.parametrize("sandboxed", [False, True])
@pytest.mark.parametrize("name", ["it's data", "br[a]ck*et?", "back\\slash"])
def test_data_dir_with_special_characters(tmp_path, name, sandboxed):
    root = tmp_path / name
    store_connections(root, connection(1, "ESTABLISHED", at(10)))

    result = run_query(root, "select conn_id from connections", sandboxed=sandboxed)

    assert result.column("conn_id").to_pylist() == [1]


def test_sandboxed_views_match_plain_views(data_dir):
    sql = "select * from connections_records order by conn_id, last_seen"

    plain = run_query(data_dir, sql)
    sandboxed = run_query(data_dir, sql, sandboxed=True)

    assert sandboxed.schema == plain.schema
    assert sandboxed.equals(plain)


# DuckDB's messages for an operation the sandbox settings forbid.
SANDBOX_ERROR = re.compile(
    r"disabled (by|through) configuration|configuration has been locked"
)


def sandbox_attacks(tmp_path: Path, data_dir: Path) -> dict[str, str]:
    """Return SQL that a sandboxed connection must reject, by a short label."""
    part = next(data_dir.rglob("*.parquet"))
    return {
        "read_csv": "select * from read_csv('/etc/passwd')",
        "read_text": "select * from read_text('/etc/passwd')",
        "glob": "select * from glob('/etc/*')",
        "read_parquet_data_dir": f"select * from read_parquet('{part}')",
        "copy_to": f"copy (select 1) to '{tmp_path}/x.csv'",
        "copy_into_data_dir": f"copy (select 1) to '{data_dir}/x.parquet'",
        "attach": f"attach '{tmp_path}/x.db' as other",
        "install": "install httpfs",
        "load": "load httpfs",
        "enable_external_access": "set enable_external_access = true",
        "unlock": "set lock_configuration = false",
        "allowed_directories": "set allowed_directories = ['/']",
    }


@pytest.mark.parametrize(
    "label",
    [
        "read_csv",
        "read_text",
        "glob",
        "read_parquet_data_dir",
        "copy_to",
        "copy_into_data_dir",
        "attach",
        "install",
        "load",
        "enable_external_access",
        "unlock",
        "allowed_directories",
    ],
)
def test_sandbox_rejects(tmp_path, data_dir, label):
    sql = sandbox_attacks(tmp_path, data_dir)[label]
    files_before = sorted(tmp_path.rglob("*"))
    database = open_database(data_dir, sandboxed=True)

    with pytest.raises(duckdb.Error) as caught:
        database.execute(sql)

    assert SANDBOX_ERROR.search(str(caught.value)), str(caught.value)
    assert sorted(tmp_path.rglob("*")) == files_before
    assert count_rows(database, "connections") == 2


def test_sandbox_rejection_is_query_error(data_dir):
    with pytest.raises(QueryError, match="disabled by configuration"):
        run_query(data_dir, "select * from read_csv('/etc/passwd')", sandboxed=True)


def test_sandbox_blocks_duckdb_temp_directory(tmp_path, data_dir, monkeypatch):
    # DuckDB's temporary directory defaults to ./.tmp, and external access stays
    # open there unless the sandbox clears temp_directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    database = open_database(data_dir, sandboxed=True)

    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        database.execute(f"copy (select 1) to '{tmp_path}/.tmp/x.csv'")
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_sandbox_hides_python_variables(data_dir):
    secret_table = pa.table({"secret": ["hunter2"]})  # noqa: F841
    database = open_database(data_dir, sandboxed=True)

    with pytest.raises(duckdb.Error, match="secret_table"):
        database.execute("select * from secret_table")


def test_plain_connection_reads_python_variables(data_dir):
    # Shows that the sandbox test above can fail: without the sandbox, DuckDB's
    # replacement scan finds the local variable.
    visible_table = pa.table({"value": [1]})  # noqa: F841
    database = open_database(data_dir)

    assert database.execute("select value from visible_table").fetchall() == [(1,)]


def output_table() -> pa.Table:
    """A connections table with NULLs, an empty string, timestamps and a list."""
    rows = [
        connection(1, "ESTABLISHED", at(10, 30), pids=[10, 11], comm="curl"),
        connection(2, "", at(11), first_seen=at(9), comm=None),
        {"conn_id": 3, "last_seen": at(12), "comm": 'say "hi", then\nleave'},
    ]
    columns = ["conn_id", "state", "comm", "local_port", "pids", "closed"]
    return make_table("connections", rows).select(
        [*columns, "first_seen", "last_seen"]
    )


def render(table: pa.Table, fmt: str) -> str:
    stream = io.StringIO()
    write_result(table, fmt, None, stream)
    return stream.getvalue()


def test_table_format_round_trip():
    table = output_table()

    lines = render(table, "table").splitlines()

    header, rule, *rows, footer = lines
    spans = column_spans(rule)
    assert [header[start:end].strip() for start, end in spans] == table.column_names
    assert footer == "(3 rows)"
    assert [[line[start:end].strip() for start, end in spans] for line in rows] == [
        ["1", "ESTABLISHED", "curl", "40001", "[10, 11]", "NULL", "NULL",
         "2024-03-01T10:30:00+00:00"],
        ["2", "", "NULL", "40002", "NULL", "NULL", "2024-03-01T09:00:00+00:00",
         "2024-03-01T11:00:00+00:00"],
        ["3", "NULL", 'say "hi", then\\nleave', "NULL", "NULL", "NULL", "NULL",
         "2024-03-01T12:00:00+00:00"],
    ]


def test_table_format_right_aligns_numbers():
    lines = render(output_table(), "table").splitlines()

    conn_id_end = column_spans(lines[1])[0][1]
    port_start, port_end = column_spans(lines[1])[3]
    for line in lines[2:5]:
        assert line[conn_id_end - 1] != " "
    assert lines[4][port_start:port_end].strip() == "NULL"
    assert lines[2][port_end - 1] == "1"
    assert lines[0][port_end - len("local_port") : port_end] == "local_port"


def test_table_format_single_row_and_empty():
    one_row_text = render(pa.table({"n": [1]}), "table")
    empty_text = render(pa.table({"n": pa.array([], pa.int64())}), "table")

    assert one_row_text.splitlines()[-1] == "(1 row)"
    assert empty_text.splitlines() == ["n", "-", "(0 rows)"]


def column_spans(rule: str) -> list[tuple[int, int]]:
    """Return the (start, end) of each run of dashes in the table's rule line."""
    spans = []
    start = None
    for index, character in enumerate(rule + " "):
        if character == "-" and start is None:
            start = index
        elif character != "-" and start is not None:
            spans.append((start, index))
            start = None
    return spans


def test_csv_round_trip():
    table = output_table()

    text = render(table, "csv")

    # pids is a list, which the CSV writer stores as JSON text.
    scalar_types = {field.name: field.type for field in table.schema}
    del scalar_types["pids"]
    options = pa_csv.ConvertOptions(
        column_types=scalar_types,
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    parsed = pa_csv.read_csv(io.BytesIO(text.encode()), convert_options=options)
    assert parsed.drop_columns(["pids"]).equals(table.drop_columns(["pids"]))
    pids = [
        None if cell is None else json.loads(cell)
        for cell in parsed.column("pids").to_pylist()
    ]
    assert pids == table.column("pids").to_pylist()


def test_csv_quotes_strings_and_leaves_null_empty():
    text = render(output_table(), "csv")

    records = list(csv.reader(io.StringIO(text)))
    assert text.startswith("conn_id,state,comm,")
    assert records[2][1:3] == ["", ""]
    assert text.splitlines()[2].startswith('2,"",,')
    assert records[1][-1] == "2024-03-01T10:30:00+00:00"


def test_json_round_trip():
    table = output_table()

    rows = json.loads(render(table, "json"))

    assert rows[0]["last_seen"] == "2024-03-01T10:30:00+00:00"
    assert rows[1]["comm"] is None
    for row in rows:
        for name in ("first_seen", "last_seen"):
            if row[name] is not None:
                row[name] = datetime.fromisoformat(row[name])
    assert pa.Table.from_pylist(rows, schema=table.schema).equals(table)


def test_json_empty_table():
    assert json.loads(render(output_table().slice(0, 0), "json")) == []


def test_json_rejects_duplicate_column_names():
    table = pa.table([pa.array([1]), pa.array([2])], names=["a", "a"])

    with pytest.raises(ValueError, match="'a'.*AS"):
        render(table, "json")


def test_parquet_round_trip(tmp_path):
    table = output_table()
    path = tmp_path / "result.parquet"

    write_result(table, "parquet", path, None)

    assert pq.read_table(path).equals(table)


def test_parquet_needs_output_path():
    with pytest.raises(ValueError, match="output file path"):
        write_result(output_table(), "parquet", None, io.StringIO())


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_text_format_writes_to_output_path(tmp_path, fmt):
    path = tmp_path / f"result.{fmt}"
    stream = io.StringIO()

    write_result(output_table(), fmt, path, stream)

    assert path.read_text(encoding="utf-8") == render(output_table(), fmt)
    assert stream.getvalue() == ""


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="'yaml'.*table, csv, json, parquet"):
        write_result(output_table(), "yaml", None, io.StringIO())


def test_query_result_renders_in_every_format(data_dir, tmp_path):
    result = run_query(data_dir, "select * from connections order by conn_id")

    for fmt in ("table", "csv", "json"):
        assert render(result, fmt)
    write_result(result, "parquet", tmp_path / "out.parquet", None)
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 2


def test_query_result_keeps_stored_types(data_dir):
    result = run_query(data_dir, "select conn_id, pids, last_seen from connections")

    assert result.schema.field("conn_id").type == pa.int64()
    assert result.schema.field("pids").type == pa.list_(pa.int32())
    assert result.schema.field("last_seen").type.unit == "us"


def test_json_writes_non_finite_floats_as_null():
    table = pa.table(
        {
            "ratio": [float("nan"), 1.5],
            "samples": [[float("inf"), 2.0], []],
        }
    )

    rows = json.loads(render(table, "json"))

    assert rows == [
        {"ratio": None, "samples": [None, 2.0]},
        {"ratio": 1.5, "samples": []},
    ]


def test_json_writes_decimals_exactly():
    table = pa.table(
        {
            "total": pa.array([Decimal("12345678901234567890")], pa.decimal128(38, 0)),
            "share": pa.array([Decimal("0.10")], pa.decimal128(4, 2)),
        }
    )

    rows = json.loads(render(table, "json"))

    assert rows == [{"total": 12345678901234567890, "share": "0.10"}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "PT0S"),
        (timedelta(days=1, seconds=1, microseconds=500000), "PT86401.5S"),
        (timedelta(seconds=-5), "PT-5S"),
        (pa.MonthDayNano([1, 2, 3_600_000_000_000]), "P1M2DT3600S"),
        (pa.MonthDayNano([0, 3, 0]), "P3D"),
    ],
)
def test_iso_duration(value, expected):
    assert iso_duration(value) == expected


def test_query_interval_renders_as_iso_duration(data_dir):
    result = run_query(data_dir, "select interval 90 minute as timeout")

    assert render(result, "table").splitlines()[2] == "PT5400S"
    assert json.loads(render(result, "json")) == [{"timeout": "PT5400S"}]



def test_closed_record_wins_tie(tmp_path):
    store_connections(tmp_path, connection(1, "ESTABLISHED", at(10), closed=False))
    store_connections(tmp_path, connection(1, "ESTABLISHED", at(10), closed=True))
    store_connections(tmp_path, connection(2, "ESTABLISHED", at(10), closed=True))
    store_connections(tmp_path, connection(2, "ESTABLISHED", at(10), closed=False))

    rows = run_query(tmp_path, "select closed from connections").to_pylist()

    assert rows == [{"closed": True}, {"closed": True}]


def test_view_keeps_earliest_first_seen(tmp_path):
    store_connections(tmp_path, connection(1, "ESTABLISHED", at(10), first_seen=at(9)))
    store_connections(
        tmp_path, connection(1, "ESTABLISHED", at(12), first_seen=at(11), closed=True)
    )

    result = run_query(tmp_path, "select first_seen, last_seen from connections")

    assert result.column("first_seen").to_pylist() == [at(9)]
    assert result.column("last_seen").to_pylist() == [at(12)]


def test_junk_parquet_file_is_skipped(data_dir, caplog):
    junk = data_dir / "connections" / "date=2024-03-01" / "hour=10" / "junk.parquet"
    junk.write_bytes(b"not parquet")

    result = run_query(data_dir, "select count(*) AS n from connections")

    assert result.column("n").to_pylist() == [2]
    assert "skipping 1 damaged Parquet file" in caplog.text
    assert str(junk) in caplog.text
    assert junk.read_bytes() == b"not parquet"


def test_output_to_missing_directory_rejected(data_dir, tmp_path):
    target = tmp_path / "missing" / "x.csv"

    result = run_fastsock("query", "--data-dir", str(data_dir), "--format", "csv",
                          "--output", str(target), "select 1", check=False)

    assert result.returncode == 2
    assert f"cannot write {target}" in result.stderr
    assert f"its directory {target.parent} does not exist" in result.stderr
    assert "create it or choose another --output" in result.stderr
    assert "[Errno" not in result.stderr


def test_output_that_is_a_directory_rejected(data_dir, tmp_path):
    result = run_fastsock("query", "--data-dir", str(data_dir), "--format", "parquet",
                          "--output", str(tmp_path), "select 1", check=False)

    assert result.returncode == 2
    assert f"cannot write {tmp_path}: it is a directory" in result.stderr
