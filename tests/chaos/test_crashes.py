"""Crashes: executors killed with SIGKILL mid-step, and PostgreSQL restarted mid-run.

The check is a ledger: every step increments its instance's counter, so after the storm
each counter must equal the number of steps — no step lost, none run twice.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import psycopg

from durable_actor import schema
from durable_actor.embedded import EmbeddedServer
from tests.helpers import until_sync
from tests.runtime import Runtime, kill

STEP = ("$$WITH up AS (INSERT INTO ledger (instance_id, n) VALUES ('{sys_instance_id}', 1)"
        " ON CONFLICT (instance_id) DO UPDATE SET n = ledger.n + 1 RETURNING n)"
        " SELECT n, pg_sleep(0.005) FROM up$$")
WORKFLOW = f"{STEP} ~> {STEP} ~> {STEP}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_many(dsn: str, n: int) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS ledger (instance_id text PRIMARY KEY, n int)")
        return [str(c.execute(f"SELECT df.start({WORKFLOW})").fetchone()[0])  # type: ignore[index]
                for _ in range(n)]


def _unfinished(dsn: str, ids: list[str]) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM df.instances WHERE id = ANY(%s)"
                        " AND status NOT IN ('completed', 'failed', 'cancelled')", (ids,)).fetchone()
        return int(row[0]) if row else -1


def _check_ledger(dsn: str, ids: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        statuses = dict(c.execute("SELECT status, count(*) FROM df.instances WHERE id = ANY(%s)"
                                  " GROUP BY 1", (ids,)).fetchall())
        assert statuses == {"completed": len(ids)}
        counts = dict(c.execute("SELECT instance_id, n FROM ledger WHERE instance_id = ANY(%s)",
                                (ids,)).fetchall())
    assert len(counts) == len(ids)
    wrong = {k: v for k, v in counts.items() if v != 3}
    assert wrong == {}, f"steps not run exactly once: {wrong}"


def test_sigkill_executors_mid_step_loses_and_repeats_nothing(fresh_dsn: str) -> None:
    rng = random.Random(7)
    with Runtime(fresh_dsn, executors=2) as rt:
        ids = _start_many(fresh_dsn, 240)
        kills = 0
        deadline = time.monotonic() + 90
        while _unfinished(fresh_dsn, ids) and time.monotonic() < deadline:
            victims = [p for p in rt.pids("executor") if _alive(p)]
            if victims and kills < 12:
                kill(rng.choice(victims))
                kills += 1
            time.sleep(rng.uniform(0.2, 0.6))   # pace of the storm, not a wait for a result
        until_sync(lambda: _unfinished(fresh_dsn, ids) == 0, timeout=30)
        assert kills >= 3
        assert "child_restarted" in rt.log()
    _check_ledger(fresh_dsn, ids)


def test_postgres_immediate_restart_mid_run() -> None:
    """Uses a server of its own: the suite's server may be one we must not restart."""
    tmp = Path(tempfile.mkdtemp(prefix="da-restart-"))
    server = EmbeddedServer(tmp / "pgdata", delete_on_stop=True)
    dsn = server.start()
    try:
        schema.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("UPDATE df.settings SET value = 'true' WHERE name = 'enable_superuser_instances'")
        with Runtime(dsn, executors=2) as rt:
            ids = _start_many(dsn, 60)
            until_sync(lambda: _unfinished(dsn, ids) < 60, timeout=20)
            server.restart("immediate")
            until_sync(lambda: _unfinished(dsn, ids) == 0, timeout=60)
            assert "db_error_retrying" in rt.log() or "listen_reconnect" in rt.log()
        _check_ledger(dsn, ids)
    finally:
        server.stop()

