"""The shape every runtime process shares: claim work until there is none, then wait.

A `Loop` owns one work connection and one `Listener`. `work_once()` does one batch in one
transaction and returns how many items it handled; when it handles none, the loop waits for
a NOTIFY on its channels or its poll interval. Transient database errors (connection lost,
server restarting, serialization failures) close the connection and retry with back-off;
anything else propagates, the process exits and the supervisor restarts it.

Stopping (drain): `stop` is set on SIGTERM; the batch in flight finishes and commits, no new
batch is claimed.

Idle cost: while nothing happens the wait between two looks for work doubles, from
`poll_interval` up to `idle_poll_interval`; any batch with work, or any NOTIFY, brings it
back to `poll_interval`. A NOTIFY still wakes the loop at once, so only work whose
notification was lost (or that becomes due without one, such as an expired lease) waits
longer — at most `idle_poll_interval`.

Liveness: `beat` (set by the supervisor) is called after each batch and, once the first batch
has gone through, every second from a ticker task — proof for the supervisor's systemd
watchdog that this process reached the database once and that its event loop still turns.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from durable_actor import db, metrics
from durable_actor.config import Settings
from durable_actor.queries import q

HEARTBEAT_SECONDS = 5.0
TICK_SECONDS = 1.0


class Loop:
    role = "loop"
    channels: tuple[str, ...] = ()
    prepares = True    # may its work connection keep prepared statements (db.connect)?
    wake_delay = 0.0   # seconds between a NOTIFY that ends an idle wait and the next round
    autocommit = False  # is its work connection in autocommit mode (it sends BEGIN itself)?

    def __init__(self, settings: Settings, dsn: str, *, index: int = 0) -> None:
        self.settings = settings
        self.dsn = dsn
        self.index = index
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.role}"
        self.log = structlog.get_logger().bind(role=self.role, worker_id=self.worker_id)
        self.listener = db.Listener(dsn, self.channels, role=self.role)
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.beat: Callable[[], None] | None = None
        self.looped_once = False
        self.idle_rounds = 0
        self.woken = False   # the next round follows a NOTIFY that ended an idle wait

    # -- to override ------------------------------------------------------------------

    async def work_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        raise NotImplementedError

    async def idle_timeout(self, conn: psycopg.AsyncConnection[Any]) -> float:
        return self.idle_poll()

    async def going_to_sleep(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """A round found nothing; False: do not wait, look again at once."""
        return True

    async def busy(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A round found work."""

    def idle_poll(self) -> float:
        """The current idle wait: poll_interval, doubled per idle round, capped."""
        base = self.settings.poll_interval
        cap = max(base, self.settings.idle_poll_interval)
        return float(min(cap, base * 2 ** min(self.idle_rounds, 20)))

    def connection_options(self) -> dict[str, str]:
        # The runtime's own statements are short; JIT compiling one (its recursive CTEs are
        # estimated large) costs tens of milliseconds. Executors keep the server's setting
        # for the users' steps.
        return {"jit": "off"}

    # -- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        listen = asyncio.create_task(self.listener.run(), name=f"{self.role}-listen")
        beat = asyncio.create_task(self._heartbeat(stop), name=f"{self.role}-heartbeat")
        tick = asyncio.create_task(self._tick(stop), name=f"{self.role}-tick")
        backoff = db.Backoff()
        self.log.info("process_started")
        try:
            while not stop.is_set():
                try:
                    if self.conn is None or self.conn.closed:
                        self.conn = await db.connect(self.dsn, role=self.role,
                                                     options=self.connection_options(),
                                                     prepare=self.prepares,
                                                     autocommit=self.autocommit)
                    handled = await self.work_once(self.conn)
                    self.woken = False
                    backoff.reset()
                    self._looped()
                    if handled:
                        metrics.claimed(self.role, handled)
                        self.idle_rounds = 0
                        await self.busy(self.conn)
                        continue
                    if not await self.going_to_sleep(self.conn):
                        continue
                    timeout = await self.idle_timeout(self.conn)
                    if await self._idle_wait(timeout, stop):
                        self.idle_rounds = 0
                        self.woken = True
                        if self.wake_delay:
                            await _first_of(asyncio.sleep(self.wake_delay), stop.wait())
                    else:
                        self.idle_rounds += 1
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
            for task in (listen, beat, tick):
                task.cancel()
            await asyncio.gather(listen, beat, tick, return_exceptions=True)
            await self._unregister()
            await self._close()
            self.log.info("process_stopped")

    async def _idle_wait(self, timeout: float, stop: asyncio.Event) -> bool:
        """Wait for a NOTIFY, `timeout` or stop; True if a notification woke us."""
        wake = self.listener.wake
        if not wake.is_set():
            await _first_of(wake.wait(), stop.wait(), asyncio.sleep(timeout))
        notified = wake.is_set()
        wake.clear()
        return notified

    def _looped(self) -> None:
        self.looped_once = True
        if self.beat is not None:
            self.beat()

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():   # cancelled by run() at the end
            if self.looped_once and self.beat is not None:
                self.beat()
            await asyncio.sleep(TICK_SECONDS)

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
