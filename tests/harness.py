"""Test peers on loopback and the fastsock command line, run as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


class Peer:
    """A peers.py process; closing its stdin makes it close its sockets and exit."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "peers.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=5)
            raise RuntimeError(f"peers.py {' '.join(args)} exited before reporting")
        self.info = json.loads(line)
        self.pid = self.info["pid"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_fastsock(*args: str, check: bool = True, timeout: float = 60, env=None):
    """Run the fastsock command line in a subprocess and return the result."""
    result = subprocess.run(
        [sys.executable, "-m", "fastsock", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"fastsock {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def query_json(data_dir, sql: str) -> list[dict]:
    """Return the rows of a fastsock query as dicts."""
    result = run_fastsock("query", "--data-dir", str(data_dir), "--format", "json", sql)
    return json.loads(result.stdout)
