"""Applies ``sql/migrations`` in order, each in its own transaction, under an advisory lock.

The lock is a session-level advisory lock held on a dedicated autocommit connection, so that
two supervisors starting together migrate once. We wait for it up to a bound and then fail
with a clear message (we never migrate without the lock). Applied versions are recorded in
``df.schema_migrations``; a second run is a no-op.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import LiteralString, cast

import psycopg

from durable_actor.errors import MigrationError, MigrationLockTimeout
from durable_actor.queries import sql_dir

# pg_advisory_lock key: the bytes of "dfmigrat" as a bigint, unlikely to collide.
MIGRATION_LOCK_KEY = 0x64666D6967726174
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    out = []
    for entry in (sql_dir() / "migrations").iterdir():
        m = _FILE.match(entry.name)
        if m:
            out.append(Migration(int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {versions}")
    return out


def applied(conn: psycopg.Connection[tuple[object, ...]]) -> set[int]:
    exists = conn.execute("SELECT to_regclass('df.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return set()
    return {int(str(r[0])) for r in conn.execute("SELECT version FROM df.schema_migrations")}


def pending(dsn: str) -> list[Migration]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = applied(conn)
    return [m for m in available() if m.version not in done]


def migrate(dsn: str, *, lock_timeout: float = 60.0, target: int | None = None) -> list[Migration]:
    """Apply pending migrations up to `target`; return those applied."""
    with psycopg.connect(dsn, autocommit=True) as lock_conn:
        _acquire(lock_conn, lock_timeout)
        try:
            with psycopg.connect(dsn) as conn:
                done = applied(conn)
                conn.commit()
                todo = [m for m in available() if m.version not in done
                        and (target is None or m.version <= target)]
                for m in todo:
                    _apply(conn, m)
                return todo
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _acquire(conn: psycopg.Connection[tuple[object, ...]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() > deadline:
            raise MigrationLockTimeout(
                f"another process has held the migration lock for {timeout:.0f}s; "
                "is a migration still running? (pg_locks, advisory key "
                f"{MIGRATION_LOCK_KEY})")
        time.sleep(0.2)


def _apply(conn: psycopg.Connection[tuple[object, ...]], m: Migration) -> None:
    try:
        with conn.transaction():
            conn.execute(cast(LiteralString, m.sql))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS df.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            conn.execute("INSERT INTO df.schema_migrations (version, name) VALUES (%s, %s)",
                         (m.version, m.name))
    except psycopg.Error as exc:
        raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
