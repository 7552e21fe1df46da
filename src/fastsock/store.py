"""Parquet files of fastsock's tables, hive-partitioned by the hour of last_seen.

A row of table T whose ``last_seen`` falls in hour HH (UTC) of day YYYY-MM-DD goes to

    <data dir>/T/date=YYYY-MM-DD/hour=HH/part-<UTC write time>-<pid>-<seq>.parquet

The partition values live only in the directory names, so Spark, Trino and DuckDB
read them back as hive partition columns.

Each file is first written whole under a temporary name that starts with ``.tmp-``
and does not end in ``.parquet``, fsynced, and then renamed into place. Readers that
glob ``*.parquet`` therefore never see half a file, even after a crash.
"""

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fastsock.errors import StoreError
from fastsock.schema import TABLES

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FASTSOCK_DATA_DIR"
ROOT_DATA_DIR = Path("/var/lib/fastsock")

COMPRESSION = "zstd"

# Rows per Parquet row group. This is DuckDB's default (122,880, per the Parquet
# tips page of the DuckDB 2.0 docs), and DuckDB scans row groups in parallel.
ROW_GROUP_ROWS = 122_880

PART_SUFFIX = ".parquet"
TEMP_PREFIX = ".tmp-"

# Temporary file names that this module creates, for example
# ".tmp-part-20240101T101500123456Z-4242-7". Nothing else is ever removed.
TEMP_NAME = re.compile(r"^\.tmp-part-\d{8}T\d{12}Z-(?P<pid>\d+)-\d+$")

# Names of the Parquet files that this module writes, for example
# "part-20240101T101500123456Z-4242-7.parquet". Compaction rewrites only these.
PART_NAME = re.compile(r"^part-\d{8}T\d{12}Z-\d+-\d+\.parquet$")

WRITE_HINT = (
    "the rows were not stored, so free space or make the data directory writable, "
    "then retry"
)
REMOVE_HINT = "make the data directory writable, then retry"

# Sequence numbers keep part names unique among writes of one process.
_sequence = itertools.count()

# Names of the temporary files this process is writing right now. A temporary file
# with this process's pid that is not in the set was left by an earlier process that
# had the same pid, which is common for pid 1 in a container.
_temp_names_in_use: set[str] = set()
_temp_names_lock = threading.Lock()


def default_data_dir() -> Path:
    """Return the data directory to use when none is given.

    The order is ``$FASTSOCK_DATA_DIR``, then /var/lib/fastsock for root, then
    ``$XDG_DATA_HOME/fastsock``, then ~/.local/share/fastsock. A relative
    ``$XDG_DATA_HOME`` is ignored, as the XDG Base Directory spec requires.
    """
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured)

    if os.geteuid() == 0:
        return ROOT_DATA_DIR

    xdg_data_home = os.environ.get("XDG_DATA_HOME")
    if xdg_data_home and os.path.isabs(xdg_data_home):
        return Path(xdg_data_home) / "fastsock"
    return Path.home() / ".local" / "share" / "fastsock"


class ParquetStore:
    """Writer of hive-partitioned Parquet files under one data directory."""

    def __init__(self, data_dir: "str | os.PathLike[str]") -> None:
        self.data_dir = Path(data_dir)
        # Descriptor of the writer lock taken by lock_for_host, held until exit.
        self._lock_fd: int | None = None

    def check_writable(self) -> None:
        """Create the data directory if needed and check that files can be made in it.

        Raises StoreError naming the path and the fix, so a collector fails at
        start instead of at its first flush.
        """
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise StoreError(
                f"data directory {self.data_dir} is a file; pass a directory "
                "with --data-dir or $FASTSOCK_DATA_DIR"
            )

        probe = self.data_dir / f"{TEMP_PREFIX}probe-{os.getpid()}"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StoreError(
                error.errno,
                f"cannot write to data directory {self.data_dir}: {error.strerror}; "
                "pass a writable directory with --data-dir",
            ) from error

    def lock_for_host(self, host: str) -> None:
        """Take the data directory's writer lock for host, for this process's life.

        Two collectors recording one host into one directory would store every
        connection twice. Collectors of different hosts may share a directory.
        Raises StoreError naming the pid that holds the lock.
        """
        digest = hashlib.blake2b(host.encode(), digest_size=4).hexdigest()
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", host)
        path = self.data_dir / f".lock-{name}-{digest}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"another fastsock collector (pid {holder}) records host {host!r} "
                f"into {self.data_dir}; stop it, or pass another --data-dir or "
                "--node-name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def write(self, table_name: str, table: pa.Table) -> list[Path]:
        """Write the rows of ``table`` to one new file per hour of last_seen.

        The table is cast to the schema of ``table_name`` in TABLES. Returns the
        paths written, which is empty for an empty table.

        Raises ValueError for a table name not in TABLES. Raises StoreError when a
        column is missing, extra or of an incompatible type, or when a file cannot
        be written. A write error carries the errno and the path. The files that
        this call already renamed into place are then removed again, and files
        from earlier writes are not touched, so the caller can keep the rows and
        retry the same write.
        """
        schema = _schema_of(table_name)
        conformed = conform_table(table_name, table, schema)

        written: list[Path] = []
        try:
            for partition, part in split_by_hour(conformed):
                directory = self.data_dir / table_name / partition
                written.append(_write_part(directory, part))
        except StoreError:
            _remove_written_parts(written)
            raise

        return written

    def read_recent(
        self, table_name: str, columns: list[str], since: datetime, host: str
    ) -> pa.Table:
        """Return columns of host's rows of table_name stored since ``since``.

        Reads the hourly partitions from since's hour to the current one: the
        closed records (rows with ``closed`` true) with last_seen at or after
        since, and every row of the newest file, the last checkpoint of what
        was open. Older checkpoints repeat the open records at every flush,
        so they are skipped. A file that cannot be read is skipped with a
        warning: these rows are a hint, and the files are left alone.
        """
        schema = _schema_of(table_name)
        selected = pa.schema([schema.field(name) for name in columns])
        paths = []
        hour = since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        now = datetime.now(timezone.utc)
        while hour <= now:
            partition = f"date={hour:%Y-%m-%d}/hour={hour:%H}"
            paths.extend(
                (self.data_dir / table_name / partition).glob(f"*{PART_SUFFIX}")
            )
            hour += timedelta(hours=1)
        # Part names start with their UTC write time, so the newest sorts last.
        paths.sort(key=lambda path: path.name)
        parts = [selected.empty_table()]
        for position, path in enumerate(paths):
            closed_only = position < len(paths) - 1
            parts.append(_recent_rows(path, selected, since, host, closed_only))
        return pa.concat_tables(parts)

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files left by writers that were killed mid-write.

        Only names that this module creates are considered, and a file is kept
        while the process named by the pid in its name still runs. Returns the
        number of files deleted.
        """
        removed = 0
        for path in self._temp_files():
            if not _is_stale(path.name):
                continue

            try:
                path.unlink()
            except FileNotFoundError:
                # Another process cleaning the same directory removed it first.
                continue
            except OSError as exc:
                raise _store_error(
                    exc, path, "remove stale temporary file", REMOVE_HINT
                ) from exc
            removed += 1

        if removed:
            logger.info(
                "removed %d stale temporary files under %s", removed, self.data_dir
            )
        return removed

    def _temp_files(self) -> Iterator[Path]:
        for table_name in TABLES:
            table_dir = self.data_dir / table_name
            yield from table_dir.glob(f"date=*/hour=*/{TEMP_PREFIX}part-*")


def conform_table(table_name: str, table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with the columns of ``schema``, in its order and types.

    A dictionary-encoded column of the schema's value type is kept encoded.
    Raises StoreError naming the column when one is missing, is not in the schema,
    cannot be cast safely, or when last_seen has nulls.
    """
    _check_column_names(table_name, table, schema)

    columns = [_cast_column(table_name, table, field) for field in schema]
    fields = [field.with_type(column.type) for field, column in zip(schema, columns)]
    conformed = pa.Table.from_arrays(columns, schema=pa.schema(fields))

    null_count = conformed.column("last_seen").null_count
    if null_count:
        raise StoreError(
            f"column 'last_seen' of table {table_name!r} has {null_count} null values; "
            f"every row needs last_seen to choose its hourly partition"
        )
    return conformed


def split_by_hour(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """Yield ``(partition directory, rows)`` for each UTC hour of last_seen.

    The partition directory is relative, for example ``date=2024-01-01/hour=09``.
    ``last_seen`` must be a timestamp in UTC with no nulls.
    """
    hours = pc.floor_temporal(table.column("last_seen"), unit="hour")
    distinct = sorted(pc.unique(hours).to_pylist())
    if len(distinct) == 1:
        # The usual flush: no filter, which would copy every row.
        hour = distinct[0]
        yield f"date={hour:%Y-%m-%d}/hour={hour:%H}", table
        return

    for hour in distinct:
        rows = table.filter(pc.equal(hours, pa.scalar(hour, type=hours.type)))
        yield f"date={hour:%Y-%m-%d}/hour={hour:%H}", rows


def write_part(directory: Path, rows: pa.Table) -> Path:
    """Write ``rows`` to one new part file in ``directory`` and return its path.

    The file is written under a temporary name, fsynced and renamed, as by
    ParquetStore.write. ``rows`` must already have the table's schema. Raises
    StoreError carrying the errno and the path when the file cannot be written.
    """
    return _write_part(directory, rows)


def _recent_rows(
    path: Path, selected: pa.Schema, since: datetime, host: str, closed_only: bool
) -> pa.Table:
    """Return the selected columns of one file's rows of host since ``since``."""
    filters = [("host", "=", host), ("last_seen", ">=", since)]
    if closed_only:
        filters.append(("closed", "=", True))
    try:
        rows = pq.read_table(
            path,
            columns=list(dict.fromkeys([*selected.names, "host", "last_seen"])),
            filters=filters,
        )
    except (pa.ArrowException, OSError) as error:
        logger.warning("skipping %s, which cannot be read: %s", path, error)
        return selected.empty_table()
    return rows.select(selected.names).cast(selected)


def _schema_of(table_name: str) -> pa.Schema:
    if table_name not in TABLES:
        raise ValueError(
            f"unknown table {table_name!r}; expected one of {', '.join(TABLES)}"
        )
    schema, _key = TABLES[table_name]
    return schema


def _check_column_names(table_name: str, table: pa.Table, schema: pa.Schema) -> None:
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise StoreError(
            f"table {table_name!r} is missing column(s) {', '.join(missing)}; "
            f"add them, with nulls where the value is unknown"
        )

    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise StoreError(
            f"column(s) {', '.join(extra)} are not in the schema of table "
            f"{table_name!r}; drop them or add them to fastsock.schema"
        )


def _cast_column(table_name: str, table: pa.Table, field: pa.Field) -> pa.ChunkedArray:
    column = table.column(field.name)
    if column.type == field.type:
        return column
    if pa.types.is_dictionary(column.type) and column.type.value_type == field.type:
        # Encoded text is written as it is: Parquet stores it as text, and a
        # cast would copy every value of the column.
        return column

    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise StoreError(
            f"column {field.name!r} of table {table_name!r} has type {column.type}, "
            f"which cannot be cast to {field.type}: {exc}"
        ) from exc


def _write_part(directory: Path, rows: pa.Table) -> Path:
    data = _encode_parquet(rows)

    try:
        _make_dirs(directory)
    except OSError as exc:
        raise _store_error(
            exc, directory, "create partition directory", WRITE_HINT
        ) from exc

    name = _next_part_name()
    final_path = directory / f"{name}{PART_SUFFIX}"
    _write_atomically(directory / f"{TEMP_PREFIX}{name}", final_path, data)

    logger.debug("wrote %d rows to %s", rows.num_rows, final_path)
    return final_path


def _encode_parquet(rows: pa.Table) -> pa.Buffer:
    # Encoding to memory first keeps encoding errors apart from I/O errors, and
    # the file is then written with plain os calls whose OSError keeps its errno.
    sink = pa.BufferOutputStream()
    # Without the Arrow schema in the file, readers see dictionary-encoded
    # columns as plain text, like the rest of the store.
    pq.write_table(
        rows,
        sink,
        compression=COMPRESSION,
        row_group_size=ROW_GROUP_ROWS,
        store_schema=False,
    )
    return sink.getvalue()


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, fsyncing each new entry."""
    missing = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        current = current.parent

    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            # A concurrent writer created the same partition directory.
            continue
        _fsync_dir(path.parent)


def _next_part_name() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"part-{stamp}-{os.getpid()}-{next(_sequence)}"


def _write_atomically(temp_path: Path, final_path: Path, data: pa.Buffer) -> None:
    """Write ``data`` to ``temp_path``, fsync it and rename it to ``final_path``.

    On failure neither path is left behind.
    """
    with _temp_names_lock:
        _temp_names_in_use.add(temp_path.name)

    renamed = False
    try:
        _write_and_fsync(temp_path, data)
        os.rename(temp_path, final_path)
        renamed = True
        _fsync_dir(final_path.parent)
    except OSError as exc:
        _remove_quietly(final_path if renamed else temp_path)
        raise _store_error(exc, final_path, "write Parquet file", WRITE_HINT) from exc
    finally:
        with _temp_names_lock:
            _temp_names_in_use.discard(temp_path.name)


def _write_and_fsync(path: Path, data: pa.Buffer) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        remaining = memoryview(data)
        while remaining:
            written = os.write(fd, remaining)
            remaining = remaining[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s after a failed write: %s", path, exc)


def _remove_written_parts(paths: list[Path]) -> None:
    # A part that cannot be removed here stays readable. Its rows are then stored
    # twice after a retry, and the DuckDB views keep one record per key.
    for path in paths:
        _remove_quietly(path)


def _store_error(exc: OSError, path: Path, action: str, hint: str) -> StoreError:
    """Wrap ``exc`` so that the message names the action, errno and fix.

    The StoreError keeps the errno and the path as its ``errno`` and ``filename``.
    """
    code = errno.errorcode.get(exc.errno, "unknown errno") if exc.errno else "no errno"
    message = f"cannot {action} ({code}: {exc.strerror}); {hint}"
    return StoreError(exc.errno, message, str(path))


def _is_stale(temp_name: str) -> bool:
    match = TEMP_NAME.match(temp_name)
    if match is None:
        return False

    pid = int(match["pid"])
    if pid == os.getpid():
        with _temp_names_lock:
            return temp_name not in _temp_names_in_use
    return not _process_exists(pid)


def _process_exists(pid: int) -> bool:
    # NOTE: the pid is looked up in this process's pid namespace. A writer in
    # another container that shares the data directory looks dead from here.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    return True
