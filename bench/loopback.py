"""Hold many established TCP connections on loopback, spread over child processes.

Each pair of child processes holds up to CONNECTIONS_PER_PAIR connections: a
server that accepts them on its own port and a client that opens them. One
process may hold only 20,000 open files on the machines this was written
for (the hard RLIMIT_NOFILE), and each port pair has about 28,000 ephemeral
ports, so larger counts use more pairs.

    with LoopbackConnections(10_000) as held:
        print(held.pids)

Run as a script, this file is one child: ``loopback.py server N`` or
``loopback.py client PORT N``. It prints one JSON line when its connections
are established, and exits when its standard input closes.
"""

import json
import math
import os
import resource
import socket
import struct
import subprocess
import sys
import threading

CONNECTIONS_PER_PAIR = 9_000

# Seconds a child may take to report its connections.
START_TIMEOUT = 120


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def serve(count: int) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    print(json.dumps({"pid": os.getpid(), "port": server.getsockname()[1]}), flush=True)

    held = []
    while len(held) < count:
        connection, _ = server.accept()
        held.append(connection)
    print(json.dumps({"accepted": len(held)}), flush=True)
    sys.stdin.read()


def connect(port: int, count: int) -> None:
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    print(json.dumps({"pid": os.getpid(), "connected": len(held)}), flush=True)
    sys.stdin.read()

    # Reset instead of closing, so no TIME_WAIT rows outlive the benchmark for
    # 60 s and inflate the tables that the next count reads.
    for sock in held:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class LoopbackConnections:
    """Context manager that keeps count loopback connections established."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.children: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    def __enter__(self) -> "LoopbackConnections":
        try:
            pairs = max(1, math.ceil(self.count / CONNECTIONS_PER_PAIR))
            for index in range(pairs):
                share = self.count // pairs + (1 if index < self.count % pairs else 0)
                self._start_pair(share)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_pair(self, count: int) -> None:
        server = self._spawn("server", str(count))
        port = self._report(server)["port"]
        client = self._spawn("client", str(port), str(count))

        # Read both reports on threads: the server reports only after the
        # client connected, and a stalled child must not block forever.
        reports = {}

        def read_report(name: str, child: subprocess.Popen) -> None:
            reports[name] = self._report(child)

        threads = [
            threading.Thread(target=read_report, args=("client", client)),
            threading.Thread(target=read_report, args=("server", server)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(START_TIMEOUT)
        if reports.get("client", {}).get("connected") != count:
            raise RuntimeError(
                f"client {client.pid} did not open {count} connections in "
                f"{START_TIMEOUT} s"
            )
        if reports.get("server", {}).get("accepted") != count:
            raise RuntimeError(
                f"server {server.pid} did not accept {count} connections in "
                f"{START_TIMEOUT} s"
            )

    def _spawn(self, *args: str) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children.append(child)
        return child

    @staticmethod
    def _report(child: subprocess.Popen) -> dict:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"loopback child {child.pid} exited before reporting")
        return json.loads(line)

    def close(self) -> None:
        """Close every child's sockets and wait for the children to exit."""
        for child in self.children:
            if child.poll() is None:
                child.stdin.close()
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = []


def main() -> None:
    raise_file_limit()
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    else:
        connect(int(sys.argv[2]), int(sys.argv[3]))


if __name__ == "__main__":
    main()
