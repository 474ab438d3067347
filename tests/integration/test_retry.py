"""Retry policies (df.retry) and step time-outs (df.timeout) through the real runtime.

A local HTTP server fails on purpose (503s, 429 with Retry-After); SQL steps meet a real
deadlock and real statement time-outs; every executor and the timer are killed during a
back-off. 127.0.0.1 is reached through the http_allowed_hosts allow-list, as in
test_http_step.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from tests.helpers import start, until_sync
from tests.runtime import Runtime, kill


class FlakyServer:
    """``/flaky/<key>?fail=N&code=C[&after=S]`` answers C (with Retry-After: S when given) to
    the first N requests for <key>, then 200. Records when each request came."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.keys: dict[str, list[str]] = defaultdict(list)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                key = url.path.rsplit("/", 1)[1]
                with outer.lock:
                    outer.times[key].append(time.time())
                    outer.keys[key].append(self.headers.get("Idempotency-Key") or "")
                    seen = len(outer.times[key])
                if seen <= int(query.get("fail", "0")):
                    code = int(query.get("code", "503"))
                    data = b"try later"
                    self.send_response(code)
                    if "after" in query:
                        self.send_header("Retry-After", query["after"])
                else:
                    data = json.dumps({"attempt": seen}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def hits(self, key: str) -> list[float]:
        with self.lock:
            return list(self.times[key])


@pytest.fixture(scope="module")
def web() -> Iterator[FlakyServer]:
    srv = FlakyServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def allow(dsn: str, value: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE df.settings SET value = %s WHERE name = 'http_allowed_hosts'", (value,))


@pytest.fixture
def db(module_dsn: str, runtime: Runtime) -> Iterator[psycopg.Connection[Any]]:
    allow(module_dsn, "127.0.0.1")
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c
    allow(module_dsn, "")


def await_status(db: psycopg.Connection[Any], instance: str, status: str,
                 timeout: int = 30) -> None:
    done = db.execute("SELECT df.await_instance(%s, %s)", (instance, timeout)).fetchone()
    assert done == (status,), (done, step_node(db, instance))


def step_node(db: psycopg.Connection[Any], instance: str,
              node_type: str | None = None) -> dict[str, Any]:
    cur = db.execute(
        "SELECT node_type, status, result, status_details FROM df.instance_nodes(%s)"
        " WHERE node_type IN ('SQL', 'HTTP') AND (%s::text IS NULL OR node_type = %s)"
        " ORDER BY node_id LIMIT 1", (instance, node_type, node_type))
    row = cur.fetchone()
    assert row is not None
    details = json.loads(row[3]) if row[3] else None
    return {"node_type": row[0], "status": row[1], "result": row[2], "details": details}


# -- HTTP ----------------------------------------------------------------------------------------

def test_flaky_http_completes_on_the_third_attempt(db: psycopg.Connection[Any],
                                                   web: FlakyServer) -> None:
    i = start(db, "df.retry(df.http(%s, 'GET'), 5, 0.2, 1)",
              web.url + "/flaky/a?fail=2&code=503")
    await_status(db, i, "completed")
    node = step_node(db, i)
    attempts = node["details"]["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == ["failed", "failed", "completed"]
    assert attempts[0]["http_status"] == 503 and "returned 503" in attempts[0]["error"]
    assert json.loads(json.loads(node["result"])["body"]) == {"attempt": 3}
    assert len(web.hits("a")) == 3
    # every attempt of one run carries the same idempotency key
    assert len(set(web.keys["a"])) == 1


def test_http_gives_up_saying_how_many_attempts(db: psycopg.Connection[Any],
                                               web: FlakyServer) -> None:
    i = start(db, "df.retry(df.http(%s, 'GET'), 2, 0.1, 0.1)",
              web.url + "/flaky/b?fail=9&code=502")
    await_status(db, i, "failed")
    node = step_node(db, i)
    assert node["status"] == "failed"
    assert "returned 502" in node["result"] and "(gave up after 2 attempts)" in node["result"]
    assert len(web.hits("b")) == 2


def test_http_429_waits_for_retry_after(db: psycopg.Connection[Any], web: FlakyServer) -> None:
    i = start(db, "df.retry(df.http(%s, 'GET'), 3, 0.05, 10)",
              web.url + "/flaky/c?fail=1&code=429&after=2")
    await_status(db, i, "completed")
    hits = web.hits("c")
    assert len(hits) == 2
    assert hits[1] - hits[0] >= 1.9, hits            # not the 0.05 s back-off
    first = step_node(db, i)["details"]["attempts"][0]
    assert first["http_status"] == 429


def test_a_4xx_is_not_retried_unless_listed(db: psycopg.Connection[Any],
                                            web: FlakyServer) -> None:
    i = start(db, "df.retry(df.http(%s, 'GET'), 3, 0.05, 1)", web.url + "/flaky/d?fail=1&code=404")
    await_status(db, i, "completed")
    assert json.loads(step_node(db, i)["result"])["status"] == 404
    i = start(db, "df.retry(df.http(%s, 'GET'), 3, 0.05, 1, ARRAY['http_404'])",
              web.url + "/flaky/e?fail=1&code=404")
    await_status(db, i, "completed")
    assert json.loads(step_node(db, i)["result"])["status"] == 200


# -- SQL -----------------------------------------------------------------------------------------

def test_a_deadlocked_sql_step_is_retried_and_completes(db: psycopg.Connection[Any],
                                                        module_dsn: str) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, v int NOT NULL)")
    db.execute("TRUNCATE accounts")
    db.execute("INSERT INTO accounts VALUES (1, 0), (2, 0)")
    db.execute("""CREATE OR REPLACE FUNCTION transfer() RETURNS int LANGUAGE plpgsql AS $$
                  BEGIN
                      UPDATE accounts SET v = v + 1 WHERE id = 1;
                      UPDATE accounts SET v = v + 1 WHERE id = 2;
                      RETURN (SELECT sum(v) FROM accounts);
                  END $$""")
    with psycopg.connect(module_dsn) as other:
        other.execute("UPDATE accounts SET v = v + 10 WHERE id = 2")  # holds row 2
        i = start(db, "df.retry('SELECT transfer() AS total', 3, 0.2, 1)")

        def step_waits() -> bool:
            # The step as a task: a step run where its workflow's mail was taken (no task row
            # yet) is cut short after the batch budget and queued as one; a task is not.
            row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                             " AND query LIKE '%%transfer()%%' AND pid <> pg_backend_pid()"
                             " AND EXISTS (SELECT 1 FROM df.tasks WHERE instance_id = %s)",
                             (i,)).fetchone()
            return bool(row and row[0])

        until_sync(step_waits, timeout=20)            # the step holds row 1, waits for row 2
        other.execute("UPDATE accounts SET v = v + 10 WHERE id = 1")   # closes the cycle
        other.commit()
    await_status(db, i, "completed")
    node = step_node(db, i)
    first, second = node["details"]["attempts"]
    assert first["sqlstate"] == "40P01" and "deadlock detected" in first["error"]
    assert second["status"] == "completed"
    assert json.loads(node["result"])["rows"] == [{"total": 22}]


def test_a_statement_timeout_fails_the_step_clearly(db: psycopg.Connection[Any]) -> None:
    i = start(db, "df.timeout('SELECT pg_sleep(20)', 0.5)")
    await_status(db, i, "failed")
    node = step_node(db, i)
    assert node["result"] == '"SQL execution failed: statement timeout after 0.5s"'
    # the executors stay healthy, and the time-out did not outlive its step
    i = start(db, "df.timeout('SELECT 1', 0.2) ~> 'SELECT pg_sleep(0.4)'")
    await_status(db, i, "completed")


def test_a_timeout_is_retried_only_when_listed(db: psycopg.Connection[Any]) -> None:
    i = start(db, "df.retry(df.timeout('SELECT pg_sleep(20)', 0.3), 3, 0.05, 0.1)")
    await_status(db, i, "failed")
    node = step_node(db, i)
    assert len(node["details"]["attempts"]) == 1
    assert "statement timeout after 0.3s (not retried" in node["result"]
    i = start(db, "df.retry(df.timeout('SELECT pg_sleep(20)', 0.3), 2, 0.05, 0.1,"
                  " ARRAY['57014'])")
    await_status(db, i, "failed")
    node = step_node(db, i)
    assert [a["sqlstate"] for a in node["details"]["attempts"]] == ["57014", "57014"]
    assert node["result"].endswith('statement timeout after 0.3s (gave up after 2 attempts)"')


def test_timeouts_do_not_leak_to_other_steps_of_a_batch(db: psycopg.Connection[Any]) -> None:
    with db.transaction():      # queued together, so executors run them in shared batches
        ids = [start(db, "df.timeout('SELECT 1', 0.1)" if n % 2 else "'SELECT pg_sleep(0.2)'")
               for n in range(12)]
    for i in ids:
        await_status(db, i, "completed")


def test_a_failing_step_in_a_branch_retries_inside_its_child(db: psycopg.Connection[Any],
                                                             web: FlakyServer) -> None:
    i = start(db, "df.retry(df.http(%s, 'GET'), 3, 0.1, 1) & 'SELECT 2'",
              web.url + "/flaky/f?fail=1&code=500")
    await_status(db, i, "completed")
    assert len(web.hits("f")) == 2


# -- crash during a back-off -----------------------------------------------------------------

def test_back_off_survives_killing_every_executor_and_the_timer(fresh_dsn: str) -> None:
    srv = FlakyServer()
    srv.thread.start()
    allow(fresh_dsn, "127.0.0.1")
    try:
        with Runtime(fresh_dsn, executors=2) as rt, \
                psycopg.connect(fresh_dsn, autocommit=True) as db:
            i = start(db, "df.retry(df.http(%s, 'GET'), 2, 4, 4)", srv.url + "/flaky/k?fail=1")

            def waiting() -> dict[str, Any] | None:
                details = step_node(db, i)["details"]
                return details if details and "retry_at" in details else None

            details = until_sync(waiting, timeout=20)
            assert db.execute("SELECT count(*) FROM df.timers WHERE instance_id = %s",
                              (i,)).fetchone() == (1,)
            assert db.execute("SELECT count(*) FROM df.tasks WHERE instance_id = %s",
                              (i,)).fetchone() == (0,)     # a waiting retry holds no task
            victims = rt.pids("executor") + rt.pids("timer")
            assert len(victims) == 3
            for pid in victims:
                kill(pid)
            await_status(db, i, "completed", timeout=60)
            hits = srv.hits("k")
            assert len(hits) == 2
            retry_at = details["attempts"][0]["retry_at"]
            due = db.execute("SELECT extract(epoch FROM %s::timestamptz)::float8",
                             (retry_at,)).fetchone()
            assert due is not None
            # not before its time, and not much after it (the restarted timer catches up)
            assert due[0] - 0.5 <= hits[1] <= due[0] + 15, (hits, due)
            assert hits[1] - hits[0] >= 1.9
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


# -- building and validating policies (no runtime needed) ---------------------------------------

def test_policies_compose_and_are_checked(conn: psycopg.Connection[Any]) -> None:
    def one(sql: str, *args: Any) -> Any:
        row = conn.execute(sql, args).fetchone()
        assert row is not None
        return row[0]

    node = json.loads(one("SELECT df.retry('SELECT 1', 4, 0.5, 8, ARRAY['40p01', 'HTTP_5XX'])"
                          " |=> 'r'"))
    assert list(node) == ["node_type", "query", "retry", "result_name"]
    assert node["retry"] == {"max_attempts": 4, "backoff_seconds": 0.5,
                             "max_backoff_seconds": 8, "retry_on": ["40P01", "http_5xx"]}
    chain = json.loads(one("SELECT df.retry('SELECT 1') ~> df.timeout('SELECT 2', 3)"))
    assert chain["left_node"]["retry"]["max_attempts"] == 3
    assert chain["right_node"]["timeout_seconds"] == 3
    for bad, message in [
        ("df.retry(df.sleep(1))", "not a SLEEP node"),
        ("df.retry('SELECT 1' ~> 'SELECT 2')", "not a THEN node"),
        ("df.retry('SELECT 1', 0)", "max_attempts must be an integer from 1 to 100"),
        ("df.retry('SELECT 1', 101)", "max_attempts must be an integer from 1 to 100"),
        ("df.retry('SELECT 1', 3, -1)", "backoff_seconds must be a positive number"),
        ("df.retry('SELECT 1', 3, 10, 5)", "max_backoff_seconds must be at least"),
        ("df.retry('SELECT 1', 3, 1, 5, ARRAY['sometimes'])", "is not an error class"),
        ("df.retry('SELECT 1', 3, 1, 5, ARRAY[]::text[])", "must not be empty"),
        ("df.timeout('SELECT 1', 0)", "timeout_seconds must be a positive number"),
        ("df.timeout(df.http('https://example.com'), 5)", "not valid for HTTP nodes"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            conn.execute(f"SELECT {bad}")
    # hand-built graphs are checked by df.start, with the path of the bad node
    graph = json.dumps({"node_type": "THEN", "left_node": {"node_type": "SQL", "query": "x"},
                        "right_node": {"node_type": "SLEEP", "query": "1", "timeout_seconds": 2}})
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=r"root\.right: timeout_seconds is not valid for SLEEP nodes"):
        conn.execute("SELECT df.start(%s)", (graph,))
    # and stored per node
    i = one("SELECT df.start(df.timeout(df.retry('SELECT 1', 2), 1.5) ~> 'SELECT 2')")
    options = [r[0] for r in conn.execute(
        "SELECT options FROM df.nodes WHERE instance_id = %s ORDER BY position", (i,))]
    assert options == [None, {"retry": {"max_attempts": 2, "backoff_seconds": 1,
                                        "max_backoff_seconds": 60}, "timeout_seconds": 1.5},
                       None]
