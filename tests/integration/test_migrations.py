"""Migrations: apply in order on an empty database, a second run changes nothing."""

from __future__ import annotations

import psycopg

from durable_actor import schema


def _catalog(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
            " AND NOT a.attisdropped WHERE n.nspname = 'df' ORDER BY 1, 3").fetchall()


def _functions(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT p.oid::regprocedure::text, md5(p.prosrc) FROM pg_proc p"
            " WHERE p.pronamespace = 'df'::regnamespace ORDER BY 1").fetchall()


def test_migrate_twice_is_a_noop(empty_dsn: str) -> None:
    first = schema.migrate(empty_dsn)
    assert [m.version for m in first] == [m.version for m in schema.available()]
    before = (_catalog(empty_dsn), _functions(empty_dsn))
    assert schema.migrate(empty_dsn) == []
    assert (_catalog(empty_dsn), _functions(empty_dsn)) == before
    with psycopg.connect(empty_dsn) as c:
        versions = [r[0] for r in c.execute("SELECT version FROM df.schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in schema.available()]
    assert schema.pending(empty_dsn) == []


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in schema.available()]
    assert versions == list(range(1, len(versions) + 1))


def test_nothing_granted_to_public(module_dsn: str) -> None:
    with psycopg.connect(module_dsn) as c:
        rows = c.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " WHERE p.pronamespace = 'df'::regnamespace"
            " AND has_function_privilege('public', p.oid, 'EXECUTE')").fetchall()
        assert rows == []
        assert c.execute("SELECT has_schema_privilege('public', 'df', 'USAGE')").fetchone() == (False,)
