"""systemd service notifications (``Type=notify``) without libsystemd.

Under systemd the supervisor reports READY once its workers are up, a STATUS line with progress,
WATCHDOG keep-alives from the event loop (so a wedged loop gets restarted) and STOPPING while it
drains. Outside systemd ``NOTIFY_SOCKET`` is unset and every call is a cheap no-op. Sending never
raises: a lost notification must not take down a run that is otherwise fine.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Datagram client for ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address: str | bytes | None = _address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self.watchdog_interval: float | None = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; False when disabled or the send failed."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)  # a full receive queue must not stall the event loop
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """One-line status shown by ``systemctl status``; newlines would end the field early."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp that ``Type=notify-reload`` requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, usec: int) -> bool:
        """Ask for more start/stop time (a slow model load, a long drain) before systemd gives up."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(usec)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of a path.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock: and other transports are not supported; stay silent rather than fail


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC (systemd's advice), or None if unset or meant for another process."""
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000
