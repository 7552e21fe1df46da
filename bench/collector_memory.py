"""Peak resident memory of `fastsock collect` while loopback connections are held.

Opens its own established loopback connections (bench/loopback.py), runs
`fastsock collect --interval 0.2` for a number of seconds with close events on
(the CLI's default) and reads the collector's RSS every 50 ms. It prints the
peak, the RSS after the first sample, the median of the steady state and the
rise during the final flush, per socket source, with the sources run in turn.

    python bench/collector_memory.py                    # 50,000 connections
    python bench/collector_memory.py --count 10000 --sources proc
    python bench/collector_memory.py --src /tmp/old/src src    # two trees
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
sys.path.insert(0, str(BENCH))

from loopback import LoopbackConnections, raise_file_limit  # noqa: E402

# Peak resident memory allowed for the collector at 50,000 connections.
RSS_LIMIT_MB = 250

# Seconds between two reads of the collector's RSS.
POLL_SECONDS = 0.05


def rss_trace(source: str, seconds: float, src: str) -> list[tuple[float, float]]:
    """Run `fastsock collect` from src for seconds; return (elapsed s, RSS MB)."""
    with tempfile.TemporaryDirectory() as data_dir:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastsock", "collect", "--quiet", "--interval",
             "0.2", "--duration", str(seconds), "--source", source,
             "--data-dir", data_dir],
            env={**os.environ, "PYTHONPATH": src},
            stderr=subprocess.DEVNULL,
        )
        watched = psutil.Process(process.pid)
        started = time.monotonic()
        trace = []
        while process.poll() is None:
            try:
                rss = watched.memory_info().rss
            except psutil.NoSuchProcess:
                break
            trace.append((time.monotonic() - started, rss / 1e6))
            time.sleep(POLL_SECONDS)
        return trace


def summarise(label: str, trace: list[tuple[float, float]], seconds: float) -> None:
    """Print the peak and the phases of one trace."""
    values = [rss for _elapsed, rss in trace]
    peak = max(values)
    # The first sample ends within the first few seconds; the last second
    # after the end of --duration contains the final flush.
    first = max(rss for elapsed, rss in trace if elapsed < seconds / 2)
    steady = [rss for elapsed, rss in trace if seconds / 2 <= elapsed < seconds]
    flush = [rss for elapsed, rss in trace if elapsed >= seconds]
    steady_median = statistics.median(steady) if steady else float("nan")
    flush_peak = max(flush) if flush else float("nan")
    verdict = "met" if peak < RSS_LIMIT_MB else "MISSED"
    print(
        f"  {label:<24} peak {peak:6.0f} MB (target < {RSS_LIMIT_MB}: {verdict}) | "
        f"first half max {first:6.0f} | steady median {steady_median:6.0f} | "
        f"final flush max {flush_peak:6.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000,
                        help="established loopback connections to hold")
    parser.add_argument("--seconds", type=float, default=25.0,
                        help="seconds of `fastsock collect` per run")
    parser.add_argument("--sources", nargs="+", default=["proc", "netlink"],
                        help="socket sources to measure, in turn")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per source, interleaved")
    parser.add_argument("--src", nargs="+", default=[str(BENCH.parent / "src")],
                        help="source trees to compare, interleaved (default: "
                        "this checkout's src)")
    args = parser.parse_args()
    raise_file_limit()

    with LoopbackConnections(args.count):
        print(f"== {args.count:,} loopback connections, {args.seconds:g} s per run")
        for _ in range(args.runs):
            for source in args.sources:
                for src in args.src:
                    label = source if len(args.src) == 1 else f"{source} {src}"
                    trace = rss_trace(source, args.seconds, src)
                    summarise(label, trace, args.seconds)


if __name__ == "__main__":
    main()
