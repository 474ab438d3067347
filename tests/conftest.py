"""Test fixtures: a real PostgreSQL server, a migrated template database, clones per test.

The server is an embedded PostgreSQL 18 started once per session, unless
DURABLE_ACTOR_TEST_DSN names a server where the tests may CREATE DATABASE. Every session
creates its own uniquely named databases (``durable_actor_test_<hex>``) and drops them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from durable_actor import schema
from tests.runtime import Runtime

for _k in list(os.environ):
    if _k.startswith("DURABLE_ACTOR_") and _k != "DURABLE_ACTOR_TEST_DSN":
        del os.environ[_k]


class Server:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, dsn: str, embedded: object | None = None) -> None:
        self.dsn = dsn
        self.embedded = embedded
        self.prefix = f"durable_actor_test_{uuid.uuid4().hex[:10]}"
        self._count = 0
        self.created: list[str] = []

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.dsn, dbname=dbname)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def create_database(self, template: str | None = None) -> str:
        self._count += 1
        name = f"{self.prefix}_{self._count}"
        with self.admin() as conn:
            if template:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)))
            else:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def version(self) -> str:
        with self.admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"


def _start_server() -> Server:
    dsn = os.environ.get("DURABLE_ACTOR_TEST_DSN")
    if dsn:
        return Server(dsn)
    from durable_actor.embedded import EmbeddedServer

    tmp = Path(tempfile.mkdtemp(prefix="da-test-"))
    emb = EmbeddedServer(tmp / "pgdata", delete_on_stop=True)
    emb.start(database="postgres")
    return Server(emb.dsn("postgres"), emb)


_SERVER: Server | None = None


def _server() -> Server:
    global _SERVER
    if _SERVER is None:
        _SERVER = _start_server()
    return _SERVER


def pytest_report_header(config: pytest.Config) -> str:
    srv = _server()
    kind = "DURABLE_ACTOR_TEST_DSN" if srv.embedded is None else "embedded"
    return f"PostgreSQL {srv.version()} ({kind})"


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    srv = _server()
    yield srv
    for name in list(srv.created):
        srv.drop_database(name)
    if srv.embedded is not None:
        srv.embedded.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def template_db(server: Server) -> str:
    """A database with the df schema applied; cloned by the fixtures below."""
    name = server.create_database()
    schema.migrate(server.dsn_for(name))
    # The tests connect as a superuser; production refuses superuser-started workflows by
    # default (tests/integration/test_lifecycle.py covers the refusal on its own database).
    with psycopg.connect(server.dsn_for(name), autocommit=True) as c:
        c.execute("UPDATE df.settings SET value = 'true' WHERE name = 'enable_superuser_instances'")
    return name


@pytest.fixture(scope="module")
def module_dsn(server: Server, template_db: str) -> Iterator[str]:
    """A migrated database shared by the tests of one module."""
    name = server.create_database(template=template_db)
    yield server.dsn_for(name)
    server.drop_database(name)


@pytest.fixture
def fresh_dsn(server: Server, template_db: str) -> Iterator[str]:
    """A migrated database of this test's own (for tests that run processes)."""
    name = server.create_database(template=template_db)
    yield server.dsn_for(name)
    server.drop_database(name)


@pytest.fixture
def empty_dsn(server: Server) -> Iterator[str]:
    """An empty database of this test's own (for migration tests)."""
    name = server.create_database()
    yield server.dsn_for(name)
    server.drop_database(name)


@pytest.fixture
def conn(module_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the module's database."""
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def runtime(module_dsn: str) -> Iterator[Runtime]:
    """The real runtime (supervisor, dispatcher, timer, 2 executors) on the module's database."""
    with Runtime(module_dsn, executors=2) as rt:
        yield rt


@pytest.fixture
def db(module_dsn: str, runtime: Runtime) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the module's database, with the runtime running."""
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c
