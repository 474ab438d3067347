"""JOIN and RACE as child instances, signals through the family's inbox, cancel cascade —
run by the real runtime on a real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import psycopg
import pytest

from tests.helpers import one, result, start, until_sync, wait
from tests.runtime import Runtime

Conn = psycopg.Connection[Any]


def children(db: Conn, instance: str) -> list[dict[str, Any]]:
    cur = db.execute("SELECT * FROM df.instance_children(%s)", (instance,))
    cols = [d.name for d in cur.description or []]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def rows(*values: Any, col: str) -> dict[str, Any]:
    return {"rows": [{col: v} for v in values], "row_count": len(values)}


def sleeping(db: Conn, seconds: int) -> int:
    return int(one(db, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                       " AND query = %s", f"SELECT pg_sleep({seconds})"))


# -- JOIN -------------------------------------------------------------------------------------

def test_join_in_one_statement(db: Conn) -> None:
    out = one(db, "SELECT df.result(df.await_instance("
                  "df.start($$SELECT 1 AS a$$ & $$SELECT 2 AS b$$), 30))")
    assert json.loads(out) == [rows(1, col="a"), rows(2, col="b")]


@pytest.mark.parametrize(("expr", "shape"), [
    ("$$SELECT 1 AS v$$ & $$SELECT 2 AS v$$ & $$SELECT 3 AS v$$", [[1, 2], 3]),
    ("df.join3($$SELECT 1 AS v$$, $$SELECT 2 AS v$$, $$SELECT 3 AS v$$)", [1, 2, 3]),
    ("($$SELECT 1 AS v$$ ~> $$SELECT 2 AS v$$) & ($$SELECT 3 AS v$$ | $$SELECT 4 AS v$$)",
     [2, "race"]),
    ("df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g || ' AS v' FROM generate_series(1, 5) g))",
     [1, 2, 3, 4, 5]),
])
def test_result_shapes(db: Conn, expr: str, shape: Any) -> None:
    i = start(db, expr)
    assert wait(db, i) == "completed"

    def values(got: Any, want: Any) -> None:
        if want == "race":
            assert got in (rows(3, col="v"), rows(4, col="v"))
        elif isinstance(want, list):
            assert isinstance(got, list) and len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                values(g, w)
        else:
            assert got == rows(want, col="v")

    values(result(db, i), shape)


def test_nested_joins_run_as_grandchildren(db: Conn) -> None:
    i = start(db, "($$SELECT 1 AS v$$ & $$SELECT 2 AS v$$) & $$SELECT 3 AS v$$")
    assert wait(db, i) == "completed"
    kids = children(db, i)
    assert sorted(k["depth"] for k in kids) == [1, 1, 2, 2]
    assert {k["status"] for k in kids} == {"completed"}
    assert all(k["parent_id"] == i for k in kids if k["depth"] == 1)


def test_failing_branch_fails_the_join_and_cancels_the_others(db: Conn) -> None:
    i = start(db, "$$SELECT pg_sleep(30)$$ & $$SELECT 1/0$$")
    assert wait(db, i) == "failed"
    root = one(db, "SELECT error FROM df.nodes n JOIN df.instances i"
                   " ON i.id = n.instance_id AND n.id = i.root_node WHERE i.id = %s", i)
    assert root == "JOIN branch 2 failed: SQL execution failed: division by zero"
    until_sync(lambda: {k["branch"]: k["status"] for k in children(db, i)}
               == {1: "cancelled", 2: "failed"}, timeout=10)
    until_sync(lambda: sleeping(db, 30) == 0, timeout=10)   # the sleeper was interrupted


def test_join_of_1000_branches(db: Conn) -> None:
    i = start(db, "df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g || ' AS n'"
                  " FROM generate_series(1, 1000) g))")
    assert wait(db, i, 120) == "completed"
    out = result(db, i)
    assert [r["rows"][0]["n"] for r in out] == list(range(1, 1001))
    assert len(children(db, i)) == 1000


# -- RACE -------------------------------------------------------------------------------------

def test_race_winner_decides_and_the_losing_sleep_is_interrupted(db: Conn) -> None:
    i = start(db, "$$SELECT pg_sleep(40)$$ | ($$SELECT 7 AS w$$ |=> 'won')"
                  " ~> $$SELECT $won AS again$$")
    assert wait(db, i, 20) == "completed"
    assert result(db, i) == rows(7, col="again")      # the winner's name came back
    until_sync(lambda: sleeping(db, 40) == 0, timeout=10)
    assert {k["branch"]: k["status"] for k in children(db, i)} == {1: "cancelled",
                                                                   2: "completed"}


def test_race_first_failure_decides(db: Conn) -> None:
    i = start(db, "$$SELECT 1/0$$ | $$SELECT pg_sleep(40)$$")
    assert wait(db, i, 20) == "failed"
    assert "RACE left branch failed: SQL execution failed: division by zero" in one(
        db, "SELECT string_agg(error, ' ') FROM df.nodes WHERE instance_id = %s", i)
    until_sync(lambda: sleeping(db, 40) == 0, timeout=10)


# -- names, variables, break ------------------------------------------------------------------

def test_names_flow_into_branches_and_merge_after_the_join(db: Conn) -> None:
    i = start(db, "$$SELECT 10 AS x$$ |=> 'x'"
                  " ~> (($$SELECT $x + 1 AS y$$ |=> 'y') & ($$SELECT $x + 2 AS z$$ |=> 'z'))"
                  " ~> $$SELECT $x AS x, $y AS y, $z AS z$$")
    assert wait(db, i) == "completed"
    assert result(db, i) == {"rows": [{"x": 10, "y": 11, "z": 12}], "row_count": 1}


def test_variables_reach_branches(db: Conn) -> None:
    db.execute("SELECT df.setvar('who', 'branch')")
    try:
        i = start(db, "$$SELECT '{who}-1' AS v$$ & $$SELECT '{who}-2' AS v$$")
    finally:
        db.execute("SELECT df.clearvars()")
    assert wait(db, i) == "completed"
    assert result(db, i) == [rows("branch-1", col="v"), rows("branch-2", col="v")]


def test_break_in_a_branch_ends_the_loop_around_the_join(db: Conn) -> None:
    i = start(db, "df.loop($$SELECT pg_sleep(30)$$ & df.break('{\"stop\": 1}'))")
    assert wait(db, i, 20) == "completed"
    assert result(db, i) == {"stop": 1}
    until_sync(lambda: sleeping(db, 30) == 0, timeout=10)


def test_break_in_a_branch_without_a_loop_fails(db: Conn) -> None:
    i = start(db, "$$SELECT 1$$ & df.break()")
    assert wait(db, i) == "failed"
    assert "df.break() was called outside of a loop" in one(
        db, "SELECT string_agg(error, ' ') FROM df.nodes WHERE instance_id = %s", i)


def test_a_loop_of_joins_keeps_a_constant_number_of_rows(db: Conn) -> None:
    db.execute("CREATE TABLE loop_ticks (n serial PRIMARY KEY)")
    i = start(db, "df.loop(($$INSERT INTO loop_ticks DEFAULT VALUES$$ & $$SELECT 1$$),"
                  " $$SELECT count(*) < 4 FROM loop_ticks$$)")
    assert wait(db, i, 30) == "completed"
    assert one(db, "SELECT count(*) FROM loop_ticks") == 4
    # every iteration replaced the previous one's children
    assert one(db, "SELECT count(*) FROM df.instance_children(%s)", i) == 2


# -- signals ----------------------------------------------------------------------------------

def test_signal_sent_before_the_branches_exist_is_delivered(db: Conn) -> None:
    i = start(db, "$$SELECT pg_sleep(1)$$ ~> (df.wait_for_signal('go') & $$SELECT 1 AS v$$)")
    assert one(db, "SELECT df.signal(%s, 'go', '{\"early\": true}')", i) == "OK"
    assert wait(db, i) == "completed"
    assert result(db, i)[0] == {"signal_name": "go", "timed_out": False,
                                "data": {"early": True}}


def test_signal_after_the_wait_reaches_a_race_branch(db: Conn) -> None:
    i = start(db, "df.wait_for_signal('pick') | $$SELECT pg_sleep(40)$$")
    until_sync(lambda: any(r[0] == "running" for r in db.execute(
        "SELECT n.status FROM df.instances c JOIN df.nodes n ON n.instance_id = c.id"
        " WHERE c.parent_id = %s AND n.node_type = 'SIGNAL'", (i,))), timeout=10)
    db.execute("SELECT df.signal(%s, 'pick', 'late')", (i,))
    assert wait(db, i, 20) == "completed"
    assert result(db, i) == {"signal_name": "pick", "timed_out": False, "data": "late"}
    until_sync(lambda: sleeping(db, 40) == 0, timeout=10)


def test_signals_keep_their_order_per_name_in_a_branch(db: Conn) -> None:
    i = start(db, "(df.wait_for_signal('n') |=> 'a' ~> df.wait_for_signal('n') |=> 'b'"
                  " ~> $$SELECT $a.data AS first, $b.data AS second$$) & $$SELECT 1$$")
    db.execute("SELECT df.signal(%s, 'n', '1'), df.signal(%s, 'n', '2')", (i, i))
    assert wait(db, i) == "completed"
    got = result(db, i)[0]["rows"][0]
    assert (got["first"], got["second"]) in ((1, 2), ("1", "2"))


def test_signal_timeout_in_a_branch(db: Conn) -> None:
    i = start(db, "df.wait_for_signal('never', 1) & $$SELECT 1 AS v$$")
    assert wait(db, i) == "completed"
    assert result(db, i)[0] == {"signal_name": "never", "timed_out": True, "data": None}


def test_signal_to_a_finished_family_is_accepted_and_discarded(db: Conn) -> None:
    i = start(db, "$$SELECT 1$$ & $$SELECT 2$$")
    assert wait(db, i) == "completed"
    kid = children(db, i)[0]["child_id"]
    assert one(db, "SELECT df.signal(%s, 'late', '{}')", i) == "OK"
    assert one(db, "SELECT df.signal(%s, 'late', '{}')", kid) == "OK"
    assert one(db, "SELECT count(*) FROM df.mailbox WHERE instance_id IN (%s, %s)", i, kid) == 0


# -- cancel and visibility --------------------------------------------------------------------

def test_cancel_reaches_every_descendant_and_interrupts_their_steps(db: Conn) -> None:
    i = start(db, "$$SELECT pg_sleep(50)$$ & ($$SELECT pg_sleep(50)$$ | df.wait_for_signal('x'))")
    until_sync(lambda: sleeping(db, 50) == 2, timeout=15)
    assert one(db, "SELECT df.cancel(%s, 'enough')", i) == f"Instance {i} cancelled: enough"
    assert one(db, "SELECT status FROM df.instances WHERE id = %s", i) == "cancelled"
    assert {k["status"] for k in children(db, i)} == {"cancelled"}
    until_sync(lambda: sleeping(db, 50) == 0, timeout=10)
    until_sync(lambda: one(db, "SELECT count(*) FROM df.tasks t JOIN df._family(%s) f"
                               " ON f.instance_id = t.instance_id", i) == 0, timeout=10)
    assert one(db, "SELECT status FROM df.instances WHERE id = %s", i) == "cancelled"


def test_children_are_visible_with_their_parent(db: Conn) -> None:
    i = start(db, "$$SELECT 1 AS v$$ & $$SELECT 2 AS v$$")
    assert wait(db, i) == "completed"
    kids = children(db, i)
    assert [k["branch"] for k in kids] == [1, 2] and {k["parent_id"] for k in kids} == {i}
    listed = [r[0] for r in db.execute("SELECT instance_id FROM df.list_instances(NULL, 1000)")]
    assert i in listed and not {k["child_id"] for k in kids} & set(listed)
    statuses = [r[0] for r in db.execute(
        "SELECT status FROM df.instance_nodes(%s)", (i,))]
    assert statuses == ["completed"] * 3
    tree = one(db, "SELECT df.explain(%s)", i)
    graph = tree.split("Child instances")[0]
    assert graph.count("✓") == 4 and "branch 2:" in graph    # the instance and its 3 nodes


# -- crashes ----------------------------------------------------------------------------------

def test_kill_9_of_an_executor_during_a_200_branch_join(db: Conn, runtime: Runtime) -> None:
    db.execute("CREATE TABLE join_ledger (branch int PRIMARY KEY)")
    i = start(db, "df.join(VARIADIC ARRAY(SELECT 'INSERT INTO join_ledger VALUES (' || g"
                  " || ') RETURNING branch' FROM generate_series(1, 200) g))")
    until_sync(lambda: one(db, "SELECT count(*) FROM join_ledger") > 20, timeout=30)
    for pid in runtime.pids("executor"):
        os.kill(pid, signal.SIGKILL)
    assert wait(db, i, 120) == "completed"     # the supervisor restarted the executors
    assert one(db, "SELECT count(*) FROM join_ledger") == 200   # each exactly once (PK)
    assert [r["rows"][0]["branch"] for r in result(db, i)] == list(range(1, 201))


# -- FOREACH ----------------------------------------------------------------------------------

def test_foreach_runs_the_body_once_per_row_in_order(db: Conn) -> None:
    i = start(db, "$$SELECT g AS id, 'u' || g AS url FROM generate_series(1, 6) g$$ |=> 'doc'"
                  " ~> df.foreach('doc', $$SELECT $doc.id * 10 AS x, $doc.url AS u$$, 2)")
    assert wait(db, i) == "completed"
    assert result(db, i) == [{"rows": [{"x": 10 * g, "u": f"u{g}"}], "row_count": 1}
                             for g in range(1, 7)]
    assert len(children(db, i)) == 6


def test_foreach_never_runs_more_than_max_parallel_rows(db: Conn) -> None:
    i = start(db, "df.foreach_query($$SELECT g FROM generate_series(1, 12) g$$, 'r',"
                  " $$SELECT pg_sleep(0.05), $r.g AS g$$, max_parallel => 3)")
    most = 0

    def watch() -> bool:
        nonlocal most
        most = max(most, one(db, "SELECT count(*) FROM df.instances WHERE parent_id = %s"
                                 " AND status IN ('pending', 'running')", i))
        return one(db, "SELECT status FROM df.instances WHERE id = %s", i) == "completed"

    until_sync(watch, timeout=60, every=0.005)
    assert 1 <= most <= 3
    assert [r["rows"][0]["g"] for r in result(db, i)] == list(range(1, 13))


def test_foreach_query_sees_earlier_names_and_nests(db: Conn) -> None:
    i = start(db, "$$SELECT 100 AS base$$ |=> 'b' ~> df.foreach_query("
                  "$$SELECT $b.base + g AS v FROM generate_series(1, 2) g$$, 'r',"
                  " df.foreach_query($$SELECT $r.v * 10 + g AS w FROM generate_series(1, 2) g$$,"
                  " 'q', $$SELECT $q.w AS w$$))")
    assert wait(db, i) == "completed"
    assert [[x["rows"][0]["w"] for x in inner] for inner in result(db, i)] == [
        [1011, 1012], [1021, 1022]]


def test_foreach_over_no_rows_completes_empty(db: Conn) -> None:
    i = start(db, "$$SELECT 1 AS id WHERE false$$ |=> 'none' ~> df.foreach('none', $$SELECT 1$$)")
    assert wait(db, i) == "completed"
    assert result(db, i) == []


def test_a_failing_row_fails_the_foreach(db: Conn) -> None:
    i = start(db, "df.foreach_query($$SELECT g FROM generate_series(1, 5) g$$, 'r',"
                  " $$SELECT 10 / ($r.g - 3) AS v$$, 1)")
    assert wait(db, i) == "failed"
    assert "FOREACH row 3 failed: SQL execution failed: division by zero" in one(
        db, "SELECT string_agg(error, ' ') FROM df.nodes WHERE instance_id = %s", i)
    assert one(db, "SELECT count(*) FROM df.foreach_rows WHERE instance_id = %s", i) == 0


def test_foreach_above_the_results_limit_reports_counts(db: Conn) -> None:
    db.execute("CREATE TABLE foreach_ledger (n int PRIMARY KEY)")
    i = start(db, "df.foreach_query($$SELECT g FROM generate_series(1, 1500) g$$, 'r',"
                  " $$INSERT INTO foreach_ledger VALUES ($r.g)$$, max_parallel => 100)")
    assert wait(db, i, 240) == "completed"
    assert result(db, i) == {"row_count": 1500, "completed": 1500}
    assert one(db, "SELECT count(*) FROM foreach_ledger") == 1500
    assert one(db, "SELECT count(*) FROM df.foreach_rows WHERE instance_id = %s", i) == 0


def test_foreach_is_checked_when_built_and_explained(db: Conn) -> None:
    with pytest.raises(psycopg.Error, match="max_parallel must be from 1 to 1000, got 0"):
        db.execute("SELECT df.foreach('doc', 'SELECT 1', 0)")
    with pytest.raises(psycopg.Error, match="row name 'a b' is not a valid identifier"):
        db.execute("SELECT df.foreach('a b', 'SELECT 1')")
    with pytest.raises(psycopg.Error, match="FOREACH node needs a body"):
        db.execute("SELECT df.start(%s)", ('{"node_type":"FOREACH",'
                                             '"query":"{\\"name\\":\\"d\\",\\"max_parallel\\":2}"}',))
    text = one(db, "SELECT df.explain(df.foreach('doc', $$SELECT $doc.id$$, 4))")
    assert "FOREACH row 'doc' of $doc (4 at a time)" in text and "per row:" in text


def test_explain_lists_the_child_instances(db: Conn) -> None:
    i = start(db, "$$SELECT 1$$ & ($$SELECT 2$$ & $$SELECT 3$$)")
    assert wait(db, i) == "completed"
    text = one(db, "SELECT df.explain(%s)", i)
    kids = children(db, i)
    assert "Child instances (4):" in text
    assert all(k["child_id"] in text for k in kids)
    assert text.count("(JOIN ") == 4 and " branch 2) completed" in text
