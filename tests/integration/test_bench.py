"""Smoke tests of bench/run.py and bench/fanout.py: tiny sizes, valid JSON lines.

Figures are not checked against anything (the machine is shared and noisy); only that every part
produced them, that the ratio line is there, and that the scratch databases are gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server

RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"
TINY = ["--workflows", "6", "--starters", "2", "--executors", "1", "--latency-runs", "3",
        "--warmup", "1", "--timeout", "60", "--ready-timeout", "30"]
RESULT_KEYS = {"bench", "system", "workflows", "starters", "executors", "latency_runs", "run",
               "workflows_per_s", "p50_ms", "p95_ms", "server", "server_kind", "cores", "date",
               "database"}
RATIO_KEYS = {"throughput_durable_over_baseline", "throughput_durable_over_dbos",
              "throughput_baseline_over_dbos", "p50_durable_over_baseline",
              "p50_durable_over_dbos", "p50_baseline_over_dbos", "targets_met", "server"}


def bench(server: Server, *args: str) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, str(RUN), "--dsn", server.dsn, *TINY, *args],
                          capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    return lines


def check_results(server: Server, lines: list[dict[str, Any]], systems: list[str],
                  runs: int = 1) -> None:
    results = [ln for ln in lines if ln["bench"] == "three_step" and ln["run"] != "median"]
    assert [ln["system"] for ln in results] == systems * runs
    for ln in results:
        assert "error" not in ln, ln["error"]
        assert ln.keys() >= RESULT_KEYS, ln
        assert ln["workflows"] == 6
        assert ln["workflows_per_s"] > 0 and 0 < ln["p50_ms"] <= ln["p95_ms"], ln
        assert ln["server"] == server.version().split()[0]
    ratios = lines[-1]
    assert ratios["bench"] == "three_step_ratios"
    assert ratios.keys() >= RATIO_KEYS
    with server.admin() as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                            ([ln["database"] for ln in results],)).fetchall()
    assert left == []


def test_baseline_repeated_prints_runs_medians_and_ratios(server: Server) -> None:
    lines = bench(server, "--only", "baseline", "--repeat", "2")
    check_results(server, lines, ["baseline"], runs=2)
    medians = [ln for ln in lines if ln.get("run") == "median"]
    assert len(medians) == 1 and medians[0]["runs"] == 2
    assert medians[0].keys() >= {"workflows_per_s", "p50_ms", "p95_ms"}


@pytest.mark.parametrize("system", ["dbos", "dbos_step"])
def test_dbos_part_prints_figures(server: Server, system: str) -> None:
    lines = bench(server, "--only", system)
    check_results(server, lines, [system])
    assert lines[0]["step_kind"] == ("transaction" if system == "dbos" else "step")


def test_durable_part_prints_figures(server: Server) -> None:
    lines = bench(server, "--only", "durable")
    check_results(server, lines, ["durable"])
    assert lines[0]["supervisor_exit"] == 0


def test_ratios_line_compares_the_systems_that_ran(server: Server) -> None:
    lines = bench(server, "--only", "baseline,dbos_step")
    check_results(server, lines, ["baseline", "dbos_step"])
    ratios = lines[-1]
    assert ratios["throughput_baseline_over_dbos_step"] > 0
    assert ratios["throughput_durable_over_baseline"] is None


FANOUT = Path(__file__).resolve().parents[2] / "bench" / "fanout.py"
FANOUT_KEYS = {"bench", "case", "size", "executors", "wall_s", "harness_wall_s", "samples",
               "runtime_processes", "runtime_rss_mb_start", "runtime_rss_mb_peak",
               "backends_rss_mb_peak", "backends_anon_mb_peak", "at_progress",
               "sizes_mb_after", "rows_after", "supervisor_exit", "server", "date", "database"}


def test_fanout_prints_a_line_per_case_and_the_ratios(server: Server) -> None:
    proc = subprocess.run(
        [sys.executable, str(FANOUT), "--dsn", server.dsn, "--join-sizes", "20",
         "--foreach-rows", "50", "--max-parallel", "8", "--executors", "1", "--starters", "2",
         "--timeout", "60", "--ready-timeout", "30"],
        capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    cases = lines[:-1]
    assert [(ln["case"], ln["size"]) for ln in cases] == [
        ("join", 20), ("independent", 20), ("foreach", 50)]
    speed = {"join": "branches_per_s", "independent": "workflows_per_s",
             "foreach": "rows_per_s"}
    for ln in cases:
        assert "error" not in ln, ln["error"]
        assert ln.keys() >= FANOUT_KEYS | {speed[ln["case"]]}, ln
        assert ln["bench"] == "fanout" and ln["supervisor_exit"] == 0
        assert ln["runtime_rss_mb_peak"] > 0 and ln["runtime_processes"] >= 2
        assert set(ln["at_progress"]) == {"10", "50", "100"}
        assert ln["at_progress"]["100"]["sizes_mb"].keys() == {
            "instances", "nodes", "foreach_rows"}
        assert ln["rows_after"]["foreach_rows"] == 0
    assert cases[0]["children_completed"] == 20 and cases[2]["children_completed"] == 50
    assert cases[2]["max_parallel"] == 8
    ratios = lines[-1]
    assert ratios["bench"] == "fanout_ratios" and ratios["join_over_independent_20"] > 0
    with server.admin() as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                            ([ln["database"] for ln in cases],)).fetchall()
    assert left == []
