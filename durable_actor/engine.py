"""The engine: ``transition(state, message) -> (state, effects)``, a pure function.

An instance is an actor. Its state is its graph nodes (each with a status, a result and an
*activation* number) plus instance-level fields (status, named results, variables, signal
inbox). The dispatcher loads the state, feeds it the instance's mailbox messages one by one,
and writes back the nodes that changed and the effects, all in one transaction. Nothing here
does I/O or reads a clock: time arrives in each message.

How a graph runs
----------------
``activate(node)`` gives the node a fresh activation number and starts it:

- SQL / HTTP  → effect ``RunStep``; an executor answers with a ``StepDone`` message.
- SLEEP, WAIT_SCHEDULE → effect ``StartTimer``; the timer answers with ``TimerFired``.
- SIGNAL      → takes the oldest matching signal from the inbox, or waits for a ``Signal``
  message (and arms a timer when it has a timeout).
- THEN, IF, LOOP → activate their children in their order.
- JOIN, RACE  → effect ``SpawnChildren``: each branch runs as a child instance. A child that
  ends posts ``ChildDone`` to its parent; when every JOIN branch is done the dispatcher reads
  their outcomes in branch order (``CollectJoin`` → ``JoinCollected``); a RACE ends with its
  first finisher and cancels the others (``CancelChildren``).
- BREAK       → finishes the innermost running loop above it; in a child instance without
  one, the child ends as *broken* and its parent breaks on from the JOIN/RACE node.

So one instance runs one path at a time; all parallelism is between instances.

When a node finishes, its parent decides what happens next (``_child_finished``), up to the
root, whose end ends the instance.

Fencing
-------
Every message about a node carries the activation it was issued for. A message whose node is
no longer running under that activation (a loop moved on, a race was decided, the instance
was cancelled) is stale and ignored, so duplicate or late deliveries never change the outcome.

Signals
-------
The family's root instance owns the durable inbox. ``df.signal`` posts to the root; a member
whose SIGNAL node starts asks the root (``RequestSignal``); the root hands over the oldest
matching signal (``PostSignal`` aimed at that node) or remembers the waiter. A signal aimed at
a wait that has ended in the meantime goes back to the root, so no signal is ever dropped.

Retries (``df.retry``)
----------------------
A step whose node has a retry policy records every attempt in its ``details``
(``{"attempts": [{"attempt": 1, "status": "failed", "error": …, "at": …, "retry_at": …}, …]}``,
shown as ``df.instance_nodes().status_details``). When an attempt fails with an error the
policy retries (``retry_matches``) and attempts are left, the node stays running and a
``StartTimer`` is armed for the back-off (``retry_delay``: exponential, capped, with a jitter
derived from the instance, node, activation and attempt, so this stays pure; a server's
Retry-After wins up to the cap). While it waits, ``details["retry_at"]`` is set and no task
exists: the wait holds no connection and no process. ``TimerFired`` then issues ``RunStep``
again with the next attempt number, which the executor echoes in ``StepDone``; an answer for
another attempt, or one that arrives while the node waits, is stale. The last failure's
message says how many attempts were made.

Bounded state
-------------
A loop resets its body's nodes for each iteration instead of adding rows; the signal inbox
only holds signals not yet taken; a JOIN/RACE that runs again replaces its earlier children.
An eternal loop therefore keeps a constant number of rows.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from croniter import croniter

from durable_actor import refs
from durable_actor.errors import StepError
from durable_actor.graph import STEP_KINDS, Graph, Node, RetryPolicy

TERMINAL = frozenset({"completed", "failed", "cancelled"})
MAX_LOOP_ITERATIONS = 100_000
MIN_ITERATION = timedelta(seconds=1)


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """A named result held by value: imported from the parent, or merged from branches."""

    value: Any
    imported: bool = False      # imported names are not passed back to the parent


Name = str | Value              # a node id of this instance, or a value


@dataclass
class InstanceState:
    """What the engine knows of one instance. `transition` mutates it and records changes."""

    id: str
    root: str
    graph: Graph
    status: str = "pending"
    label: str | None = None
    vars: dict[str, str] = field(default_factory=dict)
    names: dict[str, Name] = field(default_factory=dict)      # result name -> node or value
    inbox: list[dict[str, Any]] = field(default_factory=list)  # signals not yet taken
    parent_id: str | None = None                               # set for child instances
    family_root: str | None = None                             # top-level instance of a child
    waiters: list[dict[str, Any]] = field(default_factory=list)  # root: members awaiting signals
    execution_count: int = 1
    seq: int = 0                                               # last activation issued
    error: str | None = None
    changed: set[str] = field(default_factory=set)             # node ids written this round
    instance_changed: bool = False

    def node(self, node_id: str) -> Node:
        return self.graph.nodes[node_id]

    @property
    def root_node(self) -> Node:
        return self.graph.nodes[self.root]


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    now: datetime


@dataclass(frozen=True)
class StepDone:
    node_id: str
    activation: int
    now: datetime
    result: Any = None
    error: str | None = None
    # The executor's verdict on a failure (errors.StepError), read by retry policies:
    sqlstate: str | None = None
    retryable: bool = False
    http_status: int | None = None
    error_class: str | None = None
    retry_after: float | None = None    # seconds, from a 429/503 answer's Retry-After
    attempt: int | None = None          # the attempt the executor ran (None: not told)


@dataclass(frozen=True)
class TimerFired:
    node_id: str
    activation: int
    now: datetime


@dataclass(frozen=True)
class Signal:
    """A signal; aimed at one waiting node when the family root hands it over."""

    name: str
    data: Any
    now: datetime
    node_id: str | None = None
    activation: int | None = None
    returned: bool = False          # came back from a wait that had ended: it is the oldest


@dataclass(frozen=True)
class WantSignal:
    """To the family root: a member's SIGNAL node waits (or, withdraw, no longer does)."""

    instance_id: str
    node_id: str
    activation: int
    name: str
    now: datetime
    withdraw: bool = False


@dataclass(frozen=True)
class ChildDone:
    """A child instance spawned by a JOIN/RACE node ended."""

    node_id: str
    activation: int
    index: int                      # 0-based branch
    now: datetime
    status: str
    result: Any = None
    error: str | None = None
    exports: dict[str, Any] = field(default_factory=dict)
    broke: bool = False             # ended by a df.break() that its loop is above the child


@dataclass(frozen=True)
class Branch:
    status: str
    result: Any = None
    error: str | None = None
    exports: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JoinCollected:
    """Every branch of a JOIN is done: their outcomes in branch order."""

    node_id: str
    activation: int
    now: datetime
    branches: tuple[Branch, ...]


@dataclass(frozen=True)
class Cancel:
    reason: str
    now: datetime


Message = Start | StepDone | TimerFired | Signal | WantSignal | ChildDone | JoinCollected | Cancel


# --------------------------------------------------------------------------------------
# Effects
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunStep:
    """Queue a step for an executor."""

    node_id: str
    activation: int
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class StartTimer:
    node_id: str
    activation: int
    due_at: datetime


@dataclass(frozen=True)
class DropWork:
    """Queued tasks and timers of these nodes are no longer wanted (None: the whole instance)."""

    node_ids: frozenset[str] | None


@dataclass(frozen=True)
class SpawnChildren:
    """Run each branch of a JOIN/RACE node as a child instance, with the names it imports."""

    node_id: str
    activation: int
    branches: tuple[str, ...]
    imports: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class SpawnRows:
    """Run a FOREACH body for rows first+1 … first+count of its stored rows, one child each;
    in the child the row is the result named `name`."""

    node_id: str
    activation: int
    body: str
    name: str
    first: int
    count: int
    imports: dict[str, Any]


@dataclass(frozen=True)
class DropRows:
    """A FOREACH node is done with its stored rows."""

    node_id: str


@dataclass(frozen=True)
class CollectJoin:
    """All branches are done: read their outcomes and answer with JoinCollected."""

    node_id: str
    activation: int


@dataclass(frozen=True)
class CancelChildren:
    """Cancel the running children of a node's activation (node None: all children)."""

    node_id: str | None
    activation: int | None
    reason: str


@dataclass(frozen=True)
class PostSignal:
    """Deliver a signal to another member of the family (aimed at a node, or to the root)."""

    instance_id: str
    name: str
    data: Any
    node_id: str | None = None
    activation: int | None = None
    returned: bool = False


@dataclass(frozen=True)
class RequestSignal:
    """Tell the family root that a SIGNAL node waits (or stopped waiting)."""

    root_id: str
    node_id: str
    activation: int
    name: str
    withdraw: bool = False


@dataclass(frozen=True)
class Finished:
    """The instance reached a terminal status. A child's parent hears of it as ChildDone."""

    status: str
    error: str | None = None
    result: Any = None
    exports: dict[str, Any] = field(default_factory=dict)
    broke: bool = False


Effect = (RunStep | StartTimer | DropWork | SpawnChildren | SpawnRows | DropRows | CollectJoin
          | CancelChildren | PostSignal | RequestSignal | Finished)

# A FOREACH over at most this many rows completes with the list of their results; above it,
# with counts only (the children keep their results).
FOREACH_RESULTS_LIMIT = 1000


# --------------------------------------------------------------------------------------
# transition
# --------------------------------------------------------------------------------------

def transition(state: InstanceState, msg: Message) -> tuple[InstanceState, list[Effect]]:
    """Apply one message. Never raises for bad input: a bad message fails the node instead."""
    effects: list[Effect] = []
    match msg:
        case Cancel():
            _apply_cancel(state, msg, effects)
        case Signal() if state.status in TERMINAL:
            _return_signal(state, msg, effects)
        case _ if state.status in TERMINAL:
            pass  # late deliveries to a finished instance change nothing
        case Start():
            _apply_start(state, msg, effects)
        case StepDone():
            _apply_step_done(state, msg, effects)
        case TimerFired():
            _apply_timer_fired(state, msg, effects)
        case Signal():
            _apply_signal(state, msg, effects)
        case WantSignal():
            _apply_want_signal(state, msg, effects)
        case ChildDone():
            _apply_child_done(state, msg, effects)
        case JoinCollected():
            _apply_join_collected(state, msg, effects)
    return state, effects


def steps_ahead(state: InstanceState, step: RunStep, now: datetime,
                limit: int) -> list[RunStep]:
    """The steps `state` issues one after the other once `step` succeeds, as far as each one
    follows from the one before whatever that one's result (`_result_unused`); at most `limit`.
    Worked out on a copy (`_copy`), with every step answered by an empty result: `state` does
    not change.

    The executor runs them in the round trip of `step`, each in its savepoint after the one
    before, and keeps one only if `transition`, told the real outcome of the step before it,
    issues exactly it (it rolls back the rest otherwise)."""
    ahead: list[RunStep] = []
    trial: InstanceState | None = None
    while len(ahead) < limit:
        node = (trial or state).graph.nodes.get(step.node_id)
        if node is None or node.type not in STEP_KINDS or not _result_unused(trial or state, node):
            break
        if trial is None:
            trial = _copy(state)
        _, effects = transition(trial, StepDone(step.node_id, step.activation, now))
        if len(effects) != 1 or not isinstance(effects[0], RunStep):
            break
        step = effects[0]
        ahead.append(step)
    return ahead


def _result_unused(state: InstanceState, node: Node) -> bool:
    """Does the instance go on from `node` the same way whatever its result? So it does when
    `node` is the first part of a sequence, or the last part of sequences (which take its
    result as theirs) one of which is the first part of another, with no result name bound on
    the way."""
    while node.result_name is None and node.parent is not None:
        parent = state.graph.nodes.get(node.parent)
        if parent is None or parent.type != "THEN":
            return False
        if node.id == parent.left and parent.right is not None:
            return True
        node = parent
    return False


def _copy(state: InstanceState) -> InstanceState:
    """A copy of `state` that `transition` can change without changing `state`: every node
    copied (a fraction of what loading them cost), and every container the engine changes in
    place."""
    nodes = {}
    for nid, node in state.graph.nodes.items():
        nodes[nid] = clone = copy.copy(node)
        if clone.details is not None:
            clone.details = copy.deepcopy(clone.details)
    return replace(state, graph=Graph(nodes), vars=dict(state.vars), names=dict(state.names),
                   inbox=list(state.inbox), waiters=list(state.waiters),
                   changed=set(state.changed))


def _apply_start(state: InstanceState, msg: Start, effects: list[Effect]) -> None:
    if state.status != "pending":
        return
    state.status = "running"
    state.instance_changed = True
    _activate(state, state.root, msg.now, effects)


def _apply_step_done(state: InstanceState, msg: StepDone, effects: list[Effect]) -> None:
    node = _current(state, msg.node_id, msg.activation)
    if node is not None and node.type == "FOREACH":
        _foreach_rows_stored(state, node, msg, effects)
        return
    if node is None or node.type not in STEP_KINDS:
        return
    policy = node.retry
    if policy is not None:
        _step_done_with_policy(state, node, policy, msg, effects)
    elif msg.error is not None:
        _fail(state, node, msg.error, msg.now, effects)
    else:
        _complete(state, node, msg.result, msg.now, effects)


def _apply_timer_fired(state: InstanceState, msg: TimerFired, effects: list[Effect]) -> None:
    node = _current(state, msg.node_id, msg.activation)
    if node is None:
        return
    if node.type == "SLEEP":
        _complete(state, node, {"slept": True, "seconds": _sleep_seconds(node)}, msg.now,
                  effects)
    elif node.type == "WAIT_SCHEDULE":
        _complete(state, node, {"scheduled": True}, msg.now, effects)
    elif node.type == "SIGNAL":
        name = str(node.config().get("signal_name"))
        if state.family_root is not None:
            effects.append(RequestSignal(state.family_root, node.id, node.activation, name,
                                         withdraw=True))
        _complete(state, node, {"signal_name": name, "timed_out": True, "data": None}, msg.now,
                  effects)
    elif node.type == "LOOP":
        # The padding between iterations is over; a timer delivered again while the next
        # iteration runs is stale (the loop keeps its activation across iterations).
        if not any(state.node(part).status == "running"
                   for part in (node.left, node.condition) if part is not None):
            _start_iteration(state, node, msg.now, effects)
    elif node.type in STEP_KINDS:
        _retry_now(state, node, effects)


def _apply_signal(state: InstanceState, msg: Signal, effects: list[Effect]) -> None:
    if msg.node_id is not None:
        # Handed over by the root for one wait: take it, or give it back if that wait ended.
        node = _current(state, msg.node_id, msg.activation or 0)
        if node is not None and node.type == "SIGNAL":
            _deliver(state, node, msg.data, msg.now, effects)
        else:
            _return_signal(state, msg, effects)
        return
    if state.family_root is not None:       # the root keeps the family's inbox
        effects.append(PostSignal(state.family_root, msg.name, msg.data,
                                  returned=msg.returned))
        return
    waiting = [n for n in state.graph.nodes.values()
               if n.type == "SIGNAL" and n.status == "running"
               and n.config().get("signal_name") == msg.name]
    if waiting:
        _deliver(state, waiting[0], msg.data, msg.now, effects)
        return
    for i, waiter in enumerate(state.waiters):
        if waiter["name"] == msg.name:
            del state.waiters[i]
            state.instance_changed = True
            effects.append(PostSignal(waiter["instance"], msg.name, msg.data,
                                      waiter["node"], waiter["activation"]))
            return
    signal = {"name": msg.name, "data": msg.data}
    if msg.returned:
        state.inbox.insert(0, signal)
    else:
        state.inbox.append(signal)
    state.instance_changed = True


def _return_signal(state: InstanceState, msg: Signal, effects: list[Effect]) -> None:
    """A signal this instance cannot take goes back to the family root, never lost."""
    if state.family_root is not None:
        effects.append(PostSignal(state.family_root, msg.name, msg.data, returned=True))
    # a terminal root discards it (SPEC §8: signals to finished instances are accepted)


def _apply_want_signal(state: InstanceState, msg: WantSignal, effects: list[Effect]) -> None:
    state.waiters = [w for w in state.waiters
                     if (w["instance"], w["node"]) != (msg.instance_id, msg.node_id)]
    state.instance_changed = True
    if msg.withdraw:
        return
    for i, sig in enumerate(state.inbox):
        if sig.get("name") == msg.name:
            del state.inbox[i]
            effects.append(PostSignal(msg.instance_id, msg.name, sig.get("data"), msg.node_id,
                                      msg.activation))
            return
    state.waiters.append({"instance": msg.instance_id, "node": msg.node_id,
                          "activation": msg.activation, "name": msg.name})


def _deliver(state: InstanceState, node: Node, data: Any, now: datetime,
             effects: list[Effect]) -> None:
    name = node.config().get("signal_name")
    effects.append(DropWork(frozenset({node.id})))     # its time-out timer
    _complete(state, node, {"signal_name": name, "timed_out": False, "data": data}, now,
              effects)


def _apply_child_done(state: InstanceState, msg: ChildDone, effects: list[Effect]) -> None:
    node = _current(state, msg.node_id, msg.activation)
    if node is None or node.type not in ("JOIN", "RACE", "FOREACH"):
        return
    if msg.broke:
        effects.append(CancelChildren(node.id, node.activation, "df.break()"))
        _break_from(state, node, msg.result, msg.now, effects)
        return
    if node.type == "FOREACH":
        _foreach_child_done(state, node, msg, effects)
        return
    if node.type == "RACE":
        effects.append(CancelChildren(node.id, node.activation, "RACE lost"))
        if msg.status == "completed":
            _merge(state, msg.exports)
            _complete(state, node, msg.result, msg.now, effects)
        else:
            which = {0: "left", 1: "right"}.get(msg.index, f"{msg.index + 1}")
            _fail(state, node, f"RACE {which} branch failed: {msg.error}", msg.now, effects)
        return
    done = list(str((node.details or {}).get("done", "")))
    if not 0 <= msg.index < len(done) or done[msg.index] != ".":
        return                                  # a duplicate: this branch was counted
    if msg.status != "completed":
        effects.append(CancelChildren(node.id, node.activation, "JOIN failed"))
        _fail(state, node, f"JOIN branch {msg.index + 1} failed: {msg.error}", msg.now, effects)
        return
    done[msg.index] = "c"
    _set(state, node, details={"done": "".join(done)})
    if "." not in done:
        effects.append(CollectJoin(node.id, node.activation))


def _apply_join_collected(state: InstanceState, msg: JoinCollected,
                          effects: list[Effect]) -> None:
    node = _current(state, msg.node_id, msg.activation)
    if node is None or node.type not in ("JOIN", "FOREACH"):
        return
    for index, branch in enumerate(msg.branches):
        if branch.status != "completed":
            what = "JOIN branch" if node.type == "JOIN" else "FOREACH row"
            _fail(state, node, f"{what} {index + 1} failed: {branch.error}", msg.now, effects)
            return
    if node.type == "FOREACH":       # names bound per row stay in that row's child
        effects.append(DropRows(node.id))
        _complete(state, node, [b.result for b in msg.branches], msg.now, effects)
        return
    for branch in msg.branches:         # branch order: a later branch's name wins
        _merge(state, branch.exports)
    _complete(state, node, [b.result for b in msg.branches], msg.now, effects)


def _apply_cancel(state: InstanceState, msg: Cancel, effects: list[Effect]) -> None:
    # df.cancel() already set the status; finish the job: stop what runs, keep it cancelled.
    for node in state.graph.nodes.values():
        if node.status == "running":
            _set(state, node, status="failed", error=f"Cancelled: {msg.reason}",
                 result=f"Cancelled: {msg.reason}")
    if state.status != "cancelled":
        state.status = "cancelled"
        state.instance_changed = True
    state.error = f"Cancelled: {msg.reason}"
    effects.append(DropWork(None))
    effects.append(CancelChildren(None, None, msg.reason))
    effects.append(Finished("cancelled", state.error))


# --------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------

def _activate(state: InstanceState, node_id: str, now: datetime, effects: list[Effect]) -> None:
    node = state.node(node_id)
    state.seq += 1
    state.instance_changed = True
    _set(state, node, status="running", result=None, error=None, activation=state.seq)
    try:
        _ACTIVATE[node.type](state, node, now, effects)
    except StepError as exc:
        _fail(state, node, str(exc), now, effects)
    except KeyError:
        _fail(state, node, f"Unknown node_type '{node.type}'", now, effects)


def _activate_step(state: InstanceState, node: Node, now: datetime,
                   effects: list[Effect]) -> None:
    if node.details is not None:            # attempts of an earlier loop iteration
        _set(state, node, details=None)
    _issue_step(state, node, 1, effects)


def _issue_step(state: InstanceState, node: Node, attempt: int, effects: list[Effect]) -> None:
    text = refs.expand_vars(node.query or "", state.vars, instance_id=state.id,
                            label=state.label)
    payload: dict[str, Any] = {"query": text, "node_type": node.type}
    payload["results"] = _results_for(state, text)
    if STEP_KINDS[node.type] == "http":
        payload["idempotency_key"] = _idempotency_key(state, node)
    if node.retry is not None:
        payload["attempt"] = attempt
    if node.timeout_seconds is not None and node.type == "SQL":
        payload["timeout_seconds"] = node.timeout_seconds
    effects.append(RunStep(node.id, node.activation, STEP_KINDS[node.type], payload))


def _idempotency_key(state: InstanceState, node: Node) -> str:
    """``<instance>-<node>``, then the iteration of each enclosing loop, outermost first.

    The same for every attempt at one run of the step (a redo after a crash sends the same
    payload); a new loop iteration is a new call and gets a new key.
    """
    iterations: list[str] = []
    parent = node.parent
    while parent is not None and parent in state.graph.nodes:
        ancestor = state.node(parent)
        if ancestor.type == "LOOP":
            iterations.append(str((ancestor.details or {}).get("iteration", 0)))
        parent = ancestor.parent
    key = f"{state.id}-{node.id}"
    return f"{key}-{'.'.join(reversed(iterations))}" if iterations else key


def _activate_then(state: InstanceState, node: Node, now: datetime,
                   effects: list[Effect]) -> None:
    if node.left is None:
        raise StepError("THEN node has no left_node")
    _activate(state, node.left, now, effects)


def _activate_if(state: InstanceState, node: Node, now: datetime, effects: list[Effect]) -> None:
    if node.condition is not None:
        _activate(state, node.condition, now, effects)
        return
    if not node.is_row_test:
        raise StepError("IF node has no condition")
    name = node.config().get("result_name")
    if not isinstance(name, str) or name not in state.names:
        raise StepError(f"df.if_rows: no result named '{name}'")
    result = _value_of(state, name)
    if not (isinstance(result, dict) and "row_count" in result and "rows" in result):
        raise StepError(f"df.if_rows: result '{name}' is not a SQL result")
    _take_arm(state, node, (result.get("row_count") or 0) > 0, now, effects)


def _activate_parallel(state: InstanceState, node: Node, now: datetime,
                       effects: list[Effect]) -> None:
    branches = node.branches
    if not branches:
        raise StepError(f"{node.type} node has no branches")
    node.details = {"done": "." * len(branches)}
    effects.append(SpawnChildren(node.id, node.activation, branches,
                                 tuple(_imports(state, b) for b in branches)))


def _activate_foreach(state: InstanceState, node: Node, now: datetime,
                      effects: list[Effect]) -> None:
    """First store the rows, by one SQL step run as the submitter: the source query's rows
    (or the named result's) go into df.foreach_rows inside the database."""
    cfg = node.config()
    name = cfg.get("name")
    if node.left is None:
        raise StepError("FOREACH node has no body")
    if not isinstance(name, str) or not name.isidentifier():
        raise StepError("FOREACH node needs a row name")
    source = cfg.get("source_query")
    if source is None:
        if name not in state.names:
            raise StepError(f"df.foreach: no result named '{name}'")
        source = f"SELECT * FROM ${name}.*"
    text = refs.expand_vars(str(source), state.vars, instance_id=state.id, label=state.label)
    text = text.strip().rstrip(";")
    query = ("WITH stored AS (INSERT INTO df.foreach_rows"
             " (instance_id, node_id, activation, n, row)"
             f" SELECT '{state.id}', '{node.id}', {int(node.activation)},"
             " row_number() OVER (), row_to_json(source_row)::text"
             f" FROM ({text}\n) AS source_row RETURNING 1)"
             " SELECT count(*) AS n FROM stored")
    effects.append(DropRows(node.id))
    node.details = {"stored": False}
    effects.append(RunStep(node.id, node.activation, "sql", {
        "query": query, "node_type": "FOREACH", "results": _results_for(state, text)}))


def _foreach_rows_stored(state: InstanceState, node: Node, msg: StepDone,
                         effects: list[Effect]) -> None:
    if (node.details or {}).get("stored"):
        return                                  # a duplicate answer
    if msg.error is not None:
        _fail(state, node, f"df.foreach: reading the rows failed: {msg.error}", msg.now,
              effects)
        return
    try:
        total = int(msg.result["rows"][0]["n"])
    except (TypeError, KeyError, IndexError, ValueError):
        _fail(state, node, "df.foreach: the rows could not be stored", msg.now, effects)
        return
    if total == 0:
        effects.append(DropRows(node.id))
        _complete(state, node, [], msg.now, effects)
        return
    cfg = node.config()
    width = min(int(cfg.get("max_parallel") or 1), total)
    _set(state, node, details={"stored": True, "total": total, "started": width, "done": 0})
    assert node.left is not None
    imports = _imports(state, node.left)
    imports.pop(str(cfg["name"]), None)
    effects.append(SpawnRows(node.id, node.activation, node.left, str(cfg["name"]), 0, width,
                             imports))


def _foreach_child_done(state: InstanceState, node: Node, msg: ChildDone,
                        effects: list[Effect]) -> None:
    details = dict(node.details or {})
    if msg.status != "completed":
        effects.append(CancelChildren(node.id, node.activation, "FOREACH failed"))
        effects.append(DropRows(node.id))
        _fail(state, node, f"FOREACH row {msg.index + 1} failed: {msg.error}", msg.now, effects)
        return
    total, started = int(details["total"]), int(details["started"])
    details["done"] = int(details["done"]) + 1
    if started < total:
        details["started"] = started + 1
        cfg = node.config()
        assert node.left is not None
        imports = _imports(state, node.left)
        imports.pop(str(cfg["name"]), None)
        effects.append(SpawnRows(node.id, node.activation, node.left, str(cfg["name"]),
                                 started, 1, imports))
    _set(state, node, details=details)
    if details["done"] < total:
        return
    if total <= FOREACH_RESULTS_LIMIT:
        effects.append(CollectJoin(node.id, node.activation))
    else:
        effects.append(DropRows(node.id))
        _complete(state, node, {"row_count": total, "completed": total}, msg.now, effects)


def _imports(state: InstanceState, branch: str) -> dict[str, Any]:
    """The named results a branch refers to, by value: its child instance cannot see ours."""
    out: dict[str, Any] = {}
    for nid in state.graph.subtree(branch):
        node = state.node(nid)
        wanted = set(refs.referenced_names(node.query or "", state.names))
        if node.is_row_test:
            wanted.add(str(node.config().get("result_name")))
        out.update((name, _value_of(state, name)) for name in wanted if name in state.names)
    return out


def _activate_loop(state: InstanceState, node: Node, now: datetime,
                   effects: list[Effect]) -> None:
    if node.left is None:
        raise StepError("LOOP node has no body")
    node.details = {"iteration": 0}
    _start_iteration(state, node, now, effects)


def _activate_break(state: InstanceState, node: Node, now: datetime,
                    effects: list[Effect]) -> None:
    raw = node.config().get("break_value")
    if isinstance(raw, str):
        raw = refs.expand_vars(raw, state.vars, instance_id=state.id, label=state.label)
        raw = refs.render_http(raw, _results_for(state, raw))
    value = refs.break_value(raw)
    _set(state, node, status="completed", result=value)
    _bind_name(state, node)
    _break_from(state, node, value, now, effects)


def _break_from(state: InstanceState, node: Node, value: Any, now: datetime,
                effects: list[Effect]) -> None:
    """Finish the innermost loop above `node` with `value`, or hand the break to the parent."""
    loop = _innermost_loop(state, node)
    if loop is not None:
        _abandon_subtree(state, loop, "df.break()", except_ids={node.id}, effects=effects)
        _complete(state, loop, value, now, effects)
    elif state.parent_id is not None:
        # The loop, if any, is in an ancestor instance: end this child as broken.
        _abandon_subtree(state, state.root_node, "df.break()", except_ids={node.id},
                         effects=effects)
        if state.root_node.status == "running":
            _set(state, state.root_node, status="failed", error="Cancelled: df.break()",
                 result="Cancelled: df.break()")
        state.status = "completed"
        state.instance_changed = True
        effects.append(DropWork(None))
        effects.append(Finished("completed", None, value, _exports(state), broke=True))
    else:
        _fail(state, node, "df.break() was called outside of a loop", now, effects)


def _activate_sleep(state: InstanceState, node: Node, now: datetime,
                    effects: list[Effect]) -> None:
    seconds = _sleep_seconds(node)
    if seconds < 0:
        raise StepError(f"sleep seconds must not be negative, got {seconds}")
    effects.append(StartTimer(node.id, node.activation, now + timedelta(seconds=seconds)))


def _activate_schedule(state: InstanceState, node: Node, now: datetime,
                       effects: list[Effect]) -> None:
    expr = node.config().get("cron_expr")
    try:
        due = croniter(str(expr), now.astimezone(UTC)).get_next(datetime)
    except (ValueError, KeyError, TypeError) as exc:
        raise StepError(f"Invalid cron expression '{expr}'") from exc
    effects.append(StartTimer(node.id, node.activation, due))


def _activate_signal(state: InstanceState, node: Node, now: datetime,
                     effects: list[Effect]) -> None:
    cfg = node.config()
    name = cfg.get("signal_name")
    timeout = cfg.get("timeout_seconds")
    if isinstance(timeout, int | float) and timeout > 0:
        effects.append(StartTimer(node.id, node.activation, now + timedelta(seconds=timeout)))
    if state.family_root is not None:
        effects.append(RequestSignal(state.family_root, node.id, node.activation, str(name)))
        return
    for i, sig in enumerate(state.inbox):
        if sig.get("name") == name:
            del state.inbox[i]
            state.instance_changed = True
            _deliver(state, node, sig.get("data"), now, effects)
            return


_ACTIVATE = {
    "SQL": _activate_step, "HTTP": _activate_step, "HTTP_MULTIPART": _activate_step,
    "THEN": _activate_then, "IF": _activate_if, "JOIN": _activate_parallel,
    "RACE": _activate_parallel, "FOREACH": _activate_foreach, "LOOP": _activate_loop,
    "BREAK": _activate_break,
    "SLEEP": _activate_sleep, "WAIT_SCHEDULE": _activate_schedule, "SIGNAL": _activate_signal,
}


# --------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------

def _step_done_with_policy(state: InstanceState, node: Node, policy: RetryPolicy,
                           msg: StepDone, effects: list[Effect]) -> None:
    details = dict(node.details or {})
    attempts = list(details.get("attempts") or [])
    attempt = len(attempts) + 1
    if "retry_at" in details or (msg.attempt is not None and msg.attempt != attempt):
        return                      # an answer to another attempt, or while waiting: stale
    entry: dict[str, Any] = {"attempt": attempt, "at": msg.now.isoformat()}
    status = msg.http_status
    if msg.error is None:
        status = _http_status(msg.result) if STEP_KINDS[node.type] == "http" else None
    if msg.error is None:
        wanted = status is not None and status >= 400 and retry_matches_status(
            policy.retry_on, status)
    else:
        wanted = retry_matches(policy.retry_on, sqlstate=msg.sqlstate, retryable=msg.retryable,
                               http_status=msg.http_status, error_class=msg.error_class)
    if wanted and attempt < policy.max_attempts:
        delay = retry_delay(policy, attempt, f"{state.id}:{node.id}:{node.activation}:{attempt}",
                            msg.retry_after)
        due = msg.now + timedelta(seconds=delay)
        entry.update(status="failed", error=msg.error or f"HTTP status {status}",
                     retry_at=due.isoformat())
        if status is not None:
            entry["http_status"] = status
        if msg.sqlstate:
            entry["sqlstate"] = msg.sqlstate
        _set(state, node, details={**details, "attempts": [*attempts, entry],
                                   "retry_at": due.isoformat()})
        effects.append(StartTimer(node.id, node.activation, due))
        return
    if msg.error is None:
        entry["status"] = "completed"
        if status is not None:
            entry["http_status"] = status
        _set(state, node, details={**details, "attempts": [*attempts, entry]})
        _complete(state, node, msg.result, msg.now, effects)
        return
    entry.update(status="failed", error=msg.error)
    if msg.sqlstate:
        entry["sqlstate"] = msg.sqlstate
    _set(state, node, details={**details, "attempts": [*attempts, entry]})
    if not wanted:
        suffix = " (not retried: not a retryable error)" if policy.max_attempts > 1 else ""
        if attempt > 1:
            suffix = f" (attempt {attempt} of {policy.max_attempts}; not retried: not a " \
                     "retryable error)"
    else:
        suffix = f" (gave up after {attempt} attempts)" if attempt > 1 else ""
    _fail(state, node, msg.error + suffix, msg.now, effects)


def _retry_now(state: InstanceState, node: Node, effects: list[Effect]) -> None:
    """The back-off of a step is over: run its next attempt (a stray timer does nothing)."""
    details = dict(node.details or {})
    if "retry_at" not in details:
        return
    del details["retry_at"]
    _set(state, node, details=details)
    _issue_step(state, node, len(details.get("attempts") or []) + 1, effects)


def retry_delay(policy: RetryPolicy, attempt: int, key: str,
                retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based).

    ``backoff * 2^(attempt-1)`` capped at ``max_backoff``, then "equal jitter": between half
    and all of it, the fraction derived from `key`, so the same history gives the same wait
    (the engine stays pure and a replay is identical) while instances that failed together
    spread out. A server's Retry-After, when longer, wins, up to ``max_backoff``.
    """
    base = min(policy.max_backoff_seconds, policy.backoff_seconds * 2.0 ** min(attempt - 1, 64))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    delay = base * (0.5 + 0.5 * int.from_bytes(digest, "big") / 2**64)
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, policy.max_backoff_seconds)
    return delay


def retry_matches(retry_on: tuple[str, ...] | None, *, sqlstate: str | None, retryable: bool,
                  http_status: int | None = None, error_class: str | None = None) -> bool:
    """Whether a failed attempt is retried under `retry_on` (None: the default classes).

    Entries: ``any`` (every failure), ``default`` (what the executor calls transient:
    serialization failures 40001, deadlocks 40P01, connection failures, HTTP 5xx, time-outs
    and network errors), a SQLSTATE (``57014``) or its class (``08``), ``http_5xx``,
    ``http_4xx``, ``http_NNN``, ``http_timeout``, ``http_connect``, ``http_network``.
    """
    if retry_on is None:
        return retryable or http_status == 429
    for entry in retry_on:
        if entry == "any" or (entry == "default" and (retryable or http_status == 429)):
            return True
        if sqlstate and (entry == sqlstate or (len(entry) == 2 and sqlstate.startswith(entry))):
            return True
        if http_status is not None and entry in (f"http_{http_status}",
                                                 f"http_{http_status // 100}xx"):
            return True
        if error_class is not None and entry == error_class:
            return True
    return False


def retry_matches_status(retry_on: tuple[str, ...] | None, status: int) -> bool:
    """Whether an HTTP answer that is a result (4xx) is retried: 429 by default; others
    only when listed (``http_4xx``, ``http_404``); ``any`` covers failures, not results."""
    if retry_on is None:
        return status == 429
    return any(entry in (f"http_{status}", f"http_{status // 100}xx")
               or (entry == "default" and status == 429) for entry in retry_on)


def _http_status(result: Any) -> int | None:
    if isinstance(result, dict) and isinstance(result.get("status"), int) \
            and "duration_ms" in result:
        return int(result["status"])
    return None


# --------------------------------------------------------------------------------------
# Completion and failure
# --------------------------------------------------------------------------------------

def _complete(state: InstanceState, node: Node, result: Any, now: datetime,
              effects: list[Effect]) -> None:
    _set(state, node, status="completed", result=result, error=None)
    _bind_name(state, node)
    _child_finished(state, node, now, effects)


def _fail(state: InstanceState, node: Node, error: str, now: datetime,
          effects: list[Effect]) -> None:
    _set(state, node, status="failed", result=error, error=error)
    _child_finished(state, node, now, effects)


def _child_finished(state: InstanceState, child: Node, now: datetime,
                    effects: list[Effect]) -> None:
    """`child` completed or failed: let its parent react (or end the instance at the root)."""
    if child.id == state.root:
        _finish_instance(state, child, effects)
        return
    if child.parent is None or child.parent not in state.graph.nodes:
        return
    parent = state.node(child.parent)
    if parent.status != "running":
        return
    failed = child.status == "failed"
    match parent.type:
        case "THEN":
            if failed:
                _fail(state, parent, child.error or "", now, effects)
            elif child.id == parent.left and parent.right is not None:
                _activate(state, parent.right, now, effects)
            else:
                _complete(state, parent, child.result, now, effects)
        case "IF":
            if failed:
                _fail(state, parent, child.error or "", now, effects)
            elif child.id == parent.condition:
                _take_arm(state, parent, refs.truthy(child.result), now, effects)
            else:
                _complete(state, parent, child.result, now, effects)
        case "LOOP":
            _loop_child_finished(state, parent, child, now, effects)


def _take_arm(state: InstanceState, node: Node, truth: bool, now: datetime,
              effects: list[Effect]) -> None:
    arm = node.left if truth else node.right
    if arm is None:
        _complete(state, node, None, now, effects)
    else:
        _activate(state, arm, now, effects)


def _loop_child_finished(state: InstanceState, loop: Node, child: Node, now: datetime,
                         effects: list[Effect]) -> None:
    if child.status == "failed":
        _fail(state, loop, child.error or "", now, effects)
        return
    details = dict(loop.details or {})
    if child.id == loop.left:
        details["last"] = child.result
        loop.details = details
        state.changed.add(loop.id)
        if loop.condition is not None:
            _activate(state, loop.condition, now, effects)
            return
        _next_iteration(state, loop, now, effects)
    elif child.id == loop.condition:
        if refs.truthy(child.result):
            _next_iteration(state, loop, now, effects)
        else:
            _complete(state, loop, details.get("last"), now, effects)


def _next_iteration(state: InstanceState, loop: Node, now: datetime,
                    effects: list[Effect]) -> None:
    """Start the next iteration, padded so that each takes at least one second."""
    details = loop.details or {}
    started = details.get("started_at")
    if isinstance(started, str):
        due = datetime.fromisoformat(started) + MIN_ITERATION
        if due > now:
            effects.append(StartTimer(loop.id, loop.activation, due))
            return
    _start_iteration(state, loop, now, effects)


def _start_iteration(state: InstanceState, loop: Node, now: datetime,
                     effects: list[Effect]) -> None:
    details = dict(loop.details or {})
    iteration = int(details.get("iteration", 0)) + 1
    if iteration > MAX_LOOP_ITERATIONS:
        _fail(state, loop, f"Loop exceeded maximum iteration count of {MAX_LOOP_ITERATIONS}",
              now, effects)
        return
    details.update(iteration=iteration, started_at=now.isoformat())
    loop.details = details
    state.changed.add(loop.id)
    if iteration > 1:
        body = [nid for nid in state.graph.subtree(loop.id) if nid != loop.id]
        if loop.id == state.root:
            # A root loop's iteration is a new execution: names start empty.
            state.execution_count += 1
            state.names = {}
        else:
            # A loop below the root carries names forward (SPEC §2), by value: the body's
            # nodes are reset now.
            inside = set(body)
            state.names = {k: Value(_value_of(state, k)) if isinstance(v, str) and v in inside
                           else v for k, v in state.names.items()}
        for nid in body:
            _set(state, state.node(nid), status="pending", result=None, error=None)
        state.instance_changed = True
    assert loop.left is not None
    _activate(state, loop.left, now, effects)


def _finish_instance(state: InstanceState, root: Node, effects: list[Effect]) -> None:
    state.status = "completed" if root.status == "completed" else "failed"
    state.error = root.error
    state.instance_changed = True
    effects.append(DropWork(None))
    effects.append(Finished(state.status, state.error, root.result, _exports(state)))


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def _current(state: InstanceState, node_id: str, activation: int) -> Node | None:
    """The node if it still runs under `activation`; None for stale messages."""
    node = state.graph.nodes.get(node_id)
    if node is None or node.status != "running" or node.activation != activation:
        return None
    return node


def _set(state: InstanceState, node: Node, **changes: Any) -> None:
    for key, value in changes.items():
        setattr(node, key, value)
    state.changed.add(node.id)


def _bind_name(state: InstanceState, node: Node) -> None:
    if node.result_name:
        state.names[node.result_name] = node.id
        state.instance_changed = True


def _abandon_subtree(state: InstanceState, top: Node, reason: str, *, except_ids: set[str],
                     effects: list[Effect]) -> None:
    """Fail the running descendants of `top` (not `top` itself) and drop their queued work."""
    dropped = set()
    for nid in state.graph.subtree(top.id):
        node = state.node(nid)
        if nid == top.id or nid in except_ids or node.status != "running":
            continue
        _set(state, node, status="failed", error=f"Cancelled: {reason}",
             result=f"Cancelled: {reason}")
        dropped.add(nid)
        if node.type in ("JOIN", "RACE", "FOREACH"):
            effects.append(CancelChildren(node.id, node.activation, reason))
    if dropped:
        effects.append(DropWork(frozenset(dropped)))


def _innermost_loop(state: InstanceState, node: Node) -> Node | None:
    parent = node.parent
    while parent is not None and parent in state.graph.nodes:
        candidate = state.node(parent)
        if candidate.type == "LOOP" and candidate.status == "running":
            return candidate
        parent = candidate.parent
    return None


def _value_of(state: InstanceState, name: str) -> Any:
    bound = state.names[name]
    if isinstance(bound, Value):
        return bound.value
    node = state.graph.nodes.get(bound)
    return node.result if node is not None else None


def _results_for(state: InstanceState, text: str) -> dict[str, Any]:
    return {name: _value_of(state, name) for name in refs.referenced_names(text, state.names)}


def _merge(state: InstanceState, exports: dict[str, Any]) -> None:
    """Names a finished branch bound become ours, by value."""
    for name, value in exports.items():
        state.names[name] = Value(value)
    if exports:
        state.instance_changed = True


def _exports(state: InstanceState) -> dict[str, Any]:
    """The names this instance bound (not those it imported), by value, for its parent."""
    return {name: _value_of(state, name) for name, bound in state.names.items()
            if not (isinstance(bound, Value) and bound.imported)}


def names_to_json(names: dict[str, Name]) -> dict[str, Any]:
    """Names as stored in df.instances.names: a node id, or the value as JSON text (so a
    row keeps its column order, which jsonb would not)."""
    return {k: v if isinstance(v, str) else
            {"value": orjson.dumps(v.value).decode(), "imported": v.imported}
            for k, v in names.items()}


def names_from_json(stored: dict[str, Any]) -> dict[str, Name]:
    return {k: v if isinstance(v, str) else
            Value(orjson.loads(v["value"]), bool(v.get("imported")))
            for k, v in stored.items()}


def _sleep_seconds(node: Node) -> int | float:
    try:
        value = Decimal((node.query or "0").strip())
    except InvalidOperation:
        return 0
    return int(value) if value == value.to_integral_value() else float(value)
