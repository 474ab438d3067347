"""Graceful drain: SIGTERM while a step runs.

A step writes a ledger row (primary key: instance, step) and then sleeps, so a step that ran
twice would fail its instance, and a step that was rolled back leaves no row.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg

from tests.helpers import until_sync
from tests.runtime import Runtime


def _step(n: int, sleep: float) -> str:
    return (f"$$WITH i AS (INSERT INTO ledger VALUES ('{{sys_instance_id}}', {n}) RETURNING 1)"
            f" SELECT pg_sleep({sleep}) FROM i$$")


def _setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE ledger"
                  " (instance_id text, step int, PRIMARY KEY (instance_id, step))")


def _start(dsn: str, graph: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT df.start({graph})").fetchone()
    assert row is not None
    return str(row[0])


def _one(dsn: str, query: str, *args: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(query, args).fetchone()  # type: ignore[arg-type]
    return row[0] if row else None


def _sleeping(dsn: str) -> bool:
    return bool(_one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                     " AND application_name = 'durable-actor executor' AND state = 'active'"
                     " AND query LIKE '%%pg_sleep%%'"))


def _ledger(dsn: str, iid: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [r[0] for r in c.execute(
            "SELECT step FROM ledger WHERE instance_id = %s ORDER BY step", (iid,))]


def _status(dsn: str, iid: str) -> str:
    return str(_one(dsn, "SELECT status FROM df.instances WHERE id = %s", iid))


def test_in_flight_step_finishes_and_commits_within_the_grace_period(fresh_dsn: str) -> None:
    _setup(fresh_dsn)
    rt = Runtime(fresh_dsn, executors=2, grace_period=15.0).start()
    try:
        a = _start(fresh_dsn, f"{_step(1, 2)} ~> {_step(2, 0)}")
        until_sync(lambda: _sleeping(fresh_dsn), timeout=15)
        assert rt.proc is not None
        stopped_at = time.monotonic()
        rt.proc.send_signal(signal.SIGTERM)
        until_sync(lambda: "supervisor_draining" in rt.log(), timeout=5)
        b = _start(fresh_dsn, _step(1, 0))           # arrives during the drain
        assert rt.proc.wait(15) == 0
        took = time.monotonic() - stopped_at
        assert took < 10, took                        # the step's 2 s, not the 15 s grace
        assert "supervisor_killed_children" not in rt.log()
        assert _ledger(fresh_dsn, a) == [1]           # committed, not rolled back
        # the finished step's task went with its commit (the next one may be queued)
        assert _one(fresh_dsn, "SELECT count(*) FROM df.tasks WHERE instance_id = %s"
                    " AND node_id = (SELECT id FROM df.nodes WHERE instance_id = %s"
                    " AND node_type = 'SQL' ORDER BY position LIMIT 1)", a, a) == 0
        assert _ledger(fresh_dsn, b) == []            # nothing new was claimed
        assert _ledger(fresh_dsn, a) == [1]
    finally:
        rt.__exit__(None, None, None)
    with Runtime(fresh_dsn, executors=2):
        until_sync(lambda: _status(fresh_dsn, a) == "completed" == _status(fresh_dsn, b),
                   timeout=20)
    assert _ledger(fresh_dsn, a) == [1, 2]            # step 1 ran once
    assert _ledger(fresh_dsn, b) == [1]


def test_step_longer_than_the_grace_period_is_redone_elsewhere(fresh_dsn: str) -> None:
    _setup(fresh_dsn)
    rt = Runtime(fresh_dsn, executors=1, grace_period=1.0).start()
    try:
        a = _start(fresh_dsn, _step(1, 4))
        until_sync(lambda: _sleeping(fresh_dsn), timeout=15)
        assert rt.proc is not None
        stopped_at = time.monotonic()
        rt.proc.send_signal(signal.SIGTERM)
        assert rt.proc.wait(10) == 0
        took = time.monotonic() - stopped_at
        assert 0.9 < took < 3.5, took                 # the grace period, then SIGKILL
        assert "supervisor_killed_children" in rt.log()
    finally:
        rt.__exit__(None, None, None)
    # The killed step's transaction rolls back (the server notices the dead client).
    until_sync(lambda: not _sleeping(fresh_dsn), timeout=10)
    assert _ledger(fresh_dsn, a) == []
    with Runtime(fresh_dsn, executors=1):            # "another supervisor"
        until_sync(lambda: _status(fresh_dsn, a) == "completed", timeout=20)
    assert _ledger(fresh_dsn, a) == [1]


def test_second_sigterm_stops_at_once(fresh_dsn: str) -> None:
    _setup(fresh_dsn)
    rt = Runtime(fresh_dsn, executors=1, grace_period=60.0).start()
    try:
        _start(fresh_dsn, _step(1, 60))
        until_sync(lambda: _sleeping(fresh_dsn), timeout=15)
        assert rt.proc is not None
        rt.proc.send_signal(signal.SIGTERM)
        until_sync(lambda: "supervisor_draining" in rt.log(), timeout=5)
        assert rt.proc.poll() is None                 # still draining: the step runs
        stopped_at = time.monotonic()
        rt.proc.send_signal(signal.SIGTERM)
        assert rt.proc.wait(20) == 0
        assert time.monotonic() - stopped_at < 15     # not the 60 s grace (a loaded VM is slow)
        assert "supervisor_killed_children" in rt.log()
    finally:
        rt.__exit__(None, None, None)
