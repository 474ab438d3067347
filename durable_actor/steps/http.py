"""The HTTP step: one request from an HTTP / HTTP_MULTIPART node, its response as a result.

What `HttpCaller.call` does
---------------------------
1. Reads the node's config (the JSON text ``df.http`` / ``df.http_multipart`` stored, after the
   engine's ``{var}`` expansion) and inserts ``$name`` references raw into the URL, the body,
   header values and the multipart fields (``refs.render_http``). A part's ``data_b64`` takes
   a reference only as its whole value (``$file.body``), and may hold white space (PostgreSQL's
   ``encode(…, 'base64')`` breaks lines).
2. Sends the request with a stable ``Idempotency-Key`` header (instance id and node id, plus
   the iteration of each enclosing loop; the same for every attempt at the same activation,
   so a receiver can drop the duplicate that a crash between call and completion causes). A
   key the node sets itself wins. The whole exchange, redirects and body included, is bounded
   by ``timeout_seconds`` (default 30).
3. Returns SPEC §9's envelope ``{"status", "body", "encoding", "headers", "ok",
   "duration_ms"}``. A 4xx response is a result (``ok`` false); a 5xx response, a time-out or
   a network error fails the step (``StepError(retryable=True)``); refusals (SSRF, scheme,
   privilege, bad config) fail it for good.

SSRF: checked where the socket is opened
----------------------------------------
Every connection goes through `_GuardedBackend`, an httpcore network backend: it resolves
the host once, checks *every* address of the answer (`http_guard.check`; one bad address
refuses the host) and then connects to one of those checked addresses. TLS still uses the
URL's host name for SNI and certificate checks (httpcore passes the origin's name to
``start_tls``), and the Host header is the URL's. Because the check sits at connect time,
IP literals, DNS names, DNS rebinding and every redirect hop (followed up to
`MAX_REDIRECTS`, each a new connection to a new origin) pass through the same gate.
Environment proxies are ignored (a proxy would resolve names itself), and cookies are never
stored, since one client serves every instance of the process.

One ``httpx.AsyncClient`` per allow-list value serves the whole executor process, keeping
connections alive between steps; a changed allow-list gets a new client, so a connection
opened under an older, wider list is never reused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import email.utils
import re
import socket
import ssl
import time
import typing
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import certifi
import httpcore
import httpx
import orjson

from durable_actor import __version__, http_guard, refs
from durable_actor.errors import StepError

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 5
ERROR_PREVIEW_CHARS = 512
LEASE_MARGIN = 15.0          # seconds a lease outlives the call's own time-out
MAX_CLIENTS = 4              # clients kept for distinct allow-list values
USER_AGENT = f"durable-actor/{__version__}"
FUNCTIONS = {"HTTP": "df.http(text,text,text,jsonb,integer)",
             "HTTP_MULTIPART": "df.http_multipart(text,text,jsonb,jsonb,integer)"}

_TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/ecmascript",
    "application/x-www-form-urlencoded", "application/graphql", "application/yaml",
    "application/x-yaml", "application/x-ndjson", "application/sql", "application/csv"})
_WHOLE_REF = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?\??")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Policy:
    """What the database says about one HTTP step (query ``http_policy_get``)."""

    allow: http_guard.AllowList
    allow_text: str
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    may_call: bool | None = True

    @classmethod
    def from_row(cls, row: dict[str, Any] | None) -> Policy:
        """Build from the query's row; raise StepError on a malformed setting."""
        row = row or {}
        text = str(row.get("allowed_hosts") or "")
        try:
            allow = http_guard.AllowList.parse(text)
        except ValueError as exc:
            raise StepError(f"HTTP step refused: {exc}") from exc
        raw = row.get("max_response_bytes")
        try:
            cap = int(raw) if raw not in (None, "") else DEFAULT_MAX_RESPONSE_BYTES
        except ValueError as exc:
            raise StepError(f"HTTP step refused: the 'http_max_response_bytes' setting "
                            f"{raw!r} is not an integer") from exc
        return cls(allow, text, cap, row.get("may_call", True))


@dataclass(frozen=True)
class Request:
    """An HTTP node's config with every reference resolved: what will be sent."""

    method: str
    url: httpx.URL
    headers: list[tuple[str, str]]
    timeout: float
    body: str | None = None
    files: list[tuple[str, tuple[str | None, bytes, str | None]]] | None = None

    @property
    def safe_url(self) -> str:
        """The URL for logs and errors: no credentials, no query (it may hold a token)."""
        return _safe_url(self.url)


# --------------------------------------------------------------------------------------
# Config -> Request (pure)
# --------------------------------------------------------------------------------------

def config_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The node's config object from a task payload; StepError if it is not one."""
    try:
        config = orjson.loads(payload.get("query") or "")
    except orjson.JSONDecodeError as exc:
        raise StepError(f"Invalid HTTP config: {exc}") from exc
    if not isinstance(config, dict):
        raise StepError("Invalid HTTP config: expected a JSON object")
    return config


def timeout_of(payload: dict[str, Any]) -> float:
    """The step's total time-out in seconds (for the executor's lease)."""
    try:
        return _timeout(config_of(payload))
    except StepError:
        return DEFAULT_TIMEOUT


def _timeout(config: dict[str, Any]) -> float:
    value = config.get("timeout_seconds")
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise StepError(f"Invalid HTTP config: timeout_seconds must be a positive number, "
                        f"not {value!r}")
    return float(value)


def build_request(node_type: str, config: dict[str, Any], results: dict[str, Any], *,
                  idempotency_key: str) -> Request:
    """Resolve references and check the config; no I/O.

    Args:
        node_type: "HTTP" or "HTTP_MULTIPART".
        config: the node's config object.
        results: bound name -> stored result, for the names the config references.
        idempotency_key: the value of the Idempotency-Key header unless the node sets one.

    Raises:
        StepError: a bad config, an unsupported scheme or an unresolvable reference.
    """
    raw_url = config.get("url")
    if not isinstance(raw_url, str) or not raw_url:
        raise StepError("Invalid HTTP config: url must be a non-empty string")
    url_text = refs.render_http(raw_url, results).strip()
    try:
        url = httpx.URL(url_text)
    except httpx.InvalidURL as exc:
        raise StepError(f"Invalid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise StepError(f"Blocked: unsupported URL scheme '{url.scheme}'. "
                        "Only http and https are allowed.")
    if not url.host:
        raise StepError("Invalid URL: no host")
    method = str(config.get("method") or "POST").upper()
    allowed = ("POST", "PUT", "PATCH") if node_type == "HTTP_MULTIPART" else (
        "GET", "POST", "PUT", "DELETE", "PATCH")
    if method not in allowed:
        raise StepError(f"Unsupported HTTP method: {method}")
    multipart = node_type == "HTTP_MULTIPART"
    headers = _headers(config.get("headers"), results, multipart=multipart)
    names = {name.lower() for name, _ in headers}
    if "idempotency-key" not in names:
        headers.append(("Idempotency-Key", idempotency_key))
    if "user-agent" not in names:
        headers.append(("User-Agent", USER_AGENT))
    timeout = _timeout(config)
    if multipart:
        return Request(method, url, headers, timeout, files=_parts(config.get("parts"), results))
    body = config.get("body")
    if body is not None and not isinstance(body, str):
        raise StepError("Invalid HTTP config: body must be text or null")
    return Request(method, url, headers, timeout,
                   body=None if body is None else refs.render_http(body, results))


def _headers(raw: Any, results: dict[str, Any], *, multipart: bool) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise StepError("Invalid HTTP config: headers must be a JSON object")
    out = []
    for name, value in raw.items():
        if value is None:
            continue
        if multipart and name.lower() == "content-type":
            continue        # the client writes multipart/form-data with its boundary
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        text = refs.render_http(text, results)
        if "\r" in text or "\n" in text or "\r" in name or "\n" in name:
            raise StepError(f"Invalid HTTP header '{name}': line breaks are not allowed")
        out.append((name, text))
    return out


def _parts(raw: Any, results: dict[str, Any]
           ) -> list[tuple[str, tuple[str | None, bytes, str | None]]]:
    if not isinstance(raw, list) or not raw:
        raise StepError("Invalid multipart HTTP config: parts must be a non-empty array")
    files = []
    for i, part in enumerate(raw):
        if not isinstance(part, dict):
            raise StepError(f"Invalid multipart HTTP config: parts[{i}] must be a JSON object")
        name = part.get("name")
        data = part.get("data_b64")
        if not isinstance(name, str) or not name or not isinstance(data, str):
            raise StepError(f"Invalid multipart HTTP config: parts[{i}] needs a name and "
                            "data_b64")
        name = refs.render_http(name, results)
        filename = _optional_text(part, "filename", i, results)
        content_type = _optional_text(part, "content_type", i, results)
        files.append((name, (filename, _part_data(data, name, results), content_type)))
    return files


def _optional_text(part: dict[str, Any], key: str, i: int, results: dict[str, Any]) -> str | None:
    value = part.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise StepError(f"Invalid multipart HTTP config: parts[{i}].{key} must be a string")
    return refs.render_http(value, results)


def _part_data(data: str, name: str, results: dict[str, Any]) -> bytes:
    stripped = data.strip()
    if refs.referenced_names(data, results):
        if not _WHOLE_REF.fullmatch(stripped):
            raise StepError(
                f"Invalid data_b64 in part '{name}': a reference must be the whole value "
                "(whole-value reference, e.g. '$file.body'), not mixed with other text")
        stripped = refs.render_http(stripped, results)
    try:
        return base64.b64decode(_SPACE.sub("", stripped), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StepError(f"Invalid base64 in part '{name}': {exc} (a response body can be "
                        "used only when its encoding is 'base64')") from exc


def _safe_url(url: httpx.URL) -> str:
    shown = url.copy_with(username=None, password=None, query=None, fragment=None)
    return str(shown) + ("?…" if url.query else "")


# --------------------------------------------------------------------------------------
# Response -> envelope (pure)
# --------------------------------------------------------------------------------------

def is_textual(content_type: str | None) -> bool:
    """Does a Content-Type header send a text body? (SPEC §9; a missing header does.)"""
    if content_type is None:
        return True
    mime = content_type.split(",", 1)[0].split(";", 1)[0].strip().lower()
    if not mime:
        return True
    return (mime.startswith("text/") or mime.endswith(("+json", "+xml", "+yaml"))
            or mime in _TEXT_TYPES)


def decode_body(data: bytes, content_type: str | None) -> tuple[str, str]:
    """(body, encoding): text in the declared charset (UTF-8 by default), else base64.

    A body that does not decode, or holds a NUL (which PostgreSQL text cannot store), goes
    as base64 even when its type is textual.
    """
    if is_textual(content_type):
        charset = _charset(content_type) or "utf-8"
        try:
            if codecs.lookup(charset).name == "utf-8":
                charset = "utf-8-sig"           # drop a byte-order mark, as browsers do
            text = data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            text = None
        if text is not None and "\x00" not in text:
            return text, "text"
    return base64.b64encode(data).decode("ascii"), "base64"


def _charset(content_type: str | None) -> str | None:
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


def envelope(status: int, body: str, encoding: str, headers: dict[str, str],
             duration_ms: int) -> dict[str, Any]:
    """SPEC §9's result, keys in its order."""
    return {"status": status, "body": body, "encoding": encoding, "headers": headers,
            "ok": 200 <= status < 300, "duration_ms": duration_ms}


def _preview(body: str) -> str:
    if len(body) <= ERROR_PREVIEW_CHARS:
        return body
    return f"{body[:ERROR_PREVIEW_CHARS]}... [truncated, {len(body)} characters total]"


# --------------------------------------------------------------------------------------
# The guarded connection
# --------------------------------------------------------------------------------------

class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve once, check every address, connect only to a checked address."""

    def __init__(self, allow: http_guard.AllowList) -> None:
        self.allow = allow
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolve(host, port, timeout)
        for ip in addresses:
            http_guard.check(host, ip, self.allow)
        error: Exception | None = None
        for ip in addresses:
            try:
                return await self.inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as exc:
                error = exc
        assert error is not None
        raise error

    async def _resolve(self, host: str, port: int,
                       timeout: float | None) -> list[http_guard.IPAddress]:
        literal = http_guard.parse_address(host)
        if literal is not None:
            return [literal]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        seen: dict[http_guard.IPAddress, None] = {}
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = http_guard.parse_address(str(sockaddr[0]))
            if ip is None:
                raise httpcore.ConnectError(f"cannot resolve {host}: odd address {sockaddr[0]}")
            seen.setdefault(ip, None)
        if not seen:
            raise httpcore.ConnectError(f"cannot resolve {host}: no addresses")
        return list(seen)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise http_guard.Blocked("Blocked by SSRF protection: unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool built on `_GuardedBackend`."""

    def __init__(self, allow: http_guard.AllowList, limits: httpx.Limits) -> None:
        super().__init__(trust_env=False, limits=limits)
        # httpx takes no network backend, so the pool it built is replaced by an equal one
        # that has ours (httpx's handle_async_request only talks to self._pool).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GuardedBackend(allow))


def _new_client(allow: http_guard.AllowList) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                          keepalive_expiry=30.0)
    return httpx.AsyncClient(
        transport=_GuardedTransport(allow, limits), trust_env=False,
        follow_redirects=True, max_redirects=MAX_REDIRECTS,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))


# --------------------------------------------------------------------------------------
# The caller
# --------------------------------------------------------------------------------------

class HttpCaller:
    """Runs HTTP steps for one executor process; owns its pooled clients."""

    def __init__(self) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._retired: list[httpx.AsyncClient] = []

    def _client(self, policy: Policy) -> httpx.AsyncClient:
        client = self._clients.get(policy.allow_text)
        if client is None:
            if len(self._clients) >= MAX_CLIENTS:
                oldest = next(iter(self._clients))
                self._retired.append(self._clients.pop(oldest))
            client = self._clients[policy.allow_text] = _new_client(policy.allow)
        return client

    async def aclose(self) -> None:
        clients = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)

    async def call(self, task: dict[str, Any], policy: Policy) -> dict[str, Any]:
        """Run the task's HTTP step; return the envelope or raise StepError.

        Args:
            task: the claimed task (instance_id, node_id, role, payload).
            policy: the allow-list and caps read for this step.
        """
        payload = task["payload"]
        node_type = str(payload.get("node_type") or "HTTP")
        function = "df.http_multipart" if node_type == "HTTP_MULTIPART" else "df.http"
        if policy.may_call is None:
            raise StepError(f"Blocked: role '{task['role']}' does not exist")
        if not policy.may_call:
            raise StepError(
                f"Blocked: role '{task['role']}' does not have EXECUTE privilege on "
                f"{function}(). Use df.grant_usage with include_http => true to allow HTTP "
                "requests.")
        key = payload.get("idempotency_key") or f"{task['instance_id']}-{task['node_id']}"
        request = build_request(node_type, config_of(payload), payload.get("results") or {},
                                idempotency_key=str(key))
        label = "HTTP_MULTIPART" if node_type == "HTTP_MULTIPART" else "HTTP"
        started = time.monotonic()
        try:
            async with asyncio.timeout(request.timeout):
                status, headers, data = await self._exchange(request, policy)
        except TimeoutError as exc:
            raise StepError(f"HTTP timeout after {request.timeout:g}s: {request.safe_url}",
                            retryable=True, error_class="http_timeout") from exc
        duration_ms = round((time.monotonic() - started) * 1000)
        body, encoding = decode_body(data, headers.get("content-type"))
        if status >= 500:
            raise StepError(f"{label} {request.method} {request.safe_url} returned {status}: "
                            f"{_preview(body)}", retryable=True, http_status=status,
                            retry_after=retry_after_seconds(headers.get("retry-after")))
        return envelope(status, body, encoding, headers, duration_ms)

    async def _exchange(self, request: Request, policy: Policy
                        ) -> tuple[int, dict[str, str], bytes]:
        client = self._client(policy)
        timeout = httpx.Timeout(request.timeout)
        try:
            built = client.build_request(
                request.method, request.url, headers=request.headers, timeout=timeout,
                content=None if request.body is None else request.body.encode(),
                files=request.files)
            response = await client.send(built, stream=True)
            try:
                data = await _read_limited(response, policy.max_response_bytes)
                headers = {k: v for k, v in response.headers.items()}
                return response.status_code, headers, data
            finally:
                await response.aclose()
        except http_guard.Blocked as exc:
            raise StepError(str(exc)) from exc
        except httpx.TimeoutException as exc:
            raise TimeoutError from exc
        except httpx.TooManyRedirects as exc:
            raise StepError(f"HTTP request failed: {request.safe_url} - more than "
                            f"{MAX_REDIRECTS} redirects") from exc
        except httpx.UnsupportedProtocol as exc:
            raise StepError(f"Blocked: a redirect from {request.safe_url} went to an "
                            "unsupported URL scheme. Only http and https are allowed.") from exc
        except httpx.ConnectError as exc:
            raise StepError(f"HTTP connection failed: {request.safe_url} - {exc}",
                            retryable=True, error_class="http_connect") from exc
        except httpx.HTTPError as exc:
            raise StepError(f"HTTP request failed: {request.safe_url} - {exc}",
                            retryable=True, error_class="http_network") from exc


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds from now: delta-seconds or an HTTP date (RFC 9110
    §10.2.3); None when absent or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit and (
            "content-encoding" not in response.headers):
        raise StepError(f"HTTP response body exceeds max_response_bytes ({limit} bytes)")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise StepError(f"HTTP response body exceeds max_response_bytes ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
