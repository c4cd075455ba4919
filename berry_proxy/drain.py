"""Shutdown as proxied requests see it: refused once draining, ended when it runs out.

On SIGTERM (``lifecycle.py``) the gateway stops accepting and ``Drain.draining`` becomes
true: ``/health`` answers 503, and a request that still reaches a handler (one already
read off a keep-alive connection) gets 503 ``draining``. Requests already being served go
on. When ``server.drain_timeout_seconds`` has passed (or at a second signal),
``Drain.expire`` ends each one left through the ``Watchdog`` that already bounds its
attempt: a stream gets one ``draining`` error event (never a silent cut), a request still
waiting for its upstream a 503 ``draining``. Neither charges the backend: it did nothing
wrong. No attempt starts once the drain has run out (``Proxy``), and one whose guarded
block began just after is ended as it begins (``watch``). A request not in an attempt
then (reading its body, waiting for a connection slot) is ended at its next step.
"""

from __future__ import annotations

from .deadline import Phase, Watchdog
from .errors import ServiceUnavailable


class Drain:
    __slots__ = ("draining", "expired", "watched")

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        # The watchdogs of the attempts being served now (added and removed by each).
        self.watched: set[Watchdog] = set()

    def watch(self, watchdog: Watchdog) -> None:
        """Let the drain end this attempt (at once if the drain has already run out)."""
        self.watched.add(watchdog)
        if self.expired:
            watchdog.expire(Phase.DRAIN)

    def begin(self) -> None:
        """Stop taking requests; those being served go on."""
        self.draining = True

    def expire(self) -> None:
        """End every attempt still being served, now."""
        self.draining = True
        self.expired = True
        for watchdog in list(self.watched):
            watchdog.expire(Phase.DRAIN)


def draining_error() -> ServiceUnavailable:
    """503 ``draining``: this instance is shutting down; another one will serve."""
    error = ServiceUnavailable(
        "draining",
        "The gateway is shutting down and takes no new requests; retry on another instance",
    )
    error.close_connection = True  # the connection ends with this instance
    return error
