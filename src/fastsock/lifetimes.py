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
from fastsock.rowruns import replace_rows, take_rows

_keyindex = load_extension("_keyindex")

# Closed entities whose rows the tracker keeps before it copies the open ones
# into one table: at least this many, and at least half the open ones. Below
# that, a close only clears a flag, so a busy host does not copy every row of
# every open socket at each sample.
COMPACT_AT_LEAST = 4096


class LifetimeTracker:
    """Track entities across samples by key.

    ``rows`` passed to :meth:`observe` hold the entity's attributes as first
    seen. ``state`` (optional, int8 per row) is the one attribute that may
    change during a lifetime, so it is kept from the latest sample.

    Entities are kept in the order they opened, one position each. A closed
    entity keeps its position, flagged as closed, until enough have closed to
    be worth a copy of the open rows (see COMPACT_AT_LEAST). The rows are
    kept as a few tables that share no buffers. Each new sample's rows are
    appended as a table of their own, and the newest two are merged whenever
    the older is at most twice the newer. So there are never more than about
    log2(rows) tables, and a row is copied about log2(rows) times.
    """

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._schema: pa.Schema | None = None
        # The parts as one table (no copy), built on first use after a change.
        self._table: pa.Table | None = None
        self._keys = np.empty(0, dtype=np.int64)
        self._first_seen = np.empty(0, dtype=np.int64)
        self._last_seen = np.empty(0, dtype=np.int64)
        self._state = np.empty(0, dtype=np.int8)
        self._open = np.empty(0, dtype=bool)
        self._open_count = 0
        self._closed_parts: list[pa.Table] = []
        # Hash index of the open keys, built on the first find() after a change.
        self._index = None
        # Null counts per column name: (version, count); see null_count.
        self._null_counts: dict[str, tuple[int, int]] = {}

        # Columns kept from the latest sample, by name (see observe's latest).
        self._latest: dict[str, np.ndarray] = {}
        # Records closed by the latest observe, or None if it closed none.
        self.closed_in_last_observe: pa.Table | None = None
        # Row indices, into the latest observe's rows, of the entities it opened.
        self.opened_in_last_observe = np.empty(0, dtype=np.int64)
        # Grows whenever an entity opens or closes.
        self.version = 0

    def __len__(self) -> int:
        return self._open_count

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Return the position of each key among the open entities, or -1 if not open.

        Positions index the arrays that all_rows returns.
        """
        if self._index is None:
            self._index = _keyindex.KeyIndex(self._keys, left_out=~self._open)
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
        if self._schema is None:
            self._schema = rows(np.empty(0, dtype=np.int64)).schema
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

        if len(matched) < self._open_count:
            missing = self._open.copy()
            missing[matched] = False
            closed = np.flatnonzero(missing)
            self.closed_in_last_observe = self._close(closed)

        new = _first_of_each_key(keys, np.flatnonzero(~known))
        self.opened_in_last_observe = new
        if len(new):
            for name, values in latest.items():
                self._latest[name] = np.concatenate([self._latest[name], values[new]])
            self._append(keys[new], rows(new), time_us, state[new])
        self._compact_if_sparse()
        return len(new)

    def all_rows(self) -> tuple[np.ndarray, pa.Table | None, np.ndarray]:
        """Return keys, first-seen rows and an open flag of every kept entity.

        The three are aligned with the positions of find. Closed entities
        that the tracker has not dropped yet have the flag False. Nothing is
        copied; the rows are None before any sample.
        """
        return self._keys, self._rows(), self._open

    def open_rows(self) -> tuple[np.ndarray, pa.Table | None]:
        """Return the keys of the open entities and their first-seen rows."""
        if self._open_count < len(self._keys):
            self._compact()
        return self._keys, self._rows()

    def closed_waiting(self) -> int:
        """Return how many closed records wait for the next drain."""
        return sum(part.num_rows for part in self._closed_parts)

    def null_count(self, column: str) -> int:
        """Return how many open entities have a NULL in column of their rows."""
        cached = self._null_counts.get(column)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        count = len(self.null_positions(column))
        self._null_counts[column] = (self.version, count)
        return count

    def null_positions(self, column: str) -> np.ndarray:
        """Return the positions of the open entities with a NULL in column."""
        rows = self._rows()
        if rows is None or not rows.column(column).null_count:
            return np.empty(0, dtype=np.int64)
        valid = rows.column(column).is_valid().to_numpy(zero_copy_only=False)
        return np.flatnonzero(self._open & ~valid)

    def update_rows(self, positions: np.ndarray, values: pa.Table) -> None:
        """Replace columns of the kept rows at positions, one row of values each.

        For attributes learnt after the first sight, such as the owner of a
        socket whose process was not found then. Only the parts that hold
        positions are copied.
        """
        positions = np.asarray(positions, dtype=np.int64)
        sizes = [part.num_rows for part in self._parts]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        part_of = np.searchsorted(starts, positions, side="right") - 1
        for index in np.unique(part_of).tolist():
            chosen = np.flatnonzero(part_of == index)
            replacing = values.take(pa.array(chosen))
            self._parts[index] = replace_rows(
                self._parts[index],
                positions[chosen] - starts[index],
                {name: replacing.column(name) for name in values.column_names},
            )
        # The keys stay, so the hash index stays too.
        self._table = None
        self.version += 1

    def close_keys(
        self,
        keys: np.ndarray,
        time_us: np.ndarray,
        replace: dict[str, pa.Array] | None = None,
    ) -> None:
        """Close open entities at the given times, as close events report them.

        keys must be open and unique, and time_us has one value per key.
        replace maps column names of the rows to arrays, one value per key,
        that replace the stored values in the closed records.
        """
        indices = self.find(keys)
        if (indices < 0).any():
            missing = np.asarray(keys)[indices < 0][:3].tolist()
            raise ValueError(f"keys {missing} are not open; close only open keys")
        if len(np.unique(indices)) < len(indices):
            raise ValueError("keys repeat; close each open key once")
        records = self._close(indices)
        records = records.set_column(
            records.schema.get_field_index("last_seen_us"),
            "last_seen_us",
            pa.array(np.asarray(time_us, dtype=np.int64)),
        )
        for name, values in (replace or {}).items():
            position = records.schema.get_field_index(name)
            field = records.schema.field(position)
            records = records.set_column(position, field, values.cast(field.type))
        self._closed_parts[-1] = records
        self._compact_if_sparse()

    def _close(self, indices: np.ndarray) -> pa.Table:
        """Flag the entities at indices closed and keep their records for drain."""
        records = self._records(indices, closed=True)
        self._closed_parts.append(records)
        self._open[indices] = False
        self._open_count -= len(indices)
        self._changed()
        return records

    def _append(self, keys, rows, time_us, state) -> None:
        self._parts.append(rows.cast(self._schema))
        while len(self._parts) > 1 and (
            self._parts[-2].num_rows <= 2 * self._parts[-1].num_rows
        ):
            newer = self._parts.pop()
            older = self._parts.pop()
            self._parts.append(pa.concat_tables([older, newer]).combine_chunks())
        self._keys = np.concatenate([self._keys, keys])
        times = np.full(len(keys), time_us, dtype=np.int64)
        self._first_seen = np.concatenate([self._first_seen, times])
        self._last_seen = np.concatenate([self._last_seen, times])
        self._state = np.concatenate([self._state, state.astype(np.int8)])
        self._open = np.concatenate([self._open, np.ones(len(keys), dtype=bool)])
        self._open_count += len(keys)
        self._changed()

    def _changed(self) -> None:
        self._table = None
        self._index = None
        self.version += 1

    def _rows(self) -> pa.Table | None:
        if self._schema is None:
            return None
        if self._table is None:
            self._table = (
                pa.concat_tables(self._parts)
                if self._parts
                else self._schema.empty_table()
            )
        return self._table

    def _compact_if_sparse(self) -> None:
        closed = len(self._keys) - self._open_count
        if closed >= COMPACT_AT_LEAST and closed * 2 >= self._open_count:
            self._compact()

    def _compact(self) -> None:
        """Drop the rows of closed entities: one copy of the open rows."""
        kept = np.flatnonzero(self._open)
        rows = self._rows().take(pa.array(kept, pa.int64()))
        self._parts = [rows.combine_chunks()] if rows.num_rows else []
        self._keys = self._keys[kept]
        self._first_seen = self._first_seen[kept]
        self._last_seen = self._last_seen[kept]
        self._state = self._state[kept]
        self._open = np.ones(len(kept), dtype=bool)
        for name, values in self._latest.items():
            self._latest[name] = values[kept]
        self._changed()

    def _records(self, indices: np.ndarray | None, closed: bool) -> pa.Table:
        """Return the records of the entities at indices, or of all kept ones."""
        table = self._rows()
        if indices is None:
            # The rows are immutable and shared; the NumPy columns change in
            # place at each sample, so they are copied by the indexing below.
            indices = np.arange(len(self._keys))
        else:
            table = take_rows(table, indices)
        count = len(indices)
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
            .append_column("closed", pa.array(np.full(count, closed, dtype=bool)))
        )

    def drain(self) -> pa.Table | None:
        """Return the closed records and a checkpoint of the open ones.

        Closed records are handed out once; open ones appear again at every
        drain with their latest last sight. Returns None before any sample.
        The checkpoint shares the tracker's buffers, so it costs no copy of
        the rows unless closed entities split the open ones into many runs
        (see fastsock.rowruns).
        """
        if self._schema is None:
            return None
        # The closed records come one small table per sample; as one chunk
        # they cost each later filter one call per column, not one per sample.
        parts = []
        if self._closed_parts:
            closed = pa.concat_tables(self._closed_parts, promote_options="default")
            parts.append(closed.combine_chunks())
        open_positions = None
        if self._open_count < len(self._keys):
            open_positions = np.flatnonzero(self._open)
        parts.append(self._records(open_positions, closed=False))
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
        self._open[:] = False
        self._open_count = 0
        self._compact()


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
