"""Shared fixtures: a real nats-server (JetStream on) per test session, on a free port."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.services.nats_embedded import free_port, nats_server_binary, wait_listening

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "free_port", "nats_server_binary", "nats_url"]


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
        wait_listening(proc, port)
        try:
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
