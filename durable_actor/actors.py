"""Instance actors: the engine's state loaded from the database, and its effects written back.

Shared by the dispatcher, which runs actors that have mail, and by the executors, which
carry an instance on where its step just ran (``Executor._advance``). Whoever runs an actor
holds its instance row locked (FOR UPDATE SKIP LOCKED) for the transaction: one actor runs in
one place at a time.

Child instances
---------------
``SpawnChildren`` creates one instance per branch (a copy of the branch's nodes, the parent's
variables, the imported names, a 'start' message); a finished child's ``Finished`` becomes a
'child' message to its parent in the same transaction. ``CollectJoin`` is answered within the
round: the branches' outcomes are read in branch order and fed back as ``JoinCollected``.
"""

from __future__ import annotations

import secrets
import zlib
from collections import defaultdict
from datetime import datetime
from typing import Any

import orjson
import structlog

from durable_actor import engine
from durable_actor.config import Settings
from durable_actor.graph import Graph, node_from_row
from durable_actor.literals import Literals
from durable_actor.queries import q


def shard_of(instance_id: str, shards: int) -> int:
    return zlib.crc32(instance_id.encode()) % shards


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def message_from_row(row: dict[str, Any], now: datetime) -> engine.Message | None:
    kind = row["kind"]
    payload = orjson.loads(row["payload"]) if row["payload"] else {}
    if kind == "start":
        return engine.Start(now)
    if kind == "step":
        return engine.StepDone(row["node_id"], row["activation"], now,
                               result=payload.get("result"), error=payload.get("error"),
                               sqlstate=_opt(payload, "sqlstate", str),
                               retryable=bool(payload.get("retryable")),
                               http_status=_opt(payload, "http_status", int),
                               error_class=_opt(payload, "error_class", str),
                               retry_after=_opt(payload, "retry_after", float),
                               attempt=_opt(payload, "attempt", int))
    if kind == "timer":
        return engine.TimerFired(row["node_id"], row["activation"], now)
    if kind == "signal":
        return engine.Signal(str(payload.get("name")), payload.get("data"), now,
                             row["node_id"], row["activation"], bool(payload.get("returned")))
    if kind == "want_signal":
        return engine.WantSignal(str(payload.get("instance")), row["node_id"],
                                 row["activation"], str(payload.get("name")), now,
                                 bool(payload.get("withdraw")))
    if kind == "child":
        return engine.ChildDone(row["node_id"], row["activation"], int(payload["index"]), now,
                                str(payload["status"]), payload.get("result"),
                                payload.get("error"), payload.get("exports") or {},
                                bool(payload.get("broke")))
    if kind == "cancel":
        return engine.Cancel(str(payload.get("reason") or "Cancelled by user"), now)
    return None


def apply_mail(states: dict[str, engine.InstanceState], mail: list[dict[str, Any]],
               now: datetime) -> list[tuple[str, list[engine.Effect]]]:
    """Feed the taken messages (mailbox rows) through the engine in mailbox order; what each
    decided, per instance. Messages for instances not in `states` are dropped."""
    out: list[tuple[str, list[engine.Effect]]] = []
    for row in sorted(mail, key=lambda r: r["id"]):
        msg = message_from_row(row, now)
        state = states.get(row["instance_id"])
        if msg is not None and state is not None:
            out.append((state.id, engine.transition(state, msg)[1]))
    return out


def claimed(row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                          list[dict[str, Any]]]:
    """The instances, mail and nodes of instances_claim_with_mail's one row."""
    instances, mail, nodes = (orjson.loads(row[k]) if row[k] else []
                              for k in ("instances", "mail", "nodes"))
    for instance in instances:
        instance["now"] = datetime.fromisoformat(instance["now"])
    return instances, mail, nodes


def states(rows: list[dict[str, Any]],
           node_rows: list[dict[str, Any]]) -> dict[str, engine.InstanceState]:
    """The engine state of these instance rows from their nodes (others' nodes are ignored)."""
    graphs: dict[str, Graph] = defaultdict(Graph)
    for row in node_rows:
        graphs[row["instance_id"]].nodes[row["id"]] = node_from_row(row)
    return {r["id"]: _state_from_row(r, graphs[r["id"]]) for r in rows}


class Actors:
    """Writes what the engine decided for a set of locked instances, in the caller's
    transaction."""

    def __init__(self, settings: Settings, log: Any = None) -> None:
        self.settings = settings
        self.log = log if log is not None else structlog.get_logger()

    async def write(self, cur: Literals, states: dict[str, engine.InstanceState],
                    effects: list[tuple[str, engine.Effect]], rows: dict[str, dict[str, Any]],
                    now: datetime) -> None:
        """Answer the join collections, then persist states and effects, through `cur`: the
        dispatcher's or the executor's literal statements, which go with its COMMIT (those
        whose rows are wanted at once, with the writes before them)."""
        await self._collect_joins(cur, states, effects, now)
        await self._persist(cur, list(states.values()), effects, rows)

    async def _collect_joins(self, cur: Literals,
                             states: dict[str, engine.InstanceState],
                             effects: list[tuple[str, engine.Effect]], now: datetime) -> None:
        """Answer CollectJoin effects with the branches' outcomes, until none is left."""
        wanted = [(iid, e) for iid, e in effects if isinstance(e, engine.CollectJoin)]
        while wanted:
            await cur.execute(q("children_collect"), {
                "parents": [iid for iid, _ in wanted],
                "nodes": [e.node_id for _, e in wanted],
                "activations": [e.activation for _, e in wanted]})
            branches: dict[tuple[str, str, int], list[engine.Branch]] = defaultdict(list)
            for r in await cur.fetchall():
                branches[(r["parent_id"], r["parent_node"], r["parent_activation"])].append(
                    engine.Branch(r["status"], _loads(r["output"]), r["error"],
                                  _loads(r["exports"]) or {}))
            more: list[tuple[str, engine.Effect]] = []
            for iid, e in wanted:
                got = tuple(branches[(iid, e.node_id, e.activation)])
                _, out = engine.transition(states[iid], engine.JoinCollected(
                    e.node_id, e.activation, now, got))
                more.extend((iid, x) for x in out)
            effects.extend(more)
            wanted = [(iid, e) for iid, e in more if isinstance(e, engine.CollectJoin)]

    async def _persist(self, cur: Literals, states: list[engine.InstanceState],
                       effects: list[tuple[str, engine.Effect]],
                       rows: dict[str, dict[str, Any]]) -> None:
        nodes = [(s.id, s.node(nid)) for s in states for nid in sorted(s.changed)]
        if nodes:
            await cur.execute(q("nodes_update_many"), {
                "instance_ids": [iid for iid, _ in nodes],
                "ids": [n.id for _, n in nodes],
                "statuses": [n.status for _, n in nodes],
                "results": [None if n.status == "pending" and n.result is None
                            else _dumps(n.result) for _, n in nodes],
                "errors": [n.error for _, n in nodes],
                "activations": [n.activation for _, n in nodes],
                "details": [None if n.details is None else _dumps(n.details) for _, n in nodes],
            })
        changed = [s for s in states if s.instance_changed]
        if changed:
            await cur.execute(q("instances_update_many"), {
                "ids": [s.id for s in changed],
                "statuses": [s.status for s in changed],
                "names": [_dumps(engine.names_to_json(s.names)) for s in changed],
                "inboxes": [_dumps(s.inbox) for s in changed],
                "execution_counts": [s.execution_count for s in changed],
                "seqs": [s.seq for s in changed],
                "waiters": [_dumps(s.waiters) for s in changed],
            })
        await self._children(cur, effects, rows)

        steps = [(iid, e) for iid, e in effects if isinstance(e, engine.RunStep)]
        timers = [(iid, e) for iid, e in effects if isinstance(e, engine.StartTimer)]
        drops = [(iid, e) for iid, e in effects if isinstance(e, engine.DropWork)]
        finished = [(iid, e) for iid, e in effects if isinstance(e, engine.Finished)]
        if drops:
            pairs = [(iid, nid) for iid, e in drops
                     for nid in (sorted(e.node_ids) if e.node_ids is not None else [None])]
            await cur.execute(q("work_drop_many"), {
                "instance_ids": [p[0] for p in pairs], "node_ids": [p[1] for p in pairs]})
        if steps:
            shards = self.settings.shards
            await cur.execute(q("tasks_insert_many"), {
                "instance_ids": [iid for iid, _ in steps],
                "node_ids": [e.node_id for _, e in steps],
                "activations": [e.activation for _, e in steps],
                "shards": [shard_of(iid, shards) for iid, _ in steps],
                "kinds": [e.kind for _, e in steps],
                "payloads": [_dumps(e.payload) for _, e in steps],
            })
            await cur.execute("SELECT pg_notify('df_tasks', '')")
        if timers:
            await cur.execute(q("timers_insert_many"), {
                "instance_ids": [iid for iid, _ in timers],
                "node_ids": [e.node_id for _, e in timers],
                "activations": [e.activation for _, e in timers],
                "kinds": ["node" for _ in timers],
                "due_ats": [e.due_at for _, e in timers],
            })
            await cur.execute("SELECT pg_notify('df_timers', '')")
        cancels = [iid for iid, e in finished if e.status == "cancelled"]
        cancels += [f"{iid} {nid}" for iid, e in drops if e.node_ids for nid in e.node_ids]
        if cancels:
            await cur.execute(q("notify_each"), {"channel": "df_cancel", "payloads": cancels})
        for iid, e in finished:
            self.log.info("instance_finished", instance_id=iid, status=e.status, error=e.error)
        if finished:
            await cur.execute(q("notify_each"), {"channel": "df_done",
                                                 "payloads": [iid for iid, _ in finished]})

    async def _children(self, cur: Literals,
                        effects: list[tuple[str, engine.Effect]],
                        rows: dict[str, dict[str, Any]]) -> None:
        """Spawn, cancel and finish child instances; post messages between family members."""
        spawns = [(iid, e) for iid, e in effects if isinstance(e, engine.SpawnChildren)]
        if spawns:
            await cur.execute(q("children_clear"), {
                "parents": [iid for iid, _ in spawns],
                "nodes": [e.node_id for _, e in spawns],
                "activations": [e.activation for _, e in spawns]})
            kids = [(iid, e, i, root, imports) for iid, e in spawns
                    for i, (root, imports) in enumerate(zip(e.branches, e.imports, strict=True))]
            ids = await self._fresh_ids(cur, len(kids))
            spawn = {
                "ids": ids, "parents": [k[0] for k in kids], "roots": [k[3] for k in kids]}
            await cur.execute(q("children_spawn"), {
                **spawn,
                "nodes": [k[1].node_id for k in kids],
                "activations": [k[1].activation for k in kids],
                "indexes": [k[2] for k in kids],
                "names": [_dumps(engine.names_to_json(
                    {n: engine.Value(v, imported=True) for n, v in k[4].items()}))
                    for k in kids]})
            await cur.execute(q("children_copy_nodes"), spawn)
            await cur.execute("SELECT pg_notify('df_mailbox', '')")
        await self._spawn_rows(cur, effects)
        for iid, e in effects:
            if isinstance(e, engine.CancelChildren):
                await cur.execute(q("children_cancel"), {
                    "parent": iid, "node": e.node_id, "activation": e.activation,
                    "reason": e.reason})
        ended = [(iid, e) for iid, e in effects
                 if isinstance(e, engine.Finished) and rows[iid]["parent_id"] is not None]
        if ended:
            await cur.execute(q("children_finish"), {
                "ids": [iid for iid, _ in ended],
                "outputs": [_dumps(e.result) for _, e in ended],
                "exports": [_dumps(e.exports) for _, e in ended],
                "payloads": [_dumps({
                    "index": rows[iid]["branch_index"], "status": e.status, "result": e.result,
                    "error": e.error, "exports": e.exports, "broke": e.broke})
                    for iid, e in ended]})
        mail = []
        for iid, e in effects:
            if isinstance(e, engine.PostSignal):
                mail.append((e.instance_id, "signal", e.node_id, e.activation, _dumps(
                    {"name": e.name, "data": e.data, "returned": e.returned})))
            elif isinstance(e, engine.RequestSignal):
                mail.append((e.root_id, "want_signal", e.node_id, e.activation, _dumps(
                    {"instance": iid, "name": e.name, "withdraw": e.withdraw})))
        if mail or ended:
            if mail:
                await cur.execute(q("mailbox_post_many"), {
                    "instance_ids": [m[0] for m in mail], "kinds": [m[1] for m in mail],
                    "node_ids": [m[2] for m in mail], "activations": [m[3] for m in mail],
                    "payloads": [m[4] for m in mail]})
            await cur.execute("SELECT pg_notify('df_mailbox', '')")

    async def _spawn_rows(self, cur: Literals,
                          effects: list[tuple[str, engine.Effect]]) -> None:
        """FOREACH: drop finished nodes' stored rows, clear earlier runs' children, and
        start one child per row handed out."""
        drops = [(iid, e.node_id) for iid, e in effects if isinstance(e, engine.DropRows)]
        if drops:
            await cur.execute(q("foreach_drop_rows"), {
                "parents": [d[0] for d in drops], "nodes": [d[1] for d in drops]})
        spawns = [(iid, e) for iid, e in effects if isinstance(e, engine.SpawnRows)]
        if not spawns:
            return
        firsts = [(iid, e) for iid, e in spawns if e.first == 0]
        if firsts:
            await cur.execute(q("children_clear"), {
                "parents": [iid for iid, _ in firsts],
                "nodes": [e.node_id for _, e in firsts],
                "activations": [e.activation for _, e in firsts]})
        kids = [(iid, e, n) for iid, e in spawns for n in range(e.first + 1, e.first + e.count + 1)]
        ids = await self._fresh_ids(cur, len(kids))
        await cur.execute(q("foreach_spawn"), {
            "ids": ids, "parents": [k[0] for k in kids], "nodes": [k[1].node_id for k in kids],
            "activations": [k[1].activation for k in kids], "ns": [k[2] for k in kids],
            "roots": [k[1].body for k in kids], "row_names": [k[1].name for k in kids],
            "imports": [_dumps(engine.names_to_json(
                {n: engine.Value(v, imported=True) for n, v in k[1].imports.items()}))
                for k in kids]})
        await cur.execute(q("children_copy_nodes"), {
            "ids": ids, "parents": [k[0] for k in kids], "roots": [k[1].body for k in kids]})
        await cur.execute("SELECT pg_notify('df_mailbox', '')")

    async def _fresh_ids(self, cur: Literals, count: int) -> list[str]:
        """`count` unused instance ids (8 hex digits, as df.start makes them)."""
        ids: list[str] = []
        while len(ids) < count:
            batch = list({secrets.token_hex(4) for _ in range(count - len(ids))} - set(ids))
            await cur.execute(q("children_taken_ids"), {"ids": batch})
            taken = {r["id"] for r in await cur.fetchall()}
            ids.extend(i for i in batch if i not in taken)
        return ids


def _opt(payload: dict[str, Any], key: str, kind: type[Any]) -> Any:
    """payload[key] converted to `kind`, or None when absent or malformed."""
    value = payload.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _state_from_row(row: dict[str, Any], graph: Graph) -> engine.InstanceState:
    return engine.InstanceState(
        id=row["id"], root=row["root_node"], graph=graph, status=row["status"],
        label=row["label"], vars=dict(row["vars"] or {}),
        names=engine.names_from_json(dict(row["names"] or {})),
        inbox=list(row["inbox"] or []), execution_count=row["execution_count"],
        seq=row["seq"], parent_id=row["parent_id"], family_root=row["family_root"],
        waiters=list(row["waiters"] or []))
