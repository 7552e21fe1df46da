"""Rendering of query results as a text table, CSV, JSON or Parquet.

Every text format writes timestamps, dates and times in ISO 8601 form, as Python's
``isoformat`` does (``2024-01-01T09:05:00.250000+00:00``), durations and intervals
as ISO 8601 durations (``PT3600S``), and lists and structs as JSON.
"""

import csv
import datetime
import decimal
import json
import math
import os
import sys
from collections.abc import Callable
from typing import TextIO

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

FORMATS = ("table", "csv", "json", "parquet")

NULL_TEXT = "NULL"
COLUMN_GAP = "  "

# Control characters that would break a row of the text table across lines.
CONTROL_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def write_result(
    table: pa.Table,
    fmt: str,
    output: "str | os.PathLike[str] | None" = None,
    stream: "TextIO | None" = None,
) -> None:
    """Write ``table`` in format ``fmt`` to the file ``output``, else to ``stream``.

    ``stream`` defaults to standard output. The parquet format needs ``output``.
    Raises ValueError for an unknown format, for parquet without an output path,
    and for json when two columns have the same name.
    """
    if fmt not in FORMATS:
        raise ValueError(
            f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}"
        )

    if fmt == "parquet":
        write_parquet(table, output)
        return

    writer = TEXT_WRITERS[fmt]
    if output is None:
        writer(table, stream if stream is not None else sys.stdout)
        return

    with open(output, "w", encoding="utf-8", newline="") as file:
        writer(table, file)


def write_parquet(table: pa.Table, output: "str | os.PathLike[str] | None") -> None:
    """Write ``table`` to the Parquet file ``output`` with zstd compression."""
    if output is None:
        raise ValueError(
            "the parquet format is binary and needs an output file path; "
            "give a path to write to, or choose another format"
        )
    try:
        pq.write_table(table, output, compression="zstd")
    except pa.ArrowNotImplementedError as error:
        raise ValueError(
            f"cannot write this result as Parquet: {error}; cast the column in "
            "SQL (an INTERVAL with epoch_us(...), for instance) or choose "
            "another format"
        ) from error


def write_text_table(table: pa.Table, stream: TextIO) -> None:
    """Write ``table`` as aligned columns under a header and a dashed rule.

    Numbers are right-aligned, NULL is shown as ``NULL``, and a ``(N rows)`` line
    follows. Line breaks and tabs inside values are shown as ``\\n``, ``\\r`` and
    ``\\t`` so that each row stays on one line.
    """
    headers = [name.translate(CONTROL_ESCAPES) for name in table.column_names]
    columns = [_table_cells(column) for column in table.columns]
    right_aligned = [_is_numeric(field.type) for field in table.schema]
    widths = [
        max([len(header), *(len(cell) for cell in cells)])
        for header, cells in zip(headers, columns)
    ]

    if headers:
        stream.write(_text_row(headers, widths, right_aligned))
        rule = ["-" * width for width in widths]
        stream.write(_text_row(rule, widths, right_aligned))
    for row in zip(*columns):
        stream.write(_text_row(row, widths, right_aligned))

    noun = "row" if table.num_rows == 1 else "rows"
    stream.write(f"({table.num_rows} {noun})\n")


def write_csv(table: pa.Table, stream: TextIO) -> None:
    """Write ``table`` as CSV with a header row.

    Values of string columns are always quoted and NULL is an empty unquoted field,
    so an empty string (``""``) and NULL stay apart. Column names are quoted only
    when they contain a comma, a quote or a line break.
    """
    csv.writer(stream, lineterminator="\n").writerow(table.column_names)

    sink = pa.BufferOutputStream()
    options = pa_csv.WriteOptions(include_header=False)
    pa_csv.write_csv(_csv_ready(table), sink, write_options=options)
    stream.write(sink.getvalue().to_pybytes().decode("utf-8"))


def write_json(table: pa.Table, stream: TextIO) -> None:
    """Write ``table`` as one JSON array with an object per row.

    NaN and infinite floats become null, because JSON has no value for them.
    """
    _check_unique_names(table)

    stream.write("[")
    separator = "\n"
    for batch in _json_ready(table).to_batches():
        for row in batch.to_pylist():
            stream.write(separator)
            stream.write(_json_object(row))
            separator = ",\n"
    stream.write("\n]\n" if table.num_rows else "]\n")


TEXT_WRITERS: dict[str, Callable[[pa.Table, TextIO], None]] = {
    "table": write_text_table,
    "csv": write_csv,
    "json": write_json,
}


def format_value(value: object) -> str:
    """Return the text form of one non-null value, as the text formats show it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (datetime.timedelta, pa.MonthDayNano)):
        return iso_duration(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    return str(value)


def iso_duration(value: "datetime.timedelta | pa.MonthDayNano") -> str:
    """Return a duration or a DuckDB INTERVAL as ISO 8601 text, like ``P1DT1.5S``.

    A negative part keeps its sign, as in ``PT-5S``, because ISO 8601 has no
    negative durations. A timedelta is written in seconds only (``PT90000S``).
    """
    if isinstance(value, datetime.timedelta):
        # All in seconds, because timedelta stores -5 s as -1 day + 86395 s.
        months, days = 0, 0
        nanoseconds = value // datetime.timedelta(microseconds=1) * 1000
    else:
        months, days, nanoseconds = value.months, value.days, value.nanoseconds

    text = "P"
    if months:
        text += f"{months}M"
    if days:
        text += f"{days}D"
    if nanoseconds or text == "P":
        seconds = decimal.Decimal(nanoseconds).scaleb(-9).normalize()
        text += f"T{seconds:f}S"
    return text


def _table_cells(column: pa.ChunkedArray) -> list[str]:
    cells = []
    for value in column.to_pylist():
        text = NULL_TEXT if value is None else format_value(value)
        cells.append(text.translate(CONTROL_ESCAPES))
    return cells


def _text_row(
    cells: "list[str] | tuple[str, ...]", widths: list[int], right_aligned: list[bool]
) -> str:
    padded = [
        cell.rjust(width) if right else cell.ljust(width)
        for cell, width, right in zip(cells, widths, right_aligned)
    ]
    return COLUMN_GAP.join(padded).rstrip() + "\n"


def _is_numeric(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_decimal(data_type)
    )


def _csv_ready(table: pa.Table) -> pa.Table:
    """Convert the columns that pyarrow's CSV writer cannot render well to text.

    That writer rejects lists and structs, writes binary as raw bytes, and writes
    timestamps with a space where ISO 8601 has ``T``.
    """
    columns = []
    for field, column in zip(table.schema, table.columns):
        if _csv_native(field.type):
            columns.append(column)
        else:
            columns.append(_text_column(column))
    return pa.Table.from_arrays(columns, names=table.column_names)


def _csv_native(data_type: pa.DataType) -> bool:
    return (
        _is_numeric(data_type)
        or pa.types.is_boolean(data_type)
        or pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_null(data_type)
    )


def _text_column(column: pa.ChunkedArray) -> pa.Array:
    values = column.to_pylist()
    texts = [None if value is None else format_value(value) for value in values]
    return pa.array(texts, type=pa.string())


def _json_ready(table: pa.Table) -> pa.Table:
    """Convert interval columns to ISO 8601 text for the JSON writer.

    pyarrow returns an interval as a named tuple, which ``json`` writes as an array
    without calling ``default``. NOTE: an interval nested in a list or struct is
    still written as ``[months, days, nanoseconds]``.
    """
    columns = []
    for field, column in zip(table.schema, table.columns):
        if pa.types.is_interval(field.type):
            column = _text_column(column)
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def _json_object(row: dict) -> str:
    try:
        return json.dumps(
            row, default=_json_default, ensure_ascii=False, allow_nan=False
        )
    except ValueError:
        # A NaN or infinite float, at any depth. This path is rare, so the row
        # is only walked when it is needed.
        return json.dumps(
            _replace_non_finite(row), default=_json_default, ensure_ascii=False
        )


def _replace_non_finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _replace_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_non_finite(item) for item in value]
    return value


def _decimal_json(value: decimal.Decimal) -> "int | str":
    # DuckDB returns sums of integers as HUGEINT, which reaches Arrow as a
    # decimal with scale 0. Those stay JSON numbers. A fraction is kept exact as
    # a string, because a float would round it.
    if value == value.to_integral_value():
        return int(value)
    return str(value)


def _check_unique_names(table: pa.Table) -> None:
    seen = set()
    for name in table.column_names:
        if name in seen:
            raise ValueError(
                f"column name {name!r} appears more than once, so JSON objects "
                f"would lose one of the values; give the columns distinct names "
                f"with AS"
            )
        seen.add(name)


def _json_default(value: object) -> object:
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (datetime.timedelta, pa.MonthDayNano)):
        return iso_duration(value)
    if isinstance(value, decimal.Decimal):
        return _decimal_json(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    raise TypeError(f"cannot write a value of type {type(value).__name__} as JSON")
