"""Named SQL queries loaded from ``sql/queries/*.sql``: the only place the runtime's SQL lives.

Each block in a file starts with ``-- name: <noun_verb>`` followed by comment lines describing
it; the text up to the next ``-- name:`` is the query. Python code refers to queries by name.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import LiteralString, cast

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def sql_dir() -> resources.abc.Traversable:
    return resources.files("durable_actor") / "sql"


def parse_query_file(text: str) -> dict[str, str]:
    """Split a query file into {name: query}."""
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise ValueError(f"query {name!r} is defined twice")
        out[name] = body.strip() + "\n"
    return out


@cache
def all_queries() -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in sorted((sql_dir() / "queries").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            for name, body in parse_query_file(entry.read_text(encoding="utf-8")).items():
                if name in out:
                    raise ValueError(f"query {name!r} is defined twice")
                out[name] = body
    return out


def q(name: str) -> LiteralString:
    """The text of the named query. Query text is trusted: it ships in the package."""
    return cast(LiteralString, all_queries()[name])
