"""Test hosts built from network namespaces joined by a bridge.

A Network creates one namespace that contains a bridge, and each Host is a
namespace with a veth whose other end is on that bridge, so every host
reaches every other at a private address. Nothing is created in the
namespace the tests run in, and no host has a route anywhere else.
Network.close() ends the processes started in the hosts and deletes every
namespace it created.

    network = Network("fsk")
    web = network.add_host("web")
    web.run("ip", "addr")
    network.close()
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

# Hosts get 10.199.0.2, 10.199.0.3, ...; the subnet exists only on the bridge
# inside the namespaces that a Network creates.
SUBNET_PREFIX = "10.199.0"
PREFIX_LENGTH = 24


def skip_reason() -> "str | None":
    """Return why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


class Network:
    """Namespaces on one bridge; use as a context manager or call close()."""

    def __init__(self, prefix: str) -> None:
        # Names carry the pid, so parallel test runs do not collide.
        self.prefix = f"{prefix}{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []

        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def add_host(self, role: str) -> "Host":
        """Create a host namespace with the next address on the bridge."""
        index = len(self.hosts) + 2
        namespace = f"{self.prefix}-{role}"
        address = f"{SUBNET_PREFIX}.{index}"
        self._add_namespace(namespace)

        # Interface names are at most 15 characters.
        port = f"p{os.getpid() % 100000}h{index}"
        _ip(
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            namespace,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            self.switch,
        )
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")

        host = Host(role, namespace, address)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.stop_all()
        for namespace in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._namespaces.clear()

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)


class Host:
    """One namespace: runs commands in it and stops what it started."""

    def __init__(self, role: str, namespace: str, address: str) -> None:
        self.role = role
        self.namespace = namespace
        self.address = address
        self.processes: list[subprocess.Popen] = []

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def run(
        self, *args: str, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        """Start a process in the host; `ip netns exec` execs it, so pids match."""
        process = subprocess.Popen(self.command(*args), **kwargs)
        self.processes.append(process)
        return process

    def start_peer(self, *args: str) -> dict:
        """Start tests/peers.py in the host; return the JSON line it printed."""
        process = self.popen(
            sys.executable,
            str(TESTS / "peers.py"),
            *args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"peers.py {' '.join(args)} in {self.namespace} exited before reporting"
            )
        return json.loads(line)

    def stop(self, process: subprocess.Popen, timeout: float = 10) -> int:
        """Stop one process this host started: SIGTERM, then SIGKILL."""
        if process.poll() is None:
            if process.stdin is not None:
                process.stdin.close()
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
