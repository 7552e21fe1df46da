"""Select table rows as slices of runs, which copies nothing, and replace rows.

A flush selects nearly every row of large tables: the connections among
the drained sockets, the open sockets among those the tracker keeps. A
filter or take would copy every column of them. Consecutive rows are instead
taken as slices of the table, and the slices joined without a copy.
"""

import numpy as np
import pyarrow as pa

# Up to this many runs are joined as slices. More would make a table of many
# small chunks, whose every later filter makes one call per chunk, so the
# rows are copied instead.
MAX_RUNS = 64


def rows_where(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """Return the rows of table where the boolean mask is true, in order."""
    if mask.all():
        return table
    return take_rows(table, np.flatnonzero(mask))


def take_rows(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """Return the rows of table at indices, in their order; runs are +1 steps."""
    if len(indices) == 0:
        return table.slice(0, 0)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    if len(breaks) >= MAX_RUNS:
        return table.take(pa.array(indices, pa.int64()))
    starts = indices[np.concatenate([[0], breaks])]
    ends = indices[np.concatenate([breaks - 1, [len(indices) - 1]])] + 1
    slices = [table.slice(start, end - start) for start, end in zip(starts, ends)]
    return slices[0] if len(slices) == 1 else pa.concat_tables(slices)


def replace_rows(
    table: pa.Table, rows: np.ndarray, values: dict[str, pa.Array]
) -> pa.Table:
    """Return table with the values of some columns replaced at rows.

    values maps column names to arrays with one value per row. Only the
    named columns are copied.
    """
    # Row i of a new column is row picks[i] of the old column followed by the values.
    picks = np.arange(table.num_rows)
    picks[rows] = table.num_rows + np.arange(len(rows))
    picks = pa.array(picks)
    for name, replacing in values.items():
        position = table.schema.get_field_index(name)
        field = table.schema.field(position)
        if isinstance(replacing, pa.ChunkedArray):
            replacing = replacing.combine_chunks()
        old = table.column(position).combine_chunks()
        merged = pa.concat_arrays([old, replacing.cast(field.type)])
        table = table.set_column(position, field, merged.take(picks))
    return table
