"""The shape every runtime process shares: claim work until there is none, then wait.

A `Loop` owns one work connection and one `Listener`. `work_once()` does one batch in one
transaction and returns how many items it handled; when it handles none, the loop waits for
a NOTIFY on its channels or its poll interval. Transient database errors (connection lost,
server restarting, serialization failures) close the connection and retry with back-off;
anything else propagates, the process exits and the supervisor restarts it.

Stopping (drain): `stop` is set on SIGTERM; the batch in flight finishes and commits, no new
batch is claimed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import psycopg
import structlog

from durable_actor import db
from durable_actor.config import Settings
from durable_actor.queries import q

HEARTBEAT_SECONDS = 5.0


class Loop:
    role = "loop"
    channels: tuple[str, ...] = ()

    def __init__(self, settings: Settings, dsn: str, *, index: int = 0) -> None:
        self.settings = settings
        self.dsn = dsn
        self.index = index
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.role}"
        self.log = structlog.get_logger().bind(role=self.role, worker_id=self.worker_id)
        self.listener = db.Listener(dsn, self.channels, role=self.role)
        self.conn: psycopg.AsyncConnection[Any] | None = None

    # -- to override ------------------------------------------------------------------

    async def work_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        raise NotImplementedError

    async def idle_timeout(self, conn: psycopg.AsyncConnection[Any]) -> float:
        return self.settings.poll_interval

    def connection_options(self) -> dict[str, str]:
        return {}

    # -- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        listen = asyncio.create_task(self.listener.run(), name=f"{self.role}-listen")
        beat = asyncio.create_task(self._heartbeat(stop), name=f"{self.role}-heartbeat")
        backoff = db.Backoff()
        self.log.info("process_started")
        try:
            while not stop.is_set():
                try:
                    if self.conn is None or self.conn.closed:
                        self.conn = await db.connect(self.dsn, role=self.role,
                                                     options=self.connection_options())
                    handled = await self.work_once(self.conn)
                    backoff.reset()
                    if handled:
                        continue
                    timeout = await self.idle_timeout(self.conn)
                    await _first_of(self.listener.wait(timeout), stop.wait())
                except asyncio.CancelledError:
                    raise
                except psycopg.Error as exc:
                    if not db.is_transient(exc):
                        raise
                    delay = backoff.next()
                    self.log.warning("db_error_retrying", error=str(exc).strip(),
                                     sqlstate=getattr(exc, "sqlstate", None),
                                     retry_in=round(delay, 3))
                    await self._close()
                    await _first_of(asyncio.sleep(delay), stop.wait())
        finally:
            listen.cancel()
            beat.cancel()
            await asyncio.gather(listen, beat, return_exceptions=True)
            await self._unregister()
            await self._close()
            self.log.info("process_stopped")

    async def _close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            finally:
                self.conn = None

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        params = {"id": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
                  "role": self.role}
        while not stop.is_set():
            try:
                async with await db.connect(self.dsn, role=self.role + " heartbeat",
                                            autocommit=True) as conn:
                    while not stop.is_set():
                        await conn.execute(q("worker_heartbeat"), params)
                        await _first_of(asyncio.sleep(HEARTBEAT_SECONDS), stop.wait())
            except psycopg.Error as exc:
                self.log.warning("heartbeat_failed", error=str(exc).strip())
                await _first_of(asyncio.sleep(1.0), stop.wait())

    async def _unregister(self) -> None:
        try:
            async with await db.connect(self.dsn, role=self.role, autocommit=True) as conn:
                await conn.execute(q("worker_remove"), {"id": self.worker_id})
        except psycopg.Error:
            pass


async def _first_of(*aws: Any) -> None:
    """Wait until the first awaitable finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
