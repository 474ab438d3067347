"""Idle cost of a supervisor: CPU % and database transactions per second while nothing happens.

Creates a scratch database on the server named by --dsn (or DURABLE_ACTOR_BENCH_DSN), applies
the schema, runs `durable-actor supervise` on it with no work, lets it settle for --warmup
seconds (idle processes back off their polling), then measures for --seconds:

- cpu_percent: user + system CPU ticks of the supervisor and its processes (/proc/<pid>/stat),
  as a percentage of one core;
- xacts_per_second: commits + rollbacks of the scratch database (pg_stat_database), read from
  another database so the measuring itself does not count. Every runtime query is one
  transaction, so this is the runtime's queries per second.

Prints one JSON line; drops the scratch database. Needs a server where it may CREATE DATABASE.

    python bench/idle.py --dsn postgresql://postgres@localhost/postgres --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

CLI = Path(sys.executable).with_name("durable-actor")
TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])      # utime, stime
    return total


def _xacts(admin: psycopg.Connection, dbname: str) -> int:
    admin.execute("SELECT pg_stat_clear_snapshot()")
    row = admin.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                        " WHERE datname = %s", (dbname,)).fetchone()
    return int(row[0]) if row else 0


def measure(dsn: str, *, seconds: float, warmup: float, executors: int,
            idle_poll: float | None = None) -> dict[str, object]:
    dbname = f"durable_actor_idle_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            target = make_conninfo(dsn, dbname=dbname)
            env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ACTOR_")}
            if idle_poll is not None:
                env["DURABLE_ACTOR_IDLE_POLL_INTERVAL"] = str(idle_poll)
            subprocess.run([str(CLI), "migrate", "--dsn", target], check=True, env=env,
                           capture_output=True, timeout=120)
            proc = subprocess.Popen([str(CLI), "supervise", "--dsn", target, "--executors",
                                     str(executors), "--log-level", "warning"], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                deadline = time.monotonic() + 60
                with psycopg.connect(target, autocommit=True) as c:
                    while c.execute("SELECT count(*) FROM df.workers").fetchone() != (
                            executors + 2,):
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise SystemExit("the supervisor did not start")
                        time.sleep(0.1)
                time.sleep(warmup)
                pids = [proc.pid, *_children(proc.pid)]
                x0, c0, t0 = _xacts(admin, dbname), _cpu_ticks(pids), time.monotonic()
                time.sleep(seconds)
                x1, c1, t1 = _xacts(admin, dbname), _cpu_ticks(pids), time.monotonic()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbname)))
    elapsed = t1 - t0
    return {
        "seconds": round(elapsed, 2),
        "warmup": warmup,
        "executors": executors,
        "idle_poll_interval": idle_poll,
        "processes": len(pids),
        "cpu_percent": round((c1 - c0) / TICKS / elapsed * 100, 3),
        "xacts_per_second": round((x1 - x0) / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DURABLE_ACTOR_BENCH_DSN"),
                        help="server where a scratch database may be created")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds to let idle back-off settle before measuring")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--idle-poll-interval", type=float, default=None,
                        help="DURABLE_ACTOR_IDLE_POLL_INTERVAL for the run (0.5: no back-off)")
    args = parser.parse_args()
    if not args.dsn:
        parser.error("--dsn or DURABLE_ACTOR_BENCH_DSN is required")
    print(json.dumps(measure(args.dsn, seconds=args.seconds, warmup=args.warmup,
                             executors=args.executors, idle_poll=args.idle_poll_interval)),
          flush=True)


if __name__ == "__main__":
    main()
