"""The hand-written baseline: a 3-step job table worked the obvious way with plain psycopg.

Claim → step → commit, once per step. A job row carries a step counter; each of K worker
processes loops over one transaction per step::

    BEGIN;
    SELECT id, step FROM bench_jobs WHERE NOT done ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED;
    SELECT 1;                                         -- the step
    UPDATE bench_jobs SET step = step + 1, done = (step + 1 = 3), completed_at = ... ;
    COMMIT;

Starters insert a job and NOTIFY in the same statement. An idle worker waits for that
notification on its own connection (LISTEN), with a 50 ms poll as the fallback; a busy worker
goes straight back to claiming, so a job's steps 2 and 3 follow step 1 without any wait.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any

import psycopg
from measure import (
    COMPLETION_POLL_S,
    BenchConfig,
    BenchError,
    latency_fields,
    sequential_latency,
    start_concurrently,
    until,
)

STEPS = 3
CHANNEL = "bench_jobs"
IDLE_POLL_S = 0.05

SCHEMA = """
CREATE TABLE bench_jobs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    step         integer NOT NULL DEFAULT 0,
    done         boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at timestamptz
);
-- The claim reads the oldest unfinished job; a partial index keeps it off finished rows.
CREATE INDEX bench_jobs_todo ON bench_jobs (id) WHERE NOT done;
"""

START = """
WITH job AS (INSERT INTO bench_jobs DEFAULT VALUES RETURNING id)
SELECT id, pg_notify('bench_jobs', '') FROM job
"""

CLAIM = """
SELECT id, step FROM bench_jobs WHERE NOT done ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
"""

ADVANCE = """
UPDATE bench_jobs
SET step = %(step)s::int,
    done = %(step)s::int >= %(steps)s::int,
    completed_at = CASE WHEN %(step)s::int >= %(steps)s::int THEN clock_timestamp() END
WHERE id = %(id)s::bigint
"""


def _worker(dsn: str, stop: Any, ready: Any) -> None:
    """One worker process: claim one step, run it, commit; wait for NOTIFY when idle."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        ready.put(os.getpid())
        while not stop.is_set():
            with conn.transaction():
                row = conn.execute(CLAIM).fetchone()
                if row is not None:
                    job_id, step = row
                    conn.execute("SELECT 1")
                    conn.execute(ADVANCE, {"id": job_id, "step": step + 1, "steps": STEPS})
            if row is None:
                # Drains notifications that arrived while working, or waits for the next one.
                for _ in conn.notifies(timeout=IDLE_POLL_S, stop_after=1):
                    pass


def _start(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(START).fetchone()
    assert row is not None
    return int(row[0])


def _finished(conn: psycopg.Connection[Any], job_id: int) -> str | None:
    row = conn.execute("SELECT done FROM bench_jobs WHERE id = %s", (job_id,)).fetchone()
    return "completed" if row and row[0] else None


class Workers:
    """K worker processes, started and stopped together."""

    def __init__(self, dsn: str, count: int) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._ready = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(dsn, self._stop, self._ready),
                                   name=f"bench-baseline-worker-{i}", daemon=True)
                       for i in range(count)]

    def __enter__(self) -> Workers:
        for p in self._procs:
            p.start()
        deadline = time.monotonic() + 60
        for _ in self._procs:
            try:
                self._ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty as exc:
                raise BenchError("baseline workers did not start in 60s") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def _completion(conn: psycopg.Connection[Any],
                ids: list[int]) -> tuple[bool, tuple[int, float | None]]:
    """(all done?, (done count, seconds from the first creation to the last completion))."""
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE done),
                  extract(epoch FROM max(completed_at) - min(created_at))::float8
           FROM bench_jobs WHERE id = ANY(%s::bigint[])""", (ids,)).fetchone()
    assert row is not None
    return int(row[0]) >= len(ids), (int(row[0]), row[1])


def run(dsn: str, cfg: BenchConfig) -> dict[str, Any]:
    """Set up the job table in `dsn`, run the workers, measure; return the figures."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    with Workers(dsn, cfg.executors), psycopg.connect(dsn, autocommit=True) as conn:
        if cfg.warmup:
            sequential_latency(dsn, cfg.warmup, _start, _finished, cfg.timeout_s)
        latencies, lat_ids = sequential_latency(dsn, cfg.latency_runs, _start, _finished,
                                                cfg.timeout_s)
        row = conn.execute(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY
                        extract(epoch FROM completed_at - created_at) * 1000)
               FROM bench_jobs WHERE id = ANY(%s::bigint[])""", (lat_ids,)).fetchone()
        db_p50 = row[0] if row else None

        t0 = time.perf_counter()
        burst = start_concurrently(dsn, cfg.starters, cfg.workflows, _start)
        done, elapsed = until(lambda: _completion(conn, burst.ids), timeout=cfg.timeout_s,
                              every=COMPLETION_POLL_S, what="all baseline jobs done")
        wall = time.perf_counter() - t0
    return {
        "workflows_per_s": round(done / elapsed, 1) if elapsed else None,
        **latency_fields(latencies),
        "db_p50_ms": round(db_p50, 3) if db_p50 is not None else None,
        "elapsed_s": round(elapsed, 3) if elapsed else None,
        "wall_s": round(wall, 3),
        "starts_per_s": round(len(burst.ids) / burst.started_s, 1),
        "failed": 0,
        "wake": f"LISTEN/NOTIFY, {int(IDLE_POLL_S * 1000)} ms poll fallback",
    }
