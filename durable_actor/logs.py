"""Logging set-up: structlog, one JSON object per line on stderr, secrets redacted.

Each process calls :func:`configure` once, right after it starts (after ``fork`` for the
supervisor's children), binding ``process`` and ``role`` (both its role), ``pid`` and any extra
fields. The chain follows structlog's performance advice: a filtering bound logger, contextvars
merged in (so a unit of work binds ``instance_id``/``node_id`` with
``structlog.contextvars.bound_contextvars``), ISO-8601 UTC timestamps, and orjson writing bytes
straight to stderr. ``fmt="console"`` renders the same events for a human at a terminal.

Log lines leave the machine (journald, log shippers), so one processor redacts secrets wherever
they appear in an event's fields, nested values and exception text included: passwords inside
URLs and key/value DSNs, and the values of authentication headers and secret-named fields.
Records from the standard ``logging`` module (psycopg's pool, the embedded server) go through
the same processors, so stderr stays one format.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "***"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Field names whose value is a secret whatever it looks like (compared lower-case, '-' as '_').
# Plain "token" is left out on purpose: lease tokens and the like are ids, useful when debugging.
SECRET_KEYS = frozenset({
    "password", "passwd", "pgpassword", "sslpassword", "secret", "client_secret",
    "access_token", "refresh_token", "auth_token", "id_token", "api_key", "apikey",
    "authorization", "proxy_authorization", "cookie", "set_cookie",
    "x_api_key", "x_auth_token", "x_amz_security_token",
})

_KEY_ALTERNATIVES = "|".join(
    sorted({k.replace("_", "[-_]") for k in SECRET_KEYS}, key=len, reverse=True))

# scheme://user:PASSWORD@host — greedy up to the last '@' of the authority part.
_URL_PASSWORD = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.\-]*://[^\s/?#@:]*:)[^\s/?#]+(?=@)", re.I)
# ...?password=PASSWORD&... inside a URL's query string.
_QUERY_PASSWORD = re.compile(r"(?P<pre>[?&](?:ssl)?password=)[^&\s#]+", re.I)
# password=PASSWORD in a libpq key/value DSN ('quoted values' may hold spaces).
_KV_PASSWORD = re.compile(
    r"(?P<pre>(?:^|(?<=[\s,;(]))(?:pg|ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']+)",
    re.I)
# "Authorization": "Bearer ..." / 'password': '...' inside a JSON or repr dump.
_QUOTED_PAIR = re.compile(
    rf"(?P<pre>(?P<q>['\"])(?:{_KEY_ALTERNATIVES})(?P=q)\s*[:=]\s*(?P<v>['\"]))"
    r"(?:(?!(?P=v)).)*", re.I)
# Authorization: Bearer ... as a raw header line: the rest of the line goes.
_HEADER_LINE = re.compile(
    r"(?P<pre>(?<![\w-])(?:proxy-authorization|authorization|set-cookie|cookie|x-api-key"
    r"|x-auth-token|x-amz-security-token)[ \t]*:[ \t]*)(?!['\"])[^\r\n]+", re.I)

_MAX_DEPTH = 8


def redact_text(text: str) -> str:
    """Return `text` with passwords in URLs/DSNs and auth header values replaced by ***."""
    if "=" not in text and ":" not in text:
        return text
    for pattern in (_URL_PASSWORD, _QUERY_PASSWORD, _KV_PASSWORD, _QUOTED_PAIR, _HEADER_LINE):
        text = pattern.sub(rf"\g<pre>{REDACTED}", text)
    return text


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SECRET_KEYS


def redact(value: Any, _depth: int = 0) -> Any:
    """Redact secrets inside `value`: strings, and mappings/lists/tuples of them, recursively."""
    if isinstance(value, str):
        return redact_text(value)
    if _depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(k) else redact(v, _depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        # A header list [("Authorization", "Bearer x"), ...] carries its names in the pairs.
        if len(value) == 2 and is_secret_key(value[0]):
            items = [value[0], REDACTED]
        else:
            items = [redact(v, _depth + 1) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def redact_secrets(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every field of the event (see :func:`redact`)."""
    for key, value in event_dict.items():
        event_dict[key] = REDACTED if is_secret_key(key) else redact(value)
    return event_dict


def _static_fields(fields: Mapping[str, Any]) -> Processor:
    def add(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def _json_text(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, **kw).decode()


def level_number(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None


def configure(process: str, *, level: str, fmt: str, **bind: Any) -> None:
    """Configure structlog (and stdlib logging) for this process.

    Args:
        process: the process's role (``supervisor``, ``dispatcher``, ``executor`` …), logged
            in every line as ``process``.
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json`` (one object per line) or ``console`` (for a terminal).
        **bind: more fields logged in every line (``worker_id=…``).
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; use json or console")
    threshold = level_number(level)
    fields: dict[str, Any] = {"process": process, "role": process, "pid": os.getpid(), **bind}
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _static_fields(fields),
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        redact_secrets,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    factory: Callable[..., WrappedLogger]
    if fmt == "json":
        opts = orjson.OPT_NON_STR_KEYS
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps, option=opts)
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
        stdlib_renderer: Processor = structlog.processors.JSONRenderer(
            serializer=_json_text, option=opts)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.WriteLoggerFactory(file=sys.stderr)
        stdlib_renderer = renderer
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib(threshold, shared, stdlib_renderer)


class _StructlogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second configure() replaces it."""


def _route_stdlib(threshold: int, shared: list[Processor], renderer: Processor) -> None:
    handler = _StructlogHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)

