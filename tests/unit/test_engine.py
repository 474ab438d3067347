"""The engine without a database: each node type, fencing, and random runs that must end."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_actor import engine
from durable_actor.engine import (
    Cancel,
    DropWork,
    Finished,
    InstanceState,
    RunStep,
    Signal,
    Start,
    StartTimer,
    StepDone,
    TimerFired,
    transition,
)
from durable_actor.graph import Graph, node_from_row

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


# -- building states the way df.start stores graphs ------------------------------------------

def store(graph: dict[str, Any], **kw: Any) -> InstanceState:
    """Flatten a graph JSON object into nodes, as df._store_graph does."""
    rows: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], parent: str | None) -> str:
        nid = f"{len(rows):08x}"
        row: dict[str, Any] = {"id": nid, "node_type": node["node_type"],
                               "result_name": node.get("result_name"), "parent_node": parent,
                               "position": len(rows)}
        rows.append(row)
        cond = walk(node["condition_node"], nid) if "condition_node" in node else None
        row["left_node"] = walk(node["left_node"], nid) if "left_node" in node else None
        row["right_node"] = walk(node["right_node"], nid) if "right_node" in node else None
        extras = [walk(x, nid) for x in node.get("extra_nodes", [])]
        if cond:
            row["query"] = orjson.dumps({"condition_node": cond}).decode()
        elif extras:
            row["query"] = orjson.dumps({"extra_nodes": extras}).decode()
        else:
            row["query"] = node.get("query")
        return nid

    root = walk(graph, None)
    g = Graph({r["id"]: node_from_row(r) for r in rows})
    return InstanceState(id="abcd0001", root=root, graph=g, **kw)


def sql(q: str, name: str | None = None) -> dict[str, Any]:
    n: dict[str, Any] = {"node_type": "SQL", "query": q}
    if name:
        n["result_name"] = name
    return n


def then(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"node_type": "THEN", "left_node": a, "right_node": b}


def rows(*values: Any, col: str = "v") -> dict[str, Any]:
    return {"rows": [{col: v} for v in values], "row_count": len(values)}


def steps(effects: list[Any]) -> list[RunStep]:
    return [e for e in effects if isinstance(e, RunStep)]


def finished(effects: list[Any]) -> Finished | None:
    return next((e for e in effects if isinstance(e, Finished)), None)


def done(state: InstanceState, step: RunStep, result: Any = None, error: str | None = None,
         now: datetime = T0) -> list[Any]:
    return transition(state, StepDone(step.node_id, step.activation, now, result, error))[1]


# -- node types ----------------------------------------------------------------------------

def test_sql_then_sql_completes_with_right_result_and_binds_names() -> None:
    s = store(then(sql("SELECT 1 AS a", "x"), sql("SELECT $x.a + 1 AS b")))
    _, eff = transition(s, Start(T0))
    (first,) = steps(eff)
    assert first.payload["query"] == "SELECT 1 AS a"
    eff = done(s, first, {"rows": [{"a": 1}], "row_count": 1})
    (second,) = steps(eff)
    assert second.payload["results"] == {"x": {"rows": [{"a": 1}], "row_count": 1}}
    eff = done(s, second, {"rows": [{"b": 2}], "row_count": 1})
    assert finished(eff) == Finished("completed", None)
    assert s.status == "completed"
    assert s.root_node.result == {"rows": [{"b": 2}], "row_count": 1}
    assert s.names == {"x": "00000001"}


def test_failed_left_fails_then_and_skips_right() -> None:
    s = store(then(sql("SELECT 1/0"), sql("SELECT 2")))
    (first,) = steps(transition(s, Start(T0))[1])
    eff = done(s, first, error="SQL execution failed: division by zero")
    assert finished(eff) == Finished("failed", "SQL execution failed: division by zero")
    right = s.node(s.root_node.right or "")
    assert right.status == "pending"
    assert s.root_node.status == "failed"
    assert s.root_node.result == "SQL execution failed: division by zero"


def test_if_takes_arm_by_truthiness() -> None:
    for cond, expected in (([True], "then"), ([0], "else"), ([], "else"), (["yes"], "then")):
        s = store({"node_type": "IF", "condition_node": sql("c"), "left_node": sql("then"),
                   "right_node": sql("else")})
        (c,) = steps(transition(s, Start(T0))[1])
        (arm,) = steps(done(s, c, rows(*cond)))
        assert arm.payload["query"] == expected
        assert finished(done(s, arm, rows(1))) == Finished("completed", None)


def test_if_rows_branches_on_named_result() -> None:
    graph = then(sql("SELECT 1", "data"), {
        "node_type": "IF", "query": '{"condition_type":"result_has_rows","result_name":"data"}',
        "left_node": sql("has"), "right_node": sql("none")})
    s = store(graph)
    (first,) = steps(transition(s, Start(T0))[1])
    (arm,) = steps(done(s, first, rows()))
    assert arm.payload["query"] == "none"


def test_if_rows_unknown_name_fails_at_run_time() -> None:
    s = store({"node_type": "IF", "query": '{"condition_type":"result_has_rows","result_name":"nope"}',
               "left_node": sql("a"), "right_node": sql("b")})
    eff = transition(s, Start(T0))[1]
    assert finished(eff) is not None and s.status == "failed"
    assert "nope" in (s.root_node.error or "")


def test_join_aggregates_in_branch_order_whatever_the_completion_order() -> None:
    s = store({"node_type": "JOIN", "left_node": sql("a"), "right_node": sql("b"),
               "extra_nodes": [sql("c")]})
    a, b, c = steps(transition(s, Start(T0))[1])
    done(s, c, rows(3))
    done(s, a, rows(1))
    eff = done(s, b, rows(2))
    assert finished(eff) == Finished("completed", None)
    assert s.root_node.result == [rows(1), rows(2), rows(3)]


def test_join_branch_failure_names_the_branch_and_drops_the_others() -> None:
    s = store({"node_type": "JOIN", "left_node": sql("a"), "right_node": sql("b")})
    a, b = steps(transition(s, Start(T0))[1])
    eff = done(s, b, error="boom")
    assert s.root_node.error == "JOIN branch 2 failed: boom"
    assert any(isinstance(e, DropWork) and e.node_ids == frozenset({a.node_id}) for e in eff)
    assert done(s, a, rows(1)) == []   # the late answer is stale


def test_race_first_finisher_wins_and_loser_is_dropped() -> None:
    s = store({"node_type": "RACE", "left_node": sql("slow"), "right_node": sql("fast")})
    slow, fast = steps(transition(s, Start(T0))[1])
    eff = done(s, fast, rows(7))
    assert finished(eff) == Finished("completed", None)
    assert s.root_node.result == rows(7)
    assert s.node(slow.node_id).status == "failed"
    assert any(isinstance(e, DropWork) and slow.node_id in (e.node_ids or ()) for e in eff)


def test_race_first_failure_decides() -> None:
    s = store({"node_type": "RACE", "left_node": sql("a"), "right_node": sql("b")})
    a, _ = steps(transition(s, Start(T0))[1])
    done(s, a, error="nope")
    assert s.status == "failed" and s.root_node.error == "RACE left branch failed: nope"


def test_sleep_arms_a_timer_and_completes_when_it_fires() -> None:
    s = store({"node_type": "SLEEP", "query": "60"})
    (timer,) = [e for e in transition(s, Start(T0))[1] if isinstance(e, StartTimer)]
    assert timer.due_at == T0 + timedelta(seconds=60)
    eff = transition(s, TimerFired(timer.node_id, timer.activation, timer.due_at))[1]
    assert finished(eff) is not None
    assert s.root_node.result == {"slept": True, "seconds": 60}


def test_wait_for_schedule_computes_the_next_match_in_utc_when_it_runs() -> None:
    s = store({"node_type": "WAIT_SCHEDULE", "query": '{"cron_expr":"*/5 * * * *"}'})
    now = datetime(2026, 1, 1, 12, 3, 20, tzinfo=UTC)
    (timer,) = [e for e in transition(s, Start(now))[1] if isinstance(e, StartTimer)]
    assert timer.due_at == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    transition(s, TimerFired(timer.node_id, timer.activation, timer.due_at))
    assert s.root_node.result == {"scheduled": True}


def test_signal_before_the_wait_is_kept_and_delivered_in_order() -> None:
    s = store(then(sql("SELECT 1"), then({"node_type": "SIGNAL",
                                          "query": '{"signal_name":"go","timeout_seconds":null}'},
                                         {"node_type": "SIGNAL",
                                          "query": '{"signal_name":"go","timeout_seconds":null}'})))
    (first,) = steps(transition(s, Start(T0))[1])
    transition(s, Signal("go", {"n": 1}, T0))
    transition(s, Signal("go", {"n": 2}, T0))
    assert [x["data"] for x in s.inbox] == [{"n": 1}, {"n": 2}]
    eff = done(s, first, rows(1))
    assert finished(eff) == Finished("completed", None)
    assert s.root_node.result == {"signal_name": "go", "timed_out": False, "data": {"n": 2}}
    assert s.inbox == []


def test_signal_timeout() -> None:
    s = store({"node_type": "SIGNAL", "query": '{"signal_name":"x","timeout_seconds":5}'})
    (timer,) = [e for e in transition(s, Start(T0))[1] if isinstance(e, StartTimer)]
    transition(s, TimerFired(timer.node_id, timer.activation, timer.due_at))
    assert s.root_node.result == {"signal_name": "x", "timed_out": True, "data": None}
    # a signal after the end is discarded, nothing changes
    assert transition(s, Signal("x", 1, T0))[1] == []
    assert s.status == "completed"


def test_loop_with_condition_pads_iterations_to_one_second() -> None:
    s = store({"node_type": "LOOP", "left_node": sql("body"), "condition_node": sql("cond")})
    (body,) = steps(transition(s, Start(T0))[1])
    (cond,) = steps(done(s, body, rows(1)))
    eff = done(s, cond, rows(True), now=T0 + timedelta(milliseconds=10))
    (pad,) = [e for e in eff if isinstance(e, StartTimer)]
    assert pad.due_at == T0 + timedelta(seconds=1)
    (body2,) = steps(transition(s, TimerFired(pad.node_id, pad.activation, pad.due_at))[1])
    assert body2.node_id == body.node_id and body2.activation > body.activation
    (cond2,) = steps(done(s, body2, rows(2), now=pad.due_at))
    eff = done(s, cond2, rows(False), now=pad.due_at)
    assert finished(eff) == Finished("completed", None)
    assert s.root_node.result == rows(2)
    assert s.execution_count == 2   # a root loop's iteration is a new execution


def test_break_unwinds_through_join_to_the_loop_with_its_value() -> None:
    s = store({"node_type": "LOOP", "left_node": {
        "node_type": "JOIN", "left_node": sql("SELECT pg_sleep(10)"),
        "right_node": {"node_type": "BREAK", "query": '{"break_value":"done"}'}}})
    eff = transition(s, Start(T0))[1]
    assert finished(eff) == Finished("completed", None)
    assert s.root_node.result == "done"
    # the still-running SQL branch was abandoned and its task dropped
    assert any(isinstance(e, DropWork) and e.node_ids for e in eff)


def test_break_value_json_is_kept_as_json() -> None:
    s = store({"node_type": "LOOP", "left_node": {"node_type": "BREAK",
                                                  "query": '{"break_value":"{\\"a\\": 1}"}'}})
    transition(s, Start(T0))
    assert s.root_node.result == {"a": 1}


def test_break_outside_a_loop_fails_at_run_time() -> None:
    s = store(then(sql("x"), {"node_type": "BREAK", "query": '{"break_value":null}'}))
    (first,) = steps(transition(s, Start(T0))[1])
    done(s, first, rows(1))
    assert s.status == "failed"
    assert s.root_node.error == "df.break() was called outside of a loop"


def test_loop_iteration_cap(monkeypatch: Any) -> None:
    monkeypatch.setattr(engine, "MAX_LOOP_ITERATIONS", 3)
    s = store({"node_type": "LOOP", "left_node": sql("body")})
    now = T0
    (body,) = steps(transition(s, Start(now))[1])
    for _ in range(3):
        now += timedelta(seconds=2)
        eff = done(s, body, rows(1), now=now)
        if s.status != "running":
            break
        (body,) = steps(eff)
    assert s.status == "failed"
    assert s.root_node.error == "Loop exceeded maximum iteration count of 3"


def test_eternal_loop_keeps_constant_state() -> None:
    s = store({"node_type": "LOOP", "left_node": then(sql("a", "x"), sql("b $x"))})
    now = T0
    eff = transition(s, Start(now))[1]
    sizes = set()
    for _ in range(200):
        (step,) = steps(eff)
        now += timedelta(seconds=1)
        eff = done(s, step, rows(1), now=now)
        sizes.add((len(s.graph.nodes), len(s.names), len(s.inbox)))
    assert sizes <= {(4, 0, 0), (4, 1, 0)}   # same rows, at most one name, no inbox growth
    assert s.status == "running"


def test_cancel_stops_everything_and_later_answers_change_nothing() -> None:
    s = store({"node_type": "JOIN", "left_node": sql("a"), "right_node": sql("b")})
    a, b = steps(transition(s, Start(T0))[1])
    eff = transition(s, Cancel("enough", T0))[1]
    assert Finished("cancelled", "Cancelled: enough") in eff
    assert DropWork(None) in eff
    assert done(s, a, rows(1)) == []
    assert s.status == "cancelled"


def test_stale_and_duplicate_messages_are_ignored() -> None:
    s = store(then(sql("a"), sql("b")))
    (a,) = steps(transition(s, Start(T0))[1])
    (b,) = steps(done(s, a, rows(1)))
    assert done(s, a, rows(99)) == []                       # duplicate
    assert transition(s, StepDone(b.node_id, b.activation + 5, T0, rows(1)))[1] == []  # wrong token
    assert transition(s, Start(T0))[1] == []                # second start
    assert finished(done(s, b, rows(2))) is not None


def test_vars_are_expanded_before_the_step_is_queued() -> None:
    s = store(sql("SELECT '{greeting}', '{sys_instance_id}', '{missing}'"),
              vars={"greeting": "hi"})
    (step,) = steps(transition(s, Start(T0))[1])
    assert step.payload["query"] == "SELECT 'hi', 'abcd0001', '{missing}'"


# -- property: random graphs and message orders always end -----------------------------------

LEAVES = st.sampled_from(["SQL", "SQL", "SQL", "SLEEP", "SIGNAL", "SIGNAL_T", "BREAK"])


def _graph_strategy() -> st.SearchStrategy[dict[str, Any]]:
    def leaf(kind: str) -> dict[str, Any]:
        if kind == "SQL":
            return sql("step")
        if kind == "SLEEP":
            return {"node_type": "SLEEP", "query": "1"}
        if kind == "SIGNAL":
            return {"node_type": "SIGNAL", "query": '{"signal_name":"s","timeout_seconds":null}'}
        if kind == "SIGNAL_T":
            return {"node_type": "SIGNAL", "query": '{"signal_name":"t","timeout_seconds":2}'}
        return {"node_type": "BREAK", "query": '{"break_value":null}'}

    def composite(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.one_of(
            st.tuples(children, children).map(lambda t: then(*t)),
            st.tuples(children, children, children).map(lambda t: {
                "node_type": "IF", "condition_node": t[0], "left_node": t[1], "right_node": t[2]}),
            st.tuples(children, children, st.lists(children, max_size=2)).map(lambda t: {
                "node_type": "JOIN", "left_node": t[0], "right_node": t[1], "extra_nodes": t[2]}),
            st.tuples(children, children).map(lambda t: {
                "node_type": "RACE", "left_node": t[0], "right_node": t[1]}),
            st.tuples(children, st.one_of(st.none(), children)).map(lambda t: {
                "node_type": "LOOP", "left_node": t[0],
                **({"condition_node": t[1]} if t[1] else {})}),
        )

    return st.recursive(LEAVES.map(leaf), composite, max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=_graph_strategy(), seed=st.integers(0, 2**32 - 1))
def test_random_graphs_always_end(graph: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    s = store(graph)
    now = T0
    pending: list[Any] = []          # messages "in flight", delivered in random order
    ended: list[Finished] = []

    def absorb(effects: list[Any]) -> None:
        for e in effects:
            if isinstance(e, RunStep):
                ok = rng.random() < 0.85
                result = rows(rng.choice([True, False, 0, 1, "yes", None]))
                pending.append(StepDone(e.node_id, e.activation, now,
                                        result if ok else None, None if ok else "boom"))
            elif isinstance(e, StartTimer):
                pending.append(TimerFired(e.node_id, e.activation, e.due_at))
            elif isinstance(e, Finished):
                ended.append(e)

    absorb(transition(s, Start(now))[1])
    for i in range(3000):
        if s.status in engine.TERMINAL:
            break
        if i == 2500:
            absorb(transition(s, Cancel("took too long", now))[1])
            continue
        if not pending or rng.random() < 0.1:
            # the outside world: signals for waits, duplicates of old answers
            pending.append(Signal(rng.choice("st"), {"i": i}, now))
        msg = pending.pop(rng.randrange(len(pending)))
        if rng.random() < 0.05:
            pending.append(msg)      # duplicate delivery
        now = max(now, getattr(msg, "now", now)) + timedelta(milliseconds=rng.randint(1, 1500))
        absorb(transition(s, msg)[1])
    assert s.status in engine.TERMINAL, f"stuck: {s.status}"
    assert len(ended) == 1 and ended[0].status == s.status
    if s.status != "cancelled":
        assert s.root_node.status == ("completed" if s.status == "completed" else "failed")
