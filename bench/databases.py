"""The PostgreSQL server under test and the scratch databases the benchmark parts run in.

Every part gets a database of its own, created here under a unique name
(``bench_<system>_<hex>``) and dropped ``WITH (FORCE)`` when the part ends, so a run never touches
a database it did not create. Without a DSN the server is an embedded PostgreSQL on a temporary
directory that is deleted when the run stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


class ServerUnderTest:
    """One PostgreSQL server; `admin_dsn` may CREATE and DROP databases."""

    def __init__(self, admin_dsn: str, embedded: object | None = None,
                 tmp_dir: Path | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.embedded = embedded
        self.tmp_dir = tmp_dir
        self.run_tag = uuid.uuid4().hex[:8]
        self._count = 0

    @classmethod
    def start_embedded(cls) -> ServerUnderTest:
        """Start an embedded PostgreSQL on a fresh temporary directory (deleted on stop)."""
        from durable_actor.embedded import EmbeddedServer

        tmp_dir = Path(tempfile.mkdtemp(prefix="durable-actor-bench-"))
        emb = EmbeddedServer(tmp_dir / "pgdata", delete_on_stop=True)
        try:
            emb.start(database="postgres")
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return cls(emb.dsn("postgres"), emb, tmp_dir)

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()  # type: ignore[attr-defined]
            self.embedded = None
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def version(self) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]).split()[0] if row else "?"

    @property
    def kind(self) -> str:
        return "embedded" if self.embedded is not None else "dsn"

    @contextmanager
    def scratch_database(self, system: str) -> Iterator[str]:
        """Create a uniquely named database for `system`, yield its DSN, drop it afterwards."""
        self._count += 1
        name = f"bench_{system}_{self.run_tag}_{self._count}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_conninfo(self.admin_dsn, dbname=name)
        finally:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))


def as_url(dsn: str) -> str:
    """The same connection as a ``postgresql://`` URL (SQLAlchemy, hence DBOS, wants a URL).

    A Unix-socket host and its port travel as query parameters, which psycopg understands.
    """
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    dbname = params.pop("dbname", "postgres")
    user = params.pop("user", None)
    password = params.pop("password", None)
    host = params.pop("host", None)
    port = params.pop("port", None)
    netloc = ""
    if user:
        netloc = quote(user, safe="")
        if password:
            netloc += ":" + quote(password, safe="")
        netloc += "@"
    if host and not host.startswith("/") and "," not in host:
        netloc += host + (f":{port}" if port else "")
    else:
        if host:
            params["host"] = host
        if port:
            params["port"] = port
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def cores() -> int:
    return os.cpu_count() or 1
