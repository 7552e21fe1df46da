"""Compaction: merge the part files of each past hourly partition into one file.

Every flush adds one part file per table and hour, so a partition of a past hour
can hold hundreds of small files, and every query opens each of them. Compaction
rewrites such a partition as one file that keeps, for each key, only the record
that the DuckDB views of fastsock.query select: the largest ``last_seen``, a
``closed`` record first on a tie, with the earliest ``first_seen`` of the key.
Queries of the views therefore return the same rows before and after.

The new file is written under a temporary name, fsynced and renamed before any
old file is removed. A crash in between leaves the old files next to the new
one. The views still keep one record per key, and the next compaction merges
them all. Only files named as ParquetStore writes them (store.PART_NAME) are
read or removed, and the partition of the current hour is never touched.

NOTE: a query that listed a partition's files before they were removed and
opens them after fails with a file-not-found error, and a retry reads the new
file.
"""

import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from fastsock.errors import NoDataError, StoreError
from fastsock.query import check_not_file, quote_identifier
from fastsock.schema import TABLES
from fastsock.store import PART_NAME, conform_table, write_part

logger = logging.getLogger(__name__)

HOUR = timedelta(hours=1)

# Lock file in the data directory that one compaction at a time holds.
LOCK_NAME = ".lock-compact"

PARTITION_DATE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
PARTITION_HOUR = re.compile(r"^hour=(\d{2})$")

# Column that numbers the records in the order their files were written, so the
# later record of a key wins a tie the views leave open.
ORDER_COLUMN = "__compaction_order"

# Test seam: called with the new file's path after it is renamed into place and
# before the old files are removed.
after_rename: Callable[[Path], None] | None = None


@dataclass
class CompactionReport:
    """Counts of one compaction run, summed over the partitions it rewrote."""

    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    # Part files that could not be read or merged, left in place.
    skipped_files: list[Path] = field(default_factory=list)
    # Old part files that could not be removed after their rows were rewritten.
    unremoved_files: list[Path] = field(default_factory=list)
    # True when another process held the compaction lock and wait was False.
    locked_out: bool = False

    def line(self) -> str:
        """Return a one-line summary for a terminal or a log."""
        return (
            f"compacted {self.partitions} partitions: "
            f"files {self.files_before} -> {self.files_after}, "
            f"rows {self.rows_before} -> {self.rows_after}, "
            f"skipped files {len(self.skipped_files)}"
        )


@dataclass
class Partition:
    """One hourly partition directory of a table."""

    table_name: str
    directory: Path
    hour: datetime


def compact(
    data_dir: "str | os.PathLike[str]",
    table: "str | None" = None,
    before: "datetime | None" = None,
    *,
    wait: bool = True,
) -> CompactionReport:
    """Merge the part files of each hourly partition older than ``before``.

    A partition qualifies when its whole hour ends at or before ``before``
    (default and upper bound: the start of the current UTC hour) and it
    contains more than one part file. ``table`` limits the run to one table of
    TABLES. A naive ``before`` is taken as UTC. With ``wait=False`` the call returns at
    once, with ``locked_out`` set, when another compaction holds the lock.

    Raises ValueError for an unknown table, NoDataError when the data directory
    does not exist or is a file, and StoreError when the new file cannot be
    written.
    """
    root = Path(data_dir)
    table_names = _table_names(table)
    check_not_file(root)
    if not root.is_dir():
        raise NoDataError(
            f"data directory {root} not found; pass the directory that "
            "`fastsock collect --data-dir` wrote to"
        )
    cutoff = _cutoff(before)

    report = CompactionReport()
    lock_fd = _lock(root, wait)
    if lock_fd is None:
        logger.info("skipped compaction of %s: another process holds its lock", root)
        report.locked_out = True
        return report

    try:
        for partition in _partitions(root, table_names):
            if partition.hour + HOUR <= cutoff:
                compact_partition(partition, report)
    finally:
        os.close(lock_fd)
    return report


def compact_partition(partition: Partition, report: CompactionReport) -> None:
    """Rewrite the part files of one partition as one file; add to ``report``."""
    paths = _part_files(partition.directory)
    if len(paths) < 2:
        return

    tables, merged_paths = _read_parts(partition.table_name, paths, report)
    if len(merged_paths) < 2:
        return
    rows = pa.concat_tables(tables)
    newest = newest_per_key(partition.table_name, rows)

    new_path = None
    if newest.num_rows:
        new_path = write_part(partition.directory, newest)
    if after_rename is not None and new_path is not None:
        after_rename(new_path)

    _remove_parts(merged_paths, report)

    report.partitions += 1
    report.files_before += len(merged_paths)
    report.files_after += 0 if new_path is None else 1
    report.rows_before += rows.num_rows
    report.rows_after += newest.num_rows
    logger.info(
        "compacted %s/%s/%s: %d files with %d rows into %s with %d rows",
        partition.table_name,
        partition.directory.parent.name,
        partition.directory.name,
        len(merged_paths),
        rows.num_rows,
        new_path.name if new_path is not None else "no file",
        newest.num_rows,
    )


def newest_per_key(table_name: str, rows: pa.Table) -> pa.Table:
    """Return the record per key that the views select, with the key's first_seen.

    ``rows`` must have the schema of ``table_name``, in the order the records
    were written. The result is sorted by last_seen and key, which keeps the
    row group statistics of last_seen narrow.
    """
    schema, key = TABLES[table_name]
    numbered = rows.append_column(ORDER_COLUMN, pa.array(range(rows.num_rows)))

    key_sql = quote_identifier(key)
    order = "last_seen DESC"
    if "closed" in schema.names:
        order += ", closed DESC"
    order += f", {ORDER_COLUMN} DESC"
    replace = ""
    if "first_seen" in schema.names:
        window = f"OVER (PARTITION BY {key_sql})"
        replace = f" REPLACE (min(first_seen) {window} AS first_seen)"

    sql = (
        f"SELECT * EXCLUDE ({ORDER_COLUMN}){replace} FROM numbered "
        f"QUALIFY row_number() OVER (PARTITION BY {key_sql} ORDER BY {order}) = 1 "
        f"ORDER BY last_seen, {key_sql}"
    )
    connection = duckdb.connect(":memory:")
    try:
        connection.register("numbered", numbered)
        newest = connection.sql(sql).to_arrow_table()
    finally:
        connection.close()

    return conform_table(table_name, newest, schema)


def _table_names(table: "str | None") -> list[str]:
    if table is None:
        return list(TABLES)
    if table not in TABLES:
        raise ValueError(
            f"unknown table {table!r}; expected one of {', '.join(TABLES)}"
        )
    return [table]


def _cutoff(before: "datetime | None") -> datetime:
    """Return the time before which a partition's hour must end, in UTC."""
    now = datetime.now(timezone.utc)
    current_hour = now.replace(minute=0, second=0, microsecond=0)
    if before is None:
        return current_hour
    if before.tzinfo is None:
        before = before.replace(tzinfo=timezone.utc)
    return min(before.astimezone(timezone.utc), current_hour)


def _lock(root: Path, wait: bool) -> "int | None":
    """Take the data directory's compaction lock; None when held and not waiting."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(
            exc.errno,
            f"cannot open the compaction lock {path}: {exc.strerror}; "
            "make the data directory writable, then retry",
            str(path),
        ) from exc

    flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _partitions(root: Path, table_names: list[str]) -> Iterator[Partition]:
    """Yield the hourly partitions of the tables, oldest first per table."""
    for table_name in table_names:
        table_dir = root / table_name
        if not table_dir.is_dir():
            continue

        found = []
        for directory in table_dir.glob("date=*/hour=*"):
            hour = _partition_hour(directory)
            if hour is None:
                logger.debug("skipped %s: not a date=/hour= partition", directory)
                continue
            found.append(Partition(table_name, directory, hour))
        yield from sorted(found, key=lambda partition: partition.hour)


def _partition_hour(directory: Path) -> "datetime | None":
    date_match = PARTITION_DATE.match(directory.parent.name)
    hour_match = PARTITION_HOUR.match(directory.name)
    if date_match is None or hour_match is None or not directory.is_dir():
        return None

    try:
        day = date.fromisoformat(date_match.group(1))
        hour = int(hour_match.group(1))
        return datetime(day.year, day.month, day.day, hour, tzinfo=timezone.utc)
    except ValueError:
        return None


def _part_files(directory: Path) -> list[Path]:
    # Part names start with their UTC write time, so name order is write order
    # among the files of one writer, and close to it across writers.
    paths = []
    for path in directory.iterdir():
        if PART_NAME.match(path.name):
            paths.append(path)
        elif path.suffix == ".parquet":
            # Queries read every *.parquet file, so a foreign one breaks them.
            logger.warning(
                "%s is not a file fastsock wrote, so compaction leaves it alone; "
                "queries read it too, so move it out of the data directory if it "
                "is not a fastsock Parquet file",
                path,
            )
    return sorted(path for path in paths if path.is_file())


def _read_parts(
    table_name: str, paths: list[Path], report: CompactionReport
) -> tuple[list[pa.Table], list[Path]]:
    """Read and conform each part file; skip and count those that fail."""
    schema, _key = TABLES[table_name]
    tables, read_paths = [], []
    for path in paths:
        try:
            with pq.ParquetFile(path) as parquet_file:
                table = parquet_file.read()
        except FileNotFoundError:
            # Another compaction removed it after merging its rows elsewhere.
            logger.debug("part file %s vanished before it was read", path)
            continue
        except (OSError, pa.ArrowException) as exc:
            logger.warning(
                "skipped unreadable part file %s, left in place: %s", path, exc
            )
            report.skipped_files.append(path)
            continue

        try:
            completed = _add_missing_columns(table, schema)
            table = conform_table(table_name, completed, schema)
        except StoreError as exc:
            logger.warning(
                "skipped part file %s, left in place, because its columns do not "
                "match the schema of %s: %s",
                path,
                table_name,
                exc,
            )
            report.skipped_files.append(path)
            continue

        tables.append(table)
        read_paths.append(path)
    return tables, read_paths


def _add_missing_columns(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Add the schema's columns that a file from an older schema lacks, as nulls."""
    for schema_field in schema:
        if schema_field.name not in table.column_names:
            table = table.append_column(
                schema_field, pa.nulls(table.num_rows, schema_field.type)
            )
    return table


def _remove_parts(paths: list[Path], report: CompactionReport) -> None:
    # A file that stays behind only repeats records of the new file, which the
    # views deduplicate and the next compaction merges again.
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove compacted part file %s: %s", path, exc)
            report.unremoved_files.append(path)
