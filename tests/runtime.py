"""Run the real runtime (supervisor + children) as a subprocess for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from tests.helpers import until_sync

_SCRIPT = """
import json, sys
from durable_actor import config, supervisor
options = dict(poll_interval=0.2, grace_period=5.0, log_level="info")
options.update(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
settings = config.Settings(executors=int(sys.argv[2]), **options)
sys.exit(supervisor.run(settings, sys.argv[1]))
"""


class Runtime:
    """A supervisor process on `dsn`. Use as a context manager; it is stopped at the end."""

    def __init__(self, dsn: str, *, executors: int = 2, new_session: bool = False,
                 **settings: object) -> None:
        """`settings` override the Settings fields (grace_period=1.0, log_level="debug" …);
        `new_session` puts the supervisor and its processes in a process group of their own."""
        self.dsn = dsn
        self.executors = executors
        self.settings = settings
        self.new_session = new_session
        self.log_path = Path(tempfile.mkstemp(prefix="da-runtime-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Runtime:
        with self.log_path.open("ab") as log:   # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, self.dsn, str(self.executors),
                 json.dumps(self.settings)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.new_session)
        until_sync(lambda: len(self.my_pids("executor")) == self.executors
                   and self.my_pids("dispatcher") and self.my_pids("timer"), timeout=20)
        return self

    def children(self) -> set[int]:
        """Pids of this supervisor's processes (read from /proc)."""
        assert self.proc is not None
        out: set[int] = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.add(int(entry.name))
        return out

    def my_pids(self, role: str) -> list[int]:
        """Live df.workers pids of `role` that belong to this supervisor."""
        mine = self.children()
        return [p for p in self.pids(role) if p in mine]

    def pids(self, role: str) -> list[int]:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            return [r[0] for r in c.execute(
                "SELECT pid FROM df.workers WHERE role = %s AND last_seen_at > now() - interval '20 s'",
                (role,))]

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if exc[0] is not None:
                sys.stderr.write(self.log()[-5000:])
            self.log_path.unlink(missing_ok=True)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
