"""The Prometheus endpoint of `supervise --metrics-port`, and the df.runtime_metrics view."""

from __future__ import annotations

import socket
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import until_sync
from tests.runtime import Runtime, kill


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_endpoint_counts_steps_and_reads_the_database(fresh_dsn: str) -> None:
    port = _free_port()
    with Runtime(fresh_dsn, executors=2, metrics_port=port) as rt, \
            psycopg.connect(fresh_dsn, autocommit=True) as c:
        ok = [c.execute("SELECT df.start($$SELECT 1$$ ~> $$SELECT pg_sleep(0.01)$$)").fetchone()[0]
              for _ in range(5)]
        bad = [c.execute("SELECT df.start($$SELECT 1/0$$)").fetchone()[0] for _ in range(2)]
        until_sync(lambda: c.execute(
            "SELECT count(*) FROM df.instances WHERE status IN ('completed', 'failed')"
        ).fetchone() == (7,), timeout=20)
        assert len(ok) + len(bad) == 7
        samples = until_sync(lambda: (s := _scrape(port)) and _value(
            s, "durable_actor_steps_completed_total", step_type="sql") == 10 and s, timeout=10)
        assert _value(samples, "durable_actor_steps_failed_total", step_type="sql") == 2
        assert _value(samples, "durable_actor_steps_started_total", step_type="sql") == 12
        assert _value(samples, "durable_actor_step_duration_seconds_count", step_type="sql") == 12
        assert _value(samples, "durable_actor_step_duration_seconds_sum", step_type="sql") >= 0.05
        assert _value(samples, "durable_actor_step_duration_seconds_bucket", step_type="sql",
                      le="+Inf") == 12
        assert _value(samples, "durable_actor_claim_batch_size_count", role="executor") >= 1
        assert _value(samples, "durable_actor_claim_batch_size_sum", role="executor") == 12
        # (Mail is taken by the dispatcher or by an idle executor, whichever comes first, so
        # the dispatcher's own claims are not counted on here.)
        # Database-side figures, the same as the view's.
        assert _value(samples, "durable_actor_database_up") == 1
        assert _value(samples, "durable_actor_instances", status="completed") == 5
        assert _value(samples, "durable_actor_instances", status="failed") == 2
        assert _value(samples, "durable_actor_instances", status="running") == 0
        assert _value(samples, "durable_actor_queue_depth", queue="tasks") == 0
        assert _value(samples, "durable_actor_workers", role="executor") == 2
        view = {(m, lab): v for m, lab, v in c.execute(
            "SELECT metric, label, value FROM df.runtime_metrics")}
        assert view[("instances", "completed")] == 5
        assert view[("queue_depth", "tasks")] == 0
        assert view[("workers", "executor")] == 2
        # A process killed and restarted: counted, and its step counters are kept.
        assert _value(samples, "durable_actor_process_restarts_total", role="executor") == 0
        kill(rt.my_pids("executor")[0])
        until_sync(lambda: "child_restarted" in rt.log(), timeout=15)
        samples = _scrape(port)
        assert _value(samples, "durable_actor_process_restarts_total", role="executor") == 1
        assert _value(samples, "durable_actor_steps_completed_total", step_type="sql") == 10


def test_metrics_port_in_use_is_a_usage_error(fresh_dsn: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("durable-actor")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([str(cli), "supervise", "--dsn", fresh_dsn, "--executors", "1",
                               "--metrics-port", str(port)], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "metrics_port cannot be listened on" in proc.stderr
    assert "--metrics-port" in proc.stderr
