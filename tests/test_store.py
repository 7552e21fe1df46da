"""Tests of ParquetStore against real Parquet files under tmp_path."""

import errno
import os
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastsock import store as store_module
from fastsock.errors import StoreError
from fastsock.schema import TABLES
from fastsock.store import ParquetStore, default_data_dir

PART_NAME = re.compile(r"^part-\d{8}T\d{12}Z-\d+-\d+\.parquet$")


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=timezone.utc)


def make_table(table_name: str, rows: list[dict]) -> pa.Table:
    """Build a table with the schema of ``table_name``, null where a row has no key."""
    schema, _key = TABLES[table_name]
    return pa.Table.from_pylist(rows, schema=schema)


def connection_rows(count: int, last_seen: datetime, first_id: int = 1) -> list[dict]:
    return [
        {
            "host": "node-a",
            "conn_id": conn_id,
            "protocol": "tcp",
            "local_addr": "127.0.0.1",
            "local_port": 40000 + conn_id,
            "remote_addr": "127.0.0.1",
            "remote_port": 5432,
            "state": "ESTABLISHED",
            "pids": [1000 + conn_id],
            "first_seen": last_seen - timedelta(minutes=1),
            "last_seen": last_seen,
        }
        for conn_id in range(first_id, first_id + count)
    ]


def all_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def temp_files(root: Path) -> list[Path]:
    return [path for path in all_files(root) if path.name.startswith(".tmp-")]


def finished_pid() -> int:
    """Return the pid of a child process that has already exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs under tmp_path, or skip the test if mount fails."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = []

    def mount(options: str) -> Path:
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    def remount_read_only() -> None:
        command = ["mount", "-o", "remount,ro", str(mount_point)]
        subprocess.run(command, check=True, capture_output=True)

    mount.remount_read_only = remount_read_only
    yield mount

    if mounted:
        result = subprocess.run(["umount", str(mount_point)], capture_output=True)
        if result.returncode != 0:
            # A file still open on the mount keeps it busy; detach it now and
            # let the kernel free it when the last file closes.
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_default_data_dir_from_env(monkeypatch):
    monkeypatch.setenv("FASTSOCK_DATA_DIR", "/srv/fastsock")

    assert default_data_dir() == Path("/srv/fastsock")


def test_default_data_dir_for_root(monkeypatch):
    monkeypatch.delenv("FASTSOCK_DATA_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    assert default_data_dir() == Path("/var/lib/fastsock")


def test_default_data_dir_for_user(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTSOCK_DATA_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))

    monkeypatch.setenv("XDG_DATA_HOME", "/data/xdg")
    assert default_data_dir() == Path("/data/xdg/fastsock")

    monkeypatch.setenv("XDG_DATA_HOME", "relative/xdg")
    assert default_data_dir() == tmp_path / ".local/share/fastsock"

    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == tmp_path / ".local/share/fastsock"


def test_write_partitions_by_hour(tmp_path):
    rows = [
        *connection_rows(2, at(1, 10, 15)),
        *connection_rows(1, at(1, 10, 59), first_id=3),
        *connection_rows(1, at(1, 11, 0), first_id=4),
        *connection_rows(1, at(2, 0, 30), first_id=5),
    ]

    paths = ParquetStore(tmp_path).write("connections", make_table("connections", rows))

    partitions = [path.parent.relative_to(tmp_path).as_posix() for path in paths]
    assert partitions == [
        "connections/date=2024-03-01/hour=10",
        "connections/date=2024-03-01/hour=11",
        "connections/date=2024-03-02/hour=00",
    ]
    assert [pq.read_table(path).num_rows for path in paths] == [3, 1, 1]
    for path in paths:
        assert PART_NAME.match(path.name), path.name


def test_write_keeps_partition_values_out_of_files(tmp_path):
    table = make_table("connections", connection_rows(1, at(1, 10)))

    [path] = ParquetStore(tmp_path).write("connections", table)

    names = pq.ParquetFile(path).schema_arrow.names
    assert names == TABLES["connections"][0].names
    assert "date" not in names
    assert "hour" not in names


def test_write_uses_zstd(tmp_path):
    table = make_table("connections", connection_rows(3, at(1, 10)))

    [path] = ParquetStore(tmp_path).write("connections", table)

    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 1
    assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_write_leaves_no_temp_file(tmp_path):
    table = make_table("connections", connection_rows(3, at(1, 10)))

    paths = ParquetStore(tmp_path).write("connections", table)

    assert temp_files(tmp_path) == []
    assert all_files(tmp_path) == sorted(paths)


def test_write_file_names_are_unique(tmp_path):
    table = make_table("connections", connection_rows(1, at(1, 10)))
    store = ParquetStore(tmp_path)

    paths = [path for _ in range(5) for path in store.write("connections", table)]

    assert len(set(paths)) == 5
    assert all_files(tmp_path) == sorted(paths)


def test_write_empty_table(tmp_path):
    empty = make_table("connections", [])

    assert ParquetStore(tmp_path).write("connections", empty) == []
    assert all_files(tmp_path) == []


def test_files_readable_by_duckdb_hive(tmp_path):
    rows = [*connection_rows(2, at(1, 9, 5)), *connection_rows(1, at(1, 23), 3)]
    ParquetStore(tmp_path).write("connections", make_table("connections", rows))

    pattern = f"{tmp_path}/connections/**/*.parquet"
    result = duckdb.sql(
        f"select conn_id, date, hour, last_seen from read_parquet('{pattern}', "
        f"hive_partitioning=true) order by conn_id"
    ).fetchall()

    assert [(row[0], str(row[1]), int(row[2])) for row in result] == [
        (1, "2024-03-01", 9),
        (2, "2024-03-01", 9),
        (3, "2024-03-01", 23),
    ]
    assert [row[3] for row in result] == [at(1, 9, 5), at(1, 9, 5), at(1, 23)]


def test_write_casts_compatible_types(tmp_path):
    row = {"process_id": 7, "pid": 7, "last_seen": at(1, 8)}
    table = make_table("processes", [row])
    narrowed = table.set_column(
        table.schema.get_field_index("process_id"),
        "process_id",
        table.column("process_id").cast(pa.int32()),
    )
    millisecond = narrowed.set_column(
        narrowed.schema.get_field_index("last_seen"),
        "last_seen",
        narrowed.column("last_seen").cast(pa.timestamp("ms", tz="UTC")),
    )

    [path] = ParquetStore(tmp_path).write("processes", millisecond)

    stored = pq.read_table(path)
    assert stored.schema == TABLES["processes"][0]
    assert stored.column("last_seen").to_pylist() == [at(1, 8)]


def test_write_rejects_incompatible_column(tmp_path):
    table = make_table("connections", connection_rows(1, at(1, 10)))
    bad = table.set_column(
        table.schema.get_field_index("local_port"),
        "local_port",
        pa.array(["http"]),
    )

    with pytest.raises(StoreError, match="local_port"):
        ParquetStore(tmp_path).write("connections", bad)
    assert all_files(tmp_path) == []


def test_write_rejects_missing_column(tmp_path):
    table = make_table("connections", connection_rows(1, at(1, 10))).drop_columns(
        ["netns"]
    )

    with pytest.raises(StoreError, match="missing column.*netns"):
        ParquetStore(tmp_path).write("connections", table)


def test_write_rejects_extra_column(tmp_path):
    table = make_table("connections", connection_rows(1, at(1, 10)))
    extra = table.append_column("color", pa.array(["blue"]))

    with pytest.raises(StoreError, match="color"):
        ParquetStore(tmp_path).write("connections", extra)


def test_write_rejects_null_last_seen(tmp_path):
    table = make_table("processes", [{"process_id": 1, "last_seen": None}])

    with pytest.raises(StoreError, match="last_seen"):
        ParquetStore(tmp_path).write("processes", table)


def test_write_rejects_unknown_table(tmp_path):
    table = make_table("processes", [{"process_id": 1, "last_seen": at(1, 1)}])

    with pytest.raises(ValueError, match="'sockets'.*connections"):
        ParquetStore(tmp_path).write("sockets", table)


def test_remove_stale_temp_files(tmp_path):
    store = ParquetStore(tmp_path)
    [kept_part] = store.write(
        "connections", make_table("connections", connection_rows(1, at(1, 10)))
    )
    partition = kept_part.parent
    stamp = "20240301T100000000000Z"

    dead_writer = partition / f".tmp-part-{stamp}-{finished_pid()}-3"
    earlier_self = partition / f".tmp-part-{stamp}-{os.getpid()}-999999"
    live_writer = partition / f".tmp-part-{stamp}-{os.getppid()}-4"
    foreign = partition / ".tmp-other-file"
    for path in (dead_writer, earlier_self, live_writer, foreign):
        path.write_bytes(b"partial")

    assert store.remove_stale_temp_files() == 2

    assert not dead_writer.exists()
    assert not earlier_self.exists()
    assert live_writer.exists()
    assert foreign.exists()
    assert kept_part.exists()


def test_remove_stale_temp_files_without_data(tmp_path):
    assert ParquetStore(tmp_path / "missing").remove_stale_temp_files() == 0


def test_write_error_removes_temp_file(tmp_path, monkeypatch):
    store = ParquetStore(tmp_path)
    table = make_table("connections", connection_rows(1, at(1, 10)))
    [earlier] = store.write("connections", table)

    def fail_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.os, "fsync", fail_fsync)
    with pytest.raises(StoreError) as caught:
        store.write("connections", table)

    assert caught.value.errno == errno.ENOSPC
    assert "ENOSPC" in str(caught.value)
    assert caught.value.filename.startswith(str(earlier.parent))
    assert all_files(tmp_path) == [earlier]


def test_write_error_removes_earlier_parts(tmp_path, monkeypatch):
    rows = [*connection_rows(1, at(1, 10)), *connection_rows(1, at(1, 11), 2)]
    table = make_table("connections", rows)
    real_rename = os.rename
    renames = []

    def rename_once(source, destination):
        if renames:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        renames.append(destination)
        real_rename(source, destination)

    monkeypatch.setattr(store_module.os, "rename", rename_once)
    with pytest.raises(StoreError, match="EIO"):
        ParquetStore(tmp_path).write("connections", table)

    assert len(renames) == 1
    assert all_files(tmp_path) == []


@pytest.mark.root
def test_write_to_read_only_dir(tmpfs):
    data_dir = tmpfs("size=1m")
    store = ParquetStore(data_dir)
    table = make_table("connections", connection_rows(2, at(1, 10)))
    [earlier] = store.write("connections", table)
    tmpfs.remount_read_only()

    with pytest.raises(StoreError) as caught:
        store.write("connections", table)

    assert caught.value.errno == errno.EROFS
    assert "EROFS" in str(caught.value)
    assert all_files(data_dir) == [earlier]
    assert pq.read_table(earlier).num_rows == 2


@pytest.mark.root
def test_write_to_full_disk(tmpfs):
    data_dir = tmpfs("size=256k")
    store = ParquetStore(data_dir)
    small = make_table("connections", connection_rows(2, at(1, 10)))
    [earlier] = store.write("connections", small)
    fill_disk(data_dir / "filler")
    large = make_table("connections", connection_rows(2000, at(1, 10), first_id=10))

    with pytest.raises(StoreError) as caught:
        store.write("connections", large)

    assert caught.value.errno == errno.ENOSPC
    assert "ENOSPC" in str(caught.value)
    assert temp_files(data_dir) == []
    assert pq.read_table(earlier).num_rows == 2


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem reports ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_host_locks_do_not_collide(tmp_path):
    first = ParquetStore(tmp_path)
    second = ParquetStore(tmp_path)
    third = ParquetStore(tmp_path)

    first.lock_for_host("a/b")
    second.lock_for_host("a_b")

    with pytest.raises(StoreError, match="'a/b'"):
        third.lock_for_host("a/b")
