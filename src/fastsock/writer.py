"""Write one flush's tables to the store, and run flushes in a thread of their own.

A collector that samples many times a second cannot stop for a flush:
building and writing one flush's tables takes tens of milliseconds, and on
a busy disk much longer, and connections that open and close meanwhile
would be missed. BackgroundWriter runs a flush in a thread while sampling
goes on, one flush at a time.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from fastsock.errors import StoreError
from fastsock.store import ParquetStore

log = logging.getLogger(__name__)


@dataclass
class WriteResult:
    """The outcome of one flush's write: files and rows written, and any error."""

    files: int = 0
    rows: int = 0
    error: StoreError | OSError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def write_tables(
    store: ParquetStore, tables: list[tuple[str, pa.Table]]
) -> WriteResult:
    """Write each non-empty table to store; stop at the first failed write."""
    result = WriteResult()
    try:
        for name, table in tables:
            if table.num_rows:
                result.files += len(store.write(name, table))
                result.rows += table.num_rows
    except (StoreError, OSError) as error:
        result.error = error
    return result


class BackgroundWriter:
    """Run one flush job at a time in a thread of its own."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: WriteResult | None = None
        self._failure: BaseException | None = None

    def start(self, job: Callable[[], WriteResult]) -> None:
        """Run job in a new thread; call wait() before the next start()."""
        if self._thread is not None:
            raise RuntimeError("a flush is still running; call wait() first")

        def run() -> None:
            try:
                self._result = job()
            except BaseException as failure:  # noqa: BLE001 - raised by wait()
                self._failure = failure

        self._result = self._failure = None
        self._thread = threading.Thread(target=run, name="fastsock-flush", daemon=True)
        self._thread.start()

    def wait(self) -> WriteResult | None:
        """Wait for the running job; return its result, or None if none ran.

        An exception that the job raised is raised here.
        """
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return self._result
