"""Logs of `durable-actor supervise`: every stderr line is a JSON object with the common
fields, step events carry what identifies the step, and a DSN password never shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from tests.helpers import until_sync

CLI = Path(sys.executable).with_name("durable-actor")
PASSWORD = "pw-Secr3t-never-logged"


def test_every_line_is_json_with_common_fields_and_no_password(fresh_dsn: str) -> None:
    dsn = make_conninfo(fresh_dsn, password=PASSWORD)   # trust auth: accepted, unused
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ACTOR_")}
    env["DURABLE_ACTOR_DSN"] = dsn
    log_path = Path(tempfile.mkstemp(prefix="da-logs-", suffix=".log")[1])
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen([str(CLI), "supervise", "--executors", "1", "--log-level",
                                     "debug"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=log)
        try:
            with psycopg.connect(fresh_dsn, autocommit=True) as c:
                ok = c.execute("SELECT df.start($$SELECT 1$$ ~> $$SELECT 2$$)").fetchone()
                # A step whose error text quotes the DSN, password and all.
                step = "SELECT ('" + dsn.replace("'", "''") + "')::int"
                bad = c.execute("SELECT df.start(%s::text)", (step,)).fetchone()
                assert ok and bad
                until_sync(lambda: c.execute(
                    "SELECT count(*) FROM df.instances WHERE status IN ('completed', 'failed')"
                ).fetchone() == (2,), timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        text = log_path.read_text()
    finally:
        log_path.unlink(missing_ok=True)
    assert PASSWORD not in text
    events = []
    for line in text.splitlines():
        event = json.loads(line)        # every line is one JSON object
        assert isinstance(event, dict), line
        for key in ("timestamp", "level", "role", "pid", "event"):
            assert key in event, (key, line)
        assert isinstance(event["pid"], int)
        assert event["timestamp"].endswith("Z")
        events.append(event)
    roles = {e["role"] for e in events}
    assert {"supervisor", "dispatcher", "timer", "executor"} <= roles
    steps = [e for e in events if e["event"] in ("step_completed", "step_failed")]
    assert sorted(e["event"] for e in steps) == ["step_completed"] * 2 + ["step_failed"]
    for e in steps:
        assert len(e["instance_id"]) == 8 and len(e["node_id"]) == 8
        assert e["step_type"] == "sql"
        assert isinstance(e["duration_ms"], int | float) and e["duration_ms"] >= 0
    failed = next(e for e in steps if e["event"] == "step_failed")
    assert "invalid input syntax for type integer" in failed["error"]
    assert "password=***" in failed["error"]
    assert {e["instance_id"] for e in events if e["event"] == "instance_finished"} == {
        ok[0], bad[0]}
