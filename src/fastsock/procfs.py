"""The proc root: the directory that fastsock reads as /proc.

Every read goes through a proc root chosen at call time: the ``proc_root``
argument, else ``$FASTSOCK_PROC_ROOT``, else ``/proc``. Pointing it elsewhere
reads a host's /proc mounted into a container, or a fixture tree in tests.
"""

import os

from fastsock.errors import ProcRootNotFoundError

PROC_ROOT_ENV = "FASTSOCK_PROC_ROOT"
DEFAULT_PROC_ROOT = "/proc"


def resolve_proc_root(proc_root: "str | os.PathLike[str] | None" = None) -> str:
    """Return the proc root to read, as a path without a trailing slash."""
    if proc_root is None:
        proc_root = os.environ.get(PROC_ROOT_ENV) or DEFAULT_PROC_ROOT
    root = os.fspath(proc_root).rstrip("/") or "/"
    if not os.path.isdir(root):
        raise ProcRootNotFoundError(
            f"proc root {root!r} is not a directory; pass --proc-root or set "
            f"{PROC_ROOT_ENV} to a mounted /proc"
        )
    return root
