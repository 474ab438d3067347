"""Fan-out benchmark: one workflow with many branches or rows, against many small workflows.

    .venv/bin/python bench/fanout.py [--dsn SERVER_DSN] [--join-sizes 1000,10000]
                                     [--foreach-rows 100000] [--max-parallel 64]
                                     [--executors 2] [--starters 4]

Cases, all in one run (so their ratios mean something on a noisy machine), each in a scratch
database of its own with its own ``durable-actor supervise`` subprocess:

- ``join``: ``df.start(df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g FROM generate_series(1, N)
  g)))``, one instance whose N branches run as child instances;
- ``independent``: N workflows ``df.start('SELECT <k>')`` started by --starters concurrent
  starters, the same amount of work as N independent instances;
- ``foreach``: ``df.foreach_query($$SELECT g FROM generate_series(1, R) g$$, 'r', $$SELECT
  $r.g$$, max_parallel => P)``, R child instances, at most P at a time.

Wall times come from ``df.instances`` (first creation → last completion). While a case runs, a
sampler reads every --sample-every seconds the resident memory of the runtime (the supervisor
and every process below it, VmRSS from /proc/<pid>/status) and of the runtime's database
backends (pg_stat_activity pids with application_name ``durable-actor …``, when the server is on
this host), and the case's progress; at 10 %, 50 % and 100 % progress it also records the size
of df.instances, df.nodes and df.foreach_rows (pg_total_relation_size).

Output: one JSON line per case, then a ``fanout_ratios`` line (``join_over_independent_<N>``:
branches/s of the join ÷ workflows/s of N independent workflows). A case that failed prints an
``error`` and null figures. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from databases import ServerUnderTest, cores
from durable import FINAL, Runtime
from measure import COMPLETION_POLL_S, BenchError, emit, start_concurrently, until
from psycopg.conninfo import conninfo_to_dict

CASES = ("join", "independent", "foreach")
CHECKPOINTS = (10, 50, 100)             # progress (%) at which memory and table sizes are kept
TABLES = ("instances", "nodes", "foreach_rows")
MB = 1024 * 1024

JOIN = ("SELECT df.start(df.join(VARIADIC ARRAY("
        "SELECT 'SELECT ' || g FROM generate_series(1, %(n)s::int) g)))")
FOREACH = ("SELECT df.start(df.foreach_query("
           "'SELECT g FROM generate_series(1, ' || %(n)s::int || ') g', 'r', $$SELECT $r.g$$,"
           " max_parallel => %(p)s::int))")
# Branches or rows finished so far, from the counters the engine keeps on the fanning node
# (df.nodes.status_details): JOIN marks each finished branch 'c' in "done", FOREACH counts "done".
PROGRESS = """
SELECT CASE n.node_type
         WHEN 'JOIN' THEN length(n.status_details ->> 'done')
                          - length(replace(n.status_details ->> 'done', 'c', ''))
         ELSE coalesce((n.status_details ->> 'done')::bigint, 0) END,
       i.status
FROM df.instances i JOIN df.nodes n ON n.instance_id = i.id AND n.id = i.root_node
WHERE i.id = %(id)s"""
INDEPENDENT_PROGRESS = """
SELECT count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled')),
       count(*) FILTER (WHERE status IN ('failed', 'cancelled')),
       extract(epoch FROM max(coalesce(completed_at, finished_at)) - min(created_at))::float8
FROM df.instances WHERE id = ANY(%(ids)s::text[])"""
FINISHED = "SELECT count(*) FROM df.instances WHERE status IN ('completed', 'failed', 'cancelled')"
SIZES = """
SELECT pg_total_relation_size('df.instances'), pg_total_relation_size('df.nodes'),
       pg_total_relation_size('df.foreach_rows')"""
BACKENDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'durable-actor%'"""


# -- memory -----------------------------------------------------------------------------------

def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int] | None:
    """Fields of /proc/<pid>/status in kB (None if the process is gone or not readable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = dict.fromkeys(keys, 0)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0])
    return out


def _descendants(root: int) -> list[int]:
    """`root` and every live process below it (parents read from /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return False


@dataclass
class Sample:
    t_s: float
    progress: float
    runtime_rss_mb: float
    runtime_processes: int
    backends_rss_mb: float | None
    backends_anon_mb: float | None
    backends: int


@dataclass
class Sampler:
    """A thread reading memory and progress every `every` seconds until stopped."""

    dsn: str
    supervisor_pid: int
    progress: Callable[[psycopg.Connection[Any]], float]   # 0..1
    every: float
    samples: list[Sample] = field(default_factory=list)
    checkpoints: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: {str(c): None for c in CHECKPOINTS})
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def __enter__(self) -> Sampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def final(self) -> None:
        """Take the 100 % sample now (the case has finished), from the calling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self._sample(conn, done=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    self._sample(conn, done=False)
                    self._stop.wait(self.every)
        except Exception as exc:    # reported in the case's line; the case itself goes on
            self.error = f"sampler: {type(exc).__name__}: {exc}"

    def _sample(self, conn: psycopg.Connection[Any], *, done: bool) -> None:
        progress = 1.0 if done else self.progress(conn)
        pids = _descendants(self.supervisor_pid)
        runtime = [s for p in pids if (s := _status_kb(p, ("VmRSS",))) is not None]
        backend_pids = [r[0] for r in conn.execute(BACKENDS).fetchall()]
        local = [p for p in backend_pids if _is_postgres(p)]
        backends = [s for p in local if (s := _status_kb(p, ("VmRSS", "RssAnon"))) is not None]
        seen = bool(backends)
        sample = Sample(
            t_s=round(time.monotonic() - self._t0, 2), progress=round(progress, 4),
            runtime_rss_mb=round(sum(s["VmRSS"] for s in runtime) / 1024, 1),
            runtime_processes=len(runtime),
            backends_rss_mb=round(sum(s["VmRSS"] for s in backends) / 1024, 1) if seen else None,
            backends_anon_mb=(round(sum(s["RssAnon"] for s in backends) / 1024, 1)
                              if seen else None),
            backends=len(backend_pids))
        self.samples.append(sample)
        for pct in CHECKPOINTS:
            key = str(pct)
            # Mid-run points only from mid-run samples: a case that finished between two
            # samples leaves them null rather than passing its final state off as 10 %.
            if self.checkpoints[key] is None and progress * 100 >= pct and (
                    done == (pct == 100)):
                self.checkpoints[key] = {**sample.__dict__, "sizes_mb": _sizes(conn)}

    def figures(self) -> dict[str, Any]:
        def peak(attr: str) -> float | None:
            values = [v for s in self.samples if (v := getattr(s, attr)) is not None]
            return max(values) if values else None

        first = self.samples[0] if self.samples else None
        return {
            "samples": len(self.samples),
            "runtime_processes": first.runtime_processes if first else None,
            "runtime_rss_mb_start": first.runtime_rss_mb if first else None,
            "runtime_rss_mb_peak": peak("runtime_rss_mb"),
            "backends_rss_mb_start": first.backends_rss_mb if first else None,
            "backends_rss_mb_peak": peak("backends_rss_mb"),
            "backends_anon_mb_peak": peak("backends_anon_mb"),
            "at_progress": self.checkpoints,
            **({"sampler_error": self.error} if self.error else {}),
        }


def _sizes(conn: psycopg.Connection[Any]) -> dict[str, float]:
    row = conn.execute(SIZES).fetchone()
    assert row is not None
    return {t: round(int(v) / MB, 2) for t, v in zip(TABLES, row, strict=True)}


def _after(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Table sizes and row counts once the case has finished."""
    counts = conn.execute("SELECT (SELECT count(*) FROM df.instances),"
                          " (SELECT count(*) FROM df.nodes),"
                          " (SELECT count(*) FROM df.foreach_rows)").fetchone()
    assert counts is not None
    return {"sizes_mb_after": _sizes(conn),
            "rows_after": dict(zip(TABLES, (int(c) for c in counts), strict=True))}


# -- cases ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FanoutConfig:
    executors: int = 2
    starters: int = 4
    max_parallel: int = 64
    timeout_s: float = 900.0
    ready_timeout_s: float = 60.0
    sample_every_s: float = 0.5


def _one(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def _single_instance(dsn: str, cfg: FanoutConfig, start_sql: str, params: dict[str, Any],
                     size: int, nodes: int = 0) -> dict[str, Any]:
    """Start one fanning workflow, sample while it runs, wait for it; its figures.

    `nodes`: the graph's node count; df.start refuses graphs above df.settings max_node_count
    (10,000 by default), so the scratch database's limit is raised to it when needed, and the
    line says so.
    """
    with Runtime(dsn, cfg.executors) as rt, psycopg.connect(dsn, autocommit=True) as conn:
        ready_s = rt.wait_ready(cfg.ready_timeout_s)
        limit = int(_one(conn, "SELECT value FROM df.settings WHERE name = 'max_node_count'",
                         {}))
        raised = nodes if nodes > limit else None
        if raised:
            conn.execute("UPDATE df.settings SET value = %(v)s WHERE name = 'max_node_count'",
                         {"v": str(raised)})
        assert rt.proc is not None
        state: dict[str, Any] = {}

        def progress(c: psycopg.Connection[Any]) -> float:
            if "id" not in state:
                return 0.0
            row = c.execute(PROGRESS, {"id": state["id"]}).fetchone()
            return int(row[0] or 0) / size if row else 0.0

        def finished() -> tuple[bool, str | None]:
            rt.check_alive()
            status = _one(conn, "SELECT status FROM df.instances WHERE id = %(id)s",
                          {"id": state["id"]})
            return status in FINAL, status

        with Sampler(dsn, rt.proc.pid, progress, cfg.sample_every_s) as sampler:
            t0 = time.perf_counter()
            state["id"] = _one(conn, start_sql, params)
            start_call_s = time.perf_counter() - t0
            status = until(finished, timeout=cfg.timeout_s, every=COMPLETION_POLL_S,
                           what=f"instance {state['id']} finished")
            harness_wall = time.perf_counter() - t0
            sampler.final()
        wf = state["id"]
        row = conn.execute(
            """SELECT extract(epoch FROM coalesce(completed_at, finished_at) - created_at)::float8,
                      (SELECT count(*) FILTER (WHERE c.status = 'completed')
                       FROM df.instances c WHERE c.parent_id = i.id)
               FROM df.instances i WHERE i.id = %(id)s""", {"id": wf}).fetchone()
        assert row is not None
        wall, children = row[0], int(row[1])
        if status != "completed":
            error = _one(conn, "SELECT string_agg(error, ' | ') FROM df.nodes"
                               " WHERE instance_id = %(id)s AND error IS NOT NULL", {"id": wf})
            raise BenchError(f"instance {wf} ended {status}: {error}")
        raw = _one(conn, "SELECT df.result(%(id)s)", {"id": wf})
        result = json.loads(raw) if raw is not None else None
        after = _after(conn)
    # a JOIN (or a FOREACH up to 1,000 rows) returns the list of results; above, counts
    results = len(result) if isinstance(result, list) else (
        result.get("completed") if isinstance(result, dict) else None)
    return {
        "instance": wf,
        "wall_s": round(wall, 3),
        "per_s": round(size / wall, 1) if wall else None,
        "harness_wall_s": round(harness_wall, 3),
        "start_call_s": round(start_call_s, 3),
        "children_completed": children,
        "max_node_count_raised_to": raised,
        "results": results,
        **sampler.figures(),
        **after,
        "ready_s": round(ready_s, 2),
        "supervisor_exit": rt.exit_code,
    }


def run_join(dsn: str, cfg: FanoutConfig, n: int) -> dict[str, Any]:
    out = _single_instance(dsn, cfg, JOIN, {"n": n}, n, nodes=n + 1)   # the JOIN + N
    if out["children_completed"] != n or out["results"] != n:
        raise BenchError(f"join of {n}: {out['children_completed']} branches completed, "
                         f"{out['results']} results")
    return {"branches_per_s": out.pop("per_s"), **out}


def run_foreach(dsn: str, cfg: FanoutConfig, rows: int) -> dict[str, Any]:
    out = _single_instance(dsn, cfg, FOREACH, {"n": rows, "p": cfg.max_parallel}, rows)
    if out["children_completed"] != rows or out["results"] != rows:
        raise BenchError(f"foreach over {rows} rows: {out['children_completed']} rows "
                         f"completed, {out['results']} results")
    return {"rows_per_s": out.pop("per_s"), **out}


def run_independent(dsn: str, cfg: FanoutConfig, n: int) -> dict[str, Any]:
    """N one-step workflows started by cfg.starters concurrent starters."""
    counter = itertools.count(1)

    def start(c: psycopg.Connection[Any]) -> str:
        return str(_one(c, "SELECT df.start(%(q)s)", {"q": f"SELECT {next(counter)}"}))

    with Runtime(dsn, cfg.executors) as rt, psycopg.connect(dsn, autocommit=True) as conn:
        ready_s = rt.wait_ready(cfg.ready_timeout_s)
        assert rt.proc is not None
        ids: list[str] = []
        # Progress counts every finished instance but the ready probes already there, so it
        # moves while the starters are still starting (their ids are known only afterwards).
        probes = int(_one(conn, FINISHED, {}))

        def progress(c: psycopg.Connection[Any]) -> float:
            return (int(_one(c, FINISHED, {})) - probes) / n

        def finished() -> tuple[bool, tuple[int, int, float | None]]:
            rt.check_alive()
            row = conn.execute(INDEPENDENT_PROGRESS, {"ids": ids}).fetchone()
            assert row is not None
            return int(row[0]) >= n, (int(row[0]), int(row[1]), row[2])

        with Sampler(dsn, rt.proc.pid, progress, cfg.sample_every_s) as sampler:
            t0 = time.perf_counter()
            burst = start_concurrently(dsn, cfg.starters, n, start)
            ids.extend(burst.ids)
            _, failed, wall = until(finished, timeout=cfg.timeout_s, every=COMPLETION_POLL_S,
                                    what=f"{n} independent workflows finished")
            harness_wall = time.perf_counter() - t0
            sampler.final()
        after = _after(conn)
    if failed:
        raise BenchError(f"{failed} of {n} independent workflows failed")
    return {
        "workflows_per_s": round(n / wall, 1) if wall else None,
        "wall_s": round(wall, 3) if wall else None,
        "harness_wall_s": round(harness_wall, 3),
        "starters": cfg.starters,
        "starts_per_s": round(n / burst.started_s, 1),
        **sampler.figures(),
        **after,
        "ready_s": round(ready_s, 2),
        "supervisor_exit": rt.exit_code,
    }


# -- driver -----------------------------------------------------------------------------------

def _sizes_list(text: str, flag: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: comma-separated whole numbers, got {text!r}")
    if not values or min(values) < 1:
        p.error(f"{flag}: at least one size, each at least 1")
    return values


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="server to run on (may CREATE DATABASE); default: embedded")
    p.add_argument("--join-sizes", default="1000,10000",
                   help="branch counts N of the join (and of the independent comparison)")
    p.add_argument("--foreach-rows", type=int, default=100_000, help="rows R of the foreach")
    p.add_argument("--max-parallel", type=int, default=64, help="max_parallel of the foreach")
    p.add_argument("--executors", type=int, default=2, help="executors of the runtime (K)")
    p.add_argument("--starters", type=int, default=4,
                   help="concurrent starters of the independent workflows")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases, from {','.join(CASES)}")
    p.add_argument("--sample-every", type=float, default=0.5,
                   help="seconds between memory and progress samples")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds a case may take before it gives up with an error")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds the runtime gets to complete a first workflow")
    args = p.parse_args(argv)
    args.join_sizes = _sizes_list(args.join_sizes, "--join-sizes", p)
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_list if c not in CASES]
    if unknown or not args.case_list:
        p.error(f"--cases: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    for name in ("foreach_rows", "executors", "starters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.max_parallel <= 1000:
        p.error("--max-parallel must be from 1 to 1000 (df.foreach's bounds)")
    return args


def _plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(case, size) in run order: each join right beside its independent comparison."""
    plan = [(case, n) for n in args.join_sizes for case in ("join", "independent")
            if case in args.case_list]
    if "foreach" in args.case_list:
        plan.append(("foreach", args.foreach_rows))
    return plan


def _run_case(server: ServerUnderTest, case: str, size: int,
              cfg: FanoutConfig) -> dict[str, Any]:
    """One case in a fresh database; its figures, or {"error": ...} if it failed."""
    database = None
    run = {"join": run_join, "independent": run_independent, "foreach": run_foreach}[case]
    try:
        with server.scratch_database(f"fanout_{case}") as dsn:
            database = conninfo_to_dict(dsn).get("dbname")
            return {**run(dsn, cfg, size), "database": database}
    except BenchError as exc:
        return {"error": str(exc), "database": database}
    except Exception as exc:  # one broken case must not lose the others' figures
        return {"error": f"{type(exc).__name__}: {exc}", "database": database}


FIGURES = {"join": ("branches_per_s", "wall_s"), "independent": ("workflows_per_s", "wall_s"),
           "foreach": ("rows_per_s", "wall_s")}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cfg = FanoutConfig(executors=args.executors, starters=args.starters,
                       max_parallel=args.max_parallel, timeout_s=args.timeout,
                       ready_timeout_s=args.ready_timeout, sample_every_s=args.sample_every)
    server = ServerUnderTest(args.dsn) if args.dsn else ServerUnderTest.start_embedded()
    try:
        common = {"server": server.version(), "server_kind": server.kind, "cores": cores(),
                  "date": dt.date.today().isoformat()}
        lines: dict[tuple[str, int], dict[str, Any]] = {}
        for case, size in _plan(args):
            t0 = time.monotonic()
            figures = _run_case(server, case, size, cfg)
            line = {"bench": "fanout", "case": case, "size": size,
                    "executors": cfg.executors,
                    **({"max_parallel": cfg.max_parallel} if case == "foreach" else {}),
                    **dict.fromkeys(FIGURES[case]), **figures, **common,
                    "part_s": round(time.monotonic() - t0, 1)}
            lines[case, size] = line
            emit(line)
        ratios: dict[str, Any] = {"bench": "fanout_ratios"}
        for n in args.join_sizes:
            join = lines.get(("join", n), {}).get("branches_per_s")
            indep = lines.get(("independent", n), {}).get("workflows_per_s")
            ratios[f"join_over_independent_{n}"] = (
                round(join / indep, 3) if join and indep else None)
        emit({**ratios, **common})
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
