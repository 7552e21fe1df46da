"""Defaults of the federation options, in a module light enough for the CLI."""

# Hops from the entry node that a federated query walks at most.
DEFAULT_MAX_DEPTH = 16

# Seconds a federated pull may take before unanswered nodes count as missed.
DEFAULT_TIMEOUT = 30.0

# Limits on one node's work for one request, unless its agent sets others:
# rows sent per table, and seconds spent on pulls and SQL.
DEFAULT_MAX_ROWS = 5_000_000
DEFAULT_MAX_QUERY_SECONDS = 120.0
