"""Times given on the command line: ISO timestamps, or times back from now."""

import re
from datetime import datetime, timedelta, timezone

from fastsock.errors import FastsockError

# Units of relative times such as 30m, in seconds.
TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
RELATIVE_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class InvalidTimeError(FastsockError, ValueError):
    """A --since or --until value is neither an ISO timestamp nor a relative time."""


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """Parse an ISO timestamp or a relative time (``45s``, ``30m``, ``1h``, ``2d``).

    A relative time counts back from now. A timestamp without a UTC offset is
    taken as UTC, the zone of the stored data.
    """
    now = now or datetime.now(timezone.utc)
    match = RELATIVE_TIME.match(text)
    if match:
        seconds = float(match.group(1)) * TIME_UNITS[match.group(2)]
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError as error:
            raise InvalidTimeError(
                f"invalid time {text!r}: it reaches before year 1; use a shorter "
                "span such as 30d"
            ) from error

    if not text.strip():
        raise InvalidTimeError(
            "invalid time '': use an ISO timestamp such as 2024-05-01T12:00:00Z, "
            "or a time back from now such as 45s, 30m, 1h or 2d"
        )
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise InvalidTimeError(
            f"invalid time {text!r}; use an ISO timestamp such as "
            f"2024-05-01T12:00:00Z, or a time back from now such as 45s, 30m, 1h or 2d"
        ) from error
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed
