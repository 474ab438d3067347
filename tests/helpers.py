"""Shared test helpers: wait on a condition with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T]], *, timeout: float = 10.0,
                every: float = 0.02) -> T:
    """Await `probe` until it returns something truthy; fail after `timeout` with the last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (seen := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout}s; last seen {seen!r}")
        await asyncio.sleep(every)
    return seen


def until_sync(probe: Callable[[], T], *, timeout: float = 10.0, every: float = 0.02) -> T:
    """Blocking variant of `until` for synchronous tests."""
    deadline = time.monotonic() + timeout
    while not (seen := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s; last seen {seen!r}")
        time.sleep(every)
    return seen
