"""Turn consecutive samples into lifetimes: one record per entity, not per sample.

An entity (a socket, a process) is named by a 64-bit key. The tracker keeps the
entities seen in the latest sample with their first and last sight. An entity
missing from a later sample was seen to close. ``drain`` returns what
closed since the last drain plus a checkpoint of everything still open, so
long-lived entities are stored while they live.

All work is vectorised over NumPy and Arrow columns. A sample with no changes
costs one hash probe per key (``_keyindex``). The caller may pass only the
rows of the keys that are not open yet (see ``observe``).
"""

from typing import Callable

import numpy as np
import pyarrow as pa

from fastsock.core import load_extension

_keyindex = load_extension("_keyindex")

class LifetimeTracker:
    """Track entities across samples by key.

    ``rows`` passed to :meth:`observe` hold the entity's attributes as first
    seen. ``state`` (optional, int8 per row) is the one attribute that may
    change during a lifetime, so it is kept from the latest sample.
    """

    def __init__(self) -> None:
        self._rows: pa.Table | None = None
        self._keys = np.empty(0, dtype=np.int64)
        self._first_seen = np.empty(0, dtype=np.int64)
        self._last_seen = np.empty(0, dtype=np.int64)
        self._state = np.empty(0, dtype=np.int8)
        self._closed_parts: list[pa.Table] = []
        # Hash index of _keys, built on the first find() after they change.
        self._index = None

        # Columns kept from the latest sample, by name (see observe's latest).
        self._latest: dict[str, np.ndarray] = {}
        # Records closed by the latest observe, or None if it closed none.
        self.closed_in_last_observe: pa.Table | None = None
        # Row indices, into the latest observe's rows, of the entities it opened.
        self.opened_in_last_observe = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def open_keys(self) -> np.ndarray:
        """Keys of the entities seen in the latest sample, sorted."""
        return self._keys

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Return the index of each key among the open entities, or -1 if not open."""
        if self._index is None:
            self._index = _keyindex.KeyIndex(self._keys)
        return self._index.find(np.ascontiguousarray(keys, dtype=np.int64))

    def observe(
        self,
        keys: np.ndarray,
        rows: "pa.Table | Callable[[np.ndarray], pa.Table]",
        time_us: int,
        state: np.ndarray | None = None,
        latest: dict[str, np.ndarray] | None = None,
        positions: np.ndarray | None = None,
    ) -> int:
        """Record one sample and return how many entities it opened.

        A key repeated within the sample counts once. rows is a table with one
        row per key, or a function that returns the rows of the keys at the
        given indices, which observe calls once per sample, with an empty
        array on the first sample. latest maps column names of rows to int64
        arrays, one value per key, that replace the first-seen value in the
        records (counters that grow while a socket lives). A negative value is
        stored as NULL. Pass the same names at every call. positions is the
        output of find(keys), for a caller that already has it.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if state is None:
            state = np.zeros(len(keys), dtype=np.int8)
        if not callable(rows):
            rows = _taker(rows)
        if self._rows is None:
            self._rows = rows(np.empty(0, dtype=np.int64))
            self._latest = {
                name: np.empty(0, dtype=np.int64) for name in (latest or {})
            }
        latest = {name: np.asarray(latest[name]) for name in self._latest}
        self.closed_in_last_observe = None

        position = self.find(keys) if positions is None else positions
        known = position >= 0
        matched = position[known]
        self._last_seen[matched] = time_us
        self._state[matched] = state[known]
        for name, values in latest.items():
            self._latest[name][matched] = values[known]

        still_open = np.zeros(len(self._keys), dtype=bool)
        still_open[matched] = True
        if not still_open.all():
            self._close(np.flatnonzero(~still_open))

        new = _first_of_each_key(keys, np.flatnonzero(~known))
        self.opened_in_last_observe = new
        if len(new):
            for name, values in latest.items():
                self._latest[name] = np.concatenate([self._latest[name], values[new]])
            self._open(keys[new], rows(new), time_us, state[new])
        return len(new)

    def open_rows(self) -> tuple[np.ndarray, pa.Table | None]:
        """Return the keys of the open entities, sorted, and their first-seen rows."""
        return self._keys, self._rows

    def close_keys(
        self,
        keys: np.ndarray,
        time_us: np.ndarray,
        replace: dict[str, pa.Array] | None = None,
    ) -> None:
        """Close open entities at the given times, as close events report them.

        keys must be open (see open_rows) and unique, and time_us has one
        value per key. replace maps column names of the rows to arrays, one
        value per key, that replace the stored values in the closed records.
        """
        indices = np.searchsorted(self._keys, keys)
        records = self._records(indices, closed=True)
        records = records.set_column(
            records.schema.get_field_index("last_seen_us"),
            "last_seen_us",
            pa.array(np.asarray(time_us, dtype=np.int64)),
        )
        for name, values in (replace or {}).items():
            position = records.schema.get_field_index(name)
            field = records.schema.field(position)
            records = records.set_column(position, field, values.cast(field.type))
        self._closed_parts.append(records)

        keep = np.ones(len(self._keys), dtype=bool)
        keep[indices] = False
        self._select(np.flatnonzero(keep))

    def _close(self, closed: np.ndarray) -> None:
        records = self._records(closed, closed=True)
        self.closed_in_last_observe = records
        self._closed_parts.append(records)
        keep = np.ones(len(self._keys), dtype=bool)
        keep[closed] = False
        self._select(np.flatnonzero(keep))

    def _open(self, keys, rows, time_us, state) -> None:
        self._rows = pa.concat_tables([self._rows, rows.cast(self._rows.schema)])
        self._keys = np.concatenate([self._keys, keys])
        self._first_seen = np.concatenate(
            [self._first_seen, np.full(len(keys), time_us, dtype=np.int64)]
        )
        self._last_seen = np.concatenate(
            [self._last_seen, np.full(len(keys), time_us, dtype=np.int64)]
        )
        self._state = np.concatenate([self._state, state.astype(np.int8)])
        self._select(np.argsort(self._keys, kind="stable"))

    def _select(self, indices: np.ndarray) -> None:
        self._rows = self._rows.take(pa.array(indices, pa.int64()))
        self._keys = self._keys[indices]
        self._index = None
        self._first_seen = self._first_seen[indices]
        self._last_seen = self._last_seen[indices]
        self._state = self._state[indices]
        for name, values in self._latest.items():
            self._latest[name] = values[indices]

    def _records(self, indices: np.ndarray, closed: bool) -> pa.Table:
        table = self._rows.take(pa.array(indices, pa.int64()))
        for name, values in self._latest.items():
            position = table.schema.get_field_index(name)
            field = table.schema.field(position)
            picked = values[indices]
            column = pa.array(picked, mask=picked < 0).cast(field.type)
            table = table.set_column(position, field, column)
        return (
            table.append_column("key", pa.array(self._keys[indices]))
            .append_column("state_code_last", pa.array(self._state[indices]))
            .append_column("first_seen_us", pa.array(self._first_seen[indices]))
            .append_column("last_seen_us", pa.array(self._last_seen[indices]))
            .append_column(
                "closed", pa.array(np.full(len(indices), closed, dtype=bool))
            )
        )

    def drain(self) -> pa.Table | None:
        """Return the closed records and a checkpoint of the open ones.

        Closed records are handed out once; open ones appear again at every
        drain with their latest last sight. Returns None before any sample.
        """
        if self._rows is None:
            return None
        parts = self._closed_parts
        parts.append(self._records(np.arange(len(self._keys)), closed=False))
        self._closed_parts = []
        # Restored records of close events have columns that samples lack.
        return pa.concat_tables(parts, promote_options="default")

    def restore(self, records: pa.Table) -> None:
        """Put back closed records that a failed flush could not store."""
        closed = records.filter(records.column("closed"))
        if closed.num_rows:
            self._closed_parts.insert(0, closed)

    def close_all(self) -> None:
        """Forget open entities without marking them closed (collection stops)."""
        self._select(np.empty(0, dtype=np.int64))


def _taker(rows: pa.Table) -> Callable[[np.ndarray], pa.Table]:
    """Return a function that takes the rows at given indices from rows."""

    def take(indices: np.ndarray) -> pa.Table:
        return rows.take(pa.array(indices, pa.int64()))

    return take


def _first_of_each_key(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return rows without repeated keys, keeping each key's first row.

    A read of a socket table that races with changes can list one socket
    twice. Two entities with one key would make the second look closed.
    """
    if len(rows) < 2:
        return rows
    _, first = np.unique(keys[rows], return_index=True)
    if len(first) == len(rows):
        return rows
    return rows[np.sort(first)]
