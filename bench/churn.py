"""Resident memory and pace of the collector under heavy connection churn.

Holds --count established loopback connections (bench/loopback.py), starts a
child process that opens and closes loopback connections as fast as one
thread can, and runs `fastsock collect --interval 0.2` with close events
beside it. Prints the collector's peak RSS every two seconds, then the
connections opened and the collector's status line. The churn saturates a
2-core machine: run it alone.

    python bench/churn.py --count 10000 --seconds 40
"""

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loopback import LoopbackConnections, raise_file_limit  # noqa: E402

# Seconds between two reads of the collector's RSS.
POLL_SECONDS = 0.02


def churn(opened, stop) -> None:
    """Connect to a loopback listener and close, over and over, until stop is set."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    address = server.getsockname()

    def accept() -> None:
        while True:
            try:
                accepted, _ = server.accept()
            except OSError:
                return
            accepted.close()

    threading.Thread(target=accept, daemon=True).start()
    while not stop.is_set():
        client = socket.create_connection(address)
        client.close()
        with opened.get_lock():
            opened.value += 1
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000,
                        help="established loopback connections to hold")
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="seconds of `fastsock collect` (its --duration)")
    args = parser.parse_args()
    raise_file_limit()

    opened = multiprocessing.Value("q", 0)
    stop = multiprocessing.Event()
    churner = multiprocessing.Process(target=churn, args=(opened, stop))
    with LoopbackConnections(args.count), tempfile.TemporaryDirectory() as data_dir:
        churner.start()
        try:
            status = run_collector(data_dir, args.seconds)
        finally:
            stop.set()
            churner.join(timeout=10)
            if churner.is_alive():
                churner.terminate()
    print(f"connections opened by the churn: {opened.value:,}")
    print(f"collector: {status}")


def run_collector(data_dir: str, seconds: float) -> str:
    """Run the collector, print its peak RSS per two seconds; return its last line."""
    source = str(BENCH.parent / "src")
    # A file, not a pipe: a full pipe would stall the collector's logging.
    log_file = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "fastsock", "collect", "--interval", "0.2",
         "--duration", str(seconds), "--data-dir", data_dir],
        env={**os.environ, "PYTHONPATH": source},
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    watched = psutil.Process(process.pid)
    started = time.monotonic()
    window_start, window_peak = started, 0.0
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss / 1e6
        except psutil.NoSuchProcess:
            break
        window_peak = max(window_peak, rss)
        now = time.monotonic()
        if now - window_start >= 2.0:
            print(f"  {now - started:5.0f} s  peak RSS {window_peak:7.0f} MB", flush=True)
            window_start, window_peak = now, 0.0
        time.sleep(POLL_SECONDS)
    process.wait()
    log_file.seek(0)
    lines = log_file.read().replace("\r", "\n").strip().splitlines()
    log_file.close()
    return lines[-1] if lines else f"exited {process.returncode} with no output"


if __name__ == "__main__":
    main()
