"""Load the socket-table cases under tests/fixtures as proc trees.

Each case folder holds kernel text (tcp, tcp6, udp, udp6) and expected.json.
A case is read through a proc root, exactly as a live /proc is read.
"""

import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TABLE_FILES = ("tcp", "tcp6", "udp", "udp6")


def case_dir(case: str) -> Path:
    return FIXTURES / case


def expected(case: str) -> dict:
    return json.loads((case_dir(case) / "expected.json").read_text())


def proc_tree(case: str, root: Path) -> Path:
    """Copy the case's tables to <root>/net and return root, a proc root."""
    net = root / "net"
    net.mkdir(parents=True)
    for name in TABLE_FILES:
        source = case_dir(case) / name
        if source.exists():
            shutil.copyfile(source, net / name)
    return root


def expected_rows(case: str) -> list[dict]:
    """Return the expected socket rows of a case, whichever shape it lists them in."""
    sockets = expected(case)["sockets"]
    if isinstance(sockets, dict):
        return [row for rows in sockets.values() for row in rows]
    return sockets
