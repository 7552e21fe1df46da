"""Exceptions of the federation layer: agents, tokens and federated queries."""

from fastsock.errors import FastsockError


class AuthError(FastsockError, PermissionError):
    """A token is missing, too short or wrong, or a TLS file cannot be used."""


class AgentError(FastsockError, ConnectionError):
    """An agent could not be reached, timed out or failed a request."""


class FederationError(FastsockError, RuntimeError):
    """A federated query missed nodes while --strict was set."""


class EndpointError(FastsockError, ValueError):
    """An endpoint or peers map is invalid, or a listen address needs a token."""


class AgentStartError(FastsockError, OSError):
    """An agent cannot listen on the requested address."""
