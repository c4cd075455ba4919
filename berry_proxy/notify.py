"""systemd's notify protocol (``sd_notify``), with the standard library only.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a unix datagram socket (a path,
or an abstract name written with a leading ``@``); each datagram is newline-separated
``KEY=VALUE`` lines: ``READY=1`` once the gateway listens, ``RELOADING=1`` with
``MONOTONIC_USEC`` when a reload starts (then ``READY=1`` again), ``STOPPING=1`` when the
drain starts, ``STATUS=`` a line ``systemctl status`` shows, and ``WATCHDOG=1`` keep-alive
pings when the unit sets ``WatchdogSec`` (``$WATCHDOG_USEC``, for ``$WATCHDOG_PID``).

Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing. A failed send is
logged once and never raised: telling systemd is not worth failing a request or a reload.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from .log import get_logger

log = get_logger("berry_proxy.notify")


def _address(name: str) -> str:
    # An abstract socket: systemd writes its leading NUL byte as "@".
    return "\0" + name[1:] if name.startswith("@") else name


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``RELOADING=1`` wants it beside it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    __slots__ = ("_address", "_failed", "_socket")

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        self._address = _address(name) if name else None
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> None:
        """One datagram of ``KEY=VALUE`` lines (``READY=1`` as ``READY=1``...)."""
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)  # never wait on systemd in the event loop
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd_notify_failed", error=type(exc).__name__)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="Reloading the config")

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``, as systemd advises);
    None when no watchdog is set for this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000 / 2
