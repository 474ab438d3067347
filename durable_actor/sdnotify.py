"""sd_notify: tell the service manager how the supervisor is doing (systemd's notify protocol).

The protocol is one datagram per message, ``KEY=value`` lines, sent to the unix socket named
by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). No library needed.
Without ``NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is a no-op. A
failing send is never fatal: the service manager is told what it can be told.

``WATCHDOG_USEC`` (set by systemd from ``WatchdogSec=``) gives the interval within which
``WATCHDOG=1`` must arrive; ``WATCHDOG_PID``, when set, names the process meant to send it.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """One datagram socket to ``NOTIFY_SOCKET``, opened on first use."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or ""
        self.address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._sock: socket.socket | None = None
        self.watchdog_seconds = _watchdog_seconds(env)
        self.failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one message; False if not under a notify manager."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.connect(self.address)
                self._sock = sock
            self._sock.sendall("\n".join(lines).encode())
        except OSError:
            self.failed = True
            self.close()
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """The watchdog interval in seconds, or None when no watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
