"""Small helpers shared by the service tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(cond: Callable[[], bool], limit_s: float = 3.0) -> None:
    """Wait until ``cond()`` is true; ``AssertionError`` after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
