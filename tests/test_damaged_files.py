"""Queries, status and the agent over a data directory with a damaged Parquet file."""

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_agent
import test_query
from harness import run_fastsock

from fastsock import damaged as damaged_module
from fastsock.errors import QueryError
from fastsock.query import run_query
from fastsock.schema import TABLES
from fastsock.store import ParquetStore

RECORDS_SQL = "SELECT conn_id FROM connections_records ORDER BY conn_id"


def connection(conn_id: int, hour: int) -> dict:
    return test_query.connection(conn_id, "ESTABLISHED", at_hour(hour))


def at_hour(hour: int) -> datetime:
    return datetime(2024, 3, 1, hour, tzinfo=timezone.utc)


def process(process_id: int, hour: int) -> dict:
    return {
        "host": "node-a",
        "process_id": process_id,
        "pid": process_id,
        "comm": f"worker-{process_id}",
        "last_seen": at_hour(hour),
    }


def store_row(data_dir: Path, table_name: str, row: dict) -> Path:
    schema, _key = TABLES[table_name]
    table = pa.Table.from_pylist([row], schema=schema)
    [path] = ParquetStore(data_dir).write(table_name, table)
    return path


def store_connection(data_dir: Path, conn_id: int, hour: int) -> Path:
    return store_row(data_dir, "connections", connection(conn_id, hour))


def truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_footer(path: Path) -> None:
    # A file ends with the footer, its length (4 bytes, little-endian) and PAR1.
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - length
    data[start : start + length] = b"\xff" * length
    path.write_bytes(bytes(data))


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def damage_data_page(path: Path) -> None:
    """Flip the bytes of the first page header of the conn_id column."""
    row_group = pq.read_metadata(path).row_group(0)
    [chunk] = [
        row_group.column(index)
        for index in range(row_group.num_columns)
        if row_group.column(index).path_in_schema == "conn_id"
    ]
    start = chunk.data_page_offset
    if chunk.has_dictionary_page:
        start = min(start, chunk.dictionary_page_offset)

    data = bytearray(path.read_bytes())
    for offset in range(start, start + min(16, chunk.total_compressed_size)):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": truncate_to_half,
    "footer": overwrite_footer,
    "empty": empty_file,
    "data-page": damage_data_page,
}


@pytest.fixture
def stored(tmp_path):
    """A data directory with connections 1, 2 and 3, one file each."""
    data_dir = tmp_path / "data"
    files = [store_connection(data_dir, conn_id, 9 + conn_id) for conn_id in (1, 2, 3)]
    return data_dir, files


@pytest.fixture
def footer_reads(monkeypatch):
    """The paths whose footer or pages fastsock.query checked, in order."""
    paths = []
    read_footer = damaged_module._read_footer
    read_pages = damaged_module._read_pages

    def count_footer(path):
        paths.append(path)
        read_footer(path)

    def count_pages(path):
        paths.append(path)
        read_pages(path)

    monkeypatch.setattr(damaged_module, "_read_footer", count_footer)
    monkeypatch.setattr(damaged_module, "_read_pages", count_pages)
    return paths


def query_conn_ids(data_dir: Path, *args: str):
    result = run_fastsock(
        "query", "--data-dir", str(data_dir), "--format", "json", *args, RECORDS_SQL
    )
    return [row["conn_id"] for row in json.loads(result.stdout)], result.stderr


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_query_skips_damaged_file(stored, damage):
    data_dir, files = stored
    damaged = files[1]
    DAMAGES[damage](damaged)
    damaged_bytes = damaged.read_bytes()

    conn_ids, stderr = query_conn_ids(data_dir)

    assert conn_ids == [1, 3]
    assert "skipping 1 damaged Parquet file" in stderr
    assert str(damaged) in stderr
    assert f"Move them out of {data_dir}" in stderr
    assert damaged.read_bytes() == damaged_bytes


def test_query_warning_lists_first_files(tmp_path):
    data_dir = tmp_path / "data"
    files = [store_connection(data_dir, conn_id, conn_id) for conn_id in range(1, 7)]
    for path in files[:5]:
        truncate_to_half(path)

    conn_ids, stderr = query_conn_ids(data_dir)

    assert conn_ids == [6]
    assert "skipping 5 damaged Parquet files" in stderr
    for path in files[:3]:
        assert str(path) in stderr
    assert str(files[3]) not in stderr
    assert "and 2 more" in stderr


def test_federated_query_skips_damaged_file(stored):
    data_dir, files = stored
    truncate_to_half(files[0])

    conn_ids, stderr = query_conn_ids(data_dir, "--federated", "--max-depth", "0")

    assert conn_ids == [2, 3]
    assert str(files[0]) in stderr


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("selec conn_id from connections", "syntax error"),
        ("SELECT no_such_column FROM connections", "no_such_column"),
    ],
)
def test_bad_sql_error_unchanged_by_damage(stored, sql, expected):
    data_dir, files = stored
    clean = run_fastsock("query", "--data-dir", str(data_dir), sql, check=False)
    truncate_to_half(files[1])

    result = run_fastsock("query", "--data-dir", str(data_dir), sql, check=False)

    assert result.returncode == 2
    assert clean.returncode == 2
    error_lines = [
        line for line in result.stderr.splitlines() if "damaged Parquet" not in line
    ]
    assert error_lines == clean.stderr.splitlines()
    assert expected in result.stderr
    assert files[1].exists()


def test_clean_query_checks_no_file(stored, footer_reads):
    data_dir, _files = stored

    rows = run_query(data_dir, RECORDS_SQL).column("conn_id").to_pylist()
    with pytest.raises(QueryError, match="syntax error"):
        run_query(data_dir, "selec conn_id from connections")

    assert rows == [1, 2, 3]
    assert footer_reads == []


@pytest.mark.parametrize("sandboxed", [False, True])
def test_damaged_file_remembered(stored, footer_reads, sandboxed):
    data_dir, files = stored
    truncate_to_half(files[2])

    first = run_query(data_dir, RECORDS_SQL, sandboxed=sandboxed)
    checked = list(footer_reads)
    footer_reads.clear()
    second = run_query(data_dir, RECORDS_SQL, sandboxed=sandboxed)

    assert first.column("conn_id").to_pylist() == [1, 2]
    assert files[2] in checked
    assert second.column("conn_id").to_pylist() == [1, 2]
    assert footer_reads == []


def test_repaired_file_read_again(stored):
    data_dir, files = stored
    good_bytes = files[0].read_bytes()
    truncate_to_half(files[0])
    before = run_query(data_dir, RECORDS_SQL).column("conn_id").to_pylist()

    files[0].write_bytes(good_bytes)
    after = run_query(data_dir, RECORDS_SQL).column("conn_id").to_pylist()

    assert before == [2, 3]
    assert after == [1, 2, 3]


def test_status_skips_damaged_stats_file(tmp_path):
    data_dir = tmp_path / "data"
    run_fastsock(
        "collect",
        "--duration",
        "1.2",
        "--flush-interval",
        "0.4",
        "--data-dir",
        str(data_dir),
    )
    stats_files = sorted((data_dir / "collector_stats").glob("**/*.parquet"))
    assert len(stats_files) >= 2
    damaged = stats_files[0]
    truncate_to_half(damaged)
    damaged_bytes = damaged.read_bytes()

    result = run_fastsock("status", "--data-dir", str(data_dir), check=False)

    assert result.returncode == 0, result.stderr
    assert "samples" in result.stdout
    assert "skipping 1 damaged Parquet file" in result.stderr
    assert str(damaged) in result.stderr
    assert damaged.read_bytes() == damaged_bytes


# Peer discovery reads connections before the pull's own rows, and processes
# only by the own rows, so the two cases take different paths to the retry.
@pytest.mark.parametrize(
    "table_name, make_row, key",
    [("connections", connection, "conn_id"), ("processes", process, "process_id")],
    ids=["connections", "processes"],
)
def test_agent_skips_damaged_file(tmp_path, table_name, make_row, key):
    data_dir = tmp_path / "data"
    files = [store_row(data_dir, table_name, make_row(n, 9 + n)) for n in (1, 2, 3)]
    truncate_to_half(files[1])
    sql = f"SELECT {key} FROM {table_name}_records ORDER BY {key}"
    agent = test_agent.AgentProcess(
        tmp_path,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--node-name",
        "box",
    )
    try:
        result = test_agent.query_one_agent(agent.port, sql)
    finally:
        agent.stop()

    assert [row[key] for row in json.loads(result.stdout)] == [1, 3]
    assert "1 node reached (box)" in result.stderr
    log = agent.log()
    assert "skipping 1 damaged Parquet file" in log
    assert str(files[1]) in log
    assert "failed" not in log
    assert files[1].exists()
