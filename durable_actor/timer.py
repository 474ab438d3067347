"""Timer: moves due timers into mailboxes and sleeps until the next one is due.

Due times are compared with the database clock (clock_timestamp()), never the host's. The
loop sleeps until the earliest timer, the poll interval or a NOTIFY on df_timers (a new
timer may be earlier than the one it sleeps for), whichever comes first.

The timer process also hosts the retention pass (`durable_actor.retention`), a task of its
own on a connection of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from durable_actor import retention
from durable_actor.loop import Loop
from durable_actor.queries import q


class Timer(Loop):
    role = "timer"
    channels = ("df_timers",)

    async def run(self, stop: asyncio.Event) -> None:
        pruner = asyncio.create_task(retention.run(self.settings, self.dsn, stop, self.log),
                                     name="timer-retention")
        try:
            await super().run(stop)
        finally:
            pruner.cancel()
            await asyncio.gather(pruner, return_exceptions=True)

    async def work_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        async with conn.transaction():
            cur = await conn.execute(q("timers_pop_due"),
                                     {"now": None, "limit": self.settings.timer_batch})
            moved = cur.rowcount
            if moved:
                await conn.execute("SELECT pg_notify('df_mailbox', '')")
        return max(moved, 0)

    async def idle_timeout(self, conn: psycopg.AsyncConnection[Any]) -> float:
        cur = await conn.execute(q("timers_next_due"))
        row = await cur.fetchone()
        await conn.commit()
        seconds = row[0] if row else None
        idle = max(self.idle_poll(), self.settings.poll_interval * 4)
        if seconds is None:
            return idle
        return max(0.0, min(float(seconds), idle))
