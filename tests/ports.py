"""Loopback ports for servers the tests start (a module of its own: several folders have a conftest)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free loopback port for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
