"""Steps that share one round trip (Executor._run_pipelined): each keeps its own outcome.

One executor and one dispatcher, driven round by round in this process on a real database, so
which steps travel together is decided by the test: a batch's first task runs alone (it looks
up the submitter's role), the tasks claimed after it go out in one pipeline. Every step writes
its number to a ledger with a primary key, so a step that took effect twice, or kept the
effect of a failed run, shows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from durable_actor import config, db, engine
from durable_actor.dispatcher import Dispatcher
from durable_actor.executor import Executor
from durable_actor.steps.sql import CLEANUP


@pytest.fixture
async def aconn(fresh_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as c:
        await c.execute("CREATE TABLE pl_ledger (n int PRIMARY KEY)")
        yield c


def ledger_step(n: int) -> str:
    return f"INSERT INTO pl_ledger VALUES ({n}) RETURNING n"


class Run:
    """Workflows started, then worked off by one executor and one dispatcher (the same ones
    at every call); `groups` lists the instances of each pipeline, `cuts` those cut short.
    With `mail`, the executor takes the starts itself (`Executor._take_mail`)."""

    def __init__(self, dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
        self.dsn, self.aconn = dsn, aconn
        self.groups: list[list[str]] = []
        self.cuts = 0
        settings = config.from_env({})
        self.executor = executor = Executor(settings, self.dsn)
        self.dispatcher = Dispatcher(settings, self.dsn)
        original = executor._run_pipelined

        async def recorded(conn: Any, cur: Any, group: Any, **kw: Any) -> Any:
            self.groups.append([task["instance_id"] for task, _ in group])
            outcomes, cut = await original(conn, cur, group, **kw)
            self.cuts += cut
            return outcomes, cut

        executor._run_pipelined = recorded  # type: ignore[method-assign]

    async def __call__(self, workflows: list[str], role: str | None = None, *,
                       mail: bool = False) -> list[str]:
        ids = []
        for workflow in workflows:
            if role:
                await self.aconn.execute(f'SET ROLE "{role}"')
            try:
                row = await (await self.aconn.execute(f"SELECT df.start({workflow})")).fetchone()
            finally:
                await self.aconn.execute("RESET ROLE")
            assert row is not None
            ids.append(row[0])
        executor, dispatcher = self.executor, self.dispatcher
        async with await db.connect(self.dsn, role="test executor", autocommit=True,
                                    options=executor.connection_options()) as econn, \
                await db.connect(self.dsn, role="test dispatcher", autocommit=True) as dconn:
            executor.idle = mail            # else the dispatcher takes the starts: tasks
            executor.conn = econn           # the connection it cancels a statement on
            for _ in range(100):     # with `mail`, the executor takes the starts first
                if not (await executor.work_once(econn) + await dispatcher.work_once(dconn)
                        if mail else
                        await dispatcher.work_once(dconn) + await executor.work_once(econn)):
                    break
        return ids

    async def statuses(self, ids: list[str]) -> list[tuple[str, str | None]]:
        rows = []
        for i in ids:
            cur = await self.aconn.execute(
                "SELECT i.status, (SELECT string_agg(n.error, '; ') FROM df.nodes n"
                "                  WHERE n.instance_id = i.id) FROM df.instances i"
                " WHERE i.id = %s", (i,))
            rows.append(await cur.fetchone())
        return rows  # type: ignore[return-value]

    async def ledger(self) -> list[int]:
        cur = await self.aconn.execute("SELECT n FROM pl_ledger ORDER BY n")
        return [n for (n,) in await cur.fetchall()]


@pytest.fixture
def run(fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> Run:
    return Run(fresh_dsn, aconn)


FAILING = {
    # the statement fails in the database: the steps after it did not run yet
    "database error": (
        "WITH x AS (INSERT INTO pl_ledger VALUES (3) RETURNING n) SELECT n / 0 AS v FROM x",
        "SQL execution failed: division by zero"),
    # the statement succeeded, its rows cannot be read: the steps after it ran already
    "unsupported type": (
        "WITH x AS (INSERT INTO pl_ledger VALUES (3) RETURNING n)"
        " SELECT interval '1 day' * n AS v FROM x",
        "Unsupported column type 'INTERVAL' for column 'v'"),
    "result too large": (
        "WITH x AS (INSERT INTO pl_ledger VALUES (3) RETURNING n)"
        " SELECT repeat('x', 5000) AS v FROM x",
        "SQL execution failed: the result is 5033 bytes of JSON; the maximum is 1000"),
    # the step's clean-up fails (DISCARD TEMP under a cursor it left open)
    "clean-up error": (
        "SELECT open_over_temp()::text AS c",
        'SQL execution failed: cannot DROP TABLE "held" because it is being used by active'
        " queries in this session"),
}


async def failing_setup(aconn: psycopg.AsyncConnection[Any]) -> None:
    """What the FAILING steps need: a low max_result_bytes, the function that opens a cursor."""
    await aconn.execute("UPDATE df.settings SET value = '1000' WHERE name = 'max_result_bytes'")
    await aconn.execute("""CREATE FUNCTION open_over_temp() RETURNS refcursor
                           LANGUAGE plpgsql AS $f$
                           DECLARE c refcursor := 'left_open';
                           BEGIN
                               CREATE TEMP TABLE IF NOT EXISTS held (x int);
                               INSERT INTO pl_ledger VALUES (3);
                               OPEN c FOR SELECT * FROM held;
                               RETURN c;
                           END $f$""")


@pytest.mark.parametrize("case", FAILING)
async def test_a_failing_step_fails_alone_and_its_neighbours_take_effect_once(
        run: Run, aconn: psycopg.AsyncConnection[Any], case: str) -> None:
    await failing_setup(aconn)
    bad, error = FAILING[case]
    steps = [ledger_step(1), ledger_step(2), bad, ledger_step(4), ledger_step(5),
             ledger_step(6)]
    ids = await run([f"$${s}$$" for s in steps])
    assert any(ids[2] in group and group[-1] != ids[2] for group in run.groups), run.groups
    statuses = await run.statuses(ids)
    assert [s for s, _ in statuses] == ["completed"] * 2 + ["failed"] + ["completed"] * 3
    assert statuses[2][1] is not None and statuses[2][1].startswith(error), statuses[2]
    assert await run.ledger() == [1, 2, 4, 5, 6]
    results = [await (await aconn.execute("SELECT df.result(%s)::jsonb", (i,))).fetchone()
               for i in ids]
    assert [r[0]["rows"] if r else None for k, r in enumerate(results) if k != 2] == [
        [{"n": n}] for n in (1, 2, 4, 5, 6)]


async def test_steps_carried_on_together_keep_their_order_and_results(
        run: Run, aconn: psycopg.AsyncConnection[Any]) -> None:
    # Second steps of three workflows go out together; one needs its parameter retyped
    # (42P18: `$x.s IS NULL` cannot type an unknown), which only running it alone does.
    workflows = [f"$$SELECT 'w{k}' AS s$$ |=> 'x' ~> $${ledger_step(k)}$$"
                 f" ~> $$SELECT $x.s IS NULL AS missing, $x.s || '!' AS s$$" for k in (1, 2, 3)]
    ids = await run(workflows)
    assert max(map(len, run.groups)) >= 2, run.groups
    assert [s for s, _ in await run.statuses(ids)] == ["completed"] * 3
    for k, i in enumerate(ids, 1):
        row = await (await aconn.execute("SELECT df.result(%s)::jsonb", (i,))).fetchone()
        assert row is not None and row[0]["rows"] == [{"missing": False, "s": f"w{k}!"}]
    assert await run.ledger() == [1, 2, 3]


async def test_a_statement_that_cannot_run_in_a_transaction_leaves_the_pipeline(
        run: Run, aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE TABLE pl_vacuumed (x int)")
    ids = await run([f"$${ledger_step(1)}$$", f"$${ledger_step(2)}$$",
                     "$$VACUUM pl_vacuumed$$", f"$${ledger_step(4)}$$"])
    assert any(ids[2] in group for group in run.groups), run.groups
    assert [s for s, _ in await run.statuses(ids)] == ["completed"] * 4
    assert await run.ledger() == [1, 2, 4]


async def test_a_slow_step_among_others_is_cut_short_and_runs_again_alone(
        run: Run, aconn: psycopg.AsyncConnection[Any]) -> None:
    # A pipeline that outlasts the batch budget (0.05 s) while others wait for its commit is
    # cut short: the step it cut runs again, as the first of a batch of its own.
    # The first task of a batch runs alone; the fast one makes room for the slow ones.
    slow = ("WITH x AS (INSERT INTO pl_ledger VALUES ({}) RETURNING n)"
            " SELECT n, pg_sleep(0.2) AS s FROM x")
    ids = await run([f"$${ledger_step(1)}$$", *(f"$${slow.format(k)}$$" for k in (2, 3, 4))])
    assert run.cuts >= 1
    assert [s for s, _ in await run.statuses(ids)] == ["completed"] * 4
    assert await run.ledger() == [1, 2, 3, 4]


async def test_a_role_no_longer_trusted_runs_its_steps_confined_at_once(
        run: Run, aconn: psycopg.AsyncConnection[Any]) -> None:
    # The executor remembers which roles it found trusted (superusers) to send their steps
    # pipelined; the statement that sets the role checks it again. A role demoted since must
    # not run one statement directly: here, RESET ROLE would escape its step function.
    role = f"pl_{uuid.uuid4().hex[:8]}"
    await aconn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    try:
        ids = await run([f"$${ledger_step(1)}$$"], role=role)
        assert role in run.executor.trusted
        assert [s for s, _ in await run.statuses(ids)] == ["completed"]
        await aconn.execute(f'ALTER ROLE "{role}" NOSUPERUSER')
        await aconn.execute("SELECT df.grant_usage(%s)", (role,))
        await aconn.execute(f'GRANT INSERT, SELECT ON pl_ledger TO "{role}"')
        groups = len(run.groups)
        ids = await run([f"$${ledger_step(2)}$$ ~> $$RESET ROLE$$"], role=role)
        assert len(run.groups) > groups               # the step was sent pipelined first
        assert role not in run.executor.trusted
        ((status, error),) = await run.statuses(ids)
        assert status == "failed" and error is not None and "security-definer" in error, error
        assert await run.ledger() == [1, 2]
    finally:
        await aconn.execute(f'DROP OWNED BY "{role}" CASCADE')
        await aconn.execute(f'DROP ROLE "{role}"')


async def test_the_clean_up_in_one_call_is_the_executors_clean_up(
        aconn: psycopg.AsyncConnection[Any]) -> None:
    # df._after_step runs CLEANUP after a pipelined step; the two must not drift apart.
    cur = await aconn.execute("SELECT prosrc FROM pg_catalog.pg_proc"
                              " WHERE oid = 'df._after_step()'::pg_catalog.regprocedure")
    row = await cur.fetchone()
    assert row is not None
    body = row[0]
    for statement in (s.strip() for s in CLEANUP.split(";")):
        if statement.startswith("SELECT "):
            assert f"PERFORM {statement.removeprefix('SELECT ')}" in body, statement
        else:
            assert f"EXECUTE '{statement}'" in body, statement
    assert body.count("EXECUTE") + body.count("PERFORM") == len(CLEANUP.split(";"))


async def test_a_pipeline_larger_than_the_sockets_buffers_is_sent_and_read_whole(
        fresh_dsn: str) -> None:
    # Megabytes each way: the server answers while the pipeline is still being written, so
    # sending must read meanwhile, or both sides would wait for the other for ever.
    async with await db.connect(fresh_dsn, role="test", autocommit=True) as conn:
        values = [f"{i:06d}" + "x" * 3000 for i in range(2000)]
        statements = [db.Statement(b"SELECT $1::text AS v", [v.encode()], [0])
                      for v in values]
        results = await db.pipelined(conn, statements)
        assert [r.get_value(0, 0) for r in results] == [v.encode() for v in values]

        failing = [*statements[:1500], db.Statement(b"SELECT 1 / 0"), *statements[1500:]]
        results = await db.pipelined(conn, failing)
        statuses = [r.status for r in results]
        assert statuses == [psycopg.pq.ExecStatus.TUPLES_OK] * 1500 + \
            [psycopg.pq.ExecStatus.FATAL_ERROR] + [psycopg.pq.ExecStatus.PIPELINE_ABORTED] * 500
        assert (await (await conn.execute("SELECT 42")).fetchone()) == (42,)


async def test_a_batch_carries_its_first_instances_on_before_claiming_more(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    # Three queued first steps, a batch of three steps: the batch runs the first workflow to
    # its end (its steps 2 and 3 carried on, never queued) instead of claiming the other two
    # first steps and queueing the steps that follow all three.
    settings = config.from_env({}, executor_batch=3, batch_budget=60.0)
    executor, dispatcher = Executor(settings, fresh_dsn), Dispatcher(settings, fresh_dsn)
    ids = []
    for n in (1, 4, 7):
        steps = " ~> ".join(f"$${ledger_step(k)}$$" for k in (n, n + 1, n + 2))
        row = await (await aconn.execute(f"SELECT df.start({steps})")).fetchone()
        assert row is not None
        ids.append(row[0])
    async with await db.connect(fresh_dsn, role="test executor", autocommit=True,
                                options=executor.connection_options()) as econn, \
            await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn:
        while await dispatcher.work_once(dconn):       # the starts: three first-step tasks
            pass
        executor.idle, executor.conn = False, econn
        assert await executor.work_once(econn) == 3
    cur = await aconn.execute("SELECT id, status FROM df.instances WHERE id = ANY(%s)", (ids,))
    statuses = dict(await cur.fetchall())
    assert sorted(statuses.values()) == ["completed", "running", "running"]
    cur = await aconn.execute("SELECT n FROM pl_ledger ORDER BY n")
    first = next(n for n, i in zip((1, 4, 7), ids, strict=True) if statuses[i] == "completed")
    assert [n for (n,) in await cur.fetchall()] == [first, first + 1, first + 2]
    cur = await aconn.execute("SELECT count(*) FROM df.tasks")
    assert await cur.fetchone() == (2,)     # the other two first steps, still queued


async def test_a_batch_claims_no_task_of_an_instance_it_carried_on(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any]) -> None:
    # A second task of the same instance, queued beside its first step's: once the batch has
    # carried the instance on, what the engine decided for it is not written yet (here: the
    # instance ended, its queued work is dropped), so the batch claims none of its tasks.
    await aconn.execute("CREATE TABLE pl_runs (n int)")
    settings = config.from_env({}, batch_budget=60.0)
    executor, dispatcher = Executor(settings, fresh_dsn), Dispatcher(settings, fresh_dsn)
    steps = " ~> ".join(f"$$INSERT INTO pl_runs VALUES ({k}) RETURNING n$$" for k in (1, 2, 3))
    row = await (await aconn.execute(f"SELECT df.start({steps})")).fetchone()
    assert row is not None
    async with await db.connect(fresh_dsn, role="test executor", autocommit=True,
                                options=executor.connection_options()) as econn, \
            await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn:
        while await dispatcher.work_once(dconn):       # the start: the first step's task
            pass
        await aconn.execute(
            "INSERT INTO df.tasks (instance_id, node_id, activation, shard, kind, database,"
            "                      submitted_by, payload)"
            " SELECT instance_id, node_id, activation, shard, kind, database, submitted_by,"
            "        payload FROM df.tasks")
        executor.idle, executor.conn = False, econn
        assert await executor.work_once(econn) == 3
    cur = await aconn.execute("SELECT status FROM df.instances WHERE id = %s", row)
    assert await cur.fetchone() == ("completed",)
    cur = await aconn.execute("SELECT n FROM pl_runs ORDER BY n")
    assert [n for (n,) in await cur.fetchall()] == [1, 2, 3]
    cur = await aconn.execute("SELECT count(*) FROM df.tasks")
    assert await cur.fetchone() == (0,)


# -- steps ahead (engine.steps_ahead): a lone workflow's next steps share its step's round trip

async def lone(run: Run, workflow: str) -> str:
    """Run `workflow` alone, its start taken by the executor, once the executor knows the
    role trusted (a role's first step runs alone); `run.groups` then holds its pipelines."""
    await run(["$$SELECT 1$$"], mail=True)
    run.groups.clear()
    (wf,) = await run([workflow], mail=True)
    return wf


async def test_a_lone_workflows_steps_go_in_one_round_trip(
        run: Run, aconn: psycopg.AsyncConnection[Any]) -> None:
    wf = await lone(run, " ~> ".join(f"$${ledger_step(k)}$$" for k in (1, 2, 3)))
    assert run.groups == [[wf, wf, wf]]
    assert await run.statuses([wf]) == [("completed", None)]
    assert await run.ledger() == [1, 2, 3]
    row = await (await aconn.execute("SELECT df.result(%s)::jsonb", (wf,))).fetchone()
    assert row is not None and row[0]["rows"] == [{"n": 3}]


@pytest.mark.parametrize("case", FAILING)
async def test_a_step_ahead_that_fails_fails_its_workflow_and_what_follows_never_runs(
        run: Run, aconn: psycopg.AsyncConnection[Any], case: str) -> None:
    await failing_setup(aconn)
    bad, error = FAILING[case]
    wf = await lone(run, f"$${ledger_step(1)}$$ ~> $${bad}$$ ~> $${ledger_step(4)}$$")
    assert run.groups[0] == [wf, wf, wf]
    ((status, errors),) = await run.statuses([wf])
    assert status == "failed" and errors is not None and errors.startswith(error), errors
    assert await run.ledger() == [1]


async def test_a_step_run_ahead_that_the_engine_does_not_issue_is_rolled_back(
        run: Run, aconn: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # A wrong guess (none is made: the guard is the engine's) costs the step's work, never
    # its effect: the step ran ahead is rolled back and the engine's own next step runs.
    wrong = engine.RunStep("ffffffff", 99, "sql", {"query": ledger_step(99), "node_type": "SQL",
                                                    "results": {}})
    monkeypatch.setattr(engine, "steps_ahead", lambda *args: [wrong])
    wf = await lone(run, f"$${ledger_step(1)}$$ ~> $${ledger_step(2)}$$")
    assert [len(group) for group in run.groups] == [2, 2]      # 1 and 99, 2 and 99
    assert await run.statuses([wf]) == [("completed", None)]
    assert await run.ledger() == [1, 2]


async def test_an_executor_whose_shards_are_empty_steals_only_what_is_queued(
        fresh_dsn: str, aconn: psycopg.AsyncConnection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Executor 0 of 2 prefers the even shards. With nothing queued, it looks once (its shards
    # and whether anything is queued at all, in one round trip); a task on an odd shard it
    # steals.
    settings = config.from_env({})
    executor = Executor(settings, fresh_dsn, index=0, count=2)
    dispatcher = Dispatcher(settings, fresh_dsn)
    trips: list[str] = []
    original = db.simple_query

    async def counted(conn: Any, text: str) -> Any:
        trips.append(text)
        return await original(conn, text)

    monkeypatch.setattr(db, "simple_query", counted)
    async with await db.connect(fresh_dsn, role="test executor", autocommit=True,
                                options=executor.connection_options()) as econn, \
            await db.connect(fresh_dsn, role="test dispatcher", autocommit=True) as dconn:
        executor.idle, executor.conn = False, econn
        assert await executor.work_once(econn) == 0
        assert len(trips) == 1, trips
        row = await (await aconn.execute(f"SELECT df.start($${ledger_step(1)}$$)")).fetchone()
        assert row is not None
        while await dispatcher.work_once(dconn):
            pass
        await aconn.execute("UPDATE df.tasks SET shard = 1")     # executor 1's
        assert await executor.work_once(econn) == 1
    assert await (await aconn.execute("SELECT status FROM df.instances")).fetchone() == (
        "completed",)
    assert await (await aconn.execute("SELECT n FROM pl_ledger")).fetchall() == [(1,)]


async def test_a_wrong_step_ahead_that_only_runs_alone_is_never_run(
        run: Run, aconn: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # A statement that cannot be typed in the pipeline (42P18) runs alone; a step ahead is not
    # run so (once run alone it could not be rolled back), so a wrong guess leaves nothing.
    wrong = engine.RunStep("ffffffff", 99, "sql", {
        "query": "WITH i AS (INSERT INTO pl_ledger VALUES (99) RETURNING n)"
                 " SELECT $x.s IS NULL AS missing FROM i",
        "node_type": "SQL", "results": {"x": {"rows": [{"s": "w"}], "row_count": 1}}})
    monkeypatch.setattr(engine, "steps_ahead", lambda *args: [wrong])
    wf = await lone(run, f"$${ledger_step(1)}$$ ~> $${ledger_step(2)}$$")
    assert await run.statuses([wf]) == [("completed", None)]
    assert await run.ledger() == [1, 2]
