"""The engine without a database: each node type, fencing, and random runs that must end."""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field
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
    """Flatten a graph JSON object into nodes, as df.start stores them (df._graph_template)."""
    rows: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], parent: str | None) -> str:
        nid = f"{len(rows):08x}"
        row: dict[str, Any] = {"id": nid, "node_type": node["node_type"],
                               "result_name": node.get("result_name"), "parent_node": parent,
                               "position": len(rows),
                               "options": {k: node[k] for k in ("retry", "timeout_seconds")
                                           if k in node} or None}
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


def status_of(effects: list[Any]) -> str | None:
    end = finished(effects)
    return None if end is None else end.status


def done(state: InstanceState, step: RunStep, result: Any = None, error: str | None = None,
         now: datetime = T0) -> list[Any]:
    return transition(state, StepDone(step.node_id, step.activation, now, result, error))[1]


# -- a family of instances, wired as the dispatcher wires them -------------------------------

@dataclass
class Step:
    instance: str
    node_id: str
    activation: int
    payload: dict[str, Any]


@dataclass
class Child:
    parent: str
    node: str
    activation: int
    index: int
    output: Any = None
    exports: dict[str, Any] = field(default_factory=dict)


class Family:
    """Instances and their mail in memory; effects turned into messages as the dispatcher
    and df._cancel_family do. Mail is delivered in order, or in random order with `rng`."""

    def __init__(self, root: InstanceState, rng: random.Random | None = None) -> None:
        self.root = root
        self.states: dict[str, InstanceState] = {root.id: root}
        self.children: dict[str, Child] = {}
        self.queue: list[tuple[str, Any]] = []
        self.effects: list[tuple[str, Any]] = []
        self.outstanding: list[Step] = []
        self.rng = rng
        self.now = T0
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = {}   # df.foreach_rows

    def start(self) -> None:
        self.send(self.root.id, Start(self.now))
        self.flush()

    def steps(self) -> list[Step]:
        return list(self.outstanding)

    def answer(self, step: Step, result: Any = None, error: str | None = None) -> None:
        if step in self.outstanding:
            self.outstanding.remove(step)
        self.send(step.instance, StepDone(step.node_id, step.activation, self.now, result, error))
        self.flush()

    def root_send(self, msg: Any, deliver: bool = True) -> None:
        self.send(self.root.id, msg)
        if deliver:
            self.flush()

    def send(self, iid: str, msg: Any) -> None:
        self.queue.append((iid, msg))

    def flush(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            self.deliver_one()
        raise AssertionError("mail never settles")

    def deliver_one(self) -> None:
        i = self.rng.randrange(len(self.queue)) if self.rng else 0
        iid, msg = self.queue.pop(i)
        state = self.states.get(iid)
        if state is None:
            return
        _, out = transition(state, msg)
        for e in out:
            self.effects.append((iid, e))
            self.route(iid, e)

    def route(self, iid: str, e: Any) -> None:
        if isinstance(e, RunStep):
            self.outstanding.append(Step(iid, e.node_id, e.activation, e.payload))
        elif isinstance(e, DropWork):
            self.outstanding = [x for x in self.outstanding if not (
                x.instance == iid and (e.node_ids is None or x.node_id in e.node_ids))]
        elif isinstance(e, engine.SpawnChildren):
            for index, (branch, imports) in enumerate(zip(e.branches, e.imports, strict=True)):
                self.spawn(iid, e.node_id, e.activation, index, branch, imports)
        elif isinstance(e, engine.Finished) and iid in self.children:
            kid = self.children[iid]
            kid.output, kid.exports = e.result, e.exports
            self.send(kid.parent, engine.ChildDone(
                kid.node, kid.activation, kid.index, self.now, e.status, e.result, e.error,
                e.exports, e.broke))
        elif isinstance(e, engine.SpawnRows):
            for n in range(e.first, e.first + e.count):
                row = self.rows[(iid, e.node_id)][n]
                self.spawn(iid, e.node_id, e.activation, n, e.body, {
                    **e.imports, e.name: {"rows": [row], "row_count": 1}})
        elif isinstance(e, engine.CollectJoin):
            kids = sorted((k.index, cid) for cid, k in self.children.items()
                          if (k.parent, k.node, k.activation) == (iid, e.node_id, e.activation))
            self.send(iid, engine.JoinCollected(e.node_id, e.activation, self.now, tuple(
                engine.Branch(self.states[cid].status, self.children[cid].output,
                              self.states[cid].root_node.error, self.children[cid].exports)
                for _, cid in kids)))
        elif isinstance(e, engine.CancelChildren):
            for cid, k in self.children.items():
                if k.parent == iid and (e.node_id is None or (k.node, k.activation)
                                        == (e.node_id, e.activation)):
                    self.cancel(cid, e.reason)
        elif isinstance(e, engine.PostSignal):
            self.send(e.instance_id, Signal(e.name, e.data, self.now, e.node_id, e.activation,
                                            e.returned))
        elif isinstance(e, engine.RequestSignal):
            self.send(e.root_id, engine.WantSignal(iid, e.node_id, e.activation, e.name,
                                                   self.now, e.withdraw))

    def spawn(self, iid: str, node: str, activation: int, index: int, branch: str,
              imports: dict[str, Any]) -> None:
        state = self.states[iid]
        cid = f"c{len(self.states):07x}"
        nodes = {nid: dataclasses.replace(state.node(nid), status="pending", result=None,
                                          error=None, activation=0)
                 for nid in state.graph.subtree(branch)}
        self.states[cid] = InstanceState(
            id=cid, root=branch, graph=Graph(nodes), vars=dict(state.vars),
            names={k: engine.Value(v, imported=True) for k, v in imports.items()},
            parent_id=iid, family_root=state.family_root or iid)
        self.children[cid] = Child(iid, node, activation, index)
        self.send(cid, Start(self.now))

    def cancel(self, iid: str, reason: str) -> None:
        """df._cancel_family: cancelled at once, with every running descendant."""
        state = self.states[iid]
        if state.status in engine.TERMINAL:
            return
        state.status = "cancelled"
        self.send(iid, Cancel(reason, self.now))
        for cid, k in self.children.items():
            if k.parent == iid:
                self.cancel(cid, reason)


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
    assert status_of(eff) == "completed"
    assert s.status == "completed"
    assert s.root_node.result == {"rows": [{"b": 2}], "row_count": 1}
    assert s.names == {"x": "00000001"}


def test_failed_left_fails_then_and_skips_right() -> None:
    s = store(then(sql("SELECT 1/0"), sql("SELECT 2")))
    (first,) = steps(transition(s, Start(T0))[1])
    eff = done(s, first, error="SQL execution failed: division by zero")
    end = finished(eff)
    assert end is not None and end.status == "failed"
    assert end.error == "SQL execution failed: division by zero"
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
        assert status_of(done(s, arm, rows(1))) == "completed"


def test_if_rows_branches_on_named_result() -> None:
    graph = then(sql("SELECT 1", "data"), {
        "node_type": "IF", "query": '{"condition_type":"result_has_rows","result_name":"data"}',
        "left_node": sql("has"), "right_node": sql("none")})
    s = store(graph)
    (first,) = steps(transition(s, Start(T0))[1])
    (arm,) = steps(done(s, first, rows()))
    assert arm.payload["query"] == "none"


def test_if_rows_unknown_name_fails_at_run_time() -> None:
    s = store({"node_type": "IF",
               "query": '{"condition_type":"result_has_rows","result_name":"nope"}',
               "left_node": sql("a"), "right_node": sql("b")})
    eff = transition(s, Start(T0))[1]
    assert finished(eff) is not None and s.status == "failed"
    assert "nope" in (s.root_node.error or "")


def test_join_aggregates_in_branch_order_whatever_the_completion_order() -> None:
    fam = Family(store({"node_type": "JOIN", "left_node": sql("a"), "right_node": sql("b"),
                        "extra_nodes": [sql("c")]}))
    fam.start()
    a, b, c = fam.steps()
    fam.answer(c, rows(3))
    fam.answer(a, rows(1))
    fam.answer(b, rows(2))
    assert fam.root.status == "completed"
    assert fam.root.root_node.result == [rows(1), rows(2), rows(3)]
    assert len(fam.states) == 4 and all(x.status == "completed" for x in fam.states.values())


def test_join_branch_failure_names_the_branch_and_cancels_the_others() -> None:
    fam = Family(store({"node_type": "JOIN", "left_node": sql("a"), "right_node": sql("b")}))
    fam.start()
    a, b = fam.steps()
    fam.answer(b, error="boom")
    assert fam.root.status == "failed"
    assert fam.root.root_node.error == "JOIN branch 2 failed: boom"
    assert fam.states[a.instance].status == "cancelled"
    fam.answer(a, rows(1))                  # the late answer changes nothing
    assert fam.root.status == "failed"


def test_race_first_finisher_wins_and_loser_is_cancelled() -> None:
    fam = Family(store({"node_type": "RACE", "left_node": sql("slow"),
                        "right_node": sql("fast", "f")}))
    fam.start()
    slow, fast = fam.steps()
    fam.answer(fast, rows(7))
    assert fam.root.status == "completed"
    assert fam.root.root_node.result == rows(7)
    assert fam.states[slow.instance].status == "cancelled"
    assert engine._value_of(fam.root, "f") == rows(7)     # the winner's names come back


def test_race_first_failure_decides() -> None:
    fam = Family(store({"node_type": "RACE", "left_node": sql("a"), "right_node": sql("b")}))
    fam.start()
    a, _ = fam.steps()
    fam.answer(a, error="nope")
    assert fam.root.status == "failed"
    assert fam.root.root_node.error == "RACE left branch failed: nope"


def test_branches_import_names_they_use_and_export_names_they_bind() -> None:
    fam = Family(store(then(sql("first", "x"), then(
        {"node_type": "JOIN", "left_node": sql("SELECT $x", "y"), "right_node": sql("other")},
        sql("SELECT $x, $y")))))
    fam.start()
    (first,) = fam.steps()
    fam.answer(first, rows(1))
    left, right = fam.steps()
    assert left.payload["results"] == {"x": rows(1)}
    assert fam.states[right.instance].names == {}      # imports only what it refers to
    fam.answer(right, rows(3))
    fam.answer(left, rows(2))
    (last,) = fam.steps()
    assert last.payload["results"] == {"x": rows(1), "y": rows(2)}


def test_a_signal_sent_before_a_branch_waits_is_kept_by_the_root() -> None:
    wait = {"node_type": "SIGNAL", "query": '{"signal_name":"go","timeout_seconds":null}'}
    fam = Family(store({"node_type": "JOIN", "left_node": wait, "right_node": sql("x")}))
    fam.root_send(Signal("go", {"early": True}, T0))    # before anything started
    fam.start()
    (x,) = fam.steps()
    fam.answer(x, rows(1))
    assert fam.root.status == "completed"
    assert fam.root.root_node.result[0] == {"signal_name": "go", "timed_out": False,
                                            "data": {"early": True}}
    assert fam.root.inbox == [] and fam.root.waiters == []


def test_a_signal_handed_to_a_wait_that_timed_out_goes_back_to_the_inbox() -> None:
    wait = {"node_type": "SIGNAL", "query": '{"signal_name":"go","timeout_seconds":5}'}
    fam = Family(store({"node_type": "JOIN", "left_node": wait, "right_node": sql("x")}))
    fam.start()
    child = next(i for i, st_ in fam.states.items() if st_.root_node.type == "SIGNAL")
    (timer,) = [e for i, e in fam.effects if isinstance(e, StartTimer) and i == child]
    # the root hands the signal over while the child's timeout fires: both in flight
    fam.root_send(Signal("go", 1, T0), deliver=False)
    fam.send(child, TimerFired(timer.node_id, timer.activation, timer.due_at))
    fam.flush()
    assert fam.states[child].root_node.result["timed_out"] is True
    assert [x["data"] for x in fam.root.inbox] == [1]       # not lost


def test_break_in_a_branch_finishes_the_loop_above_the_join() -> None:
    fam = Family(store({"node_type": "LOOP", "left_node": {
        "node_type": "JOIN", "left_node": sql("SELECT pg_sleep(10)"),
        "right_node": {"node_type": "BREAK", "query": '{"break_value":"done"}'}}}))
    fam.start()
    assert fam.root.status == "completed"
    assert fam.root.root_node.result == "done"
    (sleeper,) = [x for x in fam.states.values() if x.root_node.type == "SQL"]
    assert sleeper.status == "cancelled" and fam.steps() == []


def test_break_in_a_branch_without_any_loop_fails_the_instance() -> None:
    fam = Family(store({"node_type": "JOIN", "left_node": sql("a"),
                        "right_node": {"node_type": "BREAK", "query": '{"break_value":null}'}}))
    fam.start()
    assert fam.root.status == "failed"
    assert fam.root.root_node.error == "df.break() was called outside of a loop"


def test_cancel_reaches_every_descendant() -> None:
    fam = Family(store({"node_type": "JOIN", "left_node": sql("a"), "right_node": {
        "node_type": "RACE", "left_node": sql("b"), "right_node": sql("c")}}))
    fam.start()
    assert len(fam.steps()) == 3 and len(fam.states) == 5
    fam.send(fam.root.id, Cancel("enough", T0))
    fam.flush()
    assert {x.status for x in fam.states.values()} == {"cancelled"}


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
    assert status_of(eff) == "completed"
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
    assert status_of(eff) == "completed"
    assert s.root_node.result == rows(2)
    assert s.execution_count == 2   # a root loop's iteration is a new execution


def test_a_loop_padding_timer_delivered_again_starts_no_second_iteration() -> None:
    # The loop keeps its activation across iterations: its padding timer, delivered a second
    # time while the iteration it started runs, must not start another one beside it.
    s = store({"node_type": "LOOP", "left_node": sql("body")})
    (body,) = steps(transition(s, Start(T0))[1])
    (pad,) = [e for e in done(s, body, rows(1)) if isinstance(e, StartTimer)]
    fired = TimerFired(pad.node_id, pad.activation, pad.due_at)
    (body2,) = steps(transition(s, fired)[1])
    assert transition(s, fired)[1] == []
    assert s.root_node.details["iteration"] == 2
    (pad2,) = [e for e in done(s, body2, rows(2), now=pad.due_at) if isinstance(e, StartTimer)]
    (body3,) = steps(transition(s, TimerFired(pad2.node_id, pad2.activation, pad2.due_at))[1])
    assert body3.activation > body2.activation


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
    s = store(then(sql("a"), sql("b")))
    (a,) = steps(transition(s, Start(T0))[1])
    eff = transition(s, Cancel("enough", T0))[1]
    end = finished(eff)
    assert end is not None and (end.status, end.error) == ("cancelled", "Cancelled: enough")
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
    """Random graphs, with branches as child instances, mail delivered in random order, steps
    failing at random, duplicate deliveries, signals at any time: every instance of the family
    ends, and the root ends once."""
    rng = random.Random(seed)
    fam = Family(store(graph), rng)
    fam.start()
    for i in range(5000):
        if fam.root.status in engine.TERMINAL:
            break
        if i == 4000:
            fam.cancel(fam.root.id, "took too long")
        fam.now += timedelta(milliseconds=rng.randint(1, 1500))
        roll = rng.random()
        if fam.queue and roll < 0.6:
            iid, msg = fam.queue[rng.randrange(len(fam.queue))]
            if rng.random() < 0.05 and not isinstance(msg, Cancel):
                fam.queue.append((iid, msg))          # duplicate delivery (a cancel is
                                                      # posted once per instance)
            fam.deliver_one()
        elif fam.outstanding and roll < 0.85:
            step = fam.outstanding.pop(rng.randrange(len(fam.outstanding)))
            ok = rng.random() < 0.85
            fam.send(step.instance, StepDone(
                step.node_id, step.activation, fam.now,
                rows(rng.choice([True, False, 0, 1, "yes", None])) if ok else None,
                None if ok else "boom"))
        elif roll < 0.95:
            timers = [(iid, e) for iid, e in fam.effects if isinstance(e, StartTimer)]
            if timers:
                iid, t = rng.choice(timers)
                fam.send(iid, TimerFired(t.node_id, t.activation, max(fam.now, t.due_at)))
        else:
            fam.root_send(Signal(rng.choice("st"), {"i": i}, fam.now), deliver=False)
    fam.flush()
    assert fam.root.status in engine.TERMINAL, f"stuck: {fam.root.status}"
    ends = [e for iid, e in fam.effects if iid == fam.root.id and isinstance(e, Finished)]
    assert len(ends) == 1 and ends[0].status == fam.root.status
    if fam.root.status != "cancelled":
        assert fam.root.root_node.status == (
            "completed" if fam.root.status == "completed" else "failed")
    # no child outlives the root
    assert all(x.status in engine.TERMINAL for x in fam.states.values()), {
        x.id: x.status for x in fam.states.values()}


def test_a_loop_below_the_root_carries_names_into_the_next_iteration() -> None:
    s = store(then(sql("first"), {"node_type": "LOOP", "left_node": then(
        sql("SELECT $prev", "prev"), {"node_type": "SLEEP", "query": "0"})}))
    now = T0
    (first,) = steps(transition(s, Start(now))[1])
    (body,) = steps(done(s, first, rows(0)))
    assert body.payload["results"] == {}
    eff = done(s, body, rows(1))
    (timer,) = [e for e in eff if isinstance(e, StartTimer)]
    now += timedelta(seconds=2)
    eff = transition(s, TimerFired(timer.node_id, timer.activation, now))[1]
    (body,) = steps(eff)
    assert body.payload["results"] == {"prev": rows(1)}     # last iteration's value


def test_foreach_keeps_max_parallel_children_and_collects_in_row_order() -> None:
    body = sql("SELECT $doc.id")
    fam = Family(store(then(sql("rows", "doc"), {
        "node_type": "FOREACH", "query": '{"name":"doc","max_parallel":2}', "left_node": body})))
    fam.start()
    (source,) = fam.steps()
    fam.answer(source, rows(1, 2, 3, col="id"))
    (store_step,) = fam.steps()
    assert "INSERT INTO df.foreach_rows" in store_step.payload["query"]
    assert store_step.payload["results"] == {"doc": rows(1, 2, 3, col="id")}
    fam.rows[(fam.root.id, store_step.node_id)] = [{"id": 1}, {"id": 2}, {"id": 3}]
    fam.answer(store_step, rows(3, col="n"))
    first, second = fam.steps()                 # two at a time
    assert first.payload["results"] == {"doc": rows(1, col="id")}
    fam.answer(second, rows("b"))
    (third,) = fam.steps()[1:]
    assert third.payload["results"] == {"doc": rows(3, col="id")}
    fam.answer(third, rows("c"))
    assert fam.root.status == "running"
    fam.answer(first, rows("a"))
    assert fam.root.status == "completed"
    assert fam.root.root_node.result == [rows("a"), rows("b"), rows("c")]


# -- retries (df.retry) and time-outs (df.timeout) --------------------------------------------

def retried(q: str = "UPDATE t SET v = v + 1", *, attempts: int = 4, backoff: float = 1.0,
            cap: float = 60.0, retry_on: list[str] | None = None,
            node_type: str = "SQL") -> dict[str, Any]:
    policy: dict[str, Any] = {"max_attempts": attempts, "backoff_seconds": backoff,
                              "max_backoff_seconds": cap}
    if retry_on is not None:
        policy["retry_on"] = retry_on
    return {"node_type": node_type, "query": q, "retry": policy}


def fail(state: InstanceState, step: RunStep, now: datetime, error: str = "deadlock detected",
         **verdict: Any) -> list[Any]:
    verdict.setdefault("sqlstate", "40P01")
    verdict.setdefault("retryable", True)
    return transition(state, StepDone(step.node_id, step.activation, now, error=error,
                                      attempt=step.payload.get("attempt"), **verdict))[1]


def timers(effects: list[Any]) -> list[StartTimer]:
    return [e for e in effects if isinstance(e, StartTimer)]


def test_a_retryable_failure_waits_on_a_timer_then_runs_the_next_attempt() -> None:
    state = store(retried())
    _, out = transition(state, Start(T0))
    first = steps(out)[0]
    assert first.payload["attempt"] == 1
    out = fail(state, first, T0)
    assert not steps(out) and status_of(out) is None
    node = state.node(first.node_id)
    assert node.status == "running"          # the node keeps running while it waits
    (timer,) = timers(out)
    assert timer.activation == first.activation
    assert T0 + timedelta(seconds=0.5) <= timer.due_at <= T0 + timedelta(seconds=1)
    (entry,) = node.details["attempts"]
    assert entry["attempt"] == 1 and entry["status"] == "failed"
    assert entry["error"] == "deadlock detected" and entry["sqlstate"] == "40P01"
    assert entry["at"] == T0.isoformat() and entry["retry_at"] == timer.due_at.isoformat()
    assert node.details["retry_at"] == timer.due_at.isoformat()

    _, out = transition(state, TimerFired(first.node_id, first.activation, timer.due_at))
    (second,) = steps(out)
    assert second.payload["attempt"] == 2 and second.activation == first.activation
    assert "retry_at" not in state.node(first.node_id).details
    out = done(state, second, rows(1), now=timer.due_at)
    assert status_of(out) == "completed"
    attempts = state.node(first.node_id).details["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[1]["attempt"] == 2


def test_backoff_doubles_up_to_the_cap_with_jitter_in_bounds() -> None:
    state = store(retried(attempts=8, backoff=1.0, cap=10.0))
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    now = T0
    delays = []
    for _ in range(7):
        (timer,) = timers(fail(state, step, now))
        delays.append((timer.due_at - now).total_seconds())
        now = timer.due_at
        _, out = transition(state, TimerFired(step.node_id, step.activation, now))
        step = steps(out)[0]
    bases = [1, 2, 4, 8, 10, 10, 10]
    for delay, base in zip(delays, bases, strict=True):
        assert base / 2 <= delay <= base, (delays, bases)
    assert len({round(d / b, 9) for d, b in zip(delays, bases, strict=True)}) > 1  # jittered
    assert step.payload["attempt"] == 8


def test_jitter_is_deterministic_and_spreads_instances() -> None:
    policy = engine.RetryPolicy(5, 2.0, 60.0)
    assert engine.retry_delay(policy, 3, "a:b:1:3") == engine.retry_delay(policy, 3, "a:b:1:3")
    spread = {engine.retry_delay(policy, 3, f"{i:08x}:b:1:3") for i in range(50)}
    assert len(spread) == 50 and all(4.0 <= d <= 8.0 for d in spread)


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    policy = engine.RetryPolicy(5, 0.1, 30.0)
    assert engine.retry_delay(policy, 1, "k", retry_after=7) == 7
    assert engine.retry_delay(policy, 1, "k", retry_after=500) == 30
    assert engine.retry_delay(policy, 1, "k", retry_after=0) <= 0.1


def test_the_last_attempt_fails_saying_how_many_were_made() -> None:
    state = store(then(retried(attempts=3), sql("SELECT 2")))
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    now = T0
    for _ in range(2):
        (timer,) = timers(fail(state, step, now))
        now = timer.due_at
        step = steps(transition(state, TimerFired(step.node_id, step.activation, now))[1])[0]
    out = fail(state, step, now)
    assert status_of(out) == "failed" and not timers(out)
    node = state.node(step.node_id)
    assert node.error == "deadlock detected (gave up after 3 attempts)"
    assert state.root_node.error == node.error
    assert [a["attempt"] for a in node.details["attempts"]] == [1, 2, 3]
    assert "retry_at" not in node.details


def test_a_non_retryable_error_fails_at_once() -> None:
    state = store(retried())
    _, out = transition(state, Start(T0))
    out = fail(state, steps(out)[0], T0, error="SQL execution failed: division by zero",
               sqlstate="22012", retryable=False)
    assert status_of(out) == "failed" and not timers(out)
    assert state.root_node.error == ("SQL execution failed: division by zero "
                                     "(not retried: not a retryable error)")
    assert len(state.root_node.details["attempts"]) == 1


def test_retry_on_lists_what_is_retried() -> None:
    m = engine.retry_matches
    assert m(None, sqlstate="40001", retryable=True)
    assert not m(None, sqlstate="57014", retryable=False)
    assert m(("57014",), sqlstate="57014", retryable=False)
    assert not m(("57014",), sqlstate="40001", retryable=True)       # the list replaces defaults
    assert m(("default", "57014"), sqlstate="40001", retryable=True)
    assert m(("23",), sqlstate="23505", retryable=False)             # a SQLSTATE class
    assert m(("any",), sqlstate="42601", retryable=False)
    assert m(("http_5xx",), sqlstate=None, retryable=True, http_status=502)
    assert m(("http_503",), sqlstate=None, retryable=True, http_status=503)
    assert not m(("http_503",), sqlstate=None, retryable=True, http_status=500)
    assert m(("http_timeout",), sqlstate=None, retryable=True, error_class="http_timeout")
    assert not m(("http_timeout",), sqlstate=None, retryable=True, error_class="http_connect")
    s = engine.retry_matches_status
    assert s(None, 429) and not s(None, 404) and not s(("any",), 429)
    assert s(("http_4xx",), 404) and s(("http_409",), 409) and not s(("http_5xx",), 429)


def test_http_429_result_is_retried_and_the_last_one_is_the_result() -> None:
    state = store(retried(orjson.dumps({"url": "http://x"}).decode(), attempts=2,
                          node_type="HTTP"))
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    envelope = {"status": 429, "body": "", "encoding": "text", "headers": {}, "ok": False,
                "duration_ms": 3}
    _, out = transition(state, StepDone(step.node_id, step.activation, T0, envelope,
                                        retry_after=5.0, attempt=1))
    (timer,) = timers(out)
    assert timer.due_at == T0 + timedelta(seconds=5)
    assert state.root_node.details["attempts"][0]["http_status"] == 429
    now = timer.due_at
    step = steps(transition(state, TimerFired(step.node_id, step.activation, now))[1])[0]
    _, out = transition(state, StepDone(step.node_id, step.activation, now, envelope,
                                        attempt=2))
    assert status_of(out) == "completed" and finished(out).result == envelope


def test_stale_timers_and_answers_during_a_back_off_are_ignored() -> None:
    state = store(retried())
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    (timer,) = timers(fail(state, step, T0))
    # a second answer for attempt 1 while waiting, and one for the wrong activation
    assert fail(state, step, T0) == []
    assert transition(state, StepDone(step.node_id, step.activation + 7, T0, rows(1)))[1] == []
    assert transition(state, TimerFired(step.node_id, step.activation + 7, timer.due_at))[1] == []
    _, out = transition(state, TimerFired(step.node_id, step.activation, timer.due_at))
    second = steps(out)[0]
    # the same timer delivered twice issues no second run; attempt 1's late answer is stale
    assert transition(state, TimerFired(step.node_id, step.activation, timer.due_at))[1] == []
    assert transition(state, StepDone(step.node_id, step.activation, T0, rows(1),
                                      attempt=1))[1] == []
    assert state.root_node.status == "running"
    assert status_of(done(state, second, rows(9))) == "completed"


def test_cancel_during_a_back_off_drops_the_timer() -> None:
    state = store(retried())
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    (timer,) = timers(fail(state, step, T0))
    _, out = transition(state, Cancel("stop", T0))
    assert DropWork(None) in out and status_of(out) == "cancelled"
    assert transition(state, TimerFired(step.node_id, step.activation, timer.due_at))[1] == []
    assert state.root_node.status == "failed"


def test_a_step_without_a_policy_fails_at_once_as_before() -> None:
    state = store(sql("SELECT 1"))
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    assert "attempt" not in step.payload
    out = fail(state, step, T0)
    assert status_of(out) == "failed" and state.root_node.error == "deadlock detected"
    assert state.root_node.details is None


def test_a_loop_iteration_starts_with_fresh_attempts() -> None:
    state = store({"node_type": "LOOP", "left_node": retried(attempts=3)})
    _, out = transition(state, Start(T0))
    step = steps(out)[0]
    (timer,) = timers(fail(state, step, T0))
    step = steps(transition(state, TimerFired(step.node_id, step.activation, timer.due_at))[1])[0]
    _, out = transition(state, StepDone(step.node_id, step.activation, timer.due_at, rows(1),
                                        attempt=2))
    (pad,) = timers(out)                      # the loop pads its iteration to one second
    _, out = transition(state, TimerFired(state.root, state.root_node.activation, pad.due_at))
    (again,) = steps(out)
    assert again.payload["attempt"] == 1 and state.node(again.node_id).details is None


def test_the_timeout_goes_to_the_executor_with_the_step() -> None:
    state = store({"node_type": "SQL", "query": "SELECT pg_sleep(9)", "timeout_seconds": 1.5})
    _, out = transition(state, Start(T0))
    assert steps(out)[0].payload["timeout_seconds"] == 1.5


# -- steps ahead: what the executor may run before the step they follow has answered ---------

def test_the_steps_of_a_sequence_are_known_ahead_without_changing_the_state() -> None:
    s = store(then(then(sql("a"), sql("b")), sql("c")))
    (a,) = steps(transition(s, Start(T0))[1])
    before = copy.deepcopy(s)
    ahead = engine.steps_ahead(s, a, T0, 5)
    assert [step.payload["query"] for step in ahead] == ["b", "c"]
    assert s == before
    assert engine.steps_ahead(s, a, T0, 1) == ahead[:1]
    (b,) = steps(done(s, a, rows(1)))
    assert b == ahead[0]
    (c,) = steps(done(s, b, rows(2)))
    assert c == ahead[1]


def test_no_step_is_ahead_of_a_result_that_decides_what_follows() -> None:
    sleep = {"node_type": "SLEEP", "query": "1"}
    graphs = {
        "a name the next step reads": then(sql("a", "x"), sql("SELECT $x")),
        "a name nobody reads yet": then(sql("a", "x"), sql("b")),
        "a condition": {"node_type": "IF", "condition_node": sql("c"),
                        "left_node": sql("yes"), "right_node": sql("no")},
        "a sleep next": then(sql("a"), sleep),
        "the last step": sql("a"),
    }
    for why, graph in graphs.items():
        s = store(graph)
        (first,) = steps(transition(s, Start(T0))[1])
        assert engine.steps_ahead(s, first, T0, 5) == [], why


_NAMED_LEAVES = st.one_of(
    st.tuples(st.sampled_from(["SELECT 1", "SELECT $x", "SELECT $y.v?"]),
              st.sampled_from([None, "x", "y"])).map(lambda t: sql(*t)),
    st.just({"node_type": "SLEEP", "query": "1"}),
    st.just({"node_type": "BREAK", "query": '{"break_value":null}'}))


def _one_instance_graphs() -> st.SearchStrategy[dict[str, Any]]:
    def composite(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        return st.one_of(
            st.tuples(children, children).map(lambda t: then(*t)),
            st.tuples(children, children).map(lambda t: then(*t)),
            st.tuples(children, children, children).map(lambda t: {
                "node_type": "IF", "condition_node": t[0], "left_node": t[1], "right_node": t[2]}),
            st.tuples(children, st.one_of(st.none(), children)).map(lambda t: {
                "node_type": "LOOP", "left_node": t[0],
                **({"condition_node": t[1]} if t[1] else {})}))

    return st.recursive(_NAMED_LEAVES, composite, max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=_one_instance_graphs(), seed=st.integers(0, 2**32 - 1))
def test_the_steps_ahead_are_the_steps_issued_whatever_the_results(
        graph: dict[str, Any], seed: int) -> None:
    """Whenever a step is issued, each step said to be ahead of it is the one step the engine
    issues next once the step before it succeeds, whatever its result; working them out
    changes nothing."""
    rng = random.Random(seed)
    s = store(graph)
    now = T0
    effects = transition(s, Start(now))[1]
    for _ in range(300):
        if s.status in engine.TERMINAL:
            break
        now += timedelta(seconds=rng.randint(0, 3))
        issued = steps(effects)
        if not issued:
            timer = next(e for e in effects if isinstance(e, StartTimer))
            effects = transition(s, TimerFired(timer.node_id, timer.activation,
                                               max(now, timer.due_at)))[1]
            continue
        (step,) = issued
        before = copy.deepcopy(s)
        ahead = engine.steps_ahead(s, step, now, 3)
        assert s == before
        for predicted in ahead:
            effects = done(s, step, rows(rng.choice([True, False, 0, None, "x"])), now=now)
            assert effects == [predicted]
            step = predicted
        ok = rng.random() < 0.8
        effects = done(s, step, rows(rng.choice([True, False, 0, None])) if ok else None,
                       None if ok else "boom", now=now)
