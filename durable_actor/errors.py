"""The exception hierarchy of durable-actor. Each class's docstring is its default message."""

from __future__ import annotations


class DurableActorError(Exception):
    """durable-actor failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(DurableActorError):
    """A setting is invalid."""


class MigrationError(DurableActorError):
    """The schema could not be migrated."""


class MigrationLockTimeout(MigrationError):
    """Another process holds the migration lock; gave up waiting."""


class EmbeddedServerError(DurableActorError):
    """The embedded PostgreSQL server could not be started."""


class StepError(DurableActorError):
    """A workflow step failed; the message is what the node records."""

    def __init__(self, message: str, *, sqlstate: str | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.retryable = retryable
