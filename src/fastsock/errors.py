"""Exceptions raised by fastsock.

Every error derives from :class:`FastsockError`. Subclasses also derive from
the matching builtin, so callers can catch either one.
"""


class FastsockError(Exception):
    """Base class of every error that fastsock raises."""


class CoreNotBuiltError(FastsockError, ImportError):
    """The compiled Cython core cannot be imported."""


class ProcReadError(FastsockError, OSError):
    """A file under the proc root cannot be read."""


class QueryError(FastsockError, ValueError):
    """DuckDB rejected a query, or the query cannot run on the stored data."""


class NoDataError(FastsockError, FileNotFoundError):
    """The data directory contains no collected Parquet files."""


class StoreError(FastsockError, OSError):
    """A Parquet file could not be written to the data directory."""


class ProcRootNotFoundError(ProcReadError, FileNotFoundError):
    """The proc root is not a directory."""
