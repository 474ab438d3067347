"""Connections: opening them for a runtime role, LISTEN with reconnect, error classification.

NOTIFY is only a wake-up hint here: every loop also polls, so a lost notification (or a
LISTEN connection that died and came back) costs latency, never work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import orjson
import psycopg
import structlog
from psycopg import generators, pq, sql
from psycopg.abc import PQGen
from psycopg.adapt import Transformer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import set_json_loads
from psycopg.waiting import Ready, Wait

log = structlog.get_logger()

# SQLSTATE classes after which a connection should be thrown away and opened again.
_RECONNECT_CLASSES = ("08", "53", "57P")
# SQLSTATEs after which the transaction can simply be retried.
_RETRY_STATES = frozenset({"40001", "40P01"})


def is_transient(exc: BaseException) -> bool:
    """Errors that say nothing about the work itself: reconnect (or retry) and do it again."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not isinstance(
            exc, psycopg.errors.QueryCanceled):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return state in _RETRY_STATES or state.startswith(_RECONNECT_CLASSES)


def needs_reconnect(exc: BaseException, conn: psycopg.AsyncConnection[Any] | None) -> bool:
    if conn is None or conn.closed or conn.broken:
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith(_RECONNECT_CLASSES) or isinstance(exc, psycopg.InterfaceError)


async def roll_back(conn: psycopg.AsyncConnection[Any]) -> None:
    """End, after an error, a transaction that the runtime began with a BEGIN of its own (on
    an autocommit connection), where the session still has one; the error says what failed."""
    if not conn.closed and not conn.broken and \
            conn.info.transaction_status != pq.TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):
            await conn.execute("ROLLBACK")


async def simple_query(conn: psycopg.AsyncConnection[Any],
                       text: str) -> list[list[dict[str, Any]]]:
    """Run `text`, one or more statements with their values as literals, in one round trip
    of the simple query protocol; return each statement's rows as dicts (an empty list for
    a statement without rows). Raises the first statement's error that failed: the
    statements after it did not run.

    psycopg's cursor costs about as much Python again per round trip as this; the executor's
    and the dispatcher's own round trips go through here.
    """
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    async with conn.lock:
        pgconn.send_query(text.encode(encoding))
        results = await conn.wait(generators.execute(pgconn))
    out: list[list[dict[str, Any]]] = []
    loader = Transformer(conn)
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        if result.status != pq.ExecStatus.TUPLES_OK:
            out.append([])
            continue
        names = [(result.fname(i) or b"").decode(encoding) for i in range(result.nfields)]
        loader.set_pgresult(result)
        out.append(loader.load_rows(0, result.ntuples, _dict_row(names)))
    return out


class Statement(NamedTuple):
    """One statement of `pipelined`: text, parameters as text (with their type OIDs, 0 for
    unknown), and whether its rows come back in binary."""
    text: bytes
    values: Sequence[bytes | None] | None = None
    types: Sequence[int] | None = None
    binary: bool = False


async def pipelined(conn: psycopg.AsyncConnection[Any],
                    statements: Sequence[Statement]) -> list[pq.abc.PGresult]:
    """Run `statements` in one round trip of the extended query protocol (libpq's pipeline
    mode, one Sync at the end) and return one result for each, in order. An error does not
    raise: its statement's result is FATAL_ERROR and those after it PIPELINE_ABORTED (they did
    not run); inside a transaction block, the transaction is then aborted.

    Unlike a multi-statement simple query, each statement is sent on its own, so a result or
    an error belongs to exactly one statement, and one of them may take parameters.
    """
    pgconn = conn.pgconn
    queue: deque[Any] = deque(
        partial(pgconn.send_query_params, s.text, s.values,
                param_types=s.types, result_format=pq.Format.BINARY if s.binary
                else pq.Format.TEXT)
        for s in statements)
    queue.append(pgconn.pipeline_sync)
    async with conn.lock:
        pgconn.enter_pipeline_mode()
        try:
            results = await conn.wait(_send_and_read(pgconn, queue))
        except BaseException:
            try:
                pgconn.exit_pipeline_mode()
            except psycopg.OperationalError:
                pgconn.finish()    # interrupted with results unread: the session is lost
            raise
        pgconn.exit_pipeline_mode()
    return results[:-1]


def _send_and_read(pgconn: pq.abc.PGconn, queue: deque[Any]) -> PQGen[list[pq.abc.PGresult]]:
    """Queue the commands of a pipeline in libpq's output buffer and send them in one write
    (the socket permitting), reading what comes back meanwhile, then read on to the Sync's
    result: one write and one wait for the whole round trip. psycopg's
    `pipeline_communicate` flushes after every command, a system call each, and its
    `fetch_many` takes one wait per statement."""
    for send in queue:
        send()
    while pgconn.flush():       # the socket took part of it: the rest once it is writable
        if (yield Wait.RW) & Ready.R:
            pgconn.consume_input()   # what the server sent meanwhile, so that it never blocks
    results: list[pq.abc.PGresult] = []
    while not results or results[-1].status != pq.ExecStatus.PIPELINE_SYNC:
        while pgconn.is_busy():
            if (yield Wait.R):
                pgconn.consume_input()
        result = pgconn.get_result()
        if result is not None:             # None ends one statement's results
            results.append(result)
    return results


def _dict_row(names: list[str]) -> Any:
    return lambda values: dict(zip(names, values, strict=True))


# The runtime's statements look rows up by key, a batch at a time (unnest of the batch's ids,
# joined to a table by its primary key). Planned without statistics (fresh tables, or queue
# tables that change faster than autovacuum analyzes them), such a join became a hash join
# over a sequential scan of the whole table, or, without hash joins, a nested loop over one
# (a plan kept from when the table was tiny read all of it for every row of the batch). Set
# on connections that run no step of a user (the dispatcher's), for the executor's writes,
# after its steps (Executor._commit), and on the runtime's PL/pgSQL functions that look rows
# up (migrations 0017 and 0020).
KEYED_PLANS = {"enable_hashjoin": "off", "enable_mergejoin": "off", "enable_seqscan": "off"}


PREPARE_THRESHOLD = 2        # executions of a statement before it is prepared


async def connect(dsn: str, *, role: str, autocommit: bool = False,
                  options: dict[str, str] | None = None,
                  prepare: bool = False) -> psycopg.AsyncConnection[Any]:
    """Open a connection tagged with the runtime role (visible in pg_stat_activity).

    `options` are settings sent at connection start (libpq ``options``, after the DSN's own
    or PGOPTIONS), so they are the session's defaults: RESET ALL returns to them.

    With `prepare`, statements run often are prepared on the server (parsed and planned
    once). Only for connections that never run a user's statement: an executor's session
    drops every prepared statement after each step (CLEANUP).
    """
    if options:
        given = conninfo_to_dict(dsn).get("options") or os.environ.get("PGOPTIONS") or ""
        dsn = make_conninfo(dsn, options=" ".join(
            [str(given), *(f"-c {name}={value}" for name, value in options.items())]).strip())
    conn = await psycopg.AsyncConnection.connect(
        dsn, autocommit=autocommit, application_name=f"durable-actor {role}",
        prepare_threshold=PREPARE_THRESHOLD if prepare else None)
    set_json_loads(_json_loads, conn)
    return conn


def _json_loads(data: bytes | str) -> Any:
    """The runtime's own json and jsonb columns (a step's result has its own loaders): orjson,
    several times faster than the standard library, which psycopg uses by default; that
    one still for what orjson refuses (integers beyond 64 bits, numbers beyond a double)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class Backoff:
    """Exponential back-off with full jitter, for reconnect loops."""

    def __init__(self, first: float = 0.05, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


async def _notifications(conn: psycopg.AsyncConnection[Any]) -> Any:
    """Yield (channel, payload) of each notification on an otherwise unused connection.

    Waits for the socket to become readable (an event-loop reader) instead of
    ``conn.notifies()``, which wakes every 0.1 s to check for interrupts: that polling was
    most of an idle runtime's CPU. A closed or broken connection raises OperationalError
    from ``consume_input``.
    """
    loop = asyncio.get_running_loop()
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    readable = asyncio.Event()
    fd = pgconn.socket
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            pgconn.consume_input()
            while (note := pgconn.notifies()) is not None:
                yield note.relname.decode(encoding), note.extra.decode(encoding)
    finally:
        loop.remove_reader(fd)


class Listener:
    """A dedicated autocommit connection LISTENing on channels; sets `wake` on each notify.

    Reconnects with back-off when the connection dies and sets `wake` after each reconnect,
    so the owning loop polls once for anything it may have missed.
    """

    def __init__(self, dsn: str, channels: Iterable[str], *, role: str) -> None:
        self.dsn = dsn
        self.channels = tuple(channels)
        self.role = role
        self.wake = asyncio.Event()
        self.payloads: list[tuple[str, str]] = []
        self.keep_payloads = False
        self.payload_ready = asyncio.Event()   # set when a payload is kept

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, role=self.role + " listener", autocommit=True)
                for ch in self.channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
                backoff.reset()
                self.wake.set()
                async for channel, payload in _notifications(conn):
                    if self.keep_payloads:
                        self.payloads.append((channel, payload))
                        self.payload_ready.set()
                    self.wake.set()
            except asyncio.CancelledError:
                raise
            except psycopg.Error as exc:
                delay = backoff.next()
                log.warning("listen_reconnect", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
            finally:
                if conn is not None:
                    await conn.close()

    async def wait(self, timeout: float) -> None:
        """Wait for a notification or `timeout` seconds, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()

    def take_payloads(self) -> list[tuple[str, str]]:
        out, self.payloads = self.payloads, []
        return out
