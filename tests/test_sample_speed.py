"""Results of the cheaper sample path: one parse of all tables, fast paths, one TCP dump."""

import errno
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from fastsock import _netlink, _socktable
from fastsock.netlink import NetlinkReader, null_int64_column
from fastsock.netns import netns_column
from fastsock.processes import Attributor
from fastsock.snapshot import (
    PROC_SOCKETS_SCHEMA,
    SnapshotStats,
    Snapshotter,
    join_owners,
)
from fastsock.readskips import EarlyStopCheck
from fastsock.sockets import (
    SAMPLE_SCHEMA,
    STATE_TEXT,
    TableReport,
    read_socket_tables,
)

TCP_ROW = (
    "   0: 0100007F:1F90 00000000:0000 {state} 00000000:00000000 00:00000000 "
    "00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
)
TCP6_ROW = (
    "   0: 00000000000000000000000001000000:1F91 "
    "00000000000000000000000000000000:0000 {state} 00000000:00000000 "
    "00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
)
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when\n"


def write_tables(root, tables: dict[str, list[tuple[str, int]]]):
    """Write net/<name> files of (state hex, inode) rows under root."""
    net = root / "net"
    net.mkdir(parents=True)
    for name, rows in tables.items():
        template = TCP6_ROW if name.endswith("6") else TCP_ROW
        text = HEADER + "".join(
            template.format(state=state, inode=inode) for state, inode in rows
        )
        (net / name).write_text(text)
    return root


def test_tables_parsed_into_single_chunks(tmp_path):
    root = write_tables(
        tmp_path,
        {
            "tcp": [("0A", 11), ("01", 12)],
            "tcp6": [("0A", 21)],
            "udp": [("07", 31)],
            "udp6": [("07", 41), ("01", 42)],
        },
    )
    table = read_socket_tables(str(root), TableReport(), early_stop=EarlyStopCheck())

    assert table.schema == SAMPLE_SCHEMA
    assert all(column.num_chunks == 1 for column in table.columns)
    rows = {row["inode"]: row for row in table.to_pylist()}
    assert [rows[i]["protocol"] for i in (11, 12, 21, 31, 41, 42)] == [
        "tcp",
        "tcp",
        "tcp",
        "udp",
        "udp",
        "udp",
    ]
    assert [rows[i]["socket_family"] for i in (11, 21, 31, 41)] == [
        "inet",
        "inet6",
        "inet",
        "inet6",
    ]
    assert rows[21]["family"] == "inet6"
    assert rows[21]["local_addr"] == "::1"
    assert rows[11]["local_addr"] == "127.0.0.1"


def test_missing_tables_keep_file_order(tmp_path):
    root = write_tables(tmp_path, {"tcp6": [("01", 21)], "udp": [("07", 31)]})
    report = TableReport()
    table = read_socket_tables(str(root), report, early_stop=EarlyStopCheck())

    rows = {row["inode"]: row for row in table.to_pylist()}
    assert rows[21]["protocol"] == "tcp"
    assert rows[21]["socket_family"] == "inet6"
    assert rows[31]["protocol"] == "udp"
    assert rows[31]["socket_family"] == "inet"
    assert report.rows == 2


@pytest.mark.parametrize(
    "name, state, expected",
    [
        ("tcp", "01", "ESTABLISHED"),
        ("tcp", "07", "CLOSE"),
        ("tcp", "0A", "LISTEN"),
        ("tcp", "0C", "NEW_SYN_RECV"),
        ("tcp", "0D", "UNKNOWN"),
        ("tcp", "FF", "UNKNOWN"),
        ("udp", "07", "UNCONN"),
        ("udp", "01", "ESTABLISHED"),
    ],
)
def test_state_text(tmp_path, name, state, expected):
    root = write_tables(tmp_path, {name: [(state, 7)]})
    table = read_socket_tables(str(root), TableReport(), early_stop=EarlyStopCheck())

    code = int(state, 16)
    assert table.column("state").to_pylist() == [expected]
    # state_code is int8, as the kernel's u8 read as signed.
    assert table.column("state_code").to_pylist() == [
        code - 256 if code > 127 else code
    ]


def test_text_column_rejects_unknown_code():
    codes = np.array([0, 1, 2], dtype=np.int8)

    offsets, text = _socktable.text_column(codes, (b"a", b"bc", b""))
    assert offsets.tolist() == [0, 1, 3, 3]
    assert text.tobytes() == b"abc"
    with pytest.raises(ValueError, match="code 2 at row 2"):
        _socktable.text_column(codes, (b"a", b"bc"))


def test_parse_buffers_reports_bad_rows_per_file():
    good = _socktable.buffer_from_reads([TCP_ROW.format(state="01", inode=5).encode()])
    bad = _socktable.buffer_from_reads([b"   0: nonsense\n"])
    parsed = _socktable.parse_buffers([good, bad], [4, 4], [False, True])

    assert parsed.rows == 1
    assert parsed.file_rows == [1, 0]
    assert parsed.bad_rows[0] == []
    assert parsed.bad_rows[1] == [(1, "bad_address", "   0: nonsense")]
    assert parsed.skipped[1][_socktable.SKIP_REASONS.index("bad_address")] == 1


def test_state_text_matches_state_names():
    assert STATE_TEXT[_socktable.UNCONNECTED_STATE_INDEX] == b"UNCONN"
    assert STATE_TEXT[10] == b"LISTEN"


def test_proc_read_sockets_one_table(tmp_path):
    root = write_tables(tmp_path, {"tcp": [("0A", 11)], "udp": [("07", 31)]})
    snapshotter = Snapshotter(str(root))
    sockets = snapshotter.read_sockets(SnapshotStats())

    assert sockets.schema == PROC_SOCKETS_SCHEMA
    assert all(column.num_chunks == 1 for column in sockets.columns)
    assert sockets.column("cookie").null_count == 2
    assert sockets.column("netns").to_pylist() == [snapshotter.netns] * 2


def test_null_and_netns_columns_sliced():
    small = null_int64_column(3)
    large = null_int64_column(5000)

    assert len(small) == 3
    assert small.null_count == 3
    assert large.null_count == 5000
    assert large.type == pa.int64()
    assert netns_column(4026531840, 4).to_pylist() == [4026531840] * 4
    assert netns_column(4026531840, 6000).to_pylist() == [4026531840] * 6000
    assert netns_column(None, 2).to_pylist() == [None, None]


# Attribution when a sample has no new socket.


def test_resolve_only_inode_zero():
    attributor = Attributor()
    owners = attributor.resolve(np.array([0, 0], dtype=np.int64))

    assert owners.num_rows == 1
    assert owners.column("inode").to_pylist() == [0]
    assert owners.column("pid").null_count == 1
    assert attributor.processes().num_rows == 0
    assert attributor.stats["full_walks"] == 0


def test_join_owners_without_owners_matches_schema():
    attributor = Attributor()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        inode = os.fstat(held.fileno()).st_ino
        sockets = pa.table(
            {"inode": pa.array([inode, 0], pa.int64()), "x": pa.array([1, 2])}
        )
        owned = join_owners(sockets, attributor.resolve(np.array([inode, 0])))
        unowned = join_owners(sockets, attributor.resolve(np.array([0])))

    assert owned.column("pid").to_pylist() == [os.getpid(), None]
    assert unowned.schema == owned.schema
    assert unowned.column("pid").null_count == 2
    assert unowned.column("comm").null_count == 2


HOLDER = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', 0))\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def held_socket_inode(pid: int) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            return int(target[len("socket:[") : -1])
    raise AssertionError(f"pid {pid} holds no socket")


def test_exited_holder_forgotten_after_unchanged_listing(monkeypatch):
    from fastsock import processes

    listing = {"pids": processes._fdscan.list_pids("/proc"), "calls": 0}

    def frozen_listing(_proc_root):
        # The same array until the test refreshes it, as on a quiet host.
        listing["calls"] += 1
        return listing["pids"]

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"ready"
        inode = held_socket_inode(holder.pid)
        listing["pids"] = processes._fdscan.list_pids("/proc")
        monkeypatch.setattr(processes._fdscan, "list_pids", frozen_listing)
        attributor = Attributor()
        owners = attributor.resolve(np.array([inode]))
        assert owners.column("pid").to_pylist() == [holder.pid]
        attributor.resolve(np.array([0]))
        attributor.resolve(np.array([0]))
        generation = attributor.generation
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)

    monkeypatch.undo()
    attributor.resolve(np.array([0]))
    assert listing["calls"] == 3
    assert holder.pid not in attributor._holders.distinct_pids.tolist()
    assert attributor.generation > generation


# One netlink dump for TCP of both families.


@pytest.fixture
def tcp_sockets():
    """Listening and connected TCP sockets over IPv4 and IPv6 loopback."""
    opened = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        server = socket.socket(family)
        server.bind((address, 0))
        server.listen()
        client = socket.create_connection((address, server.getsockname()[1]))
        accepted, _ = server.accept()
        opened += [server, client, accepted]
    yield opened
    for sock in opened:
        sock.close()


def cookies_of_inodes(table: pa.Table, inodes: set[int]) -> dict[int, int]:
    return {
        row["inode"]: row["cookie"]
        for row in table.to_pylist()
        if row["inode"] in inodes
    }


def test_dump_tcp_matches_family_dumps(tcp_sockets):
    inodes = {os.fstat(sock.fileno()).st_ino for sock in tcp_sockets}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as diag:
        both = _netlink.DiagBuffer()
        _netlink.dump_tcp(both, diag.fileno(), 0xFFF, True, 1)
        separate = _netlink.DiagBuffer()
        _netlink.dump(separate, diag.fileno(), 4, 6, 0xFFF, True, 2)
        _netlink.dump(separate, diag.fileno(), 6, 6, 0xFFF, True, 3)

    in_one_dump = _netlink.to_columns(both)
    per_family = _netlink.to_columns(separate)
    ours = np.isin(in_one_dump.inode, list(inodes))
    assert set(in_one_dump.inode.tolist()) & inodes == inodes
    assert set(per_family.inode.tolist()) & inodes == inodes
    assert set(in_one_dump.socket_family[ours].tolist()) == {4, 6}
    assert in_one_dump.has_counters[ours].all()


def test_reader_falls_back_to_family_dumps(tcp_sockets, monkeypatch, caplog):
    inodes = {os.fstat(sock.fileno()).st_ino for sock in tcp_sockets}

    def rejected(*_args):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    reader = NetlinkReader()
    try:
        in_one = reader.read(TableReport())
        monkeypatch.setattr(_netlink, "dump_tcp", rejected)
        with caplog.at_level(logging.INFO, logger="fastsock.netlink"):
            per_family = reader.read(TableReport())
            again = reader.read(TableReport())
    finally:
        reader.close()

    assert reader.tcp_in_one_dump is False
    assert cookies_of_inodes(in_one, inodes) == cookies_of_inodes(per_family, inodes)
    assert set(cookies_of_inodes(again, inodes)) == inodes
    assert len([r for r in caplog.records if "TCPDIAG_GETSOCK" in r.getMessage()]) == 1
