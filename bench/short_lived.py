"""How many short-lived connections each collector mode records and attributes.

A server and a client (child processes named sl-server and sl-client) open
loopback connections at a fixed rate, cycling through known lifetimes from
0.1 ms to 2 s. The server closes its side when the client closes. For each
collector mode, `fastsock collect` runs while the load runs, and the script
prints per lifetime bucket:

- recorded: share of the connection's sockets (client and server side) that
  have a row in `connections`, by any detection;
- live: share recorded by sampling alone (detected_by = 'live');
- attributed: share whose pid is the process that held the socket;
- theory: the share that periodic polling sees, min(1, lifetime / period),
  where the period is the mean time between samples, flushes included, and
  at least the interval.

    python bench/short_lived.py
    python bench/short_lived.py --rate 100 --seconds 20 --modes proc-1s netlink-events
"""

import argparse
import ctypes
import heapq
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SRC = BENCH.parent / "src"

# Lifetimes of the connections, in seconds, used in turn. 2 s is two periods
# of the 1 s interval, the shortest lifetime that polling must attribute.
LIFETIMES = (0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 2.0)

# name -> (source, interval in seconds, close events). An interval of 0.001 s
# is shorter than any sample, so sampling runs back to back.
MODES = {
    "proc-1s": ("proc", 1.0, False),
    "proc-fastest": ("proc", 0.001, False),
    "netlink-fastest": ("netlink", 0.001, False),
    "netlink-events": ("netlink", 1.0, True),
    "proc-events": ("proc", 1.0, True),
}

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def serve() -> None:
    """Accept connections and close each one when its client closes it."""
    set_comm("sl-server")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    server.setblocking(False)
    print(json.dumps({"pid": os.getpid(), "port": server.getsockname()[1]}), flush=True)

    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                connection, _ = server.accept()
                selector.register(connection, selectors.EVENT_READ)
            elif not key.fileobj.recv(4096):
                selector.unregister(key.fileobj)
                key.fileobj.close()


def run_client(port: int, rate: float, seconds: float) -> None:
    """Open rate connections per second for seconds; print one JSON line each."""
    set_comm("sl-client")
    start = time.monotonic() + 0.2
    count = int(rate * seconds)
    schedule = [(start + i / rate, LIFETIMES[i % len(LIFETIMES)]) for i in range(count)]
    schedule.reverse()
    open_sockets = []
    records = []

    while schedule or open_sockets:
        next_open = schedule[-1][0] if schedule else float("inf")
        next_close = open_sockets[0][0] if open_sockets else float("inf")
        delay = min(next_open, next_close) - time.monotonic()
        if delay > 0:
            time.sleep(delay)

        if next_close <= next_open:
            _, _, sock, record = heapq.heappop(open_sockets)
            sock.close()
            record["closed"] = time.time()
            continue

        _, lifetime = schedule.pop()
        sock = socket.create_connection(("127.0.0.1", port))
        record = {"port": sock.getsockname()[1], "lifetime": lifetime,
                  "opened": time.time()}
        records.append(record)
        heapq.heappush(open_sockets, (time.monotonic() + lifetime, len(records), sock,
                                      record))

    print(json.dumps({"pid": os.getpid(), "connections": records}), flush=True)


def run_mode(name: str, rate: float, seconds: float) -> dict:
    """Run the load under one collector mode; return per-bucket shares."""
    source, interval, close_events = MODES[name]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen([sys.executable, __file__, "server"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            server_info = json.loads(server.stdout.readline())
            collector = subprocess.Popen(
                [sys.executable, "-m", "fastsock", "collect",
                 "--interval", str(interval), "--duration", str(seconds + 3),
                 "--source", source, "--data-dir", data_dir,
                 "--close-events" if close_events else "--no-close-events"],
                env=env, stderr=subprocess.PIPE, text=True,
            )
            wait_for_start(collector)
            client = subprocess.run(
                [sys.executable, __file__, "client", str(server_info["port"]),
                 str(rate), str(seconds)],
                capture_output=True, text=True, check=True,
            )
            _, stderr = collector.communicate(timeout=seconds + 120)
            if collector.returncode != 0:
                raise RuntimeError(f"collect failed:\n{stderr}")
        finally:
            server.kill()
            server.wait()

        load = json.loads(client.stdout)
        rows = recorded_rows(data_dir, server_info["port"], env)
        period = sample_period(data_dir, interval, env)
    return period, shares(load, server_info, rows, period)


def wait_for_start(collector: subprocess.Popen) -> None:
    for line in collector.stderr:
        if line.startswith("collecting to"):
            time.sleep(0.5)
            return
    raise RuntimeError("collect exited before it started")


def query(data_dir: str, sql: str, env: dict) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "fastsock", "query", "--data-dir", data_dir,
         "--format", "json", sql],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(result.stdout)


def recorded_rows(data_dir: str, server_port: int, env: dict) -> list[dict]:
    return query(
        data_dir,
        "SELECT local_port, remote_port, pid, detected_by FROM connections "
        f"WHERE protocol = 'tcp' AND local_addr = '127.0.0.1' AND "
        f"(local_port = {server_port} OR remote_port = {server_port})",
        env,
    )


def sample_period(data_dir: str, interval: float, env: dict) -> float:
    """Return the mean seconds between samples, flushes included, at least interval."""
    sql = (
        "SELECT sum(epoch_us(last_seen) - epoch_us(period_start)) / 1e6 "
        "/ sum(samples - 1) AS seconds FROM collector_stats WHERE samples > 1"
    )
    (row,) = query(data_dir, sql, env)
    return max(interval, row["seconds"] or 0)


def shares(load: dict, server_info: dict, rows: list[dict], period: float) -> dict:
    """Return {lifetime: (sockets, recorded, live, attributed, theory)}."""
    server_port = server_info["port"]
    by_socket = {}
    for row in rows:
        if row["local_port"] == server_port:
            by_socket[("server", row["remote_port"])] = row
        else:
            by_socket[("client", row["local_port"])] = row

    result = {}
    for lifetime in LIFETIMES:
        ports = [c["port"] for c in load["connections"] if c["lifetime"] == lifetime]
        sockets = recorded = live = attributed = 0
        for side, pid in (("client", load["pid"]), ("server", server_info["pid"])):
            for port in ports:
                sockets += 1
                row = by_socket.get((side, port))
                if row is None:
                    continue
                recorded += 1
                live += row["detected_by"] == "live"
                attributed += row["pid"] == pid
        theory = min(1.0, lifetime / period)
        result[lifetime] = (sockets, recorded / sockets, live / sockets,
                            attributed / sockets, theory)
    return result


def print_mode(name: str, period: float, result: dict) -> None:
    source, interval, close_events = MODES[name]
    print(f"\n== {name}: --source {source} --interval {interval} "
          f"{'--close-events' if close_events else '--no-close-events'}, "
          f"period {period * 1000:.1f} ms")
    print(f"  {'lifetime':>9} {'sockets':>8} {'recorded':>9} {'live':>6} "
          f"{'attributed':>11} {'theory':>7}")
    for lifetime, (sockets, recorded, live, attributed, theory) in result.items():
        print(f"  {lifetime * 1000:>7.1f}ms {sockets:>8} {recorded:>9.1%} {live:>6.1%} "
              f"{attributed:>11.1%} {theory:>7.1%}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        serve()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        run_client(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=60,
                        help="connections opened per second (default 60)")
    parser.add_argument("--seconds", type=float, default=10,
                        help="seconds of load per mode (default 10)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()

    for name in args.modes:
        print_mode(name, *run_mode(name, args.rate, args.seconds))


if __name__ == "__main__":
    main()
