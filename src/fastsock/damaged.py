"""Parquet files of the store that fail to read, found after a failed query.

A damaged file (truncated, or with a broken footer or data page) is
recorded here and skipped by the views that fastsock.query builds, so
queries still read the other files. The files themselves are never
changed, moved or deleted.
"""

import logging
import os
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from fastsock.schema import TABLES

logger = logging.getLogger(__name__)

# Paths of damaged files named in one warning; the rest are only counted.
WARNING_PATHS_MAX = 3


class DamagedFiles:
    """The Parquet files found damaged in this process, with the size and mtime seen.

    An entry holds only while its file keeps that size and mtime, so a file
    that is replaced, repaired or moved away is read again. The agent runs
    pulls in threads, so every method takes a lock.
    """

    def __init__(self) -> None:
        self._stats: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def add(self, path: Path) -> bool:
        """Record ``path``; return False when it was known already, or is gone."""
        try:
            stat = _size_and_mtime(path)
        except FileNotFoundError:
            return False
        with self._lock:
            known = self._stats.get(path) == stat
            self._stats[path] = stat
        return not known

    def contains(self, path: Path) -> bool:
        with self._lock:
            seen = self._stats.get(path)
        if seen is None:
            return False
        try:
            if _size_and_mtime(path) == seen:
                return True
        except FileNotFoundError:
            pass
        with self._lock:
            self._stats.pop(path, None)
        return False

    def under(self, directory: Path) -> list[Path]:
        """Return the sorted damaged files under ``directory`` (an absolute path)."""
        with self._lock:
            paths = [path for path in self._stats if path.is_relative_to(directory)]
        return sorted(path for path in paths if self.contains(path))


DAMAGED_FILES = DamagedFiles()


def find_damaged_files(
    data_dir: "str | os.PathLike[str]", error: "BaseException | None"
) -> list[Path]:
    """Check the Parquet files of ``data_dir`` after ``error``, return the damaged.

    Runs only when ``error`` looks like a failed Parquet read, so an error of
    the SQL returns an empty list at once. Files found damaged are recorded in
    DAMAGED_FILES, which views opened later skip, and logged as a warning. The
    files themselves are never changed, moved or deleted. Returns every known
    damaged file under ``data_dir``, sorted.
    """
    root = Path(data_dir).absolute()
    files = _store_files(root)
    if error is None or not _is_read_error(error, files):
        return []

    unchecked = [path for path in files if not DAMAGED_FILES.contains(path)]
    damaged = _damaged_files(unchecked, str(error))
    # Pulls run in parallel threads, so another one may have recorded a file
    # first; only the thread that records it logs it.
    recorded = {path: damaged[path] for path in damaged if DAMAGED_FILES.add(path)}
    if recorded:
        _warn_damaged(root, recorded)
    return DAMAGED_FILES.under(root)


def _is_read_error(error: BaseException, files: list[Path]) -> bool:
    # In DuckDB 2.0.1 a Thrift decoding error of the Parquet reader arrives as
    # the base duckdb.Error, while parser, binder and catalog errors are subclasses.
    if type(error) is duckdb.Error:
        return True
    message = str(error)
    lowered = message.lower()
    if "parquet" in lowered or "thrift" in lowered:
        return True
    return any(str(path) in message for path in files)


def _damaged_files(paths: list[Path], message: str) -> dict[Path, str]:
    """Return the damaged files of ``paths``, each with what failed on it."""
    damaged = _failures(paths, _read_footer)
    if damaged:
        return damaged

    # Every footer is readable, so the damage is in a data page. Reading whole files
    # is as slow as a full scan, so only the files that the error names are
    # read, or every file when it names none.
    named = [path for path in paths if str(path) in message]
    return _failures(named or paths, _read_pages)


def _failures(paths: list[Path], read) -> dict[Path, str]:
    failures = {}
    for path in paths:
        try:
            read(path)
        except FileNotFoundError:
            # Removed since it was listed (by `fastsock compact`, say): not damage.
            continue
        except (pa.ArrowException, OSError) as error:
            failures[path] = str(error).strip()
    return failures


def _read_footer(path: Path) -> None:
    pq.read_metadata(path)


def _read_pages(path: Path) -> None:
    with pq.ParquetFile(path) as parquet_file:
        for _batch in parquet_file.iter_batches():
            pass


def _warn_damaged(root: Path, damaged: dict[Path, str]) -> None:
    paths = sorted(damaged)
    listed = ", ".join(str(path) for path in paths[:WARNING_PATHS_MAX])
    if len(paths) > WARNING_PATHS_MAX:
        listed += f" and {len(paths) - WARNING_PATHS_MAX} more"
    reason = _one_line(damaged[paths[0]])
    if len(paths) > 1:
        reason = f"{paths[0].name}: {reason}"

    logger.warning(
        "skipping %d damaged Parquet %s: %s (%s). Queries read the other files "
        "and leave the damaged ones in place. Move them out of %s (to %s, say) "
        "to stop this warning and keep them for repair",
        len(paths),
        "file" if len(paths) == 1 else "files",
        listed,
        reason,
        root,
        root.with_name(f"{root.name}-damaged"),
    )


def _one_line(text: str) -> str:
    """Return ``text`` on one line, with control characters escaped."""
    words = " ".join(text.split())
    return "".join(
        character if character.isprintable() else f"\\x{ord(character):02x}"
        for character in words
    )


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _store_files(root: Path) -> list[Path]:
    """Return every Parquet file of the store's tables under root, sorted."""
    files = []
    for name in TABLES:
        files.extend(
            path for path in (root / name).glob("**/*.parquet") if path.is_file()
        )
    return sorted(files)
