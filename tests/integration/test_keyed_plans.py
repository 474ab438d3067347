"""The runtime's look-ups stay key look-ups however much a table grew since they were planned.

A plan kept for a session (a PL/pgSQL function's plan, a prepared statement)
is made while the tables of a fresh database are tiny. A sequential scan is then the cheapest
plan, and it stays the plan when the table has grown to thousands of rows: every claim read
every instance. These tests let the plans be made on tiny tables, grow the tables, and count
the sequential scans the runtime's statements make after that (PostgreSQL's own counters, of
the transaction or, for the dispatcher, which commits its rounds, of the table). The same
counters show an instance's first update writing no index entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from durable_actor import config, db
from durable_actor.dispatcher import Dispatcher
from durable_actor.executor import Executor
from durable_actor.queries import q

WORKFLOW = "SELECT df.start($$SELECT 1$$ ~> $$SELECT 1$$)"
TABLES = ("instances", "nodes", "mailbox")


@pytest.fixture
async def aconn(fresh_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as c:
        yield c


async def start(aconn: psycopg.AsyncConnection[Any], count: int) -> None:
    for _ in range(count):
        await aconn.execute(WORKFLOW)


async def counters(reader: psycopg.AsyncConnection[Any],
                   *sessions: psycopg.AsyncConnection[Any]) -> dict[str, tuple[int, int, int]]:
    """Sequential scans, updates and HOT updates of the df tables so far, with what the
    (autocommit) `sessions` and `reader` did counted: each reports its counters now, not
    when it next goes idle a second later."""
    for session in (*sessions, reader):
        await session.execute("SELECT pg_stat_force_next_flush()")
    cur = await reader.execute(
        "SELECT relname, seq_scan, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
        " WHERE schemaname = 'df' AND relname = ANY(%s)", (list(TABLES),))
    return {name: tuple(rest) for name, *rest in await cur.fetchall()}


async def seq_scans(session: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """The sequential scans of the df tables in the session's open transaction so far."""
    cur = await session.execute(
        "SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE schemaname = 'df'"
        " AND relname = ANY(%s)", (list(TABLES),))
    return dict(await cur.fetchall())


async def test_the_claim_reads_instances_by_key_in_a_session_that_planned_it_on_tiny_tables(
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    # An executor's session: the planner settings are the server's, as for a user's step.
    async with await psycopg.AsyncConnection.connect(fresh_dsn) as session:
        await start(aconn, 1)
        for _ in range(8):      # past PL/pgSQL's custom plans: the generic plan is kept
            await session.execute("SELECT * FROM df._claim_with_mail(16, 32)")
            await session.rollback()
        await start(aconn, 400)
        await session.execute("SELECT * FROM df._claim_with_mail(16, 32)")
        assert await seq_scans(session) == dict.fromkeys(TABLES, 0)
        await session.rollback()


async def test_the_dispatcher_reads_and_writes_by_key_after_the_tables_grew(
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    settings = config.from_env({})
    dispatcher, executor = Dispatcher(settings, fresh_dsn), Executor(settings, fresh_dsn)
    async with await db.connect(fresh_dsn, role="test executor", autocommit=True,
                                options=executor.connection_options()) as econn, \
            await db.connect(fresh_dsn, role="test dispatcher", autocommit=True,
                             options=dispatcher.connection_options()) as dconn:
        executor.idle, executor.conn = False, econn     # the dispatcher takes the starts
        for _ in range(10):     # one workflow at a time: the functions' plans are made
            await start(aconn, 1)
            while await dispatcher.work_once(dconn) + await executor.work_once(econn):
                pass
        await start(aconn, 400)
        before = await counters(aconn, econn, dconn)
        handled = 0
        while took := await dispatcher.work_once(dconn):
            handled += took
        after = await counters(aconn, econn, dconn)
    assert handled >= 400
    assert {t: after[t][0] - before[t][0] for t in TABLES} == dict.fromkeys(TABLES, 0)


async def test_an_idle_executors_look_for_queued_tasks_reads_the_key_not_the_table(
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    # A queue emptied a moment ago is all dead rows until vacuumed; whether a task is queued
    # is answered from the primary key's first entry, not by reading the table from its start.
    await aconn.execute(
        "INSERT INTO df.tasks (instance_id, node_id, activation, shard, kind, submitted_by,"
        "                      payload)"
        " SELECT 'i' || g, 'n', 1, g % 64, 'sql', current_user::regrole, '{}'"
        " FROM generate_series(1, 2000) g")
    await aconn.execute("DELETE FROM df.tasks")
    async with await psycopg.AsyncConnection.connect(fresh_dsn) as session:
        cur = await session.execute(q("tasks_queued"))
        assert await cur.fetchall() == []
        cur = await session.execute(
            "SELECT seq_scan FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'df' AND relname = 'tasks'")
        assert await cur.fetchone() == (0,)


async def test_an_instances_first_update_writes_no_index_entry(
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    # pending -> running is a HOT update: no index of df.instances covers status, in its
    # columns or in its predicate (migration 0019), so only the row changes.
    dispatcher = Dispatcher(config.from_env({}), fresh_dsn)
    async with await db.connect(fresh_dsn, role="test dispatcher", autocommit=True,
                                options=dispatcher.connection_options()) as dconn:
        await start(aconn, 3)
        before = await counters(aconn, dconn)
        handled = 0
        while took := await dispatcher.work_once(dconn):
            handled += took
        after = await counters(aconn, dconn)
        cur = await aconn.execute("SELECT array_agg(DISTINCT status) FROM df.instances")
        statuses = await cur.fetchone()
    assert handled == 3 and statuses == (["running"],)
    updates, hot = (b - a for a, b in zip(before["instances"][1:], after["instances"][1:],
                                          strict=True))
    assert (updates, hot) == (3, 3)


def executor_statements(instances: list[str], nodes: list[tuple[str, str]],
                        tasks: list[int]) -> list[tuple[str, dict[str, Any]]]:
    """Each of the executor's per-round statements (migration 0020's functions), with values
    (JSON as text, as actors.py sends it) of the right shape for the given instances, their
    nodes and queued tasks."""
    n = len(nodes)
    return [
        ("tasks_claim", {"shards": list(range(64)), "claimed": [], "carried": [], "limit": 16}),
        ("instances_lock_quiet", {"ids": instances}),
        ("nodes_load_many", {"ids": instances}),
        ("nodes_update_many", {
            "instance_ids": [i for i, _ in nodes], "ids": [nid for _, nid in nodes],
            "statuses": ["pending"] * n, "results": [None] * n, "errors": [None] * n,
            "activations": [0] * n, "details": [None] * n}),
        ("instances_update_many", {
            "ids": instances, "statuses": ["running"] * len(instances),
            "names": ["{}"] * len(instances), "inboxes": ["[]"] * len(instances),
            "execution_counts": [1] * len(instances), "seqs": [1] * len(instances),
            "waiters": ["[]"] * len(instances)}),
        ("work_drop_many", {"instance_ids": instances, "node_ids": [None] * len(instances)}),
        ("tasks_insert_many", {
            "instance_ids": instances, "node_ids": ["n"] * len(instances),
            "activations": [1] * len(instances), "shards": [0] * len(instances),
            "kinds": ["sql"] * len(instances), "payloads": ["{}"] * len(instances)}),
        ("tasks_complete_many", {
            "task_ids": tasks, "instance_ids": instances, "node_ids": ["n"] * len(instances),
            "activations": [1] * len(instances), "payloads": ["{}"] * len(instances)}),
    ]


async def run_executor_statements(session: psycopg.AsyncConnection[Any],
                                  aconn: psycopg.AsyncConnection[Any]) -> None:
    """The executor's statements in `session` over 16 instances, their nodes and 16 queued
    tasks (looked up on `aconn`, whose scans are not the session's)."""
    for name, params in await executor_statement_values(aconn):
        await session.execute(q(name), params)


async def executor_statement_values(aconn: psycopg.AsyncConnection[Any]
                                    ) -> list[tuple[str, dict[str, Any]]]:
    cur = await aconn.execute("SELECT id FROM df.instances ORDER BY id DESC LIMIT 16")
    instances = [r[0] for r in await cur.fetchall()]
    cur = await aconn.execute(
        "SELECT instance_id, id FROM df.nodes WHERE instance_id = ANY(%s)", (instances,))
    nodes = [(r[0], r[1]) for r in await cur.fetchall()]
    cur = await aconn.execute("SELECT id FROM df.tasks ORDER BY id DESC LIMIT 16")
    tasks = [r[0] for r in await cur.fetchall()]
    return executor_statements(instances, nodes, tasks)


async def queue_tasks(aconn: psycopg.AsyncConnection[Any], count: int) -> None:
    await aconn.execute(
        "INSERT INTO df.tasks (instance_id, node_id, activation, shard, kind, submitted_by,"
        "                      payload)"
        " SELECT id, root_node, 1, 0, 'sql', submitted_by, '{}' FROM df.instances"
        " ORDER BY id LIMIT %s", (count,))


async def test_the_executors_statements_read_and_write_by_key_in_a_session_that_planned_them_on_tiny_tables(  # noqa: E501
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    # An executor's session: the planner settings are the server's, as for a user's step. Each
    # statement's plan is made at its first call, on tiny tables, and kept (migration 0020).
    # Autovacuum is off on these tables: an ANALYZE would have them planned again on the grown
    # tables. No statement may read a whole table or a whole index.
    tables = (*TABLES, "tasks", "timers")
    for table in tables:
        await aconn.execute(f"ALTER TABLE df.{table} SET (autovacuum_enabled = false)")
    async with await psycopg.AsyncConnection.connect(fresh_dsn) as session:
        await start(aconn, 2)
        await queue_tasks(aconn, 2)
        await run_executor_statements(session, aconn)
        await session.rollback()
        await start(aconn, 400)
        await queue_tasks(aconn, 400)
        await aconn.execute(
            "INSERT INTO df.timers (instance_id, node_id, activation, kind, due_at)"
            " SELECT id, root_node, 1, 'node', now() FROM df.instances")
        await run_executor_statements(session, aconn)
        cur = await session.execute(
            "SELECT relname, seq_scan, coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'df' AND relname = ANY(%s)", (list(tables),))
        counters = {name: (scans, read) for name, scans, read in await cur.fetchall()}
        await session.rollback()
    sizes = {}
    for table in tables:
        cur = await aconn.execute(f"SELECT count(*) FROM df.{table}")
        sizes[table] = (await cur.fetchone() or (0,))[0]
    assert {name: scans for name, (scans, _) in counters.items()} == dict.fromkeys(tables, 0)
    assert all(counters[name][1] < sizes[name] for name in tables), (counters, sizes)


async def plans_made(session: psycopg.AsyncConnection[Any], statement: str,
                     params: dict[str, Any]) -> int:
    """How many plans PostgreSQL makes to run `statement` in `session` (debug_print_plan
    sends each one to the client): 1 when only the call itself is planned."""
    plans: list[str] = []

    def notice(diagnostic: psycopg.errors.Diagnostic) -> None:
        plans.append(diagnostic.message_primary or "")
    session.add_notice_handler(notice)
    try:
        await session.execute("SET client_min_messages = log")
        await session.execute("SET debug_print_plan = on")
        await session.execute(statement, params)
        await session.execute("RESET ALL")
    finally:
        session.remove_notice_handler(notice)
    return sum(p.startswith("plan:") for p in plans)


async def test_the_executors_plans_outlast_the_clean_up_after_a_step(
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    # A step's prepared statements are all deallocated after it (df._after_step), and with
    # them any the runtime kept; a PL/pgSQL function's plans are kept elsewhere (0020).
    await start(aconn, 2)
    await queue_tasks(aconn, 2)
    statements = await executor_statement_values(aconn)
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as session:
        await session.execute("BEGIN")
        for name, params in statements:
            await session.execute(q(name), params)
        await session.execute("PREPARE a_steps_own AS SELECT 1")
        await session.execute("SELECT df._after_step()")
        cur = await session.execute("SELECT count(*) FROM pg_prepared_statements")
        assert await cur.fetchone() == (0,)
        made = {name: await plans_made(session, q(name), params) for name, params in statements}
        assert made == {name: 1 for name, _ in statements}
        # What a step can do to them: DISCARD PLANS has them planned again.
        await session.execute("DISCARD PLANS")
        name, params = statements[0]
        assert await plans_made(session, q(name), params) == 2
        await session.execute("ROLLBACK")


async def test_a_workflow_whose_steps_discard_the_sessions_plans_completes(
        aconn: psycopg.AsyncConnection[Any], fresh_dsn: str) -> None:
    # DISCARD PLANS is the one thing a step can do to the plans the executor keeps (0020):
    # the executor's next statements are planned again.
    executor = Executor(config.from_env({}), fresh_dsn)
    async with await db.connect(fresh_dsn, role="test executor", autocommit=True,
                                options=executor.connection_options()) as econn:
        executor.conn = econn
        cur = await aconn.execute(
            "SELECT df.start($$DISCARD PLANS$$ ~> $$SELECT 1 AS a$$ ~> $$DISCARD PLANS$$)")
        row = await cur.fetchone()
        assert row is not None
        while await executor.work_once(econn):
            pass
        cur = await aconn.execute("SELECT status FROM df.instances WHERE id = %s", (row[0],))
        assert await cur.fetchone() == ("completed",)
