"""The identity of a fastsock node: a stable node id and the name shown in results.

A node is one data directory on one machine. Its id is the BLAKE2b hash, with
a 16-byte digest, of the machine id and the absolute, symlink-resolved data
directory:

    node_id = blake2b(machine_id + "\\0" + data_dir, digest_size=16).hexdigest()

The machine id is the first non-empty line of /etc/machine-id, else of
/var/lib/dbus/machine-id. A machine with neither gets a random id generated
once and stored in ``<data dir>/node-id``. The id never depends on an address,
so a node with several addresses is one node whichever address reached it, and
two agents on one machine with different data directories are two nodes.
"""

import hashlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastsock.errors import FastsockError

log = logging.getLogger(__name__)

MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))

# File in the data directory that stores a generated machine id.
GENERATED_ID_FILE = "node-id"


@dataclass(frozen=True)
class NodeIdentity:
    """A node's stable id (32 hex digits) and its display name."""

    node_id: str
    name: str


class NodeIdError(FastsockError, OSError):
    """A generated machine id could not be stored in the data directory."""


def node_identity(
    data_dir: "str | os.PathLike[str]",
    name: "str | None" = None,
    machine_id_files: "tuple[Path, ...]" = MACHINE_ID_FILES,
) -> NodeIdentity:
    """Return the identity of the node that owns ``data_dir``.

    ``name`` defaults to the hostname. Raises NodeIdError when no machine id
    file exists and the generated id cannot be written to the data directory.
    """
    root = Path(data_dir).resolve()
    machine_id = read_machine_id(machine_id_files) or generated_machine_id(root)

    digest = hashlib.blake2b(f"{machine_id}\0{root}".encode(), digest_size=16)
    return NodeIdentity(digest.hexdigest(), name or socket.gethostname())


def read_machine_id(files: "tuple[Path, ...]" = MACHINE_ID_FILES) -> "str | None":
    """Return the first non-empty machine id among ``files``, or None."""
    for path in files:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("cannot read machine id from %s: %s", path, error)
            continue

        if text:
            return text.splitlines()[0]
    return None


def generated_machine_id(data_dir: Path) -> str:
    """Return the id stored in ``<data_dir>/node-id``, creating it on first use."""
    path = data_dir / GENERATED_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise NodeIdError(
            error.errno, f"cannot read the node id file ({error.strerror})", str(path)
        ) from error

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _create_exclusively(path, uuid.uuid4().hex)
    except FileExistsError:
        # Another process on the same data directory created it first.
        pass
    except OSError as error:
        raise NodeIdError(
            error.errno,
            f"no machine id file exists and the generated node id cannot be stored "
            f"({error.strerror}); make the data directory writable or create "
            f"/etc/machine-id",
            str(path),
        ) from error

    log.info("generated a node id and stored it in %s", path)
    return path.read_text().strip()


def _create_exclusively(path: Path, text: str) -> None:
    # Write under a temporary name, then link to the final name, so a reader
    # never sees a half-written id and two writers cannot both succeed.
    temp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    temp.write_text(text + "\n")
    try:
        os.link(temp, path)
    finally:
        temp.unlink()
