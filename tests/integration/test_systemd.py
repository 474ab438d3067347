"""systemd integration: the sd_notify protocol spoken by `durable-actor supervise`, and the unit.

A test socket stands in for systemd: it is bound before the supervisor starts, named in
NOTIFY_SOCKET, and collects every datagram the supervisor sends.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from durable_actor import schema
from durable_actor.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "durable-actor.service"
CLI = Path(sys.executable).with_name("durable-actor")


class FakeSystemd:
    """A unix datagram socket collecting sd_notify messages."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"durable-actor-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="da-notify-")
            self.address = str(Path(self.dir) / "notify.sock")
            self.sock.bind(self.address)
        self.messages: list[tuple[float, list[str]]] = []

    def receive_until(self, line: str, timeout: float) -> list[str]:
        """Collect messages until one holds `line`; return that message's lines."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{line!r} not received in {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode().splitlines()
            self.messages.append((time.monotonic(), lines))
            if line in lines:
                return lines

    def close(self) -> None:
        self.sock.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_ACTOR_")}
    env.update(extra)
    return env


def test_ready_watchdog_stopping(fresh_dsn: str, systemd: FakeSystemd) -> None:
    env = _env(NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="1500000")
    proc = subprocess.Popen([str(CLI), "supervise", "--dsn", fresh_dsn, "--executors", "2"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        ready = systemd.receive_until("READY=1", timeout=30)
        # READY comes after the migrations, and after every process's first claim loop.
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            versions = {r[0] for r in c.execute("SELECT version FROM df.schema_migrations")}
        assert versions == {m.version for m in schema.available()}
        assert any(line.startswith("STATUS=running: 4/4 processes") for line in ready), ready
        assert f"MAINPID={proc.pid}" in ready
        seen = [lines for _, lines in systemd.messages]
        assert any("STATUS=applying schema migrations" in m for m in seen[:-1]), seen
        # Two pings, about a third of WATCHDOG_USEC apart.
        systemd.receive_until("WATCHDOG=1", timeout=5)
        first = systemd.messages[-1][0]
        systemd.receive_until("WATCHDOG=1", timeout=5)
        assert systemd.messages[-1][0] - first >= 0.3
        proc.send_signal(signal.SIGTERM)
        stopping = systemd.receive_until("STOPPING=1", timeout=10)
        assert any(line.startswith("STATUS=draining") for line in stopping)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_no_watchdog_ping_while_a_process_is_dead(fresh_dsn: str, systemd: FakeSystemd) -> None:
    """The watchdog pings only while every process is alive: a stopped child stops them."""
    env = _env(NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="600000")
    proc = subprocess.Popen([str(CLI), "supervise", "--dsn", fresh_dsn, "--executors", "1"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        systemd.receive_until("READY=1", timeout=30)
        systemd.receive_until("WATCHDOG=1", timeout=5)
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            row = c.execute("SELECT pid FROM df.workers WHERE role = 'executor'").fetchone()
        assert row is not None
        os.kill(row[0], signal.SIGSTOP)      # alive but frozen: its ticks stop
        try:
            frozen_at = time.monotonic()
            with pytest.raises(AssertionError):
                # stale after max(1.5 s, WATCHDOG/2): no ping may arrive 2 s after that
                while True:
                    systemd.receive_until("WATCHDOG=1", timeout=3.5)
                    if time.monotonic() - frozen_at > 2.0:
                        break
        finally:
            os.kill(row[0], signal.SIGCONT)
        systemd.receive_until("WATCHDOG=1", timeout=10)   # pings resume
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_notifier_abstract_socket() -> None:
    fake = FakeSystemd(abstract=True)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": fake.address})
        assert notifier.enabled
        assert notifier.ready("ok")
        assert "READY=1" in fake.receive_until("READY=1", timeout=2)
        assert notifier.status("busy")
        assert fake.receive_until("STATUS=busy", timeout=2) == ["STATUS=busy"]
        notifier.close()
    finally:
        fake.close()


def test_notifier_without_socket_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_seconds == 30.0
    # A watchdog meant for another process is not ours.
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_file_keys() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) >= 10
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].startswith("/etc/durable-actor/")
    assert service["ExecStart"].endswith("durable-actor supervise")
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "RestrictSUIDSGID", "ProtectKernelTunables"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["KillMode"] == "mixed"
    # The drain must fit in the stop timeout, with the default grace period.
    assert int(service["TimeoutStopSec"]) > 10


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` where it exists; the unit must parse as INI everywhere."""
    sections = _unit().sections()
    assert sections == ["Unit", "Service", "Install"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    text = UNIT.read_text()
    # verify checks that ExecStart and the user exist: point them at this machine's.
    lines = []
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={CLI} supervise"
        elif line.startswith(("User=", "Group=")):
            line = line.split("=")[0] + "=root"
        lines.append(line)
    unit = tmp_path / "durable-actor.service"
    unit.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "durable-actor.service" not in proc.stderr, proc.stderr
