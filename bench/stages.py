"""Time of each stage of one collector sample.

Opens its own loopback connections (bench/loopback.py), warms a Collector up,
then times each stage of a sample on its own, interleaved, and prints the
median milliseconds per stage:

- raw read of the four /proc/net tables to EOF, the same read with the
  early stop that samples use, and the read plus parsing;
- the netlink dump with and without tcp_info, with the state masks 0xFFF and
  0xFFFFFFFF, and TCP of both families in one TCPDIAG_GETSOCK dump (what
  the netlink source sends);
- attribution (Attributor.resolve) and the join of owners to sockets;
- the whole Snapshotter.take() and Collector.sample().

    python bench/stages.py --count 10000
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from loopback import LoopbackConnections, raise_file_limit  # noqa: E402

from fastsock import _netlink, _socktable  # noqa: E402
from fastsock.collector import Collector  # noqa: E402
from fastsock.netlink import DUMPS, IPPROTO_TCP, open_diag_socket  # noqa: E402
from fastsock.snapshot import Snapshotter, join_owners  # noqa: E402
from fastsock.sockets import TableReport, read_socket_tables  # noqa: E402
from fastsock.store import ParquetStore  # noqa: E402

TABLES = ("tcp", "tcp6", "udp", "udp6")


def raw_read() -> None:
    for name in TABLES:
        _socktable.read_file(f"/proc/net/{name}")


def early_stop_read() -> None:
    for name in TABLES:
        _socktable.read_file(f"/proc/net/{name}", stop_early=True)


def netlink_dump(sock, states: int, with_tcp_info: bool):
    def dump() -> None:
        buffer = _netlink.DiagBuffer()
        for _name, family, protocol in DUMPS:
            _netlink.dump(buffer, sock.fileno(), family, protocol, states,
                          with_tcp_info and protocol == IPPROTO_TCP, 1)
        _netlink.to_columns(buffer)

    return dump


def netlink_tcp_in_one_dump(sock):
    def dump() -> None:
        buffer = _netlink.DiagBuffer()
        _netlink.dump_tcp(buffer, sock.fileno(), 0xFFF, True, 1)
        for _name, family, protocol in DUMPS[2:]:
            _netlink.dump(buffer, sock.fileno(), family, protocol, 0xFFF, False, 1)
        _netlink.to_columns(buffer)

    return dump


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    raise_file_limit()

    with LoopbackConnections(args.count), tempfile.TemporaryDirectory() as data_dir:
        sock = open_diag_socket()
        snapshotter = Snapshotter()
        sockets = read_socket_tables("/proc", TableReport())
        inodes = sockets.column("inode").to_numpy()
        owners = snapshotter.attributor.resolve(inodes)
        proc_collector = Collector(Snapshotter(), ParquetStore(data_dir))
        netlink_collector = Collector(Snapshotter(source="netlink"),
                                      ParquetStore(data_dir))
        for collector in (proc_collector, netlink_collector):
            for _ in range(3):
                collector.sample()

        stages = {
            "raw read": raw_read,
            "read with early stop": early_stop_read,
            "read + parse": lambda: read_socket_tables("/proc", TableReport()),
            "netlink 0xFFF + tcp_info": netlink_dump(sock, 0xFFF, True),
            "netlink, TCP in one dump": netlink_tcp_in_one_dump(sock),
            "netlink 0xFFF": netlink_dump(sock, 0xFFF, False),
            "netlink 0xFFFFFFFF + tcp_info": netlink_dump(sock, 0xFFFFFFFF, True),
            "attribution": lambda: snapshotter.attributor.resolve(inodes),
            "join owners": lambda: join_owners(sockets, owners),
            "snapshot (proc)": snapshotter.take,
            "collector sample (proc)": proc_collector.sample,
            "collector sample (netlink)": netlink_collector.sample,
        }
        times = {name: [] for name in stages}
        for _ in range(args.repeats):
            for name, stage in stages.items():
                started = time.perf_counter()
                stage()
                times[name].append((time.perf_counter() - started) * 1000)

    print(f"== {args.count:,} loopback connections, {sockets.num_rows:,} socket rows")
    for name, values in times.items():
        print(f"  {name:<30} {statistics.median(values):8.1f} ms")


if __name__ == "__main__":
    main()
