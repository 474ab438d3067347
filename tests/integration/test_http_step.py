"""HTTP steps against a real local HTTP server, in process and through the real runtime.

The server listens on 127.0.0.1, which SSRF protection blocks: tests reach it only after
putting 127.0.0.1 on the allow-list (df.settings 'http_allowed_hosts').
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from durable_actor import http_guard
from durable_actor.errors import StepError
from durable_actor.steps import http as http_step
from tests.helpers import until_sync
from tests.runtime import Runtime


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Server:
    """A threaded HTTP server that records every request it gets."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.release = threading.Event()      # lets /hang answer
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer.lock:
                    outer.seen.append(Seen(self.command, self.path,
                                           {k.lower(): v for k, v in self.headers.items()}, body))
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/hang":
                    outer.release.wait(30)
                if url.path.startswith("/status/"):
                    code = int(url.path.rsplit("/", 1)[1])
                    return self._send(code, b"status %d" % code, "text/plain")
                if url.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if url.path == "/binary":
                    return self._send(200, bytes(range(256)), "application/octet-stream")
                if url.path == "/big":
                    return self._send(200, b"x" * 5000, "text/plain")
                echo = {"method": self.command, "path": self.path,
                        "body": body.decode("latin-1")}
                return self._send(200, json.dumps(echo).encode(), "application/json")

            def _send(self, code: int, data: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Test", "yes")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def requests(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if urlsplit(s.path).path == path]


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()


def allow(dsn: str, value: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE df.settings SET value = %s WHERE name = 'http_allowed_hosts'", (value,))


# -- in process: HttpCaller against the web ------------------------------------------------

def task(config: dict[str, Any], results: dict[str, Any] | None = None,
         node_type: str = "HTTP") -> dict[str, Any]:
    return {"instance_id": "0000beef", "node_id": "0000000a", "role": "tester",
            "payload": {"query": json.dumps(config), "node_type": node_type,
                        "results": results or {}}}


def policy(allowed: str = "127.0.0.1", cap: int = 1 << 20) -> http_step.Policy:
    return http_step.Policy(http_guard.AllowList.parse(allowed), allowed, cap, True)


@pytest.fixture
async def caller() -> Any:
    c = http_step.HttpCaller()
    yield c
    await c.aclose()


async def test_get_returns_the_envelope(web: Server, caller: http_step.HttpCaller) -> None:
    env = await caller.call(task({"url": web.url + "/echo?a=1", "method": "GET"}), policy())
    assert list(env) == ["status", "body", "encoding", "headers", "ok", "duration_ms"]
    assert env["status"] == 200 and env["ok"] is True and env["encoding"] == "text"
    assert json.loads(env["body"]) == {"method": "GET", "path": "/echo?a=1", "body": ""}
    assert env["headers"]["content-type"] == "application/json"
    assert env["headers"]["x-test"] == "yes"
    assert isinstance(env["duration_ms"], int)
    seen = web.requests("/echo")[-1]
    assert seen.headers["idempotency-key"] == "0000beef-0000000a"
    assert seen.headers["user-agent"].startswith("durable-actor/")


async def test_blocked_without_allow_list(web: Server, caller: http_step.HttpCaller) -> None:
    before = len(web.seen)
    with pytest.raises(StepError, match=r"^Blocked by SSRF protection: 127\.0\.0\.1 is a "
                                        r"loopback address \(127\.0\.0\.0/8\)"):
        await caller.call(task({"url": web.url + "/echo"}), policy(""))
    with pytest.raises(StepError, match=r"Blocked by SSRF protection: localhost resolves to "
                                        r"(127\.0\.0\.1|::1), a loopback address"):
        await caller.call(task({"url": f"http://localhost:{web.port}/echo"}), policy(""))
    with pytest.raises(StepError, match=r"::1 is a loopback address"):
        await caller.call(task({"url": f"http://[::1]:{web.port}/echo"}), policy(""))
    with pytest.raises(StepError, match=r"IPv4-mapped form of 127\.0\.0\.1"):
        await caller.call(task({"url": f"http://[::ffff:127.0.0.1]:{web.port}/"}),
                          policy(""))
    assert len(web.seen) == before


async def test_allow_list_by_host_name(web: Server, caller: http_step.HttpCaller) -> None:
    url = f"http://localhost:{web.port}/echo"
    env = await caller.call(task({"url": url, "method": "GET"}), policy("localhost"))
    assert env["status"] == 200
    with pytest.raises(StepError, match="Blocked by SSRF protection"):
        await caller.call(task({"url": web.url + "/echo"}), policy("localhost"))


async def test_redirects_are_checked_hop_by_hop(web: Server,
                                                caller: http_step.HttpCaller) -> None:
    ok = await caller.call(task({"url": f"{web.url}/redirect?to=/echo", "method": "GET"}),
                           policy())
    assert ok["status"] == 200 and json.loads(ok["body"])["path"] == "/echo"
    for target, rule in [("http://169.254.169.254/latest/meta-data/",
                          r"169\.254\.169\.254 is a link-local address"),
                         (f"http://127.0.0.2:{web.port}/echo",
                          r"127\.0\.0\.2 is a loopback address")]:
        before = len(web.seen)
        with pytest.raises(StepError, match="^Blocked by SSRF protection: " + rule):
            await caller.call(task({"url": f"{web.url}/redirect?to={target}",
                                    "method": "GET"}), policy())
        assert [s.path for s in web.seen[before:]] == [f"/redirect?to={target}"]
    with pytest.raises(StepError, match="unsupported URL scheme"):
        await caller.call(task({"url": f"{web.url}/redirect?to=file:///etc/passwd",
                                "method": "GET"}), policy())


async def test_status_codes(web: Server, caller: http_step.HttpCaller) -> None:
    env = await caller.call(task({"url": web.url + "/status/404", "method": "GET"}), policy())
    assert env["status"] == 404 and env["ok"] is False and env["body"] == "status 404"
    with pytest.raises(StepError, match=r"^HTTP GET http://127\.0\.0\.1:\d+/status/503 "
                                        r"returned 503: status 503$") as info:
        await caller.call(task({"url": web.url + "/status/503", "method": "GET"}), policy())
    assert info.value.retryable


async def test_binary_body_and_size_cap(web: Server, caller: http_step.HttpCaller) -> None:
    env = await caller.call(task({"url": web.url + "/binary", "method": "GET"}), policy())
    assert env["encoding"] == "base64"
    with pytest.raises(StepError, match=r"exceeds max_response_bytes \(4096 bytes\)"):
        await caller.call(task({"url": web.url + "/big", "method": "GET"}),
                          policy(cap=4096))


async def test_timeout_fails_and_the_caller_stays_usable(web: Server,
                                                         caller: http_step.HttpCaller) -> None:
    web.release.clear()
    try:
        with pytest.raises(StepError, match=r"^HTTP timeout after 1s: http://127\.0\.0\.1:\d+"
                                            r"/hang\?…$"):
            await caller.call(task({"url": web.url + "/hang?secret=1", "method": "GET",
                                    "timeout_seconds": 1}), policy())
    finally:
        web.release.set()
    env = await caller.call(task({"url": web.url + "/echo", "method": "GET"}), policy())
    assert env["status"] == 200


async def test_a_redo_sends_the_same_key(web: Server, caller: http_step.HttpCaller) -> None:
    t = task({"url": web.url + "/echo", "method": "POST", "body": "x"})
    t["payload"]["idempotency_key"] = "0000beef-0000000a-3"
    await caller.call(t, policy())
    await caller.call(t, policy())
    keys = [s.headers["idempotency-key"] for s in web.requests("/echo")[-2:]]
    assert keys == ["0000beef-0000000a-3"] * 2


async def test_multipart_with_a_file(web: Server, caller: http_step.HttpCaller) -> None:
    import base64
    results = {"bin": {"status": 200, "body": base64.b64encode(b"\x00PNGDATA\xff").decode(),
                       "encoding": "base64"}}
    env = await caller.call(task({"url": web.url + "/upload", "method": "POST", "parts": [
        {"name": "file", "filename": "pic.png", "content_type": "image/png",
         "data_b64": "$bin.body"},
        {"name": "note", "data_b64": base64.b64encode(b"hello").decode()}]}, results,
        node_type="HTTP_MULTIPART"), policy())
    assert env["status"] == 200
    seen = web.requests("/upload")[-1]
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert b'name="file"; filename="pic.png"' in seen.body
    assert b"Content-Type: image/png\r\n\r\n\x00PNGDATA\xff\r\n" in seen.body
    assert b'name="note"\r\n\r\nhello\r\n' in seen.body


def test_policy_query_rechecks_the_privilege(module_dsn: str) -> None:
    with psycopg.connect(module_dsn, autocommit=True) as c:
        c.execute("CREATE ROLE http_nobody LOGIN")
        try:
            from durable_actor.queries import q
            rows = [c.execute(q("http_policy_get"), {"function": http_step.FUNCTIONS[t],
                                                     "role": r}).fetchone()
                    for t, r in (("HTTP", "http_nobody"), ("HTTP_MULTIPART", "postgres"),
                                 ("HTTP", "no_such_role"))]
        finally:
            c.execute("DROP ROLE http_nobody")
    assert [r[2] if r else "missing" for r in rows] == [False, True, None]
    assert rows[0] is not None and rows[0][:2] == ("", "10485760")


# -- end to end: df.start(df.http(...)) through the real runtime ------------------------------

@pytest.fixture
def db(module_dsn: str, runtime: Runtime) -> Iterator[psycopg.Connection[Any]]:
    allow(module_dsn, "127.0.0.1")
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c
    allow(module_dsn, "")


def run(db: psycopg.Connection[Any], expr: str, *args: Any, status: str = "completed") -> str:
    row = db.execute(f"SELECT df.start({expr})", args).fetchone()
    assert row is not None
    instance = str(row[0])
    done = db.execute("SELECT df.await_instance(%s, 30)", (instance,)).fetchone()
    assert done == (status,), (done, node_rows(db, instance))
    return instance


def node_rows(db: psycopg.Connection[Any], instance: str) -> list[dict[str, Any]]:
    cur = db.execute("SELECT id, node_type, status, result, error FROM df.nodes"
                     " WHERE instance_id = %s ORDER BY position", (instance,))
    cols = [d.name for d in cur.description or []]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def http_node(db: psycopg.Connection[Any], instance: str) -> dict[str, Any]:
    return next(n for n in node_rows(db, instance) if n["node_type"].startswith("HTTP"))


def test_e2e_get(db: psycopg.Connection[Any], web: Server) -> None:
    i = run(db, "df.http(%s, 'GET')", web.url + "/echo")
    row = db.execute("SELECT df.result(%s)", (i,)).fetchone()
    assert row is not None
    result = json.loads(row[0])
    assert list(result) == ["status", "body", "encoding", "headers", "ok", "duration_ms"]
    assert result["status"] == 200 and result["ok"] is True
    assert json.loads(result["body"])["method"] == "GET"
    node = http_node(db, i)
    assert web.requests("/echo")[-1].headers["idempotency-key"] == f"{i}-{node['id']}"


def test_e2e_blocked_by_default(db: psycopg.Connection[Any], web: Server,
                                module_dsn: str) -> None:
    allow(module_dsn, "")
    before = len(web.seen)
    i = run(db, "df.http(%s, 'GET')", web.url + "/echo", status="failed")
    node = http_node(db, i)
    assert node["status"] == "failed"
    assert node["error"].startswith(
        "Blocked by SSRF protection: 127.0.0.1 is a loopback address (127.0.0.0/8).")
    assert node["result"] == node["error"]
    i = run(db, "df.http(%s, 'GET')", f"http://localhost:{web.port}/echo", status="failed")
    assert "Blocked by SSRF protection: localhost resolves to" in http_node(db, i)["error"]
    assert len(web.seen) == before


def test_e2e_references_flow_into_url_body_and_headers(db: psycopg.Connection[Any],
                                                       web: Server) -> None:
    i = run(db, """$$SELECT '/echo' AS path, 'it''s' AS word, 42 AS n$$ |=> 'p'
                   ~> (df.http(%s || '$p.path', 'POST', '{"w": "$p.word", "n": $p.n}',
                               '{"X-Word": "$p.word"}'::jsonb) |=> 'r')
                   ~> $$SELECT ($r.body)::jsonb ->> 'body' AS sent, $r.status AS status$$""",
            web.url)
    row = db.execute("SELECT df.result(%s)", (i,)).fetchone()
    assert row is not None
    assert json.loads(row[0])["rows"] == [{"sent": '{"w": "it\'s", "n": 42}', "status": 200}]
    seen = web.requests("/echo")[-1]
    assert seen.method == "POST" and seen.headers["x-word"] == "it's"


def test_e2e_4xx_is_a_result_5xx_fails(db: psycopg.Connection[Any], web: Server) -> None:
    i = run(db, "df.http(%s, 'GET') |=> 'r' ~> $$SELECT $r.ok AS ok, $r.status AS s$$",
            web.url + "/status/404")
    row = db.execute("SELECT df.result(%s)", (i,)).fetchone()
    assert row is not None and json.loads(row[0])["rows"] == [{"ok": False, "s": 404}]
    i = run(db, "df.http(%s, 'GET')", web.url + "/status/500", status="failed")
    assert "returned 500: status 500" in http_node(db, i)["error"]


def test_e2e_redirect_to_a_blocked_address(db: psycopg.Connection[Any], web: Server) -> None:
    i = run(db, "df.http(%s, 'GET')",
            web.url + "/redirect?to=http://169.254.169.254/latest/meta-data/",
            status="failed")
    assert ("Blocked by SSRF protection: 169.254.169.254 is a link-local address"
            in http_node(db, i)["error"])


def test_e2e_timeout_then_the_executors_still_work(db: psycopg.Connection[Any],
                                                   web: Server) -> None:
    web.release.clear()
    try:
        i = run(db, "df.http(%s, 'GET', timeout_seconds => 1)", web.url + "/hang",
                status="failed")
    finally:
        web.release.set()
    assert http_node(db, i)["error"].startswith("HTTP timeout after 1s: ")
    run(db, "df.http(%s, 'GET') & df.http(%s, 'GET')", web.url + "/echo", web.url + "/echo")


def test_e2e_multipart_with_a_file_from_an_earlier_result(db: psycopg.Connection[Any],
                                                          web: Server) -> None:
    run(db, """df.http(%s, 'GET') |=> 'bin'
               ~> df.http_multipart(%s, parts => jsonb_build_array(
                      jsonb_build_object('name', 'file', 'filename', 'data.bin',
                                         'content_type', 'application/octet-stream',
                                         'data_b64', '$bin.body'),
                      jsonb_build_object('name', 'label', 'data_b64',
                                         encode(convert_to('$bin.status', 'UTF8'), 'base64'))))""",
        web.url + "/binary", web.url + "/upload")
    seen = web.requests("/upload")[-1]
    assert b'filename="data.bin"' in seen.body
    assert b"\r\n\r\n" + bytes(range(256)) + b"\r\n" in seen.body


def test_e2e_loop_iterations_get_their_own_key(db: psycopg.Connection[Any],
                                               web: Server) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS http_loop_runs (n int)")
    before = len(web.requests("/echo"))
    i = run(db, """df.loop($$INSERT INTO http_loop_runs VALUES (1)$$ ~> df.http(%s, 'POST', 'x'),
                           $$SELECT count(*) < 2 FROM http_loop_runs$$)""",
            web.url + "/echo")
    keys = [s.headers["idempotency-key"] for s in web.requests("/echo")[before:]]
    node = http_node(db, i)["id"]
    assert keys == [f"{i}-{node}-1", f"{i}-{node}-2"]


def test_e2e_redo_after_a_crash_repeats_the_key(db: psycopg.Connection[Any], web: Server,
                                                runtime: Runtime) -> None:
    web.release.clear()
    before = len(web.requests("/hang"))
    row = db.execute("SELECT df.start(df.http(%s, 'POST', 'pay', timeout_seconds => 20))",
                     (web.url + "/hang",)).fetchone()
    assert row is not None
    instance = str(row[0])
    until_sync(lambda: len(web.requests("/hang")) > before, timeout=20)
    leased = db.execute("SELECT w.pid FROM df.tasks t JOIN df.workers w ON w.id = t.leased_by"
                        " WHERE t.instance_id = %s", (instance,)).fetchone()
    assert leased is not None
    from tests.runtime import kill
    kill(leased[0])                     # the executor dies mid-call, before completing
    web.release.set()                # later calls (and the dead one's thread) answer at once
    # The lease would run out after the call's time-out plus a margin; move time on instead.
    db.execute("UPDATE df.tasks SET lease_until = now() - interval '1 s' WHERE instance_id = %s",
               (instance,))
    done = db.execute("SELECT df.await_instance(%s, 60)", (instance,)).fetchone()
    assert done == ("completed",)
    keys = [s.headers["idempotency-key"] for s in web.requests("/hang")[before:]]
    assert len(keys) == 2 and keys[0] == keys[1] == f"{instance}-{http_node(db, instance)['id']}"
