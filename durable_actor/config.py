"""Settings: one frozen dataclass built once (in cli.py) and handed to every process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from durable_actor.errors import ConfigError

ENV_PREFIX = "DURABLE_ACTOR_"

MIN_POLL_INTERVAL = 0.01
MAX_SHARDS = 1024


def default_data_dir() -> Path:
    """Where the embedded server keeps its data: $XDG_DATA_HOME or ~/.local/share."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "durable-actor" / "pgdata"


def default_executors() -> int:
    return max(2, os.cpu_count() or 2)


@dataclass(frozen=True)
class Settings:
    """Runtime settings. SQL-visible policy lives in the df.settings table instead."""

    dsn: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    executors: int = field(default_factory=default_executors)
    shards: int = 64
    dispatcher_batch: int = 200
    executor_batch: int = 100
    timer_batch: int = 500
    poll_interval: float = 0.5
    idle_poll_interval: float = 5.0
    batch_budget: float = 0.05
    grace_period: float = 10.0
    lease_seconds: float = 5.0
    migration_lock_timeout: float = 60.0
    retention_interval: float = 60.0
    log_level: str = "info"
    log_format: str = "json"
    metrics_port: int | None = None

    def validate(self) -> Settings:
        """Check bounds; raise ConfigError naming the field and the bound."""
        if self.executors < 1:
            raise ConfigError("executors must be at least 1")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ConfigError(f"shards must be between 1 and {MAX_SHARDS}")
        for name in ("dispatcher_batch", "executor_batch", "timer_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.poll_interval < MIN_POLL_INTERVAL:
            raise ConfigError(f"poll_interval must be at least {MIN_POLL_INTERVAL}s")
        if self.idle_poll_interval < MIN_POLL_INTERVAL:
            raise ConfigError(f"idle_poll_interval must be at least {MIN_POLL_INTERVAL}s")
        if self.retention_interval < MIN_POLL_INTERVAL:
            raise ConfigError(f"retention_interval must be at least {MIN_POLL_INTERVAL}s")
        if self.grace_period < 0:
            raise ConfigError("grace_period must not be negative")
        if self.lease_seconds < 1:
            raise ConfigError("lease_seconds must be at least 1")
        if self.log_format not in ("json", "console"):
            raise ConfigError("log_format must be 'json' or 'console'")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be one of debug, info, warning, error")
        return self

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).validate()


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def from_env(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from DURABLE_ACTOR_* variables, then explicit overrides (None = not given)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = env.get(env_name(f.name))
        if raw is None or raw == "":
            continue
        values[f.name] = _parse(f.name, raw, f.type)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values).validate()


def _parse(name: str, raw: str, type_: Any) -> Any:
    text = str(type_)
    try:
        if "Path" in text:
            return Path(raw).expanduser()
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{env_name(name)}={raw!r} is not a valid {text}") from exc
    return raw
