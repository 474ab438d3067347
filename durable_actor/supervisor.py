"""Supervisor: forks the dispatcher, the timer and N executors, and keeps them running.

The processes share nothing but the database: each opens its own connections after the fork
(the supervisor holds none while forking). A child that dies is restarted with exponential
back-off (reset once it has run for a while). On SIGTERM or SIGINT the supervisor asks every
child to drain — finish the batch in flight, commit, claim nothing new — and waits up to
`grace_period` seconds; a second signal, or the end of the grace period, kills what is left
with SIGKILL (their uncommitted work is then redone by others: claims are row locks or
leases, never lost).

Liveness and sd_notify
----------------------
Each child owns one slot of a shared array of doubles (``multiprocessing.RawArray``, created
before the forks). The slot is 0 until the child's first claim loop has completed (it reached
the database and ran one batch); from then on the child writes ``time.monotonic()`` after each
batch and once a second from a ticker task on its event loop. CLOCK_MONOTONIC is one clock
for the whole host, so the supervisor can compare the values with its own.

- ``READY=1`` once the schema is migrated (cli.py does that before us) and every slot is set.
- ``WATCHDOG=1`` every third of ``WATCHDOG_USEC``, but only while every child is alive and its
  slot is fresh (at most half the watchdog interval old, and never more than 10 s — no
  wait, a child that is busy with a long step keeps ticking: the step is awaited, not blocking).
  A supervisor whose loop is stuck, or whose children are dead or frozen, stops pinging and
  systemd restarts the service.
- ``STOPPING=1`` when the drain starts; ``STATUS=`` lines say what the supervisor does.

A restarted child's slot is reset to 0 before the fork and set again by the new process.
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
from durable_actor.errors import ConfigError
from durable_actor.sdnotify import Notifier

RESTART_FIRST = 0.2
RESTART_CAP = 10.0
HEALTHY_AFTER = 30.0
STALE_CAP = 10.0        # a child slot older than this (seconds) stops the watchdog pings
TICK = 0.1              # the supervisor's loop period


@dataclass
class Child:
    role: str
    index: int
    slot: int = 0
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


def child_main(role: str, index: int, count: int, settings: Settings, dsn: str,
               beats: Any = None, slot: int = 0) -> None:
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
        loop = cls(settings, dsn, **kwargs)
        if beats is not None:
            def beat() -> None:
                beats[slot] = time.monotonic()

            loop.beat = beat
        await loop.run(stop)

    import uvloop

    uvloop.run(main())


class Supervisor:
    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings = settings
        self.dsn = dsn
        self.children = [Child("dispatcher", 0), Child("timer", 0)] + [
            Child("executor", i) for i in range(settings.executors)]
        for slot, child in enumerate(self.children):
            child.slot = slot
        self.ctx = multiprocessing.get_context("fork")
        self.beats: Any = self.ctx.RawArray("d", len(self.children))
        self.stop_requests = 0
        self.notifier = Notifier()
        self.ready = False
        self.last_ping = 0.0
        self.total_restarts = 0
        self.metrics_server: Any = None

    def _start(self, child: Child) -> None:
        self.beats[child.slot] = 0.0
        proc = self.ctx.Process(
            target=child_main, name=f"durable-actor {child.role} {child.index}",
            args=(child.role, child.index, self.settings.executors, self.settings, self.dsn,
                  self.beats, child.slot),
            daemon=False)
        proc.start()
        child.process = proc
        child.started_at = time.monotonic()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requests += 1

    def _status_line(self) -> str:
        alive = sum(1 for c in self.children if c.process is not None and c.process.is_alive())
        return (f"running: {alive}/{len(self.children)} processes "
                f"({self.settings.executors} executors), {self.total_restarts} restarts")

    def _all_fresh(self, now: float) -> bool:
        """Every child alive, and each has looped recently (see the module docstring)."""
        wd = self.notifier.watchdog_seconds or STALE_CAP
        stale = min(STALE_CAP, max(1.5, wd / 2))
        for child in self.children:
            proc = child.process
            if proc is None or not proc.is_alive():
                return False
            beat = self.beats[child.slot]
            if beat <= 0 or now - beat > stale:
                return False
        return True

    def _notify(self, now: float, log: Any) -> None:
        if not self.ready:
            if all(self.beats[c.slot] > 0 for c in self.children):
                self.ready = True
                self.notifier.ready(self._status_line())
                log.info("supervisor_ready", processes=len(self.children))
            return
        wd = self.notifier.watchdog_seconds
        if wd is not None and now - self.last_ping >= wd / 3 and self._all_fresh(now):
            self.notifier.watchdog()
            self.notifier.status(self._status_line())
            self.last_ping = now

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        _configure_logging("supervisor", self.settings)
        import structlog

        log = structlog.get_logger().bind(role="supervisor")
        self._open_metrics(log)     # before the forks: a busy port fails here, alone
        self.notifier.status("starting processes")
        for child in self.children:
            self._start(child)
        log.info("supervisor_started", pid=os.getpid(), executors=self.settings.executors,
                 children=[c.process.pid for c in self.children if c.process])
        while not self.stop_requests:
            now = time.monotonic()
            for child in self.children:
                self._watch(child, now, log)
            self._notify(now, log)
            self._wait(TICK)
        return self._drain(log)

    def _watch(self, child: Child, now: float, log: Any) -> None:
        proc = child.process
        if proc is not None and proc.is_alive():
            if now - child.started_at > HEALTHY_AFTER:
                child.failures = 0
            return
        if proc is not None:
            proc.join(0)
            child.failures += 1
            delay = min(RESTART_CAP, RESTART_FIRST * 2 ** (child.failures - 1))
            child.next_start = now + delay
            child.process = None
            log.warning("child_died", child=child.role, index=child.index,
                        exitcode=proc.exitcode, restart_in=round(delay, 2))
            if proc.pid is not None:
                from durable_actor import metrics

                metrics.child_died(proc.pid)
        if now >= child.next_start:
            child.restarts += 1
            self.total_restarts += 1
            from durable_actor import metrics

            metrics.restarted(child.role)
            self._start(child)
            log.info("child_restarted", child=child.role, index=child.index,
                     restarts=child.restarts)

    def _open_metrics(self, log: Any) -> None:
        if self.settings.metrics_port is None:
            return
        from durable_actor import metrics

        metrics.enable()
        try:
            self.metrics_server = metrics.serve(self.settings.metrics_port, self.dsn)
        except OSError as exc:
            metrics.disable()
            raise ConfigError(f"metrics_port cannot be listened on: {exc.strerror or exc}") from exc
        log.info("metrics_serving", port=self.settings.metrics_port)

    def _wait(self, seconds: float) -> None:
        """Sleep `seconds`, answering metrics scrapes meanwhile (no thread: we fork)."""
        if self.metrics_server is None:
            time.sleep(seconds)
            return
        self.metrics_server.serve_for(seconds)

    def _drain(self, log: Any) -> int:
        log.info("supervisor_draining", grace_period=self.settings.grace_period)
        self.notifier.stopping(f"draining (grace period {self.settings.grace_period:g} s)")
        alive = [c.process for c in self.children if c.process is not None and c.process.is_alive()]
        for proc in alive:
            if proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_period
        while any(p.is_alive() for p in alive):
            # The first signal began the drain; any later one, whenever it came, ends it.
            if time.monotonic() > deadline or self.stop_requests > 1:
                for proc in alive:
                    if proc.is_alive() and proc.pid:
                        os.kill(proc.pid, signal.SIGKILL)
                log.warning("supervisor_killed_children")
                break
            time.sleep(0.05)
        for proc in alive:
            proc.join(1)
        if self.metrics_server is not None:
            from durable_actor import metrics

            self.metrics_server.close()
            metrics.disable()
        self.notifier.status("stopped")
        self.notifier.close()
        log.info("supervisor_stopped")
        return 0


def run(settings: Settings, dsn: str) -> int:
    """Run the runtime against `dsn` (already migrated) until SIGTERM/SIGINT; return exit code."""
    return Supervisor(settings, dsn).run()
