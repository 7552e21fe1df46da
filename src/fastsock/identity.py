"""Stable 64-bit ids for stored records, computed over whole columns.

Ids mix their parts with the splitmix64 finaliser, so ids of different
entities collide with probability about n^2 / 2^64 for n entities.
"""

import hashlib

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def mix(values: np.ndarray) -> np.ndarray:
    """Return the splitmix64 finaliser of each value, as uint64."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def combine(*parts: np.ndarray) -> np.ndarray:
    """Return one signed 64-bit id per row from several integer columns."""
    result = np.zeros(len(parts[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            result = mix(result ^ mix(np.asarray(part).astype(np.uint64)))
    return result.view(np.int64)


def text_id(text: str) -> int:
    """Return a 63-bit number derived from text (a host name, for instance)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
