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
