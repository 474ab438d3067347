"""Executor: claims queued steps in batches and runs them.

Exactly once for SQL in the instance's own database
-------------------------------------------------
One transaction per batch: claim a task (FOR UPDATE SKIP LOCKED: the row lock is the claim),
run it in a savepoint, carry its instance on (below), claim the next ones …, delete the
finished tasks, post the other outcomes to the mailbox, and commit. The step's own writes, the
removal of its task and its completion commit together: a crash before the commit leaves no
trace (the lock goes with the session and the task is claimed again); after the commit the
task is gone. Many steps share one commit, which is what makes this faster than a commit per
step. A batch stops claiming after `batch_budget` seconds or `executor_batch` steps. Its first
task is claimed alone, so that a slow step holds no queued task; later ones in groups of
`CLAIM_GROUP` (tasks claimed and left unrun go back with the commit). Nor does a slow step hold
back the steps that ran before it in its batch: a step that is not the batch's first and runs
longer than `batch_budget` is interrupted and rolled back to its savepoint, the batch commits,
and the step runs again as the first of a batch of its own, where it may take as long as it
needs.

Steps that run directly (their role was a superuser or the runtime's own when last looked up,
and still is: checked by the statement that sets it) and have no time-out of their own share
round trips: the tasks claimed together, or the steps that follow on the instances carried
on, go out as one libpq pipeline, each step with its savepoint, role, statement and clean-up
(``_run_pipelined``). A step that fails there is rolled back with every step after it, which
go out again.

Carrying instances on
---------------------
The finished steps' instances that have no mail waiting and that nobody else runs are locked
(SKIP LOCKED) and their outcomes applied here with the engine (``_advance``); the SQL steps that
follow in this database run at once, each in its savepoint, while the batch's budget lasts,
and what the engine decided is written with the dispatcher's code (``actors.py``). A batch
does this after each group of tasks it claims, before it claims more (depth first): the budget
goes to finishing the instances it has rather than to first steps whose next steps would then
be queued as tasks of their own. These steps have no task row: they, the new state and the
first step commit together or not at all. An executor whose last round found nothing to do
takes mail as the dispatcher does and carries those instances on the same way
(``_take_mail``), so an idle runtime starts a workflow's first step without a dispatcher
round.

At least once for everything else
---------------------------------
A statement that cannot run in a transaction block (SQLSTATE 25001: VACUUM, CREATE INDEX
CONCURRENTLY …) is marked and then, like steps in another database (`database =>`), runs
outside the claim: the executor commits a lease (lease_until, lease_token) first, runs the
step on its own connection, and completes the task only if its lease token still matches. A
crash between the step and the completion runs the step again once the lease expires.

HTTP steps always run this way (``steps/http.py``). Their lease lasts the call's own time-out
plus a margin, the HTTP calls of one batch run concurrently (they wait on the network, not on
the database), and each carries an idempotency key that is the same on every attempt, so the
receiver can recognise a call that a crash made us repeat.

Sharding
--------
Tasks carry shard = crc32(instance id) mod `shards`; executor i of N prefers the shards
s with s mod N = i and steals from all shards when its own are empty and any task is queued
at all (asked with the look at its own shards: an idle executor looks once, not twice).

Cancellation
------------
Executors LISTEN on df_cancel (payload: an instance id, or "instance node"). When the step
running right now belongs to a cancelled instance or node, the executor cancels its own
connection's statement. A QueryCanceled that the executor did not ask for *for that step* is
a statement timeout (the step fails), a cancel meant for a step that had just finished (the
step is left queued and runs again) or, past that, someone else's (the step fails with the
server's message): `cancel_verdict`.

Time-outs and retry verdicts
----------------------------
A SQL step with a time-out (``df.timeout``) sets its statement_timeout with ``set_config(…,
true)`` inside its savepoint: a failure rolls it back with the savepoint, a success sets it
back to the session's value before the savepoint is released (otherwise the setting would
outlive the savepoint and hold for the rest of the batch). A QueryCanceled that the executor
did not ask for and that came once the step had run for its time-out, or whose message says
the statement timer fired, is that time-out (`cancel_verdict`): the step fails with
"statement timeout after Ns" (SQLSTATE 57014). Every failure goes to the mailbox with its verdict
(``sqlstate``, ``retryable``, ``http_status``, ``error_class``, ``retry_after``) and the
attempt number the engine sent, for the node's retry policy; a 429 or 503 answer that is a
result carries its Retry-After too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from durable_actor import actors, db, engine, metrics, refs
from durable_actor.config import Settings
from durable_actor.errors import StepError
from durable_actor.literals import Literals, literal
from durable_actor.loop import Loop
from durable_actor.queries import q
from durable_actor.steps import http as http_step
from durable_actor.steps import sql as sql_step

STEP_SAVEPOINT = "df_step"
NON_TRANSACTIONAL = "25001"   # active_sql_transaction: "… cannot run inside a transaction block"
QUERY_CANCELED = "57014"
# Errors of a pipelined step's statement that send it to run on its own, where they are
# handled: a parameter PostgreSQL cannot type (retyped as text), a statement that cannot run
# in a transaction block (run outside one). Both are raised before the statement runs.
RUN_ALONE = ("42P18", NON_TRANSACTIONAL)


# What a step that succeeded leaves to do on the connection: undo what it may have left in
# the session, take the runtime's role back, keep its writes. Sent with the runtime's next
# statement (Executor._round_trip).
EPILOGUE = [*(text.strip() for text in sql_step.CLEANUP.split(";")), "RESET ROLE",
            f"RELEASE SAVEPOINT {STEP_SAVEPOINT}"]
# The same but the release, after a pipelined step (Executor._run_pipelined), whose role is
# trusted: the role first (a trusted step may have set another one), then CLEANUP in one
# call (df._after_step).
PIPELINED_AFTER_STEP = [db.Statement(b"RESET ROLE"), db.Statement(b"SELECT df._after_step()")]
# A pipelined step: SAVEPOINT, _as_submitter, the step, PIPELINED_AFTER_STEP.
STEP_STATEMENTS = 3 + len(PIPELINED_AFTER_STEP)


def _as_submitter(task: dict[str, Any]) -> str:
    """Set the step's instance id and role for the rest of its savepoint."""
    return literal(
        "SELECT pg_catalog.set_config('df.instance_id', %s::text, true),"
        "       CASE WHEN %s::text IS DISTINCT FROM current_user"
        "            THEN pg_catalog.set_config('role', %s::text, true) END",
        (task["instance_id"], task["role"], task["role"]))


def _as_trusted_submitter(task: dict[str, Any]) -> str:
    """`_as_submitter` for a pipelined step (Executor._pipelinable), whose role was trusted
    when it was looked up last: ``df._as_trusted`` fails unless it still exists and is a
    superuser or the runtime's own role, checked before the role is set; returns
    max_result_bytes."""
    return literal("SELECT df._as_trusted(%s::text, %s::text) AS max_bytes",
                   (task["instance_id"], task["role"]))


def _asked(task: dict[str, Any], cancels: list[tuple[str, str]]) -> bool:
    """Is a cancel among `cancels` ((instance, node or "") of df_cancel) meant for `task`?"""
    return any(task["instance_id"] == instance and node in ("", task["node_id"])
               for instance, node in cancels)


FIRST_EXECUTOR_LEAD = 0.003  # seconds the other executors wait when a NOTIFY wakes them
CLAIM_GROUP = 16             # tasks claimed together once a batch's first step has run
TIMEOUT_SLACK = 0.05          # seconds: a cancel this close to the time-out is the time-out
OUR_CANCEL_LANDS = 5.0        # seconds within which a cancel we sent may still land


def step_timeout(payload: dict[str, Any]) -> float | None:
    """The SQL step's time-out in seconds (df.timeout), None when it has none."""
    value = payload.get("timeout_seconds")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def cancel_verdict(*, asked: bool, cut: bool, timeout: float | None, elapsed: float,
                   since_our_cancel: float, says_timeout: bool) -> str:
    """What a step's cancelled statement (QueryCanceled, SQLSTATE 57014, for every cause)
    means: "cancelled" (the step fails with the server's message), "timeout" (its
    ``df.timeout`` ran out: it fails saying so) or "rerun" (a cancel meant for something
    else hit it: it is left queued and runs again).

    `asked`: a df.cancel for it; `cut`: its batch was cut short (`Executor._cut_batch`);
    `timeout`: its time-out in seconds; `elapsed`: seconds since it started;
    `since_our_cancel`: seconds since the executor last sent a df.cancel (a cancel lands a
    moment after it is sent, and may hit the next step instead); `says_timeout`: the
    server's message says its statement timer fired (English messages only: elsewhere the
    time the step ran decides alone).

    A step with a time-out that ran for it was timed out; so was one that the server says
    timed out sooner (a CI run saw a 0.5 s time-out reported before the executor had counted
    0.45 s)."""
    if asked:
        return "cancelled"
    if cut:
        return "rerun"   # cut short to commit the batch: it runs again on its own
    if timeout is not None and (elapsed >= timeout - TIMEOUT_SLACK or says_timeout):
        return "timeout"
    return "rerun" if since_our_cancel < OUR_CANCEL_LANDS else "cancelled"


def says_timeout(exc: BaseException) -> bool:
    """Does the server's message of a cancelled statement say its statement timer fired?"""
    return "due to statement timeout" in str(exc)


def timed_out(seconds: float) -> StepError:
    return StepError(f"SQL execution failed: statement timeout after {seconds:g}s",
                     sqlstate=QUERY_CANCELED)


def cancelled(exc: psycopg.Error) -> StepError:
    """A step's statement cancelled (by a cancel, a time-out or a cut: `_cancelled` tells)."""
    return StepError(f"SQL execution failed: {str(exc).strip()}", sqlstate=QUERY_CANCELED)


def _inline_task(instance: dict[str, Any], step: engine.RunStep) -> dict[str, Any]:
    """A step run where its predecessor ran, shaped like a claimed task (it has no row)."""
    return {"id": None, "instance_id": instance["id"], "node_id": step.node_id,
            "activation": step.activation, "kind": step.kind, "database": instance["database"],
            "role": instance["role"], "payload": orjson.loads(orjson.dumps(step.payload)),
            "attempt": 1, "label": instance["label"]}


class _Redo(Exception):
    """A round trip that carried a step's EPILOGUE failed: whether that step's savepoint was
    released is unknown, so the whole batch is rolled back and runs again."""


@dataclass(frozen=True)
class _Step:
    function: str | None          # the submitter's step function; None: run directly
    max_result_bytes: int | None


@dataclass
class Outcome:
    task: dict[str, Any]
    payload: str
    savepoint: str | None = None   # a pipelined step kept so far: rolling back to it undoes it


class Executor(Loop):
    role = "executor"
    channels = ("df_tasks", "df_mailbox", "df_cancel")
    prepares = False   # CLEANUP deallocates every prepared statement after each step
    autocommit = True  # BEGIN goes with a batch's first round trip, COMMIT with its writes

    def __init__(self, settings: Settings, dsn: str, *, index: int = 0, count: int = 1) -> None:
        super().__init__(settings, dsn, index=index)
        self.count = count
        if index:
            # A start rings every idle executor, and one of them can take it: woken from idle,
            # the first executor of a supervisor goes at once, the others a moment later, so
            # that a lone workflow costs one executor a round, not all of them.
            self.wake_delay = FIRST_EXECUTOR_LEAD
        self.mine = [s for s in range(settings.shards) if s % count == index % count]
        self.all_shards = list(range(settings.shards))
        self.listener.keep_payloads = True
        self.current: list[dict[str, Any]] = []     # the steps running now (_watch_cancels)
        self.cancels: list[tuple[str, str]] = []   # (instance, node or "") asked for them
        self.cancel_sent_at = 0.0
        self.savepoints = itertools.count()        # names of pipelined steps' savepoints
        self.batch_cut = False
        self.cut_request: asyncio.Task[None] | None = None
        self.database: str | None = None
        self.http = http_step.HttpCaller()
        self.roles: dict[tuple[str, bool], tuple[Any, ...]] = {}   # _enter_step, per batch
        self.trusted: set[str] = set()   # roles trusted when last looked up (_pipelinable)
        self.owed = False    # the last step's EPILOGUE is still to be sent (_round_trip)
        self.begin = False   # BEGIN is still to be sent (_transaction, _round_trip)
        self.unreleased: str | None = None   # savepoint still to be released (_head)
        self.eager = False   # after a redone batch: each step's EPILOGUE at once, as its own
        self.idle = True     # the last round found nothing to do: take mail (_take_mail)
        self.log = self.log.bind(executor=index)
        self.actors = actors.Actors(settings, self.log)

    def connection_options(self) -> dict[str, str]:
        # Notice a dead runtime process during a long statement, so its locks go quickly.
        return {"client_connection_check_interval": "1000"}

    async def run(self, stop: asyncio.Event) -> None:
        watcher = asyncio.create_task(self._watch_cancels(stop), name="executor-cancels")
        try:
            await super().run(stop)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await self.http.aclose()

    async def work_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        if self.database is None:
            row = await (await conn.execute("SELECT current_database()")).fetchone()
            await conn.commit()
            self.database = str(row[0]) if row else ""
        deferred: list[tuple[dict[str, Any], int]] = []
        taken: list[int] = []
        stale: list[int] = []
        self.roles.clear()
        self.owed = False
        claimed = 0
        try:
            if self.idle:
                claimed = await self._take_mail(conn)
            claimed += await self._batch(conn, deferred, taken, stale)
        except _Redo as exc:
            cause = exc.__cause__
            if isinstance(cause, psycopg.Error) and db.needs_reconnect(cause, conn):
                raise cause from exc
            # Once more with each step's EPILOGUE inside the step, so that a step whose
            # clean-up cannot succeed fails alone instead of redoing its batch for ever.
            self.log.warning("batch_redone", error=str(cause).strip())
            self.eager = True
            async with conn.transaction():     # the rollback kept what is not transactional
                await self._cleanup(conn)
            return 1
        self.eager = False
        await self._run_http_many(conn, [(t, tok) for t, tok in deferred if t["kind"] == "http"])
        for task, token in deferred:
            if task["kind"] != "http":
                await self._run_leased(conn, task, token)
        self.idle = claimed + len(stale) == 0
        return claimed + len(stale)

    async def _take_mail(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """An idle executor runs actors too: it claims instances that have mail as the
        dispatcher does (SKIP LOCKED: one actor runs in one place), applies the mail with the
        engine and carries the instances on here (`_carry`), in one transaction. So a
        workflow just started runs its first steps in the transaction that takes its start
        message, without waiting for a dispatcher round and a task hand-over. A busy
        executor leaves the mail to the dispatcher, which takes it in larger batches.
        Returns how many steps ran."""
        async with self._transaction(conn), conn.cursor(row_factory=dict_row) as cur:
            ((row,),) = await self._round_trip(conn, [literal(
                q("instances_claim_with_mail"),
                {"limit": CLAIM_GROUP, "scan": CLAIM_GROUP * 2, "older_than": 0.0})])
            claimed, mail, loaded = actors.claimed(row)
            if not claimed:
                return 0
            rows = {r["id"]: r for r in claimed}
            states = actors.states(claimed, loaded)
            now: datetime = claimed[0]["now"]
            effects, ran = await self._carry(
                conn, cur, rows, states, now, time.monotonic() + self.settings.batch_budget,
                self.settings.executor_batch, actors.apply_mail(states, mail, now))
            writes = self._writes(conn)
            await self.actors.write(writes, states, effects, rows, now)
            await self._commit(conn, writes)
        return ran

    async def _batch(self, conn: psycopg.AsyncConnection[Any],
                     deferred: list[tuple[dict[str, Any], int]], taken: list[int],
                     stale: list[int]) -> int:
        """One batch in one transaction (module docstring); returns how many steps it ran or
        leased. Fills `deferred` with the leased tasks, `taken` with the claimed task ids and
        `stale` with the tasks of instances that no longer run.

        Depth first: the instances of each group of tasks claimed are carried on (`_advance`)
        before more tasks are claimed, so the steps that follow them run in this batch
        instead of being queued as tasks of their own."""
        claimed = 0
        async with self._transaction(conn), conn.cursor(row_factory=dict_row) as cur:
            done: list[Outcome] = []
            mail: list[Outcome] = []      # outcomes of instances not carried on here
            carried: set[str] = set()     # instances carried on in this batch
            writes = self._writes(conn)  # every write of the batch, with its commit
            shards = self.mine
            deadline = time.monotonic() + self.settings.batch_budget
            while claimed < self.settings.executor_batch and time.monotonic() < deadline:
                # The first task alone: it may be slow, and tasks claimed with it would wait
                # for it. Later ones in groups, run in one round trip where they can
                # (`_run_steps`); a slow one among them is cut short, and claimed tasks left
                # unrun go back with the commit.
                limit = min(CLAIM_GROUP if done else 1, self.settings.executor_batch - claimed)
                steal = shards is self.mine and not done and self.mine != self.all_shards
                ready, queued = await self._claim(conn, shards, taken, carried, limit,
                                                  steal=steal)
                if not ready and queued:
                    shards = self.all_shards    # own shards are empty: steal
                    ready, _ = await self._claim(conn, shards, taken, carried, limit)
                if not ready:
                    break
                taken.extend(t["id"] for t in ready)
                steps = []
                for task in ready:
                    if task["instance_status"] != "running":
                        stale.append(task["id"])     # cancelled or ended: nobody waits for it
                        continue
                    claimed += 1
                    if self._runs_outside(task):
                        deferred.append((task, await self._lease(cur, task)))
                    else:
                        steps.append(task)
                outcomes, cut = await self._run_steps(conn, cur, steps, others_wait=bool(done))
                finished = [o for o in outcomes if o is not None]
                done += finished
                if finished:
                    ran, unlocked = await self._advance(
                        conn, cur, finished, carried, writes, deadline,
                        self.settings.executor_batch - claimed)
                    claimed += ran
                    mail += unlocked
                if cut:
                    break      # interrupted: it stays queued and runs on its own
            if done or stale:
                await writes.execute(q("tasks_complete_many"), {
                    "task_ids": [o.task["id"] for o in done] + stale,
                    "instance_ids": [o.task["instance_id"] for o in mail],
                    "node_ids": [o.task["node_id"] for o in mail],
                    "activations": [o.task["activation"] for o in mail],
                    "payloads": [o.payload for o in mail],
                })
                if mail:
                    await writes.execute("SELECT pg_notify('df_mailbox', '')")
                await self._commit(conn, writes)
            await self._round_trip(conn, [])     # nothing owed is left for the commit
        return claimed

    # -- claiming ---------------------------------------------------------------------------

    async def _claim(self, conn: psycopg.AsyncConnection[Any], shards: list[int],
                     taken: list[int], carried: set[str], limit: int, *,
                     steal: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` tasks, not those `taken` already nor those of the instances `carried`
        on in this batch: what the engine decided for those is not written yet (a task it
        dropped is still there). With `steal`, also whether any task is queued at all, in the
        same round trip: an idle executor then does not look over all shards for nothing."""
        claim = literal(q("tasks_claim"), {
            "shards": shards, "claimed": taken, "carried": sorted(carried), "limit": limit})
        results = await self._round_trip(conn, [claim, q("tasks_queued")] if steal else [claim])
        return results[0], steal and bool(results[1])

    @contextlib.asynccontextmanager
    async def _transaction(self, conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
        """A batch's transaction on the (autocommit) connection: BEGIN goes with its first
        round trip (`_round_trip`), COMMIT with its writes (`_commit`) or, without writes,
        at the end; an exception rolls it back. Two round trips fewer than psycopg's."""
        self.begin, self.unreleased = True, None
        try:
            yield
        except BaseException:
            self.begin = False
            await db.roll_back(conn)
            raise
        self.begin = False
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            await conn.execute("COMMIT")

    async def _commit(self, conn: psycopg.AsyncConnection[Any], writes: Literals) -> None:
        """A batch's writes and its COMMIT in one round trip (`_round_trip`: headed by the last
        step's EPILOGUE if it is still owed; a failure after it redoes the batch), planned as
        key look-ups (db.KEYED_PLANS: no step runs after them in this transaction)."""
        keyed = [f"SET LOCAL {name} = {value}" for name, value in db.KEYED_PLANS.items()]
        await self._round_trip(conn, [*keyed, *writes.pending, "COMMIT"])
        writes.pending = []

    def _writes(self, conn: psycopg.AsyncConnection[Any]) -> Literals:
        """Where a batch's writes wait for its COMMIT (`_commit`); those whose rows are
        wanted go at once, through `_round_trip`."""
        return Literals(lambda statements: self._round_trip(conn, statements))

    async def _round_trip(self, conn: psycopg.AsyncConnection[Any], statements: list[str], *,
                          settle: bool = True) -> list[list[dict[str, Any]]]:
        """Run `statements` (values as literals: `literal`) in one round trip, after the
        last step's EPILOGUE if it is still owed and `settle` (on the batch's connection `conn`;
        its BEGIN goes first when still to be sent); return each statement's rows.

        A step's clean-up thus travels with the runtime's next statement instead of costing
        a round trip of its own. Every statement of the batch after a step goes through
        here, or follows one that did, so the runtime never runs as the step's role.
        """
        head, owed = self._head() if settle else ([], False)
        text = ";\n".join(head + statements)
        if not text:
            return []
        try:
            results = await db.simple_query(conn, text)
        except Exception as exc:
            if owed:
                raise _Redo from exc
            raise
        return results[len(results) - len(statements):]

    def _head(self) -> tuple[list[str], bool]:
        """What must go before the batch's next statement: BEGIN, the last step's EPILOGUE,
        the release of the savepoints of pipelined steps known to have succeeded (each
        nested level would cost every later visibility check in the transaction), as far as
        they are still to be sent; and whether the EPILOGUE is among them."""
        owed = self.owed
        head = ["BEGIN"] * self.begin + EPILOGUE * owed
        if self.unreleased is not None:
            head.append(f"RELEASE SAVEPOINT {self.unreleased}")
        self.begin = self.owed = False
        self.unreleased = None
        return head, owed

    def _runs_outside(self, task: dict[str, Any]) -> bool:
        return task["kind"] != "sql" or (
            task["database"] is not None and task["database"] != self.database)

    # -- carrying instances on (the engine where the step ran) ---------------------------------

    async def _advance(self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any],
                       done: list[Outcome], carried: set[str], writes: Literals,
                       deadline: float, steps_left: int) -> tuple[int, list[Outcome]]:
        """Apply finished steps to their instances here, in this transaction, and run the SQL
        steps that follow at once; add what the engine decided to `writes`. Returns how many
        steps ran here, and the outcomes left for the mailbox.

        An instance is carried on when it can be locked at once (nobody else runs its actor),
        has no mail waiting (mail is older and goes first, through the dispatcher) and was not
        carried on earlier in this batch (its state here is in `writes`, not yet in the
        table). Its next steps in this database run here, each in its savepoint, while the
        batch's budget (`deadline`, `steps_left`) lasts; what they decide is written with the
        same code as the dispatcher's (``actors.py``). Everything commits together with the
        steps, so a crash redoes all of it. A cancel (df._cancel_family locks the instance
        row) waits for this commit; an instance cancelled before it is not running any more
        and is not locked here.
        """
        ids = sorted({o.task["instance_id"] for o in done} - carried)
        locked, loaded = await self._round_trip(conn, [    # the locks and the nodes
            literal(q("instances_lock_quiet"), {"ids": ids}),
            literal(q("nodes_load_many"), {"ids": ids})]) if ids else ([], [])
        rows = {r["id"]: r for r in locked}
        carried.update(rows)
        mail = [o for o in done if o.task["instance_id"] not in rows]
        if not rows:
            return 0, mail
        states = actors.states(list(rows.values()), loaded)
        now: datetime = next(iter(rows.values()))["now"]     # the database's clock
        effects, ran = await self._carry(
            conn, cur, rows, states, now, deadline, steps_left,
            [(o.task["instance_id"], self._apply_step(states, o, now))
             for o in done if o.task["instance_id"] in rows])
        await self.actors.write(writes, states, effects, rows, now)
        return ran, mail

    @staticmethod
    def _apply_step(states: dict[str, engine.InstanceState], outcome: Outcome,
                    at: datetime) -> list[engine.Effect]:
        """What the engine decides for the instance of a step that finished here."""
        task = outcome.task
        msg = actors.message_from_row({"kind": "step", "payload": outcome.payload,
                                       "node_id": task["node_id"],
                                       "activation": task["activation"]}, at)
        assert msg is not None
        return engine.transition(states[task["instance_id"]], msg)[1]

    async def _carry(self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any],
                     rows: dict[str, dict[str, Any]], states: dict[str, engine.InstanceState],
                     now: datetime, deadline: float, steps_left: int,
                     decided: list[tuple[str, list[engine.Effect]]]
                     ) -> tuple[list[tuple[str, engine.Effect]], int]:
        """Carry locked instances on from what the engine `decided` for them: the SQL steps
        that follow in this database run here at once, each in its savepoint, while the
        batch's budget (`deadline`, `steps_left`) lasts, and their outcomes go through the
        engine again. Returns the effects left to write (``actors.py``) and how many steps
        ran. A step that outlasts the budget is cut short and queued as a task (`_run_step`):
        a cancel waits for this transaction's commit, and a running step shows as running
        only once it is a task.

        Steps ahead: when one step runs, the steps that follow it whatever its result
        (`engine.steps_ahead`) go in its round trip, each after the one before. Each is kept
        when the engine, told the real outcome of the one before, issues exactly it; else it
        is rolled back with those after it (`_roll_back_to`) and the engine's own decision goes
        on as usual."""
        began = time.monotonic()
        effects: list[tuple[str, engine.Effect]] = []
        ran = 0
        ahead: list[tuple[engine.RunStep, Outcome]] = []   # run before they were decided
        while decided or ahead:     # a step ahead is kept or rolled back before the end
            runnable: list[tuple[str, engine.RunStep]] = []
            for iid, out in decided:
                # Rows to drop go first: a step that stores rows again must follow the write.
                drops = any(isinstance(e, engine.DropRows) for e in out)
                for e in out:
                    if isinstance(e, engine.RunStep) and not drops and \
                            self._runs_here(e, rows[iid]):
                        runnable.append((iid, e))
                    else:
                        effects.append((iid, e))
            finished: list[Outcome] = []
            if ahead:
                step, early = ahead.pop(0)
                if runnable == [(early.task["instance_id"], step)]:
                    runnable, ran = [], ran + 1
                    finished.append(early)
                else:
                    if early.savepoint is not None:     # a failed step is undone already
                        await self._roll_back_to(conn, early.savepoint)
                    ahead = []
            now_run = runnable[:steps_left] if time.monotonic() < deadline else []
            lookahead = self._steps_ahead(rows, states, now_run, now, steps_left)
            outcomes, cut = await self._run_ahead(
                conn, cur, [_inline_task(rows[iid], e) for iid, e in now_run],
                [{**_inline_task(rows[now_run[0][0]], e), "ahead": True} for e in lookahead])
            ran += len(now_run)
            steps_left = 0 if cut else steps_left - len(now_run) - len(lookahead)
            for (iid, e), outcome in itertools.zip_longest(runnable, outcomes[:len(now_run)]):
                if outcome is None:
                    effects.append((iid, e))     # queued as a task after all
                else:
                    finished.append(outcome)
            ahead += [(e, o) for e, o in zip(lookahead, outcomes[len(now_run):], strict=False)
                      if o is not None]
            at = now + timedelta(seconds=time.monotonic() - began)
            decided = [(o.task["instance_id"], self._apply_step(states, o, at))
                       for o in finished]
        return effects, ran

    def _steps_ahead(self, rows: dict[str, dict[str, Any]],
                     states: dict[str, engine.InstanceState],
                     now_run: list[tuple[str, engine.RunStep]], now: datetime,
                     steps_left: int) -> list[engine.RunStep]:
        """The steps to run ahead of a lone step's outcome (`_carry`): those that follow it in
        this database, within the budget; none where its steps cannot share a round trip
        (`_pipelinable`: a role not trusted, or after a redone batch)."""
        if len(now_run) != 1 or self.eager or rows[now_run[0][0]]["role"] not in self.trusted:
            return []
        iid, step = now_run[0]
        return list(itertools.takewhile(
            lambda e: self._runs_here(e, rows[iid]),
            engine.steps_ahead(states[iid], step, now, steps_left - 1)))

    async def _run_ahead(self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any],
                         tasks: list[dict[str, Any]], ahead: list[dict[str, Any]]
                         ) -> tuple[list[Outcome | None], bool]:
        """Run `tasks` (`_run_steps`) or, with steps `ahead` of a lone task, as many of them
        as can share its round trip, in one pipeline: the outcomes of the task and of the steps
        ahead that ran, up to the first that failed, and whether the batch was cut short."""
        group = self._pipelinable(conn, tasks + ahead) if ahead else []
        if len(group) > 1:
            return await self._run_pipelined(conn, cur, group, others_wait=True)
        return await self._run_steps(conn, cur, tasks, others_wait=True)

    def _runs_here(self, step: engine.RunStep, instance: dict[str, Any]) -> bool:
        return step.kind == "sql" and instance["database"] in (None, self.database)

    # -- in-transaction steps (exactly once) ---------------------------------------------------

    async def _run_steps(self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any],
                         tasks: list[dict[str, Any]], *, others_wait: bool
                         ) -> tuple[list[Outcome | None], bool]:
        """Run `tasks` (SQL steps in this database), in order, each in its savepoint; return
        their outcomes (None: it runs again later, or did not run) and whether the batch was
        cut short (then the rest did not run).

        Steps that can share a round trip (`_pipelinable`) run pipelined (`_run_pipelined`);
        the others one by one (`_run_step`). A step whose instance a cancel was asked for
        during this call does not run.
        """
        outcomes: list[Outcome | None] = []
        asked: list[tuple[str, str]] = []
        cut = False
        while len(outcomes) < len(tasks) and not cut:
            rest = tasks[len(outcomes):]
            if _asked(rest[0], asked):
                outcomes.append(None)
                continue
            group = self._pipelinable(conn, rest)
            waiting = others_wait or any(outcomes)
            if group:
                got, cut = await self._run_pipelined(conn, cur, group, others_wait=waiting)
            else:
                outcome, cut = await self._run_step(conn, cur, rest[0], others_wait=waiting)
                got = [outcome]
            outcomes += got
            asked += self.cancels
        return outcomes + [None] * (len(tasks) - len(outcomes)), cut

    def _pipelinable(self, conn: psycopg.AsyncConnection[Any], tasks: list[dict[str, Any]]
                     ) -> list[tuple[dict[str, Any], refs.BoundSql]]:
        """The longest run of `tasks`, from the first, that may share one round trip, each
        with its bound statement: steps of a role found trusted when it was last looked up
        (its statement runs directly, `_enter_step`; `_as_trusted_submitter` checks that it
        still is), without a time-out of their own (one is told from a cancel by when its
        step started) and with a statement that binds. Not after a redone batch (`eager`).
        The others run on their own (`_run_step`), which also reports their errors."""
        group: list[tuple[dict[str, Any], refs.BoundSql]] = []
        if self.eager:
            return group
        for task in tasks:
            payload = task["payload"]
            if task["role"] not in self.trusted or step_timeout(payload) is not None:
                break
            try:
                sql_step.check_not_transaction_control(payload["query"])
                bound = sql_step.bind(conn, payload["query"], payload.get("results", {}))
            except StepError:
                break
            group.append((task, bound))
        return group

    async def _run_pipelined(self, conn: psycopg.AsyncConnection[Any],
                             cur: psycopg.AsyncCursor[Any],
                             group: list[tuple[dict[str, Any], refs.BoundSql]], *,
                             others_wait: bool) -> tuple[list[Outcome | None], bool]:
        """Run the steps of `group` in one round trip (``db.pipelined``); return the outcomes
        of those that ran, in order, and whether the batch was cut short.

        Each step is: SAVEPOINT (a name of its own), `_as_trusted_submitter` (or, once the
        role is checked in this batch, `_as_submitter`), the statement, PIPELINED_AFTER_STEP.
        Its savepoint is not released in this round trip: when step k fails, in the database
        (the steps after it did not run: the transaction was aborted) or once its rows are
        read (an unsupported type, a result too large: the steps after it did run), ROLLBACK
        TO its savepoint undoes it and all that came after; the outcomes returned end with
        k's, and the caller runs the rest again. The savepoints of the steps kept are released
        with the next round trip (`_head`). A statement error is the step's error, as in
        `run_sql`; one that only running the step alone can deal with (RUN_ALONE, or setting
        its role) sends it to `_run_step`; an error after it fails the step, as
        `_epilogue_now` does. Nothing of a step is kept unless it and its clean-up succeeded.

        Headed by BEGIN and the last step's EPILOGUE when they are still owed (an error there
        redoes the batch, as in `_round_trip`). When others wait for this batch, the round
        trip is cut short after `batch_budget`, as a single step is (`_run_step`).
        """
        head, owed = self._head()
        statements = [db.Statement(text.encode()) for text in head]
        names = []
        checked = {role for (role, own), known in self.roles.items() if own and known[0]}
        for task, bound in group:
            # A role's first step in the batch checks that it is still trusted (a failed
            # check aborts the rest); the look-up then holds for the batch, as `_enter_step`'s.
            names.append(f"df_step_{next(self.savepoints)}")
            role = db.Statement((_as_submitter(task) if task["role"] in checked
                                 else _as_trusted_submitter(task)).encode())
            checked.add(task["role"])
            statements += [db.Statement(f"SAVEPOINT {names[-1]}".encode()), role,
                           sql_step.statement(conn, bound), *PIPELINED_AFTER_STEP]
        self.current, self.cancels = [task for task, _ in group], []
        started = time.monotonic()
        try:
            async with self._budget(others_wait):
                results = await db.pipelined(conn, statements)
        finally:
            self.current = []
        cut = await self._was_cut()
        share = (time.monotonic() - started) / len(group)   # each step's part of the time
        encoding = conn.info.encoding
        failed = next((i for i, r in enumerate(results)
                       if r.status == pq.ExecStatus.FATAL_ERROR), len(results))
        error = None if failed == len(results) else psycopg.errors.error_from_result(
            results[failed], encoding=encoding)
        if error is not None:
            if failed < len(head) and owed:
                raise _Redo from error
            if failed < len(head) or (failed - len(head)) % STEP_STATEMENTS == 0 or \
                    sql_step.session_lost(conn, error):
                raise error        # BEGIN, a SAVEPOINT, the connection: the batch fails
        outcomes: list[Outcome | None] = []
        for k, (task, _) in enumerate(group):
            first = len(head) + k * STEP_STATEMENTS
            begun = started + k * share
            if failed >= first + STEP_STATEMENTS:     # it and its clean-up succeeded
                key = (task["role"], True)
                if key not in self.roles:                     # _as_trusted_submitter's
                    self.roles[key] = (True, None, None, results[first + 1].get_value(0, 0))
                limit = self.roles[key][3]                    # max_result_bytes
                metrics.step_started("sql")
                try:
                    result = await sql_step.encode(conn, results[first + 2])
                    self._check_result_size(result, int(limit) if limit else None)
                except StepError as exc:
                    await self._undo_step(conn, names, k)
                    outcomes.append(self._outcome(task, error=exc, started=begun))
                    return outcomes, False
                kept = self._outcome(task, result=result, started=begun)
                kept.savepoint = names[k]
                outcomes.append(kept)
                continue
            assert error is not None
            await self._undo_step(conn, names, k)
            outcome, cut = await self._pipelined_failure(
                conn, cur, task, failed - first, error, begun, cut=cut, others_wait=others_wait)
            outcomes.append(outcome)
            return outcomes, cut
        self.unreleased = names[0]
        return outcomes, False

    async def _pipelined_failure(self, conn: psycopg.AsyncConnection[Any],
                                 cur: psycopg.AsyncCursor[Any], task: dict[str, Any], at: int,
                                 error: psycopg.Error, started: float, *, cut: bool,
                                 others_wait: bool) -> tuple[Outcome | None, bool]:
        """The outcome of a pipelined step whose statement `at` (its SAVEPOINT is 0, its own
        statement 2) failed with `error`, once it has been rolled back; and whether the batch
        was cut short. As `_run_step`, or by it; but a step run ahead of its predecessor's
        outcome (`_carry`) is not run alone (it could not be rolled back once run so): it runs
        once the engine issues it."""
        if isinstance(error, psycopg.errors.QueryCanceled):   # wherever the cancel landed
            metrics.step_started("sql")
            outcome = self._cancelled(task, cancelled(error), started, cut=cut)
            return outcome, cut and outcome is None
        if at == 1 or (at == 2 and error.sqlstate in RUN_ALONE):
            if task.get("ahead"):
                return None, False
            return await self._run_step(conn, cur, task, others_wait=others_wait)
        metrics.step_started("sql")                           # as run_sql, _epilogue_now
        return self._outcome(task, error=sql_step.step_error(error, retryable=at == 2),
                             started=started), False

    async def _undo_step(self, conn: psycopg.AsyncConnection[Any], savepoints: list[str],
                         k: int) -> None:
        """Roll the pipelined step k back, with every step pipelined after it; the steps
        before it are kept (their savepoints released with the next round trip)."""
        await self._roll_back_to(conn, savepoints[k])
        if k:
            self.unreleased = savepoints[0]

    async def _run_step(self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any],
                        task: dict[str, Any], *, others_wait: bool) -> tuple[Outcome | None, bool]:
        """Run `task` in its savepoint; return its outcome (None: it runs again later) and
        whether the batch was cut short.

        When others wait for this batch's commit, a step that runs longer than
        `batch_budget` is interrupted and rolled back to its savepoint, so that it does not
        hold them; it runs again as the first step of a batch of its own.
        """
        async with self._budget(others_wait):
            outcome = await self._run_in_savepoint(conn, cur, task)
        return outcome, await self._was_cut() and outcome is None

    @contextlib.asynccontextmanager
    async def _budget(self, others_wait: bool) -> AsyncIterator[None]:
        """While others wait for this batch's commit, the statement running after
        `batch_budget` is cancelled (`_cut_batch`)."""
        timer = asyncio.get_running_loop().call_later(
            self.settings.batch_budget, self._cut_batch) if others_wait else None
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()

    async def _was_cut(self) -> bool:
        """Was the batch cut short (`_budget`)? Clears the mark once the cancel is sent."""
        if not self.batch_cut:
            return False
        self.batch_cut = False
        if self.cut_request is not None:
            await self.cut_request
            self.cut_request = None
        return True


    async def _run_in_savepoint(self, conn: psycopg.AsyncConnection[Any],
                                cur: psycopg.AsyncCursor[Any],
                                task: dict[str, Any]) -> Outcome | None:
        payload = task["payload"]
        timeout = step_timeout(payload)
        self.current, self.cancels = [task], []
        started = time.monotonic()
        metrics.step_started(task["kind"])
        try:
            sql_step.check_not_transaction_control(payload["query"])
            try:
                # Two round trips: the last step's EPILOGUE, savepoint, role and limits; the
                # statement. This step's EPILOGUE goes with the runtime's next statement
                # (docs/architecture.md, "exactly once").
                step = await self._enter_step(conn, task, savepoint=True, timeout=timeout,
                                              settle=True)
                if step.function is None:
                    result = await sql_step.run_sql(conn, payload["query"],
                                                    payload.get("results", {}))
                else:
                    result = await sql_step.run_sql_confined(
                        conn, payload["query"], payload.get("results", {}), step.function)
                self._check_result_size(result, step.max_result_bytes)
                if self.eager:
                    await self._epilogue_now(conn)
                else:
                    self.owed = True
            except _Redo:
                raise
            except BaseException as exc:
                if self.owed:   # the last step's savepoint is the open one: redo the batch
                    self.owed = False
                    raise _Redo from exc
                # Back to the savepoint; prepared statements, cursors WITH HOLD and session
                # locks are not transactional.
                if not conn.broken and not conn.closed and conn.info.transaction_status in (
                        pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
                    await self._roll_back_to(conn, STEP_SAVEPOINT)
                raise
            return self._outcome(task, result=result, started=started)
        except psycopg.errors.QueryCanceled as exc:
            return self._cancelled(task, cancelled(exc), started, timeout, cut=self.batch_cut)
        except StepError as exc:
            if exc.sqlstate == QUERY_CANCELED:
                return self._cancelled(task, exc, started, timeout, cut=self.batch_cut)
            if exc.sqlstate == NON_TRANSACTIONAL:
                if task["id"] is not None:    # a step run inline is queued, and marked then
                    await cur.execute(q("task_mark_autocommit"), {"id": task["id"]})
                return None
            return self._outcome(task, error=exc, started=started)
        finally:
            self.current = []

    def _cut_batch(self) -> None:
        conn = self.conn
        if not self.current or conn is None or conn.closed:
            return
        self.batch_cut = True
        self.cut_request = asyncio.create_task(conn.cancel_safe())

    def _cancelled(self, task: dict[str, Any], exc: StepError, started: float,
                   timeout: float | None = None, *, cut: bool) -> Outcome | None:
        """The outcome of a step whose statement was cancelled; `cut`: the batch was cut."""
        now = time.monotonic()
        verdict = cancel_verdict(asked=_asked(task, self.cancels), cut=cut, timeout=timeout,
                                 elapsed=now - started, since_our_cancel=now - self.cancel_sent_at,
                                 says_timeout=says_timeout(exc))
        if verdict == "rerun":
            return None
        error = timed_out(timeout) if verdict == "timeout" and timeout is not None else exc
        return self._outcome(task, error=error, started=started)

    async def _enter_step(self, conn: psycopg.AsyncConnection[Any], task: dict[str, Any],
                          *, own_database: bool = True, savepoint: bool = False,
                          timeout: float | None = None, settle: bool = False) -> _Step:
        """Take on the submitter's role; say how its statement must run (docs/security.md).

        A superuser submitter, or the runtime's own role, runs its statement directly under
        SET ROLE: there is nothing above it to escape to. Every other role's statement runs
        inside its step function, df_exec."step_<oid>", a SECURITY DEFINER function that role
        owns; the role stays set only so that parsing resolves names as the submitter.

        One round trip (`_round_trip`; with the last step's EPILOGUE when `settle`): the
        step's savepoint when asked for, the look-up (as the runtime; once per role and
        batch, `self.roles`), the role, the step's statement time-out.
        """
        key = (task["role"], own_database)
        known = self.roles.get(key)
        statements = [f"SAVEPOINT {STEP_SAVEPOINT}"] if savepoint else []
        if known is None:
            statements.append(literal(
                "SELECT r.rolsuper OR r.rolname = current_user AS trusted, r.oid AS role_oid,"
                "       pg_catalog.to_regprocedure(pg_catalog.format("
                "           'df_exec.%%I(text[], boolean)', 'step_' || r.oid))::pg_catalog.oid"
                "         AS function_oid, "
                + ("df._setting('max_result_bytes')" if own_database else "NULL::text") +
                " AS max_bytes FROM pg_catalog.pg_roles r WHERE r.rolname = %s", (task["role"],)))
        statements.append(_as_submitter(task))
        if timeout is not None:
            statements.append(literal(
                "SELECT pg_catalog.set_config('statement_timeout', %s::text, true)",
                (f"{max(1, round(timeout * 1000))}ms",)))
        try:
            results = await self._round_trip(conn, statements, settle=settle)
        except psycopg.errors.InvalidParameterValue as exc:   # SET ROLE to a dropped role
            raise StepError(
                f'SQL execution failed: role "{task["role"]}" does not exist') from exc
        if known is None:
            rows = results[1 if savepoint else 0]
            if not rows:
                raise StepError(f'SQL execution failed: role "{task["role"]}" does not exist')
            known = self.roles[key] = tuple(rows[0][k] for k in (
                "trusted", "role_oid", "function_oid", "max_bytes"))
        trusted, role_oid, function_oid, max_bytes = known
        if trusted and own_database:
            self.trusted.add(task["role"])
        else:
            self.trusted.discard(task["role"])
        limit = int(max_bytes) if max_bytes else None
        if trusted:
            return _Step(None, limit)
        if function_oid is None:
            raise StepError(
                f'SQL execution failed: role "{task["role"]}" has no step function; an '
                f"administrator must run df.grant_usage('{task['role']}') again")
        return _Step(f'df_exec."step_{int(role_oid)}"', limit)

    @staticmethod
    async def _epilogue_now(conn: psycopg.AsyncConnection[Any]) -> None:
        """The step's EPILOGUE in a round trip of its own (after a redone batch); a clean-up
        that fails (say, DISCARD TEMP under a cursor the step left open) fails the step."""
        try:
            await conn.execute("; ".join(EPILOGUE))
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            if db.needs_reconnect(exc, conn):
                raise
            raise sql_step.step_error(exc, retryable=False) from exc

    async def _roll_back_to(self, conn: psycopg.AsyncConnection[Any], savepoint: str) -> None:
        """Undo a step: back to its savepoint (and gone with it), then CLEANUP."""
        await self._cleanup(conn, f"ROLLBACK TO SAVEPOINT {savepoint};"
                                  f" RELEASE SAVEPOINT {savepoint}")

    async def _cleanup(self, conn: psycopg.AsyncConnection[Any], first: str = "") -> None:
        """Run `first`, then undo what a step may leave in the session, in one round trip
        (RESET ALL returns to the connection's own options, given at connection start)."""
        await conn.execute((f"{first}; " if first else "") + sql_step.CLEANUP)

    @staticmethod
    def _check_result_size(result: Any, limit: int | None) -> None:
        if limit is None:
            return
        size = len(orjson.dumps(result))
        if size > limit:
            raise StepError(
                f"SQL execution failed: the result is {size} bytes of JSON; the maximum is "
                f"{limit} (max_result_bytes in df.settings)")

    def _outcome(self, task: dict[str, Any], *, started: float, result: Any = None,
                 error: StepError | None = None) -> Outcome:
        elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        metrics.step_finished(task["kind"], error is None, elapsed_ms / 1000)
        body: dict[str, Any]
        if error is None:
            self.log.debug("step_completed", instance_id=task["instance_id"],
                           node_id=task["node_id"], step_type=task["kind"],
                           duration_ms=elapsed_ms)
            body = {"result": result}
            if isinstance(result, dict) and result.get("status") in (429, 503):
                headers = result.get("headers")
                after = http_step.retry_after_seconds(
                    headers.get("retry-after") if isinstance(headers, dict) else None)
                if after is not None:
                    body["retry_after"] = after
        else:
            self.log.info("step_failed", instance_id=task["instance_id"],
                          node_id=task["node_id"], step_type=task["kind"],
                          duration_ms=elapsed_ms, error=str(error), sqlstate=error.sqlstate)
            body = {"error": str(error), "sqlstate": error.sqlstate,
                    "retryable": error.retryable, "http_status": error.http_status,
                    "error_class": error.error_class, "retry_after": error.retry_after}
            body = {k: v for k, v in body.items() if v is not None}
        attempt = task["payload"].get("attempt")
        if attempt is not None:
            body["attempt"] = attempt
        return Outcome(task, orjson.dumps(body).decode())

    # -- leased steps (at least once) --------------------------------------------------------

    async def _lease(self, cur: psycopg.AsyncCursor[Any], task: dict[str, Any]) -> int:
        seconds = self.settings.lease_seconds
        if task["kind"] == "http":   # the call may take its whole time-out
            seconds = max(seconds, http_step.timeout_of(task["payload"]) + http_step.LEASE_MARGIN)
        (rows,) = await self._round_trip(cur.connection, [literal(
            q("task_lease"),
            {"id": task["id"], "worker": self.worker_id, "seconds": seconds})])
        return int(rows[0]["lease_token"]) if rows else 0

    async def _run_leased(self, conn: psycopg.AsyncConnection[Any], task: dict[str, Any],
                          token: int) -> None:
        started = time.monotonic()
        metrics.step_started(task["kind"])
        try:
            result = await self._run_outside(task)
            outcome = self._outcome(task, result=result, started=started)
        except StepError as exc:
            outcome = self._outcome(task, error=exc, started=started)
        await self._complete_leased(conn, outcome, token)

    async def _complete_leased(self, conn: psycopg.AsyncConnection[Any], outcome: Outcome,
                               token: int) -> None:
        async with conn.transaction():
            await conn.execute(q("task_complete_leased"), {
                "id": outcome.task["id"], "token": token, "payload": outcome.payload})
            await conn.execute("SELECT pg_notify('df_mailbox', '')")

    async def _run_http_many(self, conn: psycopg.AsyncConnection[Any],
                             leased: list[tuple[dict[str, Any], int]]) -> None:
        """Read each step's policy, make the calls concurrently, then complete them."""
        if not leased:
            return
        policies: list[http_step.Policy | StepError] = []
        async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            for task, _ in leased:
                function = http_step.FUNCTIONS.get(task["payload"].get("node_type"),
                                                   http_step.FUNCTIONS["HTTP"])
                await cur.execute(q("http_policy_get"),
                                  {"function": function, "role": task["role"]})
                try:
                    policies.append(http_step.Policy.from_row(await cur.fetchone()))
                except StepError as exc:
                    policies.append(exc)
        outcomes = await asyncio.gather(*(self._call_http(task, policy) for (task, _), policy
                                          in zip(leased, policies, strict=True)))
        for outcome, (_, token) in zip(outcomes, leased, strict=True):
            await self._complete_leased(conn, outcome, token)

    async def _call_http(self, task: dict[str, Any],
                         policy: http_step.Policy | StepError) -> Outcome:
        started = time.monotonic()
        try:
            if isinstance(policy, StepError):
                raise policy
            result = await self.http.call(task, policy)
            return self._outcome(task, result=result, started=started)
        except StepError as exc:
            return self._outcome(task, error=exc, started=started)
        except Exception as exc:    # a fault of ours must fail the step, not the batch
            self.log.exception("http_step_crashed", instance_id=task["instance_id"],
                               node_id=task["node_id"])
            return self._outcome(task, error=StepError(f"HTTP request failed: {exc!r}"),
                                 started=started)

    async def _run_outside(self, task: dict[str, Any]) -> Any:
        dsn = self.dsn
        if task["database"] and task["database"] != self.database:
            dsn = make_conninfo(self.dsn, dbname=task["database"])
        payload = task["payload"]
        timeout = step_timeout(payload)
        started = time.monotonic()
        try:
            async with await db.connect(dsn, role="executor step", autocommit=True) as other:
                await other.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    ("0" if timeout is None else f"{max(1, round(timeout * 1000))}ms",))
                return await self._run_sql_outside(other, task, payload)
        except psycopg.Error as exc:
            if timeout is not None and isinstance(exc, psycopg.errors.QueryCanceled) and \
                    cancel_verdict(asked=False, cut=False, timeout=timeout,
                                   elapsed=time.monotonic() - started, since_our_cancel=math.inf,
                                   says_timeout=says_timeout(exc)) == "timeout":
                raise timed_out(timeout) from exc
            # A connection that failed or broke is transient, as are 40001 and 40P01.
            transient = (exc.sqlstate or "").startswith("08") or exc.sqlstate in (
                "40001", "40P01") or (exc.sqlstate is None and isinstance(
                    exc, psycopg.OperationalError))
            raise StepError(f"SQL execution failed: {str(exc).strip()}",
                            sqlstate=exc.sqlstate, retryable=transient) from exc

    async def _run_sql_outside(self, other: psycopg.AsyncConnection[Any], task: dict[str, Any],
                               payload: dict[str, Any]) -> Any:
        """A step on its own connection (closed afterwards), confined as in its own database.

        Statements that cannot run in a transaction block cannot run inside a function
        either: for roles that are not trusted (see `_enter_step`) only the maintenance
        statements in `sql_step.OUTSIDE_STATEMENTS` run, under SET ROLE. They run user code
        only as a table owner in a security-restricted operation, where SET ROLE is refused.
        """
        results = payload.get("results", {})
        if task["kind"] == "sql_autocommit":
            async with other.transaction():
                step = await self._enter_step(other, task, own_database=False)
            if step.function is not None and not sql_step.runs_outside(payload["query"]):
                raise StepError(
                    "SQL execution failed: this statement cannot run inside a transaction "
                    "block, and for roles that are not superusers only "
                    f"{sql_step.OUTSIDE_STATEMENTS_TEXT} run outside one")
            await other.execute(
                "SELECT set_config('df.instance_id', %s, false),"
                " CASE WHEN %s::text IS DISTINCT FROM current_user"
                "      THEN set_config('role', %s, false) END",
                (task["instance_id"], task["role"], task["role"]))
            return await sql_step.run_sql(other, payload["query"], results)
        async with other.transaction():
            step = await self._enter_step(other, task, own_database=False)
            if step.function is None:
                result = await sql_step.run_sql(other, payload["query"], results)
            else:
                result = await sql_step.run_sql_confined(other, payload["query"], results,
                                                         step.function)
            await other.execute(sql_step.CLEANUP)
        return result

    # -- cancellation ----------------------------------------------------------------------

    async def _watch_cancels(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:   # woken by the listener: no polling while idle
                await asyncio.wait_for(self.listener.payload_ready.wait(), 1.0)
            except TimeoutError:
                continue
            self.listener.payload_ready.clear()
            for channel, payload in self.listener.take_payloads():
                if channel != "df_cancel" or not payload:
                    continue
                instance, _, node = payload.partition(" ")
                hit = [t for t in self.current if _asked(t, [(instance, node)])]
                if hit:
                    self.cancels.append((instance, node))
                    self.cancel_sent_at = time.monotonic()
                    conn = self.conn
                    if conn is not None and not conn.closed:
                        self.log.info("step_cancel_requested", instance_id=instance,
                                      node_id=hit[0]["node_id"])
                        await conn.cancel_safe()
