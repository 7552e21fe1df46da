"""fastsock: record which processes talk to which, from the kernel's socket tables.

``fastsock.sample()`` returns the sockets of this machine now, with the
processes that hold them, as a ``pyarrow.Table``. ``fastsock.open_history()``
returns a DuckDB connection with one view per stored table.
"""

from fastsock.errors import FastsockError

__version__ = "0.1.0"
__all__ = ["FastsockError", "open_history", "sample", "__version__"]


def sample(proc_root=None):
    """Return the current TCP and UDP sockets with their owners as a pyarrow.Table.

    proc_root reads another /proc tree; it defaults to ``$FASTSOCK_PROC_ROOT``,
    else ``/proc``. One row per socket; see docs/schema.md for the columns.
    """
    from fastsock.snapshot import sample as take_sample

    return take_sample(proc_root)


def open_history(data_dir=None):
    """Return an in-memory DuckDB connection with views over the stored history.

    data_dir defaults to ``$FASTSOCK_DATA_DIR``, else ``/var/lib/fastsock`` as
    root, else ``$XDG_DATA_HOME/fastsock``. The views are ``connections``,
    ``listeners``, ``processes`` and the other tables in docs/schema.md, plus
    ``<table>_records`` with every stored record. Raises NoDataError, as
    ``fastsock query`` does, when data_dir is a file or has no collected files.
    """
    from fastsock.query import check_collected, open_database
    from fastsock.store import default_data_dir

    root = data_dir if data_dir is not None else default_data_dir()
    check_collected(root)
    return open_database(root)
