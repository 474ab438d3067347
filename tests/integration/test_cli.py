"""The `durable-actor` command line, run as a real subprocess against real PostgreSQL servers.

`migrate` and `psql --dsn` use databases of the test server; `supervise` and `psql` without a
DSN use an embedded PostgreSQL 18 in a data directory of this module's own.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from durable_actor import __version__, schema

CLI = Path(sys.executable).with_name("durable-actor")
TIMEOUT = 60


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ACTOR_")}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env or _env(), stdin=subprocess.DEVNULL, check=False)


def labels(migrations: list[schema.Migration]) -> list[str]:
    return [f"{m.version:04d}_{m.name}" for m in migrations]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error a command printed: exactly one line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("durable-actor: error: "), proc.stderr
    return lines[0]


def schema_versions(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('df.schema_migrations')").fetchone() == (None,):
            return []
        return [r[0] for r in c.execute("SELECT version FROM df.schema_migrations ORDER BY 1")]


# --- help and version -----------------------------------------------------------------------

def test_console_script_is_installed() -> None:
    assert CLI.exists(), f"{CLI} missing: is the package installed (pip install -e .)?"


def test_help_names_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("supervise", "migrate", "psql", "status", "top", "explain", "cancel", "signal"):
        assert command in proc.stdout


@pytest.mark.parametrize(("command", "variables"), [
    ("supervise", ["DURABLE_ACTOR_DSN", "DURABLE_ACTOR_DATA_DIR", "DURABLE_ACTOR_EXECUTORS",
                   "DURABLE_ACTOR_LOG_LEVEL", "DURABLE_ACTOR_LOG_FORMAT",
                   "DURABLE_ACTOR_METRICS_PORT"]),
    ("migrate", ["DURABLE_ACTOR_DSN", "DURABLE_ACTOR_DATA_DIR"]),
    ("psql", ["DURABLE_ACTOR_DSN", "DURABLE_ACTOR_DATA_DIR"]),
])
def test_help_shows_each_option_environment_variable(command: str, variables: list[str]) -> None:
    proc = run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())   # help text wraps anywhere
    for variable in variables:
        assert f"env var: {variable}" in text, variable


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"durable-actor {__version__}"


# --- migrate --------------------------------------------------------------------------------

def test_migrate_applies_then_is_up_to_date(empty_dsn: str) -> None:
    every = schema.available()
    first = run("migrate", "--dsn", empty_dsn)
    assert first.returncode == 0, first.stderr
    for label in labels(every):
        assert f"applied: {label}" in first.stdout
    assert f"schema is at version {every[-1].version}" in first.stdout
    assert schema_versions(empty_dsn) == [m.version for m in every]

    second = run("migrate", "--dsn", empty_dsn)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"schema is up to date (version {every[-1].version})"


def test_migrate_reads_the_dsn_from_the_environment(empty_dsn: str) -> None:
    proc = run("migrate", env=_env(DURABLE_ACTOR_DSN=empty_dsn))
    assert proc.returncode == 0, proc.stderr
    assert schema_versions(empty_dsn) == [m.version for m in schema.available()]


def test_migrate_dry_run_applies_nothing(empty_dsn: str) -> None:
    proc = run("migrate", "--dsn", empty_dsn, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for label in labels(schema.available()):
        assert f"pending: {label}" in proc.stdout
    assert "nothing applied" in proc.stdout
    with psycopg.connect(empty_dsn) as c:
        assert c.execute("SELECT to_regnamespace('df')").fetchone() == (None,)


def test_migrate_show_sql_prints_the_migrations(empty_dsn: str) -> None:
    proc = run("migrate", "--dsn", empty_dsn, "--dry-run", "--show-sql")
    assert proc.returncode == 0, proc.stderr
    expected = "".join(f"-- migration {label}\n{m.sql.rstrip()}\n\n"
                       for label, m in zip(labels(schema.available()), schema.available(),
                                           strict=True))
    assert proc.stdout == expected            # stdout is SQL only, for a DBA to read or run
    assert "pending: 0001_schema" in proc.stderr
    assert schema_versions(empty_dsn) == []


def test_migrate_show_sql_when_applying(empty_dsn: str) -> None:
    proc = run("migrate", "--dsn", empty_dsn, "--show-sql")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-- migration 0001_schema\n")
    assert "applied: 0001_schema" in proc.stderr
    assert schema_versions(empty_dsn) == [m.version for m in schema.available()]


def test_migrate_target(empty_dsn: str) -> None:
    proc = run("migrate", "--dsn", empty_dsn, "--target", "1")
    assert proc.returncode == 0, proc.stderr
    assert schema_versions(empty_dsn) == [1]
    assert "applied: 0001_schema" in proc.stdout


def test_migrate_unknown_target_is_a_usage_error(empty_dsn: str) -> None:
    last = schema.available()[-1].version
    proc = run("migrate", "--dsn", empty_dsn, "--target", str(last + 1))
    assert proc.returncode == 2
    assert f"--target {last + 1}: no such migration" in one_error_line(proc)
    assert schema_versions(empty_dsn) == []


def test_migrate_gives_up_on_a_held_lock(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (schema.MIGRATION_LOCK_KEY,))
        proc = run("migrate", "--dsn", empty_dsn,
                   env=_env(DURABLE_ACTOR_MIGRATION_LOCK_TIMEOUT="0.3"))
    assert proc.returncode == 4, proc.stderr
    assert "migration lock" in one_error_line(proc)
    assert schema_versions(empty_dsn) == []


# --- errors a user can fix: one line, an exit code ------------------------------------------

def test_supervise_unreachable_database() -> None:
    proc = run("supervise", "--dsn", "postgresql://nobody:sekrit@127.0.0.1:1/nowhere")
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert "cannot connect to the database" in line
    assert "sekrit" not in proc.stderr + proc.stdout


def test_supervise_malformed_dsn() -> None:
    proc = run("supervise", "--dsn", "not a dsn")
    assert proc.returncode == 2, proc.stderr
    assert "invalid DSN" in one_error_line(proc)


def test_supervise_setting_out_of_bounds(empty_dsn: str) -> None:
    proc = run("supervise", "--dsn", empty_dsn, "--executors", "0")
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc).endswith(
        "executors must be at least 1 (option --executors, DURABLE_ACTOR_EXECUTORS)")
    proc = run("supervise", "--dsn", empty_dsn, env=_env(DURABLE_ACTOR_POLL_INTERVAL="0"))
    assert proc.returncode == 2, proc.stderr
    assert "poll_interval must be at least" in one_error_line(proc)
    assert schema_versions(empty_dsn) == []     # nothing happens before settings are valid


# --- psql -----------------------------------------------------------------------------------

def test_psql_with_dsn_passes_arguments_through(module_dsn: str) -> None:
    proc = run("psql", "--dsn", module_dsn, "-At", "-c", "SELECT 1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1\n"
    proc = run("psql", "-At", "-c", "SELECT current_database()",
               env=_env(DURABLE_ACTOR_DSN=module_dsn))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == psycopg.conninfo.conninfo_to_dict(module_dsn)["dbname"]


def test_psql_exit_code_is_psqls(module_dsn: str) -> None:
    proc = run("psql", "--dsn", module_dsn, "-v", "ON_ERROR_STOP=1", "-c", "SELECT nope")
    assert proc.returncode == 1
    assert "nope" in proc.stderr


# --- the embedded server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("cli") / "pgdata"
    yield path
    assert not server_running(path), "a test left the embedded server running"
    shutil.rmtree(path, ignore_errors=True)


def server_running(data_dir: Path) -> bool:
    pidfile = data_dir / "postmaster.pid"
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError, IndexError):
        return False
    return True


def can_connect(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as c:
            c.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


class Supervise:
    """`durable-actor supervise` on the embedded server, as a subprocess; killed if left over.

    It runs in a process group of its own, as under a service manager, so that :meth:`kill`
    can end the supervisor *and* its children at once. Killing only the supervisor and then a
    snapshot of its children races with a child being restarted: a child forked after the
    snapshot lives on, holding stdout open, and the reader thread never sees the end of it.
    """

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [str(CLI), "supervise", "--data-dir", str(data_dir), "--executors", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=_env(), start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                assert self.proc.poll() is None, f"supervise exited: {self.stderr()}"
                continue
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} on stdout in {timeout}s; stderr: {self.stderr()}")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def kill(self) -> None:
        """SIGKILL the whole process group: what a service manager does to a stuck service.

        The embedded server is not in the group (it runs in a session of its own), so it is
        left running.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT)

    def close(self) -> None:
        self.kill()      # also ends children that outlived a supervisor stopped by a test
        self.reader.join(TIMEOUT)
        assert not self.reader.is_alive(), "supervise's stdout is still open"
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()


def test_psql_starts_and_stops_the_embedded_server(data_dir: Path) -> None:
    assert not server_running(data_dir)
    proc = run("psql", "--data-dir", str(data_dir), "-At", "-c", "SELECT current_database()")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "durable_actor\n"
    assert not server_running(data_dir)


def test_supervise_on_the_embedded_server(data_dir: Path, tmp_path: Path) -> None:
    sup = Supervise(data_dir, tmp_path / "supervise.log")
    try:
        line = sup.wait_for_line("connect with:")
        assert line.startswith("durable-actor: embedded PostgreSQL 18")
        assert "durable-actor psql" in line
        dsn = shlex.split(line.split("connect with:", 1)[1])[1]   # psql '<dsn>' ...
        assert schema_versions(dsn) == [m.version for m in schema.available()]
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT to_regnamespace('df') IS NOT NULL").fetchone() == (True,)

        # psql attaches to the running server and leaves it running.
        proc = run("psql", "--data-dir", str(data_dir), "-At", "-c", "SELECT 1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "1\n"
        assert can_connect(dsn)

        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(TIMEOUT) == 0, sup.stderr()
        assert not server_running(data_dir)
        assert not can_connect(dsn)
        assert '"event":"supervise_stopped"' in sup.stderr()
    finally:
        sup.close()


def test_supervise_adopts_a_server_whose_holder_was_killed(data_dir: Path,
                                                          tmp_path: Path) -> None:
    """A supervise killed with SIGKILL leaves its server running; the next one stops it."""
    first = Supervise(data_dir, tmp_path / "first.log")
    try:
        first.wait_for_line("connect with:")
        first.kill()
    finally:
        first.close()
    assert server_running(data_dir)

    second = Supervise(data_dir, tmp_path / "second.log")
    try:
        second.wait_for_line("connect with:")
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(TIMEOUT) == 0, second.stderr()
    finally:
        second.close()
    assert not server_running(data_dir)
