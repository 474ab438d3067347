"""Dispatcher: runs instance actors. I/O around the pure engine.

Doorbell: df.start sends its NOTIFY only while a dispatcher sleeps (migration 0012 says why).
A dispatcher whose round found nothing takes the doorbell lock (session level, without
waiting), looks for mail once more and sleeps holding it; the first round that finds work lets
it go. When it cannot take the doorbell, either another dispatcher sleeps with it (which is
rung, and so is this one, on the same channel: it waits as any idle process does), or starts
that have not committed yet hold it shared. Their mail will ring nobody, so it looks again
after DOORBELL_RETRY, then after twice as long each time, up to DOORBELL_RETRY_MAX: a start
left uncommitted in a long transaction costs the starts committed meanwhile at most that much
latency.

One batch, one transaction, two round trips: lock up to `dispatcher_batch` instances that
have mail (FOR UPDATE SKIP LOCKED, so an actor runs in one place at a time), take their
messages and load their nodes (one statement, sent with BEGIN), feed the messages through
`engine.transition` in mailbox order, then write the changed nodes, the instance rows and the
effects (tasks, timers, dropped work, child instances, messages to other instances;
``actors.py``) with the COMMIT (a write whose answer is needed first, such as a JOIN's
collection, goes at once with those before it). The statements go with their values as
literals, as the executor's do (``literals.py``). A crash anywhere before the commit leaves
the mail in place for the next try.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from durable_actor import actors, db
from durable_actor.config import Settings
from durable_actor.literals import Literals, literal
from durable_actor.loop import Loop
from durable_actor.queries import q

DOORBELL_RETRY = 0.01       # seconds until the first look after the doorbell could not be taken
DOORBELL_RETRY_MAX = 0.1    # ... and the longest wait while starts in flight hold it

# Take the doorbell; if that fails, is it because another dispatcher sleeps with it?
_RING = (
    "SELECT pg_catalog.pg_try_advisory_lock(df._doorbell()) AS taken,"
    " EXISTS (SELECT 1 FROM pg_catalog.pg_locks l"
    "         WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted"
    "           AND l.pid <> pg_catalog.pg_backend_pid()"
    "           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d"
    "                             WHERE d.datname = pg_catalog.current_database())"
    "           AND l.classid = (df._doorbell() >> 32)::pg_catalog.oid"
    "           AND l.objid = (df._doorbell() & 4294967295)::pg_catalog.oid"
    "           AND l.objsubid = 1) AS sleeper")


class Dispatcher(Loop):
    role = "dispatcher"
    channels = ("df_mailbox",)
    # Idle executors take fresh mail themselves and run the steps it starts at once
    # (Executor._take_mail); woken from idle, the dispatcher lets them go first: it waits
    # wake_delay, then takes only mail at least that old (work_once). A busy dispatcher does
    # not wait: it claims again, all mail, as soon as a round found some.
    wake_delay = 0.003
    autocommit = True  # BEGIN goes with the claim, COMMIT with the writes
    prepares = False   # its statements go with their values as literals (literals.py)

    def connection_options(self) -> dict[str, str]:
        return dict(db.KEYED_PLANS)

    def __init__(self, settings: Settings, dsn: str, *, index: int = 0) -> None:
        super().__init__(settings, dsn, index=index)
        self.actors = actors.Actors(settings, self.log)
        self.doorbell: psycopg.AsyncConnection[Any] | None = None   # holds the doorbell lock
        self.doorbell_missed = 0     # tries in a row that found the doorbell taken

    async def going_to_sleep(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        if self.doorbell is conn:
            return True
        (rows,) = await db.simple_query(conn, _RING)
        if not rows[0]["taken"]:
            self.doorbell_missed = 0 if rows[0]["sleeper"] else self.doorbell_missed + 1
            return True
        self.doorbell, self.doorbell_missed = conn, 0
        return False     # once more: mail committed before the doorbell was taken rang nobody

    async def idle_timeout(self, conn: psycopg.AsyncConnection[Any]) -> float:
        if self.doorbell is conn or not self.doorbell_missed:
            return self.idle_poll()
        return float(min(self.idle_poll(), DOORBELL_RETRY_MAX,
                         DOORBELL_RETRY * 2 ** min(self.doorbell_missed - 1, 10)))

    async def busy(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.doorbell is conn:
            self.doorbell = None
            await db.simple_query(conn, "SELECT pg_catalog.pg_advisory_unlock(df._doorbell())")

    async def work_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        # Two round trips of literal statements: BEGIN with the claim, the writes with COMMIT.
        limit = self.settings.dispatcher_batch
        # Woken from idle by a NOTIFY, after wake_delay: the mail the idle executors left
        # in that time, none younger (a start committed meanwhile is theirs too).
        older_than = self.wake_delay if self.woken else 0.0
        try:
            _, (row,) = await db.simple_query(conn, "BEGIN;\n" + literal(
                q("instances_claim_with_mail"),
                {"limit": limit, "scan": limit * 2, "older_than": older_than}))
            claimed, mail, nodes = actors.claimed(row)
            if not claimed:
                await db.simple_query(conn, "COMMIT")
                return 0
            states = actors.states(claimed, nodes)
            now: datetime = claimed[0]["now"]
            decided = actors.apply_mail(states, mail, now)
            effects = [(iid, e) for iid, out in decided for e in out]
            writes = Literals(lambda statements: db.simple_query(conn, ";\n".join(statements)))
            await self.actors.write(writes, states, effects, {r["id"]: r for r in claimed}, now)
            await writes.send("COMMIT")
        except BaseException:
            await db.roll_back(conn)
            raise
        return len(claimed)
