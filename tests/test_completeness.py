"""The completeness meter: kernel TCP open counters against recorded connections."""

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from fastsock.stats import miss_rate, parse_tcp_opens
from fastsock.store import ParquetStore
from harness import query_json, run_fastsock
from test_store import make_table

SNMP_TEXT = """\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1000
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails
Tcp: 1 200 120000 -1 94728 94675 19
Udp: InDatagrams NoPorts
Udp: 10 2
"""


def test_snmp_opens_parsed_without_failed_attempts():
    assert parse_tcp_opens(SNMP_TEXT) == (94728 - 19, 94675)


def test_snmp_without_attempt_fails_keeps_active_opens():
    text = SNMP_TEXT.replace(" AttemptFails", "").replace(" 94675 19", " 94675")
    assert parse_tcp_opens(text) == (94728, 94675)


def test_snmp_without_tcp_lines_rejected():
    with pytest.raises(ValueError, match="found 0 'Tcp:' lines"):
        parse_tcp_opens("Ip: Forwarding\nIp: 1\n")


def test_snmp_without_open_counters_rejected():
    text = "Tcp: RtoAlgorithm RtoMin\nTcp: 1 200\n"
    with pytest.raises(ValueError, match="no ActiveOpens and PassiveOpens"):
        parse_tcp_opens(text)


@pytest.mark.parametrize(
    ("active", "passive", "recorded", "expected"),
    [
        (10, 10, 20, 0.0),
        (10, 10, 15, 0.25),
        (4, 0, 0, 1.0),
        (5, 5, 12, 0.0),
        (0, 0, 3, None),
        (None, None, 3, None),
    ],
)
def test_miss_rate(active, passive, recorded, expected):
    assert miss_rate(active, passive, recorded) == expected


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2's ip to create a network namespace",
)

# Opens COUNT loopback connections one after another, each living HOLD seconds,
# after REFUSED connects to a port where nothing listens.
OPEN_CONNECTIONS = """
import socket, sys, time
count, hold, refused = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
closed_port = socket.socket()
closed_port.bind(("127.0.0.1", 0))
for _ in range(refused):
    try:
        socket.create_connection(closed_port.getsockname())
    except ConnectionRefusedError:
        pass
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(128)
for _ in range(count):
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    time.sleep(hold)
    client.close()
    accepted.close()
"""


def collect_while_connecting(netns, data_dir, count, *options, refused=0) -> None:
    """Run collect inside netns while count short connections open and close.

    refused connects to a closed port come first.
    """
    in_netns = ["ip", "netns", "exec", netns]
    collector = subprocess.Popen(
        [
            *in_netns,
            sys.executable,
            "-m",
            "fastsock",
            "--log-level",
            "info",
            "collect",
            "--quiet",
            "--interval",
            "1",
            "--duration",
            "2.5",
            "--data-dir",
            str(data_dir),
            *options,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    # Connections of the first sample opened before collection, so the
    # load starts once the first sample is logged.
    seen = []
    for line in collector.stderr:
        seen.append(line)
        if "first sample:" in line:
            break
    subprocess.run(
        [
            *in_netns,
            sys.executable,
            "-c",
            OPEN_CONNECTIONS,
            str(count),
            "0.005",
            str(refused),
        ],
        check=True,
        timeout=60,
    )
    _, rest = collector.communicate(timeout=60)
    assert collector.returncode == 0, "".join(seen) + rest


def totals(data_dir) -> dict:
    (row,) = query_json(
        data_dir,
        "SELECT sum(tcp_active_opens) AS active, sum(tcp_passive_opens) AS passive, "
        "sum(tcp_opens_recorded) AS recorded, count(*) AS periods, "
        "max(miss_rate) AS worst FROM collector_stats",
    )
    return row


@needs_netns
def test_meter_with_close_events_counts_every_open(netns, tmp_path):
    # Refused connects are opens that the kernel counts and that fail.
    collect_while_connecting(netns, tmp_path, 20, "--close-events", refused=50)

    row = totals(tmp_path)
    status = run_fastsock("status", "--data-dir", str(tmp_path)).stdout

    assert row["active"] == 20
    assert row["passive"] == 20
    assert row["recorded"] == 40
    assert row["worst"] == 0.0
    assert "miss rate      0.0% last period" in status
    assert "kernel 40 (active 20, passive 20), recorded 40" in status


@needs_netns
def test_meter_reports_misses_of_polling(netns, tmp_path):
    collect_while_connecting(netns, tmp_path, 20, "--no-close-events")

    row = totals(tmp_path)

    assert row["active"] == 20
    assert row["passive"] == 20
    assert row["recorded"] < 40
    assert row["worst"] > 0.2


def test_status_shows_last_period_with_samples(tmp_path):
    start = datetime(2026, 1, 5, 10, 0, tzinfo=timezone.utc)
    rows = [
        # A period with samples, then the final flush of a stopped collector.
        {
            "host": "box",
            "stats_id": 1,
            "source": "proc",
            "close_events": False,
            "period_start": start,
            "last_seen": start + timedelta(seconds=10),
            "samples": 50,
            "sample_ms_median": 4.0,
        },
        {
            "host": "box",
            "stats_id": 2,
            "source": "proc",
            "close_events": False,
            "period_start": start + timedelta(seconds=10),
            "last_seen": start + timedelta(seconds=11),
            "samples": 0,
        },
    ]
    ParquetStore(tmp_path).write("collector_stats", make_table("collector_stats", rows))

    status = run_fastsock("status", "--data-dir", str(tmp_path)).stdout

    assert "samples        50, median 4.0 ms" in status
    assert "10:00:00 to 10:00:10 UTC" in status
