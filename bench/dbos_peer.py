"""The DBOS Transact peer: the same 3-step ``SELECT 1`` workflow as a DBOS workflow.

DBOS is a library: a workflow runs inside the process that calls it, checkpointing to its
system database. So here the starters are the executors. K worker processes (K = --executors)
each launch DBOS against a system database in this part's scratch database, and the N starters
are spread over them as threads; each starter calls the workflow and returns when it completes,
then calls the next (closed loop, N workflows in flight). K processes give DBOS both cores
despite the GIL — the generous set-up for it.

Two flavours of step, reported as two systems:

* ``dbos`` — each step is a DBOS *transaction* (``SQLAlchemyDatasource.transaction``, the DBOS 2.x+
  replacement for ``@DBOS.transaction``): ``SELECT 1`` and the step's checkpoint commit in one
  database transaction, i.e. exactly once. That is what a durable-actor SQL step guarantees, so
  this is the like-for-like comparison. Isolation READ COMMITTED, as the other two systems use
  (DBOS's default is SERIALIZABLE).
* ``dbos_step`` — each step is a plain ``@DBOS.step()`` running ``SELECT 1`` on the application's
  own SQLAlchemy engine, checkpointed afterwards in the system database (at least once). Cheaper,
  weaker guarantee; shown so the comparison does not hinge on the choice.

DBOS runs with its documented defaults otherwise (connection pools, LISTEN/NOTIFY on).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import psycopg
from databases import as_url
from measure import BenchConfig, BenchError, latency_fields, split

APP_NAME = "bench-three-step"
APP_SCHEMA = "dbos_app"  # where the datasource keeps its checkpoints


def _define(kind: str, url: str) -> Any:
    """Configure DBOS in this process and return the registered 3-step workflow."""
    import sqlalchemy as sa
    from dbos import DBOS, SQLAlchemyDatasource

    if kind == "transaction":
        ds = SQLAlchemyDatasource.create(url, schema=APP_SCHEMA)

        @ds.transaction(isolation_level="READ COMMITTED")
        def select_one() -> int:
            return int(ds.sql_session().execute(sa.text("SELECT 1")).scalar_one())
    else:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))

        @DBOS.step()
        def select_one() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT 1")).scalar_one())

    @DBOS.workflow()
    def three_step() -> int:
        return select_one() + select_one() + select_one()

    return three_step


def _sequential(workflow: Any, runs: int, prefix: str) -> list[float]:
    """Run `runs` workflows one after the other; their latencies in ms."""
    from dbos import SetWorkflowID

    latencies = []
    for j in range(runs):
        t0 = time.perf_counter()
        with SetWorkflowID(f"{prefix}-{j}"):
            workflow()
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return latencies


def _concurrent(workflow: Any, counts: list[int], prefix: str) -> list[str]:
    """One starter thread per count, each running its workflows back to back; the errors."""
    from dbos import SetWorkflowID

    errors: list[str] = []

    def starter(t: int, count: int) -> None:
        try:
            for j in range(count):
                with SetWorkflowID(f"{prefix}-{t}-{j}"):
                    workflow()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=starter, args=(t, c)) for t, c in enumerate(counts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def _process(url: str, index: int, kind: str, pipe: Connection) -> None:
    """One DBOS process: launch, then serve the parent's commands until "stop"."""
    from dbos import DBOS

    DBOS(config={"name": APP_NAME, "system_database_url": url, "log_level": "WARNING",
                 "executor_id": f"bench-{index}"})
    workflow = _define(kind, url)
    DBOS.launch()
    pipe.send(("ready", index))
    try:
        while True:
            cmd, *args = pipe.recv()
            if cmd == "sequential":
                pipe.send(("done", _sequential(workflow, *args)))
            elif cmd == "concurrent":
                counts, prefix = args
                pipe.send(("done", _concurrent(workflow, counts, f"{prefix}-{index}")))
            else:
                break
    finally:
        DBOS.destroy()


class Fleet:
    """K DBOS processes, launched one after the other (so one of them migrates the schema)."""

    def __init__(self, url: str, count: int, kind: str, timeout_s: float) -> None:
        self.ctx = mp.get_context("spawn")
        self.url, self.count, self.kind, self.timeout_s = url, count, kind, timeout_s
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []

    def __enter__(self) -> Fleet:
        for i in range(self.count):
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(target=_process, args=(self.url, i, self.kind, child),
                                 name=f"bench-dbos-{i}", daemon=True)
            p.start()
            self.procs.append(p)
            self.pipes.append(parent)
            self.reply(i, 120.0)
        return self

    def reply(self, i: int, timeout_s: float) -> Any:
        if not self.pipes[i].poll(timeout_s):
            raise BenchError(f"DBOS process {i} did not answer in {timeout_s:.0f}s")
        try:
            _tag, value = self.pipes[i].recv()
        except EOFError as exc:
            raise BenchError(f"DBOS process {i} exited") from exc
        return value

    def __exit__(self, *exc: object) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


def _completion(conn: psycopg.Connection[Any], prefix: str) -> tuple[int, int, float | None]:
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE status = 'SUCCESS'),
                  count(*) FILTER (WHERE status IS DISTINCT FROM 'SUCCESS'),
                  (max(coalesce(completed_at, updated_at)) - min(created_at)) / 1000.0
           FROM dbos.workflow_status WHERE workflow_uuid LIKE %s""",
        (prefix + "-%",)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), float(row[2]) if row[2] is not None else None


def _run(dsn: str, cfg: BenchConfig, kind: str) -> dict[str, Any]:
    url = as_url(dsn)
    with Fleet(url, cfg.executors, kind, cfg.timeout_s) as fleet, \
            psycopg.connect(dsn, autocommit=True) as conn:
        for i, n in enumerate(split(cfg.warmup, cfg.executors)):
            fleet.pipes[i].send(("sequential", max(n, 1), f"warm-{i}"))
        for i in range(cfg.executors):
            fleet.reply(i, cfg.timeout_s)

        fleet.pipes[0].send(("sequential", cfg.latency_runs, "lat"))
        latencies = fleet.reply(0, cfg.timeout_s)
        row = conn.execute(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY
                        coalesce(completed_at, updated_at) - created_at)
               FROM dbos.workflow_status WHERE workflow_uuid LIKE 'lat-%'""").fetchone()
        db_p50 = float(row[0]) if row and row[0] is not None else None

        per_starter = split(cfg.workflows, cfg.starters)
        starters_per_process = split(cfg.starters, cfg.executors)
        t0 = time.perf_counter()
        offset = 0
        for i, n in enumerate(starters_per_process):
            fleet.pipes[i].send(("concurrent", per_starter[offset:offset + n], "tp"))
            offset += n
        errors = [e for i in range(cfg.executors) for e in fleet.reply(i, cfg.timeout_s)]
        wall = time.perf_counter() - t0
        done, failed, elapsed = _completion(conn, "tp")
    if errors or failed or done != cfg.workflows:
        raise BenchError(f"DBOS: {done} of {cfg.workflows} succeeded, {failed} not; "
                         f"errors: {errors[:3]}")
    return {
        "workflows_per_s": round(done / elapsed, 1) if elapsed else None,
        **latency_fields(latencies),
        "db_p50_ms": db_p50,
        "elapsed_s": round(elapsed, 3) if elapsed else None,
        "wall_s": round(wall, 3),
        "failed": failed,
        "step_kind": kind,
        "dbos_processes": cfg.executors,
    }


def run_transaction(dsn: str, cfg: BenchConfig) -> dict[str, Any]:
    """DBOS with each step a datasource transaction (exactly once, like a durable-actor step)."""
    return _run(dsn, cfg, "transaction")


def run_step(dsn: str, cfg: BenchConfig) -> dict[str, Any]:
    """DBOS with each step a plain @DBOS.step (at least once)."""
    return _run(dsn, cfg, "step")
