"""Shutdown as proxied requests see it: refused once draining, ended when the drain runs out.

On SIGTERM (``lifecycle.py``) the gateway stops accepting and ``Drain.draining`` becomes
true: a request that still arrives on an open connection gets 503 ``draining`` and
``/health`` answers 503. Requests already being served go on. When
``server.drain_timeout_seconds`` has passed (or at a second signal), ``Drain.expire`` ends
each one that is left through the ``Watchdog`` that already bounds it: a stream gets one
``draining`` error event (never a silent cut), a request still waiting for its upstream a
503 ``draining``. Neither charges the backend: it did nothing wrong.
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
