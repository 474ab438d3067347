"""Who runs an instance's actor: the dispatcher, or an idle executor that takes the mail itself.

One round of each process at a time, in this process, on a real database: no supervisor, so
which process takes the mail is decided by the test, not by a race.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from durable_actor import config, db
from durable_actor.dispatcher import DOORBELL_RETRY, DOORBELL_RETRY_MAX, Dispatcher
from durable_actor.executor import Executor

WORKFLOW = "SELECT df.start($$SELECT 1 AS a$$ |=> 'x' ~> $$SELECT $x.a + 1 AS b$$)"


@pytest.fixture
async def aconn(fresh_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as c:
        yield c


async def _one(conn: psycopg.AsyncConnection[Any], query: str, *args: Any) -> Any:
    row = await (await conn.execute(query, args)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


async def _executor(dsn: str) -> tuple[Executor, psycopg.AsyncConnection[Any]]:
    executor = Executor(config.from_env({}), dsn)
    conn = await db.connect(dsn, role="test executor", options=executor.connection_options(),
                            autocommit=Executor.autocommit)
    return executor, conn


async def test_an_idle_executor_takes_a_start_and_runs_its_steps_at_once(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    i = await _one(aconn, WORKFLOW)
    executor, conn = await _executor(fresh_dsn)
    async with conn:
        assert executor.idle
        assert await executor.work_once(conn) == 2          # both steps, in one transaction
    assert await _one(aconn, "SELECT status FROM df.instances WHERE id = %s", i) == "completed"
    assert await _one(aconn, "SELECT df.result(%s)", i) == '{"rows":[{"b":2}],"row_count":1}'
    assert await _one(aconn, "SELECT count(*) FROM df.mailbox") == 0
    assert await _one(aconn, "SELECT count(*) FROM df.tasks") == 0


async def test_a_dispatcher_woken_for_fresh_mail_leaves_it_to_the_idle_executors(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    # The round that follows a wake takes only mail as old as the wait before it: here a long
    # wait, so the start just made is left; the next round, or an idle executor, takes it.
    i = await _one(aconn, WORKFLOW)
    dispatcher = Dispatcher(config.from_env({}), fresh_dsn)
    dispatcher.wake_delay = 3600.0
    async with await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn:
        dispatcher.woken = True
        assert await dispatcher.work_once(dconn) == 0
        assert await _one(aconn, "SELECT count(*) FROM df.mailbox WHERE instance_id = %s",
                          i) == 1
        dispatcher.woken = False                             # as the loop does after a round
        assert await dispatcher.work_once(dconn) == 1       # not woken: all mail
    assert await _one(aconn, "SELECT status FROM df.instances WHERE id = %s", i) == "running"
    assert await _one(aconn, "SELECT count(*) FROM df.tasks WHERE instance_id = %s", i) == 1


async def test_a_busy_executor_leaves_mail_to_the_dispatcher(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    ids = [await _one(aconn, WORKFLOW) for _ in range(3)]
    executor, econn = await _executor(fresh_dsn)
    dispatcher = Dispatcher(config.from_env({}), fresh_dsn)
    dconn = await db.connect(fresh_dsn, role="test dispatcher", autocommit=True)
    async with econn, dconn:
        executor.idle = False                               # its last round had work
        assert await executor.work_once(econn) == 0
        assert await _one(aconn, "SELECT count(*) FROM df.mailbox") == 3
        assert await dispatcher.work_once(dconn) == 3        # one batch: the three starts
        assert await _one(aconn, "SELECT count(*) FROM df.mailbox") == 0
        assert await _one(aconn, "SELECT count(*) FROM df.tasks") == 3
        assert await executor.work_once(econn) == 6          # first steps, then carried on
    statuses = await (await aconn.execute(
        "SELECT status FROM df.instances WHERE id = ANY(%s)", (ids,))).fetchall()
    assert statuses == [("completed",)] * 3
    assert await _one(aconn, "SELECT count(*) FROM df.tasks") == 0


# -- the doorbell: df.start sends its NOTIFY only while a dispatcher sleeps ---------------------

async def _notifications(listener: psycopg.AsyncConnection[Any],
                         aconn: psycopg.AsyncConnection[Any]) -> list[str]:
    """The df_mailbox payloads `listener` received until now (an 'end' sent last marks it)."""
    await aconn.execute("SELECT pg_notify('df_mailbox', 'end')")
    seen = []
    async for n in listener.notifies():
        if n.payload == "end":
            return seen
        seen.append(n.payload)
    raise AssertionError("the notification stream ended")


async def test_a_start_rings_only_a_sleeping_dispatcher(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    dispatcher = Dispatcher(config.from_env({}), fresh_dsn)
    async with await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn, \
            await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as listener:
        await listener.execute("LISTEN df_mailbox")
        await _one(aconn, WORKFLOW)                          # nobody sleeps: no NOTIFY
        assert await _notifications(listener, aconn) == []
        # Going to sleep: it takes the doorbell and looks once more (the mail is there).
        assert await dispatcher.going_to_sleep(dconn) is False
        assert await dispatcher.work_once(dconn) == 1
        await dispatcher.busy(dconn)                         # work: it lets go
        assert await dispatcher.going_to_sleep(dconn) is False
        assert await dispatcher.work_once(dconn) == 0
        assert await dispatcher.going_to_sleep(dconn) is True   # sleeps holding the doorbell
        await _one(aconn, WORKFLOW)
        assert await _notifications(listener, aconn) == [""]
        assert await dispatcher.work_once(dconn) == 1
        await dispatcher.busy(dconn)
        await _one(aconn, WORKFLOW)                          # busy again: no NOTIFY
        assert await _notifications(listener, aconn) == []


async def test_a_start_in_flight_keeps_the_dispatcher_from_sleeping(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    """Its mail rang nobody: the dispatcher must not sleep before it sees the commit."""
    dispatcher = Dispatcher(config.from_env({}), fresh_dsn)
    async with await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn, \
            await psycopg.AsyncConnection.connect(fresh_dsn) as starter:
        await starter.execute(WORKFLOW)                      # not committed yet
        assert await dispatcher.going_to_sleep(dconn) is True    # doorbell taken: not held
        assert dispatcher.doorbell is None
        assert await dispatcher.idle_timeout(dconn) == DOORBELL_RETRY   # it looks again soon
        for _ in range(8):                                   # a long transaction: still soon
            assert await dispatcher.going_to_sleep(dconn) is True
        assert await dispatcher.idle_timeout(dconn) == DOORBELL_RETRY_MAX
        await starter.commit()
        assert await dispatcher.going_to_sleep(dconn) is False   # now it holds it: once more
        assert await dispatcher.work_once(dconn) == 1        # and finds the start


async def test_executor_literals_carry_any_text_exactly(
        aconn: psycopg.AsyncConnection[Any]) -> None:
    """The executor sends its writes as literals; arrays of text survive quoting exactly,
    whatever standard_conforming_strings says."""
    from durable_actor.literals import literal as _literal

    at = datetime(2026, 12, 4, 5, 6, 7, 89, tzinfo=UTC)
    values = ['a', 'b"c', 'd\\e', None, "it's", 'x,y}{', '', 'NULL', 'ü€😀', 'a\nb\tc', '\\"\'']
    for setting in ("on", "off"):
        await aconn.execute(f"SET standard_conforming_strings = {setting}")
        text = _literal("SELECT %(v)s::text[] AS v, %(n)s::bigint[] AS n, %(s)s::text AS s,"
                        " 1-%(i)s::int AS i, %(f)s::float8 AS f, %(b)s::bool AS b,"
                        " %(z)s::text AS z, %(t)s::timestamptz AS t, '100%%' AS pct",
                        {"v": values, "n": [1, None, 2**40], "s": values[-1], "i": -1,
                         "f": -0.5, "b": False, "z": None, "t": at})
        (rows,) = await db.simple_query(aconn, text)
        assert rows == [{"v": values, "n": [1, None, 2**40], "s": values[-1], "i": 2,
                         "f": -0.5, "b": False, "z": None, "t": at, "pct": "100%"}]
        for value in values:
            (rows,) = await db.simple_query(aconn, _literal("SELECT %s::text AS v", (value,)))
            assert rows == [{"v": value}]


async def test_a_dispatcher_waits_as_usual_while_another_sleeps_with_the_doorbell(
        fresh_dsn: str) -> None:
    """Starts ring the sleeping one, and every dispatcher listens on the same channel."""
    dispatcher = Dispatcher(config.from_env({}), fresh_dsn)
    async with await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn, \
            await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(df._doorbell())")
        assert await dispatcher.going_to_sleep(dconn) is True
        assert dispatcher.doorbell is None
        assert await dispatcher.idle_timeout(dconn) == dispatcher.idle_poll()


async def test_nodes_are_copied_only_to_children_that_were_made(
        aconn: psycopg.AsyncConnection[Any]) -> None:
    """A FOREACH that hands out a row and fails in one round drops its rows before the spawn:
    foreach_spawn makes no child for that row, and the copy of the body's nodes must not
    insert nodes for it (it did, and the foreign key failed the whole write, every time)."""
    from durable_actor.literals import literal as _literal
    from durable_actor.queries import q

    parent = await _one(aconn, "SELECT df.start(df.seq('SELECT 1', 'SELECT 2'))")
    root = await _one(aconn, "SELECT root_node FROM df.instances WHERE id = %s", parent)
    (rows,) = await db.simple_query(aconn, _literal(
        q("children_copy_nodes").rstrip().rstrip(";") + " RETURNING instance_id",
        {"ids": ["0badc0de"], "parents": [parent], "roots": [root]}))
    assert rows == []
