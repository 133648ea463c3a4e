"""A project's own conftest.py, as real asyncio projects have it: pytest-asyncio's helper copied in."""

import contextlib
import socket

import pytest


@pytest.fixture
def unused_tcp_port():
    with contextlib.closing(socket.socket(type=socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
