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
    """A workflow step failed; the message is what the node records.

    The rest is the verdict a retry policy reads: the SQLSTATE, whether the failure is
    transient by default (``retryable``), the HTTP status of a failed call, the class of a
    transport failure (``http_timeout``, ``http_connect``, ``http_network``) and a server's
    ``Retry-After`` in seconds.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None,
                 retryable: bool = False, http_status: int | None = None,
                 error_class: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.retryable = retryable
        self.http_status = http_status
        self.error_class = error_class
        self.retry_after = retry_after
