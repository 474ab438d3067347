"""Retention: the timer process prunes finished instances past df.settings.retention_days.

Pruning takes the whole tree of a finished root (child instances, nodes, commands) and never
a pending or running instance, however old.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from durable_actor import retention
from tests.helpers import until_sync
from tests.runtime import Runtime


def _start(c: psycopg.Connection[Any], graph: str) -> str:
    row = c.execute(f"SELECT df.start({graph})").fetchone()
    assert row is not None
    return str(row[0])


def _count(c: psycopg.Connection[Any], query: str, *args: Any) -> int:
    row = c.execute(query, args).fetchone()  # type: ignore[arg-type]
    return int(row[0]) if row else -1


def _tree(c: psycopg.Connection[Any], root: str) -> list[str]:
    return [r[0] for r in c.execute(
        "WITH RECURSIVE t AS (SELECT id FROM df.instances WHERE id = %s UNION ALL"
        " SELECT i.id FROM df.instances i JOIN t ON i.parent_id = t.id) SELECT id FROM t",
        (root,))]


def test_finished_instances_are_pruned_running_ones_never(fresh_dsn: str) -> None:
    with Runtime(fresh_dsn, executors=1, retention_interval=0.3) as rt, \
            psycopg.connect(fresh_dsn, autocommit=True) as c:
        done = _start(c, "$$SELECT 1 AS a$$ ~> $$SELECT 2 AS b$$")
        failed = _start(c, "$$SELECT 1/0$$")
        running = _start(c, "df.wait_for_signal('go')")
        until_sync(lambda: _count(c, "SELECT count(*) FROM df.instances WHERE id = ANY(%s)"
                                     " AND status IN ('completed', 'failed')",
                                  [done, failed]) == 2, timeout=20)
        # A child instance (as a branch run as its own actor has), finished with its root.
        c.execute("INSERT INTO df.instances (id, root_node, parent_id, status, finished_at)"
                  " VALUES ('c0ffee00', 'c0ffee01', %s, 'completed', now())", (done,))
        c.execute("INSERT INTO df.nodes (id, instance_id, node_type, status, submitted_by)"
                  " VALUES ('c0ffee01', 'c0ffee00', 'SQL', 'completed', current_user::regrole)")
        tree = _tree(c, done)
        assert len(tree) == 2
        # Make the running one look ancient: age alone never prunes it.
        c.execute("UPDATE df.instances SET created_at = now() - interval '1 year' WHERE id = %s",
                  (running,))
        # Within the default retention window nothing goes. A dead worker's row is the
        # witness that a pass has run since.
        c.execute("INSERT INTO df.workers (id, host, pid, role, last_seen_at)"
                  " VALUES ('gone:1:timer', 'gone', 1, 'timer', now() - interval '1 hour')")
        until_sync(lambda: _count(c, "SELECT count(*) FROM df.workers WHERE host = 'gone'") == 0,
                   timeout=10)
        assert _count(c, "SELECT count(*) FROM df.instances") == len(tree) + 2
        c.execute("UPDATE df.settings SET value = '0' WHERE name = 'retention_days'")
        until_sync(lambda: _count(c, "SELECT count(*) FROM df.instances WHERE id = ANY(%s)",
                                  [*tree, failed]) == 0, timeout=10)
        assert _count(c, "SELECT count(*) FROM df.nodes WHERE instance_id = ANY(%s)",
                      [*tree, failed]) == 0
        assert _count(c, "SELECT count(*) FROM df.commands WHERE instance_id = ANY(%s)",
                      [*tree, failed]) == 0
        assert c.execute("SELECT status FROM df.instances WHERE id = %s",
                         (running,)).fetchone() == ("running",)
        assert "retention_pruned" in rt.log()
        # The survivor still works.
        assert c.execute("SELECT df.signal(%s, 'go')", (running,)).fetchone() == ("OK",)
        until_sync(lambda: c.execute("SELECT status FROM df.instances WHERE id = %s",
                                     (running,)).fetchone() == ("completed",), timeout=20)


async def test_prune_respects_the_window_and_batches(fresh_dsn: str) -> None:
    """The query itself, with time moved instead of waited for."""
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("UPDATE df.settings SET value = '2' WHERE name = 'retention_days'")
        ids = [_start(c, "$$SELECT 1$$") for _ in range(5)]
        # Finished 1 and 3 days ago (as a dispatcher would have marked them), one still pending.
        c.execute("UPDATE df.instances SET status = 'completed', finished_at = now() - interval"
                  " '1 day', completed_at = now() - interval '1 day' WHERE id = ANY(%s)",
                  (ids[:2],))
        c.execute("UPDATE df.instances SET status = 'failed', finished_at = now() - interval"
                  " '3 days' WHERE id = ANY(%s)", (ids[2:4],))
    async with await psycopg.AsyncConnection.connect(fresh_dsn, autocommit=True) as ac:
        assert await retention.prune_once(ac, batch=1) == (2, 0)      # batches of one
        left = {r[0] async for r in await ac.execute("SELECT id FROM df.instances")}
        assert left == {ids[0], ids[1], ids[4]}
        later = datetime.now(UTC) + timedelta(days=1, hours=1)
        assert await retention.prune_once(ac, now=later) == (2, 0)
        assert {r[0] async for r in await ac.execute("SELECT id FROM df.instances")} == {ids[4]}
        await ac.execute("UPDATE df.settings SET value = '-1' WHERE name = 'retention_days'")
        assert await retention.prune_once(ac, now=later + timedelta(days=999)) == (0, 0)


def test_deleting_instances_deletes_their_nodes(fresh_dsn: str) -> None:
    """By hand as operations.md shows: the nodes of the instances deleted, and of their child
    instances, go in the same statement; no other instance's."""
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("UPDATE df.settings SET value = 'true' WHERE name = 'enable_superuser_instances'")
        gone, kept = _start(c, "$$SELECT 1$$ ~> $$SELECT 2$$"), _start(c, "$$SELECT 3$$")
        c.execute("INSERT INTO df.instances (id, root_node, parent_id)"
                  " VALUES ('c0ffee00', 'c0ffee01', %s)", (gone,))
        c.execute("INSERT INTO df.nodes (id, instance_id, node_type, submitted_by)"
                  " VALUES ('c0ffee01', 'c0ffee00', 'SQL', current_user::regrole)")
        nodes = "SELECT count(*) FROM df.nodes WHERE instance_id = ANY(%s)"
        assert (_count(c, nodes, [gone, "c0ffee00"]), _count(c, nodes, [kept])) == (4, 1)
        c.execute("DELETE FROM df.instances WHERE id = %s", (gone,))
        assert (_count(c, nodes, [gone, "c0ffee00"]), _count(c, nodes, [kept])) == (0, 1)
