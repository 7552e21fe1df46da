"""The early stop of socket table reads: the rule and the check that guards it."""

import logging
import socket
import struct
import threading
import time

from fastsock import _socktable
from fastsock.readskips import (
    EarlyStopCheck,
    EmptyTableSkip,
    count_rows_after,
    read_sockstat,
)
from fastsock.sockets import SOCKET_FILES, TableReport, read_socket_columns

PAGE = 4096
HEADER = (
    b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
    b"retrnsmt   uid  timeout inode".ljust(149)
    + b"\n"
)


def row(slot: int, inode: int, timer: int = 0) -> bytes:
    """Return a /proc/net/tcp row of 150 bytes, as Linux pads them."""
    text = (
        f"{slot:4d}: 0100007F:{1024 + inode % 60000:04X} 0100007F:1F90 01 "
        f"00000000:00000000 00:{timer:08X} 00000000     0        0 {inode} 1 "
        "0000000000000000 20 4 30 10 -1"
    )
    return text.encode().ljust(149) + b"\n"


def kernel_reads(rows: list[bytes], page: int = PAGE) -> list[bytes]:
    """Split rows into reads as the kernel fills them: whole rows up to a page."""
    reads, current = [], b""
    for line in rows:
        if len(current) + len(line) > page:
            reads.append(current)
            current = b""
        current += line
    if current:
        reads.append(current)
    return reads


def table_rows(count: int) -> list[bytes]:
    return [HEADER] + [row(slot, 5000 + slot) for slot in range(count)]


def mismatch_buffer(after_stop: list[bytes], count: int = 60):
    """Return a full read whose short read is followed by after_stop, one more read."""
    reads = kernel_reads(table_rows(count)) + [b"".join(after_stop)]
    return _socktable.buffer_from_reads(reads)


def passing_buffer(count: int = 60):
    return _socktable.buffer_from_reads(kernel_reads(table_rows(count)))


# The early-stop rule on made-up reads.


def test_rule_stops_at_short_read():
    reads = kernel_reads(table_rows(100))
    full = _socktable.buffer_from_reads(reads)
    short = _socktable.buffer_from_reads(reads, stop_early=True)

    assert len(reads) == 4
    assert full.early_stop_size == full.size
    assert full.reads == 5  # four reads with data and the 0-byte read
    assert not full.stopped_early
    assert short.stopped_early
    assert short.reads == 4
    assert short.to_bytes() == full.to_bytes()


def test_rule_waits_when_page_full():
    # 27 rows fill 4,050 bytes: the 46 bytes left are less than one row.
    reads = kernel_reads(table_rows(26))
    buffer = _socktable.buffer_from_reads(reads, stop_early=True)

    assert len(reads[0]) == 27 * 150
    assert buffer.early_stop_size == -1
    assert not buffer.stopped_early
    assert buffer.reads == 2


def test_rule_stops_after_header_only():
    buffer = _socktable.buffer_from_reads([HEADER], stop_early=True)

    assert buffer.stopped_early
    assert buffer.reads == 1
    assert buffer.size == len(HEADER)


def test_rule_on_empty_file():
    buffer = _socktable.buffer_from_reads([], stop_early=True)

    assert buffer.size == 0
    assert buffer.early_stop_size == -1
    assert buffer.reads == 1


# Rows after the stop: repeated or new.


def test_rows_after_repeated():
    rows = table_rows(40)
    text = b"".join(rows)
    # The same socket again, with another slot number and timer.
    again = row(77, 5000 + 39, timer=0x1234)

    assert count_rows_after(text + again, len(text)) == (1, 0)
    assert count_rows_after(text + again + again, len(text)) == (2, 0)


def test_rows_after_early_row_repeated():
    text = b"".join(table_rows(400))
    # Row 3 is far before the stop, outside the window searched first.
    again = row(400, 5000 + 3)

    assert count_rows_after(text + again, len(text)) == (1, 0)


def test_rows_after_new_socket():
    text = b"".join(table_rows(40))

    assert count_rows_after(text + row(40, 9999), len(text)) == (0, 1)
    assert count_rows_after(text + row(40, 9999) + row(41, 9998), len(text)) == (0, 2)


def test_rows_after_same_addresses_new_inode():
    rows = table_rows(3)
    text = b"".join(rows)
    # Same four-tuple as slot 2, another inode: a different socket.
    other = rows[3].replace(b" 5002 ", b" 6002 ")

    assert other != rows[3]
    assert count_rows_after(text + other, len(text)) == (0, 1)


def test_rows_after_short_line_is_new():
    text = b"".join(table_rows(3))

    assert count_rows_after(text + b"   9: 0100007F:0050\n", len(text)) == (0, 1)


# EarlyStopCheck.


def test_check_schedule_first_reads_full():
    check = EarlyStopCheck(page_size=PAGE)
    decisions = [check.may_stop_early("/proc/net/tcp") for _ in range(200)]

    assert decisions[:3] == [False, False, False]
    assert decisions[3:64] == [True] * 61
    assert decisions.count(False) == 3 + 3  # then one in 64: reads 64, 128, 192


def test_check_schedule_staggered_per_file():
    check = EarlyStopCheck(page_size=PAGE)
    full_reads = {}
    for _ in range(128):
        for name, _protocol, _family in SOCKET_FILES:
            path = f"/proc/net/{name}"
            if not check.may_stop_early(path):
                full_reads.setdefault(path, []).append(check._reads[path] - 1)

    later = [n for reads in full_reads.values() for n in reads if n >= 3]
    assert len(full_reads) == len(SOCKET_FILES)
    assert len(later) >= len(SOCKET_FILES)
    # No two files read to the end on the same sample.
    assert len(later) == len(set(later))


def test_check_passes_matching_read():
    check = EarlyStopCheck(page_size=PAGE)
    check.check("/proc/net/tcp", passing_buffer())

    assert check.enabled
    assert check.checks == 1
    assert check.mismatches == 0


def test_check_skips_reads_without_stop_point():
    check = EarlyStopCheck(page_size=PAGE)
    stopped = _socktable.buffer_from_reads(kernel_reads(table_rows(60)), True)
    no_rule = _socktable.buffer_from_reads(kernel_reads(table_rows(26)))
    check.check("/proc/net/tcp", stopped)
    check.check("/proc/net/tcp", no_rule)

    assert check.checks == 0


def test_check_repeated_rows_harmless():
    check = EarlyStopCheck(page_size=PAGE)
    path = "/proc/net/tcp"
    for _ in range(10):
        check.may_stop_early(path)
    repeated = mismatch_buffer([row(60, 5000 + 59, timer=7)])
    for _ in range(10):
        check.check(path, repeated)

    assert check.enabled
    assert check.repeats == 10
    assert check.mismatches == 0
    assert check.may_stop_early(path) is True


def test_check_new_row_rechecks_file():
    check = EarlyStopCheck(page_size=PAGE)
    path = "/proc/net/tcp"
    for _ in range(10):
        check.may_stop_early(path)

    check.check(path, mismatch_buffer([row(60, 9999)]))

    assert check.enabled
    assert check.mismatches == 1
    assert check.may_stop_early(path) is False
    check.check(path, passing_buffer())
    assert check.may_stop_early(path) is True


def test_check_churn_mostly_repeated_rows():
    check = EarlyStopCheck(page_size=PAGE)
    path = "/proc/net/tcp"
    # Three rows again and one socket that opened in a bucket already read.
    after_stop = [row(60 + n, 5000 + 57 + n) for n in range(3)] + [row(63, 9999)]
    for _ in range(10):
        check.check(path, mismatch_buffer(after_stop))

    assert check.enabled
    assert check.repeats == 10
    assert check.mismatches == 0


def test_check_mostly_new_rows_mismatch():
    check = EarlyStopCheck(page_size=PAGE)
    after_stop = [row(60, 5000 + 59), row(61, 9999), row(62, 9998)]
    check.check("/proc/net/tcp", mismatch_buffer(after_stop))

    assert check.enabled
    assert check.repeats == 0
    assert check.mismatches == 1


def test_check_occasional_mismatches_tolerated():
    check = EarlyStopCheck(page_size=PAGE)
    for _ in range(20):
        check.check("/proc/net/tcp", mismatch_buffer([row(60, 9999)]))
        check.check("/proc/net/tcp", mismatch_buffer([row(60, 9999)]))
        check.check("/proc/net/tcp", passing_buffer())

    assert check.enabled
    assert check.mismatches == 40
    assert check.checks == 60


def test_check_mismatches_counted_per_file():
    check = EarlyStopCheck(page_size=PAGE)
    for _ in range(2):
        check.check("/proc/net/tcp", mismatch_buffer([row(60, 9999)]))
        check.check("/proc/net/tcp6", mismatch_buffer([row(60, 9999)]))

    assert check.enabled
    assert check.mismatches == 4


def test_check_turns_off_after_mismatches_in_a_row(caplog):
    check = EarlyStopCheck(page_size=PAGE)
    path = "/proc/net/tcp"
    with caplog.at_level(logging.WARNING, logger="fastsock.sockets"):
        for _ in range(EarlyStopCheck.MISMATCHES_IN_A_ROW + 5):
            check.check(path, mismatch_buffer([row(60, 9999)]))

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert check.enabled is False
    assert len(warnings) == 1
    assert "3 reads of /proc/net/tcp in a row" in warnings[0].getMessage()
    assert not any(check.may_stop_early(path) for _ in range(200))


def test_check_turns_off_on_large_extra(caplog):
    check = EarlyStopCheck(page_size=PAGE)
    # A kernel that returned half pages: the rule fires after the first read.
    half_pages = kernel_reads(table_rows(60), page=PAGE // 2)
    buffer = _socktable.buffer_from_reads(half_pages)
    with caplog.at_level(logging.WARNING, logger="fastsock.sockets"):
        check.check("/proc/net/tcp", buffer)
        check.check("/proc/net/tcp", buffer)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert buffer.early_stop_size == len(half_pages[0])
    assert check.enabled is False
    assert len(warnings) == 1
    assert "more than the 4096" in warnings[0].getMessage()


def test_check_large_table_tolerates_more():
    check = EarlyStopCheck(page_size=PAGE)

    assert check.max_tolerated_bytes(1000) == PAGE
    assert check.max_tolerated_bytes(4 * PAGE) == PAGE
    assert check.max_tolerated_bytes(1_600_000) == 400_000


# Real tables.


def test_early_stop_applies_to_every_table():
    decisions: dict[str, list[tuple[bool, bool]]] = {}

    class RecordingCheck(EarlyStopCheck):
        def check(self, path, buffer):
            decisions.setdefault(path, []).append(
                (buffer.stopped_early, buffer.early_stop_size >= 0)
            )
            super().check(path, buffer)

    check = RecordingCheck()
    for _ in range(6):
        read_socket_columns("/proc", TableReport(), early_stop=check)

    assert set(decisions) == {f"/proc/net/{name}" for name, _p, _f in SOCKET_FILES}
    for path, reads in decisions.items():
        for stopped, _rule_fired in reads[:3]:
            assert not stopped, path
        if check.mismatches:
            # Churn made a file read to the end again, so skip the check.
            continue
        for stopped, rule_fired in reads[3:]:
            # A read whose last page was nearly full cannot stop early.
            assert stopped or not rule_fired, path
    assert check.enabled


def open_and_close(port: int, stop: threading.Event, opened: list[int]) -> None:
    """Open and reset loopback connections to port until stop is set."""
    linger = struct.pack("ii", 1, 0)
    while not stop.is_set():
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        client.close()
        opened[0] += 1


def accept_and_close(server: socket.socket, stop: threading.Event) -> None:
    server.settimeout(0.2)
    while not stop.is_set():
        try:
            connection, _ = server.accept()
        except TimeoutError:
            continue
        connection.close()


def test_check_stays_on_under_churn():
    """Full reads of /proc/net/tcp while connections open and close keep early stops."""
    server = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = server.getsockname()[1]
    # Held connections spread the table over several pages.
    held_clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    accepted = [server.accept()[0] for _ in held_clients]

    stop = threading.Event()
    opened = [0]
    threads = [
        threading.Thread(target=open_and_close, args=(port, stop, opened)),
        threading.Thread(target=accept_and_close, args=(server, stop)),
    ]
    check = EarlyStopCheck()
    reads = 0
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline or reads < 20:
            check.check("/proc/net/tcp", _socktable.read_file("/proc/net/tcp"))
            reads += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sock in held_clients:
            # A reset leaves no TIME_WAIT row behind for later tests.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        for sock in held_clients + accepted + [server]:
            sock.close()

    assert opened[0] > 0
    assert check.checks > 0
    assert check.enabled, (
        f"{check.mismatches} mismatches and {check.repeats} repeats in "
        f"{check.checks} checks"
    )


# Tables that the kernel's counters show empty.

SOCKSTAT = (
    "sockets: used 9\n"
    "TCP: inuse {tcp} orphan 0 tw {tw} alloc 3 mem 1\n"
    "UDP: inuse {udp} mem 0\n"
    "UDPLITE: inuse 0\n"
)
SOCKSTAT6 = "TCP6: inuse {tcp6}\nUDP6: inuse {udp6}\nUDPLITE6: inuse 0\n"
TCP6_ROW = (
    b"   0: 00000000000000000000000001000000:1F91 "
    b"00000000000000000000000000000000:0000 0A 00000000:00000000 "
    b"00:00000000 00000000     0        0 7001 1 0000000000000000 100 0 0 10 0\n"
)


def proc_with_counters(root, tcp=1, tw=0, udp=0, tcp6=0, udp6=0):
    """Write a proc root whose tcp and tcp6 tables list one row each."""
    net = root / "net"
    net.mkdir(parents=True, exist_ok=True)
    (net / "tcp").write_bytes(HEADER + row(0, 6001))
    (net / "tcp6").write_bytes(HEADER + TCP6_ROW)
    (net / "udp").write_bytes(HEADER)
    (net / "udp6").write_bytes(HEADER)
    (net / "sockstat").write_text(SOCKSTAT.format(tcp=tcp, tw=tw, udp=udp))
    (net / "sockstat6").write_text(SOCKSTAT6.format(tcp6=tcp6, udp6=udp6))
    return str(root)


class AlwaysEarly(EarlyStopCheck):
    def may_stop_early(self, path):
        return True


class NeverEarly(EarlyStopCheck):
    def may_stop_early(self, path):
        return False


def test_sockstat_counters_parsed(tmp_path):
    counters = read_sockstat(proc_with_counters(tmp_path, tcp=5, tw=2, tcp6=1))

    assert counters["TCP:"]["inuse"] == 5
    assert counters["TCP:"]["tw"] == 2
    assert counters["TCP6:"]["inuse"] == 1
    assert counters["UDP6:"]["inuse"] == 0


def test_sockstat_missing_files(tmp_path):
    assert read_sockstat(str(tmp_path)) == {}


def test_empty_tables_by_counters(tmp_path):
    skip = EmptyTableSkip()
    names = ["tcp", "tcp6", "udp", "udp6"]

    root = proc_with_counters(tmp_path / "a", tcp=1, tw=0)
    assert skip.empty_tables(root, names) == {"tcp6", "udp", "udp6"}
    root = proc_with_counters(tmp_path / "b", tcp=1, tw=3)
    assert skip.empty_tables(root, names) == {"udp", "udp6"}
    root = proc_with_counters(tmp_path / "c", tcp=0, tw=0, udp=2, tcp6=1, udp6=4)
    assert skip.empty_tables(root, names) == {"tcp"}
    assert skip.empty_tables(str(tmp_path / "none"), names) == frozenset()


def test_empty_table_not_read(tmp_path):
    root = proc_with_counters(tmp_path)
    skip = EmptyTableSkip()
    parsed = read_socket_columns(
        root, TableReport(), early_stop=AlwaysEarly(), empty_skip=skip
    )

    # The tcp6 file has a row, but its counters call it empty.
    assert parsed.file_rows == [1, 0, 0, 0]
    assert skip.skipped_reads == 3
    assert skip.enabled


def test_empty_skip_checked_on_full_reads(tmp_path, caplog):
    root = proc_with_counters(tmp_path)
    skip = EmptyTableSkip()
    with caplog.at_level(logging.WARNING, logger="fastsock.sockets"):
        for _ in range(EmptyTableSkip.MISMATCHES_IN_A_ROW + 2):
            parsed = read_socket_columns(
                root, TableReport(), early_stop=NeverEarly(), empty_skip=skip
            )

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert parsed.file_rows == [1, 1, 0, 0]
    assert skip.enabled is False
    assert skip.mismatches == EmptyTableSkip.MISMATCHES_IN_A_ROW
    assert len(warnings) == 1
    assert "tcp6 listed 1 rows" in warnings[0].getMessage()


def test_empty_skip_ignores_socket_opened_meanwhile(tmp_path, monkeypatch):
    from fastsock import readskips

    root = proc_with_counters(tmp_path)
    opened = proc_with_counters(tmp_path / "later", tcp=1, tcp6=1)
    reads = iter([read_sockstat(root), read_sockstat(opened)] * 10)
    monkeypatch.setattr(readskips, "read_sockstat", lambda _root: next(reads))
    skip = EmptyTableSkip()
    for _ in range(5):
        read_socket_columns(
            root, TableReport(), early_stop=NeverEarly(), empty_skip=skip
        )

    assert skip.enabled
    assert skip.mismatches == 0


def test_sockstat_counts_own_sockets():
    before = read_sockstat("/proc")
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        during = read_sockstat("/proc")

    assert "TCP:" in before
    assert "tw" in before["TCP:"]
    assert during["TCP6:"]["inuse"] >= 1
