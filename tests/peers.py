"""A test peer: a TCP or UDP server or client on loopback, in its own process.

It names itself with prctl(PR_SET_NAME) so tests can find it by comm, prints
one JSON line with its pid and ports, and holds its sockets until its
standard input closes.

    python peers.py server --proto tcp --bind 127.0.0.1 --name fs-srv
    python peers.py client --proto tcp --connect 127.0.0.1 PORT --count 2
"""

import argparse
import ctypes
import json
import os
import socket
import sys
import threading

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_NAME, {name!r}) failed")


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def serve(args) -> list:
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    server = socket.socket(family_of(args.bind), kind)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuseport:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if args.dual_stack:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind((args.bind, args.port))
    held = [server]

    if args.proto == "tcp":
        server.listen(128)

        def accept_forever():
            while True:
                connection, _ = server.accept()
                held.append(connection)

        threading.Thread(target=accept_forever, daemon=True).start()
    report = {"pid": os.getpid(), "port": server.getsockname()[1]}
    report["inode"] = os.fstat(server.fileno()).st_ino
    return held, report


def connect(args) -> list:
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    held, ports, inodes = [], [], []
    for _ in range(args.count):
        client = socket.socket(family_of(args.connect[0]), kind)
        client.connect((args.connect[0], int(args.connect[1])))
        if args.proto == "udp":
            client.send(b"hello")
        held.append(client)
        ports.append(client.getsockname()[1])
        inodes.append(os.fstat(client.fileno()).st_ino)
    return held, {"pid": os.getpid(), "ports": ports, "inodes": inodes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dual-stack", action="store_true")
    parser.add_argument("--reuseport", action="store_true")
    parser.add_argument("--connect", nargs=2, metavar=("ADDRESS", "PORT"))
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--name")
    args = parser.parse_args()

    if args.name:
        set_comm(args.name)
    held, report = serve(args) if args.role == "server" else connect(args)
    print(json.dumps(report), flush=True)
    sys.stdin.read()
    for sock in held:
        sock.close()


if __name__ == "__main__":
    main()
