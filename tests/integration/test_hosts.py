"""Several hosts: two supervisors on one database share the work, never run a step twice, and
the survivor finishes everything when the other's whole process group is killed with SIGKILL.

Each step writes a ledger row whose primary key is (instance, step): a step that ran twice
would fail on the key and fail its instance.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg

from tests.helpers import until_sync
from tests.runtime import Runtime

N = 80


def _step(n: int) -> str:
    return (f"$$WITH i AS (INSERT INTO ledger VALUES ('{{sys_instance_id}}', {n}) RETURNING 1)"
            f" SELECT pg_sleep(0.04) FROM i$$")


WORKFLOW = f"{_step(1)} ~> {_step(2)} ~> {_step(3)}"


def _unfinished(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM df.instances"
                        " WHERE status NOT IN ('completed', 'failed', 'cancelled')").fetchone()
    return int(row[0]) if row else -1


def test_two_supervisors_share_work_and_survive_a_host_loss(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE ledger"
                  " (instance_id text, step int, PRIMARY KEY (instance_id, step))")
        # A row left by a process that died long ago: the survivor's timer prunes it.
        c.execute("INSERT INTO df.workers (id, host, pid, role, last_seen_at)"
                  " VALUES ('gone:1:executor', 'gone', 1, 'executor', now() - interval '1 hour')")
    a = Runtime(fresh_dsn, executors=2, new_session=True, log_level="debug").start()
    b = Runtime(fresh_dsn, executors=2, new_session=True, log_level="debug",
                retention_interval=0.5).start()
    try:
        # df.workers lists both hosts' live processes (4 each), heartbeats advancing.
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            rows = c.execute("SELECT pid, role, host, last_seen_at FROM df.workers"
                             " WHERE host <> 'gone'").fetchall()
            assert {r[0] for r in rows} == a.children() | b.children()
            assert sorted(r[1] for r in rows) == ["dispatcher"] * 2 + ["executor"] * 4 + [
                "timer"] * 2
            first_seen = max(r[3] for r in rows)
            until_sync(lambda: c.execute("SELECT min(last_seen_at) FROM df.workers"
                                         " WHERE host <> 'gone'").fetchone()[0] > first_seen,
                       timeout=15, every=0.2)
            until_sync(lambda: c.execute("SELECT count(*) FROM df.workers WHERE host = 'gone'")
                       .fetchone() == (0,), timeout=10)
            ids = [str(c.execute(f"SELECT df.start({WORKFLOW})").fetchone()[0])  # type: ignore[index]
                   for _ in range(N)]
        # Both hosts execute steps.
        until_sync(lambda: '"step_completed"' in a.log() and '"step_completed"' in b.log(),
                   timeout=20)
        assert _unfinished(fresh_dsn) > 0, "finished before a host could be lost"
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL)        # the whole host: supervisor and children
        a.proc.wait(10)
        lost_at = time.monotonic()
        until_sync(lambda: _unfinished(fresh_dsn) == 0, timeout=30)
        assert time.monotonic() - lost_at < 20
    finally:
        if a.proc is not None and a.proc.poll() is None:
            os.killpg(a.proc.pid, signal.SIGKILL)
            a.proc.wait(10)
        a.log_path.unlink(missing_ok=True)
        b.__exit__(None, None, None)
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        statuses = dict(c.execute("SELECT status, count(*) FROM df.instances GROUP BY 1")
                        .fetchall())
        assert statuses == {"completed": N}
        steps = dict(c.execute("SELECT instance_id, count(*) FROM ledger GROUP BY 1").fetchall())
    assert steps == {i: 3 for i in ids}
