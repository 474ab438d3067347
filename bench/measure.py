"""How the parts measure: concurrent starters, sequential latency runs, percentiles, deadlines.

Throughput is taken from the database's own timestamps: the first workflow's creation to the last
one's completion (``workflows / (max(completed_at) - min(created_at))``), so it does not depend on
how often the harness polls. Single-workflow latency is taken at the client: from just before the
start call to the moment the client sees the workflow finished, one workflow at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")

# How often a sequential latency run looks at its workflow's status. One connection, one indexed
# row: cheap, and it bounds the observation error to about a millisecond.
LATENCY_POLL_S = 0.001
# How often the throughput phase checks whether every workflow has finished. The figure itself
# comes from database timestamps, so this only decides how soon the phase ends.
COMPLETION_POLL_S = 0.05


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one run; the same for every system."""

    workflows: int = 2000
    starters: int = 8
    executors: int = 2
    latency_runs: int = 50
    warmup: int = 20
    timeout_s: float = 300.0
    ready_timeout_s: float = 60.0


class BenchError(Exception):
    """A part could not produce its figures (not ready, timed out, workflows failed)."""


@dataclass
class StartBurst:
    """What the starters did: the ids they got and how long starting took."""

    ids: list[Any] = field(default_factory=list)
    started_s: float = 0.0


def emit(obj: dict[str, Any]) -> None:
    """Print one result as one JSON line."""
    print(json.dumps(obj, sort_keys=False), flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def until(probe: Callable[[], tuple[bool, T]], *, timeout: float, every: float,
          what: str) -> T:
    """Call `probe` until it returns (True, value); raise BenchError after `timeout`.

    The value seen last goes into the error, so a time-out says how far things got.
    """
    deadline = time.monotonic() + timeout
    while True:
        ok, seen = probe()
        if ok:
            return seen
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not reached in {timeout:.0f}s; last seen {seen!r}")
        time.sleep(every)


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def start_concurrently(dsn: str, starters: int, workflows: int,
                       start: Callable[[psycopg.Connection[Any]], Any]) -> StartBurst:
    """Run `starters` threads, each on its own autocommit connection, starting its share.

    Connections are opened before the clock starts; a barrier releases all starters at once.
    Each starter calls `start(conn)` in a loop and never waits for a workflow.
    """
    counts = split(workflows, starters)
    results: list[list[Any]] = [[] for _ in counts]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(counts) + 1)

    def starter(i: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait()
                out = results[i]
                for _ in range(counts[i]):
                    out.append(start(conn))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=starter, args=(i,), daemon=True)
               for i in range(len(counts))]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()  # broken when a starter failed to connect: reported below
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(f"a starter failed: {errors[0]!r}") from errors[0]
    return StartBurst(ids=[i for part in results for i in part], started_s=elapsed)


def sequential_latency(dsn: str, runs: int, start: Callable[[psycopg.Connection[Any]], Any],
                       finished: Callable[[psycopg.Connection[Any], Any], str | None],
                       timeout_s: float) -> tuple[list[float], list[Any]]:
    """Start one workflow, wait until `finished` reports it, repeat; latencies in ms, and ids.

    `finished(conn, id)` returns None while the workflow runs, else its final status; a status
    other than "completed" is an error.
    """
    latencies: list[float] = []
    ids: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(runs):
            t0 = time.perf_counter()
            wf = start(conn)
            deadline = time.monotonic() + timeout_s
            while (status := finished(conn, wf)) is None:
                if time.monotonic() > deadline:
                    raise BenchError(f"workflow {wf} not finished in {timeout_s:.0f}s")
                time.sleep(LATENCY_POLL_S)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if status != "completed":
                raise BenchError(f"workflow {wf} ended {status}")
            ids.append(wf)
    return latencies, ids


def latency_fields(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(latencies_ms, 50), 3),
            "p95_ms": round(percentile(latencies_ms, 95), 3)}
