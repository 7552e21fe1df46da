"""Cost of one socket snapshot: fastsock against the raw read, psutil and ss.

Opens its own established loopback connections (bench/loopback.py), then
times, interleaved in one run so that load from other processes hits every
method alike:

- raw read: read(2) of /proc/net/{tcp,tcp6,udp,udp6} until EOF, no parsing,
  the floor for any /proc reader (also reported for tcp and tcp6 alone);
- fastsock proc and netlink: one Collector.sample() in steady state, which
  reads the tables, attributes sockets to processes and diffs lifetimes;
- psutil.net_connections("inet") and `ss -tanp` (output to /dev/null).

It prints the median milliseconds per method, the ratios against the targets,
and the peak resident memory of `fastsock collect` at the largest count.

    python bench/snapshot.py                       # 1,000, 10,000 and 50,000
    python bench/snapshot.py --counts 1000 --repeats 9
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from loopback import LoopbackConnections, raise_file_limit  # noqa: E402

from fastsock import _socktable  # noqa: E402
from fastsock.collector import Collector  # noqa: E402
from fastsock.snapshot import Snapshotter  # noqa: E402
from fastsock.store import ParquetStore  # noqa: E402

ALL_TABLES = ("tcp", "tcp6", "udp", "udp6")
TCP_TABLES = ("tcp", "tcp6")

# Repeats per method and connection count; ss -tanp takes seconds at 50,000.
DEFAULT_REPEATS = {1_000: 31, 10_000: 15, 50_000: 7}

# Targets: fastsock proc at most this many times the raw read, and psutil and
# ss at least this many times slower than fastsock proc, per count.
RAW_RATIO_MAX = 1.3
PSUTIL_RATIO_MIN = {1_000: 2, 10_000: 5, 50_000: 7}
SS_RATIO_MIN = {1_000: 2, 10_000: 4, 50_000: 20}

# Peak resident memory allowed for the collector at 50,000 connections.
RSS_LIMIT_MB = 250


def raw_read(tables) -> None:
    for name in tables:
        _socktable.read_file(f"/proc/net/{name}")


def collector_sampler(source: str, data_dir: str):
    """Return a function that takes one collector sample, warmed up."""
    collector = Collector(Snapshotter(source=source), ParquetStore(data_dir))
    for _ in range(3):
        collector.sample()
    return collector.sample


def run_ss() -> None:
    subprocess.run(["ss", "-tanp"], stdout=subprocess.DEVNULL, check=True)


def measure(methods: dict, repeats: int) -> dict[str, float]:
    """Time each method repeats times, interleaved; return median ms per method."""
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            started = time.perf_counter()
            method()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_collector_rss(source: str, seconds: float) -> float:
    """Run `fastsock collect` for seconds and return its peak RSS in MB."""
    with tempfile.TemporaryDirectory() as data_dir:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastsock", "collect", "--quiet", "--interval",
             "0.2", "--duration", str(seconds), "--source", source,
             "--data-dir", data_dir],
            env={**os.environ, "PYTHONPATH": str(BENCH.parent / "src")},
            stderr=subprocess.DEVNULL,
        )
        watched = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        return peak / 1e6


def report(count: int, medians: dict[str, float]) -> None:
    proc = medians["fastsock proc"]
    netlink = medians["fastsock netlink"]
    raw = medians["raw read (4 tables)"]
    print(f"\n== {count:,} established loopback connections ({2 * count:,} sockets)")
    for name, value in medians.items():
        print(f"  {name:<22} {value:9.1f} ms")

    psutil_min = PSUTIL_RATIO_MIN.get(count, 2)
    ss_min = SS_RATIO_MIN.get(count, 2)
    # (name, ratio, target text, whether the target is met)
    checks = [
        ("proc / raw read", proc / raw, f"<= {RAW_RATIO_MAX}",
         proc / raw <= RAW_RATIO_MAX),
        ("netlink / raw read", netlink / raw, "<= 1.0", netlink <= raw),
        ("psutil / proc", medians["psutil"] / proc, f">= {psutil_min}",
         medians["psutil"] / proc >= psutil_min),
        ("ss -tanp / proc", medians["ss -tanp"] / proc, f">= {ss_min}",
         medians["ss -tanp"] / proc >= ss_min),
        ("psutil / netlink", medians["psutil"] / netlink, f">= {psutil_min}",
         medians["psutil"] / netlink >= psutil_min),
        ("ss -tanp / netlink", medians["ss -tanp"] / netlink, f">= {ss_min}",
         medians["ss -tanp"] / netlink >= ss_min),
    ]
    for name, ratio, target, met in checks:
        verdict = "met" if met else "MISSED"
        print(f"  {name:<22} {ratio:9.2f}x  target {target:<7} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+",
                        default=[1_000, 10_000, 50_000],
                        help="connection counts to measure, in turn")
    parser.add_argument("--repeats", type=int,
                        help="calls per method (default: by count)")
    parser.add_argument("--rss-seconds", type=float, default=10.0,
                        help="seconds of `fastsock collect` when measuring its memory")
    args = parser.parse_args()
    raise_file_limit()

    for count in args.counts:
        repeats = args.repeats or DEFAULT_REPEATS.get(count, 9)
        with LoopbackConnections(count), tempfile.TemporaryDirectory() as data_dir:
            methods = {
                "raw read (tcp, tcp6)": lambda: raw_read(TCP_TABLES),
                "raw read (4 tables)": lambda: raw_read(ALL_TABLES),
                "fastsock proc": collector_sampler("proc", data_dir),
                "fastsock netlink": collector_sampler("netlink", data_dir),
                "psutil": lambda: psutil.net_connections("inet"),
                "ss -tanp": run_ss,
            }
            report(count, measure(methods, repeats))
            if count == max(args.counts):
                for source in ("proc", "netlink"):
                    peak = peak_collector_rss(source, args.rss_seconds)
                    verdict = "met" if peak < RSS_LIMIT_MB else "MISSED"
                    print(f"  collector peak RSS ({source}, close events on): "
                          f"{peak:.0f} MB, target < {RSS_LIMIT_MB} MB {verdict}")


if __name__ == "__main__":
    main()
