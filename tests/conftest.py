"""Fixtures shared by the tests."""

import pytest

from harness import Peer


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
