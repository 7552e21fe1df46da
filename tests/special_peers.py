"""Test peers that peers.py does not cover, and a launcher for any peer script.

Roles, each printing one JSON line and holding its sockets until stdin closes:

- forking-server --bind ADDR --workers N: one listener, accepted by N forked
  workers.
- closing-server --bind ADDR: accepts and closes at once, so the server closes
  first; with --close-on-eof it closes after the client did.
- bound-client --bind ADDR --port P --connect ADDR PORT: connects from a chosen
  local address and port.
- short-clients --connect ADDR PORT --count N: opens and closes N connections,
  the client first unless --wait-eof.
- relay --bind ADDR --connect ADDR PORT: listens, and keeps one connection to
  the upstream server open.

As a module it provides Process, which starts peers.py or this script, optionally
inside a network namespace with ``ip netns exec``, and the ``launch`` fixture.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def set_comm(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(15, name.encode()[:15], 0, 0, 0) != 0:  # 15 is PR_SET_NAME
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_NAME, {name!r}) failed")


def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 is PR_SET_PDEATHSIG


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def listen(address: str, port: int = 0) -> socket.socket:
    server = socket.socket(family_of(address), socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(128)
    return server


def forking_server(args, held) -> dict:
    server = listen(args.bind)
    held.append(server)
    workers = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            accepted = []
            while True:
                connection, _ = server.accept()
                accepted.append(connection)
        workers.append(pid)

    # The parent keeps the listener open too, as a pre-fork master does.
    held.append(_Reaper(workers))
    return {"pid": os.getpid(), "workers": workers, "port": server.getsockname()[1]}


class _Reaper:
    """Kill the forked workers when the parent closes its sockets."""

    def __init__(self, pids):
        self.pids = pids

    def close(self):
        for pid in self.pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def closing_server(args, held) -> dict:
    server = listen(args.bind)
    held.append(server)

    def close_on_eof(connection):
        while connection.recv(4096):
            pass
        connection.close()

    def accept_and_close():
        while True:
            connection, _ = server.accept()
            if args.close_on_eof:
                threading.Thread(target=close_on_eof, args=(connection,)).start()
            else:
                connection.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    return {"pid": os.getpid(), "port": server.getsockname()[1]}


def bound_client(args, held) -> dict:
    client = socket.socket(family_of(args.connect[0]), socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind((args.bind, args.port))
    client.connect((args.connect[0], int(args.connect[1])))
    held.append(client)
    return {"pid": os.getpid(), "ports": [client.getsockname()[1]]}


def short_clients(args, held) -> dict:
    ports = []
    for _ in range(args.count):
        client = socket.create_connection((args.connect[0], int(args.connect[1])))
        ports.append(client.getsockname()[1])
        if args.wait_eof:
            # The server closes first; this side closes after reading EOF.
            client.recv(1)
        client.close()
    return {"pid": os.getpid(), "ports": ports}


def relay(args, held) -> dict:
    server = listen(args.bind, args.port)
    upstream = socket.create_connection((args.connect[0], int(args.connect[1])))
    held.extend([server, upstream])

    def accept_forever():
        while True:
            connection, _ = server.accept()
            held.append(connection)

    threading.Thread(target=accept_forever, daemon=True).start()
    return {
        "pid": os.getpid(),
        "port": server.getsockname()[1],
        "ports": [upstream.getsockname()[1]],
    }


ROLES = {
    "forking-server": forking_server,
    "closing-server": closing_server,
    "bound-client": bound_client,
    "short-clients": short_clients,
    "relay": relay,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--connect", nargs=2, metavar=("ADDRESS", "PORT"))
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--wait-eof", action="store_true")
    parser.add_argument("--close-on-eof", action="store_true")
    parser.add_argument("--name")
    args = parser.parse_args()

    if args.name:
        set_comm(args.name)
    held = []
    report = ROLES[args.role](args, held)
    print(json.dumps(report), flush=True)
    sys.stdin.read()
    for item in held:
        item.close()


class Process:
    """A peer script in its own process; closing its stdin stops it."""

    def __init__(self, script: str, *args: str, netns: str | None = None) -> None:
        command = [sys.executable, str(TESTS / script), *args]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=10)
            raise RuntimeError(f"{' '.join(command)} exited before reporting")
        self.info = json.loads(line)
        self.pid = self.info["pid"]

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def launch():
    """Start peers with launch(script, *args, netns=None); all stop after the test."""
    started = []

    def start(script: str, *args: str, netns: str | None = None) -> Process:
        process = Process(script, *args, netns=netns)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


def unused_port(address: str = "127.0.0.1") -> int:
    """Return a port below the ephemeral range that nothing is bound to now.

    Servers of the dependency tests listen there, so no TIME_WAIT row of an
    earlier test's client can share their port.
    """
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket(family_of(address), socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no unused port between 20000 and 29999 on {address}")


if __name__ == "__main__":
    main()
