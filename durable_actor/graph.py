"""The stored workflow graph as typed nodes: one `Node` per ``df.nodes`` row.

Validation of user input happens in SQL at ``df.start()`` (sql/migrations/0002_dsl.sql), before
anything is written; this module only reads what was stored. Children that are not
``left_node``/``right_node`` live in the stored ``query`` config as ids
(``{"condition_node": id}`` for IF and LOOP, ``{"extra_nodes": [ids]}`` for JOIN and RACE).
A step's retry policy and time-out (``df.retry``, ``df.timeout``) live in
``df.nodes.options``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

LEAF_TYPES = frozenset({"SQL", "HTTP", "HTTP_MULTIPART", "SLEEP", "WAIT_SCHEDULE", "SIGNAL",
                        "BREAK"})
COMPOSITE_TYPES = frozenset({"THEN", "IF", "JOIN", "RACE", "LOOP"})
STEP_KINDS = {"SQL": "sql", "HTTP": "http", "HTTP_MULTIPART": "http"}


@dataclass(frozen=True)
class RetryPolicy:
    """``df.retry``'s options: how often a step runs at most, and how long it waits between.

    ``retry_on`` None means the default classes (the executor's verdict, plus HTTP 429).
    """

    max_attempts: int
    backoff_seconds: float
    max_backoff_seconds: float
    retry_on: tuple[str, ...] | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> RetryPolicy | None:
        """The policy in a node's stored options; None when there is none (or it is unreadable,
        which df.start's validation rules out)."""
        raw = (options or {}).get("retry")
        if not isinstance(raw, dict):
            return None
        try:
            attempts = int(raw["max_attempts"])
            backoff = float(raw["backoff_seconds"])
            cap = float(raw["max_backoff_seconds"])
        except (KeyError, TypeError, ValueError):
            return None
        on = raw.get("retry_on")
        retry_on = tuple(str(x) for x in on) if isinstance(on, list) else None
        return cls(max(1, attempts), backoff, max(cap, backoff), retry_on)


@dataclass
class Node:
    """One graph node and its run state (the mutable part: status .. details)."""

    id: str
    type: str
    query: str | None = None
    result_name: str | None = None
    left: str | None = None
    right: str | None = None
    condition: str | None = None
    extras: tuple[str, ...] = ()
    parent: str | None = None
    position: int = 0
    status: str = "pending"
    result: Any = None
    error: str | None = None
    activation: int = 0
    details: dict[str, Any] | None = None
    options: dict[str, Any] | None = None

    @property
    def retry(self) -> RetryPolicy | None:
        """The step's retry policy (``df.retry``), if any."""
        return RetryPolicy.from_options(self.options)

    @property
    def timeout_seconds(self) -> float | None:
        """The SQL step's statement time-out (``df.timeout``), if any."""
        value = (self.options or {}).get("timeout_seconds")
        return float(value) if isinstance(value, int | float) and value > 0 else None

    @property
    def branches(self) -> tuple[str, ...]:
        """JOIN/RACE branches in order."""
        return tuple(b for b in (self.left, self.right) if b) + self.extras

    @property
    def children(self) -> tuple[str, ...]:
        out = [self.condition, self.left, self.right, *self.extras]
        return tuple(c for c in out if c)

    def config(self) -> dict[str, Any]:
        """The leaf config JSON of WAIT_SCHEDULE, SIGNAL, HTTP, BREAK and IF-row-test nodes."""
        if not self.query:
            return {}
        try:
            value = orjson.loads(self.query)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def is_row_test(self) -> bool:
        return self.type == "IF" and self.condition is None and (
            self.config().get("condition_type") == "result_has_rows")


def node_from_row(row: dict[str, Any]) -> Node:
    """Build a Node from a df.nodes row (as a dict with the column names)."""
    node_type = row["node_type"]
    query = row.get("query")
    condition = None
    extras: tuple[str, ...] = ()
    if node_type in COMPOSITE_TYPES and query:
        try:
            cfg = orjson.loads(query)
        except orjson.JSONDecodeError:
            cfg = None
        if isinstance(cfg, dict):
            if isinstance(cfg.get("condition_node"), str):
                condition = cfg["condition_node"]
            if isinstance(cfg.get("extra_nodes"), list):
                extras = tuple(str(x) for x in cfg["extra_nodes"])
    result_text = row.get("result_text")
    result = orjson.loads(result_text) if result_text is not None else row.get("result")
    return Node(
        id=row["id"], type=node_type, query=query, result_name=row.get("result_name"),
        left=row.get("left_node"), right=row.get("right_node"), condition=condition,
        extras=extras, parent=row.get("parent_node"), position=row.get("position") or 0,
        status=row.get("status") or "pending", result=result, error=row.get("error"),
        activation=row.get("activation") or 0, details=row.get("status_details"),
        options=row.get("options"))


@dataclass
class Graph:
    """All nodes an instance owns, by id."""

    nodes: dict[str, Node] = field(default_factory=dict)

    def subtree(self, node_id: str) -> list[str]:
        """Ids of `node_id` and its descendants (that this instance owns)."""
        out: list[str] = []
        stack = [node_id]
        while stack:
            nid = stack.pop()
            node = self.nodes.get(nid)
            if node is None:
                continue
            out.append(nid)
            stack.extend(node.children)
        return out
