"""`durable-actor status`, `top`, `explain`, `cancel` and `signal`, run as real subprocesses
against a database with a runtime running (and `status` once on the embedded server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import until_sync
from tests.runtime import Runtime

CLI = Path(sys.executable).with_name("durable-actor")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ACTOR_")}
    environ.update(env)
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=60,
                          env=environ, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def rt(module_dsn: str) -> Iterator[Runtime]:
    with Runtime(module_dsn, executors=1) as runtime:
        yield runtime


@pytest.fixture
def db(module_dsn: str, rt: Runtime) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c


def _start(db: psycopg.Connection[Any], graph: str, label: str | None = None) -> str:
    row = db.execute(f"SELECT df.start({graph}, %s)", (label,)).fetchone()
    assert row is not None
    return str(row[0])


def _status(db: psycopg.Connection[Any], iid: str) -> str:
    row = db.execute("SELECT status FROM df.instances WHERE id = %s", (iid,)).fetchone()
    return str(row[0]) if row else ""


def test_status(module_dsn: str, db: psycopg.Connection[Any]) -> None:
    done = _start(db, "$$SELECT 1$$")
    waiting = _start(db, "df.wait_for_signal('never')")
    until_sync(lambda: _status(db, done) == "completed" and _status(db, waiting) == "running",
               timeout=20)
    proc = run("status", "--json", "--dsn", module_dsn)
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    counts = dict(db.execute("SELECT status, count(*) FROM df.instances GROUP BY 1").fetchall())
    assert snap["instances"] == {s: counts.get(s, 0) for s in
                                 ("pending", "running", "completed", "failed", "cancelled")}
    assert snap["instances"]["running"] >= 1
    assert sorted(w["role"] for w in snap["workers"] if w["live"]) == [
        "dispatcher", "executor", "timer"]
    assert snap["queues"]["tasks"] == 0
    # Text, with the DSN from the environment.
    proc = run("status", DURABLE_ACTOR_DSN=module_dsn)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("instances  pending ")
    assert "workers    3 live, 0 silent" in proc.stdout
    assert "executor" in proc.stdout


def test_top_once(module_dsn: str, db: psycopg.Connection[Any]) -> None:
    iid = _start(db, "$$SELECT 2$$", "top-label")
    until_sync(lambda: _status(db, iid) == "completed", timeout=20)
    proc = run("top", "--once", "--limit", "5", "--dsn", module_dsn)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout            # --once does not clear the screen
    assert "recent instances" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if iid in ln)
    assert "completed" in line and "top-label" in line
    snap = json.loads(run("top", "--once", "--json", "--dsn", module_dsn).stdout)
    assert snap["recent"][0]["instance_id"] == iid


def test_explain(module_dsn: str, db: psycopg.Connection[Any]) -> None:
    iid = _start(db, "$$SELECT 1$$ ~> $$SELECT 2$$")
    until_sync(lambda: _status(db, iid) == "completed", timeout=20)
    proc = run("explain", iid, "--dsn", module_dsn)
    assert proc.returncode == 0, proc.stderr
    expected = db.execute("SELECT df.explain(%s)", (iid,)).fetchone()
    assert expected is not None
    assert proc.stdout.rstrip("\n") == expected[0]
    assert "✓" in proc.stdout
    proc = run("explain", "ffffffff", "--dsn", module_dsn)
    assert proc.returncode == 1
    assert "not found" in proc.stdout


def test_signal_and_cancel(module_dsn: str, db: psycopg.Connection[Any]) -> None:
    waiting = _start(db, "df.wait_for_signal('go')")
    until_sync(lambda: _status(db, waiting) == "running", timeout=20)
    proc = run("signal", waiting, "go", '{"n": 1}', "--dsn", module_dsn)
    assert (proc.returncode, proc.stdout.strip()) == (0, "OK"), proc.stderr
    until_sync(lambda: _status(db, waiting) == "completed", timeout=20)
    out = db.execute("SELECT df.result(%s)", (waiting,)).fetchone()
    assert out is not None
    assert json.loads(out[0])["data"] == {"n": 1}

    victim = _start(db, "df.wait_for_signal('never')")
    until_sync(lambda: _status(db, victim) == "running", timeout=20)
    proc = run("cancel", victim, "--reason", "operator said so", "--dsn", module_dsn)
    assert proc.returncode == 0, proc.stderr
    until_sync(lambda: _status(db, victim) == "cancelled", timeout=20)
    reason = db.execute("SELECT reason FROM df.commands WHERE instance_id = %s"
                        " AND command = 'cancel'", (victim,)).fetchone()
    assert reason == ("operator said so",)
    # Errors from the SQL functions: one line, exit 3.
    proc = run("signal", "", "go", "--dsn", module_dsn)
    assert proc.returncode == 3
    assert proc.stderr.startswith("durable-actor: error: database error:")


def test_views_on_the_embedded_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    try:
        proc = run("status", "--data-dir", str(data_dir))
        assert proc.returncode == 3
        assert "run `durable-actor migrate` first" in proc.stderr
        assert run("migrate", "--data-dir", str(data_dir)).returncode == 0
        proc = run("status", "--json", "--data-dir", str(data_dir))
        assert proc.returncode == 0, proc.stderr
        snap = json.loads(proc.stdout)
        assert snap["instances"]["running"] == 0
        assert snap["workers"] == []
    finally:
        assert not (data_dir / "postmaster.pid").exists(), "embedded server left running"
        shutil.rmtree(data_dir, ignore_errors=True)
