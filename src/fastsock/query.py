"""SQL over the Parquet files of a data directory, through in-memory DuckDB views.

For each table of TABLES, two views are created (empty ones, with the table's
columns, for a table that has no files yet):

- ``<table>_records``: every stored record, with the hive partition columns
  ``date`` (DATE) and ``hour`` (INTEGER) taken from the directory names.
- ``<table>``: one row per key column, the record with the latest last_seen.

A damaged Parquet file (truncated, or with a broken footer or data page) is
skipped with a logged warning, and the views read the other files. The check
runs only after DuckDB fails on a read, and its findings last for the process.
"""

import logging
import os
import shlex
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from fastsock.damaged import DAMAGED_FILES, find_damaged_files
from fastsock.errors import NoDataError, QueryError
from fastsock.schema import TABLES

logger = logging.getLogger(__name__)

PARTITION_SCHEMA = pa.schema([("date", pa.date32()), ("hour", pa.int32())])
PARTITION_TYPES_SQL = "{'date': DATE, 'hour': INTEGER}"

# Characters that DuckDB's glob treats specially. A data directory whose path
# contains one cannot be put in a read_parquet glob as it is.
GLOB_CHARACTERS = frozenset("*?[]{}\\")

# Maximum tries of one query, and of creating one table's views. A try that
# fails and finds more damaged files is repeated without them. One check finds
# every damaged footer, so a third try is needed only when a data page is
# damaged as well as a footer.
READ_TRIES_MAX = 3

# Settings that make a connection safe for SQL from an untrusted client. The order
# matters, because temp_directory cannot change once external access is off.
SANDBOX_SETTINGS = (
    # DuckDB 2.0.1 keeps file access open under its temporary directory (./.tmp by
    # default) even with external access off. With no temporary directory, SQL
    # cannot reach any file, and a query too large for memory fails instead of
    # spilling to disk.
    "SET temp_directory = ''",
    # Replacement scans would let SQL read Python variables by name.
    "SET python_enable_replacements = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


def open_database(
    data_dir: "str | os.PathLike[str]",
    *,
    sandboxed: bool = False,
    time_zone: "str | None" = None,
) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB with views over the tables of the data directory.

    A table with no Parquet files yet gets empty views with its columns. With ``sandboxed=True`` the
    connection cannot read or write any file, ATTACH, INSTALL or LOAD, or change
    a setting. Its views read the files through Arrow datasets, and those see
    only the files that existed when this function ran. Open a new connection
    for each client request, because a client's SQL can drop or replace views.
    ``time_zone`` sets DuckDB's TimeZone (an IANA name such as UTC) before the
    configuration is locked.
    """
    root = Path(data_dir).absolute()
    connection = duckdb.connect(":memory:")

    try:
        _create_views(connection, root, sandboxed)
        if time_zone is not None:
            set_time_zone(connection, time_zone)
        if sandboxed:
            _lock_down(connection)
    except BaseException:
        connection.close()
        raise

    return connection


def open_arrow_database(
    sources: "dict[str, object]", *, time_zone: "str | None" = None
) -> duckdb.DuckDBPyConnection:
    """Open a sandboxed in-memory DuckDB with one view per Arrow source.

    ``sources`` maps a view name to a pyarrow Table, RecordBatchReader or
    dataset. The connection is locked down as ``open_database(...,
    sandboxed=True)`` is, so SQL can read the sources and nothing else.
    """
    connection = duckdb.connect(":memory:")
    try:
        for name, source in sources.items():
            connection.register(name, source)
        if time_zone is not None:
            set_time_zone(connection, time_zone)
        _lock_down(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def set_time_zone(connection: duckdb.DuckDBPyConnection, time_zone: str) -> None:
    """Set DuckDB's TimeZone; raises QueryError naming an unknown zone."""
    try:
        connection.execute(f"SET TimeZone = {quote_string(time_zone)}")
    except duckdb.Error as exc:
        raise QueryError(
            f"invalid time zone {time_zone!r}; use an IANA name such as UTC: {exc}"
        ) from exc


def run_query(
    data_dir: "str | os.PathLike[str]", sql: str, *, sandboxed: bool = False
) -> pa.Table:
    """Run ``sql`` over the views of ``data_dir`` and return the result.

    Damaged Parquet files are skipped with a warning (see find_damaged_files).
    Raises NoDataError when no table has files, and QueryError, chained to
    DuckDB's exception, when DuckDB rejects the query or fails to run it.
    """
    root = Path(data_dir)
    check_collected(root)

    if not sql.strip():
        raise QueryError("the query is empty; pass a SQL statement such as SELECT")

    return _run_skipping_damaged(root, sql, sandboxed)


def check_not_file(data_dir: "str | os.PathLike[str]") -> None:
    """Raise NoDataError when data_dir exists but is not a directory."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise NoDataError(
            f"data directory {root} is a file; pass the directory that "
            "`fastsock collect --data-dir` wrote to"
        )


def check_collected(data_dir: "str | os.PathLike[str]") -> None:
    """Raise NoDataError unless data_dir is a directory with collected Parquet files."""
    check_not_file(data_dir)
    root = Path(data_dir)
    if not tables_with_files(root):
        command = f"fastsock collect --data-dir {shlex.quote(str(root))}"
        raise NoDataError(f"nothing collected in {root} yet; run `{command}`")


def _run_skipping_damaged(root: Path, sql: str, sandboxed: bool) -> pa.Table:
    skipped = DAMAGED_FILES.under(root.absolute())
    tries = 0
    while True:
        tries += 1
        connection = open_database(root, sandboxed=sandboxed)
        try:
            return _fetch_arrow(connection, sql)
        except QueryError as error:
            # A SQL error finds no damaged file, so it is raised unchanged.
            found = find_damaged_files(root, error.__cause__)
            if tries == READ_TRIES_MAX or not found or found == skipped:
                raise
            skipped = found
        finally:
            connection.close()


def tables_with_files(data_dir: "str | os.PathLike[str]") -> list[str]:
    """Return the names of the tables in TABLES that have Parquet files."""
    root = Path(data_dir)
    return [name for name in TABLES if _parquet_files(root / name, limit=1)]


def _fetch_arrow(connection: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    # DuckDB raises some errors when the query is planned and others only when
    # the rows are fetched, so both steps are inside the try.
    try:
        relation = connection.sql(sql)
        if relation is None:
            return pa.table({})
        return relation.to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {exc}\nquery: {sql}") from exc


def _create_views(
    connection: duckdb.DuckDBPyConnection, root: Path, sandboxed: bool
) -> None:
    use_datasets = sandboxed or _has_glob_characters(root)
    if use_datasets and not sandboxed:
        logger.warning(
            "data directory %s contains a glob character (one of %s), so the views "
            "see only the files that exist now",
            root,
            "".join(sorted(GLOB_CHARACTERS)),
        )

    with_files = tables_with_files(root)
    for table_name in TABLES:
        if table_name in with_files:
            _create_file_views(connection, root, table_name, use_datasets)
        else:
            source = _register_empty(connection, table_name)
            _create_table_views(connection, table_name, source)


def _create_file_views(
    connection: duckdb.DuckDBPyConnection,
    root: Path,
    table_name: str,
    use_datasets: bool,
) -> None:
    """Create the views of a table over its files, without the damaged ones.

    read_parquet with union_by_name reads every footer when the view is
    created, so a damaged footer fails here, and the view is created again
    without the damaged files that the failure leads to.
    """
    table_dir = root / table_name
    skipped = DAMAGED_FILES.under(table_dir)
    tries = 0
    while True:
        tries += 1
        source = _files_source(connection, table_name, table_dir, use_datasets)
        try:
            _create_table_views(connection, table_name, source)
            return
        except duckdb.Error as error:
            find_damaged_files(root, error)
            found = DAMAGED_FILES.under(table_dir)
            if tries == READ_TRIES_MAX or found == skipped:
                raise QueryError(
                    f"cannot read the {table_name} files under {table_dir}: "
                    f"{error}; move any file that is not a fastsock Parquet file "
                    "out of the data directory"
                ) from error
            skipped = found


def _files_source(
    connection: duckdb.DuckDBPyConnection,
    table_name: str,
    table_dir: Path,
    use_datasets: bool,
) -> str:
    """Return the SQL source of the table's files, without known damaged ones."""
    damaged = DAMAGED_FILES.under(table_dir)
    if not damaged and not use_datasets:
        return _read_parquet_sql(table_dir)

    if damaged:
        logger.debug("skipping %d damaged files under %s", len(damaged), table_dir)
    skipped = set(damaged)
    files = [path for path in _parquet_files(table_dir) if path not in skipped]
    if not files:
        return _register_empty(connection, table_name)
    # read_parquet expands glob characters even in a list of files.
    if use_datasets or any(_has_glob_characters(path) for path in files):
        return _register_dataset(connection, table_name, table_dir, files)
    return _read_parquet_sql(table_dir, files)


def _create_table_views(
    connection: duckdb.DuckDBPyConnection, table_name: str, source: str
) -> None:
    schema, key = TABLES[table_name]
    records = quote_identifier(f"{table_name}_records")

    connection.execute(f"CREATE OR REPLACE VIEW {records} AS SELECT * FROM {source}")

    # The newest record of a key is the current one. A closed record can carry
    # the same last_seen as the checkpoint before it, so closed sorts first on
    # a tie. first_seen is the earliest of all records, because a collector
    # restarted while the entity lived wrote a later first_seen.
    partition = f"PARTITION BY {quote_identifier(key)}"
    order = "last_seen DESC"
    if "closed" in schema.names:
        order += ", closed DESC"
    columns = "*"
    if "first_seen" in schema.names:
        columns = f"* REPLACE (min(first_seen) OVER ({partition}) AS first_seen)"
    connection.execute(
        f"CREATE OR REPLACE VIEW {quote_identifier(table_name)} AS "
        f"SELECT {columns} FROM {records} "
        f"QUALIFY row_number() OVER ({partition} ORDER BY {order}) = 1"
    )


def _read_parquet_sql(table_dir: Path, files: "list[Path] | None" = None) -> str:
    # DuckDB expands the glob at every query, so files written after the
    # connection opened are read too. NOTE: a list of files, used once a file
    # of the table is known to be damaged, does not see files written later.
    if files is None:
        target = quote_string(f"{table_dir}/**/*.parquet")
    else:
        target = "[" + ", ".join(quote_string(str(path)) for path in files) + "]"
    return (
        f"read_parquet({target}, hive_partitioning = true, "
        f"hive_types = {PARTITION_TYPES_SQL}, union_by_name = true)"
    )


def _register_dataset(
    connection: duckdb.DuckDBPyConnection,
    table_name: str,
    table_dir: Path,
    files: list[Path],
) -> str:
    """Register ``files`` of the table as an Arrow dataset; return its SQL name.

    With enable_external_access off, DuckDB 2.0.1 rejects read_parquet on every
    path, including inside views created before the setting changed. Listing the
    data directory in allowed_directories would also let SQL COPY files into it.
    An Arrow dataset is read by pyarrow, outside DuckDB's file system checks, so
    the views work while SQL still cannot name any file.
    """
    schema, _key = TABLES[table_name]

    # The full table schema plays the part of union_by_name: a file without a
    # column reads it as null. NOTE: a column that is in a file but not in the
    # schema is dropped here, while read_parquet would keep it.
    dataset = ds.dataset(
        [str(path) for path in files],
        schema=pa.unify_schemas([schema, PARTITION_SCHEMA]),
        format="parquet",
        partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
        partition_base_dir=str(table_dir),
    )

    name = f"{table_name}_files"
    connection.register(name, dataset)
    return quote_identifier(name)


def _register_empty(connection: duckdb.DuckDBPyConnection, table_name: str) -> str:
    """Register an empty Arrow table with the table's columns; return its SQL name."""
    schema, _key = TABLES[table_name]
    name = f"{table_name}_files"
    connection.register(
        name, pa.unify_schemas([schema, PARTITION_SCHEMA]).empty_table()
    )
    return quote_identifier(name)


def _lock_down(connection: duckdb.DuckDBPyConnection) -> None:
    for statement in SANDBOX_SETTINGS:
        connection.execute(statement)


def _parquet_files(table_dir: Path, limit: "int | None" = None) -> list[Path]:
    files = []
    for path in table_dir.glob("**/*.parquet"):
        if path.is_file():
            files.append(path)
        if limit is not None and len(files) >= limit:
            break
    return sorted(files)


def _has_glob_characters(path: Path) -> bool:
    return any(character in GLOB_CHARACTERS for character in str(path))


def quote_string(text: str) -> str:
    """Return ``text`` as a SQL string literal, with single quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def quote_identifier(name: str) -> str:
    """Return ``name`` as a quoted SQL identifier, with double quotes doubled."""
    return '"' + name.replace('"', '""') + '"'
