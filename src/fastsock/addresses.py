"""Socket addresses as fastsock stores them: canonical text, endpoints, loopback."""

import ipaddress
import re

# The wildcard address of a listener, IPv4 and IPv6.
WILDCARDS = ("0.0.0.0", "::")

# ``[v6]:port`` or ``v4:port``. A bare IPv6 address has colons but no brackets,
# so it matches neither form.
ENDPOINT = re.compile(
    r"^\[(?P<v6>[^\]]+)\]:(?P<port6>\d+)$|^(?P<v4>[^:]+):(?P<port4>\d+)$"
)


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """Return (address, port) of ``a.b.c.d:port`` or ``[v6]:port``, else None."""
    match = ENDPOINT.match(text.strip())
    if not match:
        return None

    address = match.group("v6") or match.group("v4")
    port = int(match.group("port6") or match.group("port4"))
    if not is_address(address) or not 0 <= port <= 65535:
        return None
    return canonical_address(address), port


def out_of_range_port(text: str) -> int | None:
    """Return the port of an ``address:port`` text whose port is above 65535, else None."""
    match = ENDPOINT.match(text.strip())
    if not match:
        return None
    port = int(match.group("port6") or match.group("port4"))
    return port if port > 65535 else None


def format_endpoint(address: str | None, port: int | None) -> str:
    """Return address:port, with brackets around IPv6 and no port when it is NULL."""
    if address is None:
        return "?"
    shown = f"[{address}]" if ":" in address else address
    return f"{shown}:{port}" if port is not None else shown


def address_part(endpoint: str) -> str:
    """Return the address of an endpoint such as ``[::1]:80``, or endpoint itself."""
    parsed = parse_endpoint(endpoint)
    return parsed[0] if parsed else endpoint


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def canonical_address(address: str) -> str:
    """Return address as fastsock stores it (RFC 5952 text for IPv6)."""
    return str(ipaddress.ip_address(address))


def is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except (TypeError, ValueError):
        return False
