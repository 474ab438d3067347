"""The durable-actor part: the runtime as a subprocess, workflows started with ``df.start()``.

``durable-actor migrate`` applies the schema to this part's scratch database (superuser instances
are allowed there), then ``durable-actor supervise --dsn DSN --executors K`` is started; the part
waits until a trivial workflow completes, measures, then sends SIGTERM and waits for the supervisor to drain and exit. Starters call
``SELECT df.start($$SELECT 1$$ ~> $$SELECT 1$$ ~> $$SELECT 1$$)`` and never wait; completion is
read from ``df.instances`` (status, created_at, completed_at).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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

START = "SELECT df.start($$SELECT 1$$ ~> $$SELECT 1$$ ~> $$SELECT 1$$)"
READY_PROBE = "SELECT df.start($$SELECT 1$$)"
FINAL = ("completed", "failed", "cancelled")
STOP_TIMEOUT_S = 30.0
# Errors while the supervisor is still applying the migrations: the df schema is not there yet.
NOT_YET = (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable,
           psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedObject)


def console_script() -> Path:
    """The ``durable-actor`` command installed next to this interpreter."""
    return Path(sys.executable).parent / "durable-actor"


class Runtime:
    """One ``durable-actor supervise`` subprocess, stopped with SIGTERM on exit."""

    def __init__(self, dsn: str, executors: int) -> None:
        self.dsn, self.executors = dsn, executors
        self._tmp = tempfile.TemporaryDirectory(prefix="durable-actor-bench-")
        self.log_path = Path(self._tmp.name) / "supervise.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> Runtime:
        exe = console_script()
        if not exe.exists():
            raise BenchError(f"no durable-actor command next to {sys.executable}")
        # The schema first, so the connecting role may start workflows even when it is a
        # superuser (df.settings refuses superuser instances by default).
        subprocess.run([str(exe), "migrate", "--dsn", self.dsn], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("UPDATE df.settings SET value = 'true'"
                         " WHERE name = 'enable_superuser_instances'")
        with open(self.log_path, "wb") as log:
            # A session of its own, so a supervisor that ignores SIGTERM can be killed along
            # with the processes it forked, and nothing else.
            self.proc = subprocess.Popen(
                [str(exe), "supervise", "--dsn", self.dsn, "--executors", str(self.executors)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"durable-actor supervise exited with code {code}: "
                             f"{self.log_tail()}")

    def wait_ready(self, timeout_s: float) -> float:
        """Start trivial workflows until one completes; return the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last: str = "no attempt"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    row = conn.execute(READY_PROBE).fetchone()
                except NOT_YET as exc:
                    last = f"{type(exc).__name__}: {str(exc).strip()}"
                    time.sleep(0.1)
                    continue
                assert row is not None
                wf = row[0]
                while time.monotonic() < deadline:
                    self.check_alive()
                    status = _finished(conn, wf)
                    if status == "completed":
                        return time.monotonic() - t0
                    if status is not None:
                        raise BenchError(f"first workflow {wf} ended {status}")
                    last = f"workflow {wf} still {_status(conn, wf)}"
                    time.sleep(0.02)
        raise BenchError(f"durable-actor runtime not ready in {timeout_s:.0f}s "
                         f"(a trivial workflow did not complete; last: {last}); "
                         f"log: {self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.exit_code = self.proc.returncode
        self._tmp.cleanup()


def _status(conn: psycopg.Connection[Any], wf: str) -> str | None:
    row = conn.execute("SELECT status FROM df.instances WHERE id = %s", (wf,)).fetchone()
    return str(row[0]) if row else None


def _finished(conn: psycopg.Connection[Any], wf: str) -> str | None:
    status = _status(conn, wf)
    return status if status in FINAL else None


def _start(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(START).fetchone()
    assert row is not None
    return str(row[0])


def _completion(conn: psycopg.Connection[Any],
                ids: list[str]) -> tuple[bool, tuple[int, int, float | None]]:
    """(all finished?, (completed, failed or cancelled, seconds first created → last done))."""
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE status = 'completed'),
                  count(*) FILTER (WHERE status IN ('failed', 'cancelled')),
                  extract(epoch FROM max(coalesce(completed_at, finished_at))
                                     - min(created_at))::float8
           FROM df.instances WHERE id = ANY(%s::text[])""", (ids,)).fetchone()
    assert row is not None
    done, failed = int(row[0]), int(row[1])
    return done + failed >= len(ids), (done, failed, row[2])


def run(dsn: str, cfg: BenchConfig) -> dict[str, Any]:
    """Run the runtime on `dsn` (an empty database), measure; return the figures."""
    with Runtime(dsn, cfg.executors) as rt, psycopg.connect(dsn, autocommit=True) as conn:
        ready_s = rt.wait_ready(cfg.ready_timeout_s)
        if cfg.warmup:
            sequential_latency(dsn, cfg.warmup, _start, _finished, cfg.timeout_s)
        latencies, lat_ids = sequential_latency(dsn, cfg.latency_runs, _start, _finished,
                                                cfg.timeout_s)
        row = conn.execute(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY
                        extract(epoch FROM coalesce(completed_at, finished_at) - created_at)
                        * 1000)
               FROM df.instances WHERE id = ANY(%s::text[])""", (lat_ids,)).fetchone()
        db_p50 = row[0] if row else None

        t0 = time.perf_counter()
        burst = start_concurrently(dsn, cfg.starters, cfg.workflows, _start)
        done, failed, elapsed = until(lambda: _completion(conn, burst.ids),
                                      timeout=cfg.timeout_s, every=COMPLETION_POLL_S,
                                      what="all durable-actor workflows finished")
        wall = time.perf_counter() - t0
        rt.check_alive()
    if failed:
        raise BenchError(f"{failed} of {len(burst.ids)} durable-actor workflows failed")
    return {
        "workflows_per_s": round(done / elapsed, 1) if elapsed else None,
        **latency_fields(latencies),
        "db_p50_ms": round(float(db_p50), 3) if db_p50 is not None else None,
        "elapsed_s": round(elapsed, 3) if elapsed else None,
        "wall_s": round(wall, 3),
        "starts_per_s": round(len(burst.ids) / burst.started_s, 1),
        "failed": failed,
        "ready_s": round(ready_s, 2),
        "supervisor_exit": rt.exit_code,
    }
