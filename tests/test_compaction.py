"""Tests of compaction against real Parquet files, DuckDB views and processes."""

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from fastsock.collector import Collector
from fastsock.compaction import compact
from fastsock.errors import NoDataError
from fastsock.query import run_query
from fastsock.schema import TABLES
from fastsock.snapshot import Snapshotter
from fastsock.store import PART_NAME, ParquetStore

from harness import run_fastsock

PAST_HOUR = datetime(2024, 3, 1, 10, tzinfo=timezone.utc)

# Runs compaction and stops it after the new file is renamed into place: the
# hook prints the new path and blocks on stdin until the test kills the process.
PAUSED_COMPACTION = """
import sys
from fastsock import compaction

def pause(path):
    print(path, flush=True)
    sys.stdin.read()

compaction.after_rename = pause
compaction.compact(sys.argv[1])
"""


def at(minutes: float, hour: datetime = PAST_HOUR) -> datetime:
    return hour + timedelta(minutes=minutes)


def current_hour() -> datetime:
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


def write(data_dir: Path, table_name: str, *rows: dict) -> list[Path]:
    schema, _key = TABLES[table_name]
    table = pa.Table.from_pylist(list(rows), schema=schema)
    return ParquetStore(data_dir).write(table_name, table)


def connection(conn_id: int, state: str, first: datetime, last: datetime, **extra):
    return {
        "host": "node-a",
        "conn_id": conn_id,
        "protocol": "tcp",
        "local_addr": "127.0.0.1",
        "local_port": 40000 + conn_id,
        "remote_addr": "127.0.0.1",
        "remote_port": 5432,
        "state": state,
        "pids": [1000 + conn_id, 2000 + conn_id],
        "first_seen": first,
        "last_seen": last,
        "closed": False,
        **extra,
    }


def process(process_id: int, first: datetime, last: datetime) -> dict:
    return {
        "host": "node-a",
        "process_id": process_id,
        "pid": process_id,
        "comm": f"proc-{process_id}",
        "first_seen": first,
        "last_seen": last,
    }


def write_history(data_dir: Path) -> None:
    """Store several records per key across files of the past hour and the next."""
    write(data_dir, "connections",
          connection(1, "SYN_SENT", at(1), at(1)),
          connection(2, "ESTABLISHED", at(2), at(2)))
    # A restarted collector wrote a later first_seen for connection 1.
    write(data_dir, "connections",
          connection(1, "ESTABLISHED", at(5), at(20)),
          connection(2, "ESTABLISHED", at(2), at(30)),
          connection(3, "ESTABLISHED", at(25), at(25)))
    write(data_dir, "connections",
          connection(1, "CLOSE_WAIT", at(5), at(40), closed=True),
          connection(2, "ESTABLISHED", at(2), at(50)))
    # Connection 2 lives on into the next hour, which has one file.
    write(data_dir, "connections", connection(2, "ESTABLISHED", at(2), at(70)))

    write(data_dir, "processes", process(7, at(1), at(10)), process(8, at(3), at(3)))
    write(data_dir, "processes", process(7, at(1), at(50)))


def view_answers(data_dir: Path) -> dict[str, list[dict]]:
    answers = {}
    for table_name, (_schema, key) in TABLES.items():
        sql = f"SELECT * FROM {table_name} ORDER BY {key}"
        answers[table_name] = run_query(data_dir, sql).to_pylist()
    return answers


def partition_dir(data_dir: Path, table_name: str, hour: datetime) -> Path:
    return data_dir / table_name / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"


def part_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if PART_NAME.match(path.name))


def test_compact_keeps_view_answers(tmp_path):
    write_history(tmp_path)
    before = view_answers(tmp_path)

    report = compact(tmp_path)

    assert view_answers(tmp_path) == before
    assert report.partitions == 2
    assert report.files_before == 5
    assert report.files_after == 2
    assert report.rows_before == 10
    assert report.rows_after == 5
    assert report.skipped_files == []


def test_compact_one_file_per_partition(tmp_path):
    write_history(tmp_path)

    compact(tmp_path)

    for table_name in ("connections", "processes"):
        directory = partition_dir(tmp_path, table_name, PAST_HOUR)
        assert len(part_files(directory)) == 1
    next_hour = partition_dir(tmp_path, "connections", PAST_HOUR + timedelta(hours=1))
    assert len(part_files(next_hour)) == 1


def test_compact_records_newest_per_key(tmp_path):
    write_history(tmp_path)

    compact(tmp_path)

    records = run_query(
        tmp_path,
        "SELECT conn_id, state, first_seen, last_seen, closed, pids "
        "FROM connections_records WHERE hour = 10 ORDER BY conn_id",
    ).to_pylist()
    assert [row["conn_id"] for row in records] == [1, 2, 3]
    assert records[0]["state"] == "CLOSE_WAIT"
    assert records[0]["closed"] is True
    assert records[0]["first_seen"] == at(1)
    assert records[0]["last_seen"] == at(40)
    assert records[1]["last_seen"] == at(50)
    assert records[1]["pids"] == [1002, 2002]
    assert records[2]["last_seen"] == at(25)


def test_compact_closed_wins_tie(tmp_path):
    write(tmp_path, "connections",
          connection(1, "CLOSE_WAIT", at(1), at(30), closed=True))
    write(tmp_path, "connections", connection(1, "ESTABLISHED", at(1), at(30)))
    before = view_answers(tmp_path)

    compact(tmp_path)

    assert view_answers(tmp_path) == before
    records = run_query(tmp_path, "SELECT state, closed FROM connections_records")
    assert records.to_pylist() == [{"state": "CLOSE_WAIT", "closed": True}]


def test_compact_leaves_current_hour(tmp_path):
    hour = current_hour()
    write(tmp_path, "connections", connection(1, "SYN_SENT", hour, hour))
    write(tmp_path, "connections", connection(1, "ESTABLISHED", hour, hour))
    directory = partition_dir(tmp_path, "connections", hour)
    files = part_files(directory)

    report = compact(tmp_path, before=hour + timedelta(days=2))

    assert part_files(directory) == files
    assert report.partitions == 0
    assert len(files) == 2


def test_compact_before_limits_hours(tmp_path):
    write_history(tmp_path)
    next_hour = PAST_HOUR + timedelta(hours=1)
    write(tmp_path, "connections", connection(2, "ESTABLISHED", at(2), at(80)))

    cutoff = next_hour + timedelta(minutes=30)

    report = compact(tmp_path, table="connections", before=cutoff)

    assert report.partitions == 1
    assert len(part_files(partition_dir(tmp_path, "connections", PAST_HOUR))) == 1
    assert len(part_files(partition_dir(tmp_path, "connections", next_hour))) == 2
    assert len(part_files(partition_dir(tmp_path, "processes", PAST_HOUR))) == 2


def test_compact_skips_unreadable_file(tmp_path, caplog):
    write_history(tmp_path)
    directory = partition_dir(tmp_path, "connections", PAST_HOUR)
    junk = directory / "part-20240301T105900000000Z-1-0.parquet"
    junk.write_bytes(b"not a parquet file")
    temp = directory / ".tmp-part-20240301T105900000000Z-1-1"
    temp.write_bytes(b"half a file")

    report = compact(tmp_path, table="connections")

    assert report.skipped_files == [junk]
    assert junk.read_bytes() == b"not a parquet file"
    assert temp.read_bytes() == b"half a file"
    assert junk in part_files(directory)
    assert len(part_files(directory)) == 2
    assert str(junk) in caplog.text


def test_compact_merges_after_kill(tmp_path):
    write_history(tmp_path)
    before = view_answers(tmp_path)
    directory = partition_dir(tmp_path, "connections", PAST_HOUR)
    old_files = part_files(directory)

    paused = subprocess.Popen(
        [sys.executable, "-c", PAUSED_COMPACTION, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        new_file = Path(paused.stdout.readline().strip())
    finally:
        os.kill(paused.pid, signal.SIGKILL)
        paused.wait()

    assert paused.returncode == -signal.SIGKILL
    assert new_file.exists()
    assert all(path.exists() for path in old_files)
    assert view_answers(tmp_path) == before

    compact(tmp_path)

    assert view_answers(tmp_path) == before
    assert len(part_files(directory)) == 1


def test_compact_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown table 'sockets'"):
        compact(tmp_path, table="sockets")
    with pytest.raises(NoDataError, match="not found"):
        compact(tmp_path / "missing")


def test_compact_rejects_file_as_data_dir(tmp_path):
    target = tmp_path / "afile"
    target.write_text("")

    with pytest.raises(NoDataError, match="is a file"):
        compact(target)


def test_compact_file_message_matches_query(tmp_path):
    target = tmp_path / "afile"
    target.write_text("")

    compacted = run_fastsock("compact", "--data-dir", str(target), check=False)
    queried = run_fastsock("query", "--data-dir", str(target), "select 1", check=False)

    assert compacted.returncode == 1
    assert f"data directory {target} is a file" in compacted.stderr
    assert "not found" not in compacted.stderr
    assert compacted.stderr == queried.stderr


def test_compact_command_prints_counts(tmp_path):
    write_history(tmp_path)

    result = run_fastsock("compact", "--data-dir", str(tmp_path))

    assert "partitions compacted: 2" in result.stdout
    assert "files: 5 -> 2" in result.stdout
    assert "rows: 10 -> 5" in result.stdout


def test_compact_command_says_a_future_before_is_capped(tmp_path):
    write_history(tmp_path)

    result = run_fastsock("compact", "--data-dir", str(tmp_path), "--before",
                          "2099-01-01")

    assert "partitions compacted: 2" in result.stdout
    assert "--before 2099-01-01 is after the start of the current hour" in result.stderr


def test_compact_command_rejects_table(tmp_path):
    write_history(tmp_path)

    result = run_fastsock("compact", "--data-dir", str(tmp_path), "--table", "nope",
                          check=False)

    assert result.returncode == 2
    assert "unknown table 'nope'" in result.stderr


def test_collector_compacts_at_new_hour(tmp_path):
    write_history(tmp_path)
    collector = Collector(Snapshotter(), ParquetStore(tmp_path))
    collector.flush_hour = PAST_HOUR

    collector.sample()
    assert collector.flush()

    assert len(part_files(partition_dir(tmp_path, "connections", PAST_HOUR))) == 1
    assert collector.flush_hour == current_hour()


def test_collector_no_compact(tmp_path):
    write_history(tmp_path)
    collector = Collector(Snapshotter(), ParquetStore(tmp_path), auto_compact=False)
    collector.flush_hour = PAST_HOUR

    collector.sample()
    assert collector.flush()

    assert len(part_files(partition_dir(tmp_path, "connections", PAST_HOUR))) == 3


def test_collect_accepts_no_compact(tmp_path):
    result = run_fastsock("collect", "--once", "--no-compact",
                          "--data-dir", str(tmp_path))

    assert "files" in result.stderr
    assert list(tmp_path.glob("*/date=*/hour=*/part-*.parquet"))
