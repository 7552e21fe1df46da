"""How long-running fastsock processes allocate memory and give it back.

pyarrow allocates from mimalloc by default, and mimalloc keeps freed pages
for reuse. glibc's malloc serves a block from its heap, where freed memory
stays, unless the block is larger than a threshold. Each time a large block
is freed, glibc raises that threshold to the block's size (up to 32 MB, by
the mallopt(3) manual page). A collector that reads a 20 MB socket table and builds tables
of 100,000 rows at every sample and flush therefore kept most of what it ever
freed. Arrow on the C library's malloc, with a fixed threshold so that large
blocks are always mapped and unmapped, keeps resident memory close to what the
collector's tables hold (docs/performance.md, "Memory").
"""

import ctypes
import ctypes.util
import logging
import os

import pyarrow as pa

log = logging.getLogger(__name__)

# The variable that pyarrow reads for its default allocator; a user's choice wins.
POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"

# glibc's mallopt parameter for the size from which malloc maps blocks of their own.
M_MMAP_THRESHOLD = -3

# Blocks of this many bytes or more get pages of their own, returned when freed.
# A sample's columns at 1,000 sockets stay below it, so small samples do not
# pay for page faults.
MMAP_THRESHOLD_BYTES = 256 * 1024


def use_returning_allocator() -> None:
    """Make large allocations go back to the kernel when they are freed.

    Arrow allocates with the C library's malloc from now on, unless
    ARROW_DEFAULT_MEMORY_POOL names an allocator. glibc's threshold for
    mapped blocks is fixed at MMAP_THRESHOLD_BYTES, unless
    MALLOC_MMAP_THRESHOLD_ sets it. Other C libraries keep their defaults.
    """
    if os.environ.get(POOL_VARIABLE):
        log.debug("Arrow allocator left as %s chose", POOL_VARIABLE)
    else:
        pa.set_memory_pool(pa.system_memory_pool())
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _fix_mmap_threshold(MMAP_THRESHOLD_BYTES)


def _fix_mmap_threshold(size: int) -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in the C library %s; its malloc keeps its defaults", name)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(M_MMAP_THRESHOLD, size) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) failed; malloc keeps its default", size)


def release_unused() -> None:
    """Return the memory that Arrow's allocator keeps unused to the kernel."""
    pa.default_memory_pool().release_unused()
