"""Agent endpoints: listen addresses, peer endpoints and the peers map file.

An agent listens on DEFAULT_AGENT_PORT unless --listen names another port. A
peer found in the stored connections is reached at its address on that port, unless the
peers map names another endpoint for the address (NAT, another port, TLS).
"""

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastsock.federation_errors import EndpointError

# TCP port of `fastsock serve` and `fastsock agent`. Not registered with IANA.
DEFAULT_AGENT_PORT = 7433

DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_AGENT_PORT}"

SCHEMES = {"grpc": False, "grpc+tcp": False, "grpc+tls": True}


@dataclass(frozen=True)
class Endpoint:
    """A host and TCP port of an agent, and whether it speaks TLS."""

    host: str
    port: int
    tls: bool = False

    def location(self) -> str:
        """Return the Arrow Flight location URI, for example grpc+tcp://[::1]:7433."""
        scheme = "grpc+tls" if self.tls else "grpc+tcp"
        return f"{scheme}://{self}"

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(
    text: str, *, default_port: int = DEFAULT_AGENT_PORT, tls: bool = False
) -> Endpoint:
    """Parse ``HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` or a grpc+tcp/grpc+tls URI.

    ``tls`` applies when the text has no scheme. Raises EndpointError naming the
    text when it cannot be parsed.
    """
    text = text.strip()
    if "://" in text:
        return _parse_uri(text, default_port)

    if text.count(":") > 1 and not text.startswith("["):
        # A bare IPv6 address such as ::1 has no room for a port.
        return Endpoint(_bare_ipv6(text), default_port, tls)

    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError as error:
        raise EndpointError(f"invalid endpoint {text!r}: {error}") from error

    if not host:
        raise EndpointError(
            f"invalid endpoint {text!r}; use HOST, HOST:PORT or [IPV6]:PORT"
        )
    return Endpoint(host, default_port if port is None else port, tls)


def _parse_uri(text: str, default_port: int) -> Endpoint:
    try:
        parts = urlsplit(text)
    except ValueError as error:
        raise EndpointError(f"invalid endpoint {text!r}: {error}") from error
    if parts.scheme not in SCHEMES:
        raise EndpointError(
            f"invalid endpoint {text!r}: the scheme must be one of {', '.join(SCHEMES)}"
        )
    try:
        port = parts.port
    except ValueError as error:
        raise EndpointError(f"invalid endpoint {text!r}: {error}") from error
    if not parts.hostname:
        raise EndpointError(f"invalid endpoint {text!r}: it names no host")

    return Endpoint(
        parts.hostname, default_port if port is None else port, SCHEMES[parts.scheme]
    )


def _bare_ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError as error:
        raise EndpointError(
            f"invalid endpoint {text!r}; use HOST, HOST:PORT or [IPV6]:PORT"
        ) from error


def is_loopback_host(host: str) -> bool:
    """Return True for localhost and for addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or _mapped_loopback(address)


def _mapped_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped is not None and mapped.is_loopback


def canonical_address(text: str) -> "str | None":
    """Return an IP address as canonical text, IPv4-mapped IPv6 as IPv4.

    Returns None for text that is not an IP address.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None

    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


def load_peers_map(path: "str | Path") -> dict[str, str]:
    """Read a peers map: peer address -> agent endpoint, from JSON or TOML.

    The file is one object (JSON) or table (TOML) of such entries, either at
    the top level or under a ``peers`` key. A ``.toml`` suffix selects TOML and
    any other suffix JSON. Each endpoint is checked with parse_endpoint.
    Raises EndpointError naming the file and the entry that is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EndpointError(
            f"invalid peers map {path}: it is not UTF-8 text ({error})"
        ) from error
    except OSError as error:
        raise EndpointError(f"cannot read the peers map {path}: {error}") from error

    try:
        data = _load_toml(path, text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as error:
        # TOMLDecodeError and JSONDecodeError both derive from ValueError.
        raise EndpointError(f"invalid peers map {path}: {error}") from error

    entries = data.get("peers", data) if isinstance(data, dict) else data
    if not isinstance(entries, dict):
        raise EndpointError(
            f"invalid peers map {path}: expected an object of address = endpoint "
            f"entries, got {type(entries).__name__}"
        )
    return _checked_peers(path, entries)


def _load_toml(path: Path, text: str) -> dict:
    try:
        import tomllib
    except ImportError as error:
        raise EndpointError(
            f"cannot read the TOML peers map {path}: TOML needs Python 3.11 or "
            f"later; write the map as JSON instead"
        ) from error
    return tomllib.loads(text)


def _checked_peers(path: Path, entries: dict) -> dict[str, str]:
    peers = {}
    for address, endpoint in entries.items():
        key = canonical_address(str(address))
        if key is None or not isinstance(endpoint, str):
            raise EndpointError(
                f"invalid entry {address!r} = {endpoint!r} in the peers map {path}; "
                f'each entry maps an IP address to "HOST:PORT" or a grpc+tls:// URI'
            )
        parse_endpoint(endpoint)
        peers[key] = endpoint
    return peers
