"""The runtime's own statements with their values as literals.

The executor and the dispatcher send their statements in few round trips of the simple query
protocol (`db.simple_query`), several statements at a time, which cannot take parameters:
their values go in as correctly quoted literals (`literal`). Values never come from a step's
statement text. `Literals` collects the statements of `actors.Actors.write` to go with
whatever the caller sends next (its COMMIT).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from durable_actor.refs import quote_literal


def literal(query: str, params: dict[str, Any] | tuple[Any, ...] | list[Any]) -> str:
    """`query` with `params` as correctly quoted literals, to go in a multi-statement round
    trip (which cannot take parameters). Values never come from a step's statement text.

    Placeholders are psycopg's (``%s``, ``%(name)s``, ``%%``). Every placeholder in the
    runtime's queries carries a cast, so a value goes as text: a list as the text of an array
    (`array_text`), a timestamp in ISO form. About ten times cheaper than psycopg's
    client-side cursor, and cheaper than its pipeline of prepared statements too."""
    positional = iter(() if isinstance(params, dict) else params)

    def value(m: re.Match[str]) -> str:
        if m[0] == "%%":
            return "%"
        return quoted(next(positional) if m[1] is None else params[m[1]])  # type: ignore[index]
    return PLACEHOLDER.sub(value, query).rstrip().rstrip(";")


PLACEHOLDER = re.compile(r"%(?:\((\w+)\))?s|%%")


def quoted(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value) if value >= 0 else f" {value!r}"    # never `--`, a comment
    if isinstance(value, str):
        return quote_literal(value)
    if isinstance(value, list):
        return quote_literal(array_text(value))
    if isinstance(value, datetime):
        return quote_literal(value.isoformat())
    raise TypeError(f"no literal for {type(value).__name__}")


def array_text(values: list[Any]) -> str:
    """A one-dimensional array in PostgreSQL's input syntax: every element double-quoted with
    its backslashes and double quotes escaped, NULL unquoted. Much faster than psycopg's text
    dumper, which matches regular expressions per element."""
    return "{" + ",".join(map(array_element, values)) + "}"


def array_element(value: Any) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    if isinstance(value, str):        # most elements: ids, statuses, JSON texts
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"no array literal for {type(value).__name__}")


class Literals:
    """Statements as literals (`literal`) kept to go with the next round trip: `send` runs
    them, with the caller's own statements after them, through `run` (a round trip of
    statements that returns each one's rows). A statement whose rows are wanted
    (`fetchall`: spawning and joining children) goes at once, with those before it. Takes the
    place of the cursor that `actors.Actors.write` writes with."""

    def __init__(self, run: Callable[[list[str]], Awaitable[list[list[dict[str, Any]]]]]
                 ) -> None:
        self.run = run
        self.pending: list[str] = []

    async def execute(self, query: str, params: Any = None) -> None:
        self.pending.append(query.rstrip().rstrip(";") if params is None
                            else literal(query, params))

    async def fetchall(self) -> list[dict[str, Any]]:
        return (await self.send())[-1]

    async def send(self, *statements: str) -> list[list[dict[str, Any]]]:
        """Run the pending statements and then `statements` in one round trip."""
        pending, self.pending = self.pending, []
        return await self.run([*pending, *statements])
