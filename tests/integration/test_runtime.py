"""Workflows run end to end by the real runtime on a real PostgreSQL, one node type at a time."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from durable_actor.steps import sql as sql_step
from tests.helpers import one, result, start, until_sync, wait


def nodes(db: psycopg.Connection[Any], instance: str) -> list[dict[str, Any]]:
    cur = db.execute("SELECT node_type, status, result, error FROM df.nodes"
                     " WHERE instance_id = %s ORDER BY position", (instance,))
    cols = [d.name for d in cur.description or []]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def test_named_result_flows_into_the_next_step(db: psycopg.Connection[Any]) -> None:
    i = start(db, "$$SELECT 1 AS a$$ |=> 'x' ~> $$SELECT $x.a + 1 AS b$$")
    assert wait(db, i) == "completed"
    assert result(db, i) == {"rows": [{"b": 2}], "row_count": 1}
    assert db.execute("SELECT df.status(%s)", (i,)).fetchone() == ("completed",)


def test_result_keeps_select_list_order(db: psycopg.Connection[Any]) -> None:
    i = start(db, "$$SELECT 'z' AS zed, 1 AS a$$ |=> 'r' ~> $$SELECT $r AS first$$")
    assert wait(db, i) == "completed"
    raw = db.execute("SELECT df.result(%s)", (i,)).fetchone()
    assert raw is not None and json.loads(raw[0]) == {"rows": [{"first": "z"}], "row_count": 1}


def test_failing_step_fails_node_ancestors_and_instance(db: psycopg.Connection[Any]) -> None:
    i = start(db, "$$SELECT 1/0$$ ~> $$SELECT 2$$")
    assert wait(db, i) == "failed"
    assert result(db, i) is None
    rows = nodes(db, i)
    assert [r["status"] for r in rows] == ["failed", "failed", "pending"]
    assert rows[1]["error"] == "SQL execution failed: division by zero"
    assert rows[1]["result"] == "SQL execution failed: division by zero"
    assert rows[0]["error"] == "SQL execution failed: division by zero"


def test_if_operators_take_the_right_arm(db: psycopg.Connection[Any]) -> None:
    yes = start(db, "$$SELECT true$$ ?> $$SELECT 'yes' AS v$$ !> $$SELECT 'no' AS v$$")
    no = start(db, "df.if($$SELECT 0$$, $$SELECT 'yes' AS v$$, $$SELECT 'no' AS v$$)")
    assert wait(db, yes) == wait(db, no) == "completed"
    assert result(db, yes) == {"rows": [{"v": "yes"}], "row_count": 1}
    assert result(db, no) == {"rows": [{"v": "no"}], "row_count": 1}


def test_if_rows(db: psycopg.Connection[Any]) -> None:
    i = start(db, "$$SELECT 1 WHERE false$$ |=> 'd' ~> df.if_rows('d', $$SELECT 'some'$$,"
                  " $$SELECT 'none' AS v$$)")
    assert wait(db, i) == "completed"
    assert result(db, i) == {"rows": [{"v": "none"}], "row_count": 1}


def test_join_and_race(db: psycopg.Connection[Any]) -> None:
    j = start(db, "$$SELECT 1 AS a$$ & $$SELECT 2 AS b$$")
    r = start(db, "$$SELECT pg_sleep(20)$$ | $$SELECT 7 AS w$$")
    assert wait(db, j) == "completed"
    assert result(db, j) == [{"rows": [{"a": 1}], "row_count": 1},
                             {"rows": [{"b": 2}], "row_count": 1}]
    assert wait(db, r, 10) == "completed"
    assert result(db, r) == {"rows": [{"w": 7}], "row_count": 1}
    # the losing pg_sleep is interrupted, not left running for 20 s
    until_sync(lambda: not db.execute(
        "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)'"
        " AND state = 'active'").fetchone(), timeout=5)


def test_loop_with_condition_and_break(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS loop_ticks (n int)")
    counted = start(db, "df.loop($$INSERT INTO loop_ticks VALUES (1)$$,"
                        " $$SELECT count(*) < 2 FROM loop_ticks$$)")
    broken = start(db, "df.loop($$SELECT 1$$ ~> df.break('done'))")
    assert wait(db, broken) == "completed"
    assert result(db, broken) == "done"
    assert wait(db, counted) == "completed"
    assert db.execute("SELECT count(*) FROM loop_ticks").fetchone() == (2,)
    row = db.execute("SELECT execution_count FROM df.list_instances(NULL, 100)"
                     " WHERE instance_id = %s", (counted,)).fetchone()
    assert row == (2,)


def test_break_outside_a_loop_fails_at_run_time(db: psycopg.Connection[Any]) -> None:
    i = start(db, "$$SELECT 1$$ ~> df.break()")
    assert wait(db, i) == "failed"
    assert any(n["error"] == "df.break() was called outside of a loop" for n in nodes(db, i))


def test_sleep(db: psycopg.Connection[Any]) -> None:
    i = start(db, "df.sleep(1) ~> $$SELECT 'after' AS v$$")
    assert wait(db, i) == "completed"
    slept = [n for n in nodes(db, i) if n["node_type"] == "SLEEP"][0]
    assert slept["result"] == {"slept": True, "seconds": 1}


def test_signal_sent_before_the_wait_is_delivered(db: psycopg.Connection[Any]) -> None:
    i = start(db, "df.sleep(1) ~> df.wait_for_signal('go')")
    assert db.execute("SELECT df.signal(%s, 'go', '{\"ok\": true}')", (i,)).fetchone() == ("OK",)
    assert wait(db, i) == "completed"
    assert result(db, i) == {"signal_name": "go", "timed_out": False, "data": {"ok": True}}


def test_signal_timeout_and_signal_after_end(db: psycopg.Connection[Any]) -> None:
    i = start(db, "df.wait_for_signal('never', 1)")
    assert wait(db, i) == "completed"
    assert result(db, i) == {"signal_name": "never", "timed_out": True, "data": None}
    assert db.execute("SELECT df.signal(%s, 'never')", (i,)).fetchone() == ("OK",)


def test_cancel_interrupts_a_running_step(db: psycopg.Connection[Any]) -> None:
    i = start(db, "$$SELECT pg_sleep(30)$$ ~> $$SELECT 1$$")
    until_sync(lambda: db.execute("SELECT status FROM df.nodes WHERE instance_id = %s"
                                  " AND node_type = 'SQL' AND status = 'running'", (i,)).fetchone())
    msg = db.execute("SELECT df.cancel(%s, 'enough')", (i,)).fetchone()
    assert msg == (f"Instance {i} cancelled: enough",)
    assert db.execute("SELECT df.status(%s)", (i,)).fetchone() == ("cancelled",)
    assert wait(db, i) == "cancelled"
    until_sync(lambda: not db.execute(
        "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
        " AND state = 'active'").fetchone(), timeout=5)
    # cancelling again changes nothing
    assert db.execute("SELECT df.status(%s)", (i,)).fetchone() == ("cancelled",)


def test_the_next_step_runs_where_the_step_ran(db: psycopg.Connection[Any]) -> None:
    # The executor carries the instance on in the transaction of the step that finished:
    # no hop through the dispatcher, one commit for both.
    i = start(db, "$$SELECT txid_current() AS t$$ |=> 'a'"
                  " ~> $$SELECT $a.t AS first, txid_current() AS t$$")
    assert wait(db, i) == "completed"
    row = result(db, i)["rows"][0]
    assert row["first"] == row["t"]


def test_what_a_step_leaves_in_the_session_is_gone_for_the_next_step(
        db: psycopg.Connection[Any]) -> None:
    # The steps share one transaction and one connection (carried on). A step's clean-up
    # travels with the runtime's next statement; the next step must not see its leftovers.
    i = start(db, "$$PREPARE leftover AS SELECT 1$$"
                  " ~> $$SELECT pg_advisory_lock(4242), txid_current() AS t$$ |=> 'a'"
                  " ~> $$SET search_path = pg_temp$$"
                  " ~> $$CREATE TEMP TABLE leftover (x int)$$"
                  " ~> $$SELECT $a.t = txid_current() AS same_transaction,"
                  "  (SELECT count(*) FROM pg_prepared_statements) AS prepared,"
                  "  (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                  "     AND pid = pg_backend_pid()) AS advisory,"
                  "  current_setting('search_path') <> 'pg_temp' AS search_path_reset,"
                  "  to_regclass('pg_temp.leftover') IS NULL AS temp_gone,"
                  "  current_user = session_user AS own_role$$")
    assert wait(db, i) == "completed"
    assert result(db, i)["rows"] == [{
        "same_transaction": True, "prepared": 0, "advisory": 0, "search_path_reset": True,
        "temp_gone": True, "own_role": True}]


@pytest.mark.parametrize("statement", [
    "COMMIT", "  -- a comment\n rollback", "/* c */ RELEASE SAVEPOINT df_step",
    "SAVEPOINT mine", "BEGIN", "END", "start transaction", "PREPARE TRANSACTION 'x'"])
def test_a_step_cannot_control_its_transaction(db: psycopg.Connection[Any],
                                               statement: str) -> None:
    # A COMMIT would commit the batch's earlier steps without their completions.
    db.execute("CREATE TABLE IF NOT EXISTS tx_control_ledger (n int)")
    i = start(db, "$$INSERT INTO tx_control_ledger VALUES (1)$$ ~> df.sql(%s) ~> $$SELECT 2$$",
              statement)
    assert wait(db, i) == "failed"
    failed = [r for r in nodes(db, i) if r["node_type"] == "SQL" and r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith(
        "SQL execution failed: a step cannot control the transaction it runs in"), failed
    # the step before it took effect once, the step after it never ran
    assert [r["status"] for r in nodes(db, i) if r["node_type"] == "SQL"] == [
        "completed", "failed", "pending"]


def test_transaction_control_is_told_apart_from_other_statements() -> None:
    for query in ("SELECT 'COMMIT'", "DO $$BEGIN PERFORM 1; END$$", "ENDLESS",
                  "-- COMMIT\nSELECT 1", "WITH x AS (SELECT 1) SELECT * FROM x",
                  "PREPARE p AS SELECT 1"):
        sql_step.check_not_transaction_control(query)


def test_a_step_whose_clean_up_fails_fails_alone(db: psycopg.Connection[Any]) -> None:
    # A cursor left open over a temporary table makes the clean-up's DISCARD TEMP fail. The
    # clean-up travels with the next round trip, whose failure redoes the batch, this time
    # with each step's clean-up inside the step: the step fails with that error, rolled back.
    db.execute("CREATE TABLE IF NOT EXISTS cleanup_ledger (step text)")
    db.execute("""CREATE OR REPLACE FUNCTION open_over_temp() RETURNS refcursor
                  LANGUAGE plpgsql AS $f$
                  DECLARE c refcursor := 'left_open';
                  BEGIN
                      CREATE TEMP TABLE IF NOT EXISTS held (x int);
                      INSERT INTO cleanup_ledger VALUES ('second');
                      OPEN c FOR SELECT * FROM held;
                      RETURN c;
                  END $f$""")
    i = start(db, "$$INSERT INTO cleanup_ledger VALUES ('first')$$"
                  " ~> $$SELECT open_over_temp()::text AS c$$ ~> $$SELECT 2 AS b$$")
    assert wait(db, i) == "failed"
    steps = [r for r in nodes(db, i) if r["node_type"] == "SQL"]
    assert [r["status"] for r in steps] == ["completed", "failed", "pending"]
    assert steps[1]["error"] == ('SQL execution failed: cannot DROP TABLE "held" because it is'
                                 " being used by active queries in this session")
    assert db.execute("SELECT step FROM cleanup_ledger").fetchall() == [("first",)]


def test_cancel_stops_a_chain_of_steps_and_ends_cancelled(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS chain_ticks (n int)")
    i = start(db, " ~> ".join(["$$INSERT INTO chain_ticks SELECT 1 FROM pg_sleep(0.02)$$"] * 200))
    until_sync(lambda: one(db, "SELECT count(*) >= 30 FROM chain_ticks"))
    assert db.execute("SELECT df.cancel(%s)", (i,)).fetchone() == (
        f"Instance {i} cancelled: Cancelled by user",)
    assert wait(db, i) == "cancelled"
    until_sync(lambda: not db.execute("SELECT 1 FROM df.tasks WHERE instance_id = %s",
                                      (i,)).fetchone())
    ticks = one(db, "SELECT count(*) FROM chain_ticks")
    assert wait(db, start(db, "$$SELECT 1$$ ~> $$SELECT 2$$")) == "completed"
    assert one(db, "SELECT count(*) FROM chain_ticks") == ticks
    assert one(db, "SELECT df.status(%s)", i) == "cancelled"
    # the step the cancel interrupted failed as cancelled, not with its own error
    assert not db.execute("SELECT 1 FROM df.nodes WHERE instance_id = %s AND status = 'failed'"
                          " AND error NOT LIKE 'Cancelled: %%'", (i,)).fetchone()


def test_variables_are_snapshotted_at_start(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT df.setvar('who', 'world')")
    i = start(db, "$$SELECT 'hello {who}' AS v$$")
    db.execute("SELECT df.setvar('who', 'changed')")
    assert wait(db, i) == "completed"
    assert result(db, i) == {"rows": [{"v": "hello world"}], "row_count": 1}
    db.execute("SELECT df.clearvars()")


def test_statement_that_cannot_run_in_a_transaction(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS vac_me (x int)")
    i = start(db, "$$VACUUM vac_me$$ ~> $$SELECT 'vacuumed' AS v$$")
    assert wait(db, i) == "completed"
    assert result(db, i) == {"rows": [{"v": "vacuumed"}], "row_count": 1}


def test_steps_in_another_database(db: psycopg.Connection[Any], server: Any) -> None:
    other = server.create_database()
    try:
        with psycopg.connect(server.dsn_for(other), autocommit=True) as o:
            o.execute("CREATE TABLE marks (v text)")
        i = start(db, "$$INSERT INTO marks VALUES ('here')$$ ~> $$SELECT count(*) AS n FROM marks$$,"
                      " database => %s", other)
        assert wait(db, i) == "completed"
        assert result(db, i) == {"rows": [{"n": 1}], "row_count": 1}
    finally:
        server.drop_database(other)


def test_start_with_new_transaction_survives_rollback(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    with psycopg.connect(db.info.dsn) as c:   # not autocommit: an explicit transaction
        row = c.execute("SELECT df.start($$SELECT 'kept' AS v$$, transaction_mode => 'new')"
                        ).fetchone()
        c.rollback()
    assert row is not None
    assert wait(db, row[0]) == "completed"
    assert result(db, row[0]) == {"rows": [{"v": "kept"}], "row_count": 1}


def test_caller_transaction_rollback_discards_the_instance(db: psycopg.Connection[Any]) -> None:
    with psycopg.connect(db.info.dsn) as c:
        row = c.execute("SELECT df.start($$SELECT 1$$)").fetchone()
        c.rollback()
    assert row is not None
    assert db.execute("SELECT df.status(%s)", (row[0],)).fetchone() == (None,)


def test_await_in_the_starting_transaction_hands_the_instance_over(
        db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    with psycopg.connect(db.info.dsn) as c:
        row = c.execute("SELECT i, df.await_instance(i, 30), df.result(i)"
                        " FROM df.start($$SELECT 'inline' AS v$$) AS i").fetchone()
        c.commit()
    assert row is not None and row[1] == "completed"
    assert json.loads(row[2]) == {"rows": [{"v": "inline"}], "row_count": 1}
    # committed as completed: the runtime never runs it a second time
    assert db.execute("SELECT status FROM df.instances WHERE id = %s",
                      (row[0],)).fetchone() == ("completed",)
    assert db.execute("SELECT count(*) FROM df.mailbox WHERE instance_id = %s",
                      (row[0],)).fetchone() == (0,)


def test_await_errors(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.Error, match="Instance not found: ffffffff"):
        db.execute("SELECT df.await_instance('ffffffff', 1)")
    i = start(db, "df.sleep(5)")
    with pytest.raises(psycopg.Error, match=rf"Timeout after 1s waiting for instance {i}"):
        db.execute("SELECT df.await_instance(%s, 1)", (i,))
    with pytest.raises(psycopg.Error, match="timeout_seconds"):
        db.execute("SELECT df.await_instance(%s, 0)", (i,))
    db.execute("SELECT df.cancel(%s)", (i,))


def test_each_finished_instance_is_notified_on_df_done(module_dsn: str,
                                                       db: psycopg.Connection[Any]) -> None:
    """Instances finished in one round each get their own df_done NOTIFY, their id as the
    payload (sent in one statement for the round)."""
    with psycopg.connect(module_dsn, autocommit=True) as listener:
        listener.execute("LISTEN df_done")
        ids = {r[0] for r in db.execute(
            "SELECT df.start($$SELECT 1$$ ~> $$SELECT 2$$) FROM generate_series(1, 5)")}
        seen: set[str] = set()
        for note in listener.notifies(timeout=20):
            seen.add(note.payload)
            if ids <= seen:
                break
    assert ids <= seen
    assert all(wait(db, i) == "completed" for i in ids)
