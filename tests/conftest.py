"""Fixtures shared by the tests."""

import itertools
import os
import subprocess

import pytest

from harness import Peer
from netns_hosts import skip_reason

# Suffixes that keep the namespaces of one test run apart.
_netns_numbers = itertools.count()


@pytest.fixture
def peers():
    """Start peers with peers(*args); every one is stopped after the test."""
    started = []

    def start(*args: str) -> Peer:
        peer = Peer(*args)
        started.append(peer)
        return peer

    yield start
    for peer in reversed(started):
        peer.stop()


@pytest.fixture
def netns():
    """Make a network namespace with loopback up, deleted after the test."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    name = f"fs-test-{os.getpid()}-{next(_netns_numbers)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
