"""Supervisor: forks the dispatcher, the timer and N executors, and keeps them running.

The processes share nothing but the database: each opens its own connections after the fork
(the supervisor holds none while forking). A child that dies is restarted with exponential
back-off (reset once it has run for a while). On SIGTERM or SIGINT the supervisor asks every
child to drain — finish the batch in flight, commit, claim nothing new — and waits up to
`grace_period` seconds; a second signal, or the end of the grace period, kills what is left
with SIGKILL (their uncommitted work is then redone by others: claims are row locks or
leases, never lost).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from durable_actor.config import Settings

RESTART_FIRST = 0.2
RESTART_CAP = 10.0
HEALTHY_AFTER = 30.0


@dataclass
class Child:
    role: str
    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    failures: int = field(default=0)


def _loop_class(role: str) -> Any:
    if role == "dispatcher":
        from durable_actor.dispatcher import Dispatcher

        return Dispatcher
    if role == "timer":
        from durable_actor.timer import Timer

        return Timer
    from durable_actor.executor import Executor

    return Executor


def _configure_logging(role: str, settings: Settings) -> None:
    from durable_actor import logs

    logs.configure(role, level=settings.log_level, fmt=settings.log_format)


def child_main(role: str, index: int, count: int, settings: Settings, dsn: str) -> None:
    """Entry point of a forked child: run one loop until told to stop."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the supervisor decides; it sends SIGTERM
    _configure_logging(role, settings)
    cls = _loop_class(role)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        kwargs: dict[str, Any] = {"index": index}
        if role == "executor":
            kwargs["count"] = count
        await cls(settings, dsn, **kwargs).run(stop)

    import uvloop

    uvloop.run(main())


class Supervisor:
    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.children = [Child("dispatcher", 0), Child("timer", 0)] + [
            Child("executor", i) for i in range(settings.executors)]
        self.ctx = multiprocessing.get_context("fork")
        self.stop_requests = 0

    def _start(self, child: Child) -> None:
        proc = self.ctx.Process(
            target=child_main, name=f"durable-actor {child.role} {child.index}",
            args=(child.role, child.index, self.settings.executors, self.settings, self.dsn),
            daemon=False)
        proc.start()
        child.process = proc
        child.started_at = time.monotonic()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requests += 1

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        _configure_logging("supervisor", self.settings)
        import structlog

        log = structlog.get_logger().bind(role="supervisor")
        for child in self.children:
            self._start(child)
        log.info("supervisor_started", pid=os.getpid(), executors=self.settings.executors,
                 children=[c.process.pid for c in self.children if c.process])
        while not self.stop_requests:
            now = time.monotonic()
            for child in self.children:
                proc = child.process
                if proc is not None and proc.is_alive():
                    if now - child.started_at > HEALTHY_AFTER:
                        child.failures = 0
                    continue
                if proc is not None:
                    proc.join(0)
                    child.failures += 1
                    delay = min(RESTART_CAP, RESTART_FIRST * 2 ** (child.failures - 1))
                    child.next_start = now + delay
                    child.process = None
                    log.warning("child_died", child=child.role, index=child.index,
                                exitcode=proc.exitcode, restart_in=round(delay, 2))
                if now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
                    log.info("child_restarted", child=child.role, index=child.index,
                             restarts=child.restarts)
            time.sleep(0.1)
        return self._drain(log)

    def _drain(self, log: Any) -> int:
        log.info("supervisor_draining", grace_period=self.settings.grace_period)
        alive = [c.process for c in self.children if c.process is not None and c.process.is_alive()]
        for proc in alive:
            if proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        requests = self.stop_requests
        deadline = time.monotonic() + self.settings.grace_period
        while any(p.is_alive() for p in alive):
            if time.monotonic() > deadline or self.stop_requests > requests:
                for proc in alive:
                    if proc.is_alive() and proc.pid:
                        os.kill(proc.pid, signal.SIGKILL)
                log.warning("supervisor_killed_children")
                break
            time.sleep(0.05)
        for proc in alive:
            proc.join(1)
        log.info("supervisor_stopped")
        return 0


def run(settings: Settings, dsn: str) -> int:
    """Run the runtime against `dsn` (already migrated) until SIGTERM/SIGINT; return exit code."""
    return Supervisor(settings, dsn).run()
