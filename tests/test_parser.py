"""The socket-table parser on literal kernel text, read through a proc root."""

import json
import os
import subprocess
import sys

import pytest

from fastsock.sockets import SkipLogger, TableReport, read_socket_tables

from caseload import expected, expected_rows, proc_tree

CASES = ["C01", "C03", "C04", "C05", "C06", "C07", "C09"]


def parse(root):
    report = TableReport()
    table = read_socket_tables(str(root), report, SkipLogger())
    return table, report


def by_inode_and_port(table):
    return {
        (r["inode"], r["local_port"], r["remote_port"]): r for r in table.to_pylist()
    }


def expected_state(row):
    if row["proto"] == "udp" and row["st_hex"] == "07":
        return "UNCONN"
    return row["state"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "C09"])
def test_case_rows_decoded(case, tmp_path):
    table, report = parse(proc_tree(case, tmp_path))
    rows = by_inode_and_port(table)
    wanted = expected_rows(case)

    assert report.skipped_total == 0
    assert table.num_rows == len(wanted)
    for want in wanted:
        got = rows[(want["inode"], want["local_port"], want["remote_port"])]
        normalized = want.get("normalized", {})
        assert got["local_addr"] == normalized.get("local_addr", want["local_addr"])
        assert got["remote_addr"] == normalized.get("remote_addr", want["remote_addr"])
        assert got["family"] == normalized.get("family", want["family"])
        assert got["socket_family"] == want["family"]
        assert got["protocol"] == want["proto"]
        assert got["state"] == expected_state(want)
        assert got["state_code"] == int(want["st_hex"], 16)
        assert got["uid"] == want["uid"]
        assert got["tx_queue"] == want["tx_queue"]
        assert got["rx_queue"] == want["rx_queue"]


def test_ipv6_words_in_host_order(tmp_path):
    table, _ = parse(proc_tree("C01", tmp_path))
    addresses = set(table.column("local_addr").to_pylist())
    addresses |= set(table.column("remote_addr").to_pylist())

    for row in expected("C01")["sockets"]:
        for wrong in row["wrong_if_hex_read_as_plain_bytes"].values():
            if wrong != "::":
                assert wrong not in addresses
        for wrong in row["wrong_if_all_16_bytes_reversed"].values():
            if wrong != "::":
                assert wrong not in addresses
    assert "::1" in addresses


def test_only_ffff_prefix_is_mapped(tmp_path):
    table, _ = parse(proc_tree("C03", tmp_path))
    rows = {r["inode"]: r for r in table.to_pylist()}

    assert rows[23002]["family"] == "inet"
    assert rows[23002]["socket_family"] == "inet6"
    assert rows[23005]["remote_addr"] == "64:ff9b::cb00:7150"
    assert rows[23005]["family"] == "inet6"


def test_wide_slot_numbers(tmp_path):
    table, report = parse(proc_tree("C04", tmp_path))
    inodes = table.column("inode").to_pylist()

    assert report.skipped_total == 0
    assert 24004 in inodes
    assert 24007 in inodes


def test_short_rows_keep_inode_zero(tmp_path):
    table, _ = parse(proc_tree("C05", tmp_path))
    short = [r for r in table.to_pylist() if r["inode"] == 0]

    assert {r["state"] for r in short} == {
        "TIME_WAIT",
        "SYN_RECV",
        "FIN_WAIT2",
        "FIN_WAIT1",
    }
    assert all(r["remote_port"] != 0 for r in short)


def test_udp_unconnected_is_not_closed(tmp_path):
    table, _ = parse(proc_tree("C07", tmp_path))
    states = {r["inode"]: r["state"] for r in table.to_pylist()}

    assert states[27001] == "UNCONN"
    assert states[27002] == "ESTABLISHED"
    assert "CLOSE" not in states.values()


def test_table_larger_than_one_read(tmp_path):
    want = expected("C09")
    table, report = parse(proc_tree("C09", tmp_path))
    rows = table.to_pylist()

    assert table.num_rows == want["row_count"]
    assert sum(table.column("inode").to_pylist()) == want["inode_sum"]
    assert report.bytes == want["file_size_bytes"]
    assert rows[0]["local_addr"] == want["listener"]["local_addr"]
    last = want["last_connection"]
    assert rows[-1]["remote_addr"] == last["remote_addr"]
    assert rows[-1]["remote_port"] == last["remote_port"]


HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
    "retrnsmt   uid  timeout inode\n"
)
GOOD = (
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 "
    "00000000  1000        0 41001 1 0000000000000000 100 0 0 10 0\n"
)


def write_tcp(root, body):
    (root / "net").mkdir()
    (root / "net" / "tcp").write_text(HEADER + body)
    return root


@pytest.mark.parametrize(
    "line, reason",
    [
        ("   1: 0100007F:1F90 00000000:0000 0A\n", "too_few_fields"),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 0000000Q:00000000 00:0 0 0 0 41002\n",
            "bad_queue",
        ),
        ("   1: 0100007F:1F90\n", "too_few_fields"),
        (
            "   1: 01000G7F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 0 0 41002\n",
            "bad_address",
        ),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 1000\n",
            "too_few_fields",
        ),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 1000 0 12x4\n",
            "bad_inode",
        ),
        (
            "   1: 0100007F:1F9G0 00000000:0000 0A 00000000:00000000 00:0 0 0 0 41002\n",
            "bad_port",
        ),
        (
            "   1: 0100007F:1F90 00000000:0000 ZZ 00000000:00000000 00:0 0 0 0 41002\n",
            "bad_state",
        ),
        ("garbage that is not a row\n", "bad_slot"),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 -5 0 41002\n",
            "bad_uid",
        ),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 12abc 0 41002\n",
            "bad_uid",
        ),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 "
            "12345678901234567890 0 41002\n",
            "bad_uid",
        ),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:0 0 0 0 "
            "9999999999999999999\n",
            "bad_inode",
        ),
        ("   1: 0100007F:1F90 00000000:0000 0A 00000000:\n", "too_few_fields"),
        (
            "   1: 0100007F:1F90 00000000:0000 0A 00000000:0000000x 00:0 0 0 0 41002\n",
            "bad_queue",
        ),
    ],
)
def test_malformed_row_skipped_and_counted(tmp_path, line, reason):
    table, report = parse(
        write_tcp(tmp_path, GOOD + line + GOOD.replace("41001", "41003"))
    )

    assert table.column("inode").to_pylist() == [41001, 41003]
    assert report.skipped == {("tcp", reason): 1}


def test_malformed_row_logged_with_line(tmp_path, caplog):
    parse(write_tcp(tmp_path, GOOD + "garbage\n"))

    assert "line 3" in caplog.text
    assert "'garbage'" in caplog.text


def test_long_malformed_row_logged_cut_short(tmp_path, caplog):
    parse(write_tcp(tmp_path, GOOD + "x" * 5000 + "\n"))

    assert "more)" in caplog.text
    assert "x" * 241 not in caplog.text


def test_extra_trailing_columns_ignored(tmp_path):
    table, report = parse(write_tcp(tmp_path, GOOD.rstrip("\n") + " 7 8 9 extra\n"))

    assert report.skipped_total == 0
    assert table.column("inode").to_pylist() == [41001]


def test_last_row_without_newline(tmp_path):
    table, _ = parse(write_tcp(tmp_path, GOOD.rstrip("\n")))

    assert table.column("inode").to_pylist() == [41001]


def test_missing_tables_read_as_empty(tmp_path):
    table, report = parse(write_tcp(tmp_path, GOOD))

    assert table.num_rows == 1
    assert report.skipped_total == 0


def test_slot_wider_than_any_integer(tmp_path):
    row = GOOD.replace("   0:", "1" * 30 + ":")
    table, report = parse(write_tcp(tmp_path, row))

    assert report.skipped_total == 0
    assert table.column("inode").to_pylist() == [41001]


def test_unreadable_table_raises_proc_read_error(tmp_path):
    from fastsock.errors import ProcReadError

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").mkdir()

    with pytest.raises(ProcReadError, match="net/tcp"):
        parse(tmp_path)


# Run in a network namespace of the test's own, so that no other process's
# connections open or close while the tables are read twice.
EARLY_STOP_PROGRAM = """
import json, socket
from fastsock import _socktable

server = socket.create_server(("127.0.0.1", 0))
sockets = []
for _ in range(200):
    sockets.append(socket.create_connection(server.getsockname()))
    sockets.append(server.accept()[0])
result = {}
for name in ("tcp", "tcp6", "udp", "udp6"):
    full = _socktable.read_file(f"/proc/net/{name}")
    short = _socktable.read_file(f"/proc/net/{name}", True)
    result[name] = [full.early_stop_size, full.size, full.reads,
                    short.stopped_early, short.reads]
print(json.dumps(result))
"""


def test_early_stop_matches_full_read(netns):
    """On the live kernel, the early-stop rule ends exactly where EOF is."""
    command = [sys.executable, "-c", EARLY_STOP_PROGRAM]
    run = subprocess.run(
        ["ip", "netns", "exec", netns, *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )

    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    for name, (stop_size, size, reads, stopped_early, short_reads) in result.items():
        assert stop_size in (-1, size), name
        if stopped_early:
            assert short_reads < reads, name
    assert result["tcp"][2] > 2


def test_early_stop_turned_off_on_mismatch(tmp_path, caplog):
    from fastsock.readskips import EarlyStopCheck

    class Buffer:
        stopped_early = False
        early_stop_size = 4000
        size = 9000

    check = EarlyStopCheck()
    check.check("/proc/net/tcp", Buffer())

    assert check.enabled is False
    assert "reading every socket table to the end" in caplog.text
    assert not any(check.may_stop_early("/proc/net/tcp") for _ in range(200))
