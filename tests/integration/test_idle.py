"""bench/idle.py runs and reports the idle cost of a supervisor (a short smoke run; the real
figures come from a 10 s run, see bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Server

ROOT = Path(__file__).resolve().parents[2]


def test_idle_bench_prints_one_json_line(server: Server) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "idle.py"), "--dsn", server.dsn,
                           "--seconds", "1", "--warmup", "0", "--executors", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["processes"] == 4
    assert 0 <= figures["cpu_percent"] < 100
    assert figures["xacts_per_second"] >= 0   # the server flushes counts lazily: 1 s may show 0
    with server.admin() as c:
        left = c.execute("SELECT count(*) FROM pg_database"
                         " WHERE datname LIKE 'durable_actor_idle_%'").fetchone()
    assert left == (0,)                                # the scratch database is dropped


def test_backed_off_runtime_still_reacts_at_once(fresh_dsn: str) -> None:
    """Idle processes poll rarely, yet a NOTIFY wakes them: latency is not the poll interval."""
    import time

    import psycopg

    from tests.helpers import until_sync
    from tests.runtime import Runtime

    def last_poll_age() -> float:
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT min(extract(epoch FROM now() - query_start)) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND application_name IN ('durable-actor dispatcher', 'durable-actor executor')"
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    with Runtime(fresh_dsn, executors=1, poll_interval=0.1, idle_poll_interval=30.0):
        # Backed off: no dispatcher or executor query for 1.5 s (at 0.1 s polling: 15 of them).
        until_sync(lambda: last_poll_age() > 1.5, timeout=20, every=0.1)
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            started = time.monotonic()
            row = c.execute("SELECT df.start($$SELECT 1$$ ~> $$SELECT 2$$ ~> $$SELECT 3$$)"
                            ).fetchone()
            assert row is not None
            until_sync(lambda: c.execute("SELECT status FROM df.instances WHERE id = %s",
                                         (row[0],)).fetchone() == ("completed",), timeout=10)
            assert time.monotonic() - started < 1.5


def test_a_lone_workflow_on_an_idle_runtime_is_taken_by_the_first_executor(
        fresh_dsn: str) -> None:
    """A start rings every idle executor; the first goes at once, the others a moment later
    (FIRST_EXECUTOR_LEAD), so it is the one that runs a lone workflow (nearly always: a first
    executor slower than the lead loses it to another, which is correct too)."""
    import json

    import psycopg

    from tests.helpers import until_sync
    from tests.runtime import Runtime

    with Runtime(fresh_dsn, executors=3) as rt, \
            psycopg.connect(fresh_dsn, autocommit=True) as c:
        ids = []
        for _ in range(10):
            row = c.execute("SELECT df.start($$SELECT 1$$ ~> $$SELECT 2$$)").fetchone()
            assert row is not None
            ids.append(wf := row[0])
            until_sync(lambda wf=wf: c.execute("SELECT status FROM df.instances WHERE id = %s",
                                               (wf,)).fetchone() == ("completed",), timeout=10)
        ran_by = [entry.get("executor") for entry in map(json.loads, rt.log().splitlines())
                  if entry.get("event") == "instance_finished" and entry.get("instance_id") in ids]
    assert len(ran_by) == 10
    assert ran_by.count(0) >= 8, ran_by
