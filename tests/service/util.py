"""Small helpers shared by the service tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(
    cond: Callable[[], bool], limit_s: float = 3.0, explain: Callable[[], str] | None = None
) -> None:
    """Wait until ``cond()`` is true; ``AssertionError`` after ``limit_s`` seconds, its message
    extended by ``explain()`` (state worth seeing when the condition never held)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            detail = f": {explain()}" if explain is not None else ""
            raise AssertionError(f"condition not met in {limit_s:g} s{detail}")
        await asyncio.sleep(0.01)
