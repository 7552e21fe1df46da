"""fastsock: record which processes talk to which, from the kernel's socket tables.

``fastsock.sample()`` returns the sockets of this machine now, with the
processes that hold them, as a ``pyarrow.Table``.
"""

from fastsock.errors import FastsockError

__version__ = "0.1.0"
__all__ = ["FastsockError", "sample", "__version__"]


def sample(proc_root=None):
    """Return the current TCP and UDP sockets with their owners as a pyarrow.Table.

    proc_root reads another /proc tree; it defaults to ``$FASTSOCK_PROC_ROOT``,
    else ``/proc``. One row per socket; see docs/schema.md for the columns.
    """
    from fastsock.snapshot import sample as take_sample

    return take_sample(proc_root)
