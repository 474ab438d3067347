"""Shared test helpers: wait on a condition with a deadline (never a fixed sleep); start,
await and read workflows."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

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


def one(db: psycopg.Connection[Any], query: str, *args: Any) -> Any:
    """The first column of the first row."""
    row = db.execute(query, args).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def start(db: psycopg.Connection[Any], expr: str, *args: Any) -> str:
    """df.start(<expr>) with `args` bound to its %s placeholders; the instance id."""
    return str(one(db, f"SELECT df.start({expr})", *args))


def wait(db: psycopg.Connection[Any], instance: str, timeout: int = 60) -> str:
    """df.await_instance: the final status."""
    return str(one(db, "SELECT df.await_instance(%s, %s)", instance, timeout))


def result(db: psycopg.Connection[Any], instance: str) -> Any:
    """df.result as JSON (None when there is none)."""
    raw = one(db, "SELECT df.result(%s)", instance)
    return None if raw is None else json.loads(raw)
