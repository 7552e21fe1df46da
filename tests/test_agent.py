"""`fastsock agent` and `fastsock serve` as processes on loopback ports."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsock.auth import Credentials
from fastsock.endpoints import Endpoint
from fastsock.errors import NoDataError
from fastsock.flight_client import describe
from fastsock.query import run_query
from harness import run_fastsock

TOKEN = "agent-test-token-0123456789"
READY = re.compile(r"listening on grpc\+(tcp|tls)://127\.0\.0\.1:(\d+)")


class AgentProcess:
    """A `fastsock serve` or `fastsock agent` process with its log in a file."""

    def __init__(self, tmp_path: Path, *args: str, env=None) -> None:
        self.log_path = tmp_path / "agent.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastsock", "--log-level", "info", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        self.port = self._wait_for_port()
        self.endpoint = Endpoint("127.0.0.1", self.port)

    def _wait_for_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log_path.read_text())
            if match:
                return int(match.group(2))
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited early:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"agent printed no port in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def agents():
    started = []

    def start(tmp_path, *args, env=None) -> AgentProcess:
        agent = AgentProcess(tmp_path, *args, env=env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def wait_for_comm(data_dir: Path, comm: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = run_query(data_dir, "SELECT DISTINCT comm FROM connections")
        except NoDataError:
            result = None
        if result is not None and comm in result.column("comm").to_pylist():
            return
        time.sleep(0.2)
    raise AssertionError(f"no connection of {comm} stored in {data_dir} in {timeout} s")


def test_agent_collects_and_serves(agents, peers, tmp_path):
    server = peers("server", "--bind", "127.0.0.1", "--name", "fs-agent-srv")
    client = peers(
        "client",
        "--connect",
        "127.0.0.1",
        str(server.info["port"]),
        "--name",
        "fs-agent-cli",
    )
    data_dir = tmp_path / "data"
    agent = agents(
        tmp_path,
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--node-name",
        "box",
        "--interval",
        "0.1",
        "--flush-interval",
        "0.5",
    )
    wait_for_comm(data_dir, "fs-agent-cli")

    result = query_one_agent(
        agent.port,
        "SELECT node, comm, pid, host FROM connections WHERE comm = 'fs-agent-cli'",
    )
    rows = json.loads(result.stdout)

    assert rows == [
        {"node": "box", "comm": "fs-agent-cli", "pid": client.pid, "host": "box"}
    ]
    assert "1 node reached (box)" in result.stderr
    assert describe(agent.endpoint, Credentials())["node"] == "box"
    assert agent.stop() == 0
    log = agent.log()
    assert "agent box (node id" in log
    assert "collector started" in log
    assert "collector stopped" in log
    assert "agent box stopping" in log
    assert "agent box stopped" in log


def test_serve_logs_each_query(agents, tmp_path):
    data_dir = tmp_path / "data"
    agent = agents(
        tmp_path,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--node-name",
        "quiet",
    )

    result = run_fastsock(
        "query",
        "--federated",
        "--agent",
        f"127.0.0.1:{agent.port}",
        "--format",
        "json",
        "SELECT node, status FROM federation_nodes",
    )

    assert json.loads(result.stdout) == [{"node": "quiet", "status": "ok"}]
    agent.stop()
    assert re.search(
        r"query [0-9a-f]{32} from ipv4:127\.0\.0\.1:\d+: 1 rows in \d+ ms", agent.log()
    )


def test_serve_requires_token_off_loopback(tmp_path):
    result = run_fastsock(
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        str(tmp_path),
        check=False,
        env={"FASTSOCK_TOKEN": ""},
    )

    assert result.returncode == 1
    assert "without a token" in result.stderr
    assert "--token-file" in result.stderr


def test_serve_rejects_short_token(tmp_path):
    result = run_fastsock(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        check=False,
        env={"FASTSOCK_TOKEN": "short"},
    )

    assert result.returncode == 1
    assert "has 5 characters" in result.stderr


def test_serve_needs_both_tls_files(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")

    result = run_fastsock(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        "--tls-cert",
        str(cert),
        check=False,
    )

    assert result.returncode == 1
    assert "--tls-key is missing" in result.stderr


def test_agent_with_token_rejects_client_without(agents, tmp_path):
    agent = agents(
        tmp_path,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "d"),
        env={"FASTSOCK_TOKEN": TOKEN},
    )

    rejected = run_fastsock(
        "query",
        "--federated",
        "--agent",
        f"127.0.0.1:{agent.port}",
        "SELECT 1",
        check=False,
        env={"FASTSOCK_TOKEN": ""},
    )
    accepted = run_fastsock(
        "query",
        "--federated",
        "--agent",
        f"127.0.0.1:{agent.port}",
        "--format",
        "json",
        "SELECT 1 AS one",
        env={"FASTSOCK_TOKEN": TOKEN},
    )

    assert rejected.returncode == 1
    assert "rejected the request: the request carried no token" in rejected.stderr
    assert json.loads(accepted.stdout) == [{"one": 1}]
    agent.stop()
    assert "rejected do_get from ipv4:127.0.0.1" in agent.log()
    assert TOKEN not in agent.log()


def test_federated_options_need_federated(tmp_path):
    result = run_fastsock(
        "query",
        "--data-dir",
        str(tmp_path),
        "--agent",
        "127.0.0.1",
        "SELECT 1",
        check=False,
    )

    assert result.returncode == 2
    assert "only apply with --federated" in result.stderr


def test_unreachable_agent_is_an_error(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = run_fastsock(
        "query",
        "--federated",
        "--agent",
        f"127.0.0.1:{port}",
        "--timeout",
        "3",
        "SELECT 1",
        check=False,
    )

    assert result.returncode == 1
    assert f"agent 127.0.0.1:{port} is unreachable" in result.stderr


@pytest.mark.parametrize("command", ["serve", "agent"])
def test_help_ends_with_example(command):
    result = run_fastsock(command, "--help")

    assert f"Example: fastsock {command} --listen 127.0.0.1:7433" in result.stdout
    assert "seconds" in result.stdout.lower() or "Seconds" in result.stdout


def test_busy_port_gives_clear_error(tmp_path):
    import socket as socketlib

    from harness import run_fastsock

    with socketlib.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_fastsock("serve", "--listen", f"127.0.0.1:{port}",
                              "--data-dir", str(tmp_path), check=False, timeout=30)

    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_undecodable_token_file_rejected(tmp_path):
    from harness import run_fastsock

    token = tmp_path / "token"
    token.write_bytes(b"\x00\xff\xfe")
    result = run_fastsock("serve", "--token-file", str(token), "--data-dir",
                          str(tmp_path), check=False, timeout=30)

    assert result.returncode != 0
    assert "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def query_one_agent(port: int, sql: str):
    """Run a federated query of the agent at port as JSON, without its peers.

    --max-depth 0 keeps the walk on this node: the real connections of the
    machine must not lead a test to contact other hosts.
    """
    return run_fastsock(
        "query",
        "--federated",
        "--agent",
        f"127.0.0.1:{port}",
        "--max-depth",
        "0",
        "--format",
        "json",
        sql,
    )
