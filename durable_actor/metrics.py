"""Prometheus metrics: counters in every process, one endpoint in the supervisor.

Off unless ``--metrics-port`` is given. The supervisor then calls :func:`enable` before it
forks: prometheus-client's *multiprocess mode* keeps each process's counters and histograms in
small memory-mapped files (one set per pid) in a private directory, and the supervisor's
endpoint sums them at scrape time. Counters of a process that died (or was killed) stay in its
files, so totals never go backwards when an executor is restarted. This needs no extra
connection, pipe or round trip per step: an increment is a write to shared memory.

Figures that live in the database (instances by status, queue depths, live workers) are not
counted by processes at all: the endpoint reads them from the ``df.runtime_metrics`` view at
scrape time, so every host reports the same database-wide numbers (label them by instance in
Prometheus, or scrape one host for them).

The endpoint is served from the supervisor's own loop (``wsgiref``, one request at a time), not
from a thread: the supervisor forks, and forking a multi-threaded process is unsafe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

_m: dict[str, Any] = {}
_dir: str | None = None


def enabled() -> bool:
    return bool(_m)


def enable() -> str:
    """Switch this process (and the children it forks later) to multiprocess metrics."""
    global _dir
    if _m:
        assert _dir is not None
        return _dir
    _dir = tempfile.mkdtemp(prefix="durable-actor-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _dir
    from prometheus_client import Counter, Histogram

    _m["started"] = Counter("durable_actor_steps_started", "Steps an executor started.",
                            ["step_type"])
    _m["completed"] = Counter("durable_actor_steps_completed", "Steps that succeeded.",
                              ["step_type"])
    _m["failed"] = Counter("durable_actor_steps_failed", "Steps that failed (an outcome of "
                           "the workflow, recorded on its node).", ["step_type"])
    _m["latency"] = Histogram("durable_actor_step_duration_seconds",
                              "Time a step took to run, claim to outcome.", ["step_type"],
                              buckets=STEP_BUCKETS)
    _m["batch"] = Histogram("durable_actor_claim_batch_size",
                            "Items one transaction of a process handled (non-empty batches).",
                            ["role"], buckets=BATCH_BUCKETS)
    _m["restarts"] = Counter("durable_actor_process_restarts",
                             "Processes the supervisor restarted after they died.", ["role"])
    return _dir


def disable() -> None:
    """Remove the multiprocess directory (supervisor, at exit)."""
    global _dir
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)
    _dir = None
    _m.clear()
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


# -- hooks called by the processes (no-ops when metrics are off) ---------------------------

def step_started(step_type: str) -> None:
    if _m:
        _m["started"].labels(step_type).inc()


def step_finished(step_type: str, ok: bool, seconds: float) -> None:
    if _m:
        _m["completed" if ok else "failed"].labels(step_type).inc()
        _m["latency"].labels(step_type).observe(seconds)


def claimed(role: str, count: int) -> None:
    if _m and count > 0:
        _m["batch"].labels(role).observe(count)


def restarted(role: str) -> None:
    if _m:
        _m["restarts"].labels(role).inc()


def child_died(pid: int) -> None:
    if _m:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- the endpoint (supervisor) ---------------------------------------------------------------

class DatabaseCollector:
    """Reads df.runtime_metrics at scrape time (metric, label, value rows)."""

    FAMILIES: ClassVar[dict[str, tuple[str, str, str | None]]] = {
        "instances": ("durable_actor_instances", "Instances by status.", "status"),
        "queue_depth": ("durable_actor_queue_depth",
                        "Rows waiting in the runtime's queue tables.", "queue"),
        "workers": ("durable_actor_workers", "Live runtime processes (df.workers, heartbeat "
                    "within 30 s), all hosts.", "role"),
        "oldest_task_age_seconds": ("durable_actor_oldest_task_age_seconds",
                                    "Age of the oldest queued step.", None),
    }

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def collect(self) -> Iterator[Any]:
        import psycopg
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, Any] = {}
        for key, (name, doc, label) in self.FAMILIES.items():
            families[key] = GaugeMetricFamily(name, doc, labels=[label] if label else None)
        up = GaugeMetricFamily("durable_actor_database_up",
                               "1 if df.runtime_metrics could be read at this scrape.")
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3,
                                 application_name="durable-actor metrics",
                                 options="-c statement_timeout=3000") as conn:
                rows = conn.execute(
                    "SELECT metric, label, value FROM df.runtime_metrics").fetchall()
        except psycopg.Error:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for metric, label, value in rows:
            family = families.get(metric)
            if family is None:
                continue
            family.add_metric([label] if label is not None else [], float(value))
        yield from families.values()


class Endpoint:
    """A /metrics HTTP endpoint driven from the caller's loop (see :meth:`serve_for`)."""

    def __init__(self, port: int, dsn: str) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(DatabaseCollector(dsn))

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass   # stderr carries JSON lines only

        class Server(WSGIServer):
            allow_reuse_address = True

        self.server = make_server("", port, make_wsgi_app(registry), server_class=Server,
                                  handler_class=Quiet)

    def serve_for(self, seconds: float) -> None:
        """Answer requests for `seconds` (at least one select), then return."""
        import time

        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.server.timeout = left
            self.server.handle_request()

    def close(self) -> None:
        self.server.server_close()


def serve(port: int, dsn: str) -> Endpoint:
    return Endpoint(port, dsn)
