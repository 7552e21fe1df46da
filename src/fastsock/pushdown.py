"""Find the tables a SELECT reads, and the filters and columns peers can apply.

A federated query pulls each table it reads from every node before running.
To pull less, each node is sent:

- ``where``: the WHERE conjuncts that mention only that table's columns, with
  AND between the conjuncts of one reference and OR between references. A
  reference that has none, or that sits under an outer, natural, ASOF or
  lateral join, or that samples the table, gets no filter, so the whole table
  is pulled.
- ``columns``: the table's columns that the query names anywhere; all columns
  when it uses ``*``, COLUMNS() or a table as a whole row.

Conjuncts may use columns, constants, casts, comparisons, CASE and DuckDB
scalar functions whose value depends only on their arguments and the time
zone, which the entry sends along. now(), current_timestamp and
get_current_timestamp() are replaced by the entry's time when the query
starts, and current_date and today() by the entry's date. Anything else
(subqueries, volatile functions, parameters) keeps a conjunct at the entry.
The entry still runs the whole query, so a pushed filter only removes rows
that the query would drop anyway.

The SQL is parsed by DuckDB's json_serialize_sql and filters are written back
with json_deserialize_sql, so quoting and precedence come from DuckDB itself.
"""

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb
import pyarrow as pa

from fastsock.errors import QueryError

# Expression classes that a pushed filter may contain.
PUSHABLE_CLASSES = frozenset(
    {
        "BETWEEN",
        "CASE",
        "CAST",
        "COLLATE",
        "COLUMN_REF",
        "COMPARISON",
        "CONJUNCTION",
        "CONSTANT",
        "FUNCTION",
        "OPERATOR",
        "TYPE",
    }
)

# Functions and keywords evaluated once per query, replaced by their value at
# the entry so that every node filters with the entry's clock.
ENTRY_TIMESTAMP_FUNCTIONS = frozenset(
    {"now", "get_current_timestamp", "transaction_timestamp", "current_timestamp"}
)
ENTRY_DATE_FUNCTIONS = frozenset({"today", "current_date"})

# CONSISTENT_WITHIN_QUERY functions whose value depends on the node or the
# session that runs them, not only on their arguments and the time zone.
NODE_DEPENDENT_FUNCTIONS = frozenset(
    {
        "current_database",
        "current_localtime",
        "current_localtimestamp",
        "current_schema",
        "current_schemas",
        "current_setting",
        "get_current_time",
        "getvariable",
        "in_search_path",
        "txid_current",
    }
)

# Join kinds under which a WHERE conjunct can filter a table before the join.
INNER_JOINS = frozenset({"INNER", "CROSS"})
PLAIN_JOIN_REFS = frozenset({"REGULAR", "CROSS"})


@dataclass(frozen=True)
class TablePlan:
    """The columns (None for all) and the row filter to pull of one table."""

    table: str
    columns: "tuple[str, ...] | None"
    where: "str | None"


def validate_select(sql: str) -> None:
    """Raise QueryError unless ``sql`` is exactly one SELECT statement."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"query failed: {error}\nquery: {sql}") from error

    if len(statements) != 1:
        raise QueryError(
            f"a federated query must be one SELECT statement; got {len(statements)} "
            f"statements"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(
            f"a federated query must be one SELECT statement; got {kind.name}, which "
            f"agents do not run"
        )


def plan_tables(sql: str, schemas: Mapping[str, pa.Schema]) -> dict[str, TablePlan]:
    """Return a TablePlan for each table of ``schemas`` that ``sql`` reads.

    Raises QueryError when DuckDB cannot parse ``sql`` or it is not one SELECT.
    """
    validate_select(sql)
    parser = duckdb.connect(":memory:")
    try:
        tree = _serialize(parser, sql)
        return _Planner(parser, tree, schemas).plans()
    finally:
        parser.close()


class _Planner:
    def __init__(self, parser, tree: dict, schemas: Mapping[str, pa.Schema]) -> None:
        self.parser = parser
        self.tree = tree
        self.schemas = {name.lower(): schema for name, schema in schemas.items()}
        self.columns = {
            name: {column.lower() for column in schema.names}
            for name, schema in self.schemas.items()
        }
        self.literals = _entry_time_literals(parser)
        self.consistent = _consistent_functions(parser) - set(self.literals)

    def plans(self) -> dict[str, TablePlan]:
        filters: dict[int, list[str]] = {}
        for node in _walk(self.tree):
            if node.get("type") == "SELECT_NODE" and "class" not in node:
                filters.update(self._select_filters(node))

        references: dict[str, list["str | None"]] = {}
        for node in _walk(self.tree):
            if node.get("type") == "BASE_TABLE" and "class" not in node:
                name = node["table_name"].lower()
                schema_name = (node.get("schema_name") or "main").lower()
                if name in self.schemas and schema_name == "main":
                    conjuncts = filters.get(id(node), [])
                    predicate = " AND ".join(conjuncts) if conjuncts else None
                    references.setdefault(name, []).append(predicate)

        projected = self._projected_columns()
        return {
            name: TablePlan(name, projected.get(name), _any_of(predicates))
            for name, predicates in references.items()
        }

    def _select_filters(self, node: dict) -> dict[int, list[str]]:
        """Map id(BASE_TABLE node) -> pushable conjuncts, for one SELECT node."""
        leaves = []
        if not _collect_leaves(node.get("from_table"), leaves):
            return {}

        found: dict[int, list[str]] = {id(leaf): [] for leaf in leaves}
        for conjunct in _conjuncts(node.get("where_clause")):
            owner = self._owner(conjunct, leaves)
            if owner is not None and self._is_pushable(conjunct):
                found[id(owner)].append(self._to_sql(conjunct))
        return found

    def _owner(self, expression: dict, leaves: list[dict]) -> "dict | None":
        """Return the one table whose columns ``expression`` uses, or None."""
        owners = set()
        for reference in _walk(expression):
            if reference.get("class") != "COLUMN_REF":
                continue
            names = [part.lower() for part in reference["column_names"]]
            if len(names) == 1 and names[0] in self.literals:
                continue

            owner = self._resolve(names, leaves)
            if owner is None:
                return None
            owners.add(id(owner))

        if len(owners) != 1:
            return None
        (owner_id,) = owners
        return next(leaf for leaf in leaves if id(leaf) == owner_id)

    def _resolve(self, names: list[str], leaves: list[dict]) -> "dict | None":
        if len(names) == 2:
            qualifier, column = names
            for leaf in leaves:
                if _reference_name(leaf) == qualifier:
                    return leaf if column in self._columns_of(leaf) else None
            return None

        if len(names) != 1:
            return None
        having = [leaf for leaf in leaves if names[0] in self._columns_of(leaf)]
        unknown = [
            leaf for leaf in leaves if leaf["table_name"].lower() not in self.columns
        ]
        # An unqualified column belongs to one table only when no other table
        # in the FROM clause could have a column of that name.
        return having[0] if len(having) == 1 and not unknown else None

    def _columns_of(self, leaf: dict) -> set[str]:
        return self.columns.get(leaf["table_name"].lower(), set())

    def _is_pushable(self, expression: dict) -> bool:
        for node in _walk(expression):
            kind = node.get("class")
            if kind is None:
                continue
            if kind not in PUSHABLE_CLASSES:
                return False
            if kind == "FUNCTION" and not self._is_pushable_function(node):
                return False
        return True

    def _is_pushable_function(self, node: dict) -> bool:
        name = node["function_name"].lower()
        if node.get("schema") or node.get("catalog") or node.get("filter"):
            return False
        if node.get("distinct") or node.get("order_bys", {}).get("orders"):
            return False
        if name in self.literals:
            return not node.get("arguments")
        return name in self.consistent

    def _to_sql(self, expression: dict) -> str:
        rewritten = self._rewrite(copy.deepcopy(expression))
        return _deserialize_condition(self.parser, rewritten)

    def _rewrite(self, node):
        """Drop table qualifiers and replace entry-time functions by literals."""
        if isinstance(node, list):
            return [self._rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node

        kind = node.get("class")
        if kind == "COLUMN_REF":
            names = node["column_names"]
            if len(names) == 1 and names[0].lower() in self.literals:
                return copy.deepcopy(self.literals[names[0].lower()])
            node["column_names"] = [names[-1]]
            return node
        if kind == "FUNCTION" and node["function_name"].lower() in self.literals:
            if not node.get("arguments"):
                return copy.deepcopy(self.literals[node["function_name"].lower()])

        return {key: self._rewrite(value) for key, value in node.items()}

    def _projected_columns(self) -> dict[str, "tuple[str, ...] | None"]:
        named: set[str] = set()
        bare_names: set[str] = set()
        whole_rows = False
        table_names = set()
        for node in _walk(self.tree):
            if node.get("type") == "BASE_TABLE" and "class" not in node:
                table_names.add(_reference_name(node))
                table_names.add(node["table_name"].lower())
            if node.get("class") == "STAR":
                whole_rows = True
            if node.get("class") == "COLUMN_REF":
                parts = [part.lower() for part in node["column_names"]]
                named.update(parts)
                if len(parts) == 1:
                    bare_names.add(parts[0])
            if node.get("type") == "JOIN" and "class" not in node:
                named.update(column.lower() for column in node.get("using_columns", []))

        # A bare table name or alias as a column is the whole row as a struct.
        whole_rows = whole_rows or bool(bare_names & table_names)
        projected = {}
        for name, schema in self.schemas.items():
            if whole_rows:
                projected[name] = None
            else:
                columns = tuple(c for c in schema.names if c.lower() in named)
                projected[name] = columns
        return projected


def _serialize(parser, sql: str) -> dict:
    (text,) = parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    tree = json.loads(text)
    if tree.get("error"):
        raise QueryError(f"query failed: {tree.get('error_message')}\nquery: {sql}")
    return tree


def _deserialize_condition(parser, condition: dict) -> str:
    # DuckDB writes only whole statements back to SQL, so the condition is put
    # in the WHERE clause of a template and read back from the text after it.
    template = _serialize(parser, "SELECT * FROM t WHERE true")
    template["statements"][0]["node"]["where_clause"] = condition
    (text,) = parser.execute(
        "SELECT json_deserialize_sql(?)", [json.dumps(template)]
    ).fetchone()

    prefix = "SELECT * FROM t WHERE "
    if not text.startswith(prefix):
        raise QueryError(f"cannot write a pushed filter back to SQL: {text!r}")
    return text[len(prefix) :]


def _consistent_functions(parser) -> frozenset[str]:
    # A name is pushable only when no overload of it is VOLATILE or unknown.
    # CONSISTENT_WITHIN_QUERY covers time zone arithmetic, such as subtracting
    # an interval from a TIMESTAMPTZ, and nodes run it in the entry's zone.
    rows = parser.execute(
        "SELECT function_name FROM duckdb_functions() WHERE function_type = 'scalar' "
        "GROUP BY function_name HAVING bool_and(coalesce(stability IN "
        "('CONSISTENT', 'CONSISTENT_WITHIN_QUERY'), false))"
    ).fetchall()
    return frozenset(name for (name,) in rows) - NODE_DEPENDENT_FUNCTIONS


def _entry_time_literals(parser) -> dict[str, dict]:
    """Return expression trees of the entry's time and date as literals."""
    now = datetime.now(timezone.utc)
    (today,) = parser.execute("SELECT current_date").fetchone()

    timestamp_sql = f"SELECT TIMESTAMPTZ '{now.isoformat()}'"
    date_sql = f"SELECT DATE '{today.isoformat()}'"
    timestamp = _serialize(parser, timestamp_sql)["statements"][0]["node"]
    date = _serialize(parser, date_sql)["statements"][0]["node"]

    literals = {}
    for name in ENTRY_TIMESTAMP_FUNCTIONS:
        literals[name] = timestamp["select_list"][0]
    for name in ENTRY_DATE_FUNCTIONS:
        literals[name] = date["select_list"][0]
    return literals


def _collect_leaves(table_ref: "dict | None", leaves: list[dict]) -> bool:
    """Append the base tables of a FROM clause; False when none may be filtered."""
    if table_ref is None or table_ref.get("type") == "EMPTY":
        return True

    kind = table_ref.get("type")
    if kind == "BASE_TABLE":
        leaves.append(table_ref)
        return table_ref.get("sample") is None
    if kind == "JOIN":
        if table_ref.get("join_type") not in INNER_JOINS:
            return False
        if table_ref.get("ref_type") not in PLAIN_JOIN_REFS:
            return False
        left = _collect_leaves(table_ref.get("left"), leaves)
        right = _collect_leaves(table_ref.get("right"), leaves)
        return left and right

    # A subquery or table function in the FROM clause has columns that this
    # module does not know, so unqualified names cannot be resolved.
    return False


def _conjuncts(expression: "dict | None") -> Iterator[dict]:
    if expression is None:
        return
    if expression.get("type") == "CONJUNCTION_AND":
        for child in expression["children"]:
            yield from _conjuncts(child)
    else:
        yield expression


def _reference_name(leaf: dict) -> str:
    return (leaf.get("alias") or leaf["table_name"]).lower()


def _any_of(predicates: list["str | None"]) -> "str | None":
    if any(predicate is None for predicate in predicates):
        return None
    unique = list(dict.fromkeys(predicates))
    if len(unique) == 1:
        return unique[0]
    return " OR ".join(f"({predicate})" for predicate in unique)


def _walk(node) -> Iterator[dict]:
    """Yield every dict in a JSON tree, parents before children."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
