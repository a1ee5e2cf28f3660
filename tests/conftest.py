"""Shared fixtures. Keep this file small: helpers live in tests/support/."""

from __future__ import annotations

import secrets
import socket

import pytest

from tests.support.control_api import ControlApiProcess


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (prefer binding port 0 directly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def control_api(tmp_path):
    """A running reference Control API with a fresh database and a random token (`.token`)."""
    server = ControlApiProcess(
        str(tmp_path / "control.sqlite3"), token=f"test-{secrets.token_hex(8)}"
    )
    with server.start():
        yield server
