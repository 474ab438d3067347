"""Run the 3-step workflow benchmark for durable-actor and its peers, side by side.

    .venv/bin/python bench/run.py [--dsn SERVER_DSN] [--workflows 2000] [--starters 8]
                                  [--executors 2] [--only durable,baseline,dbos,dbos_step]
                                  [--repeat 1]

Every system runs against the same server in the same run, each in a fresh database of its own
that is dropped afterwards. Without --dsn an embedded PostgreSQL on a temporary directory is
started and deleted at the end. Output: one JSON object per line — one per system and repetition,
a median line per system when --repeat > 1, and a last line of ratios. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from databases import ServerUnderTest, cores
from measure import BenchConfig, BenchError, emit
from psycopg.conninfo import conninfo_to_dict

# system name -> (module, function): imported lazily, so a missing peer fails only its part.
PARTS: dict[str, tuple[str, str]] = {
    "durable": ("durable", "run"),
    "baseline": ("baseline", "run"),
    "dbos": ("dbos_peer", "run_transaction"),
    "dbos_step": ("dbos_peer", "run_step"),
}
DEFAULT_ORDER = ["durable", "baseline", "dbos", "dbos_step"]
FIGURES = ("workflows_per_s", "p50_ms", "p95_ms")

# Targets the project holds durable-actor to; reported, never asserted.
TARGETS = {
    "throughput_durable_over_baseline": (">=", 1.0),
    "throughput_durable_over_dbos": (">=", 12.0),
    "p50_durable_over_baseline": ("<=", 3.0),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="server to run on (may CREATE DATABASE); default: embedded")
    p.add_argument("--workflows", type=int, default=2000, help="workflows per throughput run")
    p.add_argument("--starters", type=int, default=8, help="concurrent starters")
    p.add_argument("--executors", type=int, default=2,
                   help="executors / worker processes per system")
    p.add_argument("--latency-runs", type=int, default=50,
                   help="sequential single-workflow runs for p50/p95")
    p.add_argument("--warmup", type=int, default=20,
                   help="sequential workflows run and discarded before measuring")
    p.add_argument("--only", default=",".join(DEFAULT_ORDER),
                   help=f"comma-separated systems, from {','.join(DEFAULT_ORDER)}")
    p.add_argument("--repeat", type=int, default=1,
                   help="repetitions; systems are interleaved within each")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a phase may take before the part gives up")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds the durable-actor runtime gets to complete a first workflow")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in systems if s not in PARTS]
    if unknown:
        p.error(f"--only: unknown system(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    args.systems = systems
    for name in ("workflows", "starters", "executors", "latency_runs", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _part(system: str) -> Callable[[str, BenchConfig], dict[str, Any]]:
    module, func = PARTS[system]
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def _run_one(server: ServerUnderTest, system: str, cfg: BenchConfig) -> dict[str, Any]:
    """Run one part in a fresh database; its figures, or {"error": ...} if it failed."""
    database = None
    try:
        part = _part(system)
        with server.scratch_database(system) as dsn:
            database = conninfo_to_dict(dsn).get("dbname")
            return {**part(dsn, cfg), "database": database}
    except (BenchError, ImportError) as exc:
        return {"error": str(exc), "database": database}
    except Exception as exc:  # one broken part must not lose the others' figures
        return {"error": f"{type(exc).__name__}: {exc}", "database": database}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _ratios(medians: dict[str, dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    def fig(system: str, key: str) -> float | None:
        return medians.get(system, {}).get(key)

    out: dict[str, Any] = {"bench": "three_step_ratios", **common}
    pairs = [("durable", "baseline"), ("durable", "dbos"), ("baseline", "dbos"),
             ("durable", "dbos_step"), ("baseline", "dbos_step")]
    for a, b in pairs:
        out[f"throughput_{a}_over_{b}"] = _ratio(fig(a, "workflows_per_s"),
                                                 fig(b, "workflows_per_s"))
    for a, b in pairs:
        out[f"p50_{a}_over_{b}"] = _ratio(fig(a, "p50_ms"), fig(b, "p50_ms"))
    targets: dict[str, bool | None] = {}
    for key, (op, bound) in TARGETS.items():
        value = out[key]
        label = f"{key} {op} {bound:g}"
        targets[label] = None if value is None else (
            value >= bound if op == ">=" else value <= bound)
    out["targets_met"] = targets
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = BenchConfig(workflows=args.workflows, starters=args.starters,
                      executors=args.executors, latency_runs=args.latency_runs,
                      warmup=args.warmup, timeout_s=args.timeout,
                      ready_timeout_s=args.ready_timeout)
    server = ServerUnderTest(args.dsn) if args.dsn else ServerUnderTest.start_embedded()
    try:
        common = {"server": server.version(), "server_kind": server.kind, "cores": cores(),
                  "date": dt.date.today().isoformat()}
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
        for rep in range(1, args.repeat + 1):
            for system in args.systems:
                t0 = time.monotonic()
                figures = _run_one(server, system, cfg)
                line = {"bench": "three_step", "system": system, "workflows": cfg.workflows,
                        "starters": cfg.starters, "executors": cfg.executors,
                        "latency_runs": cfg.latency_runs, "run": rep,
                        **{k: None for k in FIGURES}, **figures, **common,
                        "part_s": round(time.monotonic() - t0, 1)}
                runs[system].append(line)
                emit(line)
        medians: dict[str, dict[str, Any]] = {}
        for system, lines in runs.items():
            ok = [ln for ln in lines if not ln.get("error")]
            if not ok:
                continue
            medians[system] = {k: statistics.median(ln[k] for ln in ok) for k in FIGURES
                               if all(ln.get(k) is not None for ln in ok)}
            if args.repeat > 1:
                emit({"bench": "three_step", "system": system, "workflows": cfg.workflows,
                      "starters": cfg.starters, "executors": cfg.executors,
                      "latency_runs": cfg.latency_runs, "run": "median", "runs": len(ok),
                      **medians[system], **common})
        emit(_ratios(medians, common))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
