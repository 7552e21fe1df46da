"""Resident memory of each step of a collector's first sample and flush.

Opens its own established loopback connections (bench/loopback.py), takes the
first and a second Collector.sample(), then runs the steps of
Collector.flush() one by one, printing after each the process's RSS, its
rise, and the bytes that pyarrow's memory pool holds. RSS only grows back
down when an allocator returns memory to the kernel, so the rise of a step
is what it adds to the peak.

    python bench/flush_memory.py --count 50000
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from loopback import LoopbackConnections, raise_file_limit  # noqa: E402

from fastsock.collector import Collector  # noqa: E402
from fastsock.memory import use_returning_allocator  # noqa: E402
from fastsock.records import socket_records  # noqa: E402
from fastsock.snapshot import Snapshotter  # noqa: E402
from fastsock.store import ParquetStore  # noqa: E402


class MemoryLog:
    """Print RSS and Arrow pool bytes after each named step."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.last = self.rss()
        print(f"  {'start':<28} rss {self.last:7.1f} MB")

    def rss(self) -> float:
        return self.process.memory_info().rss / 1e6

    def step(self, name: str, started: float) -> None:
        rss = self.rss()
        arrow = pa.total_allocated_bytes() / 1e6
        ms = (time.perf_counter() - started) * 1000
        print(
            f"  {name:<28} rss {rss:7.1f} MB ({rss - self.last:+7.1f}) | "
            f"arrow {arrow:7.1f} MB | {ms:7.1f} ms"
        )
        self.last = rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000,
                        help="established loopback connections to hold")
    args = parser.parse_args()
    raise_file_limit()
    # As `fastsock collect` does.
    use_returning_allocator()

    with LoopbackConnections(args.count), tempfile.TemporaryDirectory() as data_dir:
        print(f"== {args.count:,} loopback connections")
        memory = MemoryLog()
        collector = Collector(Snapshotter(), ParquetStore(data_dir))
        host, netns = collector.snapshotter.host, collector.snapshotter.netns

        started = time.perf_counter()
        collector.sample()
        memory.step("first sample", started)
        started = time.perf_counter()
        collector.sample()
        memory.step("second sample", started)

        started = time.perf_counter()
        drained = collector.sockets.drain()
        memory.step("drain", started)
        started = time.perf_counter()
        drained = collector.dependencies.classify(drained)
        memory.step("classify", started)
        started = time.perf_counter()
        connections, listeners = socket_records(drained, host, netns)
        memory.step("socket_records", started)
        started = time.perf_counter()
        collector.dependencies.detections(drained, host)
        memory.step("detections", started)
        started = time.perf_counter()
        flows = collector.dependencies.flows(connections)
        memory.step("flows", started)
        started = time.perf_counter()
        for name, table in (("connections", connections), ("flows", flows)):
            collector.store.write(name, table)
        memory.step("parquet write", started)


if __name__ == "__main__":
    main()
