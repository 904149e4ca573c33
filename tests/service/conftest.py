"""Fixtures for service tests: a client connection to the session's nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient

from tandem.services.runtime import connect


@pytest.fixture
async def nc(nats_url: str, request: pytest.FixtureRequest) -> AsyncIterator[NatsClient]:
    """A NATS connection named after the test, closed afterwards."""
    client = await connect(nats_url, f"test-{request.node.name}")
    try:
        yield client
    finally:
        await client.close()
