"""What `durable-actor status`, `top`, `explain`, `cancel` and `signal` show and do.

Each is a few statements over the SQL API (df.metrics, df.runtime_metrics, df.workers,
df.list_instances, df.explain, df.cancel, df.signal) on one short-lived connection, so the
views see exactly what a psql user with the same role sees. Rendering is plain text for a
terminal, or JSON (`--json`) for scripts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

STATUSES = ("pending", "running", "completed", "failed", "cancelled")


def snapshot(conn: psycopg.Connection[Any], *, recent: int = 0) -> dict[str, Any]:
    """Instances by status, queue depths, live workers (and the `recent` newest instances)."""
    cur = conn.cursor(row_factory=dict_row)
    figures: dict[tuple[str, str | None], float] = {
        (r["metric"], r["label"]): r["value"]
        for r in cur.execute("SELECT metric, label, value FROM df.runtime_metrics")}
    totals = cur.execute("SELECT * FROM df.metrics()").fetchone() or {}
    workers = cur.execute(
        "SELECT host, pid, role, started_at, last_seen_at,"
        " extract(epoch FROM now() - last_seen_at)::float8 AS silent_for,"
        " last_seen_at > now() - interval '30 seconds' AS live"
        " FROM df.workers ORDER BY host, role, pid").fetchall()
    out: dict[str, Any] = {
        "instances": {s: int(figures.get(("instances", s), 0)) for s in STATUSES},
        "total_instances": int(totals.get("total_instances") or 0),
        "total_executions": int(totals.get("total_executions") or 0),
        "queues": {q: int(figures.get(("queue_depth", q), 0))
                   for q in ("mailbox", "tasks", "timers", "timers_due")},
        "oldest_task_age_seconds": round(figures.get(("oldest_task_age_seconds", None), 0.0), 3),
        "workers": [{"host": w["host"], "pid": w["pid"], "role": w["role"],
                     "started_at": _iso(w["started_at"]),
                     "silent_for": round(w["silent_for"], 1), "live": w["live"]}
                    for w in workers],
    }
    if recent:
        out["recent"] = [
            {"instance_id": r["instance_id"], "label": r["label"], "status": r["status"],
             "execution_count": r["execution_count"], "created_at": _iso(r["created_at"])}
            for r in cur.execute(
                "SELECT instance_id, label, status, execution_count, created_at"
                " FROM df.list_instances(NULL, %s, NULL, NULL)", (recent,))]
    conn.commit()
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def render(snap: dict[str, Any]) -> str:
    lines = ["instances  " + "  ".join(f"{s} {snap['instances'][s]}" for s in STATUSES)
             + f"  (total {snap['total_instances']}, executions {snap['total_executions']})"]
    q = snap["queues"]
    lines.append(f"queues     mailbox {q['mailbox']}  tasks {q['tasks']} (oldest "
                 f"{snap['oldest_task_age_seconds']:g} s)  timers {q['timers']} "
                 f"(due {q['timers_due']})")
    live = [w for w in snap["workers"] if w["live"]]
    lines.append(f"workers    {len(live)} live, {len(snap['workers']) - len(live)} silent")
    if snap["workers"]:
        lines.append(f"  {'host':<24} {'pid':>8} {'role':<11} {'last seen':>10}")
        for w in snap["workers"]:
            mark = "" if w["live"] else "  (silent: dead?)"
            lines.append(f"  {w['host'][:24]:<24} {w['pid']:>8} {w['role']:<11} "
                         f"{w['silent_for']:>8.1f} s{mark}")
    if "recent" in snap:
        lines.append("recent instances")
        lines.append(f"  {'id':<8} {'status':<10} {'runs':>5} {'created':<20} label")
        for r in snap["recent"]:
            created = (r["created_at"] or "")[:19].replace("T", " ")
            lines.append(f"  {r['instance_id']:<8} {r['status']:<10} {r['execution_count']:>5} "
                         f"{created:<20} {r['label'] or ''}")
    return "\n".join(lines)


def explain(conn: psycopg.Connection[Any], target: str) -> str:
    row = conn.execute("SELECT df.explain(%s)", (target,)).fetchone()
    return str(row[0]) if row and row[0] is not None else ""


def cancel(conn: psycopg.Connection[Any], instance_id: str, reason: str | None) -> str:
    if reason is None:
        row = conn.execute("SELECT df.cancel(%s)", (instance_id,)).fetchone()
    else:
        row = conn.execute("SELECT df.cancel(%s, %s)", (instance_id, reason)).fetchone()
    conn.commit()
    return str(row[0]) if row else ""


def signal(conn: psycopg.Connection[Any], instance_id: str, name: str,
           payload: str | None) -> str:
    if payload is None:
        row = conn.execute("SELECT df.signal(%s, %s)", (instance_id, name)).fetchone()
    else:
        row = conn.execute("SELECT df.signal(%s, %s, %s)", (instance_id, name, payload)).fetchone()
    conn.commit()
    return str(row[0]) if row else ""
