"""Bearer tokens and TLS files of agents, and the token check on each Flight call.

A fleet shares one token. Clients send it as ``authorization: Bearer <token>``.
An agent with a token compares it in constant time, and rejects a call that
carries no token or another one. Tokens are never logged.
"""

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.flight as flight

from fastsock.federation_errors import AuthError

log = logging.getLogger(__name__)

TOKEN_ENV = "FASTSOCK_TOKEN"

# Shorter tokens are rejected, so that a short word or a default cannot pass
# for a fleet token.
MIN_TOKEN_LENGTH = 16

AUTH_HEADER = "authorization"
BEARER = "Bearer "


@dataclass(frozen=True, repr=False)
class Credentials:
    """A client's token, and the CA certificates it trusts for TLS.

    ``tls_root_certs`` is PEM text; when set, agents are reached over TLS.
    """

    token: "str | None" = None
    tls_root_certs: "bytes | None" = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Return the gRPC headers that carry the token, if there is one."""
        if self.token is None:
            return []
        return [(AUTH_HEADER.encode(), (BEARER + self.token).encode())]

    def __repr__(self) -> str:
        # Keeps the token out of tracebacks and debug logs.
        token = "set" if self.token else "none"
        tls = "set" if self.tls_root_certs else "none"
        return f"Credentials(token={token}, tls_root_certs={tls})"


def load_token(token_file: "Path | None") -> "str | None":
    """Return the token from ``token_file``, else from $FASTSOCK_TOKEN, else None.

    Surrounding whitespace is stripped. Raises AuthError when the file cannot
    be read or the token is shorter than MIN_TOKEN_LENGTH.
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise AuthError(
                f"invalid token file {token_file}: it is not UTF-8 text ({error})"
            ) from error
        except OSError as error:
            raise AuthError(
                f"cannot read the token file {token_file}: {error}"
            ) from error
        source = f"token file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None

    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthError(
            f"the token in {source} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_LENGTH}, for example from `openssl rand -hex 32`"
        )
    return token


def read_pem(path: "Path | None", description: str) -> "bytes | None":
    """Return the bytes of a PEM file, or None when ``path`` is None."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise AuthError(f"cannot read the {description} {path}: {error}") from error
    if b"-----BEGIN" not in data:
        raise AuthError(
            f"the {description} {path} is not a PEM file (no -----BEGIN line)"
        )
    return data


def load_certificate_pair(
    cert: "Path | None", key: "Path | None"
) -> "flight.CertKeyPair | None":
    """Return the server's TLS certificate and key, or None when neither is given."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "--tls-cert" if cert is None else "--tls-key"
        raise AuthError(
            f"TLS needs both --tls-cert and --tls-key; {missing} is missing"
        )
    return flight.CertKeyPair(
        cert=read_pem(cert, "TLS certificate"), key=read_pem(key, "TLS key")
    )


def token_problem(expected: "str | None", headers: dict) -> "str | None":
    """Return why ``headers`` fail the token check, or None when they pass.

    An agent without a token accepts every call.
    """
    if expected is None:
        return None

    values = headers.get(AUTH_HEADER) or []
    presented = values[0] if values else None
    if isinstance(presented, str):
        presented = presented.encode()
    if not presented or not presented.startswith(BEARER.encode()):
        return "the request carried no token"

    token = presented[len(BEARER) :]
    if not hmac.compare_digest(token, expected.encode()):
        return "the request carried a wrong token"
    return None


class TokenCheckFactory(flight.ServerMiddlewareFactory):
    """Flight middleware that records, for each call, whether its token is valid.

    The verdict is checked by ``authorize`` in each handler, where the peer's
    address is known and can be logged.
    """

    def __init__(self, token: "str | None") -> None:
        super().__init__()
        self._token = token

    def start_call(self, info, headers):
        return TokenVerdict(token_problem(self._token, headers))


class TokenVerdict(flight.ServerMiddleware):
    """The token check result of one call: None, or why the call is rejected."""

    def __init__(self, problem: "str | None") -> None:
        super().__init__()
        self.problem = problem


MIDDLEWARE_KEY = "token"


def authorize(context: flight.ServerCallContext, action: str) -> None:
    """Raise FlightUnauthenticatedError unless the call passed the token check."""
    verdict = context.get_middleware(MIDDLEWARE_KEY)
    # Without a verdict the middleware did not run, so the call is rejected.
    problem = "the token check did not run" if verdict is None else verdict.problem
    if problem is None:
        return

    log.warning("rejected %s from %s: %s", action, context.peer(), problem)
    raise flight.FlightUnauthenticatedError(
        f"{problem}; pass the agent's token with --token-file or ${TOKEN_ENV}"
    )
