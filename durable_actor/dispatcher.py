"""Dispatcher: runs instance actors. I/O around the pure engine.

One batch, one transaction: lock up to `dispatcher_batch` instances that have mail
(FOR UPDATE SKIP LOCKED, so an actor runs in one place at a time), take their messages, load
their nodes, feed the messages through `engine.transition` in mailbox order, then write the
changed nodes, the instance rows and the effects (tasks, timers, dropped work, child
instances, messages to other instances; ``actors.py``) before committing. A crash anywhere
before the commit leaves the mail in place for the next try.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from durable_actor import actors, db
from durable_actor.config import Settings
from durable_actor.loop import Loop
from durable_actor.queries import q


class Dispatcher(Loop):
    role = "dispatcher"
    channels = ("df_mailbox",)
    # Idle executors take fresh mail themselves and run the steps it starts at once
    # (Executor._take_mail); woken from idle, the dispatcher lets them go first. A busy
    # dispatcher does not wait: it claims again as soon as a round found mail.
    wake_delay = 0.003

    def __init__(self, settings: Settings, dsn: str, *, index: int = 0) -> None:
        super().__init__(settings, dsn, index=index)
        self.actors = actors.Actors(settings, self.log)

    async def work_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        # In a pipeline: BEGIN goes with the claim, COMMIT with the last writes.
        async with db.pipeline(conn), conn.transaction(), \
                conn.cursor(row_factory=dict_row) as cur:
            limit = self.settings.dispatcher_batch
            await cur.execute(q("instances_claim_with_mail"), {"limit": limit, "scan": limit * 2})
            claimed = await cur.fetchall()
            if not claimed:
                return 0
            take = conn.cursor(row_factory=dict_row)    # the mail and the nodes: one round trip
            await take.execute(q("mailbox_take_many"), {"ids": [r["id"] for r in claimed]})
            states = await actors.load(cur, claimed)
            now: datetime = claimed[0]["now"]
            decided = actors.apply_mail(states, await take.fetchall(), now)
            effects = [(iid, e) for iid, out in decided for e in out]
            await self.actors.write(cur, states, effects, {r["id"]: r for r in claimed}, now)
        return len(claimed)
