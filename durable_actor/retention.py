"""Retention: prunes finished instances past `df.settings.retention_days`, and dead workers.

Runs inside the timer process (one per host; passes on several hosts do not collide: roots
are taken FOR UPDATE SKIP LOCKED), every `retention_interval` seconds, starting right after
the process starts. Each batch of at most `BATCH` root instances — with their child
instances, nodes, commands and any leftover mail, tasks and timers — is deleted in its own
short transaction, so pruning never holds locks for long nor builds a big transaction; a
pass stops after `PASS_LIMIT` roots and the rest waits for the next pass. Pending and
running instances are never touched, nor are children of a root that is still running.

Rows of `df.workers` whose heartbeat is older than `WORKER_STALE_SECONDS` (a process killed
without removing its row) are deleted in the same pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg

from durable_actor import db
from durable_actor.config import Settings
from durable_actor.queries import q

BATCH = 100
PASS_LIMIT = 5000
WORKER_STALE_SECONDS = 30.0


async def prune_once(conn: psycopg.AsyncConnection[Any], *, now: Any = None,
                     batch: int = BATCH, limit: int = PASS_LIMIT) -> tuple[int, int]:
    """One pass on an autocommit connection; return (instances pruned, workers pruned)."""
    cur = await conn.execute(q("workers_prune_dead"), {"seconds": WORKER_STALE_SECONDS})
    workers = max(cur.rowcount, 0)
    pruned = 0
    while pruned < limit:
        cur = await conn.execute(q("instances_prune_finished"),
                                 {"now": now, "limit": min(batch, limit - pruned)})
        n = max(cur.rowcount, 0)
        pruned += n
        if n < batch:
            break
    return pruned, workers


async def run(settings: Settings, dsn: str, stop: asyncio.Event, log: Any) -> None:
    """Prune every `retention_interval` seconds until `stop` is set."""
    backoff = db.Backoff(first=1.0, cap=60.0)
    while not stop.is_set():
        try:
            async with await db.connect(dsn, role="timer retention", autocommit=True) as conn:
                while not stop.is_set():
                    pruned, workers = await prune_once(conn)
                    backoff.reset()
                    if pruned or workers:
                        log.info("retention_pruned", instances=pruned, workers=workers)
                    await _sleep_or_stop(settings.retention_interval, stop)
        except psycopg.Error as exc:
            log.warning("retention_failed", error=str(exc).strip(),
                        sqlstate=getattr(exc, "sqlstate", None))
            await _sleep_or_stop(backoff.next(), stop)


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
